"""Fakes of the deploy drivers, of the clock and of booting nodes, for the unit tests (never imported by production code)."""
from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Any, Callable, Sequence

from appliance.auth import NodeTokens
from appliance.catalog import Catalog, Environment
from appliance.deploy.controller import ControllerDeps
from appliance.deploy.drivers import BroadcastOutcome, DeployError
from appliance.deploy.power import BmcUnreachable
from appliance.deploy.store import DeploymentStore
from appliance.deploy.workflow import BootDeadlines
from appliance.events import EventBus
from appliance.inventory import Inventory
from appliance.profiles import ProfileStore
from appliance.statedb import open_state_db
from domain.nodes import BmcSpec, Node
from domain.profiles import BootProfile
from domain.progress import (
    AgentUp,
    DhcpFromFirmware,
    DhcpFromOs,
    FirmwareKind,
    InitrdFetched,
    KernelFetched,
    NbpSent,
    OsUp,
    ScriptServed,
    Via,
)


class FakePower:
    """An in-memory BMC per node for unit tests: records calls and runs a hook on every power change."""

    def __init__(self, on_change: Callable[[Node, str], None] | None = None, dead: set[str] | None = None) -> None:
        self.hang: set[str] = set()  # nodes whose BMC takes the call and never answers (until the caller gives up)
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
        if node.name in self.hang:
            await asyncio.Event().wait()
        if op == "status":
            return self.state.get(node.name, "on")  # a node runs its current system until its power is cut
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
        self.delivery_s: dict[tuple[str, str], float] = {}  # (op, node) -> seconds before the command gets there
        self.installed: dict[str, str] = {}  # node -> the environment its running installed system answers SSH with
        self.keys: dict[str, tuple[str, ...]] = {}  # node -> the user keys its post-install installed

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

    async def post_install(self, node: Node, env: Environment, ssh_keys: Sequence[str] = ()) -> None:
        """Pretend to run post-install scripts; remember the keys root got."""
        self._maybe_fail("post_install", node)
        self.keys[node.name] = tuple(ssh_keys)

    async def kexec(self, node: Node, env: Environment) -> None:
        """Pretend to kexec; the test's hook plays the node."""
        self._maybe_fail("kexec", node)
        await asyncio.sleep(self.delivery_s.get(("kexec", node.name), 0.0))  # e.g. queued for an SSH connection
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

    async def probe_installed(self, node: Node) -> str | None:
        """The environment of the node's running installed system, if it runs one."""
        self.calls.append(("probe_installed", node.name))
        return self.installed.get(node.name)


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


FAST = BootDeadlines(dhcp_after_reset=0.4, script_after_dhcp=0.4, kernel_after_script=0.4, agent_after_kernel=0.4,
                     os_after_script=0.4, kexec_alive=0.4, callback_after_os_dhcp=0.4, nbp_loop_limit=3)


class FakeCluster:
    """Plays the nodes and the boot services: on power-on/reset/kexec, publishes the records their boot leads to."""

    def __init__(self, deps: ControllerDeps) -> None:
        self.deps = deps
        self.never_boot: set[str] = set()     # nodes that never come back from a reboot
        self.nbp_loop: set[str] = set()       # nodes that loop fetching their NBP
        self.wrong_env: set[str] = set()      # nodes whose installed system is something else
        self.silent_os: set[str] = set()      # nodes whose installed system never calls back (a stock image)
        self.os_callback_s_of: dict[str, float] = {}  # seconds an installed system takes to call back, for some nodes
        self.files_s_of: dict[str, float] = {}  # seconds from the deploy script to its kernel and initrd, for some nodes
        self.agent_s_of: dict[str, float] = {}  # seconds from the initrd to the deploy agent's callback, for some nodes
        self.agent: FakeDeploy | None = None  # where a silent installed system can be reached over SSH
        self.tasks: list[asyncio.Task[None]] = []
        self.firmware_s = 0.0                 # time from the first DHCP to the script
        self.firmware_s_of: dict[str, float] = {}  # the same, for some nodes
        self.in_firmware = 0                  # nodes between power-on and their script, now and at most
        self.max_in_firmware = 0
        self.overload_above: int | None = None  # more nodes than this in firmware at once: the newcomer's fetch fails
        self.died_in_firmware = 0             # boots lost to that overload

    def on_power(self, node: Node, op: str) -> None:
        if op in ("on", "reset", "cycle", "soft", "kexec"):
            self.tasks.append(asyncio.get_running_loop().create_task(self._boot(node, kexec=op == "kexec")))

    async def _boot(self, node: Node, kexec: bool) -> None:
        ev = self.deps.events
        await asyncio.sleep(0.02)
        if node.name in self.never_boot:
            return
        profile = self.deps.profiles.get(node.mac)
        if not kexec:
            self.in_firmware += 1
            self.max_in_firmware = max(self.max_in_firmware, self.in_firmware)
            ev.publish(DhcpFromFirmware(node.mac, FirmwareKind.BIOS_PXE, 0))
            if self.overload_above is not None and self.in_firmware > self.overload_above:
                self.died_in_firmware += 1  # its TFTP timed out: no script, the firmware gives up
                await asyncio.sleep(self.firmware_s)
                self.in_firmware -= 1
                return
            await asyncio.sleep(self.firmware_s_of.get(node.name, self.firmware_s))
            self.in_firmware -= 1
            ev.publish(NbpSent(node.mac, "undionly.kpxe", Via.TFTP))
            if node.name in self.nbp_loop:
                for _ in range(5):
                    await asyncio.sleep(0.01)
                    ev.publish(NbpSent(node.mac, "undionly.kpxe", Via.TFTP))
                return
            ev.publish(DhcpFromFirmware(node.mac, FirmwareKind.IPXE, 0))
            ev.publish(ScriptServed(node.mac, profile.kind, Via.HTTP, profile.env))
        if profile.kind == "deploy":
            await asyncio.sleep(self.files_s_of.get(node.name, 0.0))
            ev.publish(KernelFetched(node.mac, "deploy/vmlinuz"))
            ev.publish(InitrdFetched(node.mac, "deploy/initrd.img"))
            # The deploy environment's own DHCP client: not firmware, must not restart the boot watch.
            ev.publish(DhcpFromOs(node.mac, "rackboot-deploy"))
            assert "rackboot.token" not in profile.cmdline  # no secret in what any host can fetch
            await asyncio.sleep(self.agent_s_of.get(node.name, 0.0))
            self.callback(node, "agent_up", None)
        else:
            env = "other:1" if node.name in self.wrong_env else profile.env
            if node.name in self.silent_os:
                ev.publish(DhcpFromOs(node.mac, "debian"))  # its own DHCP client, then sshd, and nothing else
                if self.agent is not None:
                    self.agent.installed[node.name] = env
                return
            token = self.deps.tokens.token_of(node.mac)  # what the post-install wrote into it
            await asyncio.sleep(self.os_callback_s_of.get(node.name, 0.0))
            self.callback(node, "installed", token, env)

    def callback(self, node: Node, stage: str, token: str | None, env: str = "") -> None:
        """What the HTTP service does with a node's callback from its own address: the agent claims the node's
        token, the installed system redeems it; a refused callback publishes nothing."""
        tokens, ip = self.deps.tokens, str(node.ip)
        if stage == "agent_up":
            claimed = tokens.claim(node.mac, ip)
            if claimed is not None:
                self.deps.events.publish(AgentUp(node.mac, claimed[0], 22, 7070))
        elif (deployment := tokens.redeem(node.mac, token, ip)) is not None:
            self.deps.events.publish(OsUp(node.mac, deployment, env))


def make_nodes(n: int, bmc: bool = True) -> Inventory:
    return Inventory(tuple(
        Node(name=f"node-{i}", mac=f"52:54:00:77:00:{i:02x}", ip=ipaddress.IPv4Address(f"10.77.0.{10 + i}"), rack=f"r{1 + (i - 1) // 4}",
             bmc=BmcSpec("fake", f"10.78.0.{10 + i}") if bmc else None)
        for i in range(1, n + 1)
    ))


def fake_world(tmp: Path, inventory: Inventory, **deps: Any) -> tuple[ControllerDeps, "FakeCluster", Environment, FakePower, FakeDeploy]:
    """A controller's dependencies on real stores (SQLite in tmp) and fake drivers, a FakeCluster playing the nodes,
    and one environment (debian12:1) in the catalog; deps overrides ControllerDeps fields."""
    db = open_state_db(tmp / "state.db")
    power, agent = FakePower(), FakeDeploy()
    catalog = Catalog(db, tmp / "images")
    image = tmp / "img.tar"
    image.write_bytes(b"x" * 1000)
    env = catalog.add(Environment(name="debian12", version=1, owner="admin", visibility="public"), image)
    built = ControllerDeps(**{
        "inventory": inventory, "profiles": ProfileStore(db, BootProfile()), "events": EventBus(), "tokens": NodeTokens(),
        "store": DeploymentStore(db), "catalog": catalog, "power": power, "agent": agent, "http_base": "http://10.77.0.1:8080",
        "deploy_profile": BootProfile(kind="deploy", kernel="deploy/vmlinuz", initrds=("deploy/initrd.img",), cmdline="console=ttyS0"),
        "power_off_wait": 0.01, **deps})
    cluster = FakeCluster(built)
    cluster.agent = agent
    power.on_change = cluster.on_power
    agent.on_reboot = cluster.on_power
    return built, cluster, env, power, agent