"""The REST API over real HTTP on loopback: tokens, rights, environments, deployments, nodes, callbacks, stats, OpenAPI."""
from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import os
import re
import signal
import sys
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import asyncssh
import pytest

from appliance.api import Api
from appliance.auth import NodeTokens, Users
from appliance.catalog import Catalog
from appliance.dashboard import add_dashboard
from appliance.booting import NodeBootTargets
from appliance.deploy.controller import Controller, ControllerDeps
from appliance.deploy.store import DeploymentStore
from appliance.deploy.workflow import default_workflow
from appliance.events import EventBus
from appliance.profiles import ProfileStore
from appliance.statedb import open_state_db
from broadcast.texec import ExecNodeResult, ExecResult
from domain.nodes import Node
from domain.profiles import BootProfile
from domain.progress import DhcpFromOs, ProfileSet, ScriptServed
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


@dataclass
class World:
    """The API on a real HTTP server on loopback, with the controller and fakes behind it."""

    client: Client
    admin: str
    deps: ControllerDeps
    cluster: FakeCluster
    tokens: NodeTokens
    http: HttpService
    api: Api
    base: str  # what rendered iPXE scripts point nodes at


async def fake_exec(nodes: list[Node], command: str, fanout: int, timeout: float) -> ExecResult:
    """Every node answers 'hi', but node-2 exits 1."""
    results = {n.name: ExecNodeResult(n.name, status=1 if n.name == "node-2" else 0, stdout="hi\n", via="@root") for n in nodes}
    return ExecResult(command, results, seconds=0.1)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    inventory = make_nodes(6)
    files = tmp_path / "files"
    files.mkdir()
    settings = HttpSettings(address=ipaddress.IPv4Address("127.0.0.1"), port=0, files=files)
    db = open_state_db(tmp_path / "state.db")
    events = EventBus()
    profiles = ProfileStore(db, BootProfile())
    users = Users(db)
    users.ensure_admin(tmp_path / "admin.token")
    tokens = NodeTokens()
    scripts = ScriptRenderer(NodeBootTargets(inventory, profiles), settings.base_url)
    http = HttpService(settings, events.publish, scripts, lambda ip: None, tokens=tokens)
    power, agent = FakePower(), FakeDeploy()
    store = DeploymentStore(db)
    deps = ControllerDeps(inventory=inventory, profiles=profiles, events=events, tokens=tokens, store=store,
                          catalog=Catalog(db, tmp_path / "images"), power=power, agent=agent, http_base="http://127.0.0.1",
                          deploy_profile=BootProfile(kind="deploy", kernel="deploy/vmlinuz", cmdline="console=ttyS0"), power_off_wait=0.01)
    cluster = FakeCluster(deps)
    power.on_change = agent.on_reboot = cluster.on_power
    controller = Controller(deps, lambda m, k: replace(default_workflow(m, k), deadlines=FAST))
    api = Api(http.app, inventory=inventory, users=users, catalog=deps.catalog, controller=controller,
              deployments=store, power=power, exec_runner=fake_exec, profiles=profiles, events=events,
              stats=lambda: {"http": http.stats()}, stage_dir=tmp_path / "upload", image_files=(files,))
    add_dashboard(http.app)  # as the appliance does (appliance/app.py)
    await http.start()
    serve = asyncio.create_task(controller.serve())
    host, port = _bound(http)
    async with aiohttp.ClientSession() as session:
        yield World(Client(f"http://{host}:{port}", session), (tmp_path / "admin.token").read_text().strip(),
                    deps, cluster, tokens, http, api, settings.base_url)
    serve.cancel()
    await controller.close()
    await http.close()


def _bound(http: HttpService) -> tuple[str, int]:
    for site in http._runner.sites:  # type: ignore[union-attr]
        sock = site._server.sockets[0]  # type: ignore[union-attr]
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


async def test_tokens_rights_and_visibility(world: World) -> None:
    client, admin = world.client, world.admin
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
    # no rights yet: adding environments, deploy, power and reboot refused, naming the nodes
    status, err = await add_env(client, bob_token, "bobs", "private")
    assert status == 403 and "'deploy' right" in err["error"]
    status, err = await client.call("POST", "/api/v1/deployments", bob_token, json={"nodes": "node-[1-2]", "env": "private-one"})
    assert status == 403 and "node-[1-2]" in err["error"]
    assert (await client.call("POST", "/api/v1/power", bob_token, json={"nodes": "node-1", "op": "status"}))[0] == 403
    assert (await client.call("PUT", "/api/v1/nodes/node-1/profile", bob_token, json={"kind": "local"}))[0] == 403
    assert (await client.call("POST", "/api/v1/users/bob/rights", admin, json={"nodes": "node-[1-2]", "perms": ["deploy", "power"]}))[0] == 200
    assert (await add_env(client, bob_token, "bobs", "private"))[0] == 201
    _, listing = await client.call("GET", "/api/v1/environments", bob_token)
    assert [e["name"] for e in listing["environments"]] == ["bobs"]  # admin's private env is invisible to bob
    assert (await client.call("POST", "/api/v1/power", bob_token, json={"nodes": "node-1", "op": "status"}))[0] == 200
    assert (await client.call("POST", "/api/v1/reboot", bob_token, json={"nodes": "node-1"}))[0] == 403
    status, err = await client.call("POST", "/api/v1/deployments", bob_token, json={"nodes": "node-[2-3]", "env": "bobs"})
    assert status == 403 and "node-3" in err["error"]
    assert (await client.call("POST", "/api/v1/deployments", bob_token, json={"nodes": "node-1", "env": "private-one"}))[0] == 404


async def add_described(client: Client, token: str, description: str) -> tuple[int, Any]:
    """POST an environment description without an image upload."""
    form = aiohttp.FormData()
    form.add_field("description", description.encode(), filename="env.yaml")
    return await client.call("POST", "/api/v1/environments", token, data=form)


async def test_environment_images_come_only_from_uploads_the_files_root_or_http(world: World, tmp_path: Path) -> None:
    """Defect of 2026-12-05: image.file and file:// URLs copied any file the appliance could read into the catalog."""
    client, admin = world.client, world.admin
    secret = tmp_path / "admin.token"
    for image in (f"{{file: {secret}, kind: tar}}", "{file: ../../admin.token, kind: tar}",
                  f"{{url: 'file://{secret}', kind: tar}}", "{url: 'ftp://example.org/x.tgz', kind: tar}"):
        status, err = await add_described(client, admin, f"name: stolen\nversion: 1\nimage: {image}\n")
        assert status == 400 and ("outside the appliance's image directories" in err["error"]
                                  or "only http or https URLs" in err["error"]), (image, err)
    for name in ("..", ".hidden", "a/b", "x" * 65, "-rf"):
        status, err = await add_env(client, admin, name, "public")
        assert status == 400 and "name:" in err["error"], (name, err)
    # an image already under the appliance's files directory is fine
    (tmp_path / "files" / "ok.tgz").write_bytes(tgz())
    status, env = await add_described(client, admin, f"name: local\nversion: 1\nimage: {{file: {tmp_path / 'files' / 'ok.tgz'}, kind: tar}}\n")
    assert status == 201, env
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["local"]


async def test_deploy_installs_the_users_keys_and_refuses_what_is_not_a_public_key(world: World) -> None:
    client, admin, agent = world.client, world.admin, world.deps.agent
    assert (await add_env(client, admin, "deb", "public"))[0] == 201
    key = asyncssh.generate_private_key("ssh-ed25519", comment="alice").export_public_key().decode().strip()
    for bad in (["not a key"], ["ssh-ed25519 AAAA' ; rm -rf /"], [key + "\nssh-rsa AAAA"]):
        status, err = await client.call("POST", "/api/v1/deployments", admin, json={"nodes": "node-5", "env": "deb", "ssh_keys": bad})
        assert status == 400 and "ssh_keys" in err["error"], (bad, err)
    status, dep = await client.call("POST", "/api/v1/deployments", admin, json={"nodes": "node-5", "env": "deb", "ssh_keys": [key]})
    assert status == 201
    await asyncio.wait_for(world.api.deps.controller.tasks[dep["id"]], 30)  # type: ignore[attr-defined]
    assert agent.keys["node-5"] == (key,)  # type: ignore[attr-defined]


async def test_deployment_lifecycle_events_stats_and_node_tokens(world: World) -> None:
    client, admin, deps, cluster, tokens = world.client, world.admin, world.deps, world.cluster, world.tokens
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
    # while node-3 waits in SetDeploymentEnv, its deploy profile (served to anyone as its iPXE script) has no
    # secret: its agent would claim its token at its first callback
    node3 = deps.inventory.by_name["node-3"].mac
    for _ in range(100):
        if deps.profiles.get(node3).kind == "deploy":
            break
        await asyncio.sleep(0.01)
    assert "rackboot.deployment=" in deps.profiles.get(node3).cmdline
    assert "rackboot.token" not in deps.profiles.get(node3).cmdline and tokens.token_of(node3) is None
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
    status, history = await client.call("GET", f"/api/v1/deployments/{dep['id']}/transitions", admin)
    assert status == 200 and history["id"] == dep["id"]
    node3 = [(t["from_state"], t["to_state"]) for t in history["transitions"] if t["node"] == "node-3"]
    assert node3[0] == ("pending", "SetDeploymentEnv") and node3[-1] == ("SetDeploymentEnv", "failed")
    assert [t["reason"] for t in history["transitions"] if t["node"] == "node-3"][-1].startswith("no DHCP within")
    status, csv_text = await client.call("GET", f"/api/v1/stats?deployment={dep['id']}&format=csv", admin)
    assert status == 200 and csv_text.startswith("deployment,node,step,impl,attempt")
    assert re.search(r"node-3,SetDeploymentEnv,reboot,0,.*,False,no DHCP", csv_text)
    _, stats = await client.call("GET", "/api/v1/stats", admin)
    assert stats["summary"]["BroadcastEnv"]["attempts"] == 2
    # after the deployment, the node tokens are revoked: a late callback is refused
    assert tokens.token_of(deps.inventory.by_name["node-1"].mac) is None
    assert (await client.call("DELETE", f"/api/v1/deployments/{dep['id']}", admin))[0] == 409


async def test_ctrl_c_on_rackboot_deploy_cancels_the_deployment_and_prints_its_report(world: World) -> None:
    client, admin = world.client, world.admin
    assert (await add_env(client, admin, "deb", "public"))[0] == 201
    world.deps.power.hang = {"node-2"}  # type: ignore[attr-defined]  # its BMC takes the first call and never answers
    env = {k: v for k, v in os.environ.items() if not k.startswith("RACKBOOT_")}
    env |= {"RACKBOOT_SERVER": client.base, "RACKBOOT_TOKEN": admin, "RACKBOOT_CLIENT_CONFIG": "/nonexistent"}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "appliance.cli", "deploy", "-m", "node-[1-2]", "-e", "deb",
                                                env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    started = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
    dep_id = started.split()[1].rstrip(":")
    assert started.startswith("deployment ") and dep_id.startswith("d")
    for _ in range(300):  # node-2's BMC holds the deployment in SetDeploymentEnv until it is cancelled
        if ("node-2", "status") in world.deps.power.calls:  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.05)
    _, stored = await client.call("GET", f"/api/v1/deployments/{dep_id}", admin)
    assert stored["status"] == "running"
    proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    _, stored = await client.call("GET", f"/api/v1/deployments/{dep_id}", admin)
    assert stored["status"] == "cancelled", (out, err)
    assert f"Ctrl-C: cancelling deployment {dep_id}" in err.decode()
    assert "deployed 0/2 nodes (deb:1, cancelled)" in out.decode() and "deployment cancelled" in out.decode()
    assert proc.returncode == 2  # some nodes failed: the report's own exit status
    # its log, a JSON object a line, to its result
    log = await asyncio.create_subprocess_exec(sys.executable, "-m", "appliance.cli", "deployments", dep_id, "--events", env=env,
                                               stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(log.communicate(), 30)
    entries = [json.loads(line) for line in out.decode().splitlines()]
    assert log.returncode == 0, err
    assert entries[-1]["what"] == "result" and entries[-1]["result"]["status"] == "cancelled"
    assert {"node": "node-2", "what": "failed"}.items() <= next(e for e in entries if e.get("what") == "failed" and e.get("node") == "node-2").items()


# -- nodes ----------------------------------------------------------------------------------------------

DEPLOY = BootProfile(kind="deploy", kernel="deploy/vmlinuz", initrds=("deploy/initrd.img",),
                     cmdline="console=ttyS0 rackboot.callback={callback}", env="debian12")


async def test_profile_switch_through_the_api_changes_the_next_script(world: World) -> None:
    client, admin, deps = world.client, world.admin, world.deps
    mac = deps.inventory.by_name["node-2"].mac
    script = f"/boot/{mac.replace(':', '-')}.ipxe"
    _, text = await client.call("GET", script)
    assert "sanboot" not in text and "kernel " not in text
    status, node = await client.call("PUT", "/api/v1/nodes/node-2/profile", admin, json={"kind": "local"})
    assert status == 200 and node["profile"]["kind"] == "local" and node["name"] == "node-2"
    assert "sanboot --no-describe --drive 0x80" in (await client.call("GET", script))[1]
    assert (await client.call("PUT", "/api/v1/nodes/node-2/profile", admin, json=DEPLOY.to_json()))[0] == 200
    _, text = await client.call("GET", script)
    assert f"kernel {world.base}/files/deploy/vmlinuz initrd=initrd.img console=ttyS0" in text
    assert f"rackboot.callback={world.base}/callback/{mac.replace(':', '-')}" in text
    assert deps.profiles.get(mac) == DEPLOY
    kinds = [type(e) for e in deps.events.last(mac)]
    assert kinds == [ScriptServed, ProfileSet, ScriptServed, ProfileSet, ScriptServed]
    assert [e.profile for e in deps.events.last(mac) if isinstance(e, ScriptServed)] == ["none", "local", "deploy"]


async def test_bad_profiles_and_unknown_nodes_are_refused(world: World) -> None:
    client, admin = world.client, world.admin
    status, err = await client.call("PUT", "/api/v1/nodes/node-1/profile", admin, json={"kind": "deploy"})
    assert status == 400 and "needs a kernel" in err["error"]
    status, err = await client.call("PUT", "/api/v1/nodes/node-1/profile", admin, data=b"{not json")
    assert status == 400 and "Invalid JSON" in err["error"]
    assert (await client.call("PUT", "/api/v1/nodes/node-9/profile", admin, json={"kind": "local"}))[0] == 404
    assert (await client.call("GET", "/api/v1/nodes/node-9", admin))[0] == 404
    assert (await client.call("GET", "/api/v1/nodes?events=-1", admin))[0] == 400
    assert world.deps.profiles.get(world.deps.inventory.by_name["node-1"].mac).kind == "none"


async def test_nodes_api_shows_profiles_and_last_events(world: World) -> None:
    client, admin, deps = world.client, world.admin, world.deps
    node1 = deps.inventory.by_name["node-1"]
    deps.events.publish(DhcpFromOs(node1.mac, "udhcp 1.35.0"))
    await client.call("GET", f"/boot/{node1.mac.replace(':', '-')}.ipxe")
    _, listing = await client.call("GET", "/api/v1/nodes", admin)
    nodes = listing["nodes"]
    assert [(n["name"], n["mac"], n["ip"], n["rack"]) for n in nodes[:2]] == [
        ("node-1", node1.mac, "10.77.0.11", "r1"), ("node-2", deps.inventory.by_name["node-2"].mac, "10.77.0.12", "r1")]
    assert [e["kind"] for e in nodes[0]["events"]] == ["dhcp_from_os", "script_served"]
    assert nodes[0]["events"][0]["detail"] == {"vendor_class": "udhcp 1.35.0"}
    assert all(isinstance(e["ts"], float) for e in nodes[0]["events"])
    assert nodes[1]["events"] == [] and nodes[1]["profile"]["kind"] == "none"
    _, one = await client.call("GET", "/api/v1/nodes/node-1?events=1", admin)
    assert [e["kind"] for e in one["events"]] == ["script_served"]
    status, health = await client.call("GET", "/api/v1/health")  # no token
    assert status == 200 and health["status"] == "ok" and health["nodes"] == 6
    assert health["counters"]["http"]["scripts"] == 1


async def test_node_answers_never_carry_the_one_time_token(world: World) -> None:
    client, admin, deps = world.client, world.admin, world.deps
    node = deps.inventory.by_name["node-1"]
    secret = world.tokens.issue(node.mac, "d-test", "127.0.0.1")  # as if node-1 called from the test's address
    # an operator's own profile with a token in its cmdline: the API redacts it all the same
    deps.profiles.set(node.mac, replace(DEPLOY, cmdline=f"console=ttyS0 rackboot.token={secret} rackboot.callback={{callback}}"))
    # a callback that proves its token: the record says which deployment, never the token
    status, _ = await client.call("POST", f"/callback/{node.mac.replace(':', '-')}", json={"stage": "agent_up", "token": secret})
    assert status == 200 and deps.events.last(node.mac)[-1].deployment == "d-test"  # type: ignore[union-attr]
    for path in ("/api/v1/nodes", "/api/v1/nodes/node-1"):
        async with client.session.get(client.base + path, headers={"Authorization": f"Bearer {admin}"}) as resp:
            raw = await resp.text()
        assert resp.status == 200 and secret not in raw, path
        assert "rackboot.token=***" in raw
    _, one = await client.call("GET", "/api/v1/nodes/node-1", admin)
    assert one["events"][-1]["kind"] == "agent_up" and "token" not in one["events"][-1]["detail"]
    assert one["profile"]["cmdline"] == "console=ttyS0 rackboot.token=*** rackboot.callback={callback}"
    # the profile itself is untouched: the node still boots with its token
    assert secret in deps.profiles.get(node.mac).cmdline


# -- validation and the OpenAPI document ------------------------------------------------------------------


async def test_a_bad_body_is_a_400_naming_the_field(world: World) -> None:
    client, admin = world.client, world.admin
    status, err = await client.call("POST", "/api/v1/power", admin, json={"nodes": "node-1", "op": "explode"})
    assert status == 400 and err["error"].startswith("bad body: op: Input should be 'on'"), err
    status, err = await client.call("POST", "/api/v1/deployments", admin, json={"env": "deb"})
    assert status == 400 and err["error"] == "bad body: nodes: Field required", err
    status, err = await client.call("POST", "/api/v1/reboot", admin, json={"nodes": "node-1", "levle": "hard"})
    assert status == 400 and "levle: Extra inputs are not permitted" in err["error"], err
    status, err = await client.call("POST", "/api/v1/users/admin/rights", admin, json={"nodes": "node-1", "perms": ["deploy", "root"]})
    assert status == 400 and "perms.1:" in err["error"], err
    status, err = await client.call("POST", "/api/v1/exec", admin, json=["node-1"])
    assert status == 400 and "bad body" in err["error"], err
    status, err = await client.call("POST", "/api/v1/power", admin, json={"nodes": "node-[1-", "op": "on"})
    assert status == 400 and "bad node set" in err["error"], err
    status, err = await client.call("GET", "/api/v1/deployments?limit=many", admin)
    assert status == 400 and err["error"].startswith("bad query: limit:"), err


async def test_exec_through_the_runner_and_501_without_one(world: World) -> None:
    client, admin = world.client, world.admin
    status, out = await client.call("POST", "/api/v1/exec", admin, json={"nodes": "node-[1-3]", "command": "echo hi"})
    assert status == 200, out
    assert out["ok"] == ["node-1", "node-3"] and out["failed"] == ["node-2"]
    assert [names for names, _ in out["grouped"]] == ["node-[1,3]", "node-2"]
    assert out["grouped"][1][1]["status"] == 1 and out["nodes"]["node-1"]["stdout"] == "hi\n"
    world.api.deps.exec_runner = None
    status, err = await client.call("POST", "/api/v1/exec", admin, json={"nodes": "node-1", "command": "true"})
    assert status == 501 and "cannot run commands" in err["error"]


async def test_openapi_document_is_exactly_the_registered_routes(world: World) -> None:
    from openapi_spec_validator import validate

    from appliance.api.routes import ROUTES

    status, doc = await world.client.call("GET", "/api/v1/openapi.json")  # no token needed
    assert status == 200
    validate(doc)
    registered = {(r.resource.canonical, r.method.lower()) for r in world.http.app.router.routes()
                  if r.resource is not None and r.resource.canonical.startswith("/api/v1/") and r.method != "HEAD"}
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert registered == documented
    schemas = doc["components"]["schemas"]
    with_body = {(r.path, r.method.lower()) for r in ROUTES if r.body is not None}
    assert ("/api/v1/deployments", "post") in with_body and ("/api/v1/nodes/{name}/profile", "put") in with_body
    for path, method in with_body:
        ref = doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.removeprefix("#/components/schemas/") in schemas, (path, method)
    # every operation that is not open answers 401, and says so; the open ones need no token
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert ("401" in op["responses"]) == (op.get("security") != []), (path, method)
    assert doc["paths"]["/api/v1/users"]["get"]["x-rackboot-access"] == "admin"
    assert doc["paths"]["/api/v1/power"]["post"]["x-rackboot-right"] == "power"
    multipart = doc["paths"]["/api/v1/environments"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert set(multipart["schema"]["properties"]) == {"description", "image"}


# -- the access matrix over the OpenAPI document ------------------------------------------------------------

SAMPLE_BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("post", "/api/v1/deployments"): {"nodes": "node-1", "env": "nope"},
    ("post", "/api/v1/power"): {"nodes": "node-1", "op": "status"},
    ("post", "/api/v1/reboot"): {"nodes": "node-1"},
    ("post", "/api/v1/exec"): {"nodes": "node-1", "command": "true"},
    ("put", "/api/v1/nodes/{name}/profile"): {"kind": "local"},
    ("post", "/api/v1/users"): {"name": "zed"},
    ("post", "/api/v1/users/{name}/rights"): {"nodes": "node-1", "perms": ["deploy"]},
}
PATH_VALUES = {"{name}": "node-1", "{id}": "d-nope", "{ref}": "nope"}


async def test_every_operation_refuses_no_token_a_wrong_token_and_a_user_without_the_right(world: World) -> None:
    """Walks the OpenAPI document: 401 without or with a wrong token, 403 for a user lacking the right, never 5xx."""
    client, admin = world.client, world.admin
    _, doc = await client.call("GET", "/api/v1/openapi.json")
    _, eve = await client.call("POST", "/api/v1/users", admin, json={"name": "eve"})  # no rights at all
    seen = []
    for path, ops in doc["paths"].items():
        url = path
        for key, value in PATH_VALUES.items():
            url = url.replace(key, value)
        if path == "/api/v1/live":
            url += "?seconds=0.3"  # the dashboard's feed lasts until the client goes away, unless told otherwise
        for method, op in ops.items():
            access, right = op.get("x-rackboot-access"), op.get("x-rackboot-right")
            kwargs: dict[str, Any] = {}
            if (method, path) in SAMPLE_BODIES:
                kwargs["json"] = SAMPLE_BODIES[(method, path)]
            elif "multipart/form-data" in op.get("requestBody", {}).get("content", {}):
                form = aiohttp.FormData()
                form.add_field("description", b"name: e\nversion: 1\nimage: {url: 'http://127.0.0.1:9/x.tgz'}\n", filename="e.yaml")
                kwargs["data"] = form
            answers = {}
            for who, token in (("none", None), ("wrong", "not-a-token"), ("eve", eve["token"])):
                if "data" in kwargs:  # a FormData is consumed by one request
                    form = aiohttp.FormData()
                    form.add_field("description", b"name: e\nversion: 1\nimage: {url: 'http://127.0.0.1:9/x.tgz'}\n", filename="e.yaml")
                    kwargs["data"] = form
                status, _ = await client.call(method.upper(), url, token, **kwargs)
                answers[who] = status
            seen.append((method.upper(), path, access, right, answers))
            assert all(s < 500 for s in answers.values()), (method, path, answers)
            if access == "open":
                assert all(200 <= s < 300 for s in answers.values()), (method, path, answers)
                continue
            assert answers["none"] == 401 and answers["wrong"] == 401, (method, path, answers)
            # adding an environment needs the deploy right on some node, which no node set in the route names
            needs_right = access == "admin" or right is not None or (method, path) == ("post", "/api/v1/environments")
            if needs_right:
                assert answers["eve"] == 403, (method, path, answers)
            else:
                assert answers["eve"] not in (401, 403), (method, path, answers)
    assert len(seen) >= 20


def test_deploy_k_reads_a_key_file_or_the_users_id_pub_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.client import ClientError, read_public_keys

    file = tmp_path / "keys.pub"
    file.write_text("# my keys\nssh-ed25519 AAAAC3 alice\n\nssh-rsa AAAAB3 alice-old\n")
    assert read_public_keys(str(file)) == ["ssh-ed25519 AAAAC3 alice", "ssh-rsa AAAAB3 alice-old"]
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ClientError, match="id_"):
        read_public_keys("")
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "id_ed25519.pub").write_text("ssh-ed25519 AAAAC3 me\n")
    assert read_public_keys("") == ["ssh-ed25519 AAAAC3 me"]


def test_node_sets_are_the_union_of_every_m_and_every_f(tmp_path: Path) -> None:
    from appliance.client import ClientError, build_node_args, node_set

    nodefile = tmp_path / "nodes.txt"
    nodefile.write_text("node-7\nnode-[9-10]\n\nnode-8\n")
    assert node_set(build_node_args(["node-[1-2]", "node-2,node-4"], [str(nodefile)])) == "node-[1-2,4,7-10]"
    with pytest.raises(ClientError, match="no nodes"):
        node_set(build_node_args([], []))
    with pytest.raises(ClientError, match="cannot read node file"):
        node_set(build_node_args([], [str(tmp_path / "missing")]))


async def test_user_revoke_takes_granted_rights_away(world: World) -> None:
    client, admin = world.client, world.admin
    _, bob = await client.call("POST", "/api/v1/users", admin, json={"name": "bob"})
    assert (await client.call("POST", "/api/v1/users/bob/rights", admin, json={"nodes": "node-[1-2]", "perms": ["power"]}))[0] == 200
    assert (await client.call("POST", "/api/v1/power", bob["token"], json={"nodes": "node-1", "op": "status"}))[0] == 200
    status, out = await client.call("DELETE", "/api/v1/users/bob/rights", admin, json={"nodes": "node-[1-2]"})
    assert status == 200 and out["revoked"] is True
    assert (await client.call("POST", "/api/v1/power", bob["token"], json={"nodes": "node-1", "op": "status"}))[0] == 403
    status, out = await client.call("DELETE", "/api/v1/users/bob/rights", admin, json={"nodes": "node-[1-2]"})
    assert status == 200 and out["revoked"] is False
