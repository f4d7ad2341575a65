#!/usr/bin/env python3
"""TFTP benchmark: one 30 MiB file, 200 concurrent fetches, rackboot vs tftpd-hpa, same clients (atftp, tftp-hpa, curl).

Topology (made with vmtestbed.netns.Lab through measure.NamespacePair, removed on success, failure, Ctrl-C):

    [PREFIX-srv] s0 10.98.0.1/24  ==veth==  c0 10.98.0.2/24 [PREFIX-cli]
     rackboot serve / in.tftpd -L             atftp processes, started by this script re-run
                                              inside the namespace (so its start-up is not timed)

The clients are atftp, tftp-hpa's `tftp` (RFC 1350 only: blksize 512, lock-step) and curl, one process
per transfer, the same for both servers. Variants are client + option sets: blksize 1468 for both
(fills a 1500-byte MTU), and for rackboot also blksize 1468 with windowsize (RFC 7440; tftpd-hpa does
not implement it and answers without it, so those rows are compared with tftpd-hpa's lock-step row of
the same client). With --loss P, nftables rules on both ends of the veth (netdev ingress of s0 and c0,
in the namespaces this script made; this kernel has no sch_netem) drop a fraction P of the UDP frames
in each direction during the timed fetches; they go with the namespaces. Each server is
started fresh for each repeat, every file is fetched once untimed (warm caches for both), then
each variant is timed. The concurrent fetches all read the same file (1 MiB, or a copy of
/usr/lib/ipxe/snponly.efi for the `nbp` test), as 200 nodes booting the same program do. Every received file is checked (size and SHA-256) after the timing.
Repeats alternate the server order; figures are medians, ratios are tftpd-hpa time / rackboot time.

Run (as root, after ./setup.sh --bench):  .venv/bin/python bench/tftp_bench.py
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import (  # noqa: E402
    code_description, exit_cleanly_on_sigterm, fmt, machine_load, markdown_table, median, NamespacePair,
    require_root_and_tools, say, ScratchDir, stop, tree_cpu_seconds, udp_port_bound, wait_until, with_rackboot, write_json,
)
from vmtestbed.netns import Lab  # noqa: E402

SERVER_IP = "10.98.0.1"
CLIENT_IP = "10.98.0.2"
BIG = ("big.bin", 30 << 20)
SMALL = ("small.bin", 1 << 20)
LOSS_TABLE = "rackboot_bench_loss"

NBP = ("snponly.efi", 0)  # size taken from /usr/lib/ipxe/snponly.efi (or a random 173,792 bytes without it)
CLIENTS = ("atftp", "tftp", "curl")


@dataclass(frozen=True)
class Variant:
    """One server, one client and its options; `peer` names the tftpd-hpa variant it is compared with."""

    server: str
    client: str
    options: tuple[str, ...] = ()
    peer: str = ""


def _variants() -> dict[str, Variant]:
    out: dict[str, Variant] = {}
    for client, sets in (("atftp", [("blksize 1468",), ("blksize 1468", "windowsize 4"), ("blksize 1468", "windowsize 16"), ()]),
                         ("tftp", [()]), ("curl", [("blksize 1468",)])):
        for options in sets:
            plain = tuple(o for o in options if not o.startswith("windowsize"))
            label = " ".join(options) or "blksize 512"
            peer = f"tftpd-hpa {client} " + (" ".join(plain) or "blksize 512")
            if not any(o.startswith("windowsize") for o in options):
                out[peer] = Variant("tftpd-hpa", client, options)
            out[f"rackboot {client} {label}"] = Variant("rackboot", client, options, peer)
    return out


# name -> server, client, options, peer; e.g. "rackboot atftp blksize 1468 windowsize 4"
VARIANTS = _variants()
DEFAULT_VARIANTS = [v for v in VARIANTS if VARIANTS[v].client == "atftp" and "512" not in v]
TESTS = ("big", "many", "nbp")


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
    each_median: float | None = None  # the median fetch's own time (from the common start to its end)
    dropped: int = 0  # frames the loss rules dropped during this fetch set
    causes: dict[str, int] | None = None  # why fetches failed: the clients' last stderr lines, rackboot's give-up reasons


def client_argv(client: str, options: list[str], server: str, file: str, dest: Path) -> list[str]:
    """The command line that fetches file from server into dest with one of CLIENTS and its options."""
    if client == "atftp":
        return ["atftp", *[a for opt in options for a in ("--option", opt)], "-g", "-r", file, "-l", str(dest), server, "69"]
    if client == "tftp":  # tftp-hpa: RFC 1350 only (blksize 512, lock-step)
        return ["tftp", "-m", "binary", server, "-c", "get", file, str(dest)]
    blksize = [o.split()[1] for o in options if o.startswith("blksize")]
    return ["curl", "-sS", "--fail", *(["--tftp-blksize", blksize[0]] if blksize else []), "-o", str(dest), f"tftp://{server}/{file}"]


def fetch_in_namespace(args: argparse.Namespace) -> int:
    """(Runs inside the client namespace.) Start N fetches at once, wait for all; print JSON timing."""
    out = Path(args.out)
    t0 = time.monotonic()
    procs = {}
    for i in range(args.count):
        with open(out / f"{i}.stderr", "wb") as err:  # kept as evidence when the fetch fails
            p = subprocess.Popen(client_argv(args.client, args.option, args.server, args.file, out / f"{i}"),
                                 stdout=subprocess.DEVNULL, stderr=err)
        procs[p.pid] = (i, p)
    each, failed, clients = [], 0, []
    while procs:
        pid, status = os.wait()  # reaps in the order they end: each fetch's own time
        found = procs.pop(pid, None)
        if found is None:
            continue
        end = time.monotonic() - t0
        each.append(end)
        code = os.waitstatus_to_exitcode(status)
        failed += code != 0
        clients.append({"i": found[0], "exit": code, "end_s": round(end, 3)})
    elapsed = time.monotonic() - t0
    print(json.dumps({"seconds": elapsed, "failed": failed, "errors": [f"{failed} client(s) exited non-zero"] if failed else [],
                      "each_median": sorted(each)[len(each) // 2] if each else None, "clients": clients}))
    return 0


def loss_ruleset(device: str, fraction: float) -> str:
    """nft script: drop `fraction` of the UDP frames entering `device` (netdev ingress), replacing an earlier table."""
    per_million = round(fraction * 1_000_000)
    rule = f"        meta l4proto udp numgen random mod 1000000 < {per_million} counter drop" if per_million else ""
    return "\n".join([f"add table netdev {LOSS_TABLE}", f"delete table netdev {LOSS_TABLE}", f"table netdev {LOSS_TABLE} {{",
                      "    chain ingress {", f'        type filter hook ingress device "{device}" priority 0; policy accept;',
                      rule, "    }", "}", ""])


def set_loss(pair: NamespacePair, fraction: float) -> None:
    """Drop `fraction` of the UDP frames in each direction on the pair's veth (0: remove the rules)."""
    for ns, dev in ((pair.server, "s0"), (pair.client, "c0")):
        script = loss_ruleset(dev, fraction) if fraction else f"add table netdev {LOSS_TABLE}\ndelete table netdev {LOSS_TABLE}\n"
        done = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"nft in {ns}: {done.stderr.strip()}")


def dropped(pair: NamespacePair) -> int:
    """Frames the loss rules dropped so far, both directions."""
    total = 0
    for ns in (pair.server, pair.client):
        done = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "table", "netdev", LOSS_TABLE], capture_output=True, text=True)
        total += sum(int(n) for n in re.findall(r"counter packets (\d+)", done.stdout))
    return total


class TftpServer:
    """rackboot serve (DHCP off) or in.tftpd in the server namespace, serving ROOT."""

    def __init__(self, kind: str, lab: Lab, ns: str, root: Path, rackboot: list[str], tftp_keys: tuple[str, ...] = (),
                 keep_log: Path | None = None) -> None:
        self.kind, self.lab, self.ns, self.root, self.rackboot = kind, lab, ns, root, rackboot
        self.tftp_keys = tftp_keys  # extra `key: value` lines of rackboot's tftp section
        self.keep_log = keep_log  # where the server's log is copied when it stops
        self.proc: subprocess.Popen[bytes] | None = None
        self._tmp: ScratchDir | None = None
        self.log: Path | None = None

    def log_size(self) -> int:
        """The server log's size now (an offset for failures_since)."""
        return self.log.stat().st_size if self.log is not None and self.log.exists() else 0

    def failures_since(self, offset: int) -> list[str]:
        """rackboot's log lines for transfers that failed (with their reason), written after offset."""
        if self.kind != "rackboot" or self.log is None or not self.log.exists():
            return []
        with open(self.log, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
        return [line for line in text.splitlines() if "rackboot.tftp: " in line and " failed: " in line]

    def __enter__(self) -> "TftpServer":
        self._tmp = ScratchDir(prefix=f"rackboot-bench-{self.kind}-")
        tmp = Path(self._tmp.name)
        log = self.log = tmp / "server.log"
        if self.kind == "rackboot":
            (tmp / "nodes.yaml").write_text('nodes:\n  - name: node-1\n    mac: "52:54:00:98:00:01"\n    ip: 10.98.0.11\n')
            (tmp / "files").mkdir()
            (tmp / "rackboot.yaml").write_text(
                f"interface: s0\naddress: {SERVER_IP}/24\nstate_dir: {tmp / 'state'}\nhttp_port: 8080\n"
                f"inventory: nodes.yaml\ndhcp:\n  mode: 'off'\n  router_advertisements: false\n"
                f"tftp:\n  root: {self.root}\n  max_sessions_per_host: 4096\n"
                + "".join(f"  {key}\n" for key in self.tftp_keys) + f"http:\n  files: {tmp / 'files'}\ndns:\n  domain: bench.test\n"
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
        if self.keep_log is not None and self.log is not None and self.log.exists():
            self.keep_log.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.log, self.keep_log)
        if self._tmp is not None:
            self._tmp.cleanup()


def sha256(path: Path) -> str:
    """SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def failure_causes(clients: list[dict[str, Any]], bad: set[int], out: Path, server_lines: list[str],
                   keep: Path | None) -> dict[str, int]:
    """Why the fetches of one set failed, counted: each failed client's last stderr line, rackboot's give-up reasons.

    With keep, the failed clients' stderr and the server's failure lines of the set are copied there."""
    causes: collections.Counter[str] = collections.Counter()
    if keep is not None and (bad or server_lines or clients):
        keep.mkdir(parents=True, exist_ok=True)
    for c in clients:
        if c["i"] not in bad:
            continue
        err = out / f"{c['i']}.stderr"
        text = err.read_text(errors="replace") if err.exists() else ""
        # atftp ends every failure with "tftp: aborting": its line before that says why.
        lines = [line.strip() for line in text.splitlines() if line.strip() and line.strip() != "tftp: aborting"]
        last = re.sub(r"\d+", "#", lines[-1])[:120] if lines else "(no stderr)"
        causes[f"client exit {c['exit']}: {last}" if c["exit"] else "client exit 0, file wrong (size or SHA-256)"] += 1
        if keep is not None:
            (keep / f"client-{c['i']}.stderr").write_text(f"exit {c['exit']} after {c['end_s']} s\n{text}")
    for line in server_lines:
        # "tftp: snponly.efi to 10.98.0.2:40000 failed: timeout: no ACK for 7 s (2 retransmissions) of block 1"
        reason = line.split(" failed: ", 1)[1].strip()
        reason = re.sub(r"of block (\d+)", lambda m: m.group(0) if int(m.group(1)) <= 1 else "of a later block", reason)
        causes[f"server gave up: {reason}"] += 1
    if keep is not None and server_lines:
        (keep / "server-failures.log").write_text("".join(line + "\n" for line in server_lines))
    if keep is not None and clients:
        # Every client's exit status and end (seconds from the common start), slowest first; the slowest
        # successful fetches' stderr too (what the wall time waited for).
        keep.mkdir(parents=True, exist_ok=True)
        slowest = sorted(clients, key=lambda c: -c["end_s"])
        (keep / "clients.json").write_text("".join(json.dumps(c) + "\n" for c in slowest))
        for c in [c for c in slowest if c["i"] not in bad][:3]:
            err = out / f"{c['i']}.stderr"
            text = err.read_text(errors="replace") if err.exists() else ""
            (keep / f"slow-client-{c['i']}.stderr").write_text(f"exit {c['exit']} after {c['end_s']} s\n{text}")
    return dict(causes)


def timed_fetch(lab: Lab, client_ns: str, server: TftpServer, file: tuple[str, int], digest: str, count: int,
                variant: Variant, out: Path, timeout: float, keep: Path | None = None,
                ) -> tuple[float | None, int, int, float | None, str, float | None, dict[str, int]]:
    """Fetch a file count times at once from the client namespace.

    Return seconds, ok, failed, server CPU s, error, median fetch and the failures' causes (failure_causes())."""
    log_at = server.log_size()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    argv = [sys.executable, str(Path(__file__).resolve()), "--fetch", "--server", SERVER_IP, "--file", file[0],
            "--count", str(count), "--out", str(out), "--client", variant.client]
    for opt in variant.options:
        argv += ["--option", opt]
    assert server.proc is not None
    cpu0 = tree_cpu_seconds(server.proc.pid)
    try:
        res = lab.run(client_ns, argv, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, 0, count, None, f"no result after {timeout:.0f} s", None, {}
    # in.tftpd forks a child per transfer and lets the kernel reap it (SIGCHLD SIG_IGN + SA_NOCLDWAIT),
    # so the children's CPU time is lost to /proc: only rackboot's (one process) is reported.
    cpu = tree_cpu_seconds(server.proc.pid) - cpu0 if server.proc.poll() is None and server.kind == "rackboot" else None
    try:
        data = json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return None, 0, count, cpu, f"fetcher failed: {res.stderr.strip()[-300:]}", None, {}
    good = {i for i in range(count) if (out / str(i)).exists() and (out / str(i)).stat().st_size == file[1]
            and sha256(out / str(i)) == digest}
    bad = {c["i"] for c in data.get("clients", []) if c["exit"] != 0} | (set(range(count)) - good)
    causes = failure_causes(data.get("clients", []), bad, out, server.failures_since(log_at), keep)
    error = "; ".join(data["errors"][:2])
    if server.proc.poll() is not None:
        error = f"server exited with status {server.proc.returncode}; " + error
    shutil.rmtree(out, ignore_errors=True)
    return data["seconds"], len(good), count - len(good), cpu, error, data.get("each_median"), causes


def test_label(test: str, args: argparse.Namespace, files: dict[str, tuple[str, int]]) -> str:
    """A column title for one test."""
    if test == "big":
        return "30 MiB x 1"
    what = "1 MiB" if test == "many" else "snponly.efi"
    return f"{what} x {args.concurrent} at once"


def report(timings: list[Timing], args: argparse.Namespace, loads: list[dict[str, Any]], files: dict[str, tuple[str, int]]) -> str:
    """Markdown: median seconds per variant and test, MB/s, server CPU, ratio against its tftpd-hpa peer (same client)."""
    tests = [(test_label(t, args, files), t) for t in args.tests]
    med: dict[tuple[str, str], float | None] = {}
    rows = []
    for variant in args.variants:
        row = [variant]
        for label, test in tests:
            mine = [t for t in timings if t.variant == variant and t.test == test]
            # Under loss a peer's clients may give up: its wall time still counts, with the failures beside it.
            good = [t for t in mine if t.seconds is not None and (t.failed == 0 or args.loss)]
            secs = median([t.seconds for t in good])  # type: ignore[misc]
            med[(variant, test)] = secs
            size = files[test][1] * (1 if test == "big" else args.concurrent)
            cpu = median([t.server_cpu_s for t in good if t.server_cpu_s is not None])  # type: ignore[misc]
            each = median([t.each_median for t in good if t.each_median is not None])  # type: ignore[misc]
            fails = sum(t.failed for t in mine)
            runs = " / ".join(fmt(t.seconds, 2) + (f" ({t.failed} failed)" if t.failed else "")
                              if t.seconds is not None and (t.failed == 0 or args.loss) else "fail" for t in mine)
            row += [fmt(secs, 2) + f" ({runs})", fmt(each, 2), fmt(size / secs / 1e6 if secs else None, 1), fmt(cpu, 2),
                    str(fails)]
        rows.append(row)
    for row, variant in zip(rows, args.variants):
        peer = VARIANTS[variant].peer
        for label, test in tests:
            mine, theirs = med.get((variant, test)), med.get((peer, test))
            row.append("-" if not peer or not mine or not theirs else f"{theirs / mine:.2f}")
    headers = ["variant"]
    for label, _ in tests:
        headers += [f"{label}: s, median (runs)", "median fetch s", "MB/s", "server CPU s", "failed fetches"]
    headers += [f"speed-up vs tftpd-hpa, {label}" for label, _ in tests]
    loads_txt = "; ".join(f"{l['when']}: load {l['load1']:.2f} {l['load5']:.2f} {l['load15']:.2f}, CPUs {l['busy_pct']} % busy" for l in loads)
    lost = sum(t.dropped for t in timings)
    causes = []
    for variant in args.variants:
        counted: collections.Counter[str] = collections.Counter()
        for t in timings:
            if t.variant == variant:
                counted.update(t.causes or {})
        causes += [f"- {variant}: {n} x {cause}" for cause, n in counted.most_common()]
    evidence = f"Evidence (server logs, failed clients' stderr): {args.evidence}." if getattr(args, "evidence", None) else ""
    return "\n".join([
        f"{args.repeats} repeats, server order alternating; speed-up = the tftpd-hpa peer's median time (same client, "
        "same blksize, no windowsize) / this variant's median time (>1: rackboot faster)."
        + (f" Loss: {args.loss:.0%} of UDP frames dropped each way ({lost} frames dropped in all)." if args.loss else ""),
        f"Machine: {loads_txt}.",
        f"rackboot: {code_description(args.rackboot_commit)}" + (f", tftp config: {'; '.join(args.rackboot_tftp)}" if args.rackboot_tftp else "") + ".",
        "",
        markdown_table(headers, rows),
        *(["", "Why fetches failed (clients' last stderr line; rackboot's logged give-up reasons, which may be "
           "transfers a client had already restarted):", *causes] if causes else []),
        *(["", evidence] if evidence else []),
    ])


def main(argv: list[str] | None = None) -> int:
    """Run the TFTP benchmark and print a markdown report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrent", type=int, default=200, help="how many fetches run at once in the many/nbp tests")
    ap.add_argument("--tests", default="big,many", help="comma-separated, from: " + ", ".join(TESTS))
    ap.add_argument("--loss", type=float, default=0.0, help="fraction of UDP frames dropped in each direction (nftables)")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help="comma-separated, from: " + ", ".join(VARIANTS))
    ap.add_argument("--timeout", type=float, default=600, help="give up on one timed fetch set after this many seconds")
    ap.add_argument("--rackboot", default=None, help="rackboot executable (default: the one next to this Python)")
    ap.add_argument("--rackboot-commit", default=None,
                    help="measure this git commit of rackboot (exported to a temp dir) instead of the installed checkout")
    ap.add_argument("--rackboot-tftp", action="append", default=[], metavar="KEY: VALUE",
                    help="a line for rackboot's tftp config section, e.g. 'data_workers: 0' (repeatable)")
    ap.add_argument("--json", help="also write every timing as JSON to this file")
    ap.add_argument("--evidence", default=None, metavar="DIR",
                    help="keep the servers' logs and the failed fetches' stderr here (default: a new "
                         "/var/tmp/rackboot-tftp-bench-UTCTIME directory)")
    # Internal: what the script runs inside the client namespace.
    ap.add_argument("--fetch", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--server", help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--client", default="atftp", choices=CLIENTS, help=argparse.SUPPRESS)
    ap.add_argument("--option", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.fetch:
        return fetch_in_namespace(args)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants: {unknown}")
    args.tests = [t.strip() for t in args.tests.split(",") if t.strip()]
    if not args.tests or any(t not in TESTS for t in args.tests):
        ap.error(f"--tests: choose from {', '.join(TESTS)}")
    if not 0.0 <= args.loss < 1.0:
        ap.error("--loss must be in [0, 1)")
    kinds = sorted({VARIANTS[v].server for v in args.variants}, reverse=True)  # tftpd-hpa first, then rackboot
    clients = sorted({VARIANTS[v].client for v in args.variants})
    require_root_and_tools(clients + ["ss"] + (["in.tftpd"] if "tftpd-hpa" in kinds else []) + (["nft"] if args.loss else []))
    exit_cleanly_on_sigterm()
    return with_rackboot(args, "rackboot" in kinds, measure_and_report)


def measure_and_report(args: argparse.Namespace, rackboot: list[str]) -> int:
    """Build the namespaces, run every measurement, print the report."""
    kinds = sorted({VARIANTS[v].server for v in args.variants}, reverse=True)

    evidence = Path(args.evidence or time.strftime("/var/tmp/rackboot-tftp-bench-%Y%m%d-%H%M%S", time.gmtime()))
    evidence.mkdir(parents=True, exist_ok=True)
    args.evidence = str(evidence)
    say(f"evidence (server logs, failed clients' stderr): {evidence}")
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
        nbp = Path("/usr/lib/ipxe/snponly.efi")
        contents = {BIG[0]: rng.randbytes(BIG[1]), SMALL[0]: rng.randbytes(SMALL[1]),
                    NBP[0]: nbp.read_bytes() if nbp.is_file() else rng.randbytes(173_792)}
        files = {"big": BIG, "many": SMALL, "nbp": (NBP[0], len(contents[NBP[0]]))}
        digests = {}
        for name, data in contents.items():
            (root / name).write_bytes(data)
            (root / name).chmod(0o644)
            digests[name] = sha256(root / name)
        out = Path(outname)
        say(f"namespaces {pair.server} (server) and {pair.client} (clients)")
        for repeat in range(1, args.repeats + 1):
            order = kinds if repeat % 2 else list(reversed(kinds))
            for kind in order:
                say(f"repeat {repeat}/{args.repeats}: {kind}")
                lab = pair.ensure()
                client_ns = pair.client
                with TftpServer(kind, lab, pair.server, root, rackboot, tuple(args.rackboot_tftp),
                                keep_log=evidence / f"repeat{repeat}-{kind}-server.log") as server:
                    set_loss(pair, 0.0)
                    for test in args.tests:  # warm-up, untimed, without loss
                        name, size = files[test]
                        timed_fetch(lab, client_ns, server, (name, size), digests[name], 1, Variant(kind, "atftp", ("blksize 1468",)),
                                    out / "warm", args.timeout)
                    for variant in [v for v in args.variants if VARIANTS[v].server == kind]:
                        for test in args.tests:
                            file = files[test]
                            count = 1 if test == "big" else args.concurrent
                            load = machine_load(0.5)
                            set_loss(pair, args.loss)
                            before = dropped(pair) if args.loss else 0
                            try:
                                keep = evidence / f"repeat{repeat}-{variant.replace(' ', '-')}-{test}"
                                secs, ok, failed, cpu, error, each, causes = timed_fetch(
                                    lab, client_ns, server, file, digests[file[0]], count, VARIANTS[variant], out / "got", args.timeout,
                                    keep)
                                lost = dropped(pair) - before if args.loss else 0
                            finally:
                                set_loss(pair, 0.0)
                            if not pair.intact():
                                error = error or "the namespaces vanished during the fetch (removed by someone else?)"
                            t = Timing(variant, test, repeat, secs, ok, failed, cpu, load["load1"], load["busy_pct"], error, each, lost,
                                       causes)
                            timings.append(t)
                            say(f"  {variant:44s} {test:4s}: {fmt(secs, 2)} s (median fetch {fmt(each, 2)} s), {ok} ok, {failed} failed, "
                                f"server CPU {fmt(cpu, 2)} s, load {t.load1} busy {t.busy_pct} %"
                                + (f", {lost} frames dropped" if args.loss else "")
                                + (f" [{error[:300]}]" if error else "")
                                + "".join(f"\n    {n} x {cause}" for cause, n in sorted((causes or {}).items(), key=lambda kv: -kv[1])))
            loads.append(dict(machine_load(), when=f"after repeat {repeat}"))
        rebuilt = pair.rebuilt
    text = report(timings, args, loads, files)
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
