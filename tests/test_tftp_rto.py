"""Adaptive retransmission (RFC 6298 style estimator, RFC 7440 sec. 4, RFC 1350): pure, with a fake clock."""
from __future__ import annotations

import pytest

from netboot.tftp.codec import Ack
from netboot.tftp.rto import RtoEstimator
from netboot.tftp.session import Outcome, ReadSession, SessionLimits, give_up_after

ADAPTIVE = SessionLimits(max_blksize=1468, max_windowsize=8, timeout=1.0, retries=3, rto_floor=0.02)


class FakeClock:
    """Monotonic seconds that move only when told."""

    def __init__(self) -> None:
        self.now = 0.0

    def advance(self, seconds: float) -> float:
        """Move forward and return the new time."""
        self.now += seconds
        return self.now


def blocks(datagrams: list[bytes]) -> list[int]:
    """Block numbers of DATA datagrams."""
    assert all(d[:2] == b"\x00\x03" for d in datagrams), datagrams
    return [int.from_bytes(d[2:4], "big") for d in datagrams]


def test_estimator_follows_rfc6298() -> None:
    est = RtoEstimator(1.0, floor=0.001)
    assert est.rto == 1.0 and est.srtt is None  # RFC 6298 2.1: the initial value before any sample
    est.sample(0.1)
    assert est.srtt == pytest.approx(0.1) and est.rttvar == pytest.approx(0.05)
    assert est.rto == pytest.approx(0.1 + 4 * 0.05)  # 2.2
    est.sample(0.2)
    assert est.rttvar == pytest.approx(0.75 * 0.05 + 0.25 * 0.1)  # 2.3: RTTVAR from the old SRTT
    assert est.srtt == pytest.approx(0.875 * 0.1 + 0.125 * 0.2)


def test_estimator_floor_and_cap() -> None:
    est = RtoEstimator(1.0, floor=0.02)
    for _ in range(50):
        est.sample(0.0001)
    assert est.rto == 0.02  # a LAN round trip: the floor, not RFC 6298's 1 s minimum
    est.sample(30.0)
    assert est.rto == 1.0  # never slower than the fixed timer it replaces


def test_lost_block_is_resent_after_the_measured_timeout_not_one_second() -> None:
    clock = FakeClock()
    s = ReadSession(bytes(512 * 20), {}, ADAPTIVE)
    assert blocks(s.start(clock.now)) == [1]
    for block in range(1, 10):  # nine round trips of 1 ms
        assert blocks(s.on_ack(block, clock.advance(0.001))) == [block + 1]
    assert s.rtt.samples == 9 and s.rtt.rto == 0.02  # floored
    assert s.deadline == pytest.approx(clock.now + 0.02)
    # block 10 is lost: the timer fires at the adaptive timeout and resends it
    assert s.tick(clock.advance(0.019)) == []
    assert blocks(s.tick(clock.advance(0.001))) == [10]
    assert s.retransmitted == 1
    assert s.deadline == pytest.approx(clock.now + 0.04)  # RFC 6298 5.5: the wait doubles per retry


def test_karn_no_sample_from_a_retransmitted_block() -> None:
    clock = FakeClock()
    s = ReadSession(bytes(512 * 5), {}, ADAPTIVE)
    s.start(clock.now)
    s.tick(clock.advance(1.0))  # block 1 resent after the initial 1 s
    s.on_ack(1, clock.advance(0.001))
    assert s.rtt.samples == 0  # ambiguous: which copy was acknowledged?
    s.on_ack(2, clock.advance(0.001))
    assert s.rtt.samples == 1


def test_negotiated_timeout_is_used_as_is() -> None:
    clock = FakeClock()
    s = ReadSession(bytes(512 * 5), {"timeout": "3"}, ADAPTIVE)  # RFC 2349 sec. 2
    s.start(clock.now)
    s.on_ack(0, clock.advance(0.001))  # the OACK
    s.on_ack(1, clock.advance(0.001))
    assert s.deadline == pytest.approx(clock.now + 3.0)


def test_give_up_keeps_the_fixed_timer_budget() -> None:
    clock = FakeClock()
    s = ReadSession(bytes(512 * 50), {}, ADAPTIVE)
    s.start(clock.now)
    for block in range(1, 5):
        s.on_ack(block, clock.advance(0.001))
    progress = clock.now
    sent = 0
    while not s.finished:
        sent += len(s.tick(clock.advance(0.005)))
    # no ACK for 1 + 2 + 4 + 8 s (retries=3 of a 1 s timer), however short the adaptive timeout was
    assert s.outcome is Outcome.FAILED and clock.now - progress == pytest.approx(give_up_after(1.0, 3), abs=0.01)
    assert sent == s.retransmitted and sent > 3


def test_lock_step_duplicate_ack_never_resends() -> None:
    clock = FakeClock()
    s = ReadSession(bytes(512 * 5), {}, ADAPTIVE)
    s.start(clock.now)
    assert blocks(s.on_ack(1, clock.advance(0.001))) == [2]
    # however late, a duplicate ACK 1 resends nothing in lock-step (RFC 1350's Sorcerer's Apprentice, RFC 1123 4.2.3.1)
    assert s.on_ack(1, clock.advance(0.5)) == []
    assert s.receive(Ack(1), clock.advance(0.5)) == []
    assert s.duplicate_acks == 2 and s.retransmitted == 0


def test_windowed_duplicate_ack_resends_the_window_once() -> None:
    clock = FakeClock()
    s = ReadSession(bytes(100 * 40), {"blksize": "100", "windowsize": "4"}, ADAPTIVE)
    s.start(clock.now)
    assert blocks(s.on_ack(0, clock.advance(0.001))) == [1, 2, 3, 4]
    assert blocks(s.on_ack(4, clock.advance(0.001))) == [5, 6, 7, 8]
    # an ACK 4 again right away (the client saw block 3 late): within a round trip, nothing is resent
    assert s.on_ack(4, clock.now) == []
    # block 5 was lost; the client acknowledges 4 again (RFC 7440 sec. 4) after more than a round trip: resend now
    assert blocks(s.on_ack(4, clock.advance(0.005))) == [5, 6, 7, 8]
    # further duplicates wait for the timer: one resend per window
    assert s.on_ack(4, clock.advance(0.005)) == []
    assert s.retransmitted == 4 and s.duplicate_acks == 3
    assert blocks(s.on_ack(8, clock.advance(0.001))) == [9, 10, 11, 12]
