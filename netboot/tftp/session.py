"""The sender side of one TFTP read transfer as a sans-io state machine.

Packets and timer ticks go in; datagrams to send and the next deadline come out. No sockets, no clock:
the caller passes `now` (any monotonic seconds) and sends what is returned.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Mapping

from netboot.tftp.codec import Ack, Error, Packet, encode_data, encode_oack
from netboot.tftp.rto import DEFAULT_FLOOR, RtoEstimator

# RFC 2348 sec. 2: valid blksize values; RFC 7440 sec. 3: valid windowsize values; RFC 2349 sec. 2: timeout.
BLKSIZE_RANGE = (8, 65464)
WINDOWSIZE_RANGE = (1, 65535)
TIMEOUT_RANGE = (1, 255)
DEFAULT_BLKSIZE = 512  # RFC 1350
BACKOFF_CAP = 8  # retransmission waits double per retry, up to this many times the configured timeout
# Before any round trip is measured, the first datagram's timer starts at this fraction of the timeout (1 s:
# 0.25 s), not at the timeout itself; the give-up time stays what it was (give_up_after). See ReadSession.__init__.
FIRST_START = 0.25
SHARE_DATAGRAMS_MAX = 64 << 20  # files up to this size keep their DATA datagrams encoded once (a copy per block size)

# A file's DATA datagrams by block size, shared by every transfer of it: list index seq - 1 holds block seq's
# datagram (its 16-bit number is seq's, so it never changes), None until a transfer first sends it.
Datagrams = dict[int, list[bytes | None]]


@dataclass(frozen=True)
class SessionLimits:
    """Server-side bounds for a transfer (from TftpConfig)."""

    max_blksize: int = 1468
    max_windowsize: int = 64
    timeout: float = 1.0
    retries: int = 6
    # A client that never answered the first datagram is given up after the time this many fixed-timer
    # retransmissions took (give_up_after: 7 s at 1 s); its timer starts shorter (FIRST_START), so more tries fit.
    first_retries: int = 2
    rto_floor: float = DEFAULT_FLOOR  # the adaptive timeout's lower bound (rto.py); timeout is its start and cap


def give_up_after(timeout: float, retries: int) -> float:
    """Seconds without progress after which a transfer is given up: what `retries` fixed-timer retransmissions took."""
    return timeout * sum(min(2**i, BACKOFF_CAP) for i in range(retries + 1))


@dataclass(frozen=True)
class Negotiated:
    """What a transfer runs with, and the options to echo in the OACK (empty: no OACK)."""

    blksize: int
    windowsize: int
    timeout: float
    oack: dict[str, str]


def _int_option(value: str, lo: int, hi: int | None = None) -> int | None:
    try:
        n = int(value.strip())
    except ValueError:
        return None
    if n < lo or (hi is not None and n > hi):
        return None
    return n


def negotiate(requested: Mapping[str, str], size: int, limits: SessionLimits) -> Negotiated:
    """Decide the transfer parameters from the client's options; unknown or invalid options are ignored (RFC 2347)."""
    blksize, windowsize, timeout = DEFAULT_BLKSIZE, 1, limits.timeout
    oack: dict[str, str] = {}
    for name, value in requested.items():
        if name == "blksize":
            # RFC 2348: values above 65464 are out of range; the server may answer with a smaller one.
            n = _int_option(value, BLKSIZE_RANGE[0])
            if n is not None:
                blksize = min(n, BLKSIZE_RANGE[1], limits.max_blksize)
                oack["blksize"] = str(blksize)
        elif name == "tsize":
            # RFC 2349 sec. 3: in a read request the client sends 0 and the server answers the size.
            if _int_option(value, 0) is not None:
                oack["tsize"] = str(size)
        elif name == "timeout":
            # RFC 2349 sec. 2: the server accepts the value as is, or leaves the option out.
            n = _int_option(value, *TIMEOUT_RANGE)
            if n is not None:
                timeout = float(n)
                oack["timeout"] = str(n)
        elif name == "windowsize":
            # RFC 7440 sec. 3: the server may answer with a smaller window.
            n = _int_option(value, *WINDOWSIZE_RANGE)
            if n is not None:
                windowsize = min(n, limits.max_windowsize)
                oack["windowsize"] = str(windowsize)
    return Negotiated(blksize=blksize, windowsize=windowsize, timeout=timeout, oack=oack)


class Outcome(Enum):
    """How a transfer ended."""

    SENT = "sent"  # the client acknowledged the last block
    FAILED = "failed"  # retries exhausted, or the client sent an ERROR during the data phase
    ABORTED = "aborted"  # the client answered the OACK with an ERROR (e.g. OVMF's tsize probe, error 8)


class ReadSession:
    """Sends one file to one client: OACK handshake, windowed DATA, retransmission with backoff.

    Blocks are numbered internally with unbounded sequence numbers (block 0 is the OACK); the wire
    carries them modulo 2**16, so files larger than 65535 blocks roll over to block 0.
    """

    def __init__(self, data: bytes, requested: Mapping[str, str], limits: SessionLimits,
                 shared: Datagrams | None = None) -> None:
        self.data = memoryview(data)
        self.size = len(data)
        self.limits = limits
        self.params = negotiate(requested, self.size, limits)
        self.blksize = self.params.blksize
        self.windowsize = self.params.windowsize
        # The last block is short; when the size is a multiple of blksize it is empty (RFC 1350 sec. 6).
        self.last_block = self.size // self.blksize + 1
        # DATA encoded once per file and block size and shared by its transfers (the caller's `shared`, one per
        # file content): a block costs a list lookup instead of a slice, a header and a copy.
        self._datagrams: list[bytes | None] | None = None
        if shared is not None and self.size <= SHARE_DATAGRAMS_MAX:
            self._datagrams = shared.setdefault(self.blksize, [None] * self.last_block)
        self._base = 0 if self.params.oack else 1  # lowest unacknowledged block
        self._next = self._base  # next block not yet sent in this window
        self._retry = 0
        self._sent_at = 0.0  # when the current window last went out
        self._resent = False  # the current window went out more than once: no RTT sample from it (Karn)
        self._progress_at: float | None = None  # start, or the last ACK that moved the window
        self._dup_resent = -1  # the window base a duplicate ACK already made us resend
        self._first = self._base
        first_retries = min(limits.first_retries, limits.retries)
        self._budgets = (give_up_after(self.params.timeout, limits.retries), give_up_after(self.params.timeout, first_retries))
        if "timeout" in self.params.oack:
            # RFC 2349 sec. 2: the client asked for this retransmission timeout; it is used as is.
            self.rtt = RtoEstimator(self.params.timeout, floor=self.params.timeout)
        else:
            # Until the client first answers no round trip is known, and RFC 6298 sec. 2.1 would start at the full
            # timeout (1 s), doubling per retry (sec. 5.5): in the 1 + 2 + 4 = 7 s a silent client is given (the
            # first_retries budget, issue 11) that is 3 tries, and 3 lost exchanges in a row (0.19**3 under 10 %
            # loss each way, ~0.7 % of transfers) ended live transfers. RFC 1123 4.2.3.2 asks TFTP for an adaptive
            # timeout and RFC 1350 leaves its start to the implementation, so on a boot LAN (round trips well under
            # a millisecond) the timer starts at a quarter of the timeout and is capped at the timeout as before:
            # 0.25, 0.5, 1, 2 s, 5 tries in the same 7 s. The budget is unchanged, so a client that never answers is
            # still dropped after 7 s, for 5 datagrams instead of 3. Measured round trips replace the start.
            start = max(limits.timeout * FIRST_START, min(limits.rto_floor, limits.timeout))
            self.rtt = RtoEstimator(start, floor=limits.rto_floor, cap=limits.timeout)
        self.deadline: float | None = None
        self.outcome: Outcome | None = None
        self.reason = ""
        self.retransmitted = 0
        self.duplicate_acks = 0
        self.datagrams_sent = 0

    @property
    def finished(self) -> bool:
        """True once the transfer ended, whatever the outcome."""
        return self.outcome is not None

    @property
    def acked_blocks(self) -> int:
        """How many DATA blocks the client acknowledged so far."""
        return max(self._base - 1, 0)

    def start(self, now: float) -> list[bytes]:
        """Return the first datagrams: the OACK when options were accepted, else the first window of DATA."""
        self._progress_at = now
        return self._send_window(now)

    def _block(self, seq: int) -> bytes:
        if seq == 0:
            return encode_oack(self.params.oack)
        datagrams = self._datagrams
        if datagrams is not None:
            datagram = datagrams[seq - 1]
            if datagram is None:
                off = (seq - 1) * self.blksize
                datagram = datagrams[seq - 1] = encode_data(seq, self.data[off : off + self.blksize])
            return datagram
        off = (seq - 1) * self.blksize
        return encode_data(seq, self.data[off : off + self.blksize])

    def _wait(self) -> float:
        # The adaptive timeout (rto.py) doubles per retry (RFC 6298 sec. 5.5), never past the fixed timer's cap.
        return min(self.rtt.rto * 2**self._retry, self.params.timeout * BACKOFF_CAP)

    def _budget(self) -> float:
        # A client that never answered our first datagram is likely gone (or was never there: a flood of RRQs
        # from forged ports); it asks again if it is alive (RFC 1350: the RRQ is retransmitted on timeout). So
        # it is given up sooner than a client in the middle of its transfer, and its slot freed. The limit is
        # in time (what that many fixed-timer retransmissions took), as the adaptive timer may be much shorter.
        return self._budgets[self._base == self._first]

    def _send_window(self, now: float) -> list[bytes]:
        # RFC 7440 sec. 4: a window of up to windowsize blocks goes out back to back; the OACK travels alone.
        # (Once per block in lock-step: written for speed, the single block without a comprehension.)
        base = self._base
        if base == 0:
            end = 1
        else:
            end = base + self.windowsize
            if end > self.last_block:
                end = self.last_block + 1
        out = [self._block(base)] if end == base + 1 else [self._block(seq) for seq in range(base, end)]
        self._next = end
        self._sent_at = now
        # Never past the give-up time, so a dead client is given up when the fixed timer would have done it.
        progress = self._progress_at if self._progress_at is not None else now
        # _wait() and _budget(), inline; with no retry the wait is the RTO (never above the timeout, its cap).
        wait = self.rtt.rto if self._retry == 0 else self._wait()
        deadline, limit = now + wait, progress + self._budgets[base == self._first]
        self.deadline = deadline if deadline < limit else limit
        self.datagrams_sent += len(out)
        return out

    def _finish(self, outcome: Outcome, reason: str = "") -> list[bytes]:
        self.outcome = outcome
        self.reason = reason
        self.deadline = None
        return []

    def receive(self, packet: Packet, now: float) -> list[bytes]:
        """Feed one packet from the client's TID; return datagrams to send."""
        if self.outcome is not None:
            return []
        if isinstance(packet, Error):
            if self._base == 0:
                # RFC 2347: the client may refuse the OACK with an ERROR; OVMF does so (error 8) to end
                # its tsize probe. It is a normal end, not a failure, and needs no answer.
                return self._finish(Outcome.ABORTED, f"client ended after OACK: error {packet.code} {packet.message}".strip())
            return self._finish(Outcome.FAILED, f"client sent error {packet.code}: {packet.message}")
        if not isinstance(packet, Ack):
            return []
        return self.on_ack(packet.block, now)

    def on_ack(self, block: int, now: float) -> list[bytes]:
        """Feed the block number of one ACK from the client's TID; return datagrams to send."""
        if self.outcome is not None:
            return []
        highest = self._next - 1
        # Map the 16-bit block number onto the highest sequence number sent that carries it.
        seq = highest - ((highest - block) & 0xFFFF)
        if seq < self._base:
            self.duplicate_acks += 1
            if self.windowsize == 1 or seq != self._base - 1 or self._dup_resent == self._base:
                # Lock-step: never resend on a duplicate ACK (RFC 1350's Sorcerer's Apprentice bug, RFC 1123
                # 4.2.3.1); the retransmission timer alone recovers lost DATA.
                return []
            # RFC 7440 sec. 4: a receiver that misses a block acknowledges the last one it got in order. Coming
            # more than a round trip after the window went out, it says the window's first block was lost: resend
            # the window now rather than at the timeout, once per window (further copies wait for the timer).
            if now - self._sent_at <= (self.rtt.srtt or 0.0):
                return []
            self._dup_resent = self._base
            self._resent = True
            out = self._send_window(now)
            self.retransmitted += len(out)
            return out
        if not self._resent:
            self.rtt.sample(now - self._sent_at)  # Karn: only from a window that went out once
        # RFC 7440 sec. 4: an ACK for a block inside the window acknowledges up to that block; the next
        # window starts right after it (resending blocks the receiver dropped after a gap).
        self._base = seq + 1
        self._retry = 0
        self._resent = False
        self._progress_at = now
        if self._base > self.last_block:
            return self._finish(Outcome.SENT)
        return self._send_window(now)

    def tick(self, now: float) -> list[bytes]:
        """Advance the clock; on an expired deadline retransmit the window with backoff, or give up."""
        if self.deadline is None or now < self.deadline:
            return []
        self._retry += 1
        budget = self._budget()
        if now - (self._progress_at if self._progress_at is not None else now) >= budget - 1e-9:
            return self._finish(Outcome.FAILED, f"timeout: no ACK for {budget:g} s ({self._retry - 1} retransmissions) of block {self._base & 0xFFFF}")
        self._resent = True
        out = self._send_window(now)
        self.retransmitted += len(out)
        return out
