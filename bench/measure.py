"""What every benchmark here records beside its figures: machine load, process CPU time, medians, tables.

The machine is shared and noisy, so the benchmarks compare peers in the same run, interleave them,
repeat, and report medians and ratios; the load seen before each measurement goes with the figures.
"""
from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from vmtestbed.netns import Lab, unique_prefix


class ScratchDir:
    """A temporary directory removed by cleanup() or at the end of a with block, only by the process that made it.

    Not tempfile.TemporaryDirectory: its exit-time finalizer also runs in children that pyroute2
    forks and that exit through the interpreter, which removed our directories mid-run.
    """

    def __init__(self, prefix: str, dir: str | None = None) -> None:
        import tempfile

        self.name = tempfile.mkdtemp(prefix=prefix, dir=dir)
        self._owner = os.getpid()

    def cleanup(self) -> None:
        """Remove the directory (a no-op in any other process, and the second time)."""
        import shutil

        if os.getpid() == self._owner and self.name:
            shutil.rmtree(self.name, ignore_errors=True)
            self.name = ""

    def __enter__(self) -> str:
        return self.name

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def machine_load(sample_s: float = 1.0) -> dict[str, Any]:
    """Return the load averages, the `uptime` line and how busy the CPUs were over the last sample_s seconds."""
    def cpu_times() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields[:8]), idle

    total0, idle0 = cpu_times()
    time.sleep(sample_s)
    total1, idle1 = cpu_times()
    busy = 100.0 * (1 - (idle1 - idle0) / max(1, total1 - total0))
    load1, load5, load15 = (float(x) for x in Path("/proc/loadavg").read_text().split()[:3])
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {"load1": load1, "load5": load5, "load15": load15, "busy_pct": round(busy, 1), "uptime": uptime, "cpus": os.cpu_count()}


def code_version() -> str:
    """Return the git commit the benchmark measures, flagging uncommitted changes under appliance/ or netboot/."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "appliance", "netboot"],
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (f" + uncommitted changes in {len(dirty.splitlines())} file(s) of appliance/, netboot/" if dirty else "")


def cpu_seconds(pid: int) -> float:
    """Return the CPU time (user + system, including reaped children) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # fields[11:15] are utime, stime, cutime, cstime (proc(5) fields 14-17), in clock ticks.
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """Return the CPU time of a process and of its live descendants (e.g. rackboot's TFTP data-plane workers)."""
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            total += cpu_seconds(current)
            for task in Path(f"/proc/{current}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue  # ended meanwhile
    return total


class NamespacePair:
    """Two namespaces (server, client) joined by one veth, rebuilt under a new prefix if they vanish.

    On this shared machine other people's clean-ups have been seen deleting namespaces they did not
    make; ensure() checks the pair before each measurement and rebuilds it (counted in `rebuilt`).
    """

    def __init__(self, server_cidr: str, client_cidr: str) -> None:
        self.server_cidr, self.client_cidr = server_cidr, client_cidr
        self.lab: Lab | None = None
        self.server = self.client = ""
        self.rebuilt = 0

    def _build(self) -> None:
        last: Exception | None = None
        for _ in range(3):
            self.lab = Lab(unique_prefix("bench"))
            try:
                self.server, self.client = self.lab.ns("srv"), self.lab.ns("cli")
                self.lab.veth(self.server, "s0", self.client, "c0")
                self.lab.addr(self.server, "s0", self.server_cidr)
                self.lab.addr(self.client, "c0", self.client_cidr)
                self._pin_neighbours()
                if self.intact():
                    return
                last = RuntimeError("the namespaces vanished while being built")
            except (OSError, IndexError, subprocess.CalledProcessError) as exc:
                last = exc
            self.lab.close()
        raise RuntimeError(f"cannot build the namespace pair: {last!r}")

    def _pin_neighbours(self) -> None:
        """Add permanent ARP entries for the two ends.

        The kernel's ARP table is shared by all namespaces; when someone else's testbed holds more
        than gc_thresh3 (1024) entries, resolving a new neighbour fails with ENOBUFS ("No buffer
        space available"). Permanent entries are exempt from that limit.
        """
        ends = ((self.server, "s0", self.server_cidr), (self.client, "c0", self.client_cidr))
        macs = {}
        for ns, ifname, _ in ends:
            out = subprocess.run(["ip", "-n", ns, "-o", "link", "show", "dev", ifname], capture_output=True, text=True, check=True)
            macs[ns] = out.stdout.split("link/ether", 1)[1].split()[0]
        for (ns, ifname, _), (peer, _, peer_cidr) in zip(ends, reversed(ends)):
            subprocess.run(["ip", "-n", ns, "neigh", "replace", peer_cidr.split("/")[0], "lladdr", macs[peer],
                            "dev", ifname, "nud", "permanent"], check=True, capture_output=True)

    def intact(self) -> bool:
        """True when both namespaces still exist with their veth ends and addresses."""
        for ns, ifname, cidr in ((self.server, "s0", self.server_cidr), (self.client, "c0", self.client_cidr)):
            out = subprocess.run(["ip", "-n", ns, "-o", "-4", "addr", "show", "dev", ifname], capture_output=True, text=True)
            if out.returncode != 0 or cidr not in out.stdout:
                return False
        return True

    def ensure(self) -> Lab:
        """Return the lab, rebuilding the pair first if it is no longer intact."""
        assert self.lab is not None
        if not self.intact():
            say(f"  namespaces {self.server}/{self.client} vanished (removed by someone else?): rebuilding")
            self.lab.close()
            self.rebuilt += 1
            self._build()
        return self.lab

    def __enter__(self) -> "NamespacePair":
        self._build()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.lab is not None:
            self.lab.close()


def udp_port_bound(lab: Lab, ns: str, port: int) -> bool:
    """Return True when some socket in the namespace is bound to this UDP port."""
    out = lab.run(ns, ["ss", "-Hlun", f"sport = :{port}"], timeout=10)
    return bool(out.stdout.strip())


def wait_until(ready: Any, proc: subprocess.Popen[bytes], what: str, log: Path | None = None, timeout: float = 30.0) -> None:
    """Wait until ready() is true; raise RuntimeError (with the log's tail) if proc exits or time runs out."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before it was ready{log_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout:.0f} s{log_tail(log)}")
        time.sleep(0.05)


def log_tail(log: Path | None, lines: int = 15) -> str:
    """Return the last lines of a log file, indented, for an error message."""
    if log is None or not log.exists():
        return ""
    tail = log.read_text(errors="replace").splitlines()[-lines:]
    return "\n  " + "\n  ".join(tail) if tail else ""


def stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM a process, SIGKILL it after grace seconds, and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM and SIGHUP into SystemExit so `with Lab()` blocks unwind and clean up."""
    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def require_root_and_tools(tools: Iterable[str]) -> None:
    """Exit with a clear message when not root or a peer program is missing (`./setup.sh --bench` installs them)."""
    import shutil

    if os.geteuid() != 0:
        sys.exit("this benchmark needs root (it creates network namespaces)")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        sys.exit(f"missing programs: {', '.join(missing)} (run ./setup.sh --bench)")


def rackboot_command(executable: str | None, commit: str | None, workdir: Path) -> list[str]:
    """Return the argv prefix that runs rackboot.

    With a commit: that commit of this repository, exported (`git archive`) into workdir and run
    with this Python, so other people's uncommitted edits in the checkout are not measured.
    Otherwise the given executable, or the rackboot console script next to this Python (.venv/bin/rackboot).
    """
    if commit:
        repo = Path(__file__).resolve().parent.parent
        archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", commit], capture_output=True)
        if archive.returncode != 0:
            sys.exit(f"cannot export commit {commit}: {archive.stderr.decode(errors='replace').strip()}")
        subprocess.run(["tar", "-x", "-C", str(workdir)], input=archive.stdout, check=True)
        path = os.pathsep.join([str(workdir), str(workdir / "vm-testbed")])
        return ["env", f"PYTHONPATH={path}", sys.executable, "-P", "-m", "appliance.cli"]  # -P: not the cwd's checkout
    if executable:
        return [executable]
    candidate = Path(sys.executable).with_name("rackboot")
    if candidate.exists():
        return [str(candidate)]
    import shutil

    found = shutil.which("rackboot")
    if found is None:
        sys.exit("rackboot is not installed next to this Python (run ./setup.sh --bench, then use .venv/bin/python)")
    return [found]


def with_rackboot(args: Any, wanted: bool, measure: Callable[[Any, list[str]], int]) -> int:
    """Run measure(args, rackboot argv) with args.rackboot / args.rackboot_commit resolved ([] when not wanted).

    The commit is pinned to its full hash (args.rackboot_commit is replaced) and exported into a temporary
    directory that is removed afterwards.
    """
    args.rackboot_commit = resolve_commit(args.rackboot_commit)
    code_dir = ScratchDir(prefix="rackboot-bench-code-")
    try:
        rackboot = rackboot_command(args.rackboot, args.rackboot_commit, Path(code_dir.name)) if wanted else []
        return measure(args, rackboot)
    finally:
        code_dir.cleanup()


def resolve_commit(rev: str | None) -> str | None:
    """Return the full hash of a revision of this repository now (so a moving HEAD is pinned), or None."""
    if not rev:
        return None
    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", f"{rev}^{{commit}}"], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"unknown commit {rev!r}: {out.stderr.strip()}")
    return out.stdout.strip()


def code_description(commit: str | None) -> str:
    """Describe what rackboot code is measured."""
    if commit:
        repo = Path(__file__).resolve().parent.parent
        full = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", commit], capture_output=True, text=True).stdout.strip()
        return f"commit {full} (exported, run with {Path(sys.executable).name} -m appliance.cli)"
    return code_version()


def median(values: Sequence[float]) -> float | None:
    """Return the median of the values, or None when there are none."""
    clean = [v for v in values if v is not None]
    return statistics.median(clean) if clean else None


def fmt(value: float | None, digits: int = 0) -> str:
    """Format a number for a table; '-' when missing."""
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Return a GitHub markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def write_json(path: str | None, data: Any) -> None:
    """Write the raw results as JSON when a path was given."""
    if path:
        Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n")


def say(*parts: object) -> None:
    """Print progress to stderr (stdout carries the final report)."""
    print(*parts, file=sys.stderr, flush=True)


def pyspy_path() -> str | None:
    """Return the py-spy next to this Python (or on PATH), or None when it is not installed."""
    import shutil

    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def pyspy_summary(raw: Path, headline: str) -> str:
    """Markdown: the hottest functions (own and inclusive share of samples) of a py-spy `-f raw` recording."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]  # per function, not per line
        own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    if total == 0:
        return f"{headline}: py-spy took no samples ({raw})"
    lines = [f"{headline}, {total} samples, raw stacks in {raw}", "", "| own time | function |", "| --- | --- |"]
    lines += [f"| {100 * n / total:.1f} % | `{f}` |" for f, n in own.most_common(15)]
    lines += ["", "| inclusive | function |", "| --- | --- |"]
    lines += [f"| {100 * n / total:.1f} % | `{f}` |" for f, n in inclusive.most_common(30) if 100 * n / total < 99]
    return "\n".join(lines)
