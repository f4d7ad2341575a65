"""Sockets closed while the event loop waits on them: a socket that takes the freed fd number keeps its reader.

Regression: hundreds of vm-testbed nodes share one loop; an old deploy agent's listening socket closed as the
installed system opened its DHCP socket, which took the same fd number and lost its reader to the accept's late
clean-up (the node never heard its DHCP answers).
"""
from __future__ import annotations

import asyncio
import os
import socket
from typing import Callable

from broadcast.loopfd import fd_ready
from broadcast.receiver import Receiver
from broadcast.wire import LineSocket


async def _reader_survives(fd_to_close: int, close: Callable[[], None]) -> bool:
    """Close (through `close`) an fd the loop waits on, register a new socket on the same number in the same
    loop turn, let the late clean-ups run, and say whether the new socket's datagram is read."""
    loop = asyncio.get_running_loop()
    close()
    new = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        new.setblocking(False)
        new.bind(("127.0.0.1", 0))
        assert new.fileno() == fd_to_close, "the test needs the freed number reused"
        got: list[bytes] = []
        loop.add_reader(new.fileno(), lambda: got.append(new.recv(100)))
        for _ in range(3):
            await asyncio.sleep(0)  # the cancelled waiter's clean-up runs here
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
            peer.sendto(b"dhcp offer", new.getsockname())
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.005)
        loop.remove_reader(new.fileno())
        return got == [b"dhcp offer"]
    finally:
        new.close()


async def test_receiver_stop_listening_leaves_a_reused_fd_registered() -> None:
    receiver = Receiver("node-1", "127.0.0.1")
    await receiver.start()
    await asyncio.sleep(0)  # its accept task now waits in loop.sock_accept
    assert receiver._sock is not None
    assert await _reader_survives(receiver._sock.fileno(), receiver.stop_listening)


async def test_line_socket_closed_under_a_reader_leaves_a_reused_fd_registered() -> None:
    a, b = socket.socketpair()
    conn = LineSocket(a)
    reader = asyncio.create_task(conn.recv())
    await asyncio.sleep(0)  # waiting in loop.sock_recv

    def close() -> None:
        reader.cancel()
        conn.close()

    try:
        assert await _reader_survives(a.fileno(), close)
    finally:
        b.close()


async def test_fd_ready_cancelled_after_its_fd_was_reused_leaves_the_new_file_registered() -> None:
    r, w = os.pipe()
    waiter = asyncio.create_task(fd_ready(r, write=False))
    await asyncio.sleep(0)

    def close() -> None:
        waiter.cancel()
        # the closer unregisters (as SplicePipe.close does), then closes
        asyncio.get_running_loop().remove_reader(r)
        os.close(r)

    try:
        assert await _reader_survives(r, close)
    finally:
        os.close(w)
