"""How long `testbed up` and `down` take and how much memory a testbed uses, at a given node count.

    sudo .venv/bin/python bench/testbed_scale.py --nodes 100 1000 [--racks 4] [--boot]

For each N: build the testbed (network, files, node daemon with N nodes and N BMCs), measure wall time,
the node daemon's RSS and the machine's memory in use (MemTotal - MemAvailable, so kernel objects of
the namespaces, links and sockets count too); with --boot, also start the appliance, power every node on
over IPMI (pyghmi, from the appliance's namespace) and time until every node has fetched its per-MAC
script. Then `down`, timed, and a check that nothing is left. Prints one JSON line per N.
"""
from __future__ import annotations

import argparse
import json
import secrets
import signal
import sys
import time
from pathlib import Path

from vmtestbed.control import Control
from vmtestbed.plan import make_plan
from vmtestbed.testbed import down, ipmi_power, start_appliance, up
from vmtestbed.topology import existing_namespaces


def mem_used() -> int:
    """Bytes of memory in use on the machine (MemTotal - MemAvailable)."""
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        info[key] = int(value.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"]


def measure(nodes: int, racks: int, boot: bool, link_mbit: int) -> dict[str, object]:
    """Up, (boot), down one testbed of N nodes; return the figures."""
    name = f"bench{secrets.token_hex(2)}"
    plan = make_plan(name, nodes, racks, link_mbit=link_mbit, uplink_mbit=link_mbit * 10, post_s="0.5-5")
    base = mem_used()
    out: dict[str, object] = {"nodes": nodes, "racks": racks, "link_mbit": link_mbit}
    try:
        t0 = time.monotonic()
        result = up(plan)
        out["up_s"] = round(time.monotonic() - t0, 1)
        out["network_s"] = round(result.network_s, 1)
        time.sleep(1)
        with Control(plan.state_dir) as ctl:
            out["daemon_rss_mb"] = round(ctl.call("status")["rss"] / 1e6)
        out["machine_mem_mb"] = round((mem_used() - base) / 1e6)
        if boot:
            start_appliance(plan, result.files)
            t_on = time.monotonic()
            powered = ipmi_power(plan, "on")
            out["ipmi_power_on_s"] = round(time.monotonic() - t_on, 1)
            out["ipmi_ok"] = sum(powered.values())
            deadline = time.monotonic() + 600
            with Control(plan.state_dir) as ctl:
                while time.monotonic() < deadline:
                    stages = [n["stage"] for n in ctl.call("status")["nodes"]]
                    if all(s == "script" for s in stages):
                        break
                    time.sleep(1)
                out["all_at_script_s"] = round(time.monotonic() - t_on, 1)
                out["at_script"] = sum(s == "script" for s in stages)
                out["daemon_rss_booted_mb"] = round(ctl.call("status")["rss"] / 1e6)
            out["machine_mem_booted_mb"] = round((mem_used() - base) / 1e6)
    finally:
        t0 = time.monotonic()
        down(name)
        out["down_s"] = round(time.monotonic() - t0, 1)
    out["left_namespaces"] = len(existing_namespaces(plan.prefix))
    return out


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    """Run the measurements given on the command line (SIGTERM too tears the testbed down)."""
    signal.signal(signal.SIGTERM, _interrupted)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[100])
    parser.add_argument("--racks", type=int, default=0, help="default: one rack per 500 nodes, at least 2")
    parser.add_argument("--link-mbit", type=int, default=1000)
    parser.add_argument("--boot", action="store_true", help="also boot every node to its per-MAC script")
    args = parser.parse_args()
    for n in args.nodes:
        racks = args.racks or max(2, -(-n // 500))
        print(json.dumps(measure(n, racks, args.boot, args.link_mbit)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
