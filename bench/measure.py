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
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from vmtestbed.netns import Lab


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


def cpu_seconds(pid: int) -> float:
    """Return the CPU time (user + system, including reaped children) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # fields[11:15] are utime, stime, cutime, cstime (proc(5) fields 14-17), in clock ticks.
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


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


def rackboot_executable() -> str:
    """Return the rackboot console script of the Python running this benchmark (.venv/bin/rackboot)."""
    candidate = Path(sys.executable).with_name("rackboot")
    if candidate.exists():
        return str(candidate)
    import shutil

    found = shutil.which("rackboot")
    if found is None:
        sys.exit("rackboot is not installed next to this Python (run ./setup.sh --bench, then use .venv/bin/python)")
    return found


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
