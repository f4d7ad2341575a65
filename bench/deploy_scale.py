"""Whole deployments on the vm-testbed at growing node counts: time per macro-step, against Kadeploy's phases.

    sudo .venv/bin/python bench/deploy_scale.py --nodes 100 400 1000 [--broadcast chain] [--image-mib 8]

For each N: a testbed of N nodes (2 racks up to 500 nodes, then one rack per 500), the appliance in its
namespace, the sample environment added with `rackboot env add`, then `rackboot deploy -m node-[1-N] -e sample`
(the CLI, from the appliance's namespace, exactly as `rackboot demo` runs it). Reported per N: wall time of
the deployment, nodes deployed, and per macro-step the time from the first node entering it to the last
node leaving it (the appliance's per-node step records, `GET /api/v1/stats`), which is what Kadeploy's
scalability slides give for 3999 VMs (first reboot 11 min, broadcast 15 min, second reboot 7 min, 57 min in
all). Also the node daemon's CPU time, since every virtual node of a testbed shares one process here.
Takes /tmp/rackboot-bench.lock for each run so that two benchmarks never share the cores.
"""
from __future__ import annotations

import argparse
import fcntl
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
from vmtestbed.demo import rackboot_cli, step_spans
from vmtestbed.plan import make_plan
from vmtestbed.testbed import down, read_state, start_appliance, up

LOCK = "/tmp/rackboot-bench.lock"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (and its reaped children), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def measure(nodes: int, broadcast: str, image_mib: int, link_mbit: int, post_s: str, work: Path) -> dict[str, Any]:
    """One deployment of N nodes; return its figures."""
    name = f"dscale{secrets.token_hex(2)}"
    racks = max(2, (nodes + 499) // 500)
    plan = make_plan(name, nodes, racks, link_mbit=link_mbit, uplink_mbit=link_mbit * 10, post_s=post_s, seed=1)
    out: dict[str, Any] = {"nodes": nodes, "racks": racks, "broadcast": broadcast, "image_mib": image_mib, "link_mbit": link_mbit}
    try:
        t0 = time.monotonic()
        result = up(plan)
        out["up_s"] = round(time.monotonic() - t0, 1)
        start_appliance(plan, result.files, timeout=120)
        desc = write_sample_environment(work / name, size_mib=image_mib)
        added = subprocess.run(rackboot_cli(plan, "env", "add", str(desc)), capture_output=True, text=True, timeout=300)
        if added.returncode != 0:
            raise RuntimeError(f"env add: {added.stderr or added.stdout}")
        daemon = int(read_state(name)["daemon_pid"])
        cpu0 = cpu_seconds(daemon)
        t0 = time.monotonic()
        deploy = subprocess.run(rackboot_cli(plan, "deploy", "-m", str(NodeSet.fromlist([n.name for n in plan.node_list])),
                                             "-e", SAMPLE_ENV, "--broadcast", broadcast, "--json"),
                                capture_output=True, text=True, timeout=3600)
        out["deploy_s"] = round(time.monotonic() - t0, 1)
        out["daemon_cpu_s"] = round(cpu_seconds(daemon) - cpu0, 1)
        try:
            report = json.loads(deploy.stdout)
        except ValueError:
            out["deploy_error"] = f"exit {deploy.returncode}: {(deploy.stderr or deploy.stdout)[-500:]}"
            return out
        out["ok"] = len(report["ok"])
        out["ko"] = [{k: v for k, v in ko.items()} for ko in report["ko"]][:10]
        with Control(plan.state_dir) as ctl:  # how many times each node booted (2 when nothing went wrong: deploy env, kexec)
            boots = Counter(n["boots"] for n in ctl.call("status")["nodes"])
        out["boots_per_node"] = dict(sorted(boots.items()))
        stats = subprocess.run(rackboot_cli(plan, "stats", "--json", "--deployment", report["id"]), capture_output=True, text=True, timeout=120)
        try:
            rows = json.loads(stats.stdout)["steps"]
        except (ValueError, KeyError):
            rows = []
            out["stats_error"] = (stats.stderr or stats.stdout)[-300:]
        out["steps"] = step_spans(rows)
        out["retries"] = sum(1 for r in rows if not r["ok"])
        # What the failed attempts ran into, numbers folded away: "no DHCP within 20s after the kexec: ..." x 12
        reasons = Counter(f"{r['step']}/{r['impl']}: " + re.sub(r"\d+(\.\d+)*", "N", r["reason"])[:120] for r in rows if not r["ok"])
        out["failed_attempts"] = dict(reasons.most_common(6))
    finally:
        t0 = time.monotonic()
        down(name)
        out["down_s"] = round(time.monotonic() - t0, 1)
    return out


def table(results: list[dict[str, Any]]) -> str:
    """Markdown table of the runs."""
    lines = ["| N | racks | broadcast | image | deployed | deployment | SetDeploymentEnv | BroadcastEnv | BootNewEnv | node daemon CPU |",
             "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        s = {k: {"span_s": v} for k, v in r.get("steps", {}).items()}
        lines.append(f"| {r['nodes']} | {r['racks']} | {r['broadcast']} | {r['image_mib']} MiB | {r.get('ok', 0)}/{r['nodes']} | "
                     f"{r.get('deploy_s', '-')} s | {s.get('SetDeploymentEnv', {}).get('span_s', '-')} s | "
                     f"{s.get('BroadcastEnv', {}).get('span_s', '-')} s | {s.get('BootNewEnv', {}).get('span_s', '-')} s | "
                     f"{r.get('daemon_cpu_s', '-')} s |")
    return "\n".join(lines)


def main() -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[100, 400])
    parser.add_argument("--broadcast", default="chain", choices=("chain", "tree", "star"))
    parser.add_argument("--image-mib", type=int, default=8)
    parser.add_argument("--link-mbit", type=int, default=1000)
    parser.add_argument("--post-s", default="0.5-5", help="virtual POST duration (uniform range)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("deploy_scale: needs root (network namespaces)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    work = Path(f"/tmp/rackboot-deploy-scale-{os.getpid()}")
    results = []
    try:
        for n in args.nodes:
            with open(LOCK, "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                load = os.getloadavg()
                r = measure(n, args.broadcast, args.image_mib, args.link_mbit, args.post_s, work)
                r["load_before"] = [round(x, 2) for x in load]
            print(json.dumps(r), flush=True)
            results.append(r)
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
