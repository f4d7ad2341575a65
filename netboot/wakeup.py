"""The wake-up pipe of a thread that sleeps in epoll: the one piece the TFTP data plane and the sendfile lanes share."""
from __future__ import annotations

import os
import select


def epoll_with_wakeup() -> tuple[select.epoll, int, int]:
    """Return a new epoll set already watching the read end of a new pipe, and the pipe's read and write ends.

    A thread sleeping in the epoll set is woken by a byte written to the write end; the read end is non-blocking,
    so the thread drains it without ever blocking on it.
    """
    epoll = select.epoll()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    epoll.register(wake_r, select.EPOLLIN)
    return epoll, wake_r, wake_w
