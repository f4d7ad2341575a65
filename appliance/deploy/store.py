"""Deployments and their per-node states, persisted in the state database (survives a restart for reporting)."""
from __future__ import annotations

import json
import sqlite3
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from appliance.deploy.nodestate import Transition


# Why a node of a deployment the appliance's restart interrupted failed, by the state it was in.
INTERRUPTED_REASON = {
    "": "appliance restarted during the deployment",
    "pending": "appliance restarted during the deployment, before the node was touched",
    "SetDeploymentEnv": "appliance restarted while the node was going to the deploy environment (its disk may be partitioned)",
    "BroadcastEnv": "appliance restarted during the image broadcast: the node's disk holds a partial image",
    "BootNewEnv": "appliance restarted while the node was booting its new system: it may be running the installed system",
    "Reboot": "appliance restarted during the reboot",
}


class DeploymentStore:
    """SQLite tables: deployments, deployment_nodes (current state per node), node_transitions (every state change
    of every node, append-only) and step_log (one row per attempt)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        db.executescript(
            """
            CREATE TABLE IF NOT EXISTS deployments (
                id TEXT PRIMARY KEY, user TEXT, env TEXT, nodes TEXT, method TEXT, status TEXT,
                created REAL, finished REAL, params TEXT);
            CREATE TABLE IF NOT EXISTS deployment_nodes (
                deployment TEXT, node TEXT, state TEXT, step TEXT, impl TEXT, reason TEXT, updated REAL,
                PRIMARY KEY (deployment, node));
            CREATE TABLE IF NOT EXISTS step_log (
                deployment TEXT, node TEXT, step TEXT, impl TEXT, attempt INTEGER, started REAL, ended REAL,
                ok INTEGER, reason TEXT);
            CREATE TABLE IF NOT EXISTS node_transitions (
                deployment TEXT, node TEXT, ts REAL, from_state TEXT, to_state TEXT, step TEXT, impl TEXT, reason TEXT);
            CREATE INDEX IF NOT EXISTS node_transitions_by_node ON node_transitions (deployment, node);
            """
        )

    def create(self, dep_id: str, user: str, env: str, nodes: list[str], method: str, params: dict[str, Any]) -> None:
        """Record a new deployment and its nodes as pending."""
        now = time.time()
        with self._db:
            self._db.execute("INSERT INTO deployments VALUES (?, ?, ?, ?, ?, 'running', ?, NULL, ?)",
                             (dep_id, user, env, json.dumps(nodes), method, now, json.dumps(params)))
            self._db.executemany("INSERT INTO deployment_nodes VALUES (?, ?, 'pending', '', '', '', ?)",
                                 [(dep_id, n, now) for n in nodes])

    def transition(self, dep_id: str, t: Transition) -> None:
        """Record one node's state change: its current row, and a new row in node_transitions."""
        with self._db:
            self._db.execute("UPDATE deployment_nodes SET state=?, step=?, impl=?, reason=?, updated=? WHERE deployment=? AND node=?",
                             (t.to.value, t.step, t.impl, t.reason, t.ts, dep_id, t.node))
            self._db.execute("INSERT INTO node_transitions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (dep_id, t.node, t.ts, t.frm.value, t.to.value, t.step, t.impl, t.reason))

    def transitions(self, dep_id: str, node: str | None = None) -> list[dict[str, Any]]:
        """Return the state changes of a deployment's nodes (or of one node), oldest first."""
        q = "SELECT node, ts, from_state, to_state, step, impl, reason FROM node_transitions WHERE deployment=?"
        args: tuple[Any, ...] = (dep_id,)
        if node is not None:
            q += " AND node=?"
            args += (node,)
        return [{"node": r[0], "ts": r[1], "from": r[2], "to": r[3], "step": r[4], "impl": r[5], "reason": r[6]}
                for r in self._db.execute(q + " ORDER BY rowid", args)]

    def log_step(self, dep_id: str, node: str, step: str, impl: str, attempt: int, started: float, ok: bool, reason: str) -> None:
        """Append one finished attempt of a step on a node."""
        self._db.execute("INSERT INTO step_log VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (dep_id, node, step, impl, attempt, started, time.time(), int(ok), reason))

    def finish(self, dep_id: str, status: str) -> None:
        """Mark a deployment finished (done, failed, partial, cancelled)."""
        self._db.execute("UPDATE deployments SET status=?, finished=? WHERE id=?", (status, time.time(), dep_id))

    def get(self, dep_id: str) -> dict[str, Any] | None:
        """Return a deployment with its nodes, or None."""
        row = self._db.execute("SELECT id, user, env, nodes, method, status, created, finished, params FROM deployments WHERE id=?",
                               (dep_id,)).fetchone()
        if row is None:
            return None
        nodes = [
            {"node": n, "state": s, "step": st, "impl": i, "reason": r, "updated": u}
            for n, s, st, i, r, u in self._db.execute(
                "SELECT node, state, step, impl, reason, updated FROM deployment_nodes WHERE deployment=? ORDER BY rowid", (dep_id,))
        ]
        return {"id": row[0], "user": row[1], "env": row[2], "node_set": json.loads(row[3]), "method": row[4], "status": row[5],
                "created": row[6], "finished": row[7], "params": json.loads(row[8] or "{}"), "nodes": nodes}

    def list(self, limit: int = 50) -> list[dict[str, Any]]:
        """Return the latest deployments (without node detail)."""
        rows = self._db.execute("SELECT id, user, env, nodes, method, status, created, finished FROM deployments ORDER BY created DESC LIMIT ?",
                                (limit,)).fetchall()
        return [{"id": r[0], "user": r[1], "env": r[2], "node_count": len(json.loads(r[3])), "method": r[4], "status": r[5],
                 "created": r[6], "finished": r[7]} for r in rows]

    def steps(self, dep_id: str | None = None) -> list[dict[str, Any]]:
        """Return step attempts (for stats), of one deployment or all."""
        q = "SELECT deployment, node, step, impl, attempt, started, ended, ok, reason FROM step_log"
        args: tuple[Any, ...] = ()
        if dep_id:
            q += " WHERE deployment=?"
            args = (dep_id,)
        return [{"deployment": r[0], "node": r[1], "step": r[2], "impl": r[3], "attempt": r[4], "started": r[5], "ended": r[6],
                 "duration": round(r[6] - r[5], 3), "ok": bool(r[7]), "reason": r[8]} for r in self._db.execute(q + " ORDER BY started", args)]

    def mark_interrupted(self) -> list[tuple[str, str, str]]:
        """After a restart: deployments still 'running' were interrupted; say so, per node, with where each was.

        Return (deployment, node, state it was in) for every node that was not finished, so the caller can
        take the nodes off the deploy environment (its token died with the process).
        """
        interrupted: list[tuple[str, str, str]] = []
        with self._db:
            ids = [r[0] for r in self._db.execute("SELECT id FROM deployments WHERE status='running'")]
            now = time.time()
            for dep_id in ids:
                rows = self._db.execute("SELECT node, state, step, impl FROM deployment_nodes"
                                        " WHERE deployment=? AND state NOT IN ('done', 'failed')", (dep_id,)).fetchall()
                for node, state, step, impl in rows:
                    why = INTERRUPTED_REASON.get(state, INTERRUPTED_REASON[""])
                    self._db.execute("INSERT INTO node_transitions VALUES (?, ?, ?, ?, 'failed', ?, ?, ?)",
                                     (dep_id, node, now, state, step, impl, why))
                    self._db.execute("UPDATE deployment_nodes SET state='failed', reason=?, updated=?"
                                     " WHERE deployment=? AND node=?", (why, now, dep_id, node))
                    interrupted.append((dep_id, node, state))
                self._db.execute("UPDATE deployments SET status='interrupted', finished=? WHERE id=?", (now, dep_id))
        return interrupted