"""The REST API over real HTTP on loopback: tokens, rights, environments, deployments, callbacks, stats."""
from __future__ import annotations

import asyncio
import io
import ipaddress
import re
import tarfile
from dataclasses import replace
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest

from appliance.api import Api
from appliance.auth import NodeTokens, Users
from appliance.catalog import Catalog
from appliance.booting import NodeBootTargets
from appliance.deploy.controller import Controller, ControllerDeps
from appliance.deploy.store import DeploymentStore
from appliance.deploy.workflow import default_workflow
from appliance.events import EventBus
from domain.profiles import BootProfile
from appliance.profiles import ProfileStore
from appliance.statedb import open_state_db
from fakes import FAST, FakeCluster, FakeDeploy, FakePower, make_nodes
from ipxe.script import ScriptRenderer
from netboot.http import HttpService, HttpSettings


class Client:
    def __init__(self, base: str, session: aiohttp.ClientSession) -> None:
        self.base, self.session = base, session

    async def call(self, method: str, path: str, token: str | None = None, **kw: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.session.request(method, self.base + path, headers=headers, **kw) as resp:
            body = await resp.json() if resp.content_type == "application/json" else await resp.text()
            return resp.status, body


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[Client, str, Any]]:
    inventory = make_nodes(6)
    settings = HttpSettings(address=ipaddress.IPv4Address("127.0.0.1"), port=0, files=tmp_path / "files")
    db = open_state_db(tmp_path / "state.db")
    events = EventBus()
    profiles = ProfileStore(db, BootProfile())
    users = Users(db)
    users.ensure_admin(tmp_path / "admin.token")
    tokens = NodeTokens()
    scripts = ScriptRenderer(NodeBootTargets(inventory, profiles), settings.base_url)
    http = HttpService(settings, events.publish, scripts, lambda ip: None, check_token=tokens.check)
    power, agent = FakePower(), FakeDeploy()
    deps = ControllerDeps(inventory=inventory, profiles=profiles, events=events, tokens=tokens, store=DeploymentStore(db),
                          catalog=Catalog(db, tmp_path / "images"), power=power, agent=agent, http_base="http://127.0.0.1",
                          deploy_profile=BootProfile(kind="deploy", kernel="deploy/vmlinuz", cmdline="console=ttyS0"), power_off_wait=0.01)
    cluster = FakeCluster(deps)
    power.on_change = agent.on_reboot = cluster.on_power
    controller = Controller(deps, lambda m, k: replace(default_workflow(m, k), deadlines=FAST))
    Api(http.app, inventory, users, tokens, deps.catalog, controller, tmp_path / "upload", profiles=profiles, events=events)
    await http.start()
    serve = asyncio.create_task(controller.serve())
    host, port = _bound(http)
    async with aiohttp.ClientSession() as session:
        yield Client(f"http://{host}:{port}", session), (tmp_path / "admin.token").read_text().strip(), (deps, cluster, tokens)
    serve.cancel()
    await controller.close()
    await http.close()


def _bound(http: HttpService) -> tuple[str, int]:
    for site in http._runner.sites:  # type: ignore[attr-defined]
        sock = site._server.sockets[0]  # type: ignore[attr-defined]
        return sock.getsockname()[:2]
    raise AssertionError("not bound")


def tgz() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = b"hello\n"
        info = tarfile.TarInfo("etc/motd")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def add_env(client: Client, token: str, name: str, visibility: str) -> tuple[int, Any]:
    form = aiohttp.FormData()
    form.add_field("description", f"name: {name}\nversion: 1\nvisibility: {visibility}\nimage: {{file: x.tgz, kind: tar}}\n".encode(),
                   filename="env.yaml")
    form.add_field("image", tgz(), filename="x.tgz")
    return await client.call("POST", "/api/v1/environments", token, data=form)


async def test_tokens_rights_and_visibility(api) -> None:  # type: ignore[no-untyped-def]
    client, admin, (deps, cluster, tokens) = api
    assert (await client.call("GET", "/api/v1/nodes"))[0] == 401
    assert (await client.call("GET", "/api/v1/nodes", "forged"))[0] == 401
    assert (await client.call("GET", "/api/v1/health"))[0] == 200
    status, doc = await client.call("GET", "/api/v1/openapi.json")
    assert status == 200 and "/api/v1/deployments" in doc["paths"]
    status, bob = await client.call("POST", "/api/v1/users", admin, json={"name": "bob"})
    assert status == 201
    bob_token = bob["token"]
    assert (await client.call("POST", "/api/v1/users", bob_token, json={"name": "eve"}))[0] == 403
    status, env = await add_env(client, admin, "private-one", "private")
    assert status == 201 and env["sha256"] and env["compression"] == "gzip"
    assert (await add_env(client, bob_token, "bobs", "private"))[0] == 201
    _, listing = await client.call("GET", "/api/v1/environments", bob_token)
    assert [e["name"] for e in listing["environments"]] == ["bobs"]  # admin's private env is invisible to bob
    # no rights yet: deploy, power and reboot refused, naming the nodes
    status, err = await client.call("POST", "/api/v1/deployments", bob_token, json={"nodes": "node-[1-2]", "env": "bobs"})
    assert status == 403 and "node-[1-2]" in err["error"]
    assert (await client.call("POST", "/api/v1/power", bob_token, json={"nodes": "node-1", "op": "status"}))[0] == 403
    assert (await client.call("PUT", "/api/v1/nodes/node-1/profile", bob_token, json={"kind": "local"}))[0] == 403
    assert (await client.call("POST", "/api/v1/users/bob/rights", admin, json={"nodes": "node-[1-2]", "perms": ["deploy", "power"]}))[0] == 200
    assert (await client.call("POST", "/api/v1/power", bob_token, json={"nodes": "node-1", "op": "status"}))[0] == 200
    assert (await client.call("POST", "/api/v1/reboot", bob_token, json={"nodes": "node-1"}))[0] == 403
    status, err = await client.call("POST", "/api/v1/deployments", bob_token, json={"nodes": "node-[2-3]", "env": "bobs"})
    assert status == 403 and "node-3" in err["error"]
    assert (await client.call("POST", "/api/v1/deployments", bob_token, json={"nodes": "node-1", "env": "private-one"}))[0] == 404


async def test_deployment_lifecycle_events_stats_and_node_tokens(api) -> None:  # type: ignore[no-untyped-def]
    client, admin, (deps, cluster, tokens) = api
    assert (await add_env(client, admin, "deb", "public"))[0] == 201
    cluster.never_boot = {"node-3"}
    status, dep = await client.call("POST", "/api/v1/deployments", admin, json={"nodes": "node-[1-3]", "env": "deb"})
    assert status == 201
    # overlapping deployments are refused
    status, err = await client.call("POST", "/api/v1/deployments", admin, json={"nodes": "node-3", "env": "deb"})
    assert status == 409 and "node-3" in err["error"]
    # a callback with a forged token is refused at the door; without a stage it is just informational
    mac = deps.inventory.by_name["node-3"].mac.replace(":", "-")
    assert (await client.call("POST", f"/callback/{mac}", json={"stage": "agent_up", "token": "forged"}))[0] == 403
    assert (await client.call("POST", f"/callback/{mac}", json={"message": "hello"}))[0] == 200
    lines = []
    async with client.session.get(f"{client.base}/api/v1/deployments/{dep['id']}/events",
                                  headers={"Authorization": f"Bearer {admin}"}) as resp:
        async for raw in resp.content:
            if raw.strip():
                lines.append(__import__("json").loads(raw))
    result = lines[-1]["result"]
    assert result["ok_nodeset"] == "node-[1-2]"
    assert result["ko"] == [{"node": "node-3", "step": "SetDeploymentEnv", "impl": "reboot",
                             "reason": "no DHCP within 0s after the soft reboot; no DHCP within 0s after the hard reboot; "
                                       "no DHCP within 0s after the very hard reboot"}]
    assert any(entry.get("what") == "escalate" for entry in lines)
    status, stored = await client.call("GET", f"/api/v1/deployments/{dep['id']}", admin)
    assert stored["status"] == "partial"
    status, csv_text = await client.call("GET", f"/api/v1/stats?deployment={dep['id']}&format=csv", admin)
    assert status == 200 and csv_text.startswith("deployment,node,step,impl,attempt")
    assert re.search(r"node-3,SetDeploymentEnv,reboot,0,.*,False,no DHCP", csv_text)
    _, stats = await client.call("GET", "/api/v1/stats", admin)
    assert stats["summary"]["BroadcastEnv"]["attempts"] == 2
    # after the deployment, the node tokens are revoked: a late callback is refused
    assert tokens.token_of(deps.inventory.by_name["node-1"].mac) is None
    assert (await client.call("DELETE", f"/api/v1/deployments/{dep['id']}", admin))[0] == 409


async def test_events_stream_ends_when_a_deployment_fails_on_a_bug(api) -> None:  # type: ignore[no-untyped-def]
    """A driver raising something unexpected: the deployment fails with the error and its event stream ends."""
    client, admin, (deps, cluster, tokens) = api
    assert (await add_env(client, admin, "deb", "public"))[0] == 201
    deps.agent.crash = {("prepare_disk", "node-1"): "oops"}
    status, dep = await client.call("POST", "/api/v1/deployments", admin, json={"nodes": "node-[1-2]", "env": "deb"})
    assert status == 201

    async def stream() -> list[dict[str, Any]]:
        async with client.session.get(f"{client.base}/api/v1/deployments/{dep['id']}/events",
                                      headers={"Authorization": f"Bearer {admin}"}) as resp:
            return [__import__("json").loads(raw) async for raw in resp.content if raw.strip()]

    lines = await asyncio.wait_for(stream(), 20)
    result = lines[-1]["result"]
    assert result["status"] == "failed" and result["error"] == "internal error: RuntimeError: oops"
    assert {k["reason"] for k in result["ko"]} == {"internal error: RuntimeError: oops"}
    status, stored = await client.call("GET", f"/api/v1/deployments/{dep['id']}", admin)
    assert stored["status"] == "failed"
