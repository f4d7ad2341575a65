"""Handlers on nodes: list and show them (profile, last events), switch a profile, power, reboot, exec."""
from __future__ import annotations

import asyncio

from ClusterShell.NodeSet import NodeSet

from appliance.api import models as m
from appliance.api.base import ApiError, Call
from appliance.api.deps import ApiDeps
from appliance.catalog import CatalogError
from appliance.deploy.controller import OverlapError
from appliance.deploy.power import PowerError
from domain.nodes import Node
from domain.progress import NodeEvent, ProfileSet, event_json


def event_view(event: NodeEvent) -> m.Event:
    """Return the served form of a node record (records carry no secret: domain/progress.py)."""
    return m.Event.model_validate(event_json(event))


def node_view(deps: ApiDeps, node: Node, n_events: int | None) -> m.NodeView:
    """Return a node with its (redacted) profile and last events."""
    return m.NodeView(name=node.name, mac=node.mac, ip=str(node.ip), rack=node.rack,
                      profile=m.Profile.of(deps.profiles.get(node.mac)),
                      events=[event_view(e) for e in deps.events.last(node.mac, n_events)])


async def list_nodes(deps: ApiDeps, call: Call) -> m.NodeList:
    """GET /api/v1/nodes[?events=N]: every inventory node with its profile and last events."""
    n = call.query.events
    return m.NodeList(nodes=[node_view(deps, node, n) for node in deps.inventory.nodes])


async def show_node(deps: ApiDeps, call: Call) -> m.NodeView:
    """GET /api/v1/nodes/NAME: one node with its profile and last events."""
    name = call.param("name")
    node = deps.inventory.by_name.get(name)
    if node is None:
        raise ApiError(404, f"no node {name!r} in the inventory")
    return node_view(deps, node, call.query.events)


async def set_profile(deps: ApiDeps, call: Call) -> m.NodeView:
    """PUT /api/v1/nodes/NAME/profile: what the node boots next."""
    [node] = call.nodes
    profile = call.body.to_profile()
    deps.profiles.set(node.mac, profile)
    deps.events.publish(ProfileSet(node.mac, profile.kind, profile.env, "api"))
    return node_view(deps, node, None)


async def power(deps: ApiDeps, call: Call) -> m.PowerAnswer:
    """POST /api/v1/power: on/off/reset/cycle/status on every node, in parallel."""
    body: m.PowerRequest = call.body
    busy = deps.controller.busy([n.name for n in call.nodes])
    if busy and body.op != "status" and not body.force:
        raise ApiError(409, f"{NodeSet.fromlist(list(busy))} in a running deployment")

    async def one(node: Node) -> m.PowerResult:
        try:
            return m.PowerResult(node=node.name, ok=True, state=await deps.power.power(node, body.op))
        except (PowerError, ValueError) as exc:
            return m.PowerResult(node=node.name, ok=False, error=str(exc))

    return m.PowerAnswer(op=body.op, results=list(await asyncio.gather(*(one(n) for n in call.nodes))))


async def reboot(deps: ApiDeps, call: Call) -> m.RebootAnswer:
    """POST /api/v1/reboot: reboot nodes (into deploy, local or an environment) and wait until they are back."""
    body: m.RebootRequest = call.body
    try:
        results = await deps.controller.reboot(call.nodes, body.to, body.level, call.me.name, force=body.force)
    except OverlapError as exc:
        raise ApiError(409, str(exc)) from exc
    except (ValueError, CatalogError) as exc:
        raise ApiError(400, str(exc)) from exc
    return m.RebootAnswer(level=body.level, to=body.to, results=[m.RebootResult.model_validate(r) for r in results])


async def run_command(deps: ApiDeps, call: Call) -> m.ExecAnswer:
    """POST /api/v1/exec: run a command on nodes through the agents' tree."""
    body: m.ExecRequest = call.body
    if deps.exec_runner is None:
        raise ApiError(501, "this appliance's deploy driver cannot run commands")
    result = await deps.exec_runner(call.nodes, body.command, body.fanout, body.timeout)
    grouped = [(names, r.to_json()) for names, r in result.grouped()]
    return m.ExecAnswer.model_validate({**result.to_json(), "grouped": grouped})
