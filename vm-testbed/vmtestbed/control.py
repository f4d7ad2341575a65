"""Client of the node daemons' control sockets (JSON, one request and one reply per line), one per shard.

A request goes to the shards owning the nodes it names (every shard when it names none) and their replies
merge into one (vmtestbed.shards), so callers see one daemon whatever the testbed's plan.daemons.
"""
from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from vmtestbed.plan import TestbedPlan
from vmtestbed.shards import PLAN_FILE, control_socket, merge_replies, owners, split_request


class ControlError(Exception):
    """A node daemon is unreachable or refused a request."""


class _ShardConnection:
    """The connection to one shard's control socket."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except OSError as exc:
            self.sock.close()
            raise ControlError(f"node daemon not reachable at {path}: {exc}") from exc
        self.file = self.sock.makefile("rb")

    def send(self, req: dict[str, Any]) -> None:
        """Send one request."""
        try:
            self.sock.sendall(json.dumps(req).encode() + b"\n")
        except OSError as exc:
            raise ControlError(f"node daemon {self.path}: {exc}") from exc

    def receive(self) -> dict[str, Any]:
        """Read one reply; raise ControlError when it failed."""
        try:
            line = self.file.readline()
        except OSError as exc:
            raise ControlError(f"node daemon {self.path}: {exc}") from exc
        if not line:
            raise ControlError(f"node daemon {self.path} closed the connection")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise ControlError(str(reply.get("error")))
        return dict(reply)

    def close(self) -> None:
        """Close the connection."""
        self.file.close()
        self.sock.close()


class Control:
    """Connections to every node daemon of a testbed, used as one."""

    def __init__(self, state_dir: Path, timeout: float = 30.0) -> None:
        try:
            plan = TestbedPlan.load(state_dir / PLAN_FILE)
        except (OSError, ValueError, TypeError) as exc:
            raise ControlError(f"no testbed plan at {state_dir / PLAN_FILE}: {exc}") from exc
        self.shards = plan.daemons
        self.order = [n.name for n in plan.node_list]
        self.owner = owners(plan)
        self.conns: list[_ShardConnection] = []
        try:
            for i in range(self.shards):
                self.conns.append(_ShardConnection(control_socket(state_dir, i), timeout))
        except ControlError:
            self.close()
            raise

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one request to the shards concerned and return the merged reply; raise ControlError when one failed.

        A node name no shard owns fails as the daemon fails it (KeyError, in the error text)."""
        try:
            parts = split_request({"op": op, **args}, self.owner, self.shards)
        except KeyError as exc:
            raise ControlError(f"KeyError: {exc}") from None
        for i, req in parts.items():  # every shard works on its part at the same time
            self.conns[i].send(req)
        replies: dict[int, dict[str, Any]] = {}
        error: ControlError | None = None
        for i in parts:
            try:
                replies[i] = self.conns[i].receive()
            except ControlError as exc:  # read the other replies anyway: the connections stay in step
                error = error or exc
        if error:
            raise error
        return merge_replies(op, replies, self.order)

    def close(self) -> None:
        """Close every connection."""
        for conn in self.conns:
            conn.close()

    def __enter__(self) -> "Control":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
