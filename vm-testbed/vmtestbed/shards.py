"""The node daemon split into shards (pure): which process owns which nodes, its files, and the fan-out of control requests.

A testbed runs plan.daemons node-daemon processes. Shard i owns a set of namespace nodes (whole racks when there
are at least as many racks as shards, else consecutive runs of nodes) and their BMCs; shard 0 also owns every
QEMU VM. Each shard has its own control socket, ready file and log in the testbed's state dir. A control request
naming nodes goes to the shards owning them; one for every node goes to every shard; the replies merge into the
answer a single daemon would give, plus a "shards" list (per-process pid, CPU, RSS, event-loop lag).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from vmtestbed.plan import NodePlan, TestbedPlan

PLAN_FILE = "plan.json"


def control_socket(state_dir: Path, shard: int) -> Path:
    """The control socket of one node-daemon shard."""
    return state_dir / f"control-{shard}.sock"


def ready_file(state_dir: Path, shard: int) -> Path:
    """The file a shard writes (its pid) once its nodes and BMCs are ready."""
    return state_dir / f"daemon-{shard}.ready"


def log_file(state_dir: Path, shard: int) -> Path:
    """A shard's log."""
    return state_dir / f"daemon-{shard}.log"


def shard_nodes(plan: TestbedPlan) -> list[list[NodePlan]]:
    """The nodes of each shard, in plan order: whole racks per shard when there are enough racks, VMs in shard 0."""
    k = plan.daemons
    netns = plan.netns_nodes
    shards: list[list[NodePlan]] = [[] for _ in range(k)]
    if k <= plan.racks:
        for n in netns:
            shards[(int(n.rack[1:]) - 1) * k // plan.racks].append(n)
    if any(not s for s in shards):  # too few racks, or racks holding only VMs: consecutive runs of nodes instead
        shards = [[] for _ in range(k)]
        for i, n in enumerate(netns):
            shards[i * k // len(netns)].append(n)
    shards[0].extend(plan.vms)
    return shards


def owners(plan: TestbedPlan) -> dict[str, int]:
    """Node name -> the shard that owns it."""
    return {n.name: i for i, nodes in enumerate(shard_nodes(plan)) for n in nodes}


def split_request(req: dict[str, Any], owner: dict[str, int], shards: int) -> dict[int, dict[str, Any]]:
    """The request each shard gets: all of them for every node, else each owner its own nodes; KeyError for an unknown node."""
    names = req.get("nodes")
    if names in (None, "all"):
        return {i: req for i in range(shards)}
    parts: dict[int, list[str]] = {}
    for name in names:
        parts.setdefault(owner[name], []).append(name)
    if not parts:
        return {0: req}
    return {i: {**req, "nodes": nodes} for i, nodes in sorted(parts.items())}


def merge_replies(op: str, replies: dict[int, dict[str, Any]], order: list[str]) -> dict[str, Any]:
    """One answer from the shards' answers (all ok), as one daemon would give it; node lists follow `order`."""
    first = replies[min(replies)]
    if op == "status":
        rank = {name: i for i, name in enumerate(order)}
        nodes = [n for i in sorted(replies) for n in replies[i]["nodes"]]
        nodes.sort(key=lambda n: rank.get(n["name"], len(rank)))
        per_shard = [{"shard": i, "pid": r["pid"], "cpu_s": r.get("cpu_s", 0.0), "rss": r["rss"], "loop_lag_max": r["loop_lag_max"],
                      "nodes": r.get("owned", len(r["nodes"])), "bmcs": r["bmcs"], "vms": r["vms"]} for i, r in sorted(replies.items())]
        return {"ok": True, "name": first["name"], "pid": first["pid"], "rss": sum(r["rss"] for r in replies.values()),
                "uptime": min(r["uptime"] for r in replies.values()), "vms": sum(r["vms"] for r in replies.values()),
                "bmcs": sum(r["bmcs"] for r in replies.values()), "loop_lag_max": max(r["loop_lag_max"] for r in replies.values()),
                "cpu_s": round(sum(r.get("cpu_s", 0.0) for r in replies.values()), 2), "nodes": nodes, "shards": per_shard}
    if op == "power":
        changed: dict[str, Any] = {}
        for i in sorted(replies):
            changed.update(replies[i].get("changed", {}))
        rank = {name: i for i, name in enumerate(order)}
        return {"ok": True, "changed": dict(sorted(changed.items(), key=lambda kv: rank.get(kv[0], len(rank))))}
    if op == "ping":
        return {"ok": True, "pid": first["pid"], "pids": [replies[i]["pid"] for i in sorted(replies)]}
    return dict(first)
