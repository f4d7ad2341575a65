"""Whole deployments on the vm-testbed at growing node counts: time per macro-step, against Kadeploy's phases.

    sudo .venv/bin/python bench/deploy_scale.py --nodes 100 400 1000 [--broadcast chain] [--image-mib 8]

For each N: a testbed of N nodes (2 racks up to 500 nodes, then one rack per 500), the appliance in its
namespace, the sample environment added with `rackboot env add`, then `rackboot deploy -m node-[1-N] -e sample`
(the CLI, from the appliance's namespace, exactly as `rackboot demo` runs it). Reported per N: wall time of
the deployment, nodes deployed, and per macro-step the time from the first node entering it to the last
node leaving it (the appliance's per-node step records, `GET /api/v1/stats`), which is what Kadeploy's
scalability slides give for 3999 VMs (first reboot 11 min, broadcast 15 min, second reboot 7 min, 57 min in
all). Also the node daemons' CPU time (one process per 500 nodes by default; vmtestbed.shards), each and in all.
Takes /tmp/rackboot-bench.lock for each run so that two benchmarks never share the cores.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from vmtestbed.demo import step_spans
from vmtestbed.experiment import DeploymentSpec, ExperimentSpec, RunResult, run_experiment

LOCK = "/tmp/rackboot-bench.lock"


def figures(run: RunResult) -> dict[str, Any]:
    """The figures of one run (an experiment's RunResult, as `rackboot experiment run` measures it)."""
    return {"nodes": run.nodes, "racks": run.racks, "broadcast": run.broadcast, "up_s": run.up_s, "deploy_s": run.deploy_s,
            "ok": len(run.ok), "ko": run.ko[:10], "boots_per_node": run.boots_per_node, "daemon_cpu_s": run.daemon_cpu_s,
            "daemon_cpu_per_shard_s": run.daemon_cpu_per_shard_s,
            "appliance_cpu_s": run.appliance_cpu_s, "steps": step_spans(run.steps), "retries": sum(1 for r in run.steps if not r["ok"]),
            "load_before": [round(x, 2) for x in run.load_before], "error": run.error}


def table(results: list[dict[str, Any]], image_mib: int) -> str:
    """Markdown table of the runs."""
    lines = ["| N | racks | broadcast | image | deployed | deployment | SetDeploymentEnv | BroadcastEnv | BootNewEnv | node daemon CPU |",
             "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        s = r.get("steps", {})
        lines.append(f"| {r['nodes']} | {r['racks']} | {r['broadcast']} | {image_mib} MiB | {r.get('ok', 0)}/{r['nodes']} | "
                     f"{r.get('deploy_s', '-')} s | {s.get('SetDeploymentEnv', '-')} s | {s.get('BroadcastEnv', '-')} s | "
                     f"{s.get('BootNewEnv', '-')} s | {r.get('daemon_cpu_s', '-')} s |")
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
    results = []
    with tempfile.TemporaryDirectory(prefix="rackboot-deploy-scale-") as work:
        for n in args.nodes:
            spec = ExperimentSpec(name="dscale", nodes=(n,), link_mbit=args.link_mbit, uplink_mbit=args.link_mbit * 10,
                                  post_s=args.post_s, image_mib=args.image_mib, deployments=(DeploymentSpec(broadcast=args.broadcast),))
            with open(LOCK, "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                runs = run_experiment(spec, Path(work), say=lambda m: print(f"  {m}", file=sys.stderr, flush=True))
            for run in runs:
                r = figures(run)
                print(json.dumps(r), flush=True)
                results.append(r)
    print(table(results, args.image_mib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
