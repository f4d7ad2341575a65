"""File bodies sent with sendfile(2) from one thread of their own, so the event loop keeps answering while they flow.

With the event loop's own sendfile (asyncio's sock_sendfile), every writable socket costs the loop a
sendfile call that, on a fast link, moves a whole socket buffer (megabytes) before it returns: 200
downloads at once made one loop iteration last tens to hundreds of milliseconds, and DHCP answers
waited that long behind them (docs/benchmarks.md, "HTTP downloads"). Here the loop hands each body to
one of a few threads (lanes, one per CPU) each running a lean epoll loop over its downloads' sockets; the
GIL is released during each sendfile and epoll_wait, so the loop and the other lanes run meanwhile. The thread works on duplicates of the socket and
file descriptors, so a connection or file the loop closes early cannot be confused with a new one.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import os
import select
import threading

from netboot.wakeup import epoll_with_wakeup

SEND_CHUNK = 4 << 20  # the most one sendfile call may move (the socket buffer usually takes less)
TURN_SHARE = 8 << 20  # the most one socket sends in a turn while other sockets wait theirs
INLINE_LIMIT = 256 << 10  # a body this small goes out from the caller's thread at once, no hand-off


class _Body:
    """One body being sent: duplicated descriptors, what is left, and the future the loop awaits."""

    __slots__ = ("sock_fd", "file_fd", "offset", "left", "sent", "loop", "future", "cancelled")

    def __init__(self, sock_fd: int, file_fd: int, offset: int, count: int, loop: asyncio.AbstractEventLoop,
                 future: asyncio.Future[int]) -> None:
        self.sock_fd, self.file_fd, self.offset, self.left, self.sent = sock_fd, file_fd, offset, count, 0
        self.loop, self.future, self.cancelled = loop, future, False


def _settle(future: asyncio.Future[int], result: int, error: BaseException | None) -> None:
    if not future.done():
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


class _Lane:
    """A thread that sends every body handed to it with sendfile(2), each as its socket becomes writable."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._epoll: select.epoll | None = None
        self._wake_r = self._wake_w = -1
        self._commands: collections.deque[tuple[str, _Body | None]] = collections.deque()
        self._bodies: dict[int, _Body] = {}
        self._again: list[_Body] = []  # bodies whose socket took a whole turn's share: another turn, without an edge
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    async def send(self, body: _Body) -> int:
        """Send a body from this lane's thread; return the bytes sent."""
        self._command("add", body)
        try:
            return await body.future
        except asyncio.CancelledError:
            body.cancelled = True
            self._command("cancel", body)
            raise

    def close(self, timeout: float = 2.0) -> None:
        """Fail every body in flight, end the thread and release its descriptors (blocks up to timeout)."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is None:
                return
            self._commands.append(("quit", None))
            os.write(self._wake_w, b"q")
        thread.join(timeout)

    def _command(self, what: str, body: _Body) -> None:
        with self._lock:
            if self._thread is None:
                self._epoll, self._wake_r, self._wake_w = epoll_with_wakeup()
                self._thread = threading.Thread(target=self._run, args=(self._epoll, self._wake_r, self._wake_w),
                                                name=self._name, daemon=True)
                self._thread.start()
            self._commands.append((what, body))
            os.write(self._wake_w, b"c")

    def _finish(self, epoll: select.epoll, body: _Body, error: BaseException | None) -> None:
        if self._bodies.get(body.sock_fd) is body:
            del self._bodies[body.sock_fd]
            epoll.unregister(body.sock_fd)
        os.close(body.sock_fd)
        os.close(body.file_fd)
        if not body.cancelled:
            try:
                body.loop.call_soon_threadsafe(_settle, body.future, body.sent, error)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

    def _step(self, epoll: select.epoll, body: _Body) -> None:
        """Send until the socket is full (then its next edge wakes us) or this turn's share is sent; finish when done or broken.

        Sockets are watched edge-triggered, as nginx does: a level-triggered watch woke the lane again as soon as a
        little room freed up, for one small sendfile each time. A socket that took this turn's share whole gets
        another turn after the others (it may never fill, so no edge would come).
        """
        moved = 0
        while True:
            want = min(body.left, SEND_CHUNK)
            try:
                n = os.sendfile(body.sock_fd, body.file_fd, body.offset, want)
                if n == 0:
                    raise ConnectionResetError("the file ended before the body did")
            except BlockingIOError:
                return
            except OSError as exc:
                self._finish(epoll, body, exc)
                return
            body.offset += n
            body.left -= n
            body.sent += n
            moved += n
            if body.left <= 0:
                self._finish(epoll, body, None)
                return
            if n < want:  # the socket is full: wait for its edge
                return
            if moved >= TURN_SHARE:
                self._again.append(body)
                return

    def _run(self, epoll: select.epoll, wake_r: int, wake_w: int) -> None:
        running = True
        while running:
            again, self._again = self._again, []
            for body in again:
                if self._bodies.get(body.sock_fd) is body:
                    self._step(epoll, body)
            for fd, _ in epoll.poll(0 if self._again else -1):
                if fd != wake_r:
                    body = self._bodies.get(fd)
                    if body is not None:
                        self._step(epoll, body)
                    continue
                try:
                    os.read(wake_r, 4096)
                except BlockingIOError:
                    pass
                while self._commands:
                    what, body = self._commands.popleft()
                    if what == "quit":
                        running = False
                        for b in list(self._bodies.values()):
                            self._finish(epoll, b, ConnectionAbortedError("the server is closing"))
                        break
                    assert body is not None
                    if what == "add":
                        self._bodies[body.sock_fd] = body
                        epoll.register(body.sock_fd, select.EPOLLOUT | select.EPOLLET)
                        self._step(epoll, body)
                    elif self._bodies.get(body.sock_fd) is body:  # cancel
                        self._finish(epoll, body, None)
                if not running:
                    break
        epoll.close()
        os.close(wake_r)
        os.close(wake_w)


class SendfilePlane:
    """Threads (lanes, one per CPU by default, as nginx's workers) that send the bodies handed to them, round-robin."""

    def __init__(self, name: str = "http sendfile", lanes: int | None = None) -> None:
        self._lanes = [_Lane(f"{name} {i}") for i in range(lanes or os.cpu_count() or 1)]
        self._next_lane = itertools.cycle(self._lanes)

    async def send(self, sock_fd: int, file_fd: int, offset: int, count: int) -> int:
        """Send count bytes of the file from offset on the (non-blocking) socket; return the bytes sent.

        A body of at most INLINE_LIMIT bytes is tried at once from the caller (small files such as iPXE binaries
        need no hand-off); a larger one goes to a lane whole, so that 200 downloads starting together do not
        each move INLINE_LIMIT bytes from the event loop.
        """
        sent = 0
        if count <= INLINE_LIMIT:
            try:
                sent = os.sendfile(sock_fd, file_fd, offset, count)
            except BlockingIOError:
                pass
            else:
                if sent == 0:
                    raise ConnectionResetError("the file ended before the body did")
            if sent >= count:
                return sent
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        body = _Body(os.dup(sock_fd), os.dup(file_fd), offset + sent, count - sent, loop, future)
        return sent + await next(self._next_lane).send(body)

    def close(self, timeout: float = 2.0) -> None:
        """Fail every body in flight, end the threads and release their descriptors (blocks up to timeout each)."""
        for lane in self._lanes:
            lane.close(timeout)

    @property
    def started(self) -> bool:
        """True once some body went through a thread."""
        return any(lane._thread is not None for lane in self._lanes)
