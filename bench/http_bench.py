#!/usr/bin/env python3
"""HTTP benchmark: 200 concurrent downloads of a 64 MiB file, one 1 GiB file (8 times, one after another) and 200 resumed (Range) downloads, rackboot vs nginx.

Topology (made with vmtestbed.netns.Lab through measure.NamespacePair, removed on success, failure, Ctrl-C, SIGTERM):

    [PREFIX-srv] s0 10.97.0.1/16  ==veth==  c0 10.97.0.2/16 [PREFIX-cli]
     rackboot serve (HTTP + DHCP)             the downloads: this script re-run inside the namespace
     or nginx (Debian's), port 8080           perfdhcp -l 10.97.0.2 at --dhcp-rate (rackboot runs only)

Both servers serve the same directory at /files/ on the same address and port, one at a time,
started fresh for each repeat, order alternating. nginx gets a generated minimal configuration
(worker_processes auto, sendfile on, tcp_nopush on, access_log off, keepalive_timeout 1 s like
rackboot's); rackboot's access log is off by default, so neither logs requests.

The client is one process, this script with --fetch: non-blocking sockets on epoll, one HTTP/1.1
request per connection (Connection: close), the body read with recv(MSG_TRUNC), which the kernel
discards without copying it to user space: a download costs the client a system call per few
hundred kilobytes and no copy, so what is measured is the server (curl --parallel copies every
byte into its own buffers and writes it to /dev/null, and one curl process saturates a core at
the rates here). Every timed response is checked (status, Content-Length, Content-Range, bytes
received); before the timed runs each server serves every file once whole and three ranges with
their SHA-256 checked (untimed; this also warms the page cache for both).

During rackboot's timed downloads perfdhcp sends relayed DORA exchanges to rackboot's DHCP (the same
process and event loop as its HTTP) at a low rate; its average and maximum DISCOVER-OFFER and
REQUEST-ACK delays say whether DHCP keeps answering within 5 ms meanwhile. An idle probe (no
download) per repeat gives the baseline.

Run (as root, after ./setup.sh --bench):  .venv/bin/python bench/http_bench.py
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dhcp_bench import Probe, parse_perfdhcp  # noqa: E402
from measure import (  # noqa: E402
    code_description, cpu_seconds, exit_cleanly_on_sigterm, fmt, machine_load, markdown_table, median, NamespacePair,
    pyspy_path, pyspy_summary, require_root_and_tools, say, ScratchDir, stop, wait_until, with_rackboot, write_json,
)
from vmtestbed.netns import Lab  # noqa: E402

SERVER_IP = "10.97.0.1"
CLIENT_IP = "10.97.0.2"
PREFIXLEN = 16
POOL = ("10.97.1.0", "10.97.255.250")
PORT = 8080
SERVERS = ("nginx", "rackboot")
TESTS = ("many", "big", "range")
DISCARD_CHUNK = 4 << 20  # bytes one recv(MSG_TRUNC) may discard


@dataclass
class Run:
    """One timed download set against one server."""

    server: str
    test: str
    repeat: int
    seconds: float | None = None
    bytes: int = 0
    ok: int = 0
    failed: int = 0
    each_median: float | None = None
    server_cpu_s: float | None = None
    client_cpu_s: float | None = None
    load1: float | None = None
    busy_pct: float | None = None
    dhcp: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def mb_per_s(self) -> float | None:
        """Aggregate throughput, MB/s (10^6 bytes)."""
        return self.bytes / self.seconds / 1e6 if self.seconds and not self.failed else None


# -- the client (runs inside the client namespace) --------------------------------------------------


@dataclass
class Download:
    """One HTTP GET on its own connection: what to ask, what must come back, what came."""

    path: str
    first: int | None = None  # Range: bytes=first-last (last None: to the end)
    last: int | None = None
    length: int = 0  # the body's expected size
    sha256: str | None = None  # when set, the body is read into user space and hashed
    head: bytes = b""
    status: int = 0
    content_length: int = -1
    received: int = 0
    done_at: float | None = None
    error: str = ""
    hasher: Any = None

    def request(self, host: str) -> bytes:
        """The request bytes."""
        rng = f"Range: bytes={self.first}-{'' if self.last is None else self.last}\r\n" if self.first is not None else ""
        return f"GET {self.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: http_bench\r\n{rng}Connection: close\r\n\r\n".encode()

    def parse_head(self) -> bytes:
        """Parse the status line and headers collected in head; return the body bytes that came with them."""
        head, _, rest = self.head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        self.content_length = int(headers.get("content-length", "-1"))
        want = 206 if self.first is not None else 200
        if self.status != want:
            self.error = f"status {self.status}, expected {want}"
        elif self.content_length != self.length:
            self.error = f"Content-Length {self.content_length}, expected {self.length}"
        elif self.first is not None and not headers.get("content-range", "").startswith(
                f"bytes {self.first}-{self.first + self.length - 1}/"):
            self.error = f"Content-Range {headers.get('content-range')!r}, expected bytes {self.first}-..."
        if self.sha256 is not None:
            self.hasher = hashlib.sha256()
        return rest

    def take(self, data: bytes | int) -> None:
        """Count (and hash, when checking) body bytes."""
        if isinstance(data, int):
            self.received += data
        else:
            self.received += len(data)
            if self.hasher is not None:
                self.hasher.update(data)

    def finish(self, now: float) -> None:
        """Close the books on this download: sizes and digest."""
        self.done_at = now
        if not self.error and self.received != self.length:
            self.error = f"received {self.received} bytes, expected {self.length}"
        if not self.error and self.hasher is not None and self.hasher.hexdigest() != self.sha256:
            self.error = "SHA-256 mismatch"


def download_all(host: str, port: int, downloads: list[Download], timeout: float) -> dict[str, Any]:
    """Run every download at once on epoll; return seconds, bytes, failures and the median download's time."""
    sel = selectors.DefaultSelector()
    scratch = bytearray(DISCARD_CHUNK)
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    for d in downloads:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.connect_ex((host, port))
        sel.register(sock, selectors.EVENT_WRITE, d)
    pending = len(downloads)
    deadline = t0 + timeout
    while pending and time.monotonic() < deadline:
        for key, events in sel.select(timeout=1.0):
            sock, d = key.fileobj, key.data
            assert isinstance(sock, socket.socket) and isinstance(d, Download)
            end = False
            try:
                if events & selectors.EVENT_WRITE:
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, os.strerror(err))
                    sock.sendall(d.request(host))
                    sel.modify(sock, selectors.EVENT_READ, d)
                    continue
                if d.status == 0:
                    chunk = sock.recv(65536)
                    end = not chunk
                    d.head += chunk
                    if b"\r\n\r\n" in d.head:
                        d.take(d.parse_head())
                elif d.hasher is not None:
                    chunk = sock.recv(1 << 20)
                    end = not chunk
                    d.take(chunk)
                else:
                    n = sock.recv_into(scratch, DISCARD_CHUNK, socket.MSG_TRUNC)
                    end = n == 0
                    d.take(n)
            except OSError as exc:
                d.error = d.error or f"{exc}"
                end = True
            if end or d.error or (d.status and d.received >= d.length):
                sel.unregister(sock)
                sock.close()
                d.finish(time.monotonic())
                pending -= 1
    elapsed = time.monotonic() - t0
    for key in list(sel.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
        key.data.error = key.data.error or f"unfinished after {timeout:.0f} s"
    errors = [f"{d.path} {d.first}-{d.last}: {d.error}" for d in downloads if d.error]
    times = sorted(d.done_at - t0 for d in downloads if d.done_at is not None and not d.error)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"seconds": elapsed, "bytes": sum(d.received for d in downloads if not d.error), "ok": len(downloads) - len(errors),
            "failed": len(errors), "errors": errors[:5], "each_median": times[len(times) // 2] if times else None,
            "client_cpu_s": usage.ru_utime + usage.ru_stime - usage0.ru_utime - usage0.ru_stime}


def fetch_in_namespace(args: argparse.Namespace) -> int:
    """(Runs inside the client namespace.) Download what the spec file lists, all at once; print JSON."""
    spec = json.loads(Path(args.spec).read_text())
    downloads = [Download(**d) for d in spec["downloads"]]
    if not spec.get("sequential"):
        print(json.dumps(download_all(spec["host"], spec["port"], downloads, spec["timeout"])))
        return 0
    # One after another (a new connection each), the times and bytes summed: a single download long enough to
    # measure throughput rather than its start.
    total: dict[str, Any] = {"seconds": 0.0, "bytes": 0, "ok": 0, "failed": 0, "errors": [], "each_median": None,
                             "client_cpu_s": 0.0}
    each = []
    for d in downloads:
        one = download_all(spec["host"], spec["port"], [d], spec["timeout"])
        for key in ("seconds", "bytes", "ok", "failed", "client_cpu_s"):
            total[key] += one[key] or 0
        total["errors"] += one["errors"]
        each.append(one["seconds"])
    total["each_median"] = sorted(each)[len(each) // 2]
    print(json.dumps(total))
    return 0


# -- the servers ------------------------------------------------------------------------------------


def nginx_conf(tmp: Path, root: Path) -> str:
    """A minimal nginx configuration serving root at /files/ on SERVER_IP:PORT, everything it writes in tmp."""
    temp = " ".join(f"{k}_temp_path {tmp / k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""worker_processes auto;
daemon off;
pid {tmp / 'nginx.pid'};
error_log {tmp / 'error.log'} warn;
events {{ worker_connections 4096; }}
http {{
    sendfile on;
    tcp_nopush on;
    access_log off;
    keepalive_timeout 1s;
    default_type application/octet-stream;
    {temp}
    server {{
        listen {SERVER_IP}:{PORT} backlog=1024;
        location /files/ {{ alias {root}/; }}
    }}
}}
"""


class HttpServer:
    """rackboot serve (HTTP and DHCP) or nginx in the server namespace, serving ROOT at /files/."""

    def __init__(self, kind: str, lab: Lab, ns: str, root: Path, rackboot: list[str]) -> None:
        self.kind, self.lab, self.ns, self.root, self.rackboot = kind, lab, ns, root, rackboot
        self.proc: subprocess.Popen[bytes] | None = None
        self._tmp: ScratchDir | None = None
        self.log: Path | None = None

    def __enter__(self) -> "HttpServer":
        self._tmp = ScratchDir(prefix=f"rackboot-bench-{self.kind}-")
        tmp = Path(self._tmp.name)
        self.log = tmp / "server.log"
        if self.kind == "rackboot":
            (tmp / "tftp").mkdir()
            (tmp / "nodes.yaml").write_text('nodes:\n  - name: node-1\n    mac: "52:54:00:97:00:01"\n    ip: 10.97.0.11\n')
            (tmp / "rackboot.yaml").write_text(
                f"interface: s0\naddress: {SERVER_IP}/{PREFIXLEN}\nstate_dir: {tmp / 'state'}\nhttp_port: {PORT}\n"
                f"inventory: nodes.yaml\n"
                f"dhcp:\n  mode: authoritative\n  pool: {POOL[0]}-{POOL[1]}\n  lease_time: 3600\n"
                f"  router_advertisements: false\n  unknown_rate: 'off'\n"
                f"tftp:\n  root: {tmp / 'tftp'}\nhttp:\n  files: {self.root}\ndns:\n  domain: bench.test\n"
            )
            argv = [*self.rackboot, "serve", "--config", str(tmp / "rackboot.yaml")]
            ready = (tmp / "state" / "serve.ready").exists
        else:
            for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
                (tmp / k).mkdir()
            (tmp / "nginx.conf").write_text(nginx_conf(tmp, self.root))
            argv = ["nginx", "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(tmp / "nginx.conf")]
            ready = lambda: self.lab.run(self.ns, ["ss", "-Hltn", f"sport = :{PORT}"], timeout=10).stdout.strip() != ""  # noqa: E731
        with open(self.log, "wb") as fh:
            self.proc = self.lab.popen(self.ns, argv, stdout=fh, stderr=subprocess.STDOUT)
        wait_until(ready, self.proc, self.kind, self.log)
        return self

    def cpu_seconds(self) -> float | None:
        """CPU time of the server so far: rackboot's process, or nginx's master and workers."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        pids = [self.proc.pid]
        if self.kind == "nginx":
            kids = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split()
            pids += [int(p) for p in kids]
        total = 0.0
        for pid in pids:
            try:
                total += cpu_seconds(pid)
            except OSError:
                pass
        return total

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            if self.kind == "nginx" and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGQUIT)  # graceful: the master stops its workers
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            stop(self.proc)
        if self._tmp is not None:
            self._tmp.cleanup()


# -- the measurements -------------------------------------------------------------------------------


def make_files(root: Path, many_mib: int, big_mib: int) -> dict[str, tuple[int, str]]:
    """Write the two random files under root; return name -> (size, SHA-256)."""
    out = {}
    for name, mib in ((f"file-{many_mib}m", many_mib), (f"file-{big_mib}m", big_mib)):
        h = hashlib.sha256()
        with open(root / name, "wb") as fh:
            for _ in range(mib):
                chunk = os.urandom(1 << 20)
                h.update(chunk)
                fh.write(chunk)
        (root / name).chmod(0o644)
        out[name] = (mib << 20, h.hexdigest())
    return out


def test_downloads(test: str, files: dict[str, tuple[int, str]], concurrent: int, big_times: int = 1) -> list[dict[str, Any]]:
    """The downloads of one test: `many` (the small file N times), `big` (the big file, big_times times one after another),
    `range` (N resumed downloads)."""
    many, big = list(files)
    size = files[many][0]
    if test == "many":
        return [{"path": f"/files/{many}", "length": size} for _ in range(concurrent)]
    if test == "big":
        return [{"path": f"/files/{big}", "length": files[big][0]} for _ in range(big_times)]
    # Resumed downloads: each asks for the rest of the small file from an offset, offsets spread evenly.
    starts = [size * i // concurrent for i in range(concurrent)]
    return [{"path": f"/files/{many}", "first": s, "length": size - s} for s in starts]


def check_downloads(root: Path, files: dict[str, tuple[int, str]]) -> list[dict[str, Any]]:
    """Whole files and three ranges (open-ended, closed, last byte), with the SHA-256 each must have."""
    many = next(iter(files))
    data = (root / many).read_bytes()
    out: list[dict[str, Any]] = [{"path": f"/files/{name}", "length": size, "sha256": digest} for name, (size, digest) in files.items()]
    for first, last in ((len(data) // 3, None), (len(data) // 8, len(data) // 2), (len(data) - 1, len(data) - 1)):
        piece = data[first:None if last is None else last + 1]
        out.append({"path": f"/files/{many}", "first": first, "last": last, "length": len(piece),
                    "sha256": hashlib.sha256(piece).hexdigest()})
    return out


def run_downloads(lab: Lab, client_ns: str, downloads: list[dict[str, Any]], spec_file: Path, timeout: float,
                  sequential: bool = False) -> dict[str, Any]:
    """Run the client in the client namespace on one download set (all at once, or one after another); return its JSON result."""
    spec_file.write_text(json.dumps({"host": SERVER_IP, "port": PORT, "timeout": timeout, "downloads": downloads,
                                     "sequential": sequential}))
    argv = [sys.executable, str(Path(__file__).resolve()), "--fetch", "--spec", str(spec_file)]
    try:
        res = lab.run(client_ns, argv, timeout=timeout + 30)
    except subprocess.TimeoutExpired:
        return {"seconds": None, "failed": len(downloads), "errors": [f"no result after {timeout:.0f} s"]}
    try:
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"seconds": None, "failed": len(downloads), "errors": [f"client failed: {res.stderr.strip()[-300:]}"]}


class DhcpProbe:
    """perfdhcp in the client namespace at a low rate for as long as a download set runs; stopped with SIGINT."""

    def __init__(self, lab: Lab, ns: str, rate: int, log: Path) -> None:
        self.lab, self.ns, self.rate, self.log = lab, ns, rate, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def __enter__(self) -> "DhcpProbe":
        argv = ["perfdhcp", "-4", "-l", CLIENT_IP, "-r", str(self.rate), "-R", "20000", "-p", "3600", SERVER_IP]
        with open(self.log, "wb") as fh:
            self.proc = self.lab.popen(self.ns, argv, stdout=fh, stderr=subprocess.STDOUT)
        self.started = time.monotonic()
        time.sleep(0.5)  # a few exchanges before the downloads begin
        return self

    def result(self) -> dict[str, Any]:
        """Stop perfdhcp (it prints its statistics on SIGINT) and return the delays it saw."""
        assert self.proc is not None
        period = time.monotonic() - self.started
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            stop(self.proc)
        probe = Probe(server="rackboot", rate=self.rate, period=period)
        parse_perfdhcp(self.log.read_text(errors="replace"), probe)
        return {"exchanges": probe.discovers, "acks": probe.acks, "drop_pct": round(probe.drop_pct, 2),
                "do_avg_ms": probe.do_avg_ms, "do_max_ms": probe.do_max_ms, "ra_avg_ms": probe.ra_avg_ms, "ra_max_ms": probe.ra_max_ms}

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop(self.proc)


def measure_one(pair: NamespacePair, server: HttpServer, test: str, repeat: int, files: dict[str, tuple[int, str]],
                tmp: Path, args: argparse.Namespace, profile: Path | None = None) -> Run:
    """Time one download set against a running server (with the DHCP probe beside rackboot)."""
    lab = pair.ensure()
    load = machine_load(0.5)
    run = Run(server.kind, test, repeat, load1=load["load1"], busy_pct=load["busy_pct"])
    downloads = test_downloads(test, files, args.concurrent, args.big_times)
    cpu0 = server.cpu_seconds()
    spy: subprocess.Popen[bytes] | None = None
    probe = DhcpProbe(lab, pair.client, args.dhcp_rate, tmp / "perfdhcp.log") if server.kind == "rackboot" and args.dhcp_rate else None
    try:
        if probe is not None:
            probe.__enter__()
        if profile is not None and (pyspy := pyspy_path()) and server.proc is not None:
            spy = subprocess.Popen([pyspy, "record", "-p", str(server.proc.pid), "-r", "200", "-f", "raw", "-o", str(profile),
                                    "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        data = run_downloads(lab, pair.client, downloads, tmp / "spec.json", args.timeout, sequential=test == "big")
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its recording on SIGINT
            spy.wait(timeout=30)
        if probe is not None:
            run.dhcp = probe.result()
    finally:
        if spy is not None:
            stop(spy)
        if probe is not None:
            probe.__exit__()
    cpu1 = server.cpu_seconds()
    run.server_cpu_s = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    run.seconds, run.bytes, run.failed = data.get("seconds"), data.get("bytes", 0), data.get("failed", len(downloads))
    run.ok, run.each_median, run.client_cpu_s = data.get("ok", 0), data.get("each_median"), data.get("client_cpu_s")
    run.error = "; ".join(data.get("errors", []))
    if server.proc is not None and server.proc.poll() is not None:
        run.error = f"server exited with status {server.proc.returncode}; " + run.error
    d = run.dhcp
    say(f"  {server.kind:8s} {test:5s}: {fmt(run.seconds, 2)} s, {fmt(run.mb_per_s)} MB/s, {run.ok} ok, {run.failed} failed, "
        f"server CPU {fmt(run.server_cpu_s, 1)} s, client CPU {fmt(run.client_cpu_s, 1)} s, load {run.load1} busy {run.busy_pct} %"
        + (f", DHCP DO avg/max {fmt(d.get('do_avg_ms'), 2)}/{fmt(d.get('do_max_ms'), 2)} ms, "
           f"RA avg/max {fmt(d.get('ra_avg_ms'), 2)}/{fmt(d.get('ra_max_ms'), 2)} ms, drop {d.get('drop_pct')} %" if d else "")
        + (f" [{run.error[:300]}]" if run.error else ""))
    return run


def idle_dhcp(pair: NamespacePair, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """perfdhcp against rackboot with no download running: the baseline delays."""
    with DhcpProbe(pair.ensure(), pair.client, args.dhcp_rate, tmp / "perfdhcp-idle.log") as probe:
        time.sleep(args.idle_s)
        return probe.result()


def test_label(test: str, files: dict[str, tuple[int, str]], concurrent: int, big_times: int = 1) -> str:
    """A row title for one test."""
    many, big = list(files)
    if test == "many":
        return f"{files[many][0] >> 20} MiB x {concurrent} at once"
    if test == "big":
        return f"{files[big][0] >> 20} MiB x 1" + (f", {big_times} times one after another" if big_times > 1 else "")
    return f"{files[many][0] >> 20} MiB resumed (Range: bytes=N-) x {concurrent} at once"


def report(runs: list[Run], idles: list[dict[str, Any]], args: argparse.Namespace, loads: list[dict[str, Any]],
           files: dict[str, tuple[int, str]]) -> str:
    """Markdown: per test, each server's median MB/s (runs), CPU, the ratio; then DHCP delays meanwhile."""
    rows = []
    for test in args.tests:
        med: dict[str, float | None] = {}
        row = [test_label(test, files, args.concurrent, args.big_times)]
        for kind in SERVERS:
            mine = [r for r in runs if r.server == kind and r.test == test]
            med[kind] = median([r.mb_per_s for r in mine if r.mb_per_s is not None])
            runs_txt = " / ".join(fmt(r.mb_per_s) if r.mb_per_s is not None else "fail" for r in mine)
            cpu = median([r.server_cpu_s for r in mine if r.server_cpu_s is not None])
            row += [f"{fmt(med[kind])} ({runs_txt})", fmt(cpu, 1)]
        row.append(fmt(med["rackboot"] / med["nginx"], 2) if med["rackboot"] and med["nginx"] else "-")
        client = median([r.client_cpu_s / r.seconds for r in runs if r.test == test and r.client_cpu_s and r.seconds])
        row.append(fmt(100 * client if client is not None else None))
        rows.append(row)
    headers = ["test", "nginx MB/s, median (runs)", "nginx CPU s", "rackboot MB/s, median (runs)", "rackboot CPU s",
               "rackboot / nginx", "client CPU % of a core"]
    dhcp_rows = []
    for label, sets in [("idle (no download)", idles)] + [(test_label(t, files, args.concurrent, args.big_times),
                                                          [r.dhcp for r in runs if r.test == t and r.dhcp]) for t in args.tests]:
        def cell(key: str) -> str:
            vals = [s.get(key) for s in sets if s.get(key) is not None]
            return f"{fmt(median(vals), 2)} ({' / '.join(fmt(v, 2) for v in vals)})" if vals else "-"
        dhcp_rows.append([label, cell("do_avg_ms"), cell("do_max_ms"), cell("ra_avg_ms"), cell("ra_max_ms"), cell("drop_pct")])
    loads_txt = "; ".join(f"{x['when']}: load {x['load1']:.2f} {x['load5']:.2f} {x['load15']:.2f}, CPUs {x['busy_pct']} % busy"
                          for x in loads)
    failures = [f"{r.server} {r.test} repeat {r.repeat}: {r.error}" for r in runs if r.error]
    return "\n".join([
        f"{args.repeats} repeats, server order alternating; MB/s = 10^6 bytes/s of response bodies, all downloads together; "
        "ratio = rackboot median / nginx median (goal: >= 0.9).",
        f"Machine: {loads_txt}.",
        f"rackboot: {code_description(args.rackboot_commit)}.",
        "",
        markdown_table(headers, rows),
        "",
        f"rackboot's DHCP meanwhile (perfdhcp -r {args.dhcp_rate}, relayed; ms, median (runs); goal: answers within 5 ms):",
        "",
        markdown_table(["during", "DISCOVER-OFFER avg", "DISCOVER-OFFER max", "REQUEST-ACK avg", "REQUEST-ACK max", "unanswered %"],
                       dhcp_rows),
    ] + (["", "Failures: " + " | ".join(failures)] if failures else []))


def main(argv: list[str] | None = None) -> int:
    """Run the HTTP benchmark and print a markdown report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrent", type=int, default=200, help="downloads at once in the many and range tests")
    ap.add_argument("--tests", default=",".join(TESTS), help="comma-separated, from: " + ", ".join(TESTS))
    ap.add_argument("--servers", default=",".join(SERVERS), help="comma-separated, from: " + ", ".join(SERVERS))
    ap.add_argument("--many-mib", type=int, default=64, help="size of the file downloaded concurrently")
    ap.add_argument("--big-mib", type=int, default=1024, help="size of the file downloaded alone")
    ap.add_argument("--dhcp-rate", type=int, default=50, help="perfdhcp exchanges/s beside rackboot's downloads (0: none)")
    ap.add_argument("--idle-s", type=float, default=5.0, help="seconds of the idle DHCP probe per repeat")
    ap.add_argument("--timeout", type=float, default=600, help="give up on one download set after this many seconds")
    ap.add_argument("--big-times", type=int, default=8,
                    help="the big test fetches the big file this many times, one after another (times summed)")
    ap.add_argument("--profile-out", help="py-spy rackboot during the first run of --profile-test, raw stacks to this file")
    ap.add_argument("--profile-test", default="many", choices=TESTS, help="the test --profile-out profiles")
    ap.add_argument("--rackboot", default=None, help="rackboot executable (default: the one next to this Python)")
    ap.add_argument("--rackboot-commit", default=None,
                    help="measure this git commit of rackboot (exported to a temp dir) instead of the installed checkout")
    ap.add_argument("--json", help="also write every run as JSON to this file")
    ap.add_argument("--fetch", action="store_true", help=argparse.SUPPRESS)  # internal: the client, in its namespace
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.fetch:
        return fetch_in_namespace(args)
    args.tests = [t.strip() for t in args.tests.split(",") if t.strip()]
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not args.tests or any(t not in TESTS for t in args.tests):
        ap.error(f"--tests: choose from {', '.join(TESTS)}")
    if not args.servers or any(s not in SERVERS for s in args.servers):
        ap.error(f"--servers: choose from {', '.join(SERVERS)}")
    require_root_and_tools(["ss", "pgrep"] + (["nginx"] if "nginx" in args.servers else [])
                           + (["perfdhcp"] if args.dhcp_rate and "rackboot" in args.servers else []))
    exit_cleanly_on_sigterm()
    return with_rackboot(args, "rackboot" in args.servers, measure_and_report)


def measure_and_report(args: argparse.Namespace, rackboot: list[str]) -> int:
    """Build the namespaces and the files, run every measurement, print the report."""
    loads = [dict(machine_load(), when="start")]
    say(f"machine at start: {loads[0]['uptime']} (CPUs {loads[0]['busy_pct']} % busy)")
    runs: list[Run] = []
    idles: list[dict[str, Any]] = []
    with NamespacePair(f"{SERVER_IP}/{PREFIXLEN}", f"{CLIENT_IP}/{PREFIXLEN}") as pair, \
            ScratchDir(prefix="rackboot-bench-http-", dir="/var/tmp") as tmpname:
        tmp = Path(tmpname)
        tmp.chmod(0o755)  # nginx's workers read the files as user nobody
        root = tmp / "files"
        root.mkdir(mode=0o755)
        say(f"writing {args.many_mib} MiB and {args.big_mib} MiB of random data under {root}")
        files = make_files(root, args.many_mib, args.big_mib)
        say(f"namespaces {pair.server} (server) and {pair.client} (client)")
        profile = Path(args.profile_out).resolve() if args.profile_out else None
        for repeat in range(1, args.repeats + 1):
            order = args.servers if repeat % 2 else list(reversed(args.servers))
            for kind in order:
                say(f"repeat {repeat}/{args.repeats}: {kind}")
                with HttpServer(kind, pair.ensure(), pair.server, root, rackboot) as server:
                    check = run_downloads(pair.ensure(), pair.client, check_downloads(root, files), tmp / "spec.json", args.timeout)
                    if check.get("failed") or check.get("seconds") is None:
                        raise RuntimeError(f"{kind}: the checked downloads failed: {check.get('errors')}")
                    say(f"  {kind}: whole files and 3 ranges checked (SHA-256)")
                    if kind == "rackboot" and args.dhcp_rate:
                        idles.append(idle_dhcp(pair, tmp, args))
                    for test in args.tests:
                        spy_here = profile if (kind == "rackboot" and test == args.profile_test and repeat == 1) else None
                        runs.append(measure_one(pair, server, test, repeat, files, tmp, args, spy_here))
            loads.append(dict(machine_load(), when=f"after repeat {repeat}"))
        rebuilt = pair.rebuilt
    text = report(runs, idles, args, loads, files)
    if profile is not None and profile.exists():
        text += "\n\n" + pyspy_summary(profile, f"py-spy on rackboot during the first `{args.profile_test}` run")
    if rebuilt:
        text += f"\n\nThe namespace pair vanished and was rebuilt {rebuilt} time(s) during the run (not by this script)."
    print(text)
    write_json(args.json, {"args": vars(args), "loads": loads, "idle_dhcp": idles, "runs": [asdict(r) for r in runs], "report": text})
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        say("interrupted; namespaces, servers and files removed")
        sys.exit(130)
