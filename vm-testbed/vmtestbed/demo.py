"""`rackboot demo`: a testbed, the appliance inside it, and a real deployment of a sample environment on every node.

What a new user would do by hand, in order: build the testbed (`rackboot testbed up`), start the
appliance in its namespace (`rackboot serve`), add the sample environment to the catalog
(`rackboot env add`), then `rackboot deploy -m node-[1-N] -e sample --broadcast chain` — the CLI, a
client of the appliance's API, run from the appliance's namespace. The workflow powers the nodes on over
IPMI, they boot the deploy environment over PXE/iPXE, the deploy agents partition their disks, receive
the image through the chain, run the post-install, kexec into the installed system and call back. While
it runs the demo prints where the nodes are; then the deployment's report and, last,
`deployed X/Y nodes`. Everything is torn down at the end, whatever happens (Ctrl-C included).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ClusterShell.NodeSet import NodeSet

from vmtestbed.appliance_files import SAMPLE_ENV, write_sample_environment
from vmtestbed.control import Control
from vmtestbed.plan import TestbedPlan, make_plan
from vmtestbed.testbed import TestbedError, admin_token, down, start_appliance, up


class _Interrupted(Exception):
    pass


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Interrupted()


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; return 0 only when every node was deployed."""
    name = f"demo{secrets.token_hex(3)}"
    total, deployed = args.nodes, 0
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    plan: TestbedPlan | None = None
    try:
        plan = make_plan(name, args.nodes, args.racks, post_s=args.post_s, faults=args.faults, seed=args.seed, firmware=args.firmware)
        print(f"rackboot demo: {args.nodes} nodes in {args.racks} racks, testbed {name}", flush=True)
        deployed = _demo(plan, args)
    except (TestbedError, ValueError) as exc:
        print(f"rackboot demo: {exc}", file=sys.stderr, flush=True)
    except (KeyboardInterrupt, _Interrupted):
        print("rackboot demo: interrupted", flush=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if plan is not None and not args.keep:
            t0 = time.monotonic()
            removed = down(name)
            print(f"  torn down: {len(removed)} namespaces removed in {time.monotonic() - t0:.1f}s", flush=True)
        elif plan is not None:
            print(f"  kept: rackboot testbed status --name {name}; rackboot testbed down --name {name}")
        signal.signal(signal.SIGTERM, previous)
    print(f"deployed {deployed}/{total} nodes", flush=True)
    return 0 if deployed == total else 1


def rackboot_cli(plan: TestbedPlan, *argv: str) -> list[str]:
    """The argv of `rackboot ARGV...` run as a client of the testbed's appliance, from its namespace."""
    return ["ip", "netns", "exec", plan.appliance_ns, "env", f"RACKBOOT_SERVER={plan.appliance_url}",
            f"RACKBOOT_TOKEN={admin_token(plan)}", sys.executable, "-m", "appliance.cli", *argv]


def _demo(plan: TestbedPlan, args: argparse.Namespace) -> int:
    result = up(plan)
    sd = plan.state_dir
    print(f"  testbed up in {result.total_s:.1f}s: {len(plan.namespaces)} namespaces, node daemon pid {result.daemon_pid}", flush=True)
    appliance = start_appliance(plan, result.files)
    print(f"  appliance serving on {plan.appliance_url} (pid {appliance.pid}), log {sd / 'appliance.log'}", flush=True)
    desc = write_sample_environment(sd / "sample", size_mib=args.image_mib)
    added = subprocess.run(rackboot_cli(plan, "env", "add", str(desc)), capture_output=True, text=True, timeout=120)
    if added.returncode != 0:
        raise TestbedError(f"rackboot env add: {(added.stderr or added.stdout).strip()}")
    print(f"  rackboot env add {desc.name}: {added.stdout.strip() or 'ok'}", flush=True)
    nodes = str(NodeSet.fromlist([n.name for n in plan.node_list]))
    ok_file, ko_file = sd / "ok.txt", sd / "ko.txt"
    argv = rackboot_cli(plan, "deploy", "-m", nodes, "-e", SAMPLE_ENV, "--broadcast", args.broadcast,
                        "-o", str(ok_file), "-n", str(ko_file))
    print(f"  rackboot deploy -m {nodes} -e {SAMPLE_ENV} --broadcast {args.broadcast}", flush=True)
    out_path = sd / "deploy.out"
    t0 = time.time()
    with out_path.open("w") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _watch(plan, proc, args.timeout or 180 + plan.nodes / 2, t0)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(10)
    for line in out_path.read_text().splitlines():
        print(f"  | {line}", flush=True)
    if proc.returncode not in (0, 2):
        raise TestbedError(f"rackboot deploy exited with status {proc.returncode}")
    ok = _lines(ok_file)
    print(f"  deployment took {time.time() - t0:.1f}s; ok: {NodeSet.fromlist(ok) if ok else '-'}", flush=True)
    m = re.search(r"^deployment (\S+):", out_path.read_text(), re.M)
    stats = subprocess.run(rackboot_cli(plan, "stats", "--json", "--deployment", m.group(1)), capture_output=True, text=True,
                           timeout=60) if m else None
    if stats is not None and stats.returncode == 0:
        spans = step_spans(json.loads(stats.stdout)["steps"])
        print("  macro-steps (first node in to last node out): "
              + ", ".join(f"{step} {span:.1f}s" for step, span in spans.items()), flush=True)
    return len(ok)


def step_spans(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per macro-step, seconds from the first node entering it to the last leaving it (from the step records)."""
    spans: dict[str, tuple[float, float]] = {}
    for r in rows:
        start, end = spans.get(r["step"], (r["started"], r["ended"]))
        spans[r["step"]] = (min(start, r["started"]), max(end, r["ended"]))
    return {step: round(end - start, 1) for step, (start, end) in spans.items()}


def _lines(path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return []


def _watch(plan: TestbedPlan, proc: subprocess.Popen[bytes], timeout: float, t0: float) -> None:
    """Print where the nodes are (the testbed's view) until the deploy command ends or the time is up."""
    deadline = time.monotonic() + timeout
    last_line, last_print = "", 0.0
    with Control(plan.state_dir) as ctl:
        while proc.poll() is None:
            nodes = ctl.call("status")["nodes"]
            counts = Counter(f"{n['stage']} ({n['detail'].split(':')[0]})" if n["stage"] == "running" else n["stage"] for n in nodes)
            line = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
            now = time.monotonic()
            if line != last_line and now - last_print >= 1.0:
                print(f"  t={time.time() - t0:5.1f}s  {line}", flush=True)
                last_line, last_print = line, now
            if now > deadline:
                print(f"  gave up waiting after {timeout:.0f}s", flush=True)
                return
            time.sleep(0.25)
