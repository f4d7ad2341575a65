"""Handlers on users and rights, and on the API itself: health, whoami, the OpenAPI document."""
from __future__ import annotations

from aiohttp import web

from appliance.api import models as m
from appliance.api.base import Call
from appliance.api.deps import ApiDeps


async def health(deps: ApiDeps, call: Call) -> m.Health:
    """GET /api/v1/health (no token): liveness and the counters of every service."""
    counters = {name: dict(values) for name, values in deps.stats().items()}
    return m.Health(nodes=len(deps.inventory), counters=counters)


async def openapi(deps: ApiDeps, call: Call) -> web.Response:
    """GET /api/v1/openapi.json (no token): the document generated from the route table."""
    return web.json_response(deps.openapi)


async def whoami(deps: ApiDeps, call: Call) -> m.WhoAmI:
    """GET /api/v1/whoami: the user of the token."""
    return m.WhoAmI(name=call.me.name, admin=call.me.admin)


async def list_users(deps: ApiDeps, call: Call) -> m.UserList:
    """GET /api/v1/users (admin): users and their rights."""
    return m.UserList.model_validate({"users": deps.users.list()})


async def add_user(deps: ApiDeps, call: Call) -> m.NewUser:
    """POST /api/v1/users (admin): add a user; its token is shown once."""
    body: m.UserAddRequest = call.body
    return m.NewUser(name=body.name, token=deps.users.add(body.name, body.admin))


async def remove_user(deps: ApiDeps, call: Call) -> m.Removed:
    """DELETE /api/v1/users/NAME (admin): remove a user and its rights."""
    deps.users.remove(call.param("name"))
    return m.Removed(removed=call.param("name"))


async def grant(deps: ApiDeps, call: Call) -> m.Granted:
    """POST /api/v1/users/NAME/rights (admin): give a user rights on a node set."""
    body: m.GrantRequest = call.body
    deps.users.grant(call.param("name"), body.nodes, list(body.perms))
    return m.Granted(user=call.param("name"), nodes=body.nodes, perms=list(body.perms))


async def revoke(deps: ApiDeps, call: Call) -> m.Revoked:
    """DELETE /api/v1/users/NAME/rights (admin): take a user's rights on a node set away."""
    body: m.RevokeRequest = call.body
    return m.Revoked(user=call.param("name"), nodes=body.nodes, revoked=deps.users.revoke(call.param("name"), body.nodes))
