"""Who may call what under /api/v1: the user behind the bearer token, admin-only routes, rights on nodes."""
from __future__ import annotations

from aiohttp import web

from appliance.api.base import USER_KEY
from appliance.api.routes import Route
from appliance.auth import AuthError, User, Users

API_PREFIX = "/api/v1/"


def bearer_token(request: web.Request) -> str | None:
    """Return the API token of a request: Authorization: Bearer TOKEN, else ?token=."""
    header = request.headers.get("Authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else request.query.get("token")


def authorize(users: Users, request: web.Request, route: Route | None) -> User | None:
    """Check a request under /api/v1 against its route's access; store and return its user (None on open routes).

    A path under /api/v1 that matches no route needs a user too, so unknown paths tell nothing to strangers.
    Raise AuthError (401 no or unknown token, 403 admin-only).
    """
    if route is not None and route.access == "open":
        return None
    user = users.authenticate(bearer_token(request))
    request[USER_KEY] = user
    if route is not None and route.access == "admin" and not user.admin:
        raise AuthError(f"only admins may {route.summary}", 403)
    return user
