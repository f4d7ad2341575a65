"""What every handler of /api/v1 gets (Call) and how it fails (ApiError -> a JSON error with a status)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from aiohttp import web
from pydantic import BaseModel

from appliance.api.deps import ApiDeps
from appliance.auth import User
from domain.nodes import Node

USER_KEY = web.RequestKey("user", User)


class ApiError(Exception):
    """An answer other than success: its HTTP status and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error(status: int, message: str) -> web.Response:
    """Return the JSON error answer {"error": message}."""
    return web.json_response({"error": message}, status=status)


@dataclass
class Call:
    """One request, validated: its user, body, query and the nodes it names (when its route checks a right)."""

    request: web.Request
    user: User | None
    body: Any = None
    query: Any = None
    nodes: list[Node] = field(default_factory=list)

    @property
    def me(self) -> User:
        """The authenticated user (every route but the open ones has one)."""
        assert self.user is not None, "open route asked for its user"
        return self.user

    def param(self, name: str) -> str:
        """Return a path parameter."""
        return self.request.match_info[name]


Handler = Callable[[ApiDeps, Call], Awaitable[BaseModel | web.StreamResponse]]
