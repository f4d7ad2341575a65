"""Handlers on deployments: start, list, show, follow, cancel; step statistics."""
from __future__ import annotations

import asyncio
import csv
import io
import json
from typing import Any

from aiohttp import ClientConnectionResetError, web

from appliance.api import models as m
from appliance.api.base import ApiError, Call
from appliance.api.deps import ApiDeps
from appliance.catalog import CatalogError
from appliance.deploy.controller import OverlapError
from appliance.deploy.workflow import parse_steps
from appliance.bootstages import STAGE_OF_RECORD
from appliance.timeline import gantt_svg

STREAM_KEEPALIVE_S = 15.0
# Log entries encoded per loop turn when a stream catches up: a 4000-node deployment's log is 300,000 entries, and
# encoding them in one turn held the loop (DHCP, TFTP, callbacks) for seconds.
STREAM_BATCH = 500
STATS_CSV_FIELDS = ("deployment", "node", "step", "impl", "attempt", "started", "ended", "duration", "ok", "reason")


async def start(deps: ApiDeps, call: Call) -> m.DeploymentReport:
    """POST /api/v1/deployments: deploy an environment on nodes."""
    body: m.DeployRequest = call.body
    user = call.me
    try:
        env = deps.catalog.get(body.env, user.name, user.admin)
    except CatalogError as exc:
        raise ApiError(404, str(exc)) from exc
    try:
        workflow = deps.controller.workflow_factory(body.broadcast, env.kexec)
        if body.steps:
            workflow = parse_steps(body.steps, workflow)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from exc
    try:
        dep = deps.controller.start(call.nodes, env, user.name, body.broadcast, force=body.force, workflow=workflow,
                                    ssh_keys=tuple(body.ssh_keys))
    except OverlapError as exc:
        raise ApiError(409, str(exc)) from exc
    return m.DeploymentReport.model_validate(dep.result())


def _visible(deps: ApiDeps, call: Call) -> tuple[Any, dict[str, Any]]:
    """Return (the live deployment or None, its report or stored record); 404 when the user may not see it."""
    dep_id = call.param("id")
    dep = deps.controller.deployments.get(dep_id)
    stored = dep.result() if dep is not None else deps.deployments.get(dep_id)
    if stored is None or (not call.me.admin and stored["user"] != call.me.name):
        raise ApiError(404, f"no deployment {dep_id}")
    return dep, stored


async def list_deployments(deps: ApiDeps, call: Call) -> m.DeploymentList:
    """GET /api/v1/deployments: the latest deployments the user may see."""
    user = call.me
    rows = deps.deployments.list(call.query.limit)
    return m.DeploymentList.model_validate({"deployments": [r for r in rows if user.admin or r["user"] == user.name]})


async def show(deps: ApiDeps, call: Call) -> m.Deployment:
    """GET /api/v1/deployments/ID: the controller's report, or the stored record."""
    dep, stored = _visible(deps, call)
    kind = m.DeploymentReport if dep is not None else m.StoredDeployment
    return m.Deployment(kind.model_validate(stored))


async def transitions(deps: ApiDeps, call: Call) -> m.TransitionList:
    """GET /api/v1/deployments/ID/transitions: every state change of its nodes, with when and why, as persisted."""
    _, stored = _visible(deps, call)
    return m.TransitionList(id=stored["id"], transitions=[
        m.TransitionRecord(node=t["node"], ts=t["ts"], from_state=t["from"], to_state=t["to"], step=t["step"],
                           impl=t["impl"], reason=t["reason"])
        for t in deps.deployments.transitions(stored["id"])])


async def timeline(deps: ApiDeps, call: Call) -> web.Response:
    """GET /api/v1/deployments/ID/timeline: its per-node timeline, the SVG Gantt chart of `rackboot stats --svg`."""
    found = await transitions(deps, call)
    nodes = [n for name in sorted({t.node for t in found.transitions}) if (n := deps.inventory.by_name.get(name))]
    records = [{"node": n.name, "kind": e.kind, "ts": e.ts}  # the nodes' boot records the appliance still holds
               for n in nodes for e in deps.events.last(n.mac) if e.kind in STAGE_OF_RECORD]
    svg = gantt_svg([t.model_dump() for t in found.transitions], f"deployment {found.id}", records)
    return web.Response(text=svg, content_type="image/svg+xml",
                        headers={"Content-Disposition": f'inline; filename="{found.id}-timeline.svg"'})


async def events(deps: ApiDeps, call: Call) -> web.StreamResponse:
    """GET /api/v1/deployments/ID/events: progress as JSON lines until the result."""
    dep, stored = _visible(deps, call)
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(call.request)
    if dep is None:
        await resp.write((json.dumps({"what": "finished", "status": stored["status"]}) + "\n").encode())
        return resp
    seen = call.query.after
    try:
        while True:
            entries = await dep.wait_log(seen, timeout=STREAM_KEEPALIVE_S)
            seen += len(entries)
            if not entries:
                await resp.write(b"\n")  # a blank line keeps the stream alive
            for i in range(0, len(entries), STREAM_BATCH):
                await resp.write("".join(json.dumps(e) + "\n" for e in entries[i:i + STREAM_BATCH]).encode())
                await asyncio.sleep(0)
            if dep.status != "running" and seen >= len(dep.log):
                break
        await resp.write((json.dumps({"what": "result", "result": dep.result()}) + "\n").encode())
    except (ClientConnectionResetError, ConnectionResetError):
        pass  # the client went away: the end of its stream, not an error of ours
    return resp


async def cancel(deps: ApiDeps, call: Call) -> m.Cancelled:
    """DELETE /api/v1/deployments/ID: cancel a running deployment."""
    _, stored = _visible(deps, call)
    if not deps.controller.cancel(stored["id"]):
        raise ApiError(409, f"deployment {stored['id']} is not running")
    return m.Cancelled(id=stored["id"], cancelled=True)


async def stats(deps: ApiDeps, call: Call) -> m.Stats | web.Response:
    """GET /api/v1/stats: per deployment, node and step: durations, retries, errors (JSON, or CSV)."""
    user = call.me
    rows = deps.deployments.steps(call.query.deployment)
    if not user.admin:
        mine = {d["id"] for d in deps.deployments.list(10000) if d["user"] == user.name}
        rows = [r for r in rows if r["deployment"] in mine]
    if call.query.format == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(STATS_CSV_FIELDS))
        writer.writeheader()
        writer.writerows(rows)
        return web.Response(text=buf.getvalue(), content_type="text/csv")
    summary: dict[str, dict[str, Any]] = {}
    for r in rows:
        s = summary.setdefault(r["step"], {"attempts": 0, "failures": 0, "total_s": 0.0, "max_s": 0.0})
        s["attempts"] += 1
        s["failures"] += 0 if r["ok"] else 1
        s["total_s"] = round(s["total_s"] + r["duration"], 3)
        s["max_s"] = max(s["max_s"], r["duration"])
    return m.Stats.model_validate({"steps": rows, "summary": summary})
