"""Fakes of the deploy drivers and of the clock, for the unit tests (never imported by production code)."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Callable

from appliance.catalog import Environment
from appliance.deploy.drivers import BroadcastOutcome, DeployError
from appliance.deploy.power import BmcUnreachable
from domain.nodes import Node


class FakePower:
    """An in-memory BMC per node for unit tests: records calls and runs a hook on every power change."""

    def __init__(self, on_change: Callable[[Node, str], None] | None = None, dead: set[str] | None = None) -> None:
        self.state: dict[str, str] = {}
        self.boot_device: dict[str, tuple[str, bool]] = {}
        self.calls: list[tuple[str, str]] = []
        self.on_change = on_change
        self.dead = dead or set()

    async def power(self, node: Node, op: str) -> str:
        """Record the op and apply it to the fake state."""
        self.calls.append((node.name, op))
        if node.name in self.dead:
            raise BmcUnreachable(f"{node.name}: BMC does not answer")
        if op == "status":
            return self.state.get(node.name, "off")
        new = "off" if op == "off" else "on"
        self.state[node.name] = new
        if self.on_change is not None:
            self.on_change(node, op)
        return new

    async def set_boot_device(self, node: Node, device: str, persistent: bool = False) -> None:
        """Record the boot device."""
        self.calls.append((node.name, f"bootdev {device}"))
        if node.name in self.dead:
            raise BmcUnreachable(f"{node.name}: BMC does not answer")
        self.boot_device[node.name] = (device, persistent)


class FakeDeploy:
    """A deploy driver for unit tests: records calls; per-node failures are configurable."""

    def __init__(self, fail: dict[tuple[str, str], str] | None = None, no_ssh: set[str] | None = None,
                 on_reboot: Callable[[Node, str], None] | None = None, crash: dict[tuple[str, str], str] | None = None) -> None:
        self.fail = fail or {}
        self.crash = crash or {}  # (op, node) -> message of a RuntimeError: a bug, not a DeployError
        self.no_ssh = no_ssh or set()  # nodes whose current system cannot be reached for a soft reboot
        self.calls: list[tuple[str, str]] = []
        self.on_reboot = on_reboot

    def agent_up(self, node: Node, detail: dict[str, str]) -> None:
        """Record the callback."""
        self.calls.append(("agent_up", node.name))

    def _maybe_fail(self, op: str, node: Node) -> None:
        self.calls.append((op, node.name))
        if (op, node.name) in self.crash:
            raise RuntimeError(self.crash[(op, node.name)])
        if (op, node.name) in self.fail:
            raise DeployError(self.fail[(op, node.name)])

    async def prepare_disk(self, node: Node, env: Environment) -> None:
        """Pretend to partition."""
        self._maybe_fail("prepare_disk", node)

    async def broadcast(self, method: str, nodes: list[Node], env: Environment, image: Path) -> BroadcastOutcome:
        """Pretend to broadcast; nodes with a ('broadcast:METHOD', name) failure fail."""
        out = {}
        for n in nodes:
            self.calls.append((f"broadcast:{method}", n.name))
            reason = self.fail.get((f"broadcast:{method}", n.name))
            out[n.name] = (reason is None, reason or "")
        await asyncio.sleep(0)
        return BroadcastOutcome(method, out)

    async def post_install(self, node: Node, env: Environment) -> None:
        """Pretend to run post-install scripts."""
        self._maybe_fail("post_install", node)

    async def kexec(self, node: Node, env: Environment) -> None:
        """Pretend to kexec; the test's hook plays the node."""
        self._maybe_fail("kexec", node)
        if self.on_reboot:
            self.on_reboot(node, "kexec")

    async def soft_reboot(self, node: Node) -> None:
        """Pretend to reboot over SSH."""
        if node.name in self.no_ssh:
            self.calls.append(("soft_reboot", node.name))
            raise DeployError(f"{node.name}: SSH connection refused")
        self._maybe_fail("soft_reboot", node)
        if self.on_reboot:
            self.on_reboot(node, "soft")


class FakeClock:
    """A clock that moves only when a test advances it: `sleep` returns once `advance` passed its end."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        """Return the fake time."""
        return self.t

    async def sleep(self, seconds: float) -> None:
        """Wait until the fake time has advanced by seconds."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.t + seconds, fut))
        await fut

    def advance(self, seconds: float) -> None:
        """Move the fake time forward and wake the sleepers whose time has come."""
        self.t += seconds
        due = [(end, fut) for end, fut in self._sleepers if end <= self.t]
        self._sleepers = [(end, fut) for end, fut in self._sleepers if end > self.t]
        for _, fut in due:
            if not fut.done():
                fut.set_result(None)
