"""Path traversal, table-driven, on the real TFTP and HTTP services on loopback: every attempt is refused.

`../`, absolute paths, backslashes, percent- and double-encoded dots and slashes, NUL bytes, overlong
names and symbolic links out of the root; each one asked over the wire, and the answer must never carry
the secret file beside the root (issue 11, "Paths").
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
import sqlite3
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import pytest

from appliance.booting import NodeBootTargets
from appliance.inventory import Inventory
from appliance.profiles import ProfileStore
from domain.profiles import BootProfile
from ipxe.script import ScriptRenderer
from netboot.http import HttpService, HttpSettings
from netboot.tftp.server import TftpService, TftpSettings

SECRET = b"secret bytes outside the roots"

TFTP_ATTEMPTS = [
    "../secret.txt", "/../secret.txt", "a/../../secret.txt", "..\\secret.txt", "a\\..\\..\\secret.txt",
    "./../secret.txt", "....//secret.txt/..", "%2e%2e/secret.txt", "%2e%2e%2fsecret.txt", "..%2fsecret.txt",
    "escape", "dir/secret.txt", "dir/../dir/secret.txt", str(Path("/") / "etc" / "shadow"), "/proc/self/environ",
    "ok.txt/../../secret.txt", "a" * 600, "../" * 50 + "secret.txt", "\x7f../secret.txt", "\t../secret.txt",
]
HTTP_ATTEMPTS = [
    "/files/../secret.txt", "/files/%2e%2e/secret.txt", "/files/%2E%2E/secret.txt", "/files/%252e%252e/secret.txt",
    "/files/..%2fsecret.txt", "/files/..%2Fsecret.txt", "/files/..%5csecret.txt", "/files/..\\secret.txt",
    "/files/%2e%2e%2fsecret.txt", "/files/a/%2e%2e/%2e%2e/secret.txt", "/files//etc/shadow", "/files/%2fetc%2fshadow",
    "/files/escape", "/files/dir/secret.txt", "/files/ok.txt%00../../secret.txt", "/files/%00", "/files/" + "a" * 5000,
    "/files/" + "../" * 40 + "secret.txt", "/nbp/../secret.txt", "/nbp/%2e%2e%2fsecret.txt", "/nbp/..%2f..%2fsecret.txt",
    "/boot/..%2f..%2fsecret.txt.ipxe", "/images/..%2fsecret.txt", "/callback/..%2fsecret.txt",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path, Path]:
    """TFTP root and HTTP files root side by side, the secret beside them, and links out of both."""
    (tmp_path / "secret.txt").write_bytes(SECRET)
    tftp, files, ipxe_dir = tmp_path / "tftp", tmp_path / "files", tmp_path / "ipxe"
    for root in (tftp, files, ipxe_dir):
        root.mkdir()
        (root / "ok.txt").write_bytes(b"fine")
        (root / "escape").symlink_to(tmp_path / "secret.txt")
        (root / "dir").symlink_to(tmp_path)
    (ipxe_dir / "snponly.efi").write_bytes(b"MZ")
    return tftp, files, ipxe_dir


@pytest.fixture
async def services(roots: tuple[Path, Path, Path]) -> AsyncIterator[tuple[TftpService, str]]:
    tftp_root, files, ipxe_dir = roots
    profiles = ProfileStore(sqlite3.connect(":memory:"), BootProfile())
    settings = HttpSettings(address=ipaddress.IPv4Address("127.0.0.1"), port=free_port(), files=files, ipxe_dir=ipxe_dir,
                            nbp_names=("snponly.efi",))
    scripts = ScriptRenderer(NodeBootTargets(Inventory(()), profiles), settings.base_url)
    http = HttpService(settings, [].append, scripts, lambda ip: None)
    tftp = TftpService(TftpSettings(address=ipaddress.IPv4Address("127.0.0.1"), root=tftp_root, ipxe_dir=ipxe_dir,
                                    nbp_names=("snponly.efi",), port=0, timeout=0.2, retries=1),
                       [].append, lambda ip: None)
    await http.start()
    await tftp.start()
    try:
        yield tftp, settings.base_url
    finally:
        await tftp.close()
        await http.close()


async def tftp_first_answer(port: int, name: bytes) -> bytes:
    """Send a raw RRQ for name (any bytes); return the first datagram that comes back (b"" when the request was
    dropped as malformed, which is a refusal too)."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        s.bind(("127.0.0.1", 0))
        await loop.sock_sendto(s, b"\x00\x01" + name + b"\x00octet\x00", ("127.0.0.1", port))
        try:
            data, _ = await asyncio.wait_for(loop.sock_recvfrom(s, 70000), 1)
        except TimeoutError:
            return b""
        return data


async def test_tftp_refuses_every_traversal_attempt(services: tuple[TftpService, str]) -> None:
    tftp, _ = services
    port = tftp.address[1]
    assert (await tftp_first_answer(port, b"ok.txt"))[:2] == b"\x00\x03"  # the control: a DATA block
    refused = []
    for name in [*TFTP_ATTEMPTS, "ok.txt\x00../secret.txt"]:
        answer = await tftp_first_answer(port, name.encode("latin-1"))
        assert SECRET not in answer, name
        refused.append(answer in (b"",) or answer[:2] == b"\x00\x05")  # dropped as malformed, or an ERROR
    assert all(refused), list(zip(TFTP_ATTEMPTS, refused))
    stats = tftp.stats()
    assert stats["access_denied"] + stats["not_found"] + stats["dropped_malformed"] == len(TFTP_ATTEMPTS) + 1


async def test_http_refuses_every_traversal_attempt(services: tuple[TftpService, str]) -> None:
    _, base = services
    statuses = {}
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/files/ok.txt") as r:
            assert r.status == 200 and await r.read() == b"fine"  # the control
        for path in HTTP_ATTEMPTS:
            # The path goes on the wire as written (no client-side normalisation of dots or escapes).
            reader, writer = await asyncio.open_connection("127.0.0.1", int(base.rsplit(":", 1)[1]))
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode("latin-1"))
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            assert SECRET not in answer, path
            statuses[path] = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
    assert all(s in (400, 403, 404, 414, 431) for s in statuses.values()), statuses
