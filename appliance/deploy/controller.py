"""The deployment controller: runs the workflow on a node set, driven by the boot services' events.

Each node carries an explicit state (pending -> SetDeploymentEnv -> BroadcastEnv -> BootNewEnv -> done, or
failed with the step and the reason). Within a boot, a BootWatch turns DHCP/NBP/script/kernel/callback
events into stages with deadlines, so a node stuck in firmware is escalated or failed in seconds.
Reboots escalate soft (SSH) -> hard (IPMI reset) -> very hard (power off, then on), inside reboot windows.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ClusterShell.NodeSet import NodeSet

from appliance.auth import NodeTokens
from appliance.catalog import Catalog, Environment
from appliance.deploy.bootwatch import DEPLOY, INSTALLED, NETBOOT, BootWatch, Stage
from appliance.deploy.drivers import DeployDriver, DeployError
from appliance.deploy.power import BmcUnreachable, PowerDriver, PowerError
from appliance.deploy.store import DeploymentStore
from appliance.deploy.workflow import Implementation, MacroStep, Workflow
from domain.errors import RackbootError
from appliance.events import EventBus
from domain.progress import AgentUp, NodeEvent, OsUp, ProfileSet
from domain.nodes import Node
from appliance.inventory import Inventory
from domain.profiles import BootProfile
from appliance.profiles import ProfileStore

log = logging.getLogger("rackboot.deploy")

# Which reboot levels an implementation climbs, in order.
LADDERS: dict[str, tuple[str, ...]] = {
    "reboot": ("soft", "hard", "very_hard"),
    "hard_reboot": ("hard", "very_hard"),
    "very_hard_reboot": ("very_hard",),
}
REBOOT_LEVELS = {"soft": LADDERS["reboot"], "hard": LADDERS["hard_reboot"], "very_hard": LADDERS["very_hard_reboot"]}


class OverlapError(RackbootError):
    """Nodes are already part of a running deployment."""


class Hopeless(Exception):
    """Nothing else can work for this node in this deployment: its BMC does not answer, or it showed no
    sign of life after a power cycle. The node fails the step at once, without the remaining
    implementations and retries, so the healthy nodes do not wait for it."""


@dataclass
class NodeRun:
    """One node's progress in a deployment."""

    node: Node
    state: str = "pending"
    step: str = ""
    impl: str = ""
    reason: str = ""
    watch: BootWatch | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    reported: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    step_times: dict[str, float] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        """True when the node is out of the deployment."""
        return self.state == "failed"

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "node": self.node.name, "mac": self.node.mac, "state": self.state, "step": self.step, "impl": self.impl,
            "reason": self.reason, "boot_stage": self.watch.stage.value if self.watch else "",
            "notes": list(self.notes), "step_times": dict(self.step_times),
        }


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


class Deployment:
    """One deployment of one environment on a node set."""

    def __init__(self, dep_id: str, nodes: list[Node], env: Environment, user: str, workflow: Workflow,
                 deps: ControllerDeps, clock: Callable[[], float] = time.monotonic) -> None:
        self.id = dep_id
        self.env = env
        self.user = user
        self.workflow = workflow
        self.deps = deps
        self.clock = clock
        self.runs: dict[str, NodeRun] = {n.name: NodeRun(n) for n in nodes}
        self.by_mac: dict[str, NodeRun] = {n.mac: self.runs[n.name] for n in nodes}
        self.status = "running"
        self.started = time.time()
        self.finished: float | None = None
        self.log: list[dict[str, Any]] = []
        self._log_changed = asyncio.Event()
        self._reboot_window = asyncio.Semaphore(workflow.reboot_window)

    # -- reporting ----------------------------------------------------------------------------------

    def _note(self, run: NodeRun | None, what: str, **detail: Any) -> None:
        entry = {"ts": time.time(), "node": run.node.name if run else "", "what": what, **detail}
        self.log.append(entry)
        self._log_changed.set()
        self._log_changed = asyncio.Event()

    async def wait_log(self, after: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Return log entries after index `after`, waiting up to timeout for new ones."""
        if len(self.log) <= after and self.status == "running":
            waiter = self._log_changed
            try:
                await asyncio.wait_for(waiter.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        return self.log[after:]

    def _set(self, run: NodeRun, state: str, step: str = "", impl: str = "", reason: str = "") -> None:
        run.state, run.step, run.impl, run.reason = state, step or run.step, impl or run.impl, reason
        self.deps.store.node_state(self.id, run.node.name, state, run.step, run.impl, reason)
        self._note(run, state, step=run.step, impl=run.impl, reason=reason)

    def _fail(self, run: NodeRun, step: str, impl: str, reason: str) -> None:
        log.info("%s: %s failed in %s/%s: %s", self.id, run.node.name, step, impl, reason)
        self._set(run, "failed", step, impl, reason)
        self.deps.tokens.revoke(run.node.mac, self.id)

    def result(self) -> dict[str, Any]:
        """Return the report: nodes OK and KO, with the step and the reason for each failure."""
        ok = [r.node.name for r in self.runs.values() if r.state == "done"]
        ko = [{"node": r.node.name, "step": r.step, "impl": r.impl, "reason": r.reason} for r in self.runs.values() if r.state != "done"]
        return {
            "id": self.id, "env": self.env.ref, "user": self.user, "status": self.status,
            "started": self.started, "finished": self.finished,
            "ok": ok, "ko": ko, "ok_nodeset": str(NodeSet.fromlist(ok)) if ok else "",
            "ko_nodeset": str(NodeSet.fromlist([k["node"] for k in ko])) if ko else "",
            "nodes": [r.to_json() for r in self.runs.values()],
        }

    # -- events -------------------------------------------------------------------------------------

    def on_event(self, event: NodeEvent) -> None:
        """Feed one boot-service record to the node it concerns (the one intake of node progress)."""
        run = self.by_mac.get(event.mac)
        if run is None or run.watch is None or run.failed:
            return
        if isinstance(event, (AgentUp, OsUp)):
            if event.deployment != self.id:
                return  # a late callback of an earlier deployment of this node
            if isinstance(event, AgentUp):
                run.reported = {"ssh_port": str(event.ssh_port), "data_port": str(event.data_port)}
                if run.watch.target == DEPLOY:
                    self.deps.agent.agent_up(run.node, run.reported)
            else:
                run.reported = {"env": event.env}
        if run.watch.on_event(event, self.clock()):
            self._note(run, "boot", stage=run.watch.stage.value)
            run.changed.set()

    def tick(self) -> None:
        """Check every waiting node's deadline."""
        now = self.clock()
        for run in self.runs.values():
            if run.watch is not None and run.watch.on_tick(now):
                self._note(run, "boot", stage=run.watch.stage.value, reason=run.watch.reason)
                run.changed.set()

    async def _wait_boot(self, run: NodeRun) -> BootWatch:
        assert run.watch is not None
        while not run.watch.done:
            await run.changed.wait()
            run.changed.clear()
        return run.watch

    # -- reboots ------------------------------------------------------------------------------------

    async def _reboot(self, run: NodeRun, level: str) -> str | None:
        """Reboot one node at a level; return None when the reboot was issued, else why not."""
        node = run.node
        if level == "soft":
            try:
                await self.deps.agent.soft_reboot(node)
                return None
            except DeployError as exc:
                return f"soft reboot impossible: {exc}"
        if node.bmc is None or node.bmc.driver == "none":
            return f"{level} reboot impossible: no BMC in the inventory"
        try:
            try:
                # Where the driver supports it, the next boot goes to the network whatever the installed
                # OS did to the boot order, so the appliance keeps control of the node.
                await self.deps.power.set_boot_device(node, "network", persistent=False)
            except BmcUnreachable:
                raise
            except PowerError as exc:
                run.notes.append(f"bootdev network not set: {exc}")
            if level == "hard":
                state = await self.deps.power.power(node, "status")
                await self.deps.power.power(node, "reset" if state == "on" else "on")
            else:
                await self.deps.power.power(node, "off")
                await asyncio.sleep(self.deps.power_off_wait)
                await self.deps.power.power(node, "on")
        except BmcUnreachable as exc:
            raise Hopeless(f"{level} reboot failed: {exc}") from exc
        except PowerError as exc:
            return f"{level} reboot failed: {exc}"
        return None

    async def _boot(self, run: NodeRun, target: str, levels: tuple[str, ...], kexec: bool = False) -> str | None:
        """Bring a node to target (deploy env or installed system), climbing reboot levels; None when up.

        Raise Hopeless when the BMC does not answer or the node stays silent after a power cycle.
        """
        reasons: list[str] = []
        try:
            return await self._climb(run, target, levels, kexec, reasons)
        except Hopeless as exc:
            raise Hopeless("; ".join([*reasons, str(exc)])) from None

    async def _climb(self, run: NodeRun, target: str, levels: tuple[str, ...], kexec: bool, reasons: list[str]) -> str | None:
        attempts = (("kexec",) if kexec else ()) + levels
        for level in attempts:
            if level == "kexec":
                # Kexec'ing nodes take window slots too, until the new kernel is on the network: hundreds of
                # systems starting at once is a DHCP storm of its own.
                await self._reboot_window.acquire()
                try:
                    watch = BootWatch(target, self.workflow.deadlines)
                    run.watch = watch
                    watch.start(self.clock(), how="kexec")
                    await self.deps.agent.kexec(run.node, self.env)
                    self._note(run, "rebooting", level=level, target=target)
                    while not watch.done and watch.stage is Stage.KEXECING:
                        await run.changed.wait()
                        run.changed.clear()
                except DeployError as exc:
                    run.watch = None
                    reasons.append(f"kexec failed: {exc}")
                    continue
                finally:
                    self._reboot_window.release()
            else:
                # A reboot window slot is held from the reset until the node has its kernel (or is stuck): at
                # most reboot_window nodes are in POST, DHCP, TFTP and iPXE at once, the unreliable part under
                # load. A node waiting for a slot has no deadline running.
                await self._reboot_window.acquire()
                watch = BootWatch(target, self.workflow.deadlines)
                run.watch = watch
                watch.start(self.clock(), how=f"{level.replace('_', ' ')} reboot")
                try:
                    why = await self._reboot(run, level)
                    if why is None:
                        self._note(run, "rebooting", level=level, target=target)
                        while not watch.done and watch.stage in (Stage.RESETTING, Stage.FIRMWARE):
                            await run.changed.wait()
                            run.changed.clear()
                finally:
                    self._reboot_window.release()
                if why is not None:
                    run.watch = None
                    reasons.append(why)
                    self._note(run, "escalate", level=level, reason=why)
                    continue
            watch = await self._wait_boot(run)
            if watch.stage is Stage.UP:
                return None
            if level == "very_hard" and watch.stage is Stage.STUCK and watch.boots == 0:
                # Power cut and restored, and not one DHCP packet: no other reboot will do better.
                raise Hopeless(watch.reason)
            reasons.append(watch.reason)
            self._note(run, "escalate", level=level, reason=watch.reason)
        return "; ".join(reasons) if reasons else "no way to reboot"

    # -- the three macro-steps ----------------------------------------------------------------------

    def _deploy_profile(self, run: NodeRun) -> BootProfile:
        token = self.deps.tokens.issue(run.node.mac, self.id)
        base = self.deps.deploy_profile
        node = run.node
        # What the deploy agent reads from /proc/cmdline (broadcast.agent.AgentConfig.from_cmdline).
        cmdline = (f"{base.cmdline} rackboot.name={node.name} rackboot.mac={node.mac} rackboot.ip={node.ip} "
                   f"rackboot.token={token} rackboot.callback={{callback}} rackboot.deployment={self.id}").strip()
        return BootProfile(kind="deploy", kernel=base.kernel, initrds=base.initrds, cmdline=cmdline, env=self.env.ref,
                           params={**base.params, "deployment": self.id})

    def _installed_profile(self, run: NodeRun) -> BootProfile:
        env = self.env
        if env.boot_kind == "kernel":
            return BootProfile(kind="kernel", kernel=env.kernel, initrds=(env.initrd,) if env.initrd else (),
                               cmdline=env.cmdline, env=env.ref)
        return BootProfile(kind="local", env=env.ref)

    async def _set_deployment_env(self, run: NodeRun, impl: Implementation) -> str | None:
        self.deps.profiles.set(run.node.mac, self._deploy_profile(run))
        self.deps.events.publish(ProfileSet(run.node.mac, "deploy", self.env.ref, self.id))
        why = await self._boot(run, DEPLOY, LADDERS.get(impl.name, ("hard",)))
        if why is not None:
            return why
        try:
            await self.deps.agent.prepare_disk(run.node, self.env)
        except DeployError as exc:
            return f"disk preparation failed: {exc}"
        return None

    async def _boot_new_env(self, run: NodeRun, impl: Implementation) -> str | None:
        self.deps.tokens.issue(run.node.mac, self.id) if self.deps.tokens.token_of(run.node.mac) is None else None
        self.deps.profiles.set(run.node.mac, self._installed_profile(run))
        self.deps.events.publish(ProfileSet(run.node.mac, self.env.boot_kind, self.env.ref, self.id))
        if impl.name == "kexec":
            if not self.env.kexec:
                return "kexec not allowed by the environment"
            why = await self._boot(run, INSTALLED, (), kexec=True)
        else:
            why = await self._boot(run, INSTALLED, LADDERS.get(impl.name, ("hard",)))
        if why is not None:
            return why
        booted = run.reported.get("env", "")
        if booted and booted != self.env.ref:
            return f"the node booted {booted!r}, not {self.env.ref!r}"
        return None

    async def _per_node_step(self, step: MacroStep, runs: list[NodeRun],
                             body: Callable[[NodeRun, Implementation], Any]) -> None:
        """Run a per-node macro-step: implementations in order, each with retries, for nodes still failing."""
        pending = list(runs)
        for impl in step.implementations:
            if not pending:
                break
            timeout = impl.timeout_for(len(runs))
            failures: dict[str, str] = {}
            hopeless: set[str] = set()

            async def attempt(run: NodeRun) -> None:
                for n in range(impl.retries + 1):
                    started = time.time()
                    self._set(run, step.name, step.name, impl.name)
                    try:
                        async with asyncio.timeout(timeout):
                            why = await body(run, impl)
                    except Hopeless as exc:
                        why = str(exc)
                        hopeless.add(run.node.name)
                    except TimeoutError:
                        why = f"{step.name}/{impl.name} timed out after {timeout:.0f}s" + (f" ({run.watch.stage.value})" if run.watch else "")
                    run.watch = None
                    self.deps.store.log_step(self.id, run.node.name, step.name, impl.name, n, started, why is None, why or "")
                    run.step_times[step.name] = run.step_times.get(step.name, 0.0) + time.time() - started
                    if why is None:
                        failures.pop(run.node.name, None)
                        return
                    failures[run.node.name] = why
                    if run.node.name in hopeless:
                        self._note(run, "impl_failed", step=step.name, impl=impl.name, reason=why)
                        return
                    self._note(run, "retry" if n < impl.retries else "impl_failed", step=step.name, impl=impl.name, reason=why)

            async with asyncio.TaskGroup() as tg:
                for run in pending:
                    tg.create_task(attempt(run))
            last_impl = impl is step.implementations[-1]
            still = [r for r in pending if r.node.name in failures]
            for r in still:
                if last_impl or r.node.name in hopeless:
                    self._fail(r, step.name, impl.name, failures[r.node.name])
                else:
                    r.notes.append(f"{step.name}/{impl.name}: {failures[r.node.name]}")
            pending = [r for r in still if r.node.name not in hopeless]

    async def _broadcast_step(self, step: MacroStep, runs: list[NodeRun]) -> None:
        """Broadcast the image with each method in turn to the nodes the previous one failed."""
        pending = list(runs)
        image = self.deps.catalog.image_file(self.env)
        for impl in step.implementations:
            if not pending:
                break
            started = time.time()
            for r in pending:
                self._set(r, step.name, step.name, impl.name)
            timeout = impl.timeout_for(len(pending))
            try:
                async with asyncio.timeout(timeout):
                    outcome = await self.deps.agent.broadcast(impl.name, [r.node for r in pending], self.env, image)
                results = outcome.nodes
            except TimeoutError:
                results = {r.node.name: (False, f"{impl.name} broadcast timed out after {timeout:.0f}s") for r in pending}
            except DeployError as exc:
                results = {r.node.name: (False, f"{impl.name} broadcast failed: {exc}") for r in pending}
            still = []
            for r in pending:
                ok, why = results.get(r.node.name, (False, "no result from the broadcast"))
                self.deps.store.log_step(self.id, r.node.name, step.name, impl.name, 0, started, ok, why)
                r.step_times[step.name] = r.step_times.get(step.name, 0.0) + time.time() - started
                if ok:
                    continue
                if impl is step.implementations[-1]:
                    self._fail(r, step.name, impl.name, why)
                else:
                    r.notes.append(f"{step.name}/{impl.name}: {why}")
                    still.append(r)
            pending = still
        survivors = [r for r in runs if not r.failed]

        async def post(run: NodeRun) -> None:
            try:
                await self.deps.agent.post_install(run.node, self.env)
            except DeployError as exc:
                self._fail(run, step.name, "post_install", f"post-install failed: {exc}")

        async with asyncio.TaskGroup() as tg:
            for r in survivors:
                tg.create_task(post(r))

    async def run(self) -> dict[str, Any]:
        """Run the whole workflow; return the report."""
        ticker = asyncio.create_task(self._ticker())
        try:
            for step in self.workflow.steps:
                alive = [r for r in self.runs.values() if not r.failed]
                if not alive:
                    break
                self._note(None, "step", step=step.name, nodes=str(NodeSet.fromlist([r.node.name for r in alive])))
                if step.name == "BroadcastEnv":
                    await self._broadcast_step(step, alive)
                elif step.name == "SetDeploymentEnv":
                    await self._per_node_step(step, alive, self._set_deployment_env)
                else:
                    await self._per_node_step(step, alive, self._boot_new_env)
            for r in self.runs.values():
                if not r.failed:
                    self._set(r, "done", "BootNewEnv", r.impl)
            n_ok = sum(1 for r in self.runs.values() if r.state == "done")
            self.status = "done" if n_ok == len(self.runs) else ("failed" if n_ok == 0 else "partial")
        except asyncio.CancelledError:
            for r in self.runs.values():
                if r.state not in ("done", "failed"):
                    self._fail(r, r.step or "pending", r.impl, "deployment cancelled")
            self.status = "cancelled"
            raise
        finally:
            ticker.cancel()
            self.finished = time.time()
            self.deps.store.finish(self.id, self.status)
            for r in self.runs.values():
                self.deps.tokens.revoke(r.node.mac, self.id)
            self._note(None, "finished", status=self.status)
        return self.result()

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            self.tick()


class Controller:
    """Starts deployments, refuses overlapping ones, routes boot events to them."""

    def __init__(self, deps: ControllerDeps, workflow_factory: Callable[[str, bool], Workflow]) -> None:
        self.deps = deps
        self.workflow_factory = workflow_factory
        self.deployments: dict[str, Deployment] = {}
        self.tasks: dict[str, asyncio.Task[dict[str, Any]]] = {}
        self._busy: dict[str, str] = {}  # node name -> deployment id

    def busy(self, names: list[str]) -> dict[str, str]:
        """Return the nodes among names that are in a running deployment, with its id."""
        return {n: self._busy[n] for n in names if n in self._busy}

    def start(self, nodes: list[Node], env: Environment, user: str, method: str = "chain", force: bool = False,
              workflow: Workflow | None = None) -> Deployment:
        """Create and start a deployment; raise OverlapError when nodes are busy (unless force)."""
        names = [n.name for n in nodes]
        overlap = self.busy(names)
        if overlap and not force:
            raise OverlapError(f"{NodeSet.fromlist(list(overlap))} already in deployment(s) {', '.join(sorted(set(overlap.values())))}")
        for name, other in overlap.items():
            dep = self.deployments.get(other)
            if dep is not None and name in dep.runs:
                dep._fail(dep.runs[name], dep.runs[name].step or "pending", "", "taken over by a forced deployment")
        dep_id = time.strftime("d%Y%m%d-%H%M%S-") + secrets.token_hex(2)
        wf = workflow or self.workflow_factory(method, env.kexec)
        dep = Deployment(dep_id, nodes, env, user, wf, self.deps)
        self.deps.store.create(dep_id, user, env.ref, names, method, {"force": force})
        self.deployments[dep_id] = dep
        for n in names:
            self._busy[n] = dep_id
        task = asyncio.create_task(dep.run(), name=f"deployment {dep_id}")
        task.add_done_callback(lambda t, d=dep: self._finished(d))
        self.tasks[dep_id] = task
        return dep

    async def reboot(self, nodes: list[Node], to: str, level: str, user: str, force: bool = False) -> list[dict[str, Any]]:
        """Reboot nodes (optionally into 'deploy', 'local' or an environment) from a level up; wait until each is back."""
        if level not in REBOOT_LEVELS:
            raise ValueError(f"level must be one of {', '.join(REBOOT_LEVELS)}")
        env = self.deps.catalog.get(to) if to not in ("", "deploy", "local") else Environment(name="reboot", version=1, owner=user)
        names = [n.name for n in nodes]
        overlap = self.busy(names)
        if overlap and not force:
            raise OverlapError(f"{NodeSet.fromlist(list(overlap))} already in deployment(s) {', '.join(sorted(set(overlap.values())))}")
        dep_id = time.strftime("r%Y%m%d-%H%M%S-") + secrets.token_hex(2)
        dep = Deployment(dep_id, nodes, env, user, self.workflow_factory("chain", False), self.deps)
        self.deployments[dep_id] = dep
        for n in names:
            self._busy[n] = dep_id
        ticker = asyncio.create_task(dep._ticker())

        async def one(run: NodeRun) -> dict[str, Any]:
            target = NETBOOT
            if to == "deploy":
                self.deps.profiles.set(run.node.mac, dep._deploy_profile(run))
                target = DEPLOY
            elif to == "local":
                self.deps.profiles.set(run.node.mac, BootProfile(kind="local"))
            elif to:
                self.deps.profiles.set(run.node.mac, dep._installed_profile(run))
            try:
                why = await dep._boot(run, target, REBOOT_LEVELS[level])
            except Hopeless as exc:
                why = str(exc)
            return {"node": run.node.name, "ok": why is None, "reason": why or "", "stage": run.watch.stage.value if run.watch else ""}

        try:
            return list(await asyncio.gather(*(one(r) for r in dep.runs.values())))
        finally:
            ticker.cancel()
            self._finished(dep)
            for r in dep.runs.values():
                self.deps.tokens.revoke(r.node.mac, dep_id)
            del self.deployments[dep_id]

    def _finished(self, dep: Deployment) -> None:
        for name in dep.runs:
            if self._busy.get(name) == dep.id:
                del self._busy[name]

    def cancel(self, dep_id: str) -> bool:
        """Cancel a running deployment; return False when it is not running."""
        task = self.tasks.get(dep_id)
        if task is None or task.done():
            return False
        task.cancel()
        return True

    async def serve(self) -> None:
        """Route boot-service events to the deployments their MACs belong to, until cancelled."""
        # Only MACs of nodes in a running deployment wake the controller: pool clients and idle nodes
        # (most DHCP traffic under load) are filtered before they are queued.
        by_mac = self.deps.inventory.by_mac

        def watched(event: NodeEvent) -> bool:
            node = by_mac.get(event.mac)
            return node is not None and node.name in self._busy

        with self.deps.events.subscribe(maxsize=100000, accept=watched) as sub:
            async for event in sub:
                for dep_id in {self._busy.get(r) for r in self._names_of(event.mac)} - {None}:
                    self.deployments[dep_id].on_event(event)  # type: ignore[index]

    def _names_of(self, mac: str) -> list[str]:
        node = self.deps.inventory.by_mac.get(mac)
        return [node.name] if node else []

    async def close(self) -> None:
        """Cancel running deployments."""
        for task in self.tasks.values():
            task.cancel()
        for task in list(self.tasks.values()):
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                pass
