"""systemd's service notification protocol (sd_notify(3)): readiness, watchdog pings and stopping, over $NOTIFY_SOCKET.

Without $NOTIFY_SOCKET (not started by systemd) every call is a no-op, so `rackboot serve` behaves the same
by hand. A datagram to an AF_UNIX socket, no library needed.
"""
from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send newline-separated KEY=VALUE assignments (READY=1, WATCHDOG=1, STATUS=..., STOPPING=1); True if sent."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket (sd_notify(3))
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of $WATCHDOG_USEC), when systemd watches this process; else None."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6
