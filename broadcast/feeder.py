"""The parent side of chain and tree broadcast: feeding children over data connections.

A `Feeder` (the appliance's `Source`, or a node's `Relay`) feeds one `ChildLink` per child subtree.

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
resume point left the window is handed to the source (which has the whole file).

A child silent (or stuck with data pending) for `suspect_delay`, a fraction of the stall timeout, is suspect:
its parent adopts its children at once and holds nothing back for it (it is no longer in the window, the
offsets sent upstream, or a relay's pipes). Without this every node that hangs in a chain held everything
below it for a whole stall timeout, and those added up along the chain (the seed's fault model: nodes that
hang at one point of the stream hang one after the other). A suspect that fails its stall timeout is
reported failed as before; one that acknowledges again was only slow: a relay hands it to the source, which
feeds it from its offset as a leaf, so no relay ends up feeding two children of a chain. The watchdog does not
count time its own event loop was held (a lagging process) against its children.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import time
from typing import Any, Callable

from domain.errors import MalformedPacket
from domain.aio import within
from broadcast.errors import describe_error
from broadcast.params import ChainParams
from broadcast.splice import SplicePipe
from broadcast.topology import Subtree
from broadcast.wire import VERSION, LineSocket, SocketFactory, open_connection

log = logging.getLogger("rackboot.broadcast")


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
        self.reported = False  # the child says its own result is on its way to the source
        self.no_route = False  # the connect failed for want of any route from this node (ENETUNREACH)
        self.suspect = ""  # why the child is suspect (its children then fed by this feeder); "" while it is not
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

    @property
    def counted(self) -> bool:
        """True while the feeder holds data back for this child: active and not suspect."""
        return self.active and not self.suspect

    def complete(self) -> bool:
        """The child and the levels below it that it reports for have the whole stream, and it has sent its result
        (until then it is watched: a node that dies before its report is reported failed by its parent)."""
        return self.reported and all(v >= self.feeder.size for v in self.vec)

    def needed(self) -> int:
        """The lowest offset this child (or the nodes it reports for) may still ask for."""
        return min(self.vec) if self.vec else 0

    def tasks(self) -> list[asyncio.Task[None]]:
        """The link's tasks: its acknowledgement reader, its stall watchdog and its main loop."""
        return self._tasks + ([self._main] if self._main else [])

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
            # no route from here at all (this node lost its address or its route): its children are not adopted from
            # here, they are handed to the source with it
            self.no_route = isinstance(exc, OSError) and exc.errno == errno.ENETUNREACH
            self._finish("failed", f"unreachable: {describe_error(exc)}")
            return
        try:
            await self.conn.send("hello", v=VERSION, session=f.session, token=f.token, **{"from": f.name},
                                 ancestors=f.ancestors + [f.name], tree=self.subtree.to_json(), size=f.size,
                                 sha256=f.sha256, report=list(f.report_addr), params=p.to_json())
            msg = await within(self.conn.recv(), p.connect_timeout + p.stall_timeout)
        except (OSError, asyncio.TimeoutError, MalformedPacket) as exc:
            self._finish("failed", f"handshake failed: {describe_error(exc)}")
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
                if self.suspect and not f.whole_image:
                    await f.wait_until(lambda: not self.suspect)  # until it is handed over or fails
                await f.send_more(self)
            self.close_pipe()
            self.state = "draining"
            await f.wait_until(lambda: not self.active or self.complete())
        except (OSError, ConnectionError) as exc:
            self._finish("failed", f"connection lost at offset {self.vec[0]}: {describe_error(exc)}")
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
                    moved = offs[0] > self.vec[0]
                    if moved:
                        self.last_progress = now
                    self.blocked = bool(msg["blocked"])
                    self.reported = bool(msg["reported"])
                    self.vec = list(offs[: f.params.resume_depth])
                    if self.suspect and (moved or offs[0] >= self.cursor):
                        f.recovered(self)  # it was only slow
                        if not self.active:
                            return
                    f.window_changed()
                elif msg["type"] == "superseded":
                    self._finish("superseded", msg["by"])
                    return
                else:
                    raise MalformedPacket(f"unexpected {msg['type']} from child")
        except (OSError, ConnectionError, MalformedPacket) as exc:
            if self.active and not (self.state == "draining" and self.complete()):
                self._finish("failed", f"connection lost at offset {self.vec[0]}: {describe_error(exc)}")

    async def _watchdog(self) -> None:
        p = self.feeder.params
        tick = min(1.0, p.suspect_delay / 4)
        woke = time.monotonic()
        while self.active:
            await asyncio.sleep(tick)
            now = time.monotonic()
            held = now - woke - tick
            woke = now
            if held > tick:
                # this process's loop was held (a lagging node, or a testbed daemon hosting hundreds): the child's
                # acknowledgements may be waiting unread in the socket, so that time is not held against it
                self.last_ack += held
                self.last_progress += held
            if self.blocked or self.vec[0] >= self.cursor:
                # nothing pending, or it waits on its own children (which it watches): the stall clock restarts
                self.last_progress = now
            silent, stuck = now - self.last_ack, now - self.last_progress
            if silent > p.stall_timeout:
                self._finish("failed", f"stalled: no acknowledgement for {p.stall_timeout:g} s (at offset {self.vec[0]})")
            elif stuck > p.stall_timeout:
                self._finish("failed", f"stalled: no progress for {p.stall_timeout:g} s at offset {self.vec[0]}")
            elif not self.suspect and silent > p.suspect_delay:
                self.feeder.suspect(self, f"no acknowledgement for {p.suspect_delay:g} s (at offset {self.vec[0]})")
            elif not self.suspect and stuck > p.suspect_delay:
                self.feeder.suspect(self, f"no progress for {p.suspect_delay:g} s at offset {self.vec[0]}")

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
        for t in self.tasks():
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
        for t in self.tasks():
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

    # The source has the whole image: it feeds a suspect child on and cannot hand a child to anyone. A relay stops
    # sending to a suspect child and hands to the source what it cannot feed.
    whole_image = False

    def recovered(self, link: ChildLink) -> None:
        """A suspect child acknowledged again: a relay hands it to the source, which feeds it as a leaf."""
        log.info("%s: %s answers again: handed to the source at offset %d", self.name, link.name, link.vec[0])
        self.hand_to_source(link, link.vec[0])
        link._finish("handed", "")

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
            if link.no_route and not self.whole_image:
                # Adopting its children would fail the same way, one after the other: a node of the vm-testbed whose
                # address was gone (a node that hangs mid-broadcast) went down the whole rest of its chain, 4000
                # connects in its daemon's loop, and the stream stalled there for 25 s each time. The source tries it.
                self.hand_to_source(link, min(link.vec))
            else:
                self._adopt_children(link)
        self.links = [lk for lk in self.links if lk.active]
        self.window_changed()

    def suspect(self, link: ChildLink, reason: str) -> None:
        """Bypass a child that went silent or stuck: feed its children ourselves, hold nothing back for it."""
        link.suspect = reason
        log.info("%s: %s is suspect (%s): its children are fed from here", self.name, link.name, reason)
        self.report("bypassed", node=link.name, reason=reason, by=self.name)
        self._adopt_children(link)
        if not self.whole_image:
            link.close_pipe()
        self.window_changed()

    def _adopt_children(self, link: ChildLink) -> None:
        """Feed the children of link's node from here, each from the offset link last reported for it; the node
        is then a leaf (a later failure of it adopts nothing again)."""
        below = link.vec[1:] or [min(link.vec)]
        children = link.subtree.children()
        link.subtree = link.subtree.leaf()
        for child in children:
            self.add_link(child, below)

    def vector(self, own: int) -> list[int]:
        """Offsets by depth below and including this node, up to resume_depth levels (sent upstream)."""
        vec = [own]
        for level in range(1, self.params.resume_depth):
            vals = [lk.vec[level - 1] for lk in self.links if lk.counted and len(lk.vec) >= level]
            if not vals:
                break
            vec.append(min(vals))
        return vec

    def low_water(self, own: int) -> int:
        """The lowest offset any active child may still need."""
        return min([own] + [lk.needed() for lk in self.links if lk.counted])

    def links_active(self) -> bool:
        """True while some child is still being fed."""
        return any(lk.active for lk in self.links)
