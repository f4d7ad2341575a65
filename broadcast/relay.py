"""A node's part of a chain or tree broadcast session: receive the stream, write it, forward it, acknowledge, report.

A `Relay` is made by the node's `Receiver` (broadcast.receiver) at the first `hello` of an armed
session; it is a `Feeder` (broadcast.feeder, which describes the data connection) for its children.

Faults: a relay that lost its upstream asks the source to feed it after `orphan_after` seconds and
gives up after `give_up_after`; an ancestor that connects meanwhile takes it over (`superseded` to the
old parent) and resumes from the relay's offset.

Data path (`ChainParams.relay_path`): on Linux a relay splices the upstream socket into a pipe,
tee(2)s it into one pipe per child that is caught up ("live") and splices those into the child sockets,
so forwarded bytes are never copied through Python (broadcast.splice); it reads its own pipe once for
the sink (which hashes every byte) and keeps those chunks as the retention window. A child that lags
(its pipe full), resumes, or whose socket refuses splice is sent copies from the window until it is
caught up again. Elsewhere, or with relay_path "python", relays recv and send the chunks themselves.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from domain.errors import MalformedPacket
from domain.aio import within
from broadcast.errors import ProtocolError, describe_error
from broadcast.feeder import ChildLink, Feeder
from broadcast.image import AsyncImageSink, WriteReport
from broadcast.params import ChainParams
from broadcast.report_channel import ReportClient
from broadcast.result import NodeResult
from broadcast.session import ArmedSession, StreamClock, node_result
from broadcast.loopfd import fd_ready
from broadcast.splice import SPLICE_UNSUPPORTED, KernelSplice, SplicePipe
from broadcast.topology import Subtree
from broadcast.wire import LineSocket, SocketFactory

log = logging.getLogger("rackboot.broadcast")

YIELD_EVERY = 1 << 20  # a relay's reader lets the event loop run at least once per this many bytes
ResultCallback = Callable[[str, NodeResult], None]  # (session, this node's result)


class Relay(Feeder):
    """One node's part of one broadcast session: receive, write, forward, acknowledge, report."""

    def __init__(self, name: str, armed: ArmedSession, hello: dict[str, Any], *, kernel: KernelSplice,
                 on_result: ResultCallback, socket_factory: SocketFactory | None = None) -> None:
        params = ChainParams.from_json(hello["params"])
        tree = Subtree.from_json(hello["tree"])
        if tree.name != name:
            raise ProtocolError(f"hello for {tree.name!r} reached {name!r}")
        report = hello["report"]
        if len(report) != 2 or not isinstance(report[0], str) or not isinstance(report[1], int):
            raise MalformedPacket("hello: report must be [host, port]")
        super().__init__(name, armed.session, armed.token, hello["size"], hello["sha256"], params,
                         (report[0], report[1]), [str(a) for a in hello["ancestors"]], socket_factory)
        self.armed = armed
        self.tree = tree
        self.on_result = on_result
        if params.relay_path == "splice" and not kernel.available:
            raise ProtocolError(f"relay_path splice: not available on {name}: {kernel.reason}")
        self.kernel = kernel if params.relay_path != "python" and kernel.available else None
        self._strict = params.relay_path == "splice"
        self._pipe: SplicePipe | None = None  # upstream -> here; children's pipes are tee'd from it, the sink reads it
        self._splice_upstream = self.kernel is not None  # False once the upstream socket refused splice
        self._waiting_for_children = False
        self._yielded_at = 0
        # bytes: in through splice / recv; out to children through pipes / Python sends; fds that refused splice
        self.counters = {"spliced_in": 0, "received_in": 0, "spliced_out": 0, "copied_out": 0, "splice_refused": 0}
        self.sink = AsyncImageSink(armed.sink_for(hello["size"], hello["sha256"]), max_queued=params.sink_queue)
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
        self.reports = ReportClient(name, self.session, self.token, self.report_addr, params.connect_timeout, socket_factory)
        self.clock = StreamClock()
        self.result: NodeResult | None = None
        self.reported = False  # our result is written to the report channel: our parent may let us go
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
        """The start of the retained window (what children can still be resumed from)."""
        return self._chunks[self._head][0] if self._head < len(self._chunks) else self.received

    async def send_more(self, link: ChildLink) -> None:
        """Send the child what its pipe holds, else a copy from the retained chunks (waiting for data first)."""
        await self.wait_until(lambda: self.received > link.cursor or link.cursor >= self.size or self.failed_reason is not None)
        if self.failed_reason is not None:
            raise ConnectionError(f"relay failed: {self.failed_reason}")
        if link.suspect:
            return  # nothing is held back for it any more (ChildLink waits until it is handed over or fails)
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
            log.info("%s: socket to %s refuses splice (%s): copying", self.name, link.name, describe_error(exc))
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
                await fd_ready(fd, write=True)

    def _children_behind(self) -> bool:
        """Kernel path: True while a child that takes pipes is not live with room for a chunk in its pipe.

        The reader then waits instead of reading ahead: a child that lags (resumed, adopted, or its
        pipe overflowed) catches up by copies from the window and becomes live again, and a live child's
        pipe is its backpressure (a full window would leave it copying for good whenever it is the slower).
        """
        for lk in self.links:
            if lk.state != "streaming" or lk.copy_only or lk.suspect:
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
            if lk.state != "streaming" or lk.copy_only or lk.suspect or max(lk.pipe_end, lk.cursor) != self.received:
                continue
            if lk.pipe is None:
                try:
                    lk.pipe = SplicePipe(min(4 * self.params.chunk, 1 << 20))
                except OSError as exc:  # out of fds or pipe quota
                    log.info("%s: no pipe for %s (%s): copying", self.name, lk.name, describe_error(exc))
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
                await fd_ready(fd, write=False)
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
            log.info("%s: upstream socket refuses splice (%s): copying", self.name, describe_error(exc))
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
                log.info("%s: tee to %s failed (%s): copying", self.name, lk.name, describe_error(exc))
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
        """Queue a report on the channel to the source."""
        self.reports.send(kind, **fields)

    def window_changed(self) -> None:
        """Wake the waiters and drop the retained chunks nobody needs any more."""
        super().window_changed()
        self._trim()

    def _trim(self) -> None:
        if not hasattr(self, "_chunks"):
            return
        low = self.low_water(self.sink_offset)
        chunks = self._chunks
        while self._head < len(chunks) and chunks[self._head][0] + len(chunks[self._head][1]) <= low:
            # Free the bytes now; the list itself is compacted in batches (a deletion at its front copies it).
            # Keeping them until the batch filled held up to 256 chunks (64 MiB at 256 KiB) past the window:
            # every relay of a testbed held its whole image until the session ended.
            chunks[self._head] = (chunks[self._head][0], b"")
            self._head += 1
        if self._head > 256:
            del chunks[: self._head]
            self._head = 0

    def retained(self) -> int:
        """Bytes held for children."""
        return self.received - self.available_from()

    def held_bytes(self) -> int:
        """Bytes of stream data this relay keeps in memory (the retained chunks)."""
        return sum(len(data) for _start, data in self._chunks)

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
                await within(old.send("superseded", by=sender), 1.0)
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
                self.clock.data()
                self._chunks.append((self.received, data))
                self.received += len(data)
                self.window_changed()  # wakes the child senders and the disk feeder
                data = b""
        except (OSError, ConnectionError, ProtocolError) as exc:
            if self.upstream is conn:
                self.upstream = None
                conn.close()
                log.info("%s: upstream %s lost at %d: %s", self.name, self.upstream_from, self.received, describe_error(exc))
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
            await conn.send("ack", offsets=self.vector(self.received), blocked=self.blocked, reported=self.reported)
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
        await self._reported()
        await self.wait_until(lambda: not self.links_active())
        await self._send_ack()
        await self.reports.flush(self.params.connect_timeout)
        self.done.set()
        # keep acking until our parent closes the connection (it does once our vector is complete)
        await asyncio.sleep(self.params.stall_timeout)
        self.stop()

    async def _reported(self) -> None:
        """Once our result is written to the report channel, say so upstream: until then our parent watches us (a
        node that died between its last byte and its report was reported by nobody, and the session waited)."""
        await self.reports.flush(self.params.connect_timeout)
        self.reported = True
        await self._send_ack()

    def _set_result(self, report: WriteReport) -> None:
        self.result = node_result(self.name, report, self.clock)
        self.report("result", **self.result.report_fields())
        self.on_result(self.session, self.result)

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
        await self._reported()

    def tasks(self) -> list[asyncio.Task[None]]:
        """The session's own tasks: upstream reader, acknowledger, orphan timer, finisher, disk feeder."""
        return [t for t in (self._reader, self._acker, self._orphan_timer, self._finisher, self._feeder) if t is not None]

    def stop(self) -> None:
        """Cancel every task and close every socket of this session."""
        current = asyncio.current_task()
        for t in self.tasks():
            if t is not current and not t.done():
                t.cancel()
        for lk in self.links:
            lk.cancel()
        if self.upstream is not None:
            self.upstream.close()
        self.reports.close()
        self.close_pipes()
        self._chunks = []
        self._head = 0
