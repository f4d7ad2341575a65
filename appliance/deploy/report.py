"""A deployment's journal (the log clients stream, and the one place node states change, persisted as they change)
and its report (nodes OK and KO, with the step and the reason of each failure)."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Iterable

from ClusterShell.NodeSet import NodeSet

from appliance.deploy.nodestate import NodeRun, NodeState, Transition, advance
from appliance.deploy.store import DeploymentStore

log = logging.getLogger("rackboot.deploy")
from domain.logfields import fields
from domain.aio import within


class Journal:
    """The log of one deployment, and its node transitions: each checked, logged and persisted at once."""

    def __init__(self, dep_id: str, store: DeploymentStore) -> None:
        self.dep_id = dep_id
        self.store = store
        self.entries: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    def note(self, run: NodeRun | None, what: str, **detail: Any) -> None:
        """Append one log entry (about a node, or about the deployment when run is None) and wake the readers."""
        self.entries.append({"ts": time.time(), "node": run.node.name if run else "", "what": what, **detail})
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait(self, after: int, running: Callable[[], bool], timeout: float = 30.0) -> list[dict[str, Any]]:
        """Return the entries after index `after`, waiting up to timeout for new ones while running() holds."""
        if len(self.entries) <= after and running():
            try:
                await within(self._changed.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        return self.entries[after:]

    def move(self, run: NodeRun, to: NodeState, step: str = "", impl: str = "", reason: str = "") -> Transition:
        """Perform one node transition: check it against the table, record it, persist it, log it."""
        before = run.state
        record = advance(run, to, time.time(), step, impl, reason)
        self.store.transition(self.dep_id, record)
        log.info("%s: %s %s -> %s%s", self.dep_id, run.node.name, before.value, to.value, f" ({reason})" if reason else "",
                 extra=fields(node=run.node.name, mac=run.node.mac, deployment=self.dep_id, step=run.step))
        self.note(run, to.value, step=run.step, impl=run.impl, reason=reason)
        return record


def build_report(head: dict[str, Any], runs: Iterable[NodeRun]) -> dict[str, Any]:
    """Return the report: head (id, env, user, status, times) with the nodes OK and KO and every node's detail."""
    runs = list(runs)
    ok = [r.node.name for r in runs if r.state is NodeState.DONE]
    ko = [{"node": r.node.name, "step": r.step, "impl": r.impl, "reason": r.reason} for r in runs if r.state is not NodeState.DONE]
    return {
        **head, "ok": ok, "ko": ko, "ok_nodeset": str(NodeSet.fromlist(ok)) if ok else "",
        "ko_nodeset": str(NodeSet.fromlist([k["node"] for k in ko])) if ko else "",
        "nodes": [r.to_json() for r in runs],
    }
