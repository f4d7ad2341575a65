"""Api: puts the route table of /api/v1 and the auth middleware on the appliance's aiohttp application.

Every request under /api/v1 but the open routes (health, the OpenAPI document) carries a user's API token
(Authorization: Bearer TOKEN); rights are checked on every request. The node-facing routes (scripts,
files, images, callbacks and their one-time tokens) are netboot's (netboot/http.py), not the API's.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping

from aiohttp import web

from appliance.api.auth import API_PREFIX, authorize
from appliance.api.base import error
from appliance.api.deps import ApiDeps, DeploymentControl, DeploymentReader, ExecRunner, NodeEvents, PowerSwitch, Profiles
from appliance.api.openapi import build_openapi
from appliance.api.routes import ROUTES, Route, bind
from appliance.auth import AuthError, Users
from appliance.catalog import Catalog
from appliance.inventory import Inventory

log = logging.getLogger("rackboot.api")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Api:
    """Adds the REST API (ROUTES), its OpenAPI document and the auth middleware to an aiohttp application."""

    def __init__(self, app: web.Application, *, inventory: Inventory, users: Users, catalog: Catalog,
                 controller: DeploymentControl, deployments: DeploymentReader, power: PowerSwitch,
                 exec_runner: ExecRunner | None, profiles: Profiles, events: NodeEvents,
                 stats: Callable[[], Mapping[str, Mapping[str, int]]], stage_dir: Path, image_files: tuple[Path, ...] = (),
                 routes: tuple[Route, ...] = ROUTES) -> None:
        self.users = users
        self.deps = ApiDeps(inventory=inventory, users=users, catalog=catalog, controller=controller, deployments=deployments,
                            power=power, exec_runner=exec_runner, profiles=profiles, events=events, stats=stats,
                            stage_dir=stage_dir, image_files=image_files, openapi=build_openapi(routes))
        self._routes: dict[web.AbstractRoute, Route] = {}
        # Paths whose every route is open: another method on them is answered 405 without a token, as with one.
        self._open_paths = {r.path for r in routes if r.access == "open"} - {r.path for r in routes if r.access != "open"}
        for route in routes:
            self._routes[app.router.add_route(route.method, route.path, bind(route, self.deps))] = route
        app.middlewares.append(self._auth_middleware)
        app.on_shutdown.append(self._closing)

    async def _closing(self, app: web.Application) -> None:
        """The server shuts down: end the live streams now rather than at its shutdown timeout."""
        self.deps.closing.set()

    @property
    def openapi(self) -> dict[str, Any]:
        """The OpenAPI document served at /api/v1/openapi.json."""
        return self.deps.openapi

    # -- auth ---------------------------------------------------------------------------------------

    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        try:
            route = self._routes.get(request.match_info.route)
            if path.startswith(API_PREFIX) and not (route is None and path in self._open_paths):
                authorize(self.users, request, route)
            return await handler(request)
        except AuthError as exc:
            return error(exc.status, str(exc))
