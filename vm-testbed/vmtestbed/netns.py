"""Network namespaces, veths and bridges made with netlink (pyroute2), all under one per-run prefix.

Everything a `Lab` creates carries its prefix and is removed by `Lab.close()` (also on failure and
Ctrl-C when used as a context manager); `remove_prefixed()` removes what a crashed run left behind.
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from pathlib import Path
from typing import Sequence

from pyroute2 import NetNS, netns

NETNS_DIR = Path("/var/run/netns")


def unique_prefix(kind: str = "rb") -> str:
    """Return a short prefix unique to this run (namespaces of two runs never collide)."""
    return f"{kind}{secrets.token_hex(3)}"


def pids_in(ns: str) -> list[int]:
    """Return the pids of processes living in a namespace."""
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def remove_namespace(ns: str) -> None:
    """Kill every process inside a namespace, then delete it (and every link inside it)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = pids_in(ns)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and pids_in(ns):
            time.sleep(0.05)
    try:
        netns.remove(ns)
    except OSError:
        pass


def remove_prefixed(prefix: str) -> list[str]:
    """Remove every namespace whose name starts with prefix; return their names."""
    names = [n for n in netns.listnetns() if n.startswith(prefix)]
    for n in names:
        remove_namespace(n)
    return names


class Lab:
    """A set of namespaces and links sharing one prefix; a context manager that always cleans up."""

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or unique_prefix()
        self.namespaces: list[str] = []
        self._procs: list[subprocess.Popen[bytes]] = []

    def ns(self, short: str) -> str:
        """Create a namespace named prefix-short (loopback up) and return its name."""
        name = f"{self.prefix}-{short}"
        netns.create(name)
        self.namespaces.append(name)
        with NetNS(name) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        return name

    def bridge(self, ns: str, ifname: str) -> None:
        """Create a bridge that forwards at once (no STP, no forward delay) inside a namespace."""
        with NetNS(ns) as ipr:
            ipr.link("add", ifname=ifname, kind="bridge", br_stp_state=0, br_forward_delay=0)
            ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], state="up")

    def veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str, master_b: str | None = None) -> None:
        """Create a veth pair from ns_a to ns_b, both ends up; optionally enslave the b end to a bridge."""
        with NetNS(ns_a) as ipr:
            ipr.link("add", ifname=if_a, kind="veth", peer={"ifname": if_b, "net_ns_fd": ns_b})
            ipr.link("set", index=ipr.link_lookup(ifname=if_a)[0], state="up")
        with NetNS(ns_b) as ipr:
            idx = ipr.link_lookup(ifname=if_b)[0]
            if master_b:
                ipr.link("set", index=idx, master=ipr.link_lookup(ifname=master_b)[0])
            ipr.link("set", index=idx, state="up")

    def addr(self, ns: str, ifname: str, cidr: str) -> None:
        """Add an address (a.b.c.d/len) to an interface in a namespace."""
        ip, _, plen = cidr.partition("/")
        with NetNS(ns) as ipr:
            ipr.addr("add", index=ipr.link_lookup(ifname=ifname)[0], address=ip, prefixlen=int(plen))

    def run(self, ns: str, argv: Sequence[str], timeout: float = 60, check: bool = False, **kw: object) -> subprocess.CompletedProcess[str]:
        """Run a command inside a namespace and wait for it."""
        return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=timeout, check=check, **kw)  # type: ignore[call-overload]

    def popen(self, ns: str, argv: Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
        """Start a long-running command inside a namespace; it is killed by close()."""
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)  # type: ignore[call-overload]
        self._procs.append(proc)
        return proc

    def close(self) -> None:
        """Stop every process and remove every namespace this lab made."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for name in reversed(self.namespaces):
            remove_namespace(name)
        self.namespaces.clear()
        remove_prefixed(self.prefix)

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
