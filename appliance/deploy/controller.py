"""The deployment controller: starts deployments and reboots (both run as workflows, see deployment.py), refuses
overlapping ones, routes the boot services' events to them."""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any, Callable

from ClusterShell.NodeSet import NodeSet

from appliance.catalog import Environment
from appliance.deploy.deployment import Deployment
from appliance.deploy.deps import ControllerDeps
from appliance.deploy.nodestate import NodeState
from appliance.deploy.reboot import LEVEL_IMPL
from appliance.deploy.workflow import Workflow, reboot_workflow
from domain.errors import RackbootError
from domain.nodes import Node
from domain.progress import NodeEvent

__all__ = ["Controller", "ControllerDeps", "Deployment", "OverlapError", "REBOOT_LEVELS"]

log = logging.getLogger("rackboot.deploy")

REBOOT_LEVELS = tuple(LEVEL_IMPL)  # soft, hard, very_hard


class OverlapError(RackbootError):
    """Nodes are already part of a running deployment."""


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
              workflow: Workflow | None = None, ssh_keys: tuple[str, ...] = ()) -> Deployment:
        """Create and start a deployment (ssh_keys go to root's authorized_keys on the installed systems); raise
        OverlapError when nodes are busy (unless force)."""
        wf = workflow or self.workflow_factory(method, env.kexec)
        return self._launch("d", nodes, env, user, wf, method, {"force": force, "ssh_keys": len(ssh_keys)}, force, ssh_keys)

    async def reboot(self, nodes: list[Node], to: str, level: str, user: str, force: bool = False) -> list[dict[str, Any]]:
        """Reboot nodes (optionally into 'deploy', 'local' or an environment) from a level up; wait until each is
        back. Runs as a workflow of one Reboot macro-step; return [{node, ok, reason, stage}]."""
        if level not in LEVEL_IMPL:
            raise ValueError(f"level must be one of {', '.join(LEVEL_IMPL)}")
        env = self.deps.catalog.get(to) if to not in ("", "deploy", "local") else Environment(name="reboot", version=1, owner=user)
        wf = reboot_workflow(LEVEL_IMPL[level], to, self.workflow_factory("chain", False))
        dep = self._launch("r", nodes, env, user, wf, "reboot", {"force": force, "level": level, "to": to}, force)
        task = self.tasks[dep.id]
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            task.cancel()  # the caller gave up (the client went away): so does the reboot
            raise
        return [{"node": r.node.name, "ok": r.state is NodeState.DONE, "reason": "" if r.state is NodeState.DONE else r.reason,
                 "stage": r.boot_stage} for r in dep.runs.values()]

    def _launch(self, prefix: str, nodes: list[Node], env: Environment, user: str, wf: Workflow, method: str,
                params: dict[str, Any], force: bool, ssh_keys: tuple[str, ...] = ()) -> Deployment:
        """Check overlaps (a forced run takes the nodes over), record, register and start a workflow run."""
        names = [n.name for n in nodes]
        overlap = self.busy(names)
        if overlap and not force:
            raise OverlapError(f"{NodeSet.fromlist(list(overlap))} already in deployment(s) {', '.join(sorted(set(overlap.values())))}")
        for name, other in overlap.items():
            dep = self.deployments.get(other)
            if dep is not None and name in dep.runs:
                dep.fail(dep.runs[name], dep.runs[name].step or "pending", "", "taken over by a forced deployment")
        dep_id = time.strftime(f"{prefix}%Y%m%d-%H%M%S-") + secrets.token_hex(2)
        dep = Deployment(dep_id, nodes, env, user, wf, self.deps, ssh_keys)
        self.deps.store.create(dep_id, user, env.ref, names, method, params)
        self.deployments[dep_id] = dep
        for n in names:
            self._busy[n] = dep_id
        task = asyncio.create_task(dep.run(), name=f"deployment {dep_id}")
        task.add_done_callback(lambda t, d=dep: self._finished(d))
        self.tasks[dep_id] = task
        return dep

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
        """Cancel running deployments and wait for them; log any that ended on an exception."""
        for task in self.tasks.values():
            task.cancel()
        for dep_id, task in list(self.tasks.items()):
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:  # noqa: BLE001 - shutting down: say it, do not raise it
                log.exception("deployment %s ended with an error", dep_id)
