"""What the API's handlers work with: narrow interfaces the composition root passes in, nothing reached through."""
from __future__ import annotations

import asyncio
import builtins
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, Protocol

from appliance.auth import Users
from appliance.catalog import Catalog, Environment
from domain.progress import NodeEvent
from appliance.inventory import Inventory
from domain.nodes import Node
from domain.profiles import BootProfile


class DeploymentReader(Protocol):
    """Stored deployments and their step records (the DeploymentStore)."""

    def get(self, dep_id: str) -> dict[str, Any] | None:
        """Return a deployment with its nodes, or None."""

    def list(self, limit: int = 50) -> builtins.list[dict[str, Any]]:
        """Return the latest deployments."""

    def steps(self, dep_id: str | None = None) -> builtins.list[dict[str, Any]]:
        """Return step attempts, of one deployment or all."""

    def transitions(self, dep_id: str, node: str | None = None) -> builtins.list[dict[str, Any]]:
        """Return the state changes of a deployment's nodes, oldest first."""


class LiveDeployment(Protocol):
    """A deployment the controller runs or ran since the appliance started."""

    user: str
    status: str
    log: list[dict[str, Any]]

    def result(self) -> dict[str, Any]:
        """Return the report."""

    async def wait_log(self, after: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Return log entries after index `after`, waiting up to timeout for new ones."""


class DeploymentControl(Protocol):
    """What the API asks of the deployment controller."""

    @property
    def deployments(self) -> Mapping[str, LiveDeployment]:
        """The deployments it runs or ran since the appliance started, by id."""

    def workflow_factory(self, method: str, kexec: bool) -> Any:
        """Return the default workflow of a broadcast method."""

    def busy(self, names: list[str]) -> dict[str, str]:
        """Return the nodes among names that are in a running deployment, with its id."""

    def start(self, nodes: list[Node], env: Environment, user: str, method: str = "chain", force: bool = False,
              workflow: Any = None) -> LiveDeployment:
        """Create and start a deployment; raise OverlapError when nodes are busy."""

    def cancel(self, dep_id: str) -> bool:
        """Cancel a running deployment; False when it is not running."""

    async def reboot(self, nodes: list[Node], to: str, level: str, user: str, force: bool = False) -> list[dict[str, Any]]:
        """Reboot nodes from a level up and wait until each is back."""


class PowerSwitch(Protocol):
    """A node's BMC: on/off/reset/cycle/status."""

    async def power(self, node: Node, op: str) -> str:
        """Apply the op, or read the state; return 'on' or 'off'."""


class ExecOutcome(Protocol):
    """What a command run on nodes returns (broadcast.texec.ExecResult)."""

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""

    def grouped(self) -> list[tuple[str, Any]]:
        """[(folded node set, a representative result with to_json())] per distinct output."""


# Runs a command on nodes: (nodes, command, fanout, timeout) -> outcome.
ExecRunner = Callable[[list[Node], str, int, float], Awaitable[ExecOutcome]]


class Profiles(Protocol):
    """Per-MAC boot profiles (the ProfileStore)."""

    def get(self, mac: str) -> BootProfile:
        """Return the profile of a MAC."""

    def set(self, macs: list[str] | str, profile: BootProfile) -> None:
        """Switch MACs to a profile."""


class EventFeed(Protocol):
    """One consumer's bounded queue of node records (appliance.events.Subscription)."""

    dropped: int

    async def get(self) -> NodeEvent:
        """Wait for the next record."""

    def get_nowait(self) -> NodeEvent | None:
        """Return the next record if one is queued."""

    def __enter__(self) -> "EventFeed":
        """Start receiving."""

    def __exit__(self, *exc: object) -> None:
        """Stop receiving."""


class NodeEvents(Protocol):
    """The per-MAC event history and its live feed (the EventBus)."""

    def last(self, mac: str, n: int | None = None) -> list[NodeEvent]:
        """Return the last events of a MAC, oldest first."""

    def publish(self, event: NodeEvent) -> None:
        """Record one node record."""

    def subscribe(self, maxsize: int = 10000, accept: Callable[[NodeEvent], bool] | None = None) -> EventFeed:
        """Return a new feed of the records `accept` takes."""


@dataclass
class ApiDeps:
    """Everything the handlers use, built once by Api."""

    inventory: Inventory
    users: Users
    catalog: Catalog
    controller: DeploymentControl
    deployments: DeploymentReader
    power: PowerSwitch
    exec_runner: ExecRunner | None
    profiles: Profiles
    events: NodeEvents
    stats: Callable[[], Mapping[str, Mapping[str, int]]]
    stage_dir: Path
    image_files: tuple[Path, ...] = ()  # where an environment's image.file may point besides its upload
    openapi: dict[str, Any] = field(default_factory=dict)
    closing: asyncio.Event = field(default_factory=asyncio.Event)  # set when the server shuts down: streams end
