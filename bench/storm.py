"""A storm of mutated DHCP, TFTP and DNS packets against the running appliance, while real clients are served.

    sudo .venv/bin/python bench/storm.py [--quiet-s 20] [--storm-s 60] [--rate 5000] [--seed 1]

A small testbed (its nodes stay powered off) gives the real `rackboot serve` its namespace and bridges; the
bench adds a pool to its config and two namespaces of its own on the core bridge (the testbed's prefix, so
`down` removes them too):

- storm: one process sending `--rate` packets a second (0: as fast as one core can), mutations of valid packets (the fuzzing corpora and mutator of
  tests/fuzz_targets.py: scapy-built DHCP requests, TFTP datagrams, dnslib-built DNS queries) to the appliance's
  DHCP (unicast and broadcast), TFTP and DNS ports, from random source ports;
- real clients, in a loop: busybox `udhcpc` with an inventory node's MAC (node-2, which stays powered off) and
  with an unknown MAC (a pool lease; the flood's MACs share its port's rate limit), tftp-hpa's `tftp`
  (undionly.kpxe, lock-step, 512-octet blocks) and `dig` (a node's name, 3 tries).

First `--quiet-s` seconds without the storm, then `--storm-s` with it. Per client and phase: runs, failures,
median, p99 and max latency; the storm's packets/s; the appliance's RSS at start, after the quiet phase and at
the end; its malformed/error counters (from /api/v1/health) before and after; and whether it is still alive.
Exit 1 when the appliance died or a real client other than the unknown-MAC one failed during the storm.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any


ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests")]
import fuzz_targets as ft  # noqa: E402

from vmtestbed.netns import entered  # noqa: E402
from vmtestbed.plan import APPLIANCE_IP, TestbedPlan, make_plan  # noqa: E402
from vmtestbed.testbed import add_namespace, add_pool, admin_token, down, read_state, start_appliance, up  # noqa: E402
from vmtestbed.topology import existing_namespaces  # noqa: E402

SERVER = str(APPLIANCE_IP)


def storm(ns: str, seconds: float, seed: int, rate: float, sent: Any) -> None:
    """Send mutated DHCP, TFTP and DNS datagrams for `seconds` from inside ns (a child process), `rate` a second
    (0: as fast as one core can)."""
    rng = random.Random(seed)
    corpora = {67: ft.dhcp_corpus(), 69: ft.tftp_corpus(), 53: ft.dns_corpus()}
    with entered(ns):
        socks = []
        for _ in range(64):  # many source ports, as many hosts would use
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            s.setblocking(False)
            socks.append(s)
        dhcp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        dhcp.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        dhcp.setblocking(False)
        dhcp.bind(("0.0.0.0", 68))
    count = 0
    start = time.monotonic()
    end = start + seconds
    while (now := time.monotonic()) < end:
        if rate and count > (now - start) * rate:
            time.sleep(0.005)
            continue
        for _ in range(64):
            port = rng.choice((67, 67, 69, 53))
            corpus = corpora[port]
            data = ft.mutate(rng, rng.choice(corpus), corpus, tlv_from=240 if port == 67 else 0)
            try:
                if port == 67:
                    dhcp.sendto(data, ("255.255.255.255" if rng.random() < 0.5 else SERVER, 67))
                else:
                    rng.choice(socks).sendto(data, (SERVER, port))
                count += 1
            except (BlockingIOError, OSError):
                pass
    sent.value = count


def timed(argv: list[str], ok: Any, timeout: float = 10.0) -> tuple[bool, float]:
    """Run a client; return (it succeeded, seconds)."""
    t0 = time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        good = done.returncode == 0 and ok(done.stdout)
    except subprocess.TimeoutExpired:
        good = False
    return good, time.monotonic() - t0


def clients(namespaces: tuple[str, str], plan: TestbedPlan, stop: threading.Event, out: dict[str, list[tuple[bool, float]]],
            tmp: Path) -> None:
    """The real clients, in turn, until stop: from the node's namespace (an inventory MAC) and a stranger's."""
    node_ns, stranger_ns = namespaces
    name = f"node-1.{plan.name}.test"
    udhcpc = ["udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "5", "-T", "1", "-s", "/bin/true"]
    runs = {
        "udhcpc, inventory MAC": (node_ns, udhcpc, lambda o: True),
        "udhcpc, unknown MAC": (stranger_ns, udhcpc, lambda o: True),
        "tftp": (node_ns, ["tftp", "-m", "binary", SERVER, "-c", "get", "undionly.kpxe", str(tmp / "undionly.kpxe")], lambda o: True),
        "dig": (node_ns, ["dig", f"@{SERVER}", name, "+short", "+tries=3", "+time=2"], lambda o: str(plan.node_list[0].ip) in o),
    }
    while not stop.is_set():
        for client, (ns, argv, ok) in runs.items():
            out.setdefault(client, []).append(timed(["ip", "netns", "exec", ns, *argv], ok))
            if name == "tftp" and (tmp / "undionly.kpxe").exists():
                (tmp / "undionly.kpxe").unlink()


def summary(results: list[tuple[bool, float]]) -> dict[str, Any]:
    """Runs, failures and latency quantiles of one client in one phase."""
    times = sorted(t for ok, t in results if ok)
    return {"runs": len(results), "failed": sum(not ok for ok, _ in results),
            "median_ms": round(statistics.median(times) * 1000, 1) if times else None,
            "p99_ms": round(times[min(len(times) - 1, int(0.99 * len(times)))] * 1000, 1) if times else None,
            "max_ms": round(times[-1] * 1000, 1) if times else None}


def rss_mb(pid: int) -> float:
    """Resident memory of a process, MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def health(plan: TestbedPlan) -> dict[str, Any]:
    """The appliance's counters."""
    req = urllib.request.Request(plan.appliance_url + "/api/v1/health", headers={"Authorization": f"Bearer {admin_token(plan)}"})
    with entered(plan.appliance_ns):
        with urllib.request.urlopen(req, timeout=30) as resp:
            return dict(json.load(resp)["counters"])


def phase(plan: TestbedPlan, real: tuple[str, str], seconds: float, tmp: Path) -> dict[str, list[tuple[bool, float]]]:
    """Run the real clients for `seconds`."""
    out: dict[str, list[tuple[bool, float]]] = {}
    stop = threading.Event()
    thread = threading.Thread(target=clients, args=(real, plan, stop, out, tmp), daemon=True)
    thread.start()
    time.sleep(seconds)
    stop.set()
    thread.join()
    return out


def main() -> int:
    """Quiet phase, storm phase; print the figures as JSON and a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quiet-s", type=float, default=20.0)
    parser.add_argument("--storm-s", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate", type=float, default=5000.0, help="storm packets a second (0: as fast as it can)")
    args = parser.parse_args()
    name = f"st{secrets.token_hex(2)}"
    plan = make_plan(name, 2, 1, seed=args.seed)
    report: dict[str, Any] = {}
    try:
        result = up(plan)
        add_pool(result.files)
        start_appliance(plan, result.files)
        pid = int(read_state(plan.name)["appliance_pid"])
        storm_ns = add_namespace(plan, "storm", "10.78.250.10")
        # node-2 stays powered off: its MAC is the inventory client's (its own port is silent, so no MAC clash).
        real = (add_namespace(plan, "real", "10.78.250.20", plan.node_list[1].mac), add_namespace(plan, "stranger", "10.78.250.30"))
        report["rss_start_mb"] = rss_mb(pid)
        before = health(plan)
        with tempfile.TemporaryDirectory(prefix="rackboot-storm-") as tmp:
            quiet = phase(plan, real, args.quiet_s, Path(tmp))
            report["rss_after_quiet_mb"] = rss_mb(pid)
            sent = multiprocessing.Value("q", 0)
            sender = multiprocessing.Process(target=storm, args=(storm_ns, args.storm_s, args.seed, args.rate, sent))
            sender.start()
            stormy = phase(plan, real, args.storm_s, Path(tmp))
            sender.join()
        report["storm_packets"] = sent.value
        report["storm_packets_per_s"] = round(sent.value / args.storm_s)
        report["rss_end_mb"] = rss_mb(pid)
        report["alive"] = Path(f"/proc/{pid}").exists()
        after = health(plan)
        report["counters_delta"] = {svc: {k: v - before.get(svc, {}).get(k, 0) for k, v in c.items() if v != before.get(svc, {}).get(k, 0)}
                                    for svc, c in after.items()}
        report["quiet"] = {k: summary(v) for k, v in quiet.items()}
        report["storm"] = {k: summary(v) for k, v in stormy.items()}
    finally:
        down(name)
    report["left_namespaces"] = len(existing_namespaces(plan.prefix))
    print(json.dumps(report, indent=1))
    print("\n| client | phase | runs | failed | median | p99 | max |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for ph in ("quiet", "storm"):
        for client, s in report.get(ph, {}).items():
            print(f"| {client} | {ph} | {s['runs']} | {s['failed']} | {s['median_ms']} ms | {s['p99_ms']} ms | {s['max_ms']} ms |")
    # The unknown-MAC client shares its port's rate limit with the flood's MACs (dhcp.unknown_rate): it may wait.
    failed = sum(s["failed"] for c, s in report.get("storm", {}).items() if "unknown" not in c)
    return 0 if report.get("alive") and not failed and report["left_namespaces"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
