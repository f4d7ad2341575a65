"""HTTP service on 127.0.0.1: per-MAC scripts, files with Range, callbacks and their tokens; aiohttp's client and curl."""
from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
import sqlite3
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import pytest

from appliance.auth import NodeTokens
from appliance.booting import DEFAULT_DISCOVERY_PROFILE, NodeBootTargets
from appliance.events import EventBus
from appliance.inventory import Inventory
from appliance.profiles import ProfileStore
from domain.errors import BindError
from domain.nodes import Node
from domain.profiles import BootProfile
from domain.progress import (
    event_json,
    AgentUp, BootFailed, FileSent, InitrdFetched, KernelFetched, NodeReport, OsUp, ScriptServed, Via,
)
from ipxe.script import ScriptRenderer
from netboot.http import ACCEPT_BATCH, HttpService, HttpSettings

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
def config(tmp_path: Path) -> HttpSettings:
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
    return HttpSettings(address=ipaddress.IPv4Address("127.0.0.1"), port=free_port(), files=files, ipxe_dir=ipxe_dir,
                        nbp_names=("undionly.kpxe", "snponly.efi"), interface="lo")


class Appliance:
    """The pieces HttpService needs, as the real composition root builds them."""

    def __init__(self, config: HttpSettings, discovery: BootProfile | None = None) -> None:
        self.config = config
        self.inventory = Inventory(nodes=(NODE1, NODE2))
        self.events = EventBus()
        self.profiles = ProfileStore(sqlite3.connect(":memory:"), BootProfile())
        self.tokens = NodeTokens()
        self.base = config.base_url
        scripts = ScriptRenderer(NodeBootTargets(self.inventory, self.profiles, discovery), self.base)
        self.http = HttpService(config, self.events.publish, scripts, self.mac_for_ip, tokens=self.tokens)

    def mac_for_ip(self, ip: ipaddress.IPv4Address) -> str | None:
        node = self.inventory.by_ip.get(ip)
        return node.mac if node else None

    def kinds(self, mac: str) -> list[type]:
        return [type(e) for e in self.events.last(mac)]

    async def reported(self, mac: str, count: int, timeout: float = 5.0) -> list[type]:
        """The kinds of a node's events once it has count of them: a file is reported when the server saw its last
        byte go, which a client that read it all may be a moment ahead of."""
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.events.last(mac)) < count and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        return self.kinds(mac)


async def started(config: HttpSettings, discovery: BootProfile | None = None) -> Appliance:
    app = Appliance(config, discovery)
    await app.http.start()
    return app


@pytest.fixture
async def appliance(config: HttpSettings) -> AsyncIterator[Appliance]:
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
    assert isinstance(event, ScriptServed) and (event.profile, event.via) == ("none", Via.HTTP)


async def test_a_profile_switch_changes_the_next_script(appliance: Appliance) -> None:
    url = f"{appliance.base}/boot/52-54-00-77-00-02.ipxe"
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as r:
            assert "sanboot" not in await r.text() and "kernel " not in await r.text()
        appliance.profiles.set(NODE2.mac, BootProfile(kind="local"))
        async with http.get(url) as r:
            assert "sanboot --no-describe --drive 0x80" in await r.text()
        appliance.profiles.set(NODE2.mac, DEPLOY)
        async with http.get(url) as r:
            text = await r.text()
    assert f"kernel {appliance.base}/files/deploy/vmlinuz initrd=initrd.img console=ttyS0" in text
    assert f"rackboot.callback={appliance.base}/callback/52-54-00-77-00-02" in text
    served = [e for e in appliance.events.last(NODE2.mac) if isinstance(e, ScriptServed)]
    assert [(e.profile, e.env) for e in served] == [("none", ""), ("local", ""), ("deploy", "debian12")]


async def test_polls_of_a_waiting_node_do_not_flood_its_events(appliance: Appliance) -> None:
    url = f"{appliance.base}/boot/52-54-00-77-00-01.ipxe"
    async with aiohttp.ClientSession() as http:
        for suffix in ("", "?poll=1", "?poll=1", "?poll=1"):
            async with http.get(url + suffix) as r:
                assert r.status == 200
    assert appliance.kinds(NODE1.mac) == [ScriptServed]
    assert appliance.http.stats()["script_polls_quiet"] == 3


async def test_the_poll_memory_stays_bounded_whatever_macs_are_asked(config: HttpSettings) -> None:
    app = Appliance(config)
    app.http = HttpService(config, app.events.publish, ScriptRenderer(NodeBootTargets(app.inventory, app.profiles), app.base),
                           app.mac_for_ip, max_tracked_macs=2)
    await app.http.start()
    try:
        async with aiohttp.ClientSession() as http:
            for i in range(5):  # any host may ask for any MAC's script
                async with http.get(f"{app.base}/boot/52-54-00-99-00-{i:02x}.ipxe") as r:
                    assert r.status == 200
            async with http.get(f"{app.base}/boot/52-54-00-99-00-04.ipxe?poll=1") as r:  # still remembered: quiet
                assert r.status == 200
    finally:
        await app.http.close()
    assert len(app.http._last_script) == 2 and app.http.stats()["script_polls_quiet"] == 1


async def test_a_script_that_gave_up_reports_the_error(appliance: Appliance) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{appliance.base}/boot/52-54-00-77-00-01.ipxe?error=kernel") as r:
            assert r.status == 200
    failed, fetched = appliance.events.last(NODE1.mac)
    assert isinstance(failed, BootFailed) and failed.what == "kernel" and "kernel" in failed.message
    assert isinstance(fetched, ScriptServed)


async def test_unknown_mac_is_told_so_when_ignored(appliance: Appliance) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{appliance.base}/boot/52-54-00-99-99-99.ipxe") as r:
            text = await r.text()
        async with http.get(f"{appliance.base}/boot/not-a-mac.ipxe") as r:
            assert r.status == 404
    assert "not in the inventory" in text and text.rstrip().endswith("exit 1")
    assert appliance.events.last(UNKNOWN_MAC)[0].profile == "unknown"  # type: ignore[union-attr]


async def test_unknown_mac_boots_discovery_when_configured(config: HttpSettings) -> None:
    app = await started(config, DEFAULT_DISCOVERY_PROFILE)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{app.base}/boot/52-54-00-99-99-99.ipxe") as r:
                text = await r.text()
    finally:
        await app.http.close()
    assert f"kernel {app.base}/files/discovery/vmlinuz" in text
    assert f"rackboot.mac={UNKNOWN_MAC}" in text
    assert app.events.last(UNKNOWN_MAC)[0].profile == "discovery"  # type: ignore[union-attr]


async def test_range_request_returns_206_and_the_right_bytes(appliance: Appliance) -> None:
    data = (appliance.config.files / "deploy" / "vmlinuz").read_bytes()
    status, body = await curl("-r", "1000-1999", f"{appliance.base}/files/deploy/vmlinuz")
    assert status == 206 and body == data[1000:2000]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{appliance.base}/files/deploy/vmlinuz", headers={"Range": "bytes=-100"}) as r:
            assert r.status == 206 and await r.read() == data[-100:]
            assert r.headers["Content-Range"] == f"bytes {len(data) - 100}-{len(data) - 1}/{len(data)}"
        async with http.get(f"{appliance.base}/files/deploy/vmlinuz") as r:
            assert r.status == 200 and await r.read() == data


async def test_more_connections_at_once_than_one_accept_batch_are_all_answered(appliance: Appliance) -> None:
    """asyncio accepts ACCEPT_BATCH connections per wake-up; the rest wait in the kernel's queue, none is refused."""
    data = (appliance.config.files / "deploy" / "vmlinuz").read_bytes()
    count = ACCEPT_BATCH * 8
    socks = [socket.socket() for _ in range(count)]
    for sock in socks:  # every connection made and its request sent before any answer is read
        sock.connect((str(appliance.config.address), appliance.config.port))
        sock.sendall(b"GET /files/deploy/vmlinuz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")

    def read_all(sock: socket.socket) -> bytes:
        with sock:
            got = b""
            while chunk := sock.recv(1 << 20):
                got += chunk
            return got

    answers = await asyncio.gather(*(asyncio.to_thread(read_all, s) for s in socks))
    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and body == data
    for _ in range(500):  # a file is counted once the server saw its last byte go
        if appliance.http.stats()["files"] == count:
            break
        await asyncio.sleep(0.01)
    assert appliance.http.stats()["files"] == count


async def test_paths_cannot_escape_the_files_root(appliance: Appliance, tmp_path: Path) -> None:
    (appliance.config.files / "escape").symlink_to(tmp_path / "secret.txt")
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
    await appliance.reported(NODE1.mac, 3)
    kernel, initrd, other = appliance.events.last(NODE1.mac)
    assert kernel == KernelFetched(NODE1.mac, "deploy/vmlinuz", ts=kernel.ts)
    assert initrd == InitrdFetched(NODE1.mac, "deploy/initrd.img", ts=initrd.ts)
    assert other == FileSent(NODE1.mac, "other.txt", Via.HTTP, ts=other.ts)
    # node-2 has no deploy profile: the same kernel is just a file for it
    async with client_from(str(NODE2.ip)) as http:
        async with http.get(f"{appliance.base}/files/deploy/vmlinuz") as r:
            await r.read()
    assert await appliance.reported(NODE2.mac, 1) == [FileSent]


async def test_mac_query_names_the_node_and_anonymous_fetches_publish_nothing(appliance: Appliance) -> None:
    appliance.profiles.set(NODE2.mac, DEPLOY)
    status, _ = await curl(f"{appliance.base}/files/deploy/initrd.img?mac=52-54-00-77-00-02")
    assert status == 200
    assert appliance.kinds(NODE2.mac) == [InitrdFetched]
    status, _ = await curl(f"{appliance.base}/files/other.txt")  # from 127.0.0.1: no node
    assert status == 200 and appliance.http.stats()["files_anonymous"] == 1


async def test_callbacks_without_a_claimed_stage_are_node_reports(appliance: Appliance) -> None:
    body = {"stage": "postinstall", "status": "ok", "message": "image written", "bytes": 123, "mac": "spoofed"}
    status, answer = await curl("-X", "POST", "-H", "Content-Type: application/json", "--data", json.dumps(body),
                                f"{appliance.base}/callback/52-54-00-77-00-01")
    assert status == 200 and json.loads(answer)["ok"] is True
    [event] = appliance.events.last(NODE1.mac)
    assert event == NodeReport(NODE1.mac, "postinstall", "ok", "image written", ts=event.ts)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{appliance.base}/callback/52:54:00:77:00:01?stage=ipxe&status=started") as r:
            assert r.status == 200
        async with http.post(f"{appliance.base}/callback/52-54-00-77-00-01", data=b"[not json") as r:
            assert r.status == 400
    assert appliance.events.last(NODE1.mac)[-1].stage == "ipxe"  # type: ignore[union-attr]
    assert appliance.http.stats()["dropped_malformed"] == 1 and appliance.http.stats()["callbacks"] == 2


async def test_node_tokens_are_claimed_once_from_the_node_and_redeemed_once(appliance: Appliance) -> None:
    """Defects of 2026-12-05: a token read from the public script was accepted, again on reuse; a latin-1 body
    without a token was accepted as agent_up. Now the agent claims its token, from its own address, once."""
    appliance.tokens.expect(NODE1.mac, "d1", str(NODE1.ip))
    appliance.tokens.expect(NODE2.mac, "d1", str(NODE2.ip))
    url = f"{appliance.base}/callback/52-54-00-77-00-01"
    async with client_from("127.0.0.1") as stranger:  # another host of the boot network
        for body in ({"stage": "agent_up"}, {"stage": "installed"}, {"stage": "installed", "token": "x"},
                     {"stage": "agent_up", "token": 12}):
            async with stranger.post(url, json=body) as r:
                assert r.status == 403, body
        # One decoding of the body, here: a latin-1 body is not JSON text (RFC 8259 8.1) and claims nothing.
        async with stranger.post(url, data='{"stage": "agent_up", "note": "\xe9"}'.encode("latin-1"),
                                 headers={"Content-Type": "application/json; charset=latin-1"}) as r:
            assert r.status == 400
    assert appliance.events.last(NODE1.mac) == []
    async with client_from(str(NODE2.ip)) as node2:  # a node cannot claim another's token
        async with node2.post(url, json={"stage": "agent_up"}) as r:
            assert r.status == 403
    async with client_from(str(NODE1.ip)) as node1:
        async with node1.post(url, json={"stage": "agent_up", "ssh_port": 2222, "data_port": 7171}) as r:
            assert r.status == 200
            claimed = await r.json()
        token = claimed["token"]  # served once, to the node that claimed it
        async with node1.post(url, json={"stage": "agent_up"}) as r:
            assert r.status == 403  # claimed already: a second claim (anyone's) is refused
        async with node1.post(url, json={"stage": "installed", "token": token, "env": "debian12:1"}) as r:
            assert r.status == 200
            answer = await r.json()
        async with node1.post(url, json={"stage": "installed", "token": token, "env": "debian12:1"}) as r:
            assert r.status == 403  # used
    async with client_from("127.0.0.1") as stranger:  # the token alone, from another host, proves nothing
        async with stranger.post(url, json={"stage": "agent_up", "token": token}) as r:
            assert r.status == 403
    up, os_up = appliance.events.last(NODE1.mac)
    assert up == AgentUp(NODE1.mac, "d1", 2222, 7171, ts=up.ts)
    assert os_up == OsUp(NODE1.mac, "d1", "debian12:1", ts=os_up.ts)
    assert token not in json.dumps(answer) and token not in json.dumps([event_json(e) for e in appliance.events.last(NODE1.mac)])
    assert appliance.http.stats()["callbacks_refused"] == 8


async def test_only_configured_nbps_are_served(appliance: Appliance) -> None:
    status, body = await curl(f"{appliance.base}/nbp/snponly.efi")
    assert status == 200 and body == b"MZ fake snponly"
    status, _ = await curl(f"{appliance.base}/nbp/ipxe.lkrn")
    assert status == 404


async def test_routes_added_before_start_are_served(config: HttpSettings) -> None:
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


async def test_bind_error_when_the_port_is_taken(config: HttpSettings) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", config.port))
        holder.listen()
        app = Appliance(config)
        with pytest.raises(BindError, match=f"127.0.0.1:{config.port}"):
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
    files = appliance.config.files
    reader, writer = await asyncio.open_connection("127.0.0.1", appliance.config.port)
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


async def test_a_client_slow_to_send_its_first_request_is_still_answered(appliance: Appliance) -> None:
    """aiohttp arms its keep-alive timer at the connect: a client whose request comes 2 s after it (a node busy
    between the two) gets its answer, not a closed connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", appliance.config.port)
    try:
        await asyncio.sleep(2.0)
        writer.write(b"GET /files/deploy/vmlinuz HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = await read_response(reader)
        assert status == 200 and body == (appliance.config.files / "deploy/vmlinuz").read_bytes()
    finally:
        writer.close()
