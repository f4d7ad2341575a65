"""The web dashboard over real HTTP on loopback: the page and its assets without a token, the live stream
(GET /api/v1/live) and the timeline SVG with one, and no secret in anything the dashboard reads."""
from __future__ import annotations

import asyncio
import json
import time
import tomllib
from dataclasses import replace
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp

import test_api
from appliance.app import Appliance
from appliance.config import load_config
from appliance.dashboard import ASSETS, WEB_DIR
from appliance.inventory import Inventory
from domain.nodes import BmcSpec
from domain.progress import DhcpFromFirmware, FirmwareKind
from test_api import World, add_env
from test_timeline import stage_bars
from test_appliance import free_port, write_config

world = test_api.world  # the fixture: the API and the dashboard on loopback, with the controller and fakes behind it
ROOT = Path(__file__).resolve().parents[1]


async def get(world: World, path: str, token: str | None = None) -> tuple[int, dict[str, str], str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with world.client.session.get(world.client.base + path, headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.text()


async def sse(world: World, token: str, seconds: float) -> AsyncIterator[tuple[str, Any]]:
    """The (event, data) pairs of GET /api/v1/live for `seconds`."""
    async with world.client.session.get(f"{world.client.base}/api/v1/live?seconds={seconds}",
                                        headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        name = ""
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                yield name, json.loads(line[6:])


async def test_the_page_without_a_token_is_the_login_form_and_nothing_else(world: World) -> None:
    status, headers, html = await get(world, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert 'id="login-form"' in html and 'type="password"' in html
    assert "node-1" not in html and world.admin not in html  # no data: that comes from the API, with a token
    csp = headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["Referrer-Policy"] == "no-referrer"
    # its assets are the package's own; nothing is loaded from elsewhere (the appliance sits on an isolated VLAN)
    for name, media in ASSETS.items():
        status, headers, text = await get(world, f"/ui/{name}")
        assert status == 200 and headers["Content-Type"].startswith(media) and text == (WEB_DIR / name).read_text()
    for text in (html, *((WEB_DIR / n).read_text() for n in ASSETS)):
        assert "http://" not in text and "https://" not in text and "//cdn" not in text
    for bad in ("/ui/index.html", "/ui/..%2Fdashboard.py", "/ui/nope.js"):
        assert (await get(world, bad))[0] == 404, bad


def test_the_page_and_its_assets_are_package_data() -> None:
    """pyproject.toml ships appliance/web/ in the wheel (the appliance serves it from the installed package)."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["appliance"]
    for name in ("index.html", *ASSETS):
        assert any(fnmatch(f"web/{name}", p) for p in patterns), name


async def test_the_live_stream_needs_a_token(world: World) -> None:
    assert (await get(world, "/api/v1/live"))[0] == 401
    assert (await get(world, "/api/v1/live", "forged"))[0] == 401
    assert (await get(world, "/api/v1/live?seconds=0", world.admin))[0] == 400
    status, doc = await world.client.call("GET", "/api/v1/openapi.json")
    op = doc["paths"]["/api/v1/live"]["get"]
    assert op["x-rackboot-access"] == "user" and "text/event-stream" in op["responses"]["200"]["content"]
    assert "401" in op["responses"]


async def test_the_live_stream_carries_node_records_and_the_deployments_the_user_may_see(world: World) -> None:
    client, admin, deps = world.client, world.admin, world.deps
    _, bob = await client.call("POST", "/api/v1/users", admin, json={"name": "bob"})
    assert (await add_env(client, admin, "deb", "public"))[0] == 201

    async def collect(token: str, out: list[tuple[str, Any]]) -> None:
        async for item in sse(world, token, 2.5):
            out.append(item)

    seen_admin: list[tuple[str, Any]] = []
    seen_bob: list[tuple[str, Any]] = []
    readers = [asyncio.create_task(collect(admin, seen_admin)), asyncio.create_task(collect(bob["token"], seen_bob))]
    await asyncio.sleep(0.3)
    deps.events.publish(DhcpFromFirmware(deps.inventory.by_name["node-4"].mac, FirmwareKind.UEFI_PXE, 0))
    deps.events.publish(DhcpFromFirmware("02:00:00:00:00:99", FirmwareKind.BIOS_PXE, 0))  # not a node: not shown
    status, dep = await client.call("POST", "/api/v1/deployments", admin, json={"nodes": "node-[1-2]", "env": "deb"})
    assert status == 201
    await asyncio.wait_for(world.api.deps.controller.tasks[dep["id"]], 30)  # type: ignore[attr-defined]
    await asyncio.gather(*readers)
    assert seen_admin[0] == ("hello", {"user": "admin", "admin": True})
    assert seen_bob[0] == ("hello", {"user": "bob", "admin": False})
    for seen in (seen_admin, seen_bob):
        nodes = [d for e, d in seen if e == "node"]
        assert nodes[0]["node"] == "node-4" and nodes[0]["rack"] == "r1" and nodes[0]["event"]["kind"] == "dhcp_from_firmware"
        assert {d["node"] for d in nodes} <= {"node-1", "node-2", "node-4"}
    entries = [d for e, d in seen_admin if e == "deployment"]
    assert {d["id"] for d in entries} == {dep["id"]} and entries[-1]["entry"]["what"] == "finished"
    moves = [(d["entry"]["node"], d["entry"]["what"]) for d in entries if d["entry"]["node"]]
    assert ("node-1", "SetDeploymentEnv") in moves and ("node-2", "done") in moves
    assert not [d for e, d in seen_bob if e == "deployment"]  # admin's deployment is not bob's to follow


async def test_the_timeline_is_the_gantt_svg_of_the_deployment(world: World) -> None:
    client, admin = world.client, world.admin
    assert (await add_env(client, admin, "deb", "public"))[0] == 201
    world.cluster.never_boot = {"node-3"}
    _, dep = await client.call("POST", "/api/v1/deployments", admin, json={"nodes": "node-[1-3]", "env": "deb"})
    await asyncio.wait_for(world.api.deps.controller.tasks[dep["id"]], 30)  # type: ignore[attr-defined]
    status, headers, svg = await get(world, f"/api/v1/deployments/{dep['id']}/timeline", admin)
    assert status == 200 and headers["Content-Type"].startswith("image/svg+xml")
    assert svg.startswith("<svg") and f"deployment {dep['id']}" in svg
    assert 'data-state="BroadcastEnv"' in svg and 'class="failed"' in svg and "node-3 failed: no DHCP" in svg
    # under the steps, each node's boot stages from the records of its boot (the fake cluster's, as the boot
    # services publish them): the deploy environment netbooted, the image written, the installed system up
    bars = stage_bars(svg)
    assert [s for s, _, _ in bars["node-1"]] == [
        "dhcp", "nbp", "dhcp", "script", "kernel", "agent", "image", "os"]  # iPXE asks DHCP again; kexec
    assert all(a[1] <= b[1] for a, b in zip(bars["node-1"], bars["node-1"][1:]))
    assert "node-3" not in bars  # it never sent DHCP
    assert (await get(world, f"/api/v1/deployments/{dep['id']}/timeline"))[0] == 401
    assert (await get(world, "/api/v1/deployments/nope/timeline", admin))[0] == 404
    _, bob = await client.call("POST", "/api/v1/users", admin, json={"name": "bob"})
    assert (await get(world, f"/api/v1/deployments/{dep['id']}/timeline", bob["token"]))[0] == 404


async def test_nothing_the_dashboard_reads_carries_a_node_token_or_a_bmc_credential(world: World, tmp_path: Path) -> None:
    client, admin, deps, tokens = world.client, world.admin, world.deps, world.tokens
    creds = tmp_path / "bmc-credentials.yaml"
    password = "s3cret-BMC-passw0rd"
    creds.write_text(f"username: root\npassword: {password}\n")
    deps.inventory.take(Inventory(tuple(replace(n, bmc=BmcSpec("ipmi", f"10.78.0.{i}", credentials_file=creds))
                                        for i, n in enumerate(deps.inventory.nodes, 1))))
    assert (await add_env(client, admin, "deb", "public"))[0] == 201
    secrets: set[str] = set()
    node1 = deps.inventory.by_name["node-1"]
    issued = tokens.issue(node1.mac, "d-test", "127.0.0.1")
    secrets.add(issued)
    status, _ = await client.call("POST", f"/callback/{node1.mac.replace(':', '-')}", json={"stage": "agent_up", "token": issued})
    assert status == 200
    done = asyncio.Event()

    async def watch_tokens() -> None:  # every one-time token the deployment hands out while it runs
        while not done.is_set():
            secrets.update(t for n in deps.inventory.nodes if (t := tokens.token_of(n.mac)))
            await asyncio.sleep(0.005)

    streamed: list[str] = []

    async def read_stream() -> None:
        async with client.session.get(f"{client.base}/api/v1/live?seconds=3",
                                      headers={"Authorization": f"Bearer {admin}"}) as resp:
            streamed.append(await resp.text())

    tasks = [asyncio.create_task(watch_tokens()), asyncio.create_task(read_stream())]
    await asyncio.sleep(0.2)
    _, dep = await client.call("POST", "/api/v1/deployments", admin, json={"nodes": "node-[2-5]", "env": "deb"})
    await asyncio.wait_for(world.api.deps.controller.tasks[dep["id"]], 30)  # type: ignore[attr-defined]
    await tasks[1]
    done.set()
    await tasks[0]
    assert len(secrets) > 1  # the agents did claim tokens: there was something to leak
    served = list(streamed)
    for path in ("/", *(f"/ui/{n}" for n in ASSETS), "/api/v1/whoami", "/api/v1/nodes?events=1", "/api/v1/deployments?limit=20",
                 f"/api/v1/deployments/{dep['id']}", f"/api/v1/deployments/{dep['id']}/timeline", "/api/v1/environments"):
        status, _, text = await get(world, path, admin)
        assert status == 200, path
        served.append(text)
    everything = "\n".join(served)
    assert "agent_up" in everything and "node-5" in everything
    for secret in (*secrets, password, str(creds)):
        assert secret not in everything, secret


async def test_a_shutdown_ends_the_live_streams_at_once(world: World) -> None:
    async with world.client.session.get(f"{world.client.base}/api/v1/live",
                                        headers={"Authorization": f"Bearer {world.admin}"}) as resp:
        assert resp.status == 200
        await resp.content.readline()
        started = time.monotonic()
        await world.http.close()
        assert time.monotonic() - started < 1.5  # not the server's shutdown timeout
        rest = await asyncio.wait_for(resp.content.read(), 1)  # the stream has ended: the client reads its end
        assert b"event: node" not in rest


async def test_the_appliance_serves_the_dashboard_and_stops_at_once_with_a_stream_open(tmp_path: Path) -> None:
    """The composition root puts the dashboard on its HTTP server; an open live stream does not hold its stop."""
    app = Appliance(load_config(write_config(tmp_path, free_port())))
    admin = (tmp_path / "state" / "admin.token").read_text().strip()
    await app.start()
    runner = asyncio.create_task(app.run())
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{app.config.http_base}/") as r:
                assert r.status == 200 and 'id="login-form"' in await r.text()
            async with http.get(f"{app.config.http_base}/api/v1/live", headers={"Authorization": f"Bearer {admin}"}) as r:
                assert r.status == 200 and await r.content.readline() == b"event: hello\n"
                started = time.monotonic()
                app.stop()
                await asyncio.wait_for(asyncio.shield(runner), 10)
                assert time.monotonic() - started < 1.5
    finally:
        app.stop()
        await runner
