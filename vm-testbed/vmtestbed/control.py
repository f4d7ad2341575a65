"""Client of the node daemon's control socket (JSON, one request and one reply per line)."""
from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from vmtestbed.daemon import CONTROL_SOCKET


class ControlError(Exception):
    """The node daemon is unreachable or refused a request."""


class Control:
    """A connection to a testbed's node daemon."""

    def __init__(self, state_dir: Path, timeout: float = 30.0) -> None:
        self.path = state_dir / CONTROL_SOCKET
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(self.path))
        except OSError as exc:
            self.sock.close()
            raise ControlError(f"node daemon not reachable at {self.path}: {exc}") from exc
        self._file = self.sock.makefile("rb")

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one request and return the reply; raise ControlError when it failed."""
        try:
            self.sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
            line = self._file.readline()
        except OSError as exc:
            raise ControlError(f"node daemon: {exc}") from exc
        if not line:
            raise ControlError("node daemon closed the connection")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise ControlError(str(reply.get("error")))
        return dict(reply)

    def close(self) -> None:
        """Close the connection."""
        self._file.close()
        self.sock.close()

    def __enter__(self) -> "Control":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
