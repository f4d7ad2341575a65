"""What a deployment works with: the stores, the drivers and the clock, built once by the Appliance."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from appliance.auth import NodeTokens
from appliance.catalog import Catalog
from appliance.deploy.clock import Clock, MonotonicClock
from appliance.deploy.drivers import DeployDriver
from appliance.deploy.power import PowerDriver
from appliance.deploy.store import DeploymentStore
from appliance.events import EventBus
from appliance.inventory import Inventory
from appliance.profiles import ProfileStore
from domain.profiles import BootProfile


@dataclass
class ControllerDeps:
    """What the controller works with; built once by the Appliance."""

    inventory: Inventory
    profiles: ProfileStore
    events: EventBus
    tokens: NodeTokens
    store: DeploymentStore
    catalog: Catalog
    power: PowerDriver
    agent: DeployDriver
    http_base: str
    deploy_profile: BootProfile
    power_off_wait: float = 2.0
    os_probe_interval: float = 5.0  # seconds between SSH probes of a node booting its installed system
    clock: Clock = field(default_factory=MonotonicClock)
    # Seconds the appliance's event loop has stalled so far (appliance.loopwatch): boot deadlines skip that time, as no
    # packet of a node was read during it.
    loop_stalled: Callable[[], float] = field(default=lambda: 0.0)
