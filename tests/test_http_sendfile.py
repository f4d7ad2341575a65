"""The HTTP service's sendfile plane with real sockets: bodies larger than a socket buffer, offsets, a peer that leaves."""
from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from netboot.sendfile import INLINE_LIMIT, SendfilePlane


async def read_all(sock: socket.socket, count: int) -> bytes:
    """Read count bytes from a non-blocking socket on the running loop."""
    loop = asyncio.get_running_loop()
    got = bytearray()
    while len(got) < count:
        chunk = await loop.sock_recv(sock, 1 << 20)
        if not chunk:
            break
        got += chunk
    return bytes(got)


@pytest.mark.parametrize("offset,count", [(0, 100), (0, 8 << 20), (12_345, (8 << 20) - 12_345 - 7)])
async def test_the_plane_sends_exactly_the_asked_part_of_the_file(tmp_path: Path, offset: int, count: int) -> None:
    data = os.urandom(8 << 20)
    (tmp_path / "f").write_bytes(data)
    plane = SendfilePlane()
    server, client = socket.socketpair()
    server.setblocking(False)
    client.setblocking(False)
    try:
        with open(tmp_path / "f", "rb") as fobj:
            sent, got = await asyncio.gather(plane.send(server.fileno(), fobj.fileno(), offset, count), read_all(client, count))
        assert sent == count and got == data[offset:offset + count]
        assert count <= INLINE_LIMIT or plane.started  # a large body went through the thread
    finally:
        plane.close()
        server.close()
        client.close()


async def test_a_peer_that_leaves_fails_the_send_and_the_plane_keeps_serving(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(os.urandom(16 << 20))
    plane = SendfilePlane()
    server, client = socket.socketpair()
    server.setblocking(False)
    try:
        with open(tmp_path / "f", "rb") as fobj:
            sending = asyncio.ensure_future(plane.send(server.fileno(), fobj.fileno(), 0, 16 << 20))
            await asyncio.sleep(0.05)  # the socket buffer is full, nobody reads
            assert not sending.done()
            client.close()
            with pytest.raises(OSError):
                await asyncio.wait_for(sending, timeout=5)
        server2, client2 = socket.socketpair()
        server2.setblocking(False)
        client2.setblocking(False)
        with open(tmp_path / "f", "rb") as fobj:
            sent, got = await asyncio.gather(plane.send(server2.fileno(), fobj.fileno(), 0, 1 << 20), read_all(client2, 1 << 20))
        assert sent == 1 << 20 and len(got) == 1 << 20
        server2.close()
        client2.close()
    finally:
        plane.close()
        server.close()
