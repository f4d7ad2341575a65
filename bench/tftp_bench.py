#!/usr/bin/env python3
"""TFTP benchmark: one 30 MiB file, then 200 concurrent 1 MiB fetches, rackboot vs tftpd-hpa, same client (atftp).

Topology (made with vmtestbed.netns.Lab through measure.NamespacePair, removed on success, failure, Ctrl-C):

    [PREFIX-srv] s0 10.98.0.1/24  ==veth==  c0 10.98.0.2/24 [PREFIX-cli]
     rackboot serve / in.tftpd -L             atftp processes, started by this script re-run
                                              inside the namespace (so its start-up is not timed)

The client is atftp (C, one process per transfer) for both servers. Variants are client option
sets: blksize 1468 for both (fills a 1500-byte MTU), and for rackboot also blksize 1468 with
windowsize (RFC 7440; tftpd-hpa does not implement it and answers without it). Each server is
started fresh for each repeat, every file is fetched once untimed (warm caches for both), then
each variant is timed. The 200 concurrent fetches all read the same 1 MiB file, as 200 nodes
booting the same program do. Every received file is checked (size and SHA-256) after the timing.
Repeats alternate the server order; figures are medians, ratios are tftpd-hpa time / rackboot time.

Run (as root, after ./setup.sh --bench):  .venv/bin/python bench/tftp_bench.py
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import (  # noqa: E402
    code_description, cpu_seconds, exit_cleanly_on_sigterm, fmt, machine_load, markdown_table, median, rackboot_command,
    NamespacePair, ScratchDir, require_root_and_tools, resolve_commit, say, stop, udp_port_bound, wait_until, write_json,
)
from vmtestbed.netns import Lab  # noqa: E402

SERVER_IP = "10.98.0.1"
CLIENT_IP = "10.98.0.2"
BIG = ("big.bin", 30 << 20)
SMALL = ("small.bin", 1 << 20)

# name -> (server, atftp --option values)
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "tftpd-hpa blksize 1468": ("tftpd-hpa", ("blksize 1468",)),
    "rackboot blksize 1468": ("rackboot", ("blksize 1468",)),
    "rackboot blksize 1468 windowsize 4": ("rackboot", ("blksize 1468", "windowsize 4")),
    "rackboot blksize 1468 windowsize 16": ("rackboot", ("blksize 1468", "windowsize 16")),
    "tftpd-hpa blksize 512": ("tftpd-hpa", ()),
    "rackboot blksize 512": ("rackboot", ()),
}
DEFAULT_VARIANTS = [v for v in VARIANTS if "512" not in v]


@dataclass
class Timing:
    """One timed fetch set (1 x 30 MiB, or N x 1 MiB at once) against one server."""

    variant: str
    test: str
    repeat: int
    seconds: float | None = None
    ok: int = 0
    failed: int = 0
    server_cpu_s: float | None = None
    load1: float | None = None
    busy_pct: float | None = None
    error: str = ""


def fetch_in_namespace(args: argparse.Namespace) -> int:
    """(Runs inside the client namespace.) Start N atftp fetches at once, wait for all; print JSON timing."""
    options: list[str] = []
    for opt in args.option:
        options += ["--option", opt]
    out = Path(args.out)
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(["atftp", *options, "-g", "-r", args.file, "-l", str(out / f"{i}"), args.server, "69"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for i in range(args.count)
    ]
    errors = []
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            errors.append(err.decode(errors="replace").strip()[-200:])
    elapsed = time.monotonic() - t0
    print(json.dumps({"seconds": elapsed, "failed": len(errors), "errors": errors[:5]}))
    return 0


class TftpServer:
    """rackboot serve (DHCP off) or in.tftpd in the server namespace, serving ROOT."""

    def __init__(self, kind: str, lab: Lab, ns: str, root: Path, rackboot: list[str]) -> None:
        self.kind, self.lab, self.ns, self.root, self.rackboot = kind, lab, ns, root, rackboot
        self.proc: subprocess.Popen[bytes] | None = None
        self._tmp: ScratchDir | None = None

    def __enter__(self) -> "TftpServer":
        self._tmp = ScratchDir(prefix=f"rackboot-bench-{self.kind}-")
        tmp = Path(self._tmp.name)
        log = tmp / "server.log"
        if self.kind == "rackboot":
            (tmp / "nodes.yaml").write_text('nodes:\n  - name: node-1\n    mac: "52:54:00:98:00:01"\n    ip: 10.98.0.11\n')
            (tmp / "files").mkdir()
            (tmp / "rackboot.yaml").write_text(
                f"interface: s0\naddress: {SERVER_IP}/24\nstate_dir: {tmp / 'state'}\nhttp_port: 8080\n"
                f"inventory: nodes.yaml\ndhcp:\n  mode: 'off'\n  router_advertisements: false\n"
                f"tftp:\n  root: {self.root}\n  max_sessions_per_host: 4096\nhttp:\n  files: {tmp / 'files'}\ndns:\n  domain: bench.test\n"
            )
            argv = [*self.rackboot, "serve", "--config", str(tmp / "rackboot.yaml")]
            ready = (tmp / "state" / "serve.ready").exists
        else:
            # -L: foreground listener; -s: chroot to ROOT; runs transfers as user nobody.
            argv = ["in.tftpd", "-L", "-s", str(self.root), "-a", f"{SERVER_IP}:69"]
            ready = lambda: udp_port_bound(self.lab, self.ns, 69)  # noqa: E731
        with open(log, "wb") as fh:
            self.proc = self.lab.popen(self.ns, argv, stdout=fh, stderr=subprocess.STDOUT)
        wait_until(ready, self.proc, self.kind, log)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop(self.proc)
        if self._tmp is not None:
            self._tmp.cleanup()


def sha256(path: Path) -> str:
    """SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def timed_fetch(lab: Lab, client_ns: str, server: TftpServer, file: tuple[str, int], digest: str, count: int,
                options: tuple[str, ...], out: Path, timeout: float) -> tuple[float | None, int, int, float | None, str]:
    """Fetch a file count times at once from the client namespace; return seconds, ok, failed, server CPU s, error."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    argv = [sys.executable, str(Path(__file__).resolve()), "--fetch", "--server", SERVER_IP, "--file", file[0],
            "--count", str(count), "--out", str(out)]
    for opt in options:
        argv += ["--option", opt]
    assert server.proc is not None
    cpu0 = cpu_seconds(server.proc.pid)
    try:
        res = lab.run(client_ns, argv, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, 0, count, None, f"no result after {timeout:.0f} s"
    # in.tftpd forks a child per transfer and lets the kernel reap it (SIGCHLD SIG_IGN + SA_NOCLDWAIT),
    # so the children's CPU time is lost to /proc: only rackboot's (one process) is reported.
    cpu = cpu_seconds(server.proc.pid) - cpu0 if server.proc.poll() is None and server.kind == "rackboot" else None
    try:
        data = json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return None, 0, count, cpu, f"fetcher failed: {res.stderr.strip()[-300:]}"
    ok = sum(1 for i in range(count) if (out / str(i)).exists() and (out / str(i)).stat().st_size == file[1]
             and sha256(out / str(i)) == digest)
    error = "; ".join(data["errors"][:2])
    if server.proc.poll() is not None:
        error = f"server exited with status {server.proc.returncode}; " + error
    shutil.rmtree(out, ignore_errors=True)
    return data["seconds"], ok, count - ok, cpu, error


def report(timings: list[Timing], args: argparse.Namespace, loads: list[dict[str, Any]]) -> str:
    """Markdown: median seconds per variant and test, MB/s, server CPU, ratio against tftpd-hpa at the same blksize."""
    tests = [("30 MiB x 1", "big"), (f"1 MiB x {args.concurrent} at once", "many")]
    med: dict[tuple[str, str], float | None] = {}
    rows = []
    for variant in args.variants:
        row = [variant]
        for label, test in tests:
            mine = [t for t in timings if t.variant == variant and t.test == test]
            good = [t for t in mine if t.failed == 0 and t.seconds is not None]
            secs = median([t.seconds for t in good])  # type: ignore[misc]
            med[(variant, test)] = secs
            size = BIG[1] if test == "big" else SMALL[1] * args.concurrent
            cpu = median([t.server_cpu_s for t in good if t.server_cpu_s is not None])  # type: ignore[misc]
            fails = sum(t.failed for t in mine)
            runs = " / ".join(fmt(t.seconds, 2) if t.failed == 0 else "fail" for t in mine)
            row += [fmt(secs, 2) + f" ({runs})", fmt(size / secs / 1e6 if secs else None, 1), fmt(cpu, 2),
                    str(fails)]
        rows.append(row)
    for row, variant in zip(rows, args.variants):
        server = VARIANTS[variant][0]
        blk = "512" if "512" in variant else "1468"
        peer = f"tftpd-hpa blksize {blk}"
        for label, test in tests:
            mine, theirs = med.get((variant, test)), med.get((peer, test))
            row.append("-" if server == "tftpd-hpa" or not mine or not theirs else f"{theirs / mine:.2f}")
    headers = ["variant"]
    for label, _ in tests:
        headers += [f"{label}: s, median (runs)", "MB/s", "server CPU s", "failed fetches"]
    headers += [f"speed-up vs tftpd-hpa, {label}" for label, _ in tests]
    loads_txt = "; ".join(f"{l['when']}: load {l['load1']:.2f} {l['load5']:.2f} {l['load15']:.2f}, CPUs {l['busy_pct']} % busy" for l in loads)
    return "\n".join([
        f"atftp --option ... -g; {args.repeats} repeats, server order alternating; "
        "speed-up = tftpd-hpa median time / this variant's median time, same blksize (>1: rackboot faster).",
        f"Machine: {loads_txt}.",
        f"rackboot: {code_description(args.rackboot_commit)}.",
        "",
        markdown_table(headers, rows),
    ])


def main(argv: list[str] | None = None) -> int:
    """Run the TFTP benchmark and print a markdown report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrent", type=int, default=200, help="how many 1 MiB fetches run at once")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help="comma-separated, from: " + ", ".join(VARIANTS))
    ap.add_argument("--timeout", type=float, default=600, help="give up on one timed fetch set after this many seconds")
    ap.add_argument("--rackboot", default=None, help="rackboot executable (default: the one next to this Python)")
    ap.add_argument("--rackboot-commit", default=None,
                    help="measure this git commit of rackboot (exported to a temp dir) instead of the installed checkout")
    ap.add_argument("--json", help="also write every timing as JSON to this file")
    # Internal: what the script runs inside the client namespace.
    ap.add_argument("--fetch", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--server", help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--option", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.fetch:
        return fetch_in_namespace(args)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants: {unknown}")
    kinds = sorted({VARIANTS[v][0] for v in args.variants}, reverse=True)  # tftpd-hpa first, then rackboot
    require_root_and_tools(["atftp", "ss"] + (["in.tftpd"] if "tftpd-hpa" in kinds else []))
    exit_cleanly_on_sigterm()
    args.rackboot_commit = resolve_commit(args.rackboot_commit)
    code_dir = ScratchDir(prefix="rackboot-bench-code-")
    try:
        rackboot = rackboot_command(args.rackboot, args.rackboot_commit, Path(code_dir.name)) if "rackboot" in kinds else []
        return measure_and_report(args, rackboot)
    finally:
        code_dir.cleanup()


def measure_and_report(args: argparse.Namespace, rackboot: list[str]) -> int:
    """Build the namespaces, run every measurement, print the report."""
    kinds = sorted({VARIANTS[v][0] for v in args.variants}, reverse=True)

    loads = [dict(machine_load(), when="start")]
    say(f"machine at start: {loads[0]['uptime']} (CPUs {loads[0]['busy_pct']} % busy)")
    timings: list[Timing] = []
    with NamespacePair(f"{SERVER_IP}/24", f"{CLIENT_IP}/24") as pair, \
            ScratchDir(prefix="rackboot-bench-tftp-") as tmpname, \
            ScratchDir(prefix="rackboot-bench-tftp-out-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as outname:
        tmp = Path(tmpname)
        tmp.chmod(0o755)  # in.tftpd serves as user nobody
        root = tmp / "root"
        root.mkdir(mode=0o755)
        rng = random.Random(7440)
        digests = {}
        for name, size in (BIG, SMALL):
            (root / name).write_bytes(rng.randbytes(size))
            (root / name).chmod(0o644)
            digests[name] = sha256(root / name)
        out = Path(outname)
        say(f"namespaces {pair.server} (server) and {pair.client} (atftp)")
        for repeat in range(1, args.repeats + 1):
            order = kinds if repeat % 2 else list(reversed(kinds))
            for kind in order:
                say(f"repeat {repeat}/{args.repeats}: {kind}")
                lab = pair.ensure()
                client_ns = pair.client
                with TftpServer(kind, lab, pair.server, root, rackboot) as server:
                    for name, size in (BIG, SMALL):  # warm-up, untimed
                        timed_fetch(lab, client_ns, server, (name, size), digests[name], 1, ("blksize 1468",), out / "warm", args.timeout)
                    for variant in [v for v in args.variants if VARIANTS[v][0] == kind]:
                        options = VARIANTS[variant][1]
                        for test, file, count in (("big", BIG, 1), ("many", SMALL, args.concurrent)):
                            load = machine_load(0.5)
                            secs, ok, failed, cpu, error = timed_fetch(
                                lab, client_ns, server, file, digests[file[0]], count, options, out / "got", args.timeout)
                            if not pair.intact():
                                error = error or "the namespaces vanished during the fetch (removed by someone else?)"
                            t = Timing(variant, test, repeat, secs, ok, failed, cpu, load["load1"], load["busy_pct"], error)
                            timings.append(t)
                            say(f"  {variant:38s} {test:4s}: {fmt(secs, 2)} s, {ok} ok, {failed} failed, "
                                f"server CPU {fmt(cpu, 2)} s, load {t.load1} busy {t.busy_pct} %"
                                + (f" [{error[:300]}]" if error else ""))
            loads.append(dict(machine_load(), when=f"after repeat {repeat}"))
        rebuilt = pair.rebuilt
    text = report(timings, args, loads)
    if rebuilt:
        text += f"\n\nThe namespace pair vanished and was rebuilt {rebuilt} time(s) during the run (not by this script)."
    print(text)
    write_json(args.json, {"args": vars(args), "loads": loads, "timings": [asdict(t) for t in timings], "report": text})
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        say("interrupted; namespaces and servers removed")
        sys.exit(130)
