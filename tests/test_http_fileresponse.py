"""netboot.fileresponse on 127.0.0.1 against aiohttp's FileResponse: same status, headers and bytes, request by request."""
from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from netboot.fileresponse import PlaneFileResponse
from netboot.sendfile import INLINE_LIMIT, SendfilePlane

SIZE = INLINE_LIMIT * 3 + 12_345  # larger than what goes out inline: the lanes send most of it
COMPARED = ("Content-Length", "Content-Range", "Content-Type", "ETag", "Last-Modified", "Accept-Ranges")


async def served(tmp_path: Path, plane: SendfilePlane | None,
                 ssl_context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    """An app serving tmp_path twice: /ours/NAME (PlaneFileResponse) and /theirs/NAME (aiohttp's FileResponse)."""
    async def ours(request: web.Request) -> web.StreamResponse:
        return PlaneFileResponse(tmp_path / request.match_info["name"], plane)

    async def theirs(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(tmp_path / request.match_info["name"])

    app = web.Application()
    app.router.add_get("/ours/{name}", ours)
    app.router.add_get("/theirs/{name}", theirs)
    return await started(app, ssl_context)


async def started(app: web.Application, ssl_context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    """Run app on a free loopback port; return its runner and the port."""
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ssl_context).start()
    return runner, port


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[int, bytes, Path]]:
    data = os.urandom(SIZE)
    (tmp_path / "f.bin").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "initrd.gz").write_bytes(b"x" * 1000)
    (tmp_path / "dir").mkdir()
    plane = SendfilePlane()
    runner, port = await served(tmp_path, plane)
    try:
        yield port, data, tmp_path
    finally:
        await runner.cleanup()
        plane.close()


async def fetch(port: int, method: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    """One request on its own connection: status, the compared headers, body."""
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        async with http.request(method, f"http://127.0.0.1:{port}{path}", headers=headers) as r:
            body = await r.read()
            return r.status, {k: r.headers[k] for k in COMPARED if k in r.headers}, body


def cases(data: bytes, mtime: float) -> list[tuple[str, str, dict[str, str]]]:
    """(method, file, headers) requests both responses must answer alike."""
    old, new = formatdate(mtime - 3600, usegmt=True), formatdate(mtime + 3600, usegmt=True)
    n = len(data)
    out: list[tuple[str, str, dict[str, str]]] = [("GET", "f.bin", {}), ("HEAD", "f.bin", {}), ("GET", "empty", {}),
                                                   ("HEAD", "empty", {}), ("GET", "initrd.gz", {"Accept-Encoding": "identity"}),
                                                   ("GET", "missing", {}), ("GET", "dir", {})]
    for rng in (f"bytes={n // 3}-", f"bytes={n // 8}-{n // 2}", f"bytes={n - 1}-{n - 1}", "bytes=-100", f"bytes=-{n * 2}",
                f"bytes=0-{n * 2}", f"bytes={n}-", f"bytes={n * 2}-", "bytes=5-2", "bytes=0-1,4-5", "chars=0-1", "bytes=0-0"):
        out.append(("GET", "f.bin", {"Range": rng}))
        out.append(("HEAD", "f.bin", {"Range": rng}))
    out += [("GET", "f.bin", {"Range": "bytes=100-", "If-Range": new}),  # not modified since: the range
            ("GET", "f.bin", {"Range": "bytes=100-", "If-Range": old}),  # modified since: the whole file
            ("GET", "f.bin", {"If-Modified-Since": new}), ("GET", "f.bin", {"If-Modified-Since": old}),
            ("GET", "f.bin", {"If-Unmodified-Since": old}), ("GET", "f.bin", {"If-Unmodified-Since": new}),
            ("GET", "f.bin", {"If-Match": '"nope"'}), ("GET", "f.bin", {"If-Match": "*"}),
            ("GET", "f.bin", {"If-None-Match": "*"}), ("GET", "f.bin", {"If-None-Match": '"nope"'})]
    return out


async def test_answers_as_aiohttps_file_response_does(server: tuple[int, bytes, Path]) -> None:
    port, data, root = server
    etag = (await fetch(port, "HEAD", "/theirs/f.bin", {}))[1]["ETag"]
    requests = cases(data, (root / "f.bin").stat().st_mtime) + [
        ("GET", "f.bin", {"If-None-Match": etag}), ("GET", "f.bin", {"If-None-Match": f"W/{etag}"}),
        ("GET", "f.bin", {"If-Match": etag}), ("GET", "f.bin", {"If-Match": f'"x", {etag}'})]
    differ = []
    for method, name, headers in requests:
        theirs = await fetch(port, method, f"/theirs/{name}", headers)
        ours = await fetch(port, method, f"/ours/{name}", headers)
        if theirs[0] >= 400:  # aiohttp's error answers are chunked, typed octet-stream; ours say Content-Length: 0
            assert ours[1].pop("Content-Length") == theirs[1].pop("Content-Length", "0") == "0"
            assert theirs[1].pop("Content-Type", None) in (None, "application/octet-stream")
        if ours != theirs:
            differ.append((method, name, headers, ours[:2], theirs[:2]))
    assert not differ, "\n".join(map(str, differ))


async def test_the_bodies_are_the_files_bytes(server: tuple[int, bytes, Path]) -> None:
    port, data, _ = server
    assert (await fetch(port, "GET", "/ours/f.bin", {}))[2] == data
    status, headers, body = await fetch(port, "GET", "/ours/f.bin", {"Range": "bytes=1000-"})
    assert status == 206 and body == data[1000:] and headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
    status, headers, body = await fetch(port, "HEAD", "/ours/f.bin", {})
    assert status == 200 and body == b"" and headers["Content-Length"] == str(len(data))


async def test_if_range_with_the_etag_is_compared(server: tuple[int, bytes, Path]) -> None:
    """aiohttp reads If-Range as a date only; an ETag there decides here (RFC 9110 13.1.5)."""
    port, data, _ = server
    etag = (await fetch(port, "HEAD", "/ours/f.bin", {}))[1]["ETag"]
    status, headers, body = await fetch(port, "GET", "/ours/f.bin", {"Range": "bytes=100-", "If-Range": etag})
    assert status == 206 and body == data[100:]
    for stale in ('"0-0"', f"W/{etag}"):  # another version, or a weak tag: the whole file
        status, headers, body = await fetch(port, "GET", "/ours/f.bin", {"Range": "bytes=100-", "If-Range": stale})
        assert status == 200 and body == data and "Content-Range" not in headers


async def test_without_a_plane_the_loop_sends_the_body(tmp_path: Path) -> None:
    data = os.urandom(SIZE)
    (tmp_path / "f.bin").write_bytes(data)
    runner, port = await served(tmp_path, None)
    try:
        assert (await fetch(port, "GET", "/ours/f.bin", {"Range": "bytes=7-"}))[2] == data[7:]
    finally:
        await runner.cleanup()


async def test_over_tls_the_body_is_encrypted_not_sendfiled(tmp_path: Path) -> None:
    """sendfile(2) would write the file's plain bytes past TLS: the body goes through the TLS transport."""
    data = os.urandom(SIZE)
    (tmp_path / "f.bin").write_bytes(data)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    plane = SendfilePlane()
    runner, port = await served(tmp_path, plane, context)
    try:
        client: Any = ssl.create_default_context(cafile=str(cert))
        client.check_hostname = False
        async with aiohttp.ClientSession() as http:
            async with http.get(f"https://127.0.0.1:{port}/ours/f.bin", ssl=client) as r:
                assert r.status == 200 and await r.read() == data
        await asyncio.sleep(0)
        assert not plane.started
    finally:
        await runner.cleanup()
        plane.close()


async def test_a_second_prepare_sends_nothing_more(tmp_path: Path) -> None:
    data = os.urandom(SIZE)
    (tmp_path / "f.bin").write_bytes(data)
    plane = SendfilePlane()

    async def twice(request: web.Request) -> web.StreamResponse:
        response = PlaneFileResponse(tmp_path / "f.bin", plane)
        await response.prepare(request)
        return response  # aiohttp prepares it once more

    app = web.Application()
    app.router.add_get("/twice", twice)
    runner, port = await started(app)
    try:
        def raw() -> bytes:
            with socket.create_connection(("127.0.0.1", port)) as client:
                client.sendall(b"GET /twice HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                got = b""
                while chunk := client.recv(1 << 20):
                    got += chunk
                return got

        head, _, body = (await asyncio.to_thread(raw)).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and body == data  # the body once, nothing after it
    finally:
        await runner.cleanup()
        plane.close()
