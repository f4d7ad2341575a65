"""HTTP service on 127.0.0.1: per-MAC scripts, files with Range, callbacks; aiohttp's client and curl (the node API: test_api.py)."""
from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import pytest

from appliance.config import ApplianceConfig, BootConfig, DhcpConfig, HttpConfig
from domain.errors import BindError
from appliance.events import EventBus, EventKind
from domain.nodes import Node
from appliance.inventory import Inventory
from domain.profiles import BootProfile
from appliance.profiles import ProfileStore
from netboot.http import HttpService

NODE1 = Node("node-1", "52:54:00:77:00:01", ipaddress.IPv4Address("127.0.0.11"), rack="r1")
NODE2 = Node("node-2", "52:54:00:77:00:02", ipaddress.IPv4Address("127.0.0.12"), rack="r1")
UNKNOWN_MAC = "52:54:00:99:99:99"
DEPLOY = BootProfile(kind="deploy", kernel="deploy/vmlinuz", initrds=("deploy/initrd.img",),
                     cmdline="console=ttyS0 rackboot.callback={callback}", env="debian12")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def config(tmp_path: Path) -> ApplianceConfig:
    files = tmp_path / "files"
    (files / "deploy").mkdir(parents=True)
    (files / "deploy" / "vmlinuz").write_bytes(os.urandom(300_000))
    (files / "deploy" / "initrd.img").write_bytes(os.urandom(50_000))
    (files / "other.txt").write_text("other\n")
    (tmp_path / "secret.txt").write_text("do not serve\n")
    ipxe_dir = tmp_path / "ipxe"
    ipxe_dir.mkdir()
    (ipxe_dir / "snponly.efi").write_bytes(b"MZ fake snponly")
    (ipxe_dir / "ipxe.lkrn").write_bytes(b"not an NBP we serve")
    return ApplianceConfig(
        interface="lo",
        address=ipaddress.IPv4Interface("127.0.0.1/8"),
        state_dir=tmp_path,
        inventory=Inventory(nodes=(NODE1, NODE2)),
        http=HttpConfig(port=free_port(), files=files),
        boot=BootConfig(ipxe_dir=ipxe_dir),
    )


class Appliance:
    """The pieces HttpService needs, as the real composition root builds them."""

    def __init__(self, config: ApplianceConfig) -> None:
        self.config = config
        self.events = EventBus()
        self.profiles = ProfileStore(sqlite3.connect(":memory:"), BootProfile())
        self.base = config.http_base
        self.http = HttpService(config, self.events, self.profiles, mac_for_ip=self.mac_for_ip)

    def mac_for_ip(self, ip: ipaddress.IPv4Address) -> str | None:
        node = self.config.inventory.by_ip.get(ip)
        return node.mac if node else None

    def kinds(self, mac: str) -> list[EventKind]:
        return [e.kind for e in self.events.last(mac)]


async def started(config: ApplianceConfig) -> Appliance:
    app = Appliance(config)
    await app.http.start()
    return app


@pytest.fixture
async def appliance(config: ApplianceConfig) -> AsyncIterator[Appliance]:
    app = await started(config)
    try:
        yield app
    finally:
        await app.http.close()


def client_from(ip: str) -> aiohttp.ClientSession:
    """A client whose connections come from a node's address (any 127/8 address is ours on lo)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(ip, 0), force_close=True))


async def curl(*args: str) -> tuple[int, bytes]:
    """Run curl; return (HTTP status, body)."""
    proc = await asyncio.create_subprocess_exec(
        "curl", "-s", "-S", "--max-time", "10", "-w", "\n%{http_code}", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    body, _, code = out.rpartition(b"\n")
    return int(code), body


async def test_curl_gets_the_per_mac_script_and_a_node_without_profile_waits(appliance: Appliance) -> None:
    status, body = await curl(f"{appliance.base}/boot/52-54-00-77-00-01.ipxe")
    assert status == 200
    text = body.decode()
    assert text.startswith("#!ipxe\n")
    assert f"chain --replace {appliance.base}/boot/52-54-00-77-00-01.ipxe?poll=1" in text
    [event] = appliance.events.last(NODE1.mac)
    assert event.kind == EventKind.SCRIPT_FETCHED and event.detail["profile"] == "none" and event.detail["node"] == "node-1"


async def test_polls_of_a_waiting_node_do_not_flood_its_events(appliance: Appliance) -> None:
    url = f"{appliance.base}/boot/52-54-00-77-00-01.ipxe"
    async with aiohttp.ClientSession() as http:
        for suffix in ("", "?poll=1", "?poll=1", "?poll=1"):
            async with http.get(url + suffix) as r:
                assert r.status == 200
    assert appliance.kinds(NODE1.mac) == [EventKind.SCRIPT_FETCHED]
    assert appliance.http.stats()["script_polls_quiet"] == 3


async def test_a_script_that_gave_up_reports_the_error(appliance: Appliance) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{appliance.base}/boot/52-54-00-77-00-01.ipxe?error=kernel") as r:
            assert r.status == 200
    callback, fetched = appliance.events.last(NODE1.mac)
    assert callback.kind == EventKind.CALLBACK and callback.detail["stage"] == "ipxe" and callback.detail["status"] == "failed"
    assert "kernel" in callback.detail["message"]
    assert fetched.kind == EventKind.SCRIPT_FETCHED


async def test_unknown_mac_is_told_so_when_ignored(appliance: Appliance) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{appliance.base}/boot/52-54-00-99-99-99.ipxe") as r:
            text = await r.text()
        async with http.get(f"{appliance.base}/boot/not-a-mac.ipxe") as r:
            assert r.status == 404
    assert "not in the inventory" in text and text.rstrip().endswith("exit")
    assert appliance.events.last(UNKNOWN_MAC)[0].detail["profile"] == "unknown"


async def test_unknown_mac_boots_discovery_when_configured(config: ApplianceConfig) -> None:
    app = await started(replace(config, dhcp=DhcpConfig(unknown_macs="discovery")))
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{app.base}/boot/52-54-00-99-99-99.ipxe") as r:
                text = await r.text()
    finally:
        await app.http.close()
    assert f"kernel {app.base}/files/discovery/vmlinuz" in text
    assert f"rackboot.mac={UNKNOWN_MAC}" in text
    assert app.events.last(UNKNOWN_MAC)[0].detail["profile"] == "discovery"


async def test_range_request_returns_206_and_the_right_bytes(appliance: Appliance) -> None:
    data = (appliance.config.http.files / "deploy" / "vmlinuz").read_bytes()
    status, body = await curl("-r", "1000-1999", f"{appliance.base}/files/deploy/vmlinuz")
    assert status == 206 and body == data[1000:2000]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{appliance.base}/files/deploy/vmlinuz", headers={"Range": "bytes=-100"}) as r:
            assert r.status == 206 and await r.read() == data[-100:]
            assert r.headers["Content-Range"] == f"bytes {len(data) - 100}-{len(data) - 1}/{len(data)}"
        async with http.get(f"{appliance.base}/files/deploy/vmlinuz") as r:
            assert r.status == 200 and await r.read() == data


async def test_paths_cannot_escape_the_files_root(appliance: Appliance, tmp_path: Path) -> None:
    (appliance.config.http.files / "escape").symlink_to(tmp_path / "secret.txt")
    for path in ("/files/../secret.txt", "/files/%2e%2e/secret.txt", "/files/deploy/%2E%2E/%2E%2E/secret.txt", "/files/escape"):
        status, body = await curl("--path-as-is", appliance.base + path)
        assert status in (403, 404), path
        assert b"do not serve" not in body
    status, _ = await curl(f"{appliance.base}/files/deploy")  # a directory is not a file
    assert status == 404
    assert appliance.http.stats()["forbidden"] >= 2


async def test_kernel_and_initrd_fetches_are_recognised_by_client_address(appliance: Appliance) -> None:
    appliance.profiles.set(NODE1.mac, DEPLOY)
    async with client_from(str(NODE1.ip)) as http:
        for path in ("deploy/vmlinuz", "deploy/initrd.img", "other.txt"):
            async with http.get(f"{appliance.base}/files/{path}") as r:
                assert r.status == 200
                await r.read()
    kernel, initrd, other = appliance.events.last(NODE1.mac)
    assert (kernel.kind, kernel.detail["file"], kernel.detail["bytes"]) == (EventKind.KERNEL_FETCHED, "deploy/vmlinuz", "300000")
    assert (initrd.kind, initrd.detail["file"]) == (EventKind.INITRD_FETCHED, "deploy/initrd.img")
    assert (other.kind, other.detail["file"]) == (EventKind.FILE_FETCHED, "other.txt")
    assert kernel.detail["remote"] == "127.0.0.11"
    # node-2 has no deploy profile: the same kernel is just a file for it
    async with client_from(str(NODE2.ip)) as http:
        async with http.get(f"{appliance.base}/files/deploy/vmlinuz") as r:
            await r.read()
    assert appliance.kinds(NODE2.mac) == [EventKind.FILE_FETCHED]


async def test_mac_query_names_the_node_and_anonymous_fetches_publish_nothing(appliance: Appliance) -> None:
    appliance.profiles.set(NODE2.mac, DEPLOY)
    status, _ = await curl(f"{appliance.base}/files/deploy/initrd.img?mac=52-54-00-77-00-02")
    assert status == 200
    assert appliance.kinds(NODE2.mac) == [EventKind.INITRD_FETCHED]
    status, _ = await curl(f"{appliance.base}/files/other.txt")  # from 127.0.0.1: no node
    assert status == 200 and appliance.http.stats()["files_anonymous"] == 1


async def test_callback_publishes_an_event(appliance: Appliance) -> None:
    body = {"stage": "deploy", "status": "ok", "message": "image written", "bytes": 123, "mac": "spoofed"}
    status, answer = await curl("-X", "POST", "-H", "Content-Type: application/json", "--data", json.dumps(body),
                                f"{appliance.base}/callback/52-54-00-77-00-01")
    assert status == 200 and json.loads(answer)["ok"] is True
    [event] = appliance.events.last(NODE1.mac)
    assert event.kind == EventKind.CALLBACK
    assert {k: event.detail[k] for k in ("stage", "status", "message", "bytes")} == {
        "stage": "deploy", "status": "ok", "message": "image written", "bytes": "123"}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{appliance.base}/callback/52:54:00:77:00:01?stage=ipxe&status=started") as r:
            assert r.status == 200
        async with http.post(f"{appliance.base}/callback/52-54-00-77-00-01", data=b"[not json") as r:
            assert r.status == 400
    assert appliance.events.last(NODE1.mac)[-1].detail["stage"] == "ipxe"
    assert appliance.http.stats()["dropped_malformed"] == 1 and appliance.http.stats()["callbacks"] == 2


async def test_only_configured_nbps_are_served(appliance: Appliance) -> None:
    status, body = await curl(f"{appliance.base}/nbp/snponly.efi")
    assert status == 200 and body == b"MZ fake snponly"
    status, _ = await curl(f"{appliance.base}/nbp/ipxe.lkrn")
    assert status == 404


async def test_routes_added_before_start_are_served(config: ApplianceConfig) -> None:
    from aiohttp import web

    app = Appliance(config)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app.http.app.router.add_get("/api/v1/hello", hello)
    await app.http.start()
    try:
        assert await curl(f"{app.base}/api/v1/hello") == (200, b"hello")
    finally:
        await app.http.close()


async def test_bind_error_when_the_port_is_taken(config: ApplianceConfig) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", config.http.port))
        holder.listen()
        app = Appliance(config)
        with pytest.raises(BindError, match=f"127.0.0.1:{config.http.port}"):
            await app.http.start()
        await app.http.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response with a Content-Length body."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    status_line, *lines = head.strip().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    body = await reader.readexactly(int(headers["content-length"]))
    return int(status_line.split()[1]), headers, body


async def test_one_connection_serves_kernel_then_initrd_then_is_closed_when_idle(appliance: Appliance) -> None:
    """As iPXE does: several requests on one connection; then the server drops the idle connection itself,
    so a node rebooting with the same TCP port and sequence number (iPXE EFI) finds nothing stale."""
    files = appliance.config.http.files
    reader, writer = await asyncio.open_connection("127.0.0.1", appliance.config.http.port)
    try:
        for path in ("deploy/vmlinuz", "deploy/initrd.img"):
            writer.write(f"GET /files/{path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            status, headers, body = await read_response(reader)
            assert status == 200 and body == (files / path).read_bytes()
            assert headers.get("connection", "").lower() != "close"
        assert await asyncio.wait_for(reader.read(1), timeout=30) == b""  # EOF: the server closed it
    finally:
        writer.close()
    assert appliance.http.stats()["files"] == 2 and appliance.http.stats()["files_aborted"] == 0
