#!/usr/bin/env python3
"""What the deployment controller costs per node and per event as N grows (issue 14: nothing O(N²) in it).

In-process, no network, no root: the real Controller, EventBus, ProfileStore, DeploymentStore (SQLite in a temp
directory), NodeTokens and boot watch, driven by the test tier's fakes (tests/fakes.py: FakePower, FakeDeploy and
FakeCluster, which publishes the records a node's boot leads to: DHCP, NBP, script, kernel, initrd, agent up,
installed system up). One deployment of N nodes at a time (reboot window N: every node at once), --repeats times,
N interleaved; prints the process CPU time per node and per published event, their ratio to the smallest N's,
and the wall time. A flat ratio means the controller's cost per node does not grow with N.

Run: .venv/bin/python bench/controller_scale.py [--nodes 250 1000 4000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
from appliance.deploy.controller import Controller  # noqa: E402
from appliance.deploy.workflow import default_workflow  # noqa: E402
from appliance.inventory import Inventory  # noqa: E402
from domain.nodes import BmcSpec, Node  # noqa: E402
from fakes import FAST, fake_world  # noqa: E402


def inventory(n: int) -> Inventory:
    """N nodes in racks of 40, addresses from 10.64.0.1, MACs 52:54:00:xx:xx:xx."""
    base = int(ipaddress.IPv4Address("10.64.0.1"))
    return Inventory(tuple(
        Node(name=f"node-{i}", mac="52:54:00:" + ":".join(f"{b:02x}" for b in i.to_bytes(3, "big")),
             ip=ipaddress.IPv4Address(base + i), rack=f"r{1 + (i - 1) // 40}",
             bmc=BmcSpec("fake", str(ipaddress.IPv4Address(base + 0x10000 + i))))
        for i in range(1, n + 1)))


async def one_deployment(n: int, tmp: Path) -> tuple[float, float, int]:
    """Deploy N fake nodes at once; return (CPU seconds, wall seconds, events published)."""
    deps, cluster, env, power, agent = fake_world(tmp, inventory(n), http_base="http://10.64.0.0:8080")
    deadlines = replace(FAST, dhcp_after_reset=30.0, script_after_dhcp=30.0, kernel_after_script=30.0,
                        agent_after_kernel=30.0, os_after_script=30.0, kexec_alive=30.0, callback_after_os_dhcp=30.0)
    controller = Controller(deps, lambda method, kexec: replace(default_workflow(method, kexec), deadlines=deadlines,
                                                                reboot_window=n))
    serve = asyncio.create_task(controller.serve())
    cpu0, wall0 = time.process_time(), time.perf_counter()
    try:
        dep = controller.start(list(deps.inventory.nodes), env, "admin")
        result = await asyncio.wait_for(controller.tasks[dep.id], 600)
    finally:
        serve.cancel()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    if result["status"] != "done" or len(result["ok"]) != n:
        raise SystemExit(f"N={n}: deployment ended {result['status']} with {len(result['ok'])}/{n} nodes ok")
    return cpu, wall, deps.events.published


def main() -> int:
    """Interleave the sizes, print medians and ratios as a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[250, 1000, 4000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    runs: dict[int, list[tuple[float, float, int]]] = {n: [] for n in args.nodes}
    for repeat in range(args.repeats):
        for n in (args.nodes if repeat % 2 == 0 else list(reversed(args.nodes))):
            with tempfile.TemporaryDirectory(prefix="rb-ctl-") as tmp:
                runs[n].append(asyncio.run(one_deployment(n, Path(tmp))))
            cpu, wall, events = runs[n][-1]
            print(f"  N={n}: CPU {cpu:.2f} s, wall {wall:.2f} s, {events} events", file=sys.stderr)
    base = statistics.median(c / args.nodes[0] for c, _, _ in runs[args.nodes[0]])
    print("| N | CPU per node, ms (median; runs) | CPU per event, µs | events per node | wall s | per node / N=%d's |" % args.nodes[0])
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for n in args.nodes:
        per_node = [c / n * 1e3 for c, _, _ in runs[n]]
        per_event = statistics.median(c / e * 1e6 for c, _, e in runs[n])
        events = statistics.median(e / n for _, _, e in runs[n])
        wall = statistics.median(w for _, w, _ in runs[n])
        med = statistics.median(per_node)
        print(f"| {n} | {med:.2f} ({' / '.join(f'{x:.2f}' for x in per_node)}) | {per_event:.0f} | {events:.1f} | "
              f"{wall:.1f} | {med / (base * 1e3):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
