"""The event loop's registrations of file descriptors: drop them before a close, never drop someone else's after it.

A task waiting in `loop.sock_recv`, `sock_accept`, `sock_sendall` or `sock_connect` unregisters its fd when its
cancellation is processed, one loop turn after `cancel()`. A socket closed right after the cancel frees its fd
number at once; if another task of the same loop opens a socket in that turn and registers it, it gets the same
number, and the late clean-up unregisters *its* reader: it never hears anything again. In the vm-testbed, where
hundreds of nodes share one loop, that is what left installed systems without their DHCP answers after a kexec
(the old deploy agent's listening socket closed as the new system opened its DHCP socket). A real deploy agent
closes and opens sockets in one loop too.

Two rules, each a function here: unregister an fd before closing it (`close_socket`, `forget_fd`): asyncio then
sees its own handle cancelled and its late clean-up does nothing; and a waiter of our own (`fd_ready`)
unregisters on its way out only if the fd is still the file it waited on.
"""
from __future__ import annotations

import asyncio
import os
import socket


def forget_fd(fd: int) -> None:
    """Unregister fd's reader and writer from the running event loop (call before closing it; no loop: nothing)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    loop.remove_reader(fd)
    loop.remove_writer(fd)


def close_socket(sock: socket.socket) -> None:
    """Close a socket the event loop may be watching, unregistering it first."""
    fd = sock.fileno()
    if fd >= 0:
        forget_fd(fd)
    sock.close()


def _identity(fd: int) -> tuple[int, int] | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


async def fd_ready(fd: int, write: bool) -> None:
    """Wait until the event loop's selector says fd is readable (or writable)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    identity = _identity(fd)

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    if write:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        # Cancelled, we get here a loop turn later: the fd may have been closed (and unregistered by its closer)
        # and its number given to another file since. Unregister only the file we waited on.
        if identity is not None and _identity(fd) == identity:
            if write:
                loop.remove_writer(fd)
            else:
                loop.remove_reader(fd)
