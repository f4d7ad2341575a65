"""ReadSession as a sans-io state machine: negotiation, windows, duplicate ACKs, timeouts and backoff."""
from __future__ import annotations

from netboot.tftp.codec import Ack, Data, Error, OptionAck, decode
from netboot.tftp.session import Outcome, ReadSession, SessionLimits, negotiate

LIMITS = SessionLimits(max_blksize=1468, max_windowsize=8, timeout=1.0, retries=3, rto_floor=1.0)  # a fixed 1 s timer


def blocks(datagrams: list[bytes]) -> list[int]:
    """Block numbers of DATA datagrams (fails on anything else)."""
    out = []
    for d in datagrams:
        pkt = decode(d)
        assert isinstance(pkt, Data), pkt
        out.append(pkt.block)
    return out


def payload(n: int) -> bytes:
    return bytes(i % 251 for i in range(n))


def test_negotiation_caps_and_ignores() -> None:
    got = negotiate({"blksize": "65464", "windowsize": "100", "tsize": "0", "timeout": "3", "multicast": ""}, 1234, LIMITS)
    assert (got.blksize, got.windowsize, got.timeout) == (1468, 8, 3.0)
    assert got.oack == {"blksize": "1468", "windowsize": "8", "tsize": "1234", "timeout": "3"}
    # Out-of-range or garbage values are ignored (RFC 2347: the server may ignore any option).
    bad = negotiate({"blksize": "4", "windowsize": "0", "timeout": "256", "tsize": "x"}, 10, LIMITS)
    assert (bad.blksize, bad.windowsize, bad.timeout, bad.oack) == (512, 1, 1.0, {})


def test_plain_rfc1350_transfer_without_options() -> None:
    data = payload(1024)  # a multiple of 512: ends with an empty block (RFC 1350 sec. 6)
    s = ReadSession(data, {}, LIMITS)
    out = s.start(0.0)
    assert [decode(d) for d in out] == [Data(1, data[:512])]
    assert [decode(d) for d in s.receive(Ack(1), 0.1)] == [Data(2, data[512:])]
    assert [decode(d) for d in s.receive(Ack(2), 0.2)] == [Data(3, b"")]
    assert s.receive(Ack(3), 0.3) == []
    assert s.outcome is Outcome.SENT and s.deadline is None


def test_oack_then_window_of_data() -> None:
    data = payload(100 * 10 + 5)
    s = ReadSession(data, {"blksize": "100", "windowsize": "4", "tsize": "0"}, LIMITS)
    (oack,) = s.start(0.0)
    assert decode(oack) == OptionAck({"blksize": "100", "windowsize": "4", "tsize": "1005"})
    assert blocks(s.receive(Ack(0), 0.1)) == [1, 2, 3, 4]
    assert blocks(s.receive(Ack(4), 0.2)) == [5, 6, 7, 8]
    assert blocks(s.receive(Ack(8), 0.3)) == [9, 10, 11]
    assert not s.finished
    assert s.receive(Ack(11), 0.4) == []
    assert s.outcome is Outcome.SENT


def test_ack_inside_window_slides_window_from_there() -> None:
    # RFC 7440 sec. 4: the receiver lost block 6 and acknowledged 5; the next window starts at 6.
    s = ReadSession(payload(100 * 20), {"blksize": "100", "windowsize": "4"}, LIMITS)
    s.start(0.0)
    s.receive(Ack(0), 0.0)
    assert blocks(s.receive(Ack(4), 0.0)) == [5, 6, 7, 8]
    assert blocks(s.receive(Ack(5), 0.0)) == [6, 7, 8, 9]
    # The same ACK repeated (the receiver acknowledges a gap more than once): nothing is resent.
    assert s.receive(Ack(5), 0.0) == []
    assert blocks(s.receive(Ack(9), 0.0)) == [10, 11, 12, 13]


def test_duplicate_ack_never_resends_sorcerers_apprentice() -> None:
    s = ReadSession(payload(2000), {}, LIMITS)
    s.start(0.0)
    assert blocks(s.receive(Ack(1), 0.1)) == [2]
    # A delayed duplicate of ACK 1 must not make block 2 go out twice (RFC 1350's Sorcerer's Apprentice).
    assert s.receive(Ack(1), 0.2) == []
    assert s.receive(Ack(0), 0.2) == []
    assert s.duplicate_acks == 2
    assert blocks(s.receive(Ack(2), 0.3)) == [3]


def test_timeout_retransmits_window_with_backoff_then_gives_up() -> None:
    s = ReadSession(payload(1000), {"blksize": "100", "windowsize": "3"}, LIMITS)
    s.start(0.0)
    assert blocks(s.receive(Ack(0), 0.0)) == [1, 2, 3]
    assert s.deadline == 1.0
    assert s.tick(0.5) == []  # not yet
    assert blocks(s.tick(1.0)) == [1, 2, 3]
    assert s.deadline == 1.0 + 2.0  # backoff doubles the wait
    assert blocks(s.tick(3.0)) == [1, 2, 3]
    assert s.deadline == 3.0 + 4.0
    assert blocks(s.tick(7.0)) == [1, 2, 3]
    assert s.retransmitted == 9
    assert s.tick(15.0) == []  # a fourth timeout exceeds retries=3
    assert s.outcome is Outcome.FAILED and "timeout" in s.reason


def test_progress_resets_backoff() -> None:
    s = ReadSession(payload(2000), {}, LIMITS)
    s.start(0.0)
    s.tick(1.0)
    s.tick(3.0)
    assert blocks(s.receive(Ack(1), 3.5)) == [2]
    assert s.deadline == 4.5


def test_oack_is_retransmitted_when_ack0_is_lost() -> None:
    s = ReadSession(payload(10), {"tsize": "0"}, LIMITS)
    (first,) = s.start(0.0)
    assert s.tick(1.0) == [first]


def test_negotiated_timeout_drives_retransmission() -> None:
    s = ReadSession(payload(10), {"timeout": "5"}, LIMITS)
    s.start(0.0)
    assert s.deadline == 5.0
    assert s.tick(4.9) == []


def test_error_after_oack_ends_silently() -> None:
    # OVMF's size probe: RRQ with tsize, OACK, then ERROR 8 from the client.
    s = ReadSession(payload(5000), {"tsize": "0", "blksize": "1468", "windowsize": "4"}, LIMITS)
    s.start(0.0)
    assert s.receive(Error(8, "User aborted"), 0.1) == []
    assert s.outcome is Outcome.ABORTED and s.deadline is None
    assert s.tick(100.0) == []


def test_error_during_data_fails_the_transfer() -> None:
    s = ReadSession(payload(5000), {}, LIMITS)
    s.start(0.0)
    assert s.receive(Error(0, "disk full"), 0.1) == []
    assert s.outcome is Outcome.FAILED and "disk full" in s.reason


def test_block_numbers_roll_over_past_65535() -> None:
    size = 8 * 65540
    s = ReadSession(bytes(size), {"blksize": "8", "windowsize": "8"}, SessionLimits(max_blksize=8, max_windowsize=8))
    s.start(0.0)
    out = s.receive(Ack(0), 0.0)
    while True:
        nums = blocks(out)
        if not out or 65535 in nums:
            break
        out = s.receive(Ack(nums[-1]), 0.0)
    assert nums == [65529, 65530, 65531, 65532, 65533, 65534, 65535, 0]
    # ACK 0 now means the block after 65535, not the OACK.
    assert blocks(s.receive(Ack(0), 0.0)) == [1, 2, 3, 4, 5]
    assert s.receive(Ack(5), 0.0) == []
    assert s.outcome is Outcome.SENT
    assert s.last_block == 65541


def test_unexpected_packets_are_ignored() -> None:
    s = ReadSession(payload(600), {}, LIMITS)
    s.start(0.0)
    assert s.receive(Data(1, b"x"), 0.1) == []
    assert s.receive(Ack(40000), 0.1) == []
    assert not s.finished


def run_lock_step(session: ReadSession) -> list[bytes]:
    """Every datagram a lock-step client that loses nothing is sent, in order."""
    now = 0.0
    out = session.start(now)
    sent = list(out)
    while session.outcome is None:
        now += 0.001
        pkt = decode(out[-1])
        out = session.on_ack(pkt.block if isinstance(pkt, Data) else 0, now)
        sent += out
    return sent


def test_shared_datagrams_are_encoded_once_per_block_size_and_reused() -> None:
    data = payload(70000 * 8 + 3)  # past block 65535 at blksize 8: the shared datagrams carry rolled-over numbers
    shared: dict[int, list[bytes | None]] = {}
    first = run_lock_step(ReadSession(data, {"blksize": "8"}, LIMITS, shared))
    again = run_lock_step(ReadSession(data, {"blksize": "8"}, LIMITS, shared))
    plain = run_lock_step(ReadSession(data, {"blksize": "8"}, LIMITS))
    assert first == again == plain and list(shared) == [8]
    assert all(a is b for a, b in zip(first[1:], again[1:]))  # the same objects: encoded once (not the OACK)
    assert blocks(first[1:])[65534:65537] == [65535, 0, 1]
    run_lock_step(ReadSession(data[:1000], {}, LIMITS, {}))  # another content, its own dict: untouched here
    assert sorted(shared) == [8]
    small = run_lock_step(ReadSession(data, {}, LIMITS, shared))  # the file at 512: a list of its own
    assert sorted(shared) == [8, 512] and b"".join(decode(d).payload for d in small) == data  # type: ignore[union-attr]
