"""N testbed nodes booting at once through a lossy wire: do all reach their script, and how much later?

    sudo .venv/bin/python bench/boot_loss.py [--nodes 200] [--losses 0 0.1 0.2 0.3] [--racks 2]

For each loss level: a fresh testbed of N nodes whose rack bridges drop that fraction of the nodes' UDP and TCP
frames in both directions (vmtestbed.wireloss, nftables: this kernel has no netem), the real appliance, every
node powered on at the same moment through the node daemon, then wait (10 min at most) until each has fetched
its per-MAC iPXE script: DHCP (firmware), TFTP of the NBP, DHCP again (iPXE), HTTP of the script. Per level:
how many reached the script, power-on-to-script time per node (median, p90, max), and its inflation against
the first level (0 % unless told otherwise), the frames the rules dropped. Prints a JSON line per level, then a
markdown table. Everything is removed at the end, also on failure and Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import secrets
import signal
import statistics
import sys
import time

from vmtestbed.control import Control
from vmtestbed.plan import make_plan
from vmtestbed.testbed import down, start_appliance, up
from vmtestbed.topology import existing_namespaces
from vmtestbed.wireloss import dropped

WAIT_S = 600.0


def quantile(values: list[float], q: float) -> float:
    """The q-quantile of values (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def measure(nodes: int, racks: int, loss: float, seed: int) -> dict[str, object]:
    """Boot one testbed of `nodes` nodes through `loss`; return the figures."""
    name = f"bl{secrets.token_hex(2)}"
    plan = make_plan(name, nodes, racks, post_s="1", seed=seed, wire_loss=loss)
    out: dict[str, object] = {"nodes": nodes, "loss": loss}
    try:
        result = up(plan)
        start_appliance(plan, result.files)
        with Control(plan.state_dir) as ctl:
            t_on = time.time()
            ctl.call("power", nodes=[n.name for n in plan.node_list], action="on")
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline:
                status = ctl.call("status")["nodes"]
                if all(n["stage"] == "script" for n in status):
                    break
                time.sleep(1.0)
        at_script = [n for n in status if n["stage"] == "script"]
        times = [n["since"] - t_on for n in at_script]
        out.update({
            "at_script": len(at_script),
            "median_s": round(statistics.median(times), 2) if times else None,
            "p90_s": round(quantile(times, 0.9), 2) if times else None,
            "max_s": round(max(times), 2) if times else None,
            "dropped_frames": dropped(plan.fabric_ns),
            "stuck": sorted({f"{n['stage']}: {n['detail'][:60]}" for n in status if n["stage"] != "script"})[:5],
        })
    finally:
        down(name)
    out["left_namespaces"] = len(existing_namespaces(plan.prefix))
    return out


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    """Run the levels; print JSON lines and a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--racks", type=int, default=2)
    parser.add_argument("--losses", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3])
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupted)
    rows = []
    for loss in args.losses:
        row = measure(args.nodes, args.racks, loss, args.seed)
        print(json.dumps(row), flush=True)
        rows.append(row)
    base = rows[0].get("median_s") or 0.0
    print(f"\n| loss (both ways) | nodes at their script | median | p90 | max | median vs {rows[0]['loss']:.0%} | frames dropped |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        med = r.get("median_s")
        ratio = f"{med / base:.2f}x" if med and base else "-"
        print(f"| {r['loss']:.0%} | {r['at_script']}/{r['nodes']} | {med} s | {r.get('p90_s')} s | {r.get('max_s')} s | {ratio} | {r['dropped_frames']} |")
    return 0 if all(r["at_script"] == r["nodes"] and r["left_namespaces"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
