"""Loopback chain broadcast: relay forward path through Python copies vs kernel pipes (splice/tee).

Every measurement is a fresh worker process that starts N `Receiver`s on 127.0.0.2.. (discard sinks:
sha256 of the stream only, nothing written), runs `run_broadcast(..., "chain")` of one image file from
a `Source` in the same process (as in the vm-testbed, where every relay shares one process), and
reports the wall time and the process's CPU time (user + system, every thread). Variants are the
`ChainParams.relay_path` values, and optionally the same worker run against an older commit
(`--baseline-commit REV`, exported with `git archive`); they alternate inside each repeat.

    flock /tmp/rackboot-bench.lock /work/venv-probe/bin/python bench/chain_loopback.py --nodes 1,2,5,10 --repeats 3

Only loopback addresses are used; no namespace is created, so root is not needed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import (ScratchDir, code_description, fmt, machine_load, markdown_table, median,  # noqa: E402
                     resolve_commit, say, write_json)

REPO = Path(__file__).resolve().parent.parent


async def run_worker(image: Path, nodes: int, relay_path: str | None, chunk: int, window: int) -> dict[str, Any]:
    """Broadcast image along a chain of `nodes` loopback receivers in this process; return time, CPU and counters."""
    import hashlib

    from broadcast.chain import ChainParams, Receiver
    from broadcast.image import SinkSpec
    from broadcast.methods import BroadcastJob, run_broadcast
    from broadcast.topology import Target

    sha = hashlib.sha256(image.read_bytes()).hexdigest()
    receivers = [Receiver(f"node-{i + 1}", f"127.0.0.{i + 2}") for i in range(nodes)]
    for r in receivers:
        await r.start()
    by_name = {r.name: r for r in receivers}

    async def arm(t: Target, session: str, token: str) -> None:
        by_name[t.name].arm(session, token, SinkSpec(kind="discard", compression="none"))

    extra = {"relay_path": relay_path} if relay_path else {}
    params = ChainParams(chunk=chunk, window=window, **extra)  # type: ignore[arg-type]
    job = BroadcastJob(image=image, sha256=sha, deadline=600, params=params)
    targets = [Target(r.name, r.host, r.port) for r in receivers]
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    result = await run_broadcast(job, targets, "chain", arm)
    seconds = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    counters: dict[str, int] = {}
    for r in receivers:
        for relay in r.relays.values():
            for k, v in getattr(relay, "counters", {}).items():
                counters[k] = counters.get(k, 0) + v
    for r in receivers:
        await r.close()
    return {"ok": len(result.ok) == nodes, "failed": {n: result.nodes[n].reason for n in result.failed},
            "seconds": seconds, "user": ru1.ru_utime - ru0.ru_utime, "sys": ru1.ru_stime - ru0.ru_stime,
            "counters": counters}


def measure(tree: Path, image: Path, nodes: int, relay_path: str | None, chunk: int, window: int) -> dict[str, Any]:
    """Run one worker process against the code in tree and return its JSON line."""
    cmd = [sys.executable, "-P", str(Path(__file__).resolve()), "--worker", "--image", str(image), "--nodes", str(nodes),
           "--chunk", str(chunk), "--window", str(window)]
    if relay_path:
        cmd += ["--relay-path", relay_path]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(tree / "vm-testbed")])}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"worker failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Parse arguments, run the variants alternately, print a markdown report."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", default="1,2,5,10", help="chain lengths, comma-separated")
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--paths", default="python,splice", help="ChainParams.relay_path values to compare")
    ap.add_argument("--baseline-commit", default="", help="also run this commit (its default relay path) as a variant")
    ap.add_argument("--chunk", type=int, default=256 * 1024)
    ap.add_argument("--window", type=int, default=32 << 20)
    ap.add_argument("--json", default=None, help="write every measurement here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--image", default="", help=argparse.SUPPRESS)
    ap.add_argument("--relay-path", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        res = asyncio.run(run_worker(Path(args.image), int(args.nodes), args.relay_path, args.chunk, args.window))
        print(json.dumps(res))
        return

    node_counts = [int(x) for x in args.nodes.split(",")]
    variants: list[tuple[str, Path | None, str | None]] = [(p, None, p) for p in args.paths.split(",") if p]
    baseline = resolve_commit(args.baseline_commit) if args.baseline_commit else None
    runs: list[dict[str, Any]] = []
    loads: list[dict[str, Any]] = [machine_load()]
    size = args.size_mib << 20
    with ScratchDir("rackboot-chainbench-") as tmp:
        image = Path(tmp) / "image.bin"
        with image.open("wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        if baseline:
            base_tree = Path(tmp) / "baseline"
            base_tree.mkdir()
            archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", baseline], capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", str(base_tree)], input=archive.stdout, check=True)
            variants.append((f"commit {baseline[:7]}", base_tree, None))
        for rep in range(args.repeats):
            for n in node_counts:
                for name, tree, path in variants:
                    res = measure(tree or REPO, image, n, path, args.chunk, args.window)
                    res.update(repeat=rep, nodes=n, variant=name)
                    runs.append(res)
                    say(f"repeat {rep + 1} nodes {n:>3} {name:>16}: {size / res['seconds'] / 1e6:7.1f} MB/s per node, "
                        f"CPU {res['user'] + res['sys']:.2f} s, ok={res['ok']} {res['counters']}")
            loads.append(machine_load())
    write_json(args.json, {"runs": runs, "loads": loads, "size": size, "code": code_description(None)})

    def cell(n: int, name: str, key: str) -> float | None:
        vals = []
        for r in runs:
            if r["nodes"] == n and r["variant"] == name and r["ok"]:
                stream_gb = size * n / 1e9
                vals.append({"mbps": size / r["seconds"] / 1e6, "total": size * n / r["seconds"] / 1e6,
                             "cpu_gb": (r["user"] + r["sys"]) / stream_gb, "sys_gb": r["sys"] / stream_gb}[key])
        return median(vals)

    names = [v[0] for v in variants]
    rows = []
    for n in node_counts:
        ref = cell(n, names[0], "mbps")
        for name in names:
            mbps = cell(n, name, "mbps")
            rows.append([str(n), name, fmt(mbps, 0), fmt(cell(n, name, "total"), 0),
                         fmt(mbps / ref if mbps and ref else None, 2), fmt(cell(n, name, "cpu_gb"), 2), fmt(cell(n, name, "sys_gb"), 2)])
    print(f"Chain over loopback, {args.size_mib} MiB image, discard sinks, chunk {args.chunk}, window {args.window}, "
          f"{args.repeats} repeats (medians), code {code_description(None)}")
    print()
    print(markdown_table(["relays", "variant", "MB/s per node", "MB/s total", f"x {names[0]}", "CPU s/GB relayed",
                          "of which sys"], rows))
    print()
    for i, load in enumerate(loads):
        print(f"- load {'before' if i == 0 else f'after repeat {i}'}: {load['uptime']} (CPUs {load['busy_pct']} % busy)")


if __name__ == "__main__":
    main()
