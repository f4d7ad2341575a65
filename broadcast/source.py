"""The appliance side of chain and tree broadcast: feed the forest's roots, gather every node's report, rescue orphans.

`Source` reads the image file with sendfile into the data connections of the roots (one for a chain, k
for a tree; the protocol is described in broadcast.feeder), serves the report channel the relays send
their results, failures and orphan requests on (broadcast.report_channel), and feeds orphaned nodes
itself, since it has the whole image.
"""
from __future__ import annotations

import asyncio
import hmac
import os
import socket
import time
from pathlib import Path
from typing import Any

from domain.errors import MalformedPacket
from domain.aio import within
from broadcast.feeder import ChildLink, Feeder
from broadcast.params import ChainParams
from broadcast.result import SOURCE_NAME, BroadcastResult, NodeResult
from broadcast.topology import Subtree
from broadcast.wire import REPORT_KINDS, ListenFactory, SocketFactory, decode


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
        self._last_report = time.monotonic()
        self._report_server: asyncio.base_events.Server | None = None
        self._files: dict[int, Any] = {}
        self._report_writers: set[asyncio.StreamWriter] = set()
        self.counters = {"reports": 0, "dropped_malformed": 0, "orphans": 0}
        self.bypassed: dict[str, list[str]] = {}  # node -> "by: reason" of each time it was bypassed as a suspect

    def available_from(self) -> int:
        """The source has the whole image: any offset can be sent."""
        return 0

    async def send_more(self, link: ChildLink) -> None:
        """sendfile() the next piece of the image file at link.cursor (paced by params.source_rate)."""
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
        """Take a report of the source's own links as if it had come over the report channel."""
        self._on_report({"type": kind, **fields})

    def hand_to_source(self, link: ChildLink, offset: int) -> None:  # pragma: no cover - the source never hands off
        """Never called: the source has the whole image."""
        raise AssertionError("the source has the whole image")

    whole_image = True  # a suspect root is fed on (as a leaf) until it answers or fails

    def recovered(self, link: ChildLink) -> None:
        """A suspect root acknowledged again: it was only slow, and is a leaf of the source from now on."""
        link.suspect = ""

    def _on_report(self, msg: dict[str, Any]) -> None:
        self.counters["reports"] += 1
        self._last_report = time.monotonic()
        name = msg.get("node", "")
        if name not in self.subtrees:
            self.counters["dropped_malformed"] += 1
            return
        if msg["type"] == "result":
            notes = self.results[name].notes if name in self.results else []
            self.results[name] = NodeResult.from_report(msg, name, notes)
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
                tree = self.subtrees[name]
                # a bypassed node's children are fed by the parent that bypassed it: it is fed alone
                self.add_link(tree.leaf() if name in self.bypassed else tree, [msg["offset"]])
        elif msg["type"] == "bypassed":
            self.bypassed.setdefault(name, []).append(f"bypassed by {msg['by']}: {msg['reason']}")
        self.window_changed()

    async def _serve_reports(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._report_writers.add(writer)
        try:
            first = decode((await within(reader.readline(), 30.0)).rstrip(b"\n"))
            if first["type"] != "report_hello" or first["session"] != self.session or not hmac.compare_digest(first["token"], self.token):
                self.counters["dropped_malformed"] += 1
                return
            while line := await reader.readline():
                try:
                    msg = decode(line.rstrip(b"\n"))
                except MalformedPacket:
                    self.counters["dropped_malformed"] += 1
                    continue
                if msg["type"] in REPORT_KINDS:
                    self._on_report(msg)
                else:
                    self.counters["dropped_malformed"] += 1
        except (MalformedPacket, OSError, asyncio.TimeoutError, ValueError):
            self.counters["dropped_malformed"] += 1
        finally:
            self._report_writers.discard(writer)
            writer.close()

    def _finished(self) -> bool:
        # Woken by every report and every ack: without this count a 4000-node chain scanned up to 4000 names per
        # wake-up (O(N^2) over the broadcast). Results are only ever added, for names of the session (_on_report).
        if len(self.results) < len(self.subtrees):
            return False
        for name in self.subtrees:
            r = self.results.get(name)
            if r is None:
                return False
            if r.reported_by != name and any(lk.active and lk.name == name for lk in self.links):
                return False  # being rescued
        return True

    async def _wait_for_reports(self) -> None:
        """Until every node has a result, or nothing is fed from here and no report came for quiet_delay. A safety
        net: each node is watched by its parent until it says its report is sent, so only a report lost on its way
        (a node and its parent both dying then) leaves a node unreported."""
        quiet = self.params.quiet_delay
        while not self._finished():
            left = self._last_report + quiet - time.monotonic()
            if left <= 0 and not self.links_active():
                return
            try:
                await within(self.wait_until(self._finished), max(left, 1.0))
            except asyncio.TimeoutError:
                pass

    async def run(self, deadline: float | None = None) -> BroadcastResult:
        """Broadcast to every node; return when each has a result (or at the deadline, in seconds)."""
        t0 = self._last_report = time.monotonic()
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
                await within(self._wait_for_reports(), deadline)
            except asyncio.TimeoutError:
                pass
        finally:
            for lk in self.links:
                lk.cancel()
            self._report_server.close()
            await _close_spread(list(self._report_writers))
            for f in self._files.values():
                f.close()
        nodes: dict[str, NodeResult] = {}
        quiet = self.params.quiet_delay
        for name in self.subtrees:
            r = self.results.get(name)
            if r is None:
                why = f"within {deadline:g} s" if deadline is not None and time.monotonic() - t0 >= deadline else \
                    f"(and none from any node for {quiet:g} s)"
                r = NodeResult(name=name, ok=False, reason=f"no report {why}", reported_by=SOURCE_NAME)
            elif r.ok and self.sha256 and r.sha256 != self.sha256:
                r.ok, r.reason = False, f"sha256 mismatch: {r.sha256} != {self.sha256}"
            r.notes = self.bypassed.get(name, []) + r.notes
            nodes[name] = r
        return BroadcastResult(method=self.method, size=self.size, sha256=self.sha256, nodes=nodes,
                               seconds=time.monotonic() - t0,
                               counters={"bypassed": sum(map(len, self.bypassed.values())), "orphans": self.counters["orphans"],
                                         "dropped_malformed": self.counters["dropped_malformed"]})


# Report connections closed per loop turn at the end of a session. Each close sends its FIN through the host's stack
# in the closing call (in the vm-testbed, through a veth and a bridge, softirq and all): the 4000 report connections
# of a 4000-node chain, closed in one turn, were the loop held 22 s at the end of the broadcast (the held-loop stack:
# `_call_connection_lost` -> `socket.close`). Closed 100 a turn, they still held it 2 s a turn for 40 s: so the FINs
# are sent from a worker thread first (shutdown), and the closes in the loop find them sent.
CLOSE_BATCH = 100


async def _close_spread(writers: list[asyncio.StreamWriter]) -> None:
    """Close every writer, its FIN sent from a worker thread, CLOSE_BATCH a loop turn (all of them, even if
    cancelled meanwhile)."""
    try:
        socks = [s for w in writers if (s := w.get_extra_info("socket")) is not None]
        await asyncio.to_thread(_send_fins, socks)
        for i, w in enumerate(writers):
            w.close()
            if i % CLOSE_BATCH == CLOSE_BATCH - 1:
                await asyncio.sleep(0)  # their transports' connection_lost (the socket closes) run in this turn
        await asyncio.sleep(0)
    finally:
        for w in writers:
            w.close()


def _send_fins(socks: list[Any]) -> None:
    """shutdown(SHUT_WR) each socket (nothing is left to send on them): the kernel's work of the FIN, in this thread."""
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # closed by its peer meanwhile
            pass


def new_session() -> tuple[str, str]:
    """Return a fresh (session id, token) pair."""
    return os.urandom(6).hex(), os.urandom(16).hex()
