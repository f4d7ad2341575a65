"""`rackboot demo`: a testbed, the appliance inside it, every node powered on over IPMI and watched while it boots.

The demo plays the controller's part from inside the appliance's namespace (its HTTP and IPMI sockets are
opened there): it gives every node a deploy profile for a small generated sample environment, powers the
nodes on through their BMCs, follows them through DHCP, TFTP and their iPXE script to the callback of the
deploy environment, prints a short report and, last, `booted X/Y nodes`. Everything is torn down at the
end, whatever happens (Ctrl-C included).
"""
from __future__ import annotations

import argparse
import json
import secrets
import signal
import statistics
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from typing import Any

from vmtestbed.appliance_files import write_sample_environment
from vmtestbed.control import Control
from vmtestbed.netns import entered
from vmtestbed.plan import TestbedPlan, make_plan
from vmtestbed.testbed import TestbedError, admin_token, down, ipmi_power, start_appliance, up

# What the appliance must have seen from a node for each step of the report (appliance.events kinds).
STEPS = (
    ("DHCP as PXE ROM", "dhcp_ack", lambda d: d.get("boot", "") not in ("", "ipxe")),
    ("NBP over TFTP", "nbp_sent", None),
    ("DHCP as iPXE", "dhcp_ack", lambda d: d.get("boot") == "ipxe"),
    ("per-MAC iPXE script", "script_fetched", None),
    ("kernel", "kernel_fetched", None),
    ("initrd", "initrd_fetched", None),
    ("deploy env callback", "callback", lambda d: d.get("stage") == "deploy_env"),
)


class _Interrupted(Exception):
    pass


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Interrupted()


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; return 0 only when every node booted."""
    name = f"demo{secrets.token_hex(3)}"
    total, booted = args.nodes, 0
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    plan: TestbedPlan | None = None
    try:
        plan = make_plan(name, args.nodes, args.racks, post_s=args.post_s, faults=args.faults, seed=args.seed, firmware=args.firmware)
        print(f"rackboot demo: {args.nodes} nodes in {args.racks} racks, testbed {name}", flush=True)
        booted = _demo(plan, args)
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
    print(f"booted {booted}/{total} nodes", flush=True)
    return 0 if booted == total else 1


def _demo(plan: TestbedPlan, args: argparse.Namespace) -> int:
    result = up(plan)
    sd = plan.state_dir
    print(f"  testbed up in {result.total_s:.1f}s: {len(plan.namespaces)} namespaces, node daemon pid {result.daemon_pid}", flush=True)
    profile = write_sample_environment(result.files.files_dir)
    appliance = start_appliance(plan, result.files)
    print(f"  appliance serving on {plan.appliance_url} (pid {appliance.pid}), log {sd / 'appliance.log'}", flush=True)
    with entered(plan.appliance_ns):
        for n in plan.node_list:
            _http(plan, "PUT", f"/api/v1/nodes/{n.name}/profile", profile)
        print(f"  {plan.nodes} nodes given the deploy profile of the sample environment ({profile['kernel']}, {profile['initrds'][0]})", flush=True)
        t_on = time.time()
        powered = sum(ipmi_power(plan, "on").values())
        print(f"  IPMI (ipmitool -I lanplus): {powered}/{plan.nodes} nodes powered on", flush=True)
        timeout = args.timeout or 90 + plan.nodes / 4
        nodes = _watch(plan, timeout, t_on)
        api = _http(plan, "GET", "/api/v1/nodes?events=64")
    return _report(plan, nodes, api, t_on)


def _http(plan: TestbedPlan, method: str, path: str, body: Any = None) -> Any:
    """Call the appliance's API (the caller's thread is inside the appliance namespace)."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    token = admin_token(plan)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(plan.appliance_url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.load(resp)
    except (urllib.error.URLError, OSError) as exc:
        raise TestbedError(f"appliance API {method} {path}: {exc}") from exc


def _watch(plan: TestbedPlan, timeout: float, t_on: float) -> list[dict[str, Any]]:
    """Follow the nodes' stages until all run their deploy environment or the time is up."""
    deadline = time.monotonic() + timeout
    last_line = ""
    last_print = 0.0
    with Control(plan.state_dir) as ctl:
        while True:
            nodes = ctl.call("status")["nodes"]
            counts = Counter(n["stage"] for n in nodes)
            line = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
            now = time.monotonic()
            if line != last_line and now - last_print >= 1.0 or counts.get("running") == len(nodes):
                print(f"  t={time.time() - t_on:5.1f}s  {line}", flush=True)
                last_line, last_print = line, now
            if counts.get("running") == len(nodes) or now > deadline:
                return nodes
            time.sleep(0.25)


def _report(plan: TestbedPlan, nodes: list[dict[str, Any]], api: dict[str, Any], t_on: float) -> int:
    by_mac = {n["mac"]: n for n in api.get("nodes", [])}
    reached = Counter()
    boot_times = []
    booted = 0
    for node in nodes:
        events = [e for e in by_mac.get(node["mac"], {}).get("events", []) if e["ts"] >= t_on - 1]
        for label, kind, pred in STEPS:
            if any(e["kind"] == kind and (pred is None or pred(e.get("detail", {}))) for e in events):
                reached[label] += 1
        callbacks = [e for e in events if e["kind"] == "callback" and e.get("detail", {}).get("stage") == "deploy_env"]
        if node["stage"] == "running" and callbacks:
            booted += 1
            boot_times.append(callbacks[0]["ts"] - t_on)
    print("report (as the appliance saw it):")
    for label, _, _ in STEPS:
        print(f"  {label:<22} {reached[label]:>5}/{len(nodes)}")
    if boot_times:
        print(f"  power-on to callback   median {statistics.median(boot_times):.1f}s, max {max(boot_times):.1f}s")
    stuck = [n for n in nodes if n["stage"] != "running"]
    for n in stuck[:5]:
        print(f"  not booted: {n['name']}: {n['stage']} {n['detail'][:80]} {('[' + n['faults'] + ']') if n['faults'] else ''}")
    if len(stuck) > 5:
        print(f"  ... and {len(stuck) - 5} more")
    return booted
