"""The deploy driver: what the controller asks of the deploy environment on the nodes (one interface)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

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
    arm_seconds: float = 0.0  # arming the nodes, before `seconds`
    counters: dict[str, int] = field(default_factory=dict)  # e.g. bypassed: suspects whose parent fed their children


class DeployDriver(Protocol):
    """Remote operations on nodes running the deploy agent (or, for soft reboots, any reachable system)."""

    def agent_up(self, node: Node, detail: dict[str, str]) -> None:
        """Note a node's agent callback (where its SSH and data ports are)."""

    async def prepare_disk(self, node: Node, env: Environment) -> None:
        """Partition and format the node's disk for env; raise DeployError on failure."""

    async def broadcast(self, method: str, nodes: list[Node], env: Environment, image: Path) -> BroadcastOutcome:
        """Send the image to every node with the method (chain, tree, star); write and verify it."""

    async def post_install(self, node: Node, env: Environment, ssh_keys: Sequence[str] = ()) -> None:
        """Run env's post-install scripts and set up booting on the node."""

    async def kexec(self, node: Node, env: Environment) -> None:
        """Start the installed kernel without a firmware reboot."""

    async def soft_reboot(self, node: Node) -> None:
        """Ask the node's running system to reboot (SSH `reboot`)."""

    async def probe_installed(self, node: Node) -> str | None:
        """Reach the node's installed system over SSH; return the environment its stamp names, None if not (yet)."""
