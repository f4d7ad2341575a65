"""The per-block data path of one TFTP transfer: a tight loop on a blocking UDP socket in a thread of its own.

The boot-protocol state (RRQ parsing, policy, option negotiation, access checks, events) stays in the event
loop (server.py); once a transfer's file and options are settled, its DATA/ACK exchange runs here, driven by
the same sans-io ReadSession, so the loop does not pay a callback, a timer and a selector wake-up per block.
Each block costs two system calls (sendto, recvfrom), both made without the GIL, so many transfers use both
cores for the kernel's share of the work; the retransmission timer is the socket's SO_RCVTIMEO (one
system call per block, no poll() before it). Counters are kept per transfer and handed to the loop at the end.
"""
from __future__ import annotations

import errno
import socket
import struct
import threading
import time
from typing import Callable

from domain.errors import MalformedPacket
from netboot.tftp.codec import ErrorCode, decode, encode_error
from netboot.tftp.session import ReadSession

Address = tuple[str, int]
_TIMEVAL = struct.Struct("@ll")
_RECV_SIZE = 65536
_STACK = 512 << 10  # the loop below is shallow; 8 MiB default stacks would reserve 32 GiB for 4096 transfers


class TransferCounts:
    """What one transfer's data path saw: datagrams in and out, drops by kind."""

    __slots__ = ("received", "sent", "dropped_wrong_tid", "dropped_malformed")

    def __init__(self) -> None:
        self.received = self.sent = self.dropped_wrong_tid = self.dropped_malformed = 0


def _set_timeout(sock: socket.socket, seconds: float) -> None:
    """Make a blocking recvfrom() give up after `seconds` (SO_RCVTIMEO; 0 would mean never, so at least 1 µs)."""
    usec = max(int(seconds * 1e6), 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.pack(usec // 1_000_000, usec % 1_000_000))


class TransferWorker:
    """Runs one ReadSession over its own socket (the transfer's TID, RFC 1350 sec. 4) until it ends or is stopped."""

    def __init__(self, sock: socket.socket, client: Address, session: ReadSession,
                 done: Callable[["TransferWorker"], None]) -> None:
        self.sock = sock
        self.client = client
        self.session = session
        self.counts = TransferCounts()
        self._done = done
        self._stopping = False
        self._lock = threading.Lock()  # close() and stop() never race on the descriptor
        self._closed = False
        self.error = ""  # what ended the loop when the session did not end by itself
        self.thread = threading.Thread(target=self._run, name=f"tftp {client[0]}:{client[1]}", daemon=True)

    def start(self) -> None:
        """Start the transfer's thread (from the event loop's thread)."""
        self.sock.setblocking(True)
        old = threading.stack_size(_STACK)
        try:
            self.thread.start()
        finally:
            threading.stack_size(old)

    def stop(self) -> None:
        """Ask the thread to end without an outcome and wake it (the superseded transfer, the service closing)."""
        self._stopping = True
        with self._lock:
            if not self._closed:
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked recvfrom (Linux: returns 0 bytes)
                except OSError:
                    pass

    def _close(self) -> None:
        with self._lock:
            self._closed = True
            self.sock.close()

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # never lose a transfer silently: the loop reports it as failed
            self.error = f"data path: {exc!r}"
        finally:
            self._close()
            if not self._stopping:
                self._done(self)

    def _loop(self) -> None:
        sock, client, session, counts = self.sock, self.client, self.session, self.counts
        sendto, recvfrom, clock = sock.sendto, sock.recvfrom, time.monotonic
        armed = 0.0
        out = session.start(clock())
        while True:
            for datagram in out:
                try:
                    sendto(datagram, client)
                except OSError as exc:
                    if exc.errno not in (errno.ENOBUFS, errno.EAGAIN, errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                        raise
                    # A full queue or an ICMP error is a lost datagram: the retransmission timer recovers it.
                counts.sent += 1
            if session.finished or self._stopping:
                return
            deadline = session.deadline
            if deadline is None:
                return
            wait = deadline - clock()
            if wait <= 0:
                out = session.tick(clock())
                continue
            # Re-arm the kernel timer only when the wait changed by more than a quarter: a timeout that fires a
            # little early is retried for the rest, one that fires late costs that much more of a lost block.
            if not 0.75 * armed <= wait <= armed:
                _set_timeout(sock, wait)
                armed = wait
            try:
                data, addr = recvfrom(_RECV_SIZE)
            except (BlockingIOError, TimeoutError):
                out = session.tick(clock())
                continue
            except OSError as exc:
                if exc.errno == errno.ECONNREFUSED:  # an earlier ICMP port unreachable; the timer decides
                    out = []
                    continue
                raise
            if self._stopping or not data and addr is None:
                return
            counts.received += 1
            if addr != client:
                # RFC 1350 sec. 4: a packet from a wrong TID gets ERROR 5 and does not disturb the transfer.
                counts.dropped_wrong_tid += 1
                try:
                    sendto(encode_error(ErrorCode.UNKNOWN_TID, "unknown transfer ID"), addr)
                    counts.sent += 1
                except OSError:
                    pass
                out = []
                continue
            if len(data) == 4 and data[0] == 0 and data[1] == 4:  # ACK (RFC 1350 sec. 5): the common case, no objects
                out = session.on_ack(data[2] << 8 | data[3], clock())
                continue
            try:
                packet = decode(data)
            except MalformedPacket:
                counts.dropped_malformed += 1  # dropped and counted; the transfer goes on
                out = []
                continue
            out = session.receive(packet, clock())
