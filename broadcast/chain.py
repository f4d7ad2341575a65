"""Fault-tolerant, pipelined image broadcast along a chain or a k-ary tree of relays.

Roles
- `Source` (appliance side) feeds the roots of a forest (one root for a chain, k for a tree) from the
  image file with sendfile, collects every node's report, and rescues orphaned nodes.
- `Receiver` (node side, one per deploy agent, bound to the node's address) accepts data connections
  for sessions the controller armed over SSH; each session is a `Relay`, which writes the stream to
  its sink and forwards it to its children.

Data connection (parent -> child), one TCP connection:
    parent: hello {session, token, from, ancestors, tree, size, sha256, report, params}   (JSON line)
    child:  ready {offset}                  (bytes it already has: a resume point)
    parent: raw image bytes [offset, size)  (no framing: the source sendfile()s, relays splice or copy chunks)
    child:  ack {offsets, blocked} every ack_interval   (JSON lines, upstream direction)
            superseded {by}                 (an ancestor took this child over: forget it)
`ack.offsets[i]` is the lowest offset received at depth i below the child (0 = the child itself),
for up to `resume_depth` levels. A parent keeps a retention window of the stream from the lowest offset
any of those nodes still needs, and reads from upstream only while the window has room (backpressure
next to the kernel's own TCP flow control and the bounded sink queue).

Faults: a child that closes, resets, stops acknowledging, or makes no progress for `stall_timeout`
while it is not itself blocked downstream is reported failed with the reason, and its parent adopts its
children: it connects to each, learns its offset from `ready` and resumes from there. A child whose
resume point left the window is handed to the source (which has the whole file). A relay that lost its
upstream asks the source to feed it after `orphan_after` seconds and gives up after `give_up_after`.

Relay data path (`ChainParams.relay_path`): on Linux a relay splices the upstream socket into a pipe,
tee(2)s it into one pipe per child that is caught up ("live") and splices those into the child sockets,
so forwarded bytes are never copied through Python; it reads its own pipe once for the sink (which
hashes every byte) and keeps those chunks as the retention window. A child that lags (its pipe full),
resumes, or whose socket refuses splice is sent copies from the window until it is caught up again.
Elsewhere, or with relay_path "python", relays recv and send the chunks themselves.
"""
from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import hmac
import logging
import os
import socket
import sys
import termios
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

from domain.errors import MalformedPacket
from broadcast.errors import ProtocolError
from broadcast.image import AsyncImageSink, SinkSpec, WriteReport
from broadcast.result import BroadcastResult, NodeResult
from broadcast.topology import Subtree
from broadcast.wire import VERSION, LineSocket, open_connection

log = logging.getLogger("rackboot.broadcast")

SOURCE_NAME = "@source"
SocketFactory = Callable[[tuple[Any, ...]], socket.socket]  # aiohappyeyeballs' signature: addr_info -> socket
ListenFactory = Callable[[str, int], socket.socket]  # (host, port) -> bound, listening socket
RELAY_PATHS = ("auto", "splice", "python")
# errno values by which splice(2) says an fd type cannot do it (the copy path takes over)
SPLICE_UNSUPPORTED = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS})
YIELD_EVERY = 1 << 20  # a relay's reader lets the event loop run at least once per this many bytes


@dataclass(frozen=True)
class ChainParams:
    """Tuning shared by every relay of a session (it travels in the hello)."""

    chunk: int = 256 * 1024  # recv size at relays
    window: int = 32 << 20  # retention window per relay (bytes kept for resuming children)
    ack_interval: float = 0.2  # seconds between acks (also the liveness heartbeat)
    stall_timeout: float = 10.0  # no ack, or no progress while data is pending, for this long: failed
    connect_timeout: float = 5.0
    resume_depth: int = 2  # levels below a child whose offsets its parent tracks (2: survives any single failure locally)
    orphan_after: float = 0.0  # relay without upstream asks the source after this (0: 2 x stall_timeout)
    give_up_after: float = 0.0  # ... and fails after this (0: 6 x stall_timeout)
    source_rate: float = 0.0  # bytes/s cap per source link (0: none); for tests and shaped demos
    sink_queue: int = 8  # chunks queued for the disk writer
    # how relays forward: "auto" (kernel pipes with splice/tee where the platform and the fds allow it,
    # else copies through Python), "splice" (kernel pipes required: a relay without them refuses the
    # session, an fd refusing splice fails its connection) or "python" (always copies)
    relay_path: str = "auto"

    def __post_init__(self) -> None:
        if self.relay_path not in RELAY_PATHS:
            raise ValueError(f"relay_path must be one of {', '.join(RELAY_PATHS)}")

    def to_json(self) -> dict[str, Any]:
        """Return the params as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ChainParams":
        """Rebuild params from a hello; unknown keys are refused."""
        names = {f.name: f.type for f in fields(cls)}
        if set(data) - set(names):
            raise MalformedPacket(f"params: unknown keys {sorted(set(data) - set(names))}")
        for k, v in data.items():
            if names[k] in ("str", str):
                if v not in RELAY_PATHS:
                    raise MalformedPacket(f"params: {k} must be one of {', '.join(RELAY_PATHS)}")
                continue
            kind = (int,) if names[k] in ("int", int) else (int, float)
            if isinstance(v, bool) or not isinstance(v, kind) or v < 0:
                raise MalformedPacket(f"params: {k} must be a non-negative {'integer' if kind == (int,) else 'number'}")
        p = cls(**data)
        if p.chunk < 1 or p.window < p.chunk or p.resume_depth < 1 or p.stall_timeout <= 0:
            raise MalformedPacket("params: out of range")
        return p

    @property
    def orphan_delay(self) -> float:
        """Seconds a relay waits for a new upstream before asking the source."""
        return self.orphan_after or 2 * self.stall_timeout

    @property
    def give_up_delay(self) -> float:
        """Seconds a relay waits for a new upstream before failing."""
        return max(self.give_up_after or 6 * self.stall_timeout, self.orphan_delay + self.stall_timeout)


def _err(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


# ---------------------------------------------------------------------------------------------------
# Kernel pipes: a relay moves the stream socket -> pipe (splice), duplicates it into one pipe per child
# (tee) and pipe -> child socket (splice), so the bytes sent downstream are never copied into Python;
# it still reads its own pipe once, because the sink hashes and decompresses every byte.


class SplicePipe:
    """A non-blocking kernel pipe that splice(2) and tee(2) move page references through."""

    def __init__(self, size: int) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, size)
        except OSError:
            pass  # above fs.pipe-max-size or the user's pipe quota: keep the default (64 KiB)
        self.size = fcntl.fcntl(self.w, fcntl.F_GETPIPE_SZ)

    def read(self, count: int) -> bytes:
        """Read exactly count bytes the caller knows are in the pipe."""
        data = os.read(self.r, count)
        while len(data) < count:
            more = os.read(self.r, count - len(data))
            if not more:
                raise AssertionError(f"pipe held {len(data)} bytes, expected {count}")
            data += more
        return data

    def pending(self) -> int:
        """Bytes in the pipe (FIONREAD)."""
        buf = bytearray(4)
        fcntl.ioctl(self.r, termios.FIONREAD, buf)
        return int.from_bytes(buf, sys.byteorder)

    def close(self) -> None:
        """Close both ends (idempotent)."""
        for fd in (self.r, self.w):
            if fd >= 0:
                os.close(fd)
        self.r = self.w = -1


class KernelSplice:
    """splice(2) through os.splice and tee(2) through libc with ctypes (Python has no os.tee); Linux only.

    One per Receiver (no module state). `available` is False, with `reason`, where either is missing;
    relays then copy through Python. Tests subclass it to play an fd type that refuses splice.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.reason = ""
        self._tee: Any = None
        if not enabled:
            self.reason = "disabled"
        elif not sys.platform.startswith("linux") or not hasattr(os, "splice"):
            self.reason = "splice(2) needs Linux (and Python >= 3.10)"
        else:
            try:
                # PyDLL: the call keeps the GIL (a non-blocking tee only links pages: releasing the GIL for it
                # would invite a hand-off to the sink threads and back)
                fn = ctypes.PyDLL(None, use_errno=True).tee
            except (OSError, AttributeError):
                self.reason = "the C library has no tee(2)"
            else:
                fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint]
                fn.restype = ctypes.c_ssize_t
                self._tee = fn

    @property
    def available(self) -> bool:
        """True when both splice and tee can be called."""
        return self._tee is not None

    def splice(self, src: int, dst: int, count: int) -> int:
        """Move up to count bytes between a pipe and a socket; BlockingIOError when it would block, 0 at end of stream."""
        return os.splice(src, dst, count, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)

    def tee(self, src: int, dst: int, count: int) -> int:
        """Duplicate up to count bytes of pipe src into pipe dst without consuming them; 0 when dst is full."""
        n = int(self._tee(src, dst, count, os.SPLICE_F_NONBLOCK))
        if n < 0:
            err = ctypes.get_errno()
            if err == errno.EAGAIN:
                return 0
            raise OSError(err, os.strerror(err))
        return n


async def _fd_ready(fd: int, write: bool) -> None:
    """Wait until the event loop's selector says fd is readable (or writable)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

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
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


# ---------------------------------------------------------------------------------------------------
# Parent side: one ChildLink per child being fed.


class ChildLink:
    """The parent's end of one data connection: handshake, send loop, acks, stall watchdog."""

    def __init__(self, feeder: "Feeder", subtree: Subtree, lower: list[int]) -> None:
        self.feeder = feeder
        self.subtree = subtree
        self.name = subtree.name
        levels = min(feeder.params.resume_depth, subtree.depth() + 1)
        self.vec = (list(lower) + [lower[-1] if lower else 0] * levels)[:levels]  # lower bounds until acks arrive
        self.cursor = 0  # what was sent so far; advanced by the feeder (a relay's reader may push it too)
        self.blocked = False
        self.state = "connecting"
        self.conn: LineSocket | None = None
        # relay kernel path: the pipe holds the stream's bytes [cursor, pipe_end) (empty when pipe_end <= cursor)
        self.pipe: SplicePipe | None = None
        self.pipe_end = 0
        self.copy_only = False  # its socket refused splice, or no pipe could be made: copies only
        self.last_ack = time.monotonic()
        self.last_progress = time.monotonic()
        self._tasks: list[asyncio.Task[None]] = []
        self._main: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        """True while the link still holds data back for its child."""
        return self.state in ("connecting", "streaming", "draining")

    def needed(self) -> int:
        """The lowest offset this child (or the nodes it reports for) may still ask for."""
        return min(self.vec) if self.vec else 0

    def start(self) -> None:
        """Run the link in the background."""
        self._main = asyncio.create_task(self._run(), name=f"link:{self.feeder.name}->{self.name}")

    async def _run(self) -> None:
        f = self.feeder
        p = f.params
        target = self.subtree.root
        try:
            self.conn = await open_connection(target.host, target.port, p.connect_timeout, socket_factory=f.socket_factory)
        except (OSError, asyncio.TimeoutError) as exc:
            self._finish("failed", f"unreachable: {_err(exc)}")
            return
        try:
            await self.conn.send("hello", v=VERSION, session=f.session, token=f.token, **{"from": f.name},
                                 ancestors=f.ancestors + [f.name], tree=self.subtree.to_json(), size=f.size,
                                 sha256=f.sha256, report=list(f.report_addr), params=p.to_json())
            msg = await asyncio.wait_for(self.conn.recv(), p.connect_timeout + p.stall_timeout)
        except (OSError, asyncio.TimeoutError, MalformedPacket) as exc:
            self._finish("failed", f"handshake failed: {_err(exc)}")
            return
        if msg is None:
            self._finish("failed", "handshake failed: connection closed")
            return
        if msg["type"] == "error":
            self._finish("failed", f"refused: {msg['reason']}")
            return
        if msg["type"] != "ready" or not 0 <= msg["offset"] <= f.size:
            self._finish("failed", f"handshake failed: unexpected {msg['type']}")
            return
        self.cursor = msg["offset"]
        if self.cursor < f.available_from():
            # its resume point already left our window: the source, which has the whole image, takes it
            f.hand_to_source(self, self.cursor)
            self._finish("handed", "")
            return
        self.vec[0] = self.cursor
        self.last_ack = self.last_progress = time.monotonic()
        self.state = "streaming"
        f.window_changed()
        self._tasks = [asyncio.create_task(self._acks(), name=f"acks:{self.name}"),
                       asyncio.create_task(self._watchdog(), name=f"watch:{self.name}")]
        try:
            while self.cursor < f.size:
                await f.send_more(self)
            self.close_pipe()
            self.state = "draining"
            await f.wait_until(lambda: not self.active or all(v >= f.size for v in self.vec))
        except (OSError, ConnectionError) as exc:
            self._finish("failed", f"connection lost at offset {self.vec[0]}: {_err(exc)}")
            return
        if self.active:
            self._finish("done", "")

    async def _acks(self) -> None:
        assert self.conn is not None
        f = self.feeder
        try:
            while True:
                msg = await self.conn.recv()
                if msg is None:
                    raise ConnectionError("connection closed")
                if msg["type"] == "ack":
                    offs = msg["offsets"]
                    if not offs or not all(isinstance(o, int) and not isinstance(o, bool) and 0 <= o <= f.size for o in offs):
                        raise MalformedPacket("ack: bad offsets")
                    now = time.monotonic()
                    self.last_ack = now
                    if offs[0] > self.vec[0]:
                        self.last_progress = now
                    self.blocked = bool(msg["blocked"])
                    self.vec = list(offs[: f.params.resume_depth])
                    f.window_changed()
                elif msg["type"] == "superseded":
                    self._finish("superseded", msg["by"])
                    return
                else:
                    raise MalformedPacket(f"unexpected {msg['type']} from child")
        except (OSError, ConnectionError, MalformedPacket) as exc:
            if self.active and not (self.state == "draining" and all(v >= f.size for v in self.vec)):
                self._finish("failed", f"connection lost at offset {self.vec[0]}: {_err(exc)}")

    async def _watchdog(self) -> None:
        p = self.feeder.params
        tick = min(1.0, p.stall_timeout / 4)
        while self.active:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if self.blocked or self.vec[0] >= self.cursor:
                # nothing pending, or it waits on its own children (which it watches): the stall clock restarts
                self.last_progress = now
            if now - self.last_ack > p.stall_timeout:
                self._finish("failed", f"stalled: no acknowledgement for {p.stall_timeout:g} s (at offset {self.vec[0]})")
            elif self.vec[0] < self.cursor and not self.blocked and now - self.last_progress > p.stall_timeout:
                self._finish("failed", f"stalled: no progress for {p.stall_timeout:g} s at offset {self.vec[0]}")

    def close_pipe(self) -> None:
        """Release the kernel pipe (what it still held is retained by the relay and can be sent again)."""
        if self.pipe is not None:
            self.pipe.close()
            self.pipe = None
        self.pipe_end = 0

    def _finish(self, state: str, reason: str) -> None:
        """Move to a final state once; tear the connection down; tell the feeder."""
        if not self.active:
            return
        self.state = state
        current = asyncio.current_task()
        for t in self._tasks + ([self._main] if self._main else []):
            if t is not current and not t.done():
                t.cancel()
        if self.conn is not None:
            self.conn.close(reset=state == "failed")
        self.close_pipe()
        self.feeder.link_finished(self, reason)

    def cancel(self) -> None:
        """Stop the link without reporting anything (session over)."""
        if self.active:
            self.state = "cancelled"
        for t in self._tasks + ([self._main] if self._main else []):
            if not t.done():
                t.cancel()
        if self.conn is not None:
            self.conn.close()
        self.close_pipe()


class Feeder:
    """What the source and the relays share: child links, adoption on failure, the retention window."""

    def __init__(self, name: str, session: str, token: str, size: int, sha256: str | None, params: ChainParams,
                 report_addr: tuple[str, int], ancestors: list[str], socket_factory: SocketFactory | None) -> None:
        self.name = name
        self.session = session
        self.token = token
        self.size = size
        self.sha256 = sha256
        self.params = params
        self.report_addr = report_addr
        self.ancestors = ancestors
        self.socket_factory = socket_factory
        self.links: list[ChildLink] = []
        self._changed = asyncio.Event()

    # -- hooks the subclasses implement
    def available_from(self) -> int:
        """The lowest offset this feeder can still send."""
        raise NotImplementedError

    async def send_more(self, link: ChildLink) -> None:
        """Send some bytes at link.cursor (waiting for them if needed) and advance link.cursor."""
        raise NotImplementedError

    def report(self, kind: str, **fields: Any) -> None:
        """Send a report to the source."""
        raise NotImplementedError

    def hand_to_source(self, link: ChildLink, offset: int) -> None:
        """Ask the source to feed a child we cannot resume."""
        self.report("orphan", node=link.name, offset=offset)

    # -- shared logic
    def add_link(self, subtree: Subtree, lower: list[int]) -> ChildLink:
        """Start feeding a subtree."""
        link = ChildLink(self, subtree, lower)
        self.links.append(link)
        link.start()
        self.window_changed()
        return link

    def window_changed(self) -> None:
        """Wake everything waiting on acks, data or link state."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_until(self, cond: Callable[[], bool]) -> None:
        """Wait until cond() holds (re-checked whenever something changes)."""
        while not cond():
            await self._changed.wait()

    def link_finished(self, link: ChildLink, reason: str) -> None:
        """A link ended: on failure report the child and adopt its children."""
        if link.state == "failed":
            log.info("%s: %s failed: %s", self.name, link.name, reason)
            self.report("failed", node=link.name, reason=reason, by=self.name)
            below = link.vec[1:] or [min(link.vec)]
            for child in link.subtree.children():
                self.add_link(child, below)
        self.links = [lk for lk in self.links if lk.active]
        self.window_changed()

    def vector(self, own: int) -> list[int]:
        """Offsets by depth below and including this node, up to resume_depth levels (sent upstream)."""
        vec = [own]
        for level in range(1, self.params.resume_depth):
            vals = [lk.vec[level - 1] for lk in self.links if lk.active and len(lk.vec) >= level]
            if not vals:
                break
            vec.append(min(vals))
        return vec

    def low_water(self, own: int) -> int:
        """The lowest offset any active child may still need."""
        return min([own] + [lk.needed() for lk in self.links if lk.active])

    def links_active(self) -> bool:
        """True while some child is still being fed."""
        return any(lk.active for lk in self.links)


# ---------------------------------------------------------------------------------------------------
# Node side.


class ReportClient:
    """A relay's JSON-lines channel to the source: queued, reconnecting a few times, never blocking the stream."""

    def __init__(self, relay: "Relay") -> None:
        self.relay = relay
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._pending: list[tuple[str, dict[str, Any]]] = []
        self.closed = False

    def send(self, kind: str, **fields: Any) -> None:
        """Queue one report."""
        from broadcast.wire import encode

        self._queue.put_nowait(encode(kind, **fields))
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"report:{self.relay.name}")

    async def _run(self) -> None:
        r = self.relay
        conn: LineSocket | None = None
        failures = 0
        backlog: list[bytes] = []
        loop = asyncio.get_running_loop()
        while failures < 5:
            if not backlog:
                backlog.append(await self._queue.get())
            while not self._queue.empty():
                backlog.append(self._queue.get_nowait())
            try:
                if conn is None:
                    conn = await open_connection(r.report_addr[0], r.report_addr[1], r.params.connect_timeout,
                                                 socket_factory=r.socket_factory)
                    await conn.send("report_hello", v=VERSION, session=r.session, token=r.token, node=r.name)
                await loop.sock_sendall(conn.sock, b"".join(backlog))
                backlog.clear()
                failures = 0
            except (OSError, asyncio.TimeoutError) as exc:
                failures += 1
                log.debug("%s: report channel: %s", r.name, _err(exc))
                if conn is not None:
                    conn.close()
                    conn = None
                await asyncio.sleep(min(2.0, 0.1 * 2**failures))
        if conn is not None:
            conn.close()

    async def flush(self, timeout: float) -> None:
        """Wait (bounded) until queued reports are written."""
        end = time.monotonic() + timeout
        while not self._queue.empty() and time.monotonic() < end:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)

    def close(self) -> None:
        """Stop the channel."""
        self.closed = True
        if self._task is not None:
            self._task.cancel()


class Relay(Feeder):
    """One node's part of one broadcast session: receive, write, forward, acknowledge, report."""

    def __init__(self, receiver: "Receiver", armed: "ArmedSession", hello: dict[str, Any]) -> None:
        params = ChainParams.from_json(hello["params"])
        tree = Subtree.from_json(hello["tree"])
        if tree.name != receiver.name:
            raise ProtocolError(f"hello for {tree.name!r} reached {receiver.name!r}")
        report = hello["report"]
        if len(report) != 2 or not isinstance(report[0], str) or not isinstance(report[1], int):
            raise MalformedPacket("hello: report must be [host, port]")
        super().__init__(receiver.name, armed.session, armed.token, hello["size"], hello["sha256"], params,
                         (report[0], report[1]), [str(a) for a in hello["ancestors"]], receiver.socket_factory)
        self.receiver = receiver
        self.armed = armed
        self.tree = tree
        kernel = receiver.kernel
        if params.relay_path == "splice" and not kernel.available:
            raise ProtocolError(f"relay_path splice: not available on {receiver.name}: {kernel.reason}")
        self.kernel = kernel if params.relay_path != "python" and kernel.available else None
        self._strict = params.relay_path == "splice"
        self._pipe: SplicePipe | None = None  # upstream -> here; children's pipes are tee'd from it, the sink reads it
        self._splice_upstream = self.kernel is not None  # False once the upstream socket refused splice
        self._waiting_for_children = False
        self._yielded_at = 0
        # bytes: in through splice / recv; out to children through pipes / Python sends; fds that refused splice
        self.counters = {"spliced_in": 0, "received_in": 0, "spliced_out": 0, "copied_out": 0, "splice_refused": 0}
        spec = armed.sink
        self.sink = AsyncImageSink(SinkSpec(**{**spec.to_json(),
                                               "expected_sha256": spec.expected_sha256 or hello["sha256"],
                                               "expected_size": spec.expected_size if spec.expected_size is not None else hello["size"]}),
                                   max_queued=params.sink_queue)
        self.received = 0
        self.sink_offset = 0  # bytes handed to the disk writer (they stay retained until then)
        self.blocked = False
        self._chunks: list[tuple[int, bytes]] = []
        self._head = 0
        self.upstream: LineSocket | None = None
        self.upstream_from = ""
        self._reader: asyncio.Task[None] | None = None
        self._acker: asyncio.Task[None] | None = None
        self._orphan_timer: asyncio.Task[None] | None = None
        self._finisher: asyncio.Task[None] | None = None
        self._feeder: asyncio.Task[None] | None = None
        self.reports = ReportClient(self)
        self.t0 = time.monotonic()
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.result: NodeResult | None = None
        self.done = asyncio.Event()
        self.failed_reason: str | None = None

    async def begin(self) -> None:
        """Open the sink and start feeding the children named in the first hello."""
        await self.sink.start()
        for child in self.tree.children():
            self.add_link(child, [0])
        self._acker = asyncio.create_task(self._ack_loop(), name=f"ack:{self.name}")
        self._feeder = asyncio.create_task(self._feed_sink(), name=f"sink:{self.name}")
        self._finisher = asyncio.create_task(self._finish_when_done(), name=f"finish:{self.name}")

    # -- Feeder hooks
    def available_from(self) -> int:
        return self._chunks[self._head][0] if self._head < len(self._chunks) else self.received

    async def send_more(self, link: ChildLink) -> None:
        await self.wait_until(lambda: self.received > link.cursor or link.cursor >= self.size or self.failed_reason is not None)
        if self.failed_reason is not None:
            raise ConnectionError(f"relay failed: {self.failed_reason}")
        if link.cursor >= self.size:
            return  # the reader forwarded the end through the link's pipe
        if link.pipe is not None and link.pipe_end > link.cursor:
            await self._splice_to(link)
            return
        # not in its pipe (resuming, lagging behind the live stream, or copies only): from the retained chunks
        conn = link.conn
        assert conn is not None
        offset = link.cursor
        start, data = self._chunk_at(offset)
        view = memoryview(data)[offset - start :]
        await asyncio.get_running_loop().sock_sendall(conn.sock, view)
        # meanwhile the link was not live (cursor < received), so nothing else moved its cursor
        link.cursor = offset + len(view)
        self.counters["copied_out"] += len(view)
        self._sent()

    def _splice_out(self, link: ChildLink) -> int:
        """Move what the link's pipe holds to its socket without waiting; return the bytes moved (0: socket full).

        Raises OSError for a broken connection. A socket that refuses splice turns the link to copies
        (what its pipe held is still retained) and closes the pipe.
        """
        assert self.kernel is not None
        pipe, conn = link.pipe, link.conn
        if pipe is None or conn is None or link.pipe_end <= link.cursor:
            return 0
        try:
            n = self.kernel.splice(pipe.r, conn.sock.fileno(), link.pipe_end - link.cursor)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            if exc.errno not in SPLICE_UNSUPPORTED or self._strict:
                raise
            log.info("%s: socket to %s refuses splice (%s): copying", self.name, link.name, _err(exc))
            self.counters["splice_refused"] += 1
            link.close_pipe()
            link.copy_only = True
            return 0
        if n <= 0:
            raise AssertionError(f"{self.name}->{link.name}: splice from a non-empty pipe returned {n}")
        link.cursor += n
        self.counters["spliced_out"] += n
        return n

    async def _splice_to(self, link: ChildLink) -> None:
        """Drain the link's pipe into its socket, waiting while the socket is full (the reader may add to the
        pipe and send some of it meanwhile); returns once the pipe is empty or gone."""
        assert link.conn is not None
        fd = link.conn.sock.fileno()
        while link.pipe is not None and link.pipe_end > link.cursor:
            moved = self._splice_out(link)
            if moved:
                self._sent()
            if link.pipe is not None and link.pipe_end > link.cursor:
                if not moved and not link.pipe.pending():
                    raise AssertionError(f"{self.name}->{link.name}: pipe empty at {link.cursor}, expected up to {link.pipe_end}")
                await _fd_ready(fd, write=True)

    def _children_behind(self) -> bool:
        """Kernel path: True while a child that takes pipes is not live with room for a chunk in its pipe.

        The reader then waits instead of reading ahead: a child that lags (resumed, adopted, or its
        pipe overflowed) catches up by copies from the window and becomes live again, and a live child's
        pipe is its backpressure (a full window would leave it copying for good whenever it is the slower).
        """
        for lk in self.links:
            if lk.state != "streaming" or lk.copy_only:
                continue
            end = max(lk.pipe_end, lk.cursor)
            if end < self.received:
                return True
            if lk.pipe is not None and lk.pipe.size - (lk.pipe_end - lk.cursor) < min(self.params.chunk, lk.pipe.size):
                return True
        return False

    def _sent(self) -> None:
        """A child sender moved its cursor: wake the reader if it waits for the children."""
        if self._waiting_for_children and not self._children_behind():
            self.window_changed()

    def _live_links(self) -> list[ChildLink]:
        """Children whose pipe ends where the stream ends: the next bytes from upstream can be tee'd to them."""
        live = []
        for lk in self.links:
            if lk.state != "streaming" or lk.copy_only or max(lk.pipe_end, lk.cursor) != self.received:
                continue
            if lk.pipe is None:
                try:
                    lk.pipe = SplicePipe(min(4 * self.params.chunk, 1 << 20))
                except OSError as exc:  # out of fds or pipe quota
                    log.info("%s: no pipe for %s (%s): copying", self.name, lk.name, _err(exc))
                    lk.copy_only = True
                    continue
            live.append(lk)
        return live

    async def _take(self, conn: LineSocket, want: int) -> bytes:
        """The next bytes from upstream: through our pipe (tee'd to the children that are caught up) or by recv."""
        fd = conn.sock.fileno()
        if self.received - self._yielded_at >= YIELD_EVERY:
            # recv/splice do not suspend while data is there: without this a fast upstream kept the loop to
            # this reader until the window filled (child handshakes, acks and other relays waited)
            self._yielded_at = self.received
            await asyncio.sleep(0)
        while True:
            live = self._live_links() if self._splice_upstream else []
            try:
                if live:
                    data = self._splice_in(fd, want, live)
                    if data is None:
                        continue  # the socket refused splice: recv from now on
                else:
                    data = conn.sock.recv(want)
                    self.counters["received_in"] += len(data)
                break
            except (BlockingIOError, InterruptedError):
                await _fd_ready(fd, write=False)
        if not data:
            raise ConnectionError("closed by upstream")
        return data

    def _splice_in(self, fd: int, want: int, live: list[ChildLink]) -> bytes | None:
        """Splice up to want bytes from the upstream socket into our pipe, tee them to live, read them for the sink.

        Raises BlockingIOError when nothing is there yet; returns b"" at end of stream, None when the socket
        refuses splice (then recv takes over). Synchronous, so the links' cursors and pipes hold still.
        """
        assert self.kernel is not None
        if self._pipe is None:
            self._pipe = SplicePipe(min(self.params.chunk, 1 << 20))
        pipe = self._pipe
        room = min(lk.pipe.size - (lk.pipe_end - lk.cursor) for lk in live if lk.pipe is not None)
        try:
            n = self.kernel.splice(fd, pipe.w, max(1, min(want, pipe.size, room)))
        except (BlockingIOError, InterruptedError):
            raise
        except OSError as exc:
            if exc.errno not in SPLICE_UNSUPPORTED or self._strict:
                raise
            log.info("%s: upstream socket refuses splice (%s): copying", self.name, _err(exc))
            self.counters["splice_refused"] += 1
            self._splice_upstream = False
            return None
        if n == 0:
            return b""
        for lk in live:  # _children_behind() kept a chunk of room in each: the tee is whole unless pipe slots ran out
            assert lk.pipe is not None
            try:
                teed = self.kernel.tee(pipe.r, lk.pipe.w, n)
            except OSError as exc:
                log.info("%s: tee to %s failed (%s): copying", self.name, lk.name, _err(exc))
                lk.close_pipe()
                lk.copy_only = True
                continue
            if teed:  # a partial tee (its pipe is full: the child lags) leaves the rest to the copy path
                lk.pipe_end = self.received + teed
        self.counters["spliced_in"] += n
        data = pipe.read(n)
        for lk in live:
            try:
                self._splice_out(lk)  # mostly it all goes now; the link's own task sends what is left
            except OSError:
                pass  # a broken connection: the link's task meets the error and fails the link
        return data

    def close_pipes(self) -> None:
        """Release every kernel pipe of this session."""
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None
        for lk in self.links:
            lk.close_pipe()

    def _chunk_at(self, offset: int) -> tuple[int, bytes]:
        """The retained chunk holding offset (binary search; offset must be retained)."""
        lo, hi = self._head, len(self._chunks) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._chunks[mid][0] <= offset:
                lo = mid
            else:
                hi = mid - 1
        return self._chunks[lo]

    def report(self, kind: str, **fields: Any) -> None:
        self.reports.send(kind, **fields)

    def window_changed(self) -> None:
        super().window_changed()
        self._trim()

    def _trim(self) -> None:
        if not hasattr(self, "_chunks"):
            return
        low = self.low_water(self.sink_offset)
        chunks = self._chunks
        while self._head < len(chunks) and chunks[self._head][0] + len(chunks[self._head][1]) <= low:
            self._head += 1
        if self._head > 256:
            del chunks[: self._head]
            self._head = 0

    def retained(self) -> int:
        """Bytes held for children."""
        return self.received - self.available_from()

    # -- upstream side
    async def attach(self, conn: LineSocket, hello: dict[str, Any]) -> None:
        """Take a (new) upstream connection: answer ready with our offset and read the stream from it."""
        sender = hello["from"]
        if self.upstream is not None or self.upstream_from:
            if sender != self.upstream_from and sender not in self.ancestors:
                await conn.send("error", reason=f"{sender} is not an ancestor of {self.name}")
                conn.close()
                return
        old, old_reader = self.upstream, self._reader
        if old_reader is not None and not old_reader.done():
            old_reader.cancel()
        if old is not None:
            try:
                await asyncio.wait_for(old.send("superseded", by=sender), 1.0)
            except (OSError, asyncio.TimeoutError):
                pass
            old.close()
        if self._orphan_timer is not None:
            self._orphan_timer.cancel()
            self._orphan_timer = None
        self.upstream, self.upstream_from = conn, sender
        await conn.send("ready", offset=self.received)
        await self._send_ack()
        self._reader = asyncio.create_task(self._read(conn, conn.take_buffered()), name=f"read:{self.name}")

    async def _read(self, conn: LineSocket, first: bytes) -> None:
        p = self.params
        data = first
        try:
            while self.received < self.size:
                if not data:
                    if self.received - self.available_from() >= p.window:
                        # blocked (downstream's fault) only when children, not our own disk, hold the window
                        self.blocked = self.low_water(self.received) < self.sink_offset
                        await self.wait_until(lambda: self.received - self.available_from() < p.window)
                        self.blocked = False
                    if self._splice_upstream and self._children_behind():
                        self.blocked = self._waiting_for_children = True
                        await self.wait_until(lambda: not self._children_behind())
                        self.blocked = self._waiting_for_children = False
                    data = await self._take(conn, min(p.chunk, self.size - self.received))
                if len(data) > self.size - self.received:
                    raise ProtocolError("upstream sent more than the image size")
                now = time.monotonic()
                self.t_first = self.t_first or now
                self._chunks.append((self.received, data))
                self.received += len(data)
                self.t_last = now
                self.window_changed()  # wakes the child senders and the disk feeder
                data = b""
        except (OSError, ConnectionError, ProtocolError) as exc:
            if self.upstream is conn:
                self.upstream = None
                conn.close()
                log.info("%s: upstream %s lost at %d: %s", self.name, self.upstream_from, self.received, _err(exc))
                self._orphan_timer = asyncio.create_task(self._orphaned(), name=f"orphan:{self.name}")
            return
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None
        await self._send_ack()

    async def _feed_sink(self) -> None:
        """Hand retained chunks to the disk writer in order (its bounded queue is the backpressure)."""
        while self.sink_offset < self.size:
            await self.wait_until(lambda: self.received > self.sink_offset)
            start, data = self._chunk_at(self.sink_offset)
            if start != self.sink_offset:  # chunks are appended as received and fed whole
                raise AssertionError(f"sink at {self.sink_offset}, chunk at {start}")
            await self.sink.put(data)
            self.sink_offset += len(data)
            self.window_changed()

    async def _orphaned(self) -> None:
        p = self.params
        await asyncio.sleep(p.orphan_delay)
        if self.upstream is None:
            self.report("orphan", node=self.name, offset=self.received)
        await asyncio.sleep(p.give_up_delay - p.orphan_delay)
        if self.upstream is None and self.received < self.size:
            await self.fail(f"upstream lost at offset {self.received} and nobody resumed it")

    async def _send_ack(self) -> None:
        conn = self.upstream
        if conn is None:
            return
        try:
            await conn.send("ack", offsets=self.vector(self.received), blocked=self.blocked)
        except OSError:
            pass  # the reader sees the loss too

    async def _ack_loop(self) -> None:
        while True:
            await self._send_ack()
            await asyncio.sleep(self.params.ack_interval)

    async def _finish_when_done(self) -> None:
        await self.wait_until(lambda: self.sink_offset >= self.size or self.failed_reason is not None)
        if self.failed_reason is None:
            report = await self.sink.close()
            self._set_result(report)
        await self.wait_until(lambda: not self.links_active())
        await self._send_ack()
        await self.reports.flush(self.params.connect_timeout)
        self.done.set()
        # keep acking until our parent closes the connection (it does once our vector is complete)
        await asyncio.sleep(self.params.stall_timeout)
        self.stop()

    def _set_result(self, report: WriteReport) -> None:
        now = time.monotonic()
        t_first = self.t_first or now
        t_last = self.t_last or now
        durations = {"wait": round(t_first - self.t0, 6), "transfer": round(t_last - t_first, 6),
                     "write_tail": round(now - t_last, 6), "total": round(now - self.t0, 6)}
        self.result = NodeResult(name=self.name, ok=report.ok, reason=report.reason, bytes_received=report.bytes_received,
                                 bytes_written=report.bytes_written, sha256=report.sha256,
                                 written_sha256=report.written_sha256, durations=durations, reported_by=self.name)
        self.report("result", node=self.name, ok=report.ok, reason=report.reason, bytes_received=report.bytes_received,
                    bytes_written=report.bytes_written, sha256=report.sha256, written_sha256=report.written_sha256,
                    durations=durations)
        self.receiver.session_result(self.session, self.result)

    async def fail(self, reason: str) -> None:
        """Give up: abort the sink, report ourselves failed, let children be rescued by others."""
        if self.failed_reason is not None or self.result is not None:
            return
        self.failed_reason = reason
        if self._feeder is not None:
            self._feeder.cancel()
        report = await self.sink.abort(reason)
        self._set_result(report)
        self.window_changed()
        for lk in self.links:
            lk.cancel()
        self.done.set()

    def stop(self) -> None:
        """Cancel every task and close every socket of this session."""
        for t in (self._reader, self._acker, self._orphan_timer, self._feeder):
            if t is not None and not t.done():
                t.cancel()
        if self._finisher is not None and self._finisher is not asyncio.current_task() and not self._finisher.done():
            self._finisher.cancel()
        for lk in self.links:
            lk.cancel()
        if self.upstream is not None:
            self.upstream.close()
        self.reports.close()
        self.close_pipes()
        self._chunks = []
        self._head = 0

    def crash(self) -> None:
        """Test hook: die like a powered-off node (sockets reset, nothing reported)."""
        for t in (self._reader, self._acker, self._orphan_timer, self._finisher, self._feeder):
            if t is not None and not t.done():
                t.cancel()
        for lk in self.links:
            if lk.conn is not None:
                lk.conn.close(reset=True)
            lk.cancel()
        if self.upstream is not None:
            self.upstream.close(reset=True)
        self.reports.close()
        self.close_pipes()

    def freeze(self) -> None:
        """Test hook: hang like a wedged node (tasks stop, sockets stay open)."""
        for t in (self._reader, self._acker, self._orphan_timer, self._finisher, self._feeder):
            if t is not None and not t.done():
                t.cancel()
        for lk in self.links:
            for t in lk._tasks + ([lk._main] if lk._main else []):
                t.cancel()
        self.reports.close()


@dataclass(frozen=True)
class ArmedSession:
    """What the controller told a node (over SSH) to expect: the session, its secret, where to write."""

    session: str
    token: str
    sink: SinkSpec


class Receiver:
    """A node's data endpoint: accepts broadcast connections for armed sessions (chain, tree, star).

    One per deploy agent; many in one process in the vm-testbed (no globals). `listen_factory` and
    `socket_factory` let the testbed open the sockets inside the node's network namespace; `kernel`
    is how relays reach splice/tee (probed here by default).
    """

    def __init__(self, name: str, host: str, port: int = 0, *, listen_factory: ListenFactory | None = None,
                 socket_factory: SocketFactory | None = None, kernel: KernelSplice | None = None) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.listen_factory = listen_factory
        self.socket_factory = socket_factory
        self.kernel = kernel if kernel is not None else KernelSplice()
        self._armed: dict[str, ArmedSession] = {}
        self.relays: dict[str, Relay] = {}
        self._results: dict[str, asyncio.Future[NodeResult]] = {}
        self._sock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.counters = {"connections": 0, "refused": 0, "dropped_malformed": 0}
        self._star_tasks: dict[str, asyncio.Task[None]] = {}
        self._star_progress: dict[str, int] = {}

    async def start(self) -> None:
        """Bind and listen (raise domain.errors.BindError when the address is unusable)."""
        from domain.errors import BindError

        try:
            if self.listen_factory is not None:
                sock = self.listen_factory(self.host, self.port)
            else:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.host, self.port))
                sock.listen(512)
        except OSError as exc:
            raise BindError(f"broadcast receiver {self.name}: cannot listen on {self.host}:{self.port}: {exc.strerror}") from exc
        sock.setblocking(False)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._accept_task = asyncio.create_task(self._accept(), name=f"receiver:{self.name}")

    def arm(self, session: str, token: str, sink: SinkSpec) -> None:
        """Expect a session: only connections carrying its token are accepted; the stream goes to sink."""
        self._armed[session] = ArmedSession(session, token, sink)
        self._results.setdefault(session, asyncio.get_running_loop().create_future())

    async def wait_result(self, session: str, timeout: float | None = None) -> NodeResult:
        """Wait for this node's own result for an armed session."""
        fut = self._results.get(session)
        if fut is None:
            raise ProtocolError(f"session {session} is not armed on {self.name}")
        return await asyncio.wait_for(asyncio.shield(fut), timeout)

    def session_result(self, session: str, result: NodeResult) -> None:
        """Record this node's result (called by the relay or the star client)."""
        fut = self._results.get(session)
        if fut is not None and not fut.done():
            fut.set_result(result)

    def progress(self, session: str) -> int:
        """Bytes of the session's stream received so far."""
        relay = self.relays.get(session)
        if relay is not None:
            return relay.received
        return self._star_progress.get(session, 0)

    async def _accept(self) -> None:
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(self._sock)
            except OSError as exc:
                log.warning("%s: accept failed: %s", self.name, _err(exc))
                await asyncio.sleep(0.1)
                continue
            self.counters["connections"] += 1
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.create_task(self._handle(LineSocket(sock)), name=f"conn:{self.name}")
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _handle(self, conn: LineSocket) -> None:
        try:
            msg = await asyncio.wait_for(conn.recv(), 30.0)
        except MalformedPacket:
            self.counters["dropped_malformed"] += 1
            conn.close()
            return
        except (OSError, asyncio.TimeoutError):
            conn.close()
            return
        if msg is None:
            conn.close()
            return
        armed = self._armed.get(msg.get("session", ""))
        if msg["type"] not in ("hello", "fetch") or armed is None or not hmac.compare_digest(armed.token, msg.get("token", "")):
            self.counters["refused"] += 1
            try:
                await conn.send("error", reason="unknown session or bad token")
            except OSError:
                pass
            conn.close()
            return
        try:
            if msg["type"] == "hello":
                relay = self.relays.get(armed.session)
                if relay is None:
                    relay = Relay(self, armed, msg)
                    self.relays[armed.session] = relay
                    await relay.begin()
                await relay.attach(conn, msg)
            else:
                from broadcast.star import serve_fetch

                await serve_fetch(self, armed, conn, msg)
        except (MalformedPacket, ProtocolError) as exc:
            self.counters["dropped_malformed"] += 1
            try:
                await conn.send("error", reason=str(exc))
            except OSError:
                pass
            conn.close()
        except OSError:
            conn.close()

    def kill(self) -> None:
        """Test hook: the node dies (listening socket and every connection reset, nothing reported)."""
        if self._accept_task is not None:
            self._accept_task.cancel()
        if self._sock is not None:
            self._sock.close()
        for t in list(self._handlers) + list(self._star_tasks.values()):
            t.cancel()
        for relay in self.relays.values():
            relay.crash()

    def freeze(self) -> None:
        """Test hook: the node hangs (nothing is read or sent any more; sockets stay open)."""
        for t in list(self._handlers) + list(self._star_tasks.values()):
            t.cancel()
        for relay in self.relays.values():
            relay.freeze()

    async def close(self) -> None:
        """Stop listening and end every session."""
        if self._accept_task is not None:
            self._accept_task.cancel()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for t in list(self._handlers) + list(self._star_tasks.values()):
            t.cancel()
        for relay in self.relays.values():
            relay.stop()
            if relay.sink.report is None:
                await relay.sink.abort("receiver closed")
        await asyncio.sleep(0)

    def stats(self) -> dict[str, int]:
        """Counters: connections, refused, dropped_malformed, sessions, and the relays' bytes by path."""
        out = {**self.counters, "sessions": len(self.relays)}
        for relay in self.relays.values():
            for k, v in relay.counters.items():
                out[k] = out.get(k, 0) + v
        return out


# ---------------------------------------------------------------------------------------------------
# Appliance side.


class Source(Feeder):
    """Feeds the forest from the image file with sendfile, gathers reports, rescues orphans."""

    def __init__(self, image: str | Path, forest: list[Subtree], *, session: str, token: str, sha256: str | None,
                 params: ChainParams = ChainParams(), report_host: str = "127.0.0.1", method: str = "chain",
                 socket_factory: SocketFactory | None = None, listen_factory: ListenFactory | None = None) -> None:
        self.image = Path(image)
        size = self.image.stat().st_size
        super().__init__(SOURCE_NAME, session, token, size, sha256, params, (report_host, 0), [], socket_factory)
        self.forest = forest
        self.method = method
        self.listen_factory = listen_factory
        self.subtrees: dict[str, Subtree] = {}
        for tree in forest:
            for i, e in enumerate(tree.entries):
                self.subtrees[e[0]] = Subtree(tree.entries[i : i + e[3]])
        self.results: dict[str, NodeResult] = {}
        self._report_server: asyncio.base_events.Server | None = None
        self._files: dict[int, Any] = {}
        self._report_writers: set[asyncio.StreamWriter] = set()
        self.counters = {"reports": 0, "dropped_malformed": 0, "orphans": 0}

    def available_from(self) -> int:
        return 0

    async def send_more(self, link: ChildLink) -> None:
        loop = asyncio.get_running_loop()
        conn = link.conn
        assert conn is not None
        offset = link.cursor
        f = self._files.get(id(conn))
        if f is None:
            f = self._files[id(conn)] = open(self.image, "rb")
        rate = self.params.source_rate
        count = min(self.size - offset, 4 << 20 if not rate else max(self.params.chunk, int(rate / 10)))
        started = time.monotonic()
        sent = await loop.sock_sendfile(conn.sock, f, offset, count, fallback=True)
        link.cursor = offset + sent
        if rate:
            spare = sent / rate - (time.monotonic() - started)
            if spare > 0:
                await asyncio.sleep(spare)

    def report(self, kind: str, **fields: Any) -> None:
        self._on_report({"type": kind, **fields})

    def hand_to_source(self, link: ChildLink, offset: int) -> None:  # pragma: no cover - the source never hands off
        raise AssertionError("the source has the whole image")

    def _on_report(self, msg: dict[str, Any]) -> None:
        self.counters["reports"] += 1
        name = msg.get("node", "")
        if name not in self.subtrees:
            self.counters["dropped_malformed"] += 1
            return
        if msg["type"] == "result":
            notes = self.results[name].notes if name in self.results else []
            self.results[name] = NodeResult(name=name, ok=msg["ok"], reason=msg["reason"], bytes_received=msg["bytes_received"],
                                            bytes_written=msg["bytes_written"], sha256=msg["sha256"],
                                            written_sha256=msg["written_sha256"],
                                            durations={k: float(v) for k, v in msg["durations"].items() if isinstance(v, (int, float))},
                                            reported_by=name, notes=notes)
        elif msg["type"] == "failed":
            prev = self.results.get(name)
            note = f"{msg['by']}: {msg['reason']}"
            if prev is None or prev.reported_by != name:
                self.results[name] = NodeResult(name=name, ok=False, reason=msg["reason"], reported_by=msg["by"],
                                                notes=(prev.notes if prev else []) + [note])
            else:
                prev.notes.append(note)
        elif msg["type"] == "orphan":
            own = self.results.get(name)
            if (own is None or own.reported_by != name) and not any(lk.active and lk.name == name for lk in self.links):
                self.counters["orphans"] += 1
                self.add_link(self.subtrees[name], [msg["offset"]])
        self.window_changed()

    async def _serve_reports(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from broadcast.wire import decode

        self._report_writers.add(writer)
        try:
            first = decode((await asyncio.wait_for(reader.readline(), 30.0)).rstrip(b"\n"))
            if first["type"] != "report_hello" or first["session"] != self.session or not hmac.compare_digest(first["token"], self.token):
                self.counters["dropped_malformed"] += 1
                return
            while line := await reader.readline():
                try:
                    msg = decode(line.rstrip(b"\n"))
                except MalformedPacket:
                    self.counters["dropped_malformed"] += 1
                    continue
                if msg["type"] in ("result", "failed", "orphan"):
                    self._on_report(msg)
                else:
                    self.counters["dropped_malformed"] += 1
        except (MalformedPacket, OSError, asyncio.TimeoutError, ValueError):
            self.counters["dropped_malformed"] += 1
        finally:
            self._report_writers.discard(writer)
            writer.close()

    def _finished(self) -> bool:
        for name in self.subtrees:
            r = self.results.get(name)
            if r is None:
                return False
            if r.reported_by != name and any(lk.active and lk.name == name for lk in self.links):
                return False  # being rescued
        return True

    async def run(self, deadline: float | None = None) -> BroadcastResult:
        """Broadcast to every node; return when each has a result (or at the deadline, in seconds)."""
        t0 = time.monotonic()
        if self.listen_factory is not None:
            lsock = self.listen_factory(self.report_addr[0], 0)
            self._report_server = await asyncio.start_server(self._serve_reports, sock=lsock, limit=1 << 20)
        else:
            self._report_server = await asyncio.start_server(self._serve_reports, self.report_addr[0], 0, limit=1 << 20)
        self.report_addr = (self.report_addr[0], self._report_server.sockets[0].getsockname()[1])
        try:
            for tree in self.forest:
                self.add_link(tree, [0])
            try:
                await asyncio.wait_for(self.wait_until(self._finished), deadline)
            except asyncio.TimeoutError:
                pass
        finally:
            for lk in self.links:
                lk.cancel()
            self._report_server.close()
            for w in list(self._report_writers):
                w.close()
            await asyncio.sleep(0)
            for f in self._files.values():
                f.close()
        nodes: dict[str, NodeResult] = {}
        for name in self.subtrees:
            r = self.results.get(name)
            if r is None:
                r = NodeResult(name=name, ok=False, reason=f"no report within {deadline:g} s", reported_by=SOURCE_NAME)
            elif r.ok and self.sha256 and r.sha256 != self.sha256:
                r.ok, r.reason = False, f"sha256 mismatch: {r.sha256} != {self.sha256}"
            nodes[name] = r
        return BroadcastResult(method=self.method, size=self.size, sha256=self.sha256, nodes=nodes,
                               seconds=time.monotonic() - t0)


def new_session() -> tuple[str, str]:
    """Return a fresh (session id, token) pair."""
    return os.urandom(6).hex(), os.urandom(16).hex()

