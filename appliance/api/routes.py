"""The route table of /api/v1: each entry drives both its aiohttp route and its OpenAPI operation.

An entry says method, path, handler, summary, who may call it (open, any user, admin only; and the right a
user needs on the nodes it names), its request body, query and response models. `bind` turns an entry
into an aiohttp handler that validates query and body once (400 naming the field), resolves and checks
the nodes, calls the handler and serializes the model it returns.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Literal, Mapping

from aiohttp import web
from pydantic import BaseModel, ValidationError

from appliance.api import deployments, environments, live, nodes, users
from appliance.api import models as m
from appliance.api.base import USER_KEY, ApiError, Call, Handler, error
from appliance.api.deps import ApiDeps
from appliance.auth import AuthError
from domain.errors import ConfigError
from domain.nodes import Node

Access = Literal["open", "user", "admin"]
PATH_PARAM = re.compile(r"{(\w+)}")


@dataclass(frozen=True)
class Route:
    """One operation of the API."""

    method: str
    path: str
    handler: Handler
    summary: str
    access: Access = "user"
    right: str | None = None  # needed on the nodes of body.nodes, or on the node of the path's {name}
    body: type[m.Request] | None = None
    multipart: Mapping[str, str] | None = None  # multipart part name -> what it carries
    query: type[m.Query] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    media: str = "application/json"  # of the response model
    also: Mapping[str, str] = field(default_factory=dict)  # other response media types -> when
    errors: tuple[int, ...] = ()  # statuses the handler answers besides the ones the table implies

    @property
    def path_params(self) -> list[str]:
        """The names of the path's {parameters}."""
        return PATH_PARAM.findall(self.path)


def _problems(exc: ValidationError) -> str:
    """Name each bad field and say what is wrong with it."""
    out = []
    for e in exc.errors(include_url=False):
        where = ".".join(str(part) for part in e["loc"]) or "body"
        out.append(f"{where}: {e['msg']}")
    return "; ".join(out)


def _parse(model: type[BaseModel], data: Any, what: str) -> Any:
    try:
        return model.model_validate_json(data) if isinstance(data, bytes) else model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(400, f"bad {what}: {_problems(exc)}") from exc


def _named_nodes(route: Route, deps: ApiDeps, call: Call) -> list[Node]:
    """Return the nodes a route's right applies to: the path's {name}, or the body's node set."""
    if "name" in route.path_params:
        name = call.param("name")
        node = deps.inventory.by_name.get(name)
        if node is None:
            raise ApiError(404, f"no node {name!r} in the inventory")
        return [node]
    try:
        return deps.inventory.select(call.body.nodes)
    except ConfigError as exc:
        raise ApiError(400, str(exc)) from exc


def bind(route: Route, deps: ApiDeps) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Return the aiohttp handler of a route entry."""

    async def handle(request: web.Request) -> web.StreamResponse:
        call = Call(request, request.get(USER_KEY))
        try:
            if route.query is not None:
                call.query = _parse(route.query, dict(request.query), "query")
            if route.body is not None:
                call.body = _parse(route.body, await request.read(), "body")
            if route.right is not None:
                call.nodes = _named_nodes(route, deps, call)
                deps.users.check(call.me, route.right, [n.name for n in call.nodes])
            result = await route.handler(deps, call)
        except ApiError as exc:
            return error(exc.status, exc.message)
        except AuthError as exc:
            return error(exc.status, str(exc))
        if isinstance(result, web.StreamResponse):
            return result
        # pydantic's serializer writes the JSON in one pass, far faster than model_dump() then json.dumps on a large node list
        return web.Response(text=result.model_dump_json(), status=route.status, content_type="application/json")

    handle.__doc__ = route.summary
    return handle


ROUTES: tuple[Route, ...] = (
    Route("GET", "/api/v1/health", users.health, "read liveness and counters", access="open", response=m.Health),
    Route("GET", "/api/v1/openapi.json", users.openapi, "read this document", access="open"),
    Route("GET", "/api/v1/whoami", users.whoami, "read the user of the token", response=m.WhoAmI),
    # deployments
    Route("POST", "/api/v1/deployments", deployments.start, "start a deployment", right="deploy", body=m.DeployRequest,
          response=m.DeploymentReport, status=201, errors=(404, 409)),
    Route("GET", "/api/v1/deployments", deployments.list_deployments, "list the latest deployments",
          query=m.DeploymentsQuery, response=m.DeploymentList),
    Route("GET", "/api/v1/deployments/{id}", deployments.show, "read a deployment with its nodes", response=m.Deployment),
    Route("GET", "/api/v1/deployments/{id}/events", deployments.events, "follow a deployment: progress as JSON lines until the result",
          query=m.EventsQuery, response=m.ProgressLine, media="application/x-ndjson"),
    Route("GET", "/api/v1/deployments/{id}/transitions", deployments.transitions,
          "every state change of a deployment's nodes, with when and why", response=m.TransitionList),
    Route("GET", "/api/v1/deployments/{id}/timeline", deployments.timeline,
          "read a deployment's per-node timeline, an SVG Gantt chart", media="image/svg+xml"),
    Route("DELETE", "/api/v1/deployments/{id}", deployments.cancel, "cancel a deployment", response=m.Cancelled, errors=(409,)),
    Route("GET", "/api/v1/stats", deployments.stats, "read per deployment, node and step: durations, retries, errors",
          query=m.StatsQuery, response=m.Stats, also={"text/csv": "with ?format=csv: one row per step attempt"}),
    Route("GET", "/api/v1/live", live.live, "follow node records and deployment progress: server-sent events (the dashboard's feed)",
          query=m.LiveQuery, media="text/event-stream"),
    # environments
    Route("GET", "/api/v1/environments", environments.list_envs, "list the environments visible to the user",
          response=m.EnvironmentList),
    Route("POST", "/api/v1/environments", environments.add_env, "add an environment (multipart: description YAML, image file)",
          multipart=environments.ENV_PARTS, response=m.EnvironmentView, status=201, errors=(400, 403, 409)),
    Route("GET", "/api/v1/environments/{ref}", environments.show_env, "read an environment (NAME or NAME:VERSION)",
          response=m.EnvironmentView),
    Route("DELETE", "/api/v1/environments/{ref}", environments.remove_env, "remove an environment", response=m.Removed),
    # nodes
    Route("GET", "/api/v1/nodes", nodes.list_nodes, "list nodes with their boot profile and last boot events",
          query=m.NodesQuery, response=m.NodeList),
    Route("GET", "/api/v1/nodes/{name}", nodes.show_node, "read one node", query=m.NodesQuery, response=m.NodeView),
    Route("PUT", "/api/v1/nodes/{name}/profile", nodes.set_profile, "switch a node's boot profile", right="deploy",
          body=m.ProfileRequest, response=m.NodeView),
    Route("POST", "/api/v1/power", nodes.power, "power nodes on, off, reset, cycle or read their status", right="power",
          body=m.PowerRequest, response=m.PowerAnswer, errors=(409,)),
    Route("POST", "/api/v1/reboot", nodes.reboot, "reboot nodes (to deploy, local or an environment)", right="reboot",
          body=m.RebootRequest, response=m.RebootAnswer, errors=(409,)),
    Route("POST", "/api/v1/exec", nodes.run_command, "run a command on nodes through the agents' tree", right="console",
          body=m.ExecRequest, response=m.ExecAnswer, errors=(501,)),
    # users
    Route("GET", "/api/v1/users", users.list_users, "list users and their rights", access="admin", response=m.UserList),
    Route("POST", "/api/v1/users", users.add_user, "add a user (returns its token)", access="admin", body=m.UserAddRequest,
          response=m.NewUser, status=201, errors=(409,)),
    Route("DELETE", "/api/v1/users/{name}", users.remove_user, "remove a user", access="admin", response=m.Removed,
          errors=(409,)),
    Route("POST", "/api/v1/users/{name}/rights", users.grant, "grant rights on a node set", access="admin",
          body=m.GrantRequest, response=m.Granted),
    Route("DELETE", "/api/v1/users/{name}/rights", users.revoke, "take rights on a node set away", access="admin",
          body=m.RevokeRequest, response=m.Revoked),
)
