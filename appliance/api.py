"""The REST API under /api/v1 on the appliance's aiohttp server: deployments, environments, nodes, users, stats.

Every request under /api/v1 (but health and the OpenAPI document) carries a user's API token
(Authorization: Bearer TOKEN); rights are checked on every request. Node-facing endpoints take no user
token: callbacks and image downloads carry the per-deployment, per-node one-time token instead.
"""
from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any, Awaitable, Callable

from aiohttp import web
from ClusterShell.NodeSet import NodeSet

from appliance.auth import AuthError, NodeTokens, User, Users
from appliance.catalog import Catalog, CatalogError, parse_environment_file
from appliance.deploy.controller import Controller, OverlapError
from appliance.deploy.power import POWER_OPS, PowerError
from appliance.deploy.workflow import parse_steps
from appliance.events import EventBus
from appliance.inventory import Inventory
from appliance.profiles import ProfileStore
from domain.errors import ConfigError
from domain.nodes import Node
from domain.profiles import BootProfile
from domain.progress import ProfileSet, event_json

log = logging.getLogger("rackboot.api")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN_PATHS = ("/api/v1/health", "/api/v1/openapi.json")
USER_KEY = web.RequestKey("user", User)


_TOKEN_WORD = re.compile(r"(rackboot\.token=)\S+")


def redact_tokens(cmdline: str) -> str:
    """Hide one-time node tokens in a kernel command line shown to API users."""
    return _TOKEN_WORD.sub(r"\1***", cmdline)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class Api:
    """Adds the REST API and the auth middleware to an aiohttp application."""

    def __init__(self, app: web.Application, inventory: Inventory, users: Users, tokens: NodeTokens,
                 catalog: Catalog, controller: Controller, stage_dir: Path, *, profiles: ProfileStore,
                 events: EventBus, stats: Callable[[], dict[str, Any]] = dict) -> None:
        self.inventory = inventory
        self.users = users
        self.tokens = tokens
        self.catalog = catalog
        self.controller = controller
        self.stage_dir = stage_dir
        self.profiles = profiles
        self.events = events
        self.stats = stats
        app.middlewares.append(self._auth_middleware)
        r = app.router
        r.add_get("/api/v1/openapi.json", self._openapi)
        r.add_get("/api/v1/whoami", self._whoami)
        r.add_post("/api/v1/deployments", self._deploy)
        r.add_get("/api/v1/deployments", self._deployments)
        r.add_get("/api/v1/deployments/{id}", self._deployment)
        r.add_get("/api/v1/deployments/{id}/events", self._deployment_events)
        r.add_delete("/api/v1/deployments/{id}", self._cancel)
        r.add_get("/api/v1/environments", self._envs)
        r.add_post("/api/v1/environments", self._env_add)
        r.add_get("/api/v1/environments/{ref}", self._env_show)
        r.add_delete("/api/v1/environments/{ref}", self._env_rm)
        r.add_post("/api/v1/power", self._power)
        r.add_post("/api/v1/reboot", self._reboot)
        r.add_get("/api/v1/users", self._users)
        r.add_post("/api/v1/users", self._user_add)
        r.add_delete("/api/v1/users/{name}", self._user_rm)
        r.add_post("/api/v1/users/{name}/rights", self._grant)
        r.add_get("/api/v1/stats", self._stats)
        r.add_post("/api/v1/exec", self._exec)
        r.add_get("/api/v1/health", self._health)
        r.add_get("/api/v1/nodes", self._nodes)
        r.add_get("/api/v1/nodes/{name}", self._node)
        r.add_put("/api/v1/nodes/{name}/profile", self._set_profile)

    # -- auth ---------------------------------------------------------------------------------------

    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        try:
            if path.startswith("/api/v1/") and path not in OPEN_PATHS:
                header = request.headers.get("Authorization", "")
                token = header[7:].strip() if header.lower().startswith("bearer ") else request.query.get("token")
                user = self.users.authenticate(token)
                request[USER_KEY] = user
                if request.method == "PUT" and path.endswith("/profile"):
                    self.users.check(user, "deploy", [request.match_info.get("name", "")])
            return await handler(request)
        except AuthError as exc:
            return _error(exc.status, str(exc))

    def _user(self, request: web.Request) -> User:
        return request[USER_KEY]

    def _nodes_of(self, spec: str) -> list[Node]:
        try:
            return self.inventory.select(spec)
        except ConfigError as exc:
            raise web.HTTPBadRequest(text=json.dumps({"error": str(exc)}), content_type="application/json") from exc

    async def _json(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError as exc:
            raise web.HTTPBadRequest(text=json.dumps({"error": "expected a JSON object"}), content_type="application/json") from exc
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text=json.dumps({"error": "expected a JSON object"}), content_type="application/json")
        return body

    # -- handlers -----------------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        """GET /api/v1/health: liveness and counters."""
        return web.json_response({"status": "ok", "nodes": len(self.inventory), **self.stats()})

    def _events_param(self, request: web.Request) -> int | None:
        try:
            n = int(request.query["events"]) if "events" in request.query else None
        except ValueError:
            raise web.HTTPBadRequest(text="events must be an integer\n") from None
        return n if n is None or n >= 0 else 0

    def _node_json(self, node: Node, n_events: int | None) -> dict[str, Any]:
        profile = self.profiles.get(node.mac).to_json()
        profile["cmdline"] = redact_tokens(str(profile.get("cmdline", "")))
        return {"name": node.name, "mac": node.mac, "ip": str(node.ip), "rack": node.rack, "profile": profile,
                "events": [event_json(e) for e in self.events.last(node.mac, n_events)]}

    def _named_node(self, request: web.Request) -> Node:
        node = self.inventory.by_name.get(request.match_info["name"])
        if node is None:
            raise web.HTTPNotFound(text=f"no node {request.match_info['name']!r} in the inventory\n")
        return node

    async def _nodes(self, request: web.Request) -> web.Response:
        """GET /api/v1/nodes[?events=N]: every inventory node with its profile and last events."""
        n = self._events_param(request)
        return web.json_response({"nodes": [self._node_json(node, n) for node in self.inventory.nodes]})

    async def _node(self, request: web.Request) -> web.Response:
        """GET /api/v1/nodes/NAME: one node with its profile and last events."""
        return web.json_response(self._node_json(self._named_node(request), self._events_param(request)))

    async def _set_profile(self, request: web.Request) -> web.Response:
        """PUT /api/v1/nodes/NAME/profile with a JSON BootProfile: what the node boots next."""
        node = self._named_node(request)
        try:
            data = await request.json()
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object")
            profile = BootProfile.from_json(data)
        except (ValueError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise web.HTTPBadRequest(text=f"not a boot profile: {exc}\n") from None
        self.profiles.set(node.mac, profile)
        self.events.publish(ProfileSet(node.mac, profile.kind, profile.env, "api"))
        return web.json_response(self._node_json(node, None))

    async def _openapi(self, request: web.Request) -> web.Response:
        return web.json_response(OPENAPI)

    async def _whoami(self, request: web.Request) -> web.Response:
        user = self._user(request)
        return web.json_response({"name": user.name, "admin": user.admin})

    async def _deploy(self, request: web.Request) -> web.Response:
        user = self._user(request)
        body = await self._json(request)
        nodes = self._nodes_of(str(body.get("nodes", "")))
        self.users.check(user, "deploy", [n.name for n in nodes])
        try:
            env = self.catalog.get(str(body.get("env", "")), user.name, user.admin)
        except CatalogError as exc:
            return _error(404, str(exc))
        method = str(body.get("broadcast", "chain"))
        try:
            workflow = self.controller.workflow_factory(method, env.kexec)
            if body.get("steps"):
                workflow = parse_steps(str(body["steps"]), workflow)
        except ValueError as exc:
            return _error(400, str(exc))
        try:
            dep = self.controller.start(nodes, env, user.name, method, force=bool(body.get("force")), workflow=workflow)
        except OverlapError as exc:
            return _error(409, str(exc))
        return web.json_response(dep.result(), status=201)

    def _visible_deployment(self, request: web.Request) -> Any:
        dep_id = request.match_info["id"]
        user = self._user(request)
        dep = self.controller.deployments.get(dep_id)
        stored = dep.result() if dep else self.controller.deps.store.get(dep_id)
        if stored is None or (not user.admin and stored["user"] != user.name):
            raise web.HTTPNotFound(text=json.dumps({"error": f"no deployment {dep_id}"}), content_type="application/json")
        return dep, stored

    async def _deployments(self, request: web.Request) -> web.Response:
        user = self._user(request)
        rows = self.controller.deps.store.list(int(request.query.get("limit", "50")))
        return web.json_response({"deployments": [r for r in rows if user.admin or r["user"] == user.name]})

    async def _deployment(self, request: web.Request) -> web.Response:
        _, stored = self._visible_deployment(request)
        return web.json_response(stored)

    async def _deployment_events(self, request: web.Request) -> web.StreamResponse:
        """Stream a deployment's progress as JSON lines until it finishes."""
        dep, stored = self._visible_deployment(request)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        if dep is None:
            await resp.write((json.dumps({"what": "finished", "status": stored["status"]}) + "\n").encode())
            return resp
        seen = int(request.query.get("after", "0"))
        while True:
            entries = await dep.wait_log(seen, timeout=15.0)
            seen += len(entries)
            payload = "".join(json.dumps(e) + "\n" for e in entries) or "\n"  # a blank line keeps the stream alive
            await resp.write(payload.encode())
            if dep.status != "running" and seen >= len(dep.log):
                break
        await resp.write((json.dumps({"what": "result", "result": dep.result()}) + "\n").encode())
        return resp

    async def _cancel(self, request: web.Request) -> web.Response:
        dep, stored = self._visible_deployment(request)
        if not self.controller.cancel(stored["id"]):
            return _error(409, f"deployment {stored['id']} is not running")
        return web.json_response({"id": stored["id"], "cancelled": True})

    async def _envs(self, request: web.Request) -> web.Response:
        user = self._user(request)
        return web.json_response({"environments": [e.to_json() for e in self.catalog.list(user.name, user.admin)]})

    async def _env_show(self, request: web.Request) -> web.Response:
        user = self._user(request)
        try:
            return web.json_response(self.catalog.get(request.match_info["ref"], user.name, user.admin).to_json())
        except CatalogError as exc:
            return _error(404, str(exc))

    async def _env_rm(self, request: web.Request) -> web.Response:
        user = self._user(request)
        try:
            env = self.catalog.remove(request.match_info["ref"], user.name, user.admin)
        except CatalogError as exc:
            return _error(403 if "belongs to" in str(exc) else 404, str(exc))
        return web.json_response({"removed": env.ref})

    async def _env_add(self, request: web.Request) -> web.Response:
        """multipart: 'description' (the environment YAML) and 'image' (the image file, streamed to disk)."""
        user = self._user(request)
        reader = await request.multipart()
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.stage_dir) as tmp:
            desc_path: Path | None = None
            image_name = ""
            async for part in reader:
                if part.name == "description":
                    desc_path = Path(tmp) / "environment.yaml"
                    desc_path.write_bytes(await part.read())  # type: ignore[union-attr]
                elif part.name == "image":
                    image_name = Path(part.filename or "image").name  # type: ignore[union-attr]
                    with open(Path(tmp) / image_name, "wb") as out:
                        while chunk := await part.read_chunk(1 << 20):  # type: ignore[union-attr]
                            out.write(chunk)
            if desc_path is None:
                return _error(400, "missing the 'description' part")
            if image_name:
                text = desc_path.read_text()
                # the uploaded image replaces whatever file the description names
                import yaml
                data = yaml.safe_load(text) or {}
                data.setdefault("image", {})["file"] = image_name
                data["image"].pop("url", None)
                desc_path.write_text(yaml.safe_dump(data))
            try:
                env, source = parse_environment_file(desc_path, user.name)
                stored = await asyncio.to_thread(self.catalog.add, env, source)
            except ConfigError as exc:
                return _error(400, "; ".join(p.replace(str(desc_path), "environment") for p in exc.problems))
            except CatalogError as exc:
                return _error(409 if "exists" in str(exc) else 400, str(exc))
        return web.json_response(stored.to_json(), status=201)

    async def _power(self, request: web.Request) -> web.Response:
        user = self._user(request)
        body = await self._json(request)
        op = str(body.get("op", ""))
        if op not in POWER_OPS:
            return _error(400, f"op must be one of {', '.join(POWER_OPS)}")
        nodes = self._nodes_of(str(body.get("nodes", "")))
        self.users.check(user, "power", [n.name for n in nodes])
        busy = self.controller.busy([n.name for n in nodes])
        if busy and op != "status" and not body.get("force"):
            return _error(409, f"{NodeSet.fromlist(list(busy))} in a running deployment")

        async def one(node: Node) -> dict[str, Any]:
            try:
                return {"node": node.name, "ok": True, "state": await self.controller.deps.power.power(node, op)}
            except (PowerError, ValueError) as exc:
                return {"node": node.name, "ok": False, "error": str(exc)}

        results = await asyncio.gather(*(one(n) for n in nodes))
        return web.json_response({"op": op, "results": results})

    async def _reboot(self, request: web.Request) -> web.Response:
        user = self._user(request)
        body = await self._json(request)
        nodes = self._nodes_of(str(body.get("nodes", "")))
        self.users.check(user, "reboot", [n.name for n in nodes])
        level = str(body.get("level", "soft"))
        to = str(body.get("to", "") or "")
        try:
            results = await self.controller.reboot(nodes, to, level, user.name, force=bool(body.get("force")))
        except OverlapError as exc:
            return _error(409, str(exc))
        except (ValueError, CatalogError) as exc:
            return _error(400, str(exc))
        return web.json_response({"level": level, "to": to, "results": results})

    async def _exec(self, request: web.Request) -> web.Response:
        """Run a command on nodes through the agents' tree; needs the 'console' right on every node."""
        user = self._user(request)
        body = await self._json(request)
        nodes = self._nodes_of(str(body.get("nodes", "")))
        self.users.check(user, "console", [n.name for n in nodes])
        command = str(body.get("command", ""))
        if not command:
            return _error(400, "command required")
        agent = self.controller.deps.agent
        if not hasattr(agent, "exec"):
            return _error(501, "this appliance's deploy driver cannot run commands")
        result = await agent.exec(nodes, command, fanout=int(body.get("fanout", 16)), timeout=float(body.get("timeout", 60)))
        return web.json_response({**result.to_json(), "grouped": [[names, r.to_json()] for names, r in result.grouped()]})

    async def _users(self, request: web.Request) -> web.Response:
        if not self._user(request).admin:
            return _error(403, "only admins list users")
        return web.json_response({"users": self.users.list()})

    async def _user_add(self, request: web.Request) -> web.Response:
        if not self._user(request).admin:
            return _error(403, "only admins add users")
        body = await self._json(request)
        name = str(body.get("name", ""))
        if not name:
            return _error(400, "name required")
        token = self.users.add(name, bool(body.get("admin")))
        return web.json_response({"name": name, "token": token}, status=201)

    async def _user_rm(self, request: web.Request) -> web.Response:
        if not self._user(request).admin:
            return _error(403, "only admins remove users")
        self.users.remove(request.match_info["name"])
        return web.json_response({"removed": request.match_info["name"]})

    async def _grant(self, request: web.Request) -> web.Response:
        if not self._user(request).admin:
            return _error(403, "only admins grant rights")
        body = await self._json(request)
        perms = body.get("perms", [])
        self.users.grant(request.match_info["name"], str(body.get("nodes", "")), [str(p) for p in perms])
        return web.json_response({"user": request.match_info["name"], "nodes": body.get("nodes"), "perms": perms})

    async def _stats(self, request: web.Request) -> web.StreamResponse:
        """Per deployment, per node, per step: durations, retries, errors (JSON, or CSV with ?format=csv)."""
        user = self._user(request)
        dep_id = request.query.get("deployment")
        rows = self.controller.deps.store.steps(dep_id)
        if not user.admin:
            mine = {d["id"] for d in self.controller.deps.store.list(10000) if d["user"] == user.name}
            rows = [r for r in rows if r["deployment"] in mine]
        if request.query.get("format") == "csv":
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=["deployment", "node", "step", "impl", "attempt", "started", "ended", "duration", "ok", "reason"])
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
        return web.json_response({"steps": rows, "summary": summary})

def _op(summary: str, body: dict[str, Any] | None = None, params: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {"200": {"description": "OK"}, "401": {"description": "no or unknown token"},
                                                             "403": {"description": "no right"}}}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": {"type": "object", "properties": body}}}}
    if params:
        op["parameters"] = params
    return op


_S = {"type": "string"}
_B = {"type": "boolean"}
_PATH = lambda name: {"name": name, "in": "path", "required": True, "schema": _S}  # noqa: E731

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "rackboot", "version": "1", "description": "Network-boot appliance: deployments, environments, nodes, users."},
    "components": {"securitySchemes": {"token": {"type": "http", "scheme": "bearer"}}},
    "security": [{"token": []}],
    "paths": {
        "/api/v1/health": {"get": {**_op("liveness and counters"), "security": []}},
        "/api/v1/whoami": {"get": _op("the user of the token")},
        "/api/v1/deployments": {
            "get": _op("latest deployments"),
            "post": {**_op("start a deployment", {"nodes": _S, "env": _S, "broadcast": {"type": "string", "enum": ["chain", "tree", "star"]},
                                                  "force": _B, "steps": _S}),
                     "responses": {"201": {"description": "started"}, "409": {"description": "nodes busy"}}},
        },
        "/api/v1/deployments/{id}": {"get": _op("a deployment with its nodes", params=[_PATH("id")]),
                                     "delete": _op("cancel a deployment", params=[_PATH("id")])},
        "/api/v1/deployments/{id}/events": {"get": _op("progress as JSON lines until the result", params=[_PATH("id")])},
        "/api/v1/environments": {"get": _op("environments visible to the user"),
                                 "post": {**_op("add an environment (multipart: description YAML, image file)"),
                                          "requestBody": {"content": {"multipart/form-data": {"schema": {"type": "object", "properties": {
                                              "description": {"type": "string", "format": "binary"}, "image": {"type": "string", "format": "binary"}}}}}}}},
        "/api/v1/environments/{ref}": {"get": _op("an environment (NAME or NAME:VERSION)", params=[_PATH("ref")]),
                                       "delete": _op("remove an environment", params=[_PATH("ref")])},
        "/api/v1/nodes": {"get": _op("nodes with boot profile and last boot events")},
        "/api/v1/nodes/{name}": {"get": _op("one node", params=[_PATH("name")])},
        "/api/v1/nodes/{name}/profile": {"put": _op("switch a node's boot profile", {"kind": _S, "kernel": _S, "cmdline": _S}, [_PATH("name")])},
        "/api/v1/power": {"post": _op("power on/off/reset/cycle/status", {"nodes": _S, "op": _S, "force": _B})},
        "/api/v1/reboot": {"post": _op("reboot nodes (to deploy, local or an environment)", {"nodes": _S, "to": _S, "level": _S, "force": _B})},
        "/api/v1/exec": {"post": _op("run a command on nodes through the agents' tree (right: console)",
                                     {"nodes": _S, "command": _S, "fanout": {"type": "integer"}, "timeout": {"type": "number"}})},
        "/api/v1/users": {"get": _op("users and rights (admin)"), "post": _op("add a user (admin); returns its token", {"name": _S, "admin": _B})},
        "/api/v1/users/{name}": {"delete": _op("remove a user (admin)", params=[_PATH("name")])},
        "/api/v1/users/{name}/rights": {"post": _op("grant rights on a node set (admin)", {"nodes": _S, "perms": {"type": "array", "items": _S}}, [_PATH("name")])},
        "/api/v1/stats": {"get": _op("per deployment, node and step: durations, retries, errors",
                                     params=[{"name": "deployment", "in": "query", "schema": _S}, {"name": "format", "in": "query", "schema": {"type": "string", "enum": ["json", "csv"]}}])},
    },
}
