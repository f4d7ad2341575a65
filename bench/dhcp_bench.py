#!/usr/bin/env python3
"""DHCP benchmark: Kea's perfdhcp against rackboot, kea-dhcp4 and dnsmasq, one server at a time, same run.

Topology (made with vmtestbed.netns.Lab through measure.NamespacePair, removed on success, failure, Ctrl-C):

    [PREFIX-srv] s0 10.99.0.1/16  ==veth==  c0 10.99.0.2/16 [PREFIX-cli]
     the server under test                    perfdhcp -l 10.99.0.2 (a relay: giaddr 10.99.0.2, port 67)

Every server gets the same /16 subnet, the same dynamic pool (10.99.1.0-10.99.255.250), the same
lease time and persists its leases in a temporary directory (rackboot: SQLite, Kea: memfile CSV,
dnsmasq: its lease file). Each probe starts the server fresh, runs perfdhcp for --period seconds
at a fixed rate of DORA exchanges, then stops the server. For each server the highest rate with
under --max-drop % of exchanges unanswered is found by doubling the rate, then bisecting.
Latency is compared at one fixed rate every server sustains (--latency-rate). Repeats interleave
the servers (A B C, C B A, ...) so the machine's noise hits them alike; figures are medians.

Run (as root, after ./setup.sh --bench):  .venv/bin/python bench/dhcp_bench.py
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import (  # noqa: E402
    code_description, cpu_seconds, exit_cleanly_on_sigterm, fmt, machine_load, markdown_table, median, NamespacePair,
    pyspy_path, pyspy_summary, require_root_and_tools, say, ScratchDir, stop, udp_port_bound, wait_until, with_rackboot,
    write_json,
)
from vmtestbed.netns import Lab  # noqa: E402

SERVER_IP = "10.99.0.1"
CLIENT_IP = "10.99.0.2"
PREFIXLEN = 16
POOL = ("10.99.1.0", "10.99.255.250")
LEASE_TIME = 3600
SERVERS = ("rackboot", "kea", "dnsmasq")


@dataclass
class Probe:
    """One perfdhcp run at a fixed rate against a freshly started server."""

    server: str
    rate: int
    period: float
    discovers: int = 0
    offers: int = 0
    requests: int = 0
    acks: int = 0
    do_avg_ms: float | None = None
    do_max_ms: float | None = None
    ra_avg_ms: float | None = None
    ra_max_ms: float | None = None
    exit_status: int = 0
    server_cpu_s: float | None = None
    load1: float | None = None
    busy_pct: float | None = None
    stalls: dict[str, float] = field(default_factory=dict)  # rackboot only: its /metrics' loop lag and GC pauses, ms
    error: str = ""

    @property
    def drop_pct(self) -> float:
        """Share of started exchanges that never got their ACK."""
        return 100.0 if self.discovers == 0 else 100.0 * (1 - self.acks / self.discovers)

    @property
    def leases_per_s(self) -> float:
        """ACKs received per second of test."""
        return self.acks / self.period

    @property
    def cpu_us_per_lease(self) -> float | None:
        """Server CPU time per completed exchange (robust to other load on the machine)."""
        return None if self.server_cpu_s is None or self.acks == 0 else 1e6 * self.server_cpu_s / self.acks

    def passed(self, max_drop: float, max_delay_ms: float = 0.0) -> bool:
        """Under max_drop % unanswered, at least 90 % of the asked rate completed (and, if set, avg delays under max_delay_ms)."""
        if self.error or self.drop_pct >= max_drop or self.leases_per_s < 0.9 * self.rate:
            return False
        if max_delay_ms > 0:
            return max(self.do_avg_ms or 0.0, self.ra_avg_ms or 0.0) < max_delay_ms
        return True


@dataclass
class Search:
    """The rate search of one server in one repeat."""

    server: str
    repeat: int
    latency_probe: Probe | None = None
    probes: list[Probe] = field(default_factory=list)

    def best(self, max_drop: float, max_delay_ms: float = 0.0) -> Probe | None:
        """The passing probe with the most leases per second."""
        candidates = self.probes + ([self.latency_probe] if self.latency_probe else [])
        ok = [p for p in candidates if p.passed(max_drop, max_delay_ms)]
        return max(ok, key=lambda p: p.leases_per_s) if ok else None


def parse_perfdhcp(text: str, probe: Probe) -> None:
    """Fill a probe from perfdhcp's final report (two sections: DISCOVER-OFFER and REQUEST-ACK)."""
    sections = re.split(r"\*\*\*Statistics for: ", text)
    for sec in sections[1:]:
        kind = sec.split("*", 1)[0].strip()
        sent = _int(r"sent packets: (\d+)", sec)
        received = _int(r"received packets: (\d+)", sec)
        avg = _float(r"avg delay: ([\d.]+) ms", sec)
        mx = _float(r"max delay: ([\d.]+) ms", sec)
        if kind == "DISCOVER-OFFER":
            probe.discovers, probe.offers, probe.do_avg_ms, probe.do_max_ms = sent, received, avg, mx
        elif kind == "REQUEST-ACK":
            probe.requests, probe.acks, probe.ra_avg_ms, probe.ra_max_ms = sent, received, avg, mx


def _int(pattern: str, text: str) -> int:
    m = re.search(pattern, text)
    return int(m.group(1)) if m else 0


def _float(pattern: str, text: str) -> float | None:
    m = re.search(pattern, text)
    return float(m.group(1)) if m else None


class ServerUnderTest:
    """Starts one DHCP server in the server namespace with the common pool, in its own temp directory."""

    def __init__(self, kind: str, lab: Lab, ns: str, ifname: str, rackboot: list[str]) -> None:
        self.kind = kind
        self.lab = lab
        self.ns = ns
        self.ifname = ifname
        self.rackboot = rackboot
        self.proc: subprocess.Popen[bytes] | None = None
        self._tmp: ScratchDir | None = None
        self.log: Path | None = None

    def __enter__(self) -> "ServerUnderTest":
        self._tmp = ScratchDir(prefix=f"rackboot-bench-{self.kind}-")
        tmp = Path(self._tmp.name)
        self.log = tmp / "server.log"
        argv, env, ready = getattr(self, f"_{self.kind}")(tmp)
        with open(self.log, "wb") as log:
            self.proc = self.lab.popen(self.ns, argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_until(ready, self.proc, self.kind, self.log)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop(self.proc)
        if self._tmp is not None:
            self._tmp.cleanup()

    def alive(self) -> bool:
        """True while the server process runs."""
        return self.proc is not None and self.proc.poll() is None

    def _rackboot(self, tmp: Path) -> tuple[list[str], dict[str, str], Any]:
        (tmp / "tftp").mkdir()
        (tmp / "files").mkdir()
        (tmp / "nodes.yaml").write_text(
            # One reserved node outside the pool: the benchmark clients all come from the pool.
            'nodes:\n  - name: node-1\n    mac: "52:54:00:99:00:01"\n    ip: 10.99.0.11\n'
        )
        (tmp / "rackboot.yaml").write_text(
            f"interface: {self.ifname}\naddress: {SERVER_IP}/{PREFIXLEN}\nstate_dir: {tmp / 'state'}\n"
            f"http_port: 8080\ninventory: nodes.yaml\n"
            f"dhcp:\n  mode: authoritative\n  pool: {POOL[0]}-{POOL[1]}\n  lease_time: {LEASE_TIME}\n"
            f"  router_advertisements: false\n"
            f"  unknown_rate: 'off'\n"  # perfdhcp's random MACs are outside the inventory: measure the server, not the limit
            f"tftp:\n  root: {tmp / 'tftp'}\nhttp:\n  files: {tmp / 'files'}\n"
            f"dns:\n  domain: bench.test\n"
        )
        ready_file = tmp / "state" / "serve.ready"
        return [*self.rackboot, "serve", "--config", str(tmp / "rackboot.yaml")], dict(os.environ), ready_file.exists

    def _kea(self, tmp: Path) -> tuple[list[str], dict[str, str], Any]:
        conf = {"Dhcp4": {
            # UDP sockets: every benchmark exchange is relayed (perfdhcp sets giaddr), no raw socket needed.
            "interfaces-config": {"interfaces": [f"{self.ifname}/{SERVER_IP}"], "dhcp-socket-type": "udp"},
            "lease-database": {"type": "memfile", "persist": True, "name": str(tmp / "leases.csv"), "lfc-interval": 0},
            "valid-lifetime": LEASE_TIME,
            "subnet4": [{"id": 1, "subnet": f"10.99.0.0/{PREFIXLEN}", "pools": [{"pool": f"{POOL[0]} - {POOL[1]}"}]}],
            "loggers": [{"name": "kea-dhcp4", "output_options": [{"output": "stdout"}], "severity": "WARN"}],
        }}
        (tmp / "kea.json").write_text(json.dumps(conf, indent=1))
        # Kea's lock and pid files go to the temp dir, never to /run/kea.
        env = dict(os.environ, KEA_LOCKFILE_DIR=str(tmp), KEA_PIDFILE_DIR=str(tmp), KEA_LOGGER_DESTINATION="stdout")
        return ["kea-dhcp4", "-c", str(tmp / "kea.json")], env, lambda: udp_port_bound(self.lab, self.ns, 67)

    def _dnsmasq(self, tmp: Path) -> tuple[list[str], dict[str, str], Any]:
        argv = [
            "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0",
            f"--interface={self.ifname}", "--bind-interfaces",
            f"--dhcp-range={POOL[0]},{POOL[1]},255.255.0.0,{LEASE_TIME}",
            f"--dhcp-leasefile={tmp / 'leases'}", "--dhcp-lease-max=100000",
            # No ICMP probe before each new offer: it holds every new client ~3 s here, and the other
            # servers do not probe either. No per-packet logging (Kea logs at WARN, rackboot at INFO).
            "--no-ping", "--quiet-dhcp", f"--pid-file={tmp / 'dnsmasq.pid'}",
        ]
        return argv, dict(os.environ), lambda: udp_port_bound(self.lab, self.ns, 67)


def run_probe(pair: NamespacePair, kind: str, rackboot: list[str], rate: int, args: argparse.Namespace) -> Probe:
    """Start the server fresh, run perfdhcp at one rate, stop the server; return what perfdhcp saw."""
    probe = Probe(server=kind, rate=rate, period=args.period)
    lab = pair.ensure()
    server_ns, client_ns = pair.server, pair.client
    load = machine_load(0.5)
    probe.load1, probe.busy_pct = load["load1"], load["busy_pct"]
    try:
        with ServerUnderTest(kind, lab, server_ns, "s0", rackboot) as srv:
            assert srv.proc is not None
            cpu0 = cpu_seconds(srv.proc.pid)
            argv = ["perfdhcp", "-4", "-l", CLIENT_IP, "-r", str(rate), "-R", str(args.clients),
                    "-p", str(args.period), SERVER_IP]
            out = lab.run(client_ns, argv, timeout=args.period + 60)
            probe.exit_status = out.returncode
            if srv.alive():
                probe.server_cpu_s = cpu_seconds(srv.proc.pid) - cpu0
                if kind == "rackboot":
                    probe.stalls = loop_stalls(lab, client_ns)
            else:
                probe.error = f"server exited with status {srv.proc.returncode} during the run"
            # Status 3: some exchanges unanswered (not a crash); anything else but 0 is a perfdhcp failure.
            if out.returncode not in (0, 3):
                probe.error = probe.error or f"perfdhcp exit {out.returncode}: {out.stderr.strip()[-300:]}"
            parse_perfdhcp(out.stdout, probe)
            if not pair.intact():
                probe.error = probe.error or "the namespaces vanished during the probe (removed by someone else?)"
            if probe.error and srv.log is not None:
                probe.error += " | server log: " + " / ".join(srv.log.read_text(errors="replace").splitlines()[-5:])
    except RuntimeError as exc:
        probe.error = str(exc)
    verdict = "pass" if probe.passed(args.max_drop, args.max_delay_ms) else "FAIL"
    say(f"  {kind:9s} rate {rate:6d}/s: {probe.leases_per_s:8.1f} leases/s, drop {probe.drop_pct:5.2f} %, "
        f"DO avg {fmt(probe.do_avg_ms, 2)} ms, RA avg {fmt(probe.ra_avg_ms, 2)} ms, "
        f"server CPU {fmt(probe.cpu_us_per_lease)} us/lease, load {probe.load1} busy {probe.busy_pct} % -> {verdict}"
        + (f"; stalls (ms, worst): {', '.join(f'{k} {v:g}' for k, v in probe.stalls.items())}" if probe.stalls else "")
        + (f" [{probe.error[-700:]}]" if probe.error else ""))
    return probe


STALL_METRICS = {"rackboot_loop_lag_max_us": "loop lag", "rackboot_loop_gc_pause_gen0_max_us": "gc0",
                 "rackboot_loop_gc_pause_gen1_max_us": "gc1", "rackboot_loop_gc_pause_gen2_max_us": "gc2",
                 "rackboot_loop_gc_collections_gen2_total": "gc2 passes"}


def loop_stalls(lab: Lab, ns: str) -> dict[str, float]:
    """The worst event-loop lag and GC pauses rackboot's /metrics saw during the probe (ms; gc2 passes a count)."""
    out = lab.run(ns, ["curl", "-s", "--max-time", "5", f"http://{SERVER_IP}:8080/metrics"], timeout=15)
    found: dict[str, float] = {}
    for line in out.stdout.splitlines():
        name, _, value = line.partition(" ")
        if name in STALL_METRICS:
            found[STALL_METRICS[name]] = float(value) if name.endswith("_total") else round(float(value) / 1000, 2)
    return found


def search_rate(pair: NamespacePair, kind: str, rackboot: list[str], repeat: int, args: argparse.Namespace) -> Search:
    """Latency probe at the common rate, then double the rate until a probe fails, then bisect (geometric)."""
    search = Search(server=kind, repeat=repeat)
    search.latency_probe = run_probe(pair, kind, rackboot, args.latency_rate, args)
    if search.latency_probe.acks == 0:
        say(f"  {kind}: does not answer at all, skipping its rate search")
        return search
    lo, hi = 0, 0
    rate = args.start_rate
    while lo == 0 or hi == 0:
        probe = run_probe(pair, kind, rackboot, rate, args)
        search.probes.append(probe)
        if probe.passed(args.max_drop, args.max_delay_ms):
            lo = rate
            if hi == 0 and rate * 2 > args.max_rate:
                return search  # passed up to --max-rate
            rate = rate * 2 if hi == 0 else rate
        else:
            hi = rate
            if lo == 0 and rate // 2 < 10:
                return search  # fails even at 10 exchanges/s
            rate = rate // 2 if lo == 0 else rate
        if lo and hi:
            break
    while hi / lo > 1 + args.precision:
        mid = int(round(math.sqrt(lo * hi)))
        if mid in (lo, hi):
            break
        probe = run_probe(pair, kind, rackboot, mid, args)
        search.probes.append(probe)
        if probe.passed(args.max_drop, args.max_delay_ms):
            lo = mid
        else:
            hi = mid
    return search


def profile_rackboot(pair: NamespacePair, rackboot: list[str], args: argparse.Namespace) -> str:
    """Run one rackboot probe at --profile-rate with py-spy sampling the server; return the hottest functions."""
    lab = pair.ensure()
    server_ns, client_ns = pair.server, pair.client
    pyspy = pyspy_path()
    if pyspy is None:
        return "(no profile: py-spy is not installed; `.venv/bin/pip install py-spy`)"
    out_file = Path(args.profile_out).resolve()
    probe = Probe(server="rackboot", rate=args.profile_rate, period=args.period)
    with ServerUnderTest("rackboot", lab, server_ns, "s0", rackboot) as srv:
        assert srv.proc is not None
        # py-spy reads the process's memory from the root namespace: no network involved.
        spy = subprocess.Popen([pyspy, "record", "-p", str(srv.proc.pid), "-d", str(args.period + 1), "-r", "250",
                                "-f", "raw", "-o", str(out_file), "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            out = lab.run(client_ns, ["perfdhcp", "-4", "-l", CLIENT_IP, "-r", str(args.profile_rate), "-R", str(args.clients),
                                      "-p", str(args.period), SERVER_IP], timeout=args.period + 60)
            parse_perfdhcp(out.stdout, probe)
            spy.wait(timeout=args.period + 30)
        finally:
            stop(spy)
    if not out_file.exists():
        return f"(no profile: py-spy wrote nothing: {spy.stderr.read().decode(errors='replace')[-300:] if spy.stderr else ''})"
    return pyspy_summary(out_file, f"py-spy at {args.profile_rate}/s: {probe.leases_per_s:.0f} leases/s, drop {probe.drop_pct:.2f} %")


def report(searches: list[Search], args: argparse.Namespace, loads: list[dict[str, Any]]) -> str:
    """Markdown: per server the median best rate, latency at the common rate, CPU per lease, ratios."""
    rows = []
    med: dict[str, dict[str, float | None]] = {}
    for kind in args.servers:
        mine = [s for s in searches if s.server == kind]
        bests = [s.best(args.max_drop, args.max_delay_ms) for s in mine]
        lat = [s.latency_probe for s in mine if s.latency_probe is not None and s.latency_probe.passed(args.max_drop, args.max_delay_ms)]
        m = {
            "rate": median([b.leases_per_s for b in bests if b is not None]),
            "runs": [round(b.leases_per_s) if b else None for b in bests],
            "cpu_best": median([b.cpu_us_per_lease for b in bests if b is not None and b.cpu_us_per_lease is not None]),
            "do_best": median([b.do_avg_ms for b in bests if b is not None and b.do_avg_ms is not None]),
            "ra_best": median([b.ra_avg_ms for b in bests if b is not None and b.ra_avg_ms is not None]),
            "do_lat": median([p.do_avg_ms for p in lat if p.do_avg_ms is not None]),
            "ra_lat": median([p.ra_avg_ms for p in lat if p.ra_avg_ms is not None]),
            "do_lat_max": median([p.do_max_ms for p in lat if p.do_max_ms is not None]),
            "ra_lat_max": median([p.ra_max_ms for p in lat if p.ra_max_ms is not None]),
            "cpu": median([p.cpu_us_per_lease for p in lat if p.cpu_us_per_lease is not None]),
        }
        med[kind] = m  # type: ignore[assignment]
    base = med.get("rackboot", {}).get("rate")
    for kind in args.servers:
        m = med[kind]
        ratio = (base / m["rate"]) if base and m["rate"] and kind != "rackboot" else None
        # Same-repeat ratios: both servers measured minutes apart, under the same background load.
        paired = [r / p for r, p in zip(med.get("rackboot", {}).get("runs") or [], m["runs"]) if r and p]  # type: ignore[arg-type]
        rows.append([
            kind, fmt(m["rate"]), " / ".join("-" if r is None else str(r) for r in m["runs"]),  # type: ignore[union-attr]
            fmt(m["do_best"], 2) + " / " + fmt(m["ra_best"], 2),
            fmt(m["cpu_best"]),
            fmt(m["do_lat"], 2) + " / " + fmt(m["ra_lat"], 2),
            fmt(m["do_lat_max"], 1) + " / " + fmt(m["ra_lat_max"], 1),
            fmt(m["cpu"]),
            "-" if kind == "rackboot" else (fmt(ratio, 2) if ratio is not None else "-")
            + ("" if kind == "rackboot" or not paired else f" (same repeat: {' / '.join(f'{x:.2f}' for x in paired)})"),
        ])
    criterion = f"<{args.max_drop}% drop" + (f", avg delay <{args.max_delay_ms} ms" if args.max_delay_ms > 0 else "")
    headers = ["server", f"leases/s at {criterion} (median)", "per repeat",
               "avg DO / RA ms at that rate", "server CPU us/lease at that rate", f"avg DO / RA ms at {args.latency_rate}/s",
               f"max DO / RA ms at {args.latency_rate}/s", f"server CPU us/lease at {args.latency_rate}/s",
               "rackboot / this server"]
    loads_txt = "; ".join(f"{l['when']}: load {l['load1']:.2f} {l['load5']:.2f} {l['load15']:.2f}, CPUs {l['busy_pct']} % busy" for l in loads)
    # Latency against load: the doubling ladder every search climbs (until it fails), medians over repeats.
    ladder = sorted({p.rate for s in searches for p in s.probes + ([s.latency_probe] if s.latency_probe else [])
                     if p.rate == args.latency_rate or (p.rate / args.start_rate).is_integer()
                     and math.log2(p.rate / args.start_rate).is_integer()})
    lat_rows = []
    for rate in ladder:
        row = [f"{rate}/s"]
        for kind in args.servers:
            ps = [p for s in searches if s.server == kind for p in s.probes + ([s.latency_probe] if s.latency_probe else []) if p.rate == rate]
            if not ps:
                row.append("-")
                continue
            row.append(f"{fmt(median([p.do_avg_ms for p in ps]), 2)} / {fmt(median([p.ra_avg_ms for p in ps]), 2)} ms, "
                       f"max {fmt(median([p.do_max_ms for p in ps if p.do_max_ms is not None]), 1)} / "
                       f"{fmt(median([p.ra_max_ms for p in ps if p.ra_max_ms is not None]), 1)} ms, "
                       f"drop {fmt(median([p.drop_pct for p in ps]), 2)} %")
        lat_rows.append(row)
    return "\n".join([
        f"perfdhcp -4 -l {CLIENT_IP} -r RATE -R {args.clients} -p {args.period} {SERVER_IP}; "
        f"{args.repeats} repeats, servers interleaved; pool {POOL[0]}-{POOL[1]}.",
        f"Machine: {loads_txt}.",
        f"rackboot: {code_description(args.rackboot_commit)}.",
        "",
        markdown_table(headers, rows),
        "",
        "Average and maximum DISCOVER-OFFER / REQUEST-ACK delay and drops by offered rate (medians over the repeats that probed it):",
        "",
        markdown_table(["offered rate", *args.servers], lat_rows),
    ])


def main(argv: list[str] | None = None) -> int:
    """Run the DHCP benchmark and print a markdown report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--servers", default=",".join(SERVERS), help="comma-separated, from: " + ", ".join(SERVERS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--period", type=int, default=10, help="seconds of perfdhcp traffic per probe")
    ap.add_argument("--clients", type=int, default=20000, help="perfdhcp -R: simulated clients (distinct MACs)")
    ap.add_argument("--start-rate", type=int, default=250, help="first rate of the search (exchanges/s)")
    ap.add_argument("--max-rate", type=int, default=16000)
    ap.add_argument("--precision", type=float, default=0.1, help="stop bisecting when hi/lo < 1 + this")
    ap.add_argument("--max-drop", type=float, default=1.0, help="percent of unanswered exchanges a passing rate may have")
    ap.add_argument("--max-delay-ms", type=float, default=0.0,
                    help="also require avg DISCOVER-OFFER and REQUEST-ACK delays under this (0: no latency bound)")
    ap.add_argument("--latency-rate", type=int, default=200, help="the common rate at which latencies are compared")
    ap.add_argument("--profile-rate", type=int, default=0,
                    help="after the searches, profile rackboot with py-spy during one probe at this rate (0: no profile)")
    ap.add_argument("--profile-out", default="dhcp-profile.txt", help="where py-spy's raw (collapsed) stacks go")
    ap.add_argument("--rackboot", default=None, help="rackboot executable (default: the one next to this Python)")
    ap.add_argument("--rackboot-commit", default=None,
                    help="measure this git commit of rackboot (exported to a temp dir) instead of the installed checkout")
    ap.add_argument("--json", help="also write every probe as JSON to this file")
    args = ap.parse_args(argv)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = set(args.servers) - set(SERVERS)
    if unknown:
        ap.error(f"unknown servers: {', '.join(sorted(unknown))}")
    tools = ["perfdhcp", "ss"] + [{"kea": "kea-dhcp4", "dnsmasq": "dnsmasq"}[s] for s in args.servers if s != "rackboot"]
    require_root_and_tools(tools)
    exit_cleanly_on_sigterm()
    return with_rackboot(args, "rackboot" in args.servers, measure_and_report)


def measure_and_report(args: argparse.Namespace, rackboot: list[str]) -> int:
    """Build the namespaces, run every measurement, print the report."""

    loads = [dict(machine_load(), when="start")]
    say(f"machine at start: {loads[0]['uptime']} (CPUs {loads[0]['busy_pct']} % busy)")
    searches: list[Search] = []
    with NamespacePair(f"{SERVER_IP}/{PREFIXLEN}", f"{CLIENT_IP}/{PREFIXLEN}") as pair:
        say(f"namespaces {pair.server} (server) and {pair.client} (perfdhcp)")
        for repeat in range(1, args.repeats + 1):
            order = args.servers if repeat % 2 else list(reversed(args.servers))
            for kind in order:
                say(f"repeat {repeat}/{args.repeats}: {kind}")
                searches.append(search_rate(pair, kind, rackboot, repeat, args))
            loads.append(dict(machine_load(), when=f"after repeat {repeat}"))
        profile = profile_rackboot(pair, rackboot, args) if args.profile_rate and rackboot else ""
        rebuilt = pair.rebuilt
    text = report(searches, args, loads) + ("\n\n" + profile if profile else "")
    if rebuilt:
        text += f"\n\nThe namespace pair vanished and was rebuilt {rebuilt} time(s) during the run (not by this script)."
    print(text)
    write_json(args.json, {
        "args": vars(args), "loads": loads,
        "searches": [{"server": s.server, "repeat": s.repeat,
                      "latency_probe": asdict(s.latency_probe) if s.latency_probe else None,
                      "probes": [asdict(p) | {"drop_pct": p.drop_pct, "leases_per_s": p.leases_per_s} for p in s.probes]}
                     for s in searches],
        "report": text,
    })
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        say("interrupted; namespaces and servers removed")
        sys.exit(130)
