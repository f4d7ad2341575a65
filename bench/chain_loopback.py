"""Loopback chain broadcast: relay forward path through Python copies vs kernel pipes (splice/tee).

Every measurement is a fresh worker process that starts N `Receiver`s on 127.0.0.2.. (discard sinks:
sha256 of the stream only, nothing written), runs `run_broadcast(..., "chain")` of one image file from
a `Source` in the same process (as in the vm-testbed, where every relay shares one process), and
reports the wall time and the process's CPU time (user + system, every thread). Variants are the
`ChainParams.relay_path` values, and optionally the same worker run against an older commit
(`--baseline-commit REV`, exported with `git archive`); they alternate inside each repeat.

`--isolated` measures one relay as it runs on a real node instead: node-1 (a relay with one child)
runs alone in its own process, whose CPU time is the figure; the source and node-2 run in the worker.

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


async def run_lone_relay() -> None:
    """Be node-1 alone in this process: print our port, arm what stdin says, print CPU time and counters when done."""
    from broadcast.receiver import Receiver
    from broadcast.image import SinkSpec

    receiver = Receiver("node-1", "127.0.0.2")
    await receiver.start()
    print(json.dumps({"port": receiver.port}), flush=True)
    loop = asyncio.get_running_loop()
    armed = json.loads(await loop.run_in_executor(None, sys.stdin.readline))
    receiver.arm(armed["session"], armed["token"], SinkSpec(kind="discard", compression="none"))
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    result = await receiver.wait_result(armed["session"], 600)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    relay = receiver.relays[armed["session"]]
    await asyncio.sleep(0.2)  # the result is reported; let the parent close the link
    await receiver.close()
    print(json.dumps({"ok": result.ok, "user": ru1.ru_utime - ru0.ru_utime, "sys": ru1.ru_stime - ru0.ru_stime,
                      "counters": getattr(relay, "counters", {})}), flush=True)


async def run_isolated(image: Path, relay_path: str | None, chunk: int, window: int) -> dict[str, Any]:
    """Source and node-2 here, node-1 (the measured relay) in a subprocess; return its CPU time and counters."""
    import hashlib

    from broadcast.image import SinkSpec
    from broadcast.methods import BroadcastJob, run_broadcast
    from broadcast.params import ChainParams
    from broadcast.receiver import Receiver
    from broadcast.topology import Target

    sha = hashlib.sha256(image.read_bytes()).hexdigest()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-P", str(Path(__file__).resolve()), "--worker", "--lone-relay",
                                                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        port = json.loads(await proc.stdout.readline())["port"]
        leaf = Receiver("node-2", "127.0.0.3")
        await leaf.start()

        async def arm(t: Target, session: str, token: str) -> None:
            if t.name == "node-1":
                proc.stdin.write((json.dumps({"session": session, "token": token}) + "\n").encode())  # type: ignore[union-attr]
                await proc.stdin.drain()  # type: ignore[union-attr]
            else:
                leaf.arm(session, token, SinkSpec(kind="discard", compression="none"))

        extra = {"relay_path": relay_path} if relay_path else {}
        job = BroadcastJob(image=image, sha256=sha, deadline=600, params=ChainParams(chunk=chunk, window=window, **extra))  # type: ignore[arg-type]
        t0 = time.perf_counter()
        result = await run_broadcast(job, [Target("node-1", "127.0.0.2", port), Target("node-2", "127.0.0.3", leaf.port)], "chain", arm)
        seconds = time.perf_counter() - t0
        await leaf.close()
        relay = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return {"ok": len(result.ok) == 2 and relay["ok"], "failed": {n: result.nodes[n].reason for n in result.failed},
            "seconds": seconds, "user": relay["user"], "sys": relay["sys"], "counters": relay["counters"]}


async def run_worker(image: Path, nodes: int, relay_path: str | None, chunk: int, window: int) -> dict[str, Any]:
    """Broadcast image along a chain of `nodes` loopback receivers in this process; return time, CPU and counters."""
    import hashlib

    from broadcast.image import SinkSpec
    from broadcast.methods import BroadcastJob, run_broadcast
    from broadcast.params import ChainParams
    from broadcast.receiver import Receiver
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


def measure(tree: Path, image: Path, nodes: int, relay_path: str | None, chunk: int, window: int,
            isolated: bool) -> dict[str, Any]:
    """Run one worker process against the code in tree and return its JSON line."""
    cmd = [sys.executable, "-P", str(Path(__file__).resolve()), "--worker", "--image", str(image), "--nodes", str(nodes),
           "--chunk", str(chunk), "--window", str(window)] + (["--isolated"] if isolated else [])
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
    ap.add_argument("--isolated", action="store_true", help="measure one relay alone in its own process (nodes ignored)")
    ap.add_argument("--json", default=None, help="write every measurement here")
    ap.add_argument("--lone-relay", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--image", default="", help=argparse.SUPPRESS)
    ap.add_argument("--relay-path", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker and args.lone_relay:
        asyncio.run(run_lone_relay())
        return
    if args.worker:
        if args.isolated:
            res = asyncio.run(run_isolated(Path(args.image), args.relay_path, args.chunk, args.window))
        else:
            res = asyncio.run(run_worker(Path(args.image), int(args.nodes), args.relay_path, args.chunk, args.window))
        print(json.dumps(res))
        return

    node_counts = [1] if args.isolated else [int(x) for x in args.nodes.split(",")]
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
                    res = measure(tree or REPO, image, n, path, args.chunk, args.window, args.isolated)
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
    layout = "one relay (node-1 -> node-2) alone in its process, its CPU" if args.isolated else "all relays in one process"
    print(f"Chain over loopback, {layout}, {args.size_mib} MiB image, discard sinks, chunk {args.chunk}, window {args.window}, "
          f"{args.repeats} repeats (medians), code {code_description(None)}")
    print()
    print(markdown_table(["relays" if not args.isolated else "measured relays", "variant", "MB/s per node", "MB/s total", f"x {names[0]}", "CPU s/GB relayed",
                          "of which sys"], rows))
    print()
    for i, load in enumerate(loads):
        print(f"- load {'before' if i == 0 else f'after repeat {i}'}: {load['uptime']} (CPUs {load['busy_pct']} % busy)")


if __name__ == "__main__":
    main()
