"""Api: puts the route table of /api/v1 and the auth middleware on the appliance's aiohttp application.

Every request under /api/v1 but the open routes (health, the OpenAPI document) carries a user's API token
(Authorization: Bearer TOKEN); rights are checked on every request. Node-facing endpoints take no user
token: callbacks and image downloads carry the per-deployment, per-node one-time token instead (their
check and the /images route stay here until they move to netboot).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping

from aiohttp import web

from appliance.api.auth import API_PREFIX, authorize
from appliance.api.base import error
from appliance.api.deps import ApiDeps, DeploymentControl, DeploymentReader, ExecRunner, NodeEvents, PowerSwitch, Profiles
from appliance.api.openapi import build_openapi
from appliance.api.routes import ROUTES, Route, bind
from appliance.auth import AuthError, NodeTokens, Users
from appliance.catalog import Catalog
from appliance.inventory import Inventory

log = logging.getLogger("rackboot.api")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Callback stages that claim progress in a deployment: they need the node's one-time token.
CLAIMED_STAGES = ("deploy", "agent", "agent_up", "installed", "os")


class Api:
    """Adds the REST API (ROUTES), its OpenAPI document and the auth middleware to an aiohttp application."""

    def __init__(self, app: web.Application, *, inventory: Inventory, users: Users, tokens: NodeTokens, catalog: Catalog,
                 controller: DeploymentControl, deployments: DeploymentReader, power: PowerSwitch,
                 exec_runner: ExecRunner | None, profiles: Profiles, events: NodeEvents,
                 stats: Callable[[], Mapping[str, Mapping[str, int]]], stage_dir: Path, shares: Any = None,
                 routes: tuple[Route, ...] = ROUTES) -> None:
        self.users = users
        self.tokens = tokens
        self.shares = shares
        self.deps = ApiDeps(inventory=inventory, users=users, catalog=catalog, controller=controller, deployments=deployments,
                            power=power, exec_runner=exec_runner, profiles=profiles, events=events, stats=stats,
                            stage_dir=stage_dir, openapi=build_openapi(routes))
        self._routes: dict[web.AbstractRoute, Route] = {}
        for route in routes:
            self._routes[app.router.add_route(route.method, route.path, bind(route, self.deps))] = route
        app.router.add_get("/images/{token}", self._image)
        app.middlewares.append(self._auth_middleware)

    @property
    def openapi(self) -> dict[str, Any]:
        """The OpenAPI document served at /api/v1/openapi.json."""
        return self.deps.openapi

    # -- auth ---------------------------------------------------------------------------------------

    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        try:
            if path.startswith(API_PREFIX):
                authorize(self.users, request, self._routes.get(request.match_info.route))
            elif path.startswith("/callback/"):
                await self._check_callback(request)
            return await handler(request)
        except AuthError as exc:
            return error(exc.status, str(exc))

    async def _check_callback(self, request: web.Request) -> None:
        """A callback that claims a deployment stage must carry the node's current one-time token."""
        if request.method == "POST":
            try:
                body = json.loads(await request.read() or b"{}")
            except ValueError:
                return  # the handler answers 400 and counts it
        else:
            body = dict(request.query)
        if not isinstance(body, dict) or body.get("stage") not in CLAIMED_STAGES:
            return
        mac = request.match_info.get("mac", "").replace("-", ":").lower()
        if self.tokens.check(mac, body.get("token")) is None:
            raise AuthError(f"callback for {mac}: wrong or missing one-time token", 403)

    # -- node-facing --------------------------------------------------------------------------------

    async def _image(self, request: web.Request) -> web.StreamResponse:
        """Nodes download the image of a running broadcast (star) behind that attempt's random token."""
        path = self.shares.get(request.match_info["token"]) if self.shares is not None else None
        if path is None:
            return error(403, "no image behind this token")
        return web.FileResponse(path, chunk_size=256 * 1024)
