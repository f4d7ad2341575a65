"""The deploy driver: what the controller asks of the deploy environment on the nodes (one interface, a fake beside)."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from appliance.catalog import Environment
from domain.errors import RackbootError
from domain.nodes import Node


class DeployError(RackbootError):
    """A remote step failed on a node."""


@dataclass
class BroadcastOutcome:
    """Per-node outcome of one broadcast: name -> (ok, reason)."""

    method: str
    nodes: dict[str, tuple[bool, str]]
    seconds: float = 0.0
    detail: dict[str, object] = field(default_factory=dict)


class DeployDriver(Protocol):
    """Remote operations on nodes running the deploy agent (or, for soft reboots, any reachable system)."""

    def agent_up(self, node: Node, detail: dict[str, str]) -> None:
        """Note a node's agent callback (where its SSH and data ports are)."""

    async def prepare_disk(self, node: Node, env: Environment) -> None:
        """Partition and format the node's disk for env; raise DeployError on failure."""

    async def broadcast(self, method: str, nodes: list[Node], env: Environment, image: Path) -> BroadcastOutcome:
        """Send the image to every node with the method (chain, tree, star); write and verify it."""

    async def post_install(self, node: Node, env: Environment) -> None:
        """Run env's post-install scripts and set up booting on the node."""

    async def kexec(self, node: Node, env: Environment) -> None:
        """Start the installed kernel without a firmware reboot."""

    async def soft_reboot(self, node: Node) -> None:
        """Ask the node's running system to reboot (SSH `reboot`)."""


class FakeDeploy:
    """A deploy driver for unit tests: records calls; per-node failures are configurable."""

    def __init__(self, fail: dict[tuple[str, str], str] | None = None, no_ssh: set[str] | None = None,
                 on_reboot: Callable[[Node, str], None] | None = None) -> None:
        self.fail = fail or {}
        self.no_ssh = no_ssh or set()  # nodes whose current system cannot be reached for a soft reboot
        self.calls: list[tuple[str, str]] = []
        self.on_reboot = on_reboot

    def agent_up(self, node: Node, detail: dict[str, str]) -> None:
        """Record the callback."""
        self.calls.append(("agent_up", node.name))

    def _maybe_fail(self, op: str, node: Node) -> None:
        self.calls.append((op, node.name))
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
