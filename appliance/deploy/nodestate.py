"""One node's progress in a deployment, as a declared state machine: the states, the allowed transitions as data,
and the one function that performs a transition (checked, and recorded with a timestamp and a reason).

    pending ──> SetDeploymentEnv ──> BroadcastEnv ──> BootNewEnv ──> done
       │               │                  │                │
       └──> Reboot ──> done               └──── any ───────┴──> failed

A macro-step state goes to itself when the next attempt or the next implementation starts (the row says which).
The strings are the ones persisted in `deployment_nodes.state` and `node_transitions`.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from appliance.deploy.bootwatch import BootWatch
from domain.errors import RackbootError
from domain.nodes import Node


class NodeState(StrEnum):
    """Where a node is in its deployment (or reboot): waiting, in a macro-step, or finished."""

    PENDING = "pending"
    SET_DEPLOYMENT_ENV = "SetDeploymentEnv"
    BROADCAST_ENV = "BroadcastEnv"
    BOOT_NEW_ENV = "BootNewEnv"
    REBOOT = "Reboot"  # the one macro-step of a reboot workflow
    DONE = "done"
    FAILED = "failed"


FINAL = frozenset({NodeState.DONE, NodeState.FAILED})

# state -> the states it may go to; nothing leaves a final state.
TRANSITIONS: dict[NodeState, frozenset[NodeState]] = {
    NodeState.PENDING: frozenset({NodeState.SET_DEPLOYMENT_ENV, NodeState.REBOOT, NodeState.FAILED}),
    NodeState.SET_DEPLOYMENT_ENV: frozenset({NodeState.SET_DEPLOYMENT_ENV, NodeState.BROADCAST_ENV, NodeState.FAILED}),
    NodeState.BROADCAST_ENV: frozenset({NodeState.BROADCAST_ENV, NodeState.BOOT_NEW_ENV, NodeState.FAILED}),
    NodeState.BOOT_NEW_ENV: frozenset({NodeState.BOOT_NEW_ENV, NodeState.DONE, NodeState.FAILED}),
    NodeState.REBOOT: frozenset({NodeState.REBOOT, NodeState.DONE, NodeState.FAILED}),
    NodeState.DONE: frozenset(),
    NodeState.FAILED: frozenset(),
}


class IllegalTransition(RackbootError):
    """A node was asked to go where its state table does not lead."""


class Outcome(StrEnum):
    """How one node's attempt at a macro-step implementation ended."""

    OK = "ok"
    FAILED = "failed"      # a retry or the next implementation may do better
    HOPELESS = "hopeless"  # nothing can work for this node in this deployment: fail it now, no retries


@dataclass(frozen=True)
class Attempt:
    """The outcome of one node's attempts at one implementation, with the reason when it is not OK."""

    outcome: Outcome
    reason: str = ""


@dataclass(frozen=True)
class Transition:
    """One state change of one node, as persisted in node_transitions."""

    ts: float
    node: str
    frm: NodeState
    to: NodeState
    step: str
    impl: str
    reason: str


@dataclass
class NodeRun:
    """One node's progress in a deployment."""

    node: Node
    state: NodeState = NodeState.PENDING
    step: str = ""
    impl: str = ""
    reason: str = ""
    watch: BootWatch | None = None  # the boot being watched, while one is
    last_stage: str = ""            # the stage the last watched boot ended in
    callback: dict[str, str] = field(default_factory=dict)  # what the node's last accepted callback said
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    notes: list[str] = field(default_factory=list)
    history: list[Transition] = field(default_factory=list)
    step_times: dict[str, float] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        """True when the node is out of the deployment."""
        return self.state is NodeState.FAILED

    @property
    def finished(self) -> bool:
        """True when the node is done or failed."""
        return self.state in FINAL

    @property
    def boot_stage(self) -> str:
        """The stage of the boot being watched, else of the last one."""
        return self.watch.stage.value if self.watch else self.last_stage

    def end_watch(self) -> None:
        """Stop watching the current boot, keeping the stage it reached."""
        if self.watch is not None:
            self.last_stage = self.watch.stage.value
        self.watch = None

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "node": self.node.name, "mac": self.node.mac, "state": self.state.value, "step": self.step, "impl": self.impl,
            "reason": self.reason, "boot_stage": self.watch.stage.value if self.watch else "",
            "notes": list(self.notes), "step_times": dict(self.step_times),
        }


def advance(run: NodeRun, to: NodeState, ts: float, step: str = "", impl: str = "", reason: str = "") -> Transition:
    """Move a node to state `to` if its table allows it; set step, impl and reason; return the recorded transition."""
    if to not in TRANSITIONS[run.state]:
        raise IllegalTransition(f"{run.node.name}: no transition {run.state.value} -> {to.value}")
    record = Transition(ts, run.node.name, run.state, to, step or run.step, impl or run.impl, reason)
    run.state, run.step, run.impl, run.reason = to, record.step, record.impl, reason
    run.history.append(record)
    return record
