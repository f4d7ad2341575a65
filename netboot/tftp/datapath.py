"""The per-block data path of TFTP transfers: one thread running a lean epoll loop over every transfer's socket.

The boot-protocol state (RRQ parsing, policy, option negotiation, access checks, events) stays in the event
loop (server.py); once a transfer's file and options are settled, its DATA/ACK exchange runs here, driven by
the same sans-io ReadSession. Compared with the event loop's datagram endpoints, a block costs no callback
handle, no transport layer and no timer re-arm: one epoll wake-up serves every socket that became readable
(many transfers at once are batched), then recv, the session, send (each socket is connected to its client, so
no address a block). Timers are a heap with at most a few entries per transfer (an entry that fires early
re-arms at the session's later deadline).

Measured steps (docs/benchmarks.md): a thread per transfer with a blocking socket was faster for one
transfer alone but 1.5-2x slower for 200 at once (a GIL hand-off and a context switch per block per thread).
"""
from __future__ import annotations

import collections
import errno
import heapq
import itertools
import os
import select
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

from domain.errors import MalformedPacket
from netboot.tftp.codec import decode
from netboot.tftp.session import Outcome, ReadSession
from netboot.wakeup import epoll_with_wakeup

Address = tuple[str, int]
_RECV_SIZE = 65536
_INF = float("inf")
SPIN_BACKOFF = 16  # wake-ups without busy polling after a busy poll that found nothing
# Send errors that mean a lost datagram (the retransmission timer recovers it), not a broken transfer.
_TRANSIENT = (errno.ENOBUFS, errno.EAGAIN, errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EPERM)


def open_transfer_socket(host: str, client: Address) -> tuple[socket.socket, int]:
    """Bind a transfer's socket (its TID) on host and connect it to the client; return it and the datagrams dropped.

    RFC 1350 sec. 4 asks that a datagram from a wrong TID be answered with ERROR 5 without disturbing the
    transfer. A connected UDP socket makes the kernel deliver only the client's datagrams and answer any other
    source with ICMP port unreachable instead, as tftpd-hpa does (it connects its socket to the peer too); the
    transfer is not disturbed either way. In exchange each block is a send()/recv() without a route lookup or an
    address object. Datagrams that reached the socket between bind() and connect() came from no client (it
    cannot know the port yet): they are read here, dropped and counted as wrong TIDs.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((host, 0))
        sock.connect(client)
        sock.setblocking(False)
        dropped = 0
        while True:
            try:
                sock.recv(1)  # a UDP datagram is read whole: the rest of it is discarded
            except (BlockingIOError, InterruptedError, ConnectionRefusedError):
                return sock, dropped
            dropped += 1
    except BaseException:
        sock.close()
        raise


class TransferCounts:
    """What one transfer's data path saw: datagrams in and out, drops by kind."""

    __slots__ = ("received", "sent", "dropped_wrong_tid", "dropped_malformed")

    def __init__(self) -> None:
        self.received = self.sent = self.dropped_wrong_tid = self.dropped_malformed = 0


@dataclass(frozen=True)
class TransferResult:
    """How one transfer's data path ended, as the event loop accounts for it (from a thread or a worker process)."""

    outcome: Outcome | None  # None: the data path ended it (an exception, a worker process gone)
    reason: str
    size: int
    blksize: int
    windowsize: int
    received: int = 0
    sent: int = 0
    dropped_wrong_tid: int = 0
    dropped_malformed: int = 0
    retransmitted: int = 0
    duplicate_acks: int = 0


class TransferWorker:
    """One transfer's socket (its TID, RFC 1350 sec. 4), session and counters, run by a DataPlane."""

    def __init__(self, sock: socket.socket, client: Address, session: ReadSession,
                 done: Callable[["TransferWorker"], None]) -> None:
        self.sock = sock
        self.client = client
        self.session = session
        self.counts = TransferCounts()
        self.done = done
        self.error = ""  # what ended the transfer when the session did not end by itself
        self.timer_at = _INF  # the earliest heap entry of this transfer

    def result(self) -> TransferResult:
        """What the transfer came to so far: the session's outcome and the counters."""
        session, counts = self.session, self.counts
        return TransferResult(
            outcome=session.outcome, reason=session.reason or self.error, size=session.size, blksize=session.blksize,
            windowsize=session.windowsize, received=counts.received, sent=counts.sent,
            dropped_wrong_tid=counts.dropped_wrong_tid, dropped_malformed=counts.dropped_malformed,
            retransmitted=session.retransmitted, duplicate_acks=session.duplicate_acks,
        )

    def send(self, datagrams: list[bytes]) -> None:
        """Send datagrams to the client (the socket is connected to it); a transient error is a lost datagram."""
        send = self.sock.send
        for datagram in datagrams:
            try:
                send(datagram)
            except OSError as exc:
                if exc.errno not in _TRANSIENT:
                    raise
            self.counts.sent += 1

    def readable(self, now: Callable[[], float], buf: bytearray) -> None:
        """Handle one datagram from the socket into buf (the plane's); level-triggered epoll reports the next one again."""
        # The socket is connected to the client's TID (open_transfer_socket): the kernel delivers only its
        # datagrams, so no source check and no address object a block; recv_into allocates nothing either.
        sock = self.sock
        try:
            n = sock.recv_into(buf)
        except (BlockingIOError, InterruptedError, ConnectionRefusedError):
            return
        counts = self.counts
        counts.received += 1
        if n == 4 and buf[0] == 0 and buf[1] == 4:  # ACK (RFC 1350 sec. 5): the common case, no objects
            out = self.session.on_ack(buf[2] << 8 | buf[3], now())
        else:
            try:
                packet = decode(bytes(buf[:n]))
            except MalformedPacket:
                counts.dropped_malformed += 1  # dropped and counted; the transfer goes on
                return
            out = self.session.receive(packet, now())
        for datagram in out:  # send(), inline: once per block
            try:
                sock.send(datagram)
            except OSError as exc:
                if exc.errno not in _TRANSIENT:
                    raise
            counts.sent += 1


class DataPlane:
    """A thread that runs the DATA/ACK exchange of every transfer handed to it, until it ends or is removed."""

    def __init__(self, spin: float = 0.0, spin_transfers: int = 4) -> None:
        # Busy-poll: after answering, poll without sleeping for up to `spin` seconds while at most spin_transfers
        # run. A lock-step transfer waits one round trip a block; an ACK that arrives while the thread is
        # awake costs no wake-up of it (on a VM, a sleeping vCPU's wake-up is a good part of that round trip).
        # A spin that found nothing (a client slower than `spin`) pauses spinning for SPIN_BACKOFF wake-ups, so a
        # slow client costs about spin / SPIN_BACKOFF of CPU a block rather than spin.
        self._spin = spin
        self._spin_transfers = spin_transfers
        self._epoll: select.epoll | None = None
        self._wake_r = self._wake_w = -1
        self._commands: collections.deque[tuple[str, TransferWorker | None]] = collections.deque()
        self._workers: dict[int, TransferWorker] = {}
        self._heap: list[tuple[float, int, TransferWorker]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._buf = bytearray(_RECV_SIZE)  # every datagram is read into it by the plane's thread (an ACK: 4 bytes)

    def add(self, worker: TransferWorker) -> None:
        """Start running a transfer (from the event loop's thread); the plane sends its first datagrams."""
        worker.sock.setblocking(False)
        self._command("add", worker)

    def remove(self, worker: TransferWorker) -> None:
        """Stop a transfer without an outcome and close its socket (superseded, or the service closing)."""
        self._command("remove", worker)

    def close(self, timeout: float = 2.0) -> None:
        """Remove every transfer, end the thread and release the epoll descriptor (blocks up to timeout)."""
        with self._lock:
            thread = self._thread
            if thread is None:
                return
            self._commands.append(("quit", None))
            os.write(self._wake_w, b"q")
        thread.join(timeout)

    def _command(self, what: str, worker: TransferWorker) -> None:
        with self._lock:
            if self._thread is None:
                self._epoll, self._wake_r, self._wake_w = epoll_with_wakeup()
                self._thread = threading.Thread(target=self._run, name="tftp data plane", daemon=True)
                self._thread.start()
            self._commands.append((what, worker))
            os.write(self._wake_w, b"c")

    def _arm(self, worker: TransferWorker) -> None:
        deadline = worker.session.deadline
        if deadline is not None and deadline < worker.timer_at:
            worker.timer_at = deadline
            heapq.heappush(self._heap, (deadline, next(self._seq), worker))

    def _drop(self, worker: TransferWorker, report: bool) -> None:
        fd = worker.sock.fileno()
        if self._workers.get(fd) is worker:
            del self._workers[fd]
            assert self._epoll is not None
            self._epoll.unregister(fd)
        worker.timer_at = -1.0  # no heap entry of it counts any more
        worker.sock.close()
        if report:
            worker.done(worker)

    def _after(self, worker: TransferWorker) -> None:
        """After a step: end a finished transfer, else make sure its timer is armed."""
        if worker.session.finished:
            self._drop(worker, report=True)
        else:
            self._arm(worker)

    def _fail(self, worker: TransferWorker, exc: Exception) -> None:
        """Never lose a transfer silently: the event loop reports it as failed."""
        worker.error = f"data path: {exc!r}"
        self._drop(worker, report=True)

    def _commands_due(self) -> bool:
        """Apply queued commands; return False when the plane must stop."""
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass
        assert self._epoll is not None
        while self._commands:
            what, worker = self._commands.popleft()
            if what == "quit":
                for w in list(self._workers.values()):
                    self._drop(w, report=False)
                return False
            assert worker is not None
            if what == "add":
                self._workers[worker.sock.fileno()] = worker
                self._epoll.register(worker.sock.fileno(), select.EPOLLIN)
                try:
                    worker.send(worker.session.start(time.monotonic()))
                except Exception as exc:
                    self._fail(worker, exc)
                    continue
                self._after(worker)
            elif worker.timer_at != -1.0:
                self._drop(worker, report=False)
        return True

    def _run(self) -> None:
        assert self._epoll is not None
        epoll, workers, heap, clock, wake = self._epoll, self._workers, self._heap, time.monotonic, self._wake_r
        buf = self._buf
        spin, spin_transfers, spin_until, spin_pause = self._spin, self._spin_transfers, 0.0, 0
        try:
            while True:
                events = epoll.poll(0.0) if spin_until else None
                while not events and spin_until and clock() < spin_until:
                    events = epoll.poll(0.0)
                if not events:
                    if spin_until:
                        spin_pause = SPIN_BACKOFF
                    wait = max(heap[0][0] - clock(), 0.0) if heap else -1.0
                    events = epoll.poll(wait)
                if spin_pause:
                    spin_pause -= 1
                    spin_until = 0.0
                else:
                    spin_until = clock() + spin if spin and events and 0 < len(workers) <= spin_transfers else 0.0
                for fd, _ in events:
                    if fd == wake:
                        if not self._commands_due():
                            return
                        continue
                    worker = workers.get(fd)
                    if worker is None:
                        continue
                    try:
                        worker.readable(clock, buf)
                    except Exception as exc:
                        self._fail(worker, exc)
                        continue
                    session = worker.session
                    if session.outcome is not None:  # session.finished, without a property call per block
                        self._drop(worker, report=True)
                    elif session.deadline is not None and session.deadline < worker.timer_at:
                        worker.timer_at = session.deadline
                        heapq.heappush(heap, (session.deadline, next(self._seq), worker))
                now = clock()
                while heap and heap[0][0] <= now:
                    at, _, worker = heapq.heappop(heap)
                    if at != worker.timer_at:
                        continue  # superseded by an earlier entry, or the transfer ended
                    worker.timer_at = _INF
                    deadline = worker.session.deadline
                    if deadline is not None and deadline > now:
                        self._arm(worker)  # fired early: the session's deadline moved on with progress
                        continue
                    try:
                        worker.send(worker.session.tick(now))
                    except Exception as exc:
                        self._fail(worker, exc)
                        continue
                    self._after(worker)
        finally:
            with self._lock:
                for w in list(workers.values()):
                    self._drop(w, report=False)
                epoll.close()
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._thread = None
