"""One deployment (or reboot) of a node set: runs its workflow's macro-steps, takes the boot services' events,
ends with a report whatever happens (done, partial, failed, cancelled, or failed on an internal error).

Each node carries a declared state (appliance/deploy/nodestate.py), changed only through the Journal, which
persists every change as it happens. Within a boot, a BootWatch turns the boot services' records (domain/progress.py) into
stages with deadlines, checked by a ticker on the injected clock, so a node stuck in firmware is escalated or
failed in seconds (appliance/deploy/reboot.py).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ClusterShell.NodeSet import NodeSet

from appliance.catalog import Environment
from appliance.deploy.bootwatch import DEPLOY
from appliance.deploy.deps import ControllerDeps
from appliance.deploy.nodestate import NodeRun, NodeState
from appliance.deploy.reboot import Rebooter
from appliance.deploy.report import Journal, build_report
from appliance.deploy.steps import RUNNERS
from appliance.deploy.workflow import Workflow
from domain.logfields import fields
from domain.nodes import Node
from domain.progress import AgentUp, NodeEvent, OsReachable, OsUp

log = logging.getLogger("rackboot.deploy")

TICK = 0.25  # seconds between two deadline checks


def describe_error(exc: BaseException) -> str:
    """Return 'Type: message' of an exception, of the first one inside single-exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


class Deployment:
    """One deployment of one environment (or one reboot) on a node set."""

    def __init__(self, dep_id: str, nodes: list[Node], env: Environment, user: str, workflow: Workflow,
                 deps: ControllerDeps, ssh_keys: tuple[str, ...] = ()) -> None:
        self.id = dep_id
        self.env = env
        self.user = user
        self.ssh_keys = ssh_keys  # the user's public keys, for root on the installed systems
        self.workflow = workflow
        self.deps = deps
        self.clock = deps.clock
        self.runs: dict[str, NodeRun] = {n.name: NodeRun(n) for n in nodes}
        self.by_mac: dict[str, NodeRun] = {n.mac: self.runs[n.name] for n in nodes}
        self.status = "running"
        self.error = ""
        self.started = time.time()
        self.finished: float | None = None
        self.journal = Journal(dep_id, deps.store)
        self._stalled_seen = deps.loop_stalled()
        self.rebooter = Rebooter(deps.power, deps.agent, self.clock, workflow.deadlines, workflow.reboot_window,
                                 deps.power_off_wait, self.journal.note,
                                 reached=lambda run, env: deps.events.publish(OsReachable(run.node.mac, dep_id, env)),
                                 probe_interval=deps.os_probe_interval)

    # -- reporting ----------------------------------------------------------------------------------

    @property
    def log(self) -> list[dict[str, Any]]:
        """The deployment's log entries, oldest first."""
        return self.journal.entries

    async def wait_log(self, after: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Return log entries after index `after`, waiting up to timeout for new ones."""
        return await self.journal.wait(after, lambda: self.status == "running", timeout)

    def fail(self, run: NodeRun, step: str, impl: str, reason: str) -> None:
        """Take a node out of the deployment: failed in step/impl for reason; its one-time token revoked.

        A node already out (failed, or taken over by a forced deployment) stays as it is.
        """
        if run.finished:
            return
        log.info("%s: %s failed in %s/%s: %s", self.id, run.node.name, step, impl, reason,
                 extra=fields(node=run.node.name, mac=run.node.mac, deployment=self.id, step=step))
        self.journal.move(run, NodeState.FAILED, step, impl, reason)
        self.deps.tokens.revoke(run.node.mac, self.id)

    def result(self) -> dict[str, Any]:
        """Return the report: nodes OK and KO, with the step and the reason for each failure."""
        head = {"id": self.id, "env": self.env.ref, "user": self.user, "status": self.status,
                "started": self.started, "finished": self.finished}
        if self.error:
            head["error"] = self.error
        return build_report(head, self.runs.values())

    # -- events -------------------------------------------------------------------------------------

    def on_event(self, event: NodeEvent) -> None:
        """Feed one boot-service record to the node it concerns (the one intake of node progress)."""
        run = self.by_mac.get(event.mac)
        if run is None or run.watch is None or run.failed:
            return
        if isinstance(event, (AgentUp, OsUp, OsReachable)):
            if event.deployment != self.id:
                return  # a late callback of an earlier deployment of this node (its token was checked for that one)
            if isinstance(event, AgentUp):
                run.callback = {"ssh_port": str(event.ssh_port), "data_port": str(event.data_port)}
                if run.watch.target == DEPLOY:
                    self.deps.agent.agent_up(run.node, run.callback)
            else:
                run.callback = {"env": event.env}
        if run.watch.on_event(event, self.clock.now()):
            self.journal.note(run, "boot", stage=run.watch.stage.value)
            run.changed.set()

    def tick(self) -> None:
        """Check every waiting node's deadline, after moving them all by the time the appliance's loop stalled since
        the last tick: a node is not late because the appliance did not read its packets."""
        now = self.clock.now()
        stalled = self.deps.loop_stalled()
        lag, self._stalled_seen = stalled - self._stalled_seen, stalled
        if lag > 0:
            log.info("%s: the appliance's loop stalled %.2f s: boot deadlines moved by as much", self.id, lag)
        for run in self.runs.values():
            if run.watch is not None and lag > 0:
                run.watch.postpone(lag)
            if run.watch is not None and run.watch.on_tick(now):
                self.journal.note(run, "boot", stage=run.watch.stage.value, reason=run.watch.reason)
                run.changed.set()

    async def _ticker(self) -> None:
        while True:
            await self.clock.sleep(TICK)
            self.tick()

    # -- the workflow -------------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        """Run the whole workflow, each macro-step by its runner; return the report.

        Cancelled: unfinished nodes fail 'deployment cancelled'. Any other exception fails the deployment
        (status failed, unfinished nodes 'internal error: ...', logged with its traceback) instead of escaping.
        """
        ticker = asyncio.create_task(self._ticker())
        try:
            for step in self.workflow.steps:
                alive = [r for r in self.runs.values() if not r.failed]
                if not alive:
                    break
                self.journal.note(None, "step", step=step.name, nodes=str(NodeSet.fromlist([r.node.name for r in alive])))
                await RUNNERS[step.name](self, step, alive)
            for r in self.runs.values():
                if not r.finished:
                    self.journal.move(r, NodeState.DONE, self.workflow.steps[-1].name, r.impl)
            n_ok = sum(1 for r in self.runs.values() if r.state is NodeState.DONE)
            self.status = "done" if n_ok == len(self.runs) else ("failed" if n_ok == 0 else "partial")
        except asyncio.CancelledError:
            self._fail_unfinished("deployment cancelled")
            self.status = "cancelled"
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must end the deployment, not leave it running for ever
            self.error = f"internal error: {describe_error(exc)}"
            self.status = "failed"
            log.exception("%s: %s", self.id, self.error)
            self._fail_unfinished(self.error)
        finally:
            ticker.cancel()
            self.finished = time.time()
            self.deps.store.finish(self.id, self.status)
            for r in self.runs.values():
                self.deps.tokens.revoke(r.node.mac, self.id)
            self.journal.note(None, "finished", status=self.status, **({"error": self.error} if self.error else {}))
        return self.result()

    def _fail_unfinished(self, reason: str) -> None:
        for r in self.runs.values():
            if not r.finished:
                r.end_watch()
                self.fail(r, r.step or "pending", r.impl, reason)
