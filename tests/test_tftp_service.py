"""TftpService on loopback: real sockets, tftpy's client, a lossy windowed test client, tftp-hpa and atftp."""
from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import random
import resource
import shutil
import socket
from pathlib import Path
from typing import AsyncIterator, Callable

import pytest
import tftpy

from appliance.events import EventBus
from domain.errors import BindError
from domain.progress import FileSent, NbpSent, NodeEvent, ScriptServed, TransferFailed, Via
from netboot.tftp.codec import Data, Error, OptionAck, decode, encode_ack, encode_error, encode_request
from netboot.tftp.server import TftpService, TftpSettings
from helpers import RawPeer, settled

HOST = "127.0.0.1"
MAC = "52:54:00:77:00:01"
IPXE_DIR = Path("/usr/lib/ipxe")


class TftpClientError(Exception):
    """The server answered with an ERROR packet."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"error {code}: {message}")
        self.code = code


class LossyReceiver(asyncio.DatagramProtocol):
    """An RFC 7440 receiver that drops a seeded fraction of what it receives and of the ACKs it sends."""

    def __init__(self, server: tuple[str, int], request: bytes, options: dict[str, str], drop: float, seed: int, timeout: float) -> None:
        self.server = server
        self.request = request
        self.blksize = 512
        self.windowsize = 1
        self.oack: dict[str, str] | None = None
        self.drop = drop
        self.rng = random.Random(seed)
        self.timeout = timeout
        self.tid: tuple[str, int] | None = None
        self.expected = 1  # next block sequence number wanted (unbounded; the wire carries it mod 2**16)
        self.in_window = 0
        self.gap_acked = False
        self.chunks: list[bytes] = []
        self.tries = 0
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self.requested = options

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.sendto(self.request, self.server)
        self._arm()

    def _arm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(self.timeout, self._on_timeout)

    def _on_timeout(self) -> None:
        self.tries += 1
        if self.tries > 40:
            self._fail(TimeoutError("no answer from the server"))
            return
        if self.tid is None:
            self.transport.sendto(self.request, self.server)  # type: ignore[union-attr]
        else:
            self._ack(self.expected - 1, lossy=True)
        self._arm()

    def _ack(self, seq: int, lossy: bool) -> None:
        self.in_window = 0
        if lossy and self.rng.random() < self.drop:
            return
        self.transport.sendto(encode_ack(seq), self.tid)  # type: ignore[union-attr]

    def _fail(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)
        self.close()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.transport is not None:
            self.transport.close()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.tid is None:
            self.tid = addr
        elif addr != self.tid:
            return
        if self.rng.random() < self.drop:
            return  # lost on the way
        pkt = decode(data)
        self.tries = 0
        self._arm()
        if isinstance(pkt, Error):
            self._fail(TftpClientError(pkt.code, pkt.message))
        elif isinstance(pkt, OptionAck):
            if self.oack is None:
                self.oack = pkt.options
                self.blksize = int(pkt.options.get("blksize", 512))
                self.windowsize = int(pkt.options.get("windowsize", 1))
            if self.expected == 1:
                self._ack(0, lossy=True)
        elif isinstance(pkt, Data):
            if pkt.block == self.expected & 0xFFFF:
                self.chunks.append(pkt.payload)
                self.expected += 1
                self.in_window += 1
                self.gap_acked = False
                if len(pkt.payload) < self.blksize:
                    self._ack(self.expected - 1, lossy=False)  # the final ACK is not dropped: no dally needed
                    if not self.done.done():
                        self.done.set_result(b"".join(self.chunks))
                    self.close()
                elif self.in_window >= self.windowsize:
                    self._ack(self.expected - 1, lossy=True)
            elif ((pkt.block - self.expected) & 0xFFFF) < 0x8000:
                # A gap: acknowledge the last block received in order, once (RFC 7440 sec. 4).
                if not self.gap_acked:
                    self.gap_acked = True
                    self._ack(self.expected - 1, lossy=True)
            else:
                self._ack(self.expected - 1, lossy=True)  # an old block: our ACK was lost


async def fetch(port: int, name: str, options: dict[str, str] | None = None, *, mode: str = "octet", drop: float = 0.0,
                seed: int = 0, timeout: float = 0.3, source: str = HOST) -> bytes:
    """Download name from the service on loopback (from source, any 127/8 address); raise TftpClientError on an ERROR."""
    loop = asyncio.get_running_loop()
    opts = options or {}
    _, proto = await loop.create_datagram_endpoint(
        lambda: LossyReceiver((HOST, port), encode_request(name, mode, opts), opts, drop, seed, timeout), local_addr=(source, 0)
    )
    try:
        return await asyncio.wait_for(proto.done, 60)
    finally:
        proto.close()


def make_config(tmp_path: Path, **tftp: object) -> TftpSettings:
    root = tmp_path / "tftp"
    root.mkdir(exist_ok=True)
    values: dict[str, object] = {"port": 0, "root": root, "timeout": 0.1, "retries": 5, "ipxe_dir": IPXE_DIR}
    values.update(tftp)
    return TftpSettings(address=ipaddress.IPv4Address(HOST), **values)  # type: ignore[arg-type]


class Scripts:
    """A stand-in for ipxe.script.ScriptRenderer: one script per MAC, and the calls it got."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def render(self, mac: str) -> object:
        """Render the node's script."""
        from ipxe.script import Script

        self.calls.append(mac)
        return Script(f"#!ipxe\necho {mac}\n", "deploy", "debian12:1")


@pytest.fixture
async def make_service(tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    """Start TftpService instances on 127.0.0.1 with an ephemeral port; close them after the test."""
    started: list[tuple[TftpService, asyncio.Task[None]]] = []

    async def factory(events: EventBus | None = None, mac: str | None = MAC, scripts: object = None, **tftp: object) -> TftpService:
        svc = TftpService(make_config(tmp_path, **tftp), (events or EventBus()).publish, mac_for_ip=lambda ip: mac,
                          scripts=scripts)  # type: ignore[arg-type]
        await svc.start()
        started.append((svc, asyncio.create_task(svc.serve())))
        return svc

    yield factory
    for svc, task in started:
        task.cancel()
        await svc.close()
        assert svc.stats()["transfers_active"] == 0


def write(root: Path, name: str, data: bytes) -> bytes:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def events_of(sub: object) -> list[NodeEvent]:
    out = []
    while (e := sub.get_nowait()) is not None:  # type: ignore[attr-defined]
        out.append(e)
    return out


async def test_bind_error_when_port_is_taken(tmp_path: Path) -> None:
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind((HOST, 0))
    try:
        svc = TftpService(make_config(tmp_path, port=holder.getsockname()[1]), [].append, mac_for_ip=lambda ip: None)
        with pytest.raises(BindError, match="tftp: cannot bind UDP 127.0.0.1:.*in use"):
            await svc.start()
        await svc.close()
    finally:
        holder.close()


async def test_tftpy_client_in_a_thread(make_service, tmp_path: Path) -> None:
    bus = EventBus()
    sub = bus.subscribe()
    svc = await make_service(events=bus)
    data = write(tmp_path / "tftp", "images/blob.bin", os.urandom(100_000))
    out = tmp_path / "out.bin"
    client = tftpy.TftpClient(HOST, svc.address[1], options={"blksize": 1400, "tsize": 0})
    await asyncio.to_thread(client.download, "/images/blob.bin", str(out), timeout=2)
    assert out.read_bytes() == data
    await settled(svc)
    assert [(type(e), e.path) for e in events_of(sub)] == [(FileSent, "images/blob.bin")]  # type: ignore[union-attr]
    assert (await settled(svc))["transfers_sent"] == 1


@pytest.mark.parametrize("windowsize", ["1", "8"])
async def test_lossy_client_gets_the_file_through_retransmission(make_service, tmp_path: Path, windowsize: str) -> None:
    svc = await make_service(timeout=0.05, retries=10)
    data = write(tmp_path / "tftp", "lossy.bin", os.urandom(20_000 * int(windowsize)))
    got = await fetch(svc.address[1], "lossy.bin", {"blksize": "512", "windowsize": windowsize}, drop=0.1, seed=7, timeout=0.15)
    assert got == data
    stats = await settled(svc)
    assert stats["retransmitted"] > 0 and stats["transfers_sent"] == 1 and stats["transfers_failed"] == 0


async def test_windowsize_and_blksize_are_capped_by_config(make_service, tmp_path: Path) -> None:
    svc = await make_service(max_blksize=1024, max_windowsize=4)
    data = write(tmp_path / "tftp", "f.bin", os.urandom(10_000))
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_datagram_endpoint(
        lambda: LossyReceiver((HOST, svc.address[1]), encode_request("f.bin", "octet", {"blksize": "8192", "windowsize": "64", "tsize": "0"}), {}, 0.0, 0, 0.3),
        local_addr=(HOST, 0),
    )
    assert await asyncio.wait_for(proto.done, 30) == data
    assert proto.oack == {"blksize": "1024", "windowsize": "4", "tsize": "10000"}


async def test_path_traversal_is_refused(make_service, tmp_path: Path) -> None:
    svc = await make_service()
    root = tmp_path / "tftp"
    (tmp_path / "secret").write_bytes(b"top secret")
    write(root, "ok.txt", b"fine")
    (root / "escape").symlink_to(tmp_path / "secret")
    (root / "dir").symlink_to(tmp_path)
    port = svc.address[1]
    for name in ("../secret", "/../secret", "a/../../secret", "..\\secret", "escape", "dir/secret"):
        with pytest.raises(TftpClientError) as err:
            await fetch(port, name)
        assert err.value.code == 2, name
    assert await fetch(port, "/ok.txt") == b"fine"  # a leading '/' is allowed
    assert await fetch(port, "./ok.txt") == b"fine"
    assert svc.stats()["access_denied"] == 6


async def test_missing_file_is_error_1_and_a_failed_event(make_service) -> None:
    bus = EventBus()
    sub = bus.subscribe()
    svc = await make_service(events=bus)
    with pytest.raises(TftpClientError) as err:
        await fetch(svc.address[1], "nope.bin")
    assert err.value.code == 1
    assert [type(e) for e in events_of(sub)] == [TransferFailed]


async def test_write_request_is_refused_with_error_2(make_service) -> None:
    svc = await make_service()
    peer = RawPeer()
    try:
        await peer.send(encode_request("upload.bin", write=True), svc.address)
        pkt, _ = await peer.recv()
        assert isinstance(pkt, Error) and pkt.code == 2
    finally:
        peer.close()
    assert svc.stats()["write_refused"] == 1


async def test_malformed_datagrams_are_dropped_counted_and_service_keeps_serving(make_service, tmp_path: Path) -> None:
    svc = await make_service()
    data = write(tmp_path / "tftp", "a.bin", b"A" * 3000)
    peer = RawPeer()
    try:
        for junk in (b"", b"\x00", b"\x00\x01no-terminator", b"\x00\x09xyz", b"\xff" * 600):
            await peer.send(junk, svc.address)
        assert await fetch(svc.address[1], "a.bin") == data
    finally:
        peer.close()
    stats = await settled(svc)
    assert stats["dropped_malformed"] == 5 and stats["transfers_sent"] == 1


async def test_wrong_tid_is_refused_by_the_kernel_and_does_not_disturb_the_transfer(make_service, tmp_path: Path) -> None:
    svc = await make_service(timeout=2.0)
    data = write(tmp_path / "tftp", "b.bin", os.urandom(1200))
    client, intruder = RawPeer(), RawPeer()
    try:
        await client.send(encode_request("b.bin"), svc.address)
        first, tid = await client.recv()
        assert first == Data(1, data[:512])
        assert tid[1] != svc.address[1]  # the transfer has its own port (RFC 1350 sec. 4)
        # The transfer socket is connected to the client: another source gets ICMP port unreachable from the
        # kernel (as from tftpd-hpa), not RFC 1350 sec. 4's ERROR 5; the transfer is not disturbed either way.
        intruder.sock.connect(tid)  # a connected socket is told of the ICMP error
        await intruder.send(encode_ack(1), tid)
        with pytest.raises(ConnectionRefusedError):
            await intruder.recv()
        got = [first.payload]
        block = 1
        while len(got[-1]) == 512:
            await client.send(encode_ack(block), tid)
            pkt, _ = await client.recv()
            assert isinstance(pkt, Data) and pkt.block == block + 1
            got.append(pkt.payload)
            block += 1
        await client.send(encode_ack(block), tid)
        assert b"".join(got) == data
    finally:
        client.close()
        intruder.close()
    for _ in range(100):
        if svc.stats()["transfers_sent"]:
            break
        await asyncio.sleep(0.01)
    assert svc.stats()["dropped_wrong_tid"] == 0 and svc.stats()["transfers_sent"] == 1


async def test_ovmf_tsize_probe_aborted_with_error_8_is_silent(make_service, tmp_path: Path) -> None:
    bus = EventBus()
    sub = bus.subscribe()
    svc = await make_service(events=bus, timeout=2.0)
    data = write(tmp_path / "tftp", "snponly.efi", os.urandom(5000))
    peer = RawPeer()
    try:
        await peer.send(encode_request("snponly.efi", "octet", {"tsize": "0", "blksize": "1468", "windowsize": "4"}), svc.address)
        oack, tid = await peer.recv()
        assert oack == OptionAck({"tsize": "5000", "blksize": "1468", "windowsize": "4"})
        await peer.send(encode_error(8, "User aborted the transfer"), tid)
        with pytest.raises(asyncio.TimeoutError):
            await peer.recv(timeout=0.3)  # nothing answers the ERROR
    finally:
        peer.close()
    assert await fetch(svc.address[1], "snponly.efi", {"blksize": "1468", "windowsize": "4"}) == data
    stats = await settled(svc)
    assert stats["transfers_aborted"] == 1 and stats["transfers_failed"] == 0
    # snponly.efi is an NBP name: served from the root, reported as NbpSent once; the probe is not a failure.
    await settled(svc)
    assert [type(e) for e in events_of(sub)] == [NbpSent]


async def test_unanswered_transfer_gives_up_after_retries(make_service, tmp_path: Path) -> None:
    bus = EventBus()
    sub = bus.subscribe()
    svc = await make_service(events=bus, timeout=0.02, retries=2)
    write(tmp_path / "tftp", "c.bin", b"x" * 100)
    peer = RawPeer()
    try:
        await peer.send(encode_request("c.bin"), svc.address)
        received = [await peer.recv() for _ in range(3)]  # the first DATA and two retransmissions
        assert all(p == Data(1, b"x" * 100) for p, _ in received)
        failed = await asyncio.wait_for(next_event(sub, TransferFailed), 10)
    finally:
        peer.close()
    assert isinstance(failed, TransferFailed) and "timeout" in failed.reason
    assert svc.stats()["transfers_failed"] == 1 and svc.stats()["transfers_active"] == 0


async def next_event(sub: object, kind: type) -> NodeEvent:
    while not isinstance(event := await sub.get(), kind):  # type: ignore[attr-defined]
        pass
    return event


async def test_one_host_cannot_fill_the_transfer_table(make_service, tmp_path: Path) -> None:
    """Defect of 2026-12-05: 6,000 RRQs from distinct ports of one host filled the global table for ~30 s."""
    svc = await make_service(max_sessions=64, max_sessions_per_host=8, timeout=0.05, first_retries=2)
    data = write(tmp_path / "tftp", "snponly.efi", os.urandom(4000))
    flood = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(200)]
    try:
        for s in flood:  # never ACKs anything
            s.bind(("127.0.0.1", 0))
            s.sendto(encode_request("snponly.efi"), svc.address)
        await asyncio.sleep(0.1)
        stats = svc.stats()
        assert stats["transfers_active"] == 8 and stats["dropped_host_busy"] == 192
        # another node is served at once, while the flood's sessions are still open
        assert await fetch(svc.address[1], "snponly.efi", source="127.0.0.2") == data
        # abandoned sessions end after first_retries retransmissions (0.05 + 0.1 + 0.2 s here), not 39 s
        for _ in range(100):
            if svc.stats()["transfers_active"] == 0:
                break
            await asyncio.sleep(0.05)
        assert svc.stats()["transfers_active"] == 0
    finally:
        for s in flood:
            s.close()


async def test_a_client_whose_first_three_acks_are_lost_still_gets_its_file(make_service, tmp_path: Path) -> None:
    """Issue 13 item 2: under 10 % loss, 3 lost exchanges of the first block in a row ended live transfers.

    The first block's timer starts at a quarter of the timeout before any round trip is known, so the
    first_retries budget (0.2 + 0.4 + 0.8 = 1.4 s here) holds 5 copies of it, not 3. The client answers only
    the 4th copy (its first 3 ACKs lost) and never retransmits by itself, as tftp-hpa's client within 5 s.
    """
    svc = await make_service(timeout=0.2, first_retries=2, retries=5)
    data = write(tmp_path / "tftp", "nbp.efi", os.urandom(3 * 512 + 100))
    peer = RawPeer()
    try:
        await peer.send(encode_request("nbp.efi"), svc.address)
        for _ in range(3):  # copies of DATA 1 whose ACKs the network lost
            pkt, tid = await peer.recv(timeout=2.0)
            assert pkt == Data(1, data[:512])
        got, block = b"", 0
        while True:
            pkt, tid = await peer.recv(timeout=2.0)
            assert isinstance(pkt, Data), pkt
            if pkt.block == block + 1:
                block += 1
                got += pkt.payload
            await peer.send(encode_ack(pkt.block), tid)
            if block and pkt.block == block and len(pkt.payload) < 512:
                break
    finally:
        peer.close()
    assert got == data
    stats = await settled(svc)
    assert stats["transfers_sent"] == 1 and stats["transfers_failed"] == 0


async def test_duplicate_rrq_does_not_start_a_second_transfer(make_service, tmp_path: Path) -> None:
    svc = await make_service(timeout=2.0)
    write(tmp_path / "tftp", "d.bin", b"d" * 10)
    peer = RawPeer()
    try:
        await peer.send(encode_request("d.bin"), svc.address)
        await peer.send(encode_request("d.bin"), svc.address)
        pkt, tid = await peer.recv()
        assert pkt == Data(1, b"d" * 10)
        with pytest.raises(asyncio.TimeoutError):
            await peer.recv(timeout=0.3)
        await peer.send(encode_ack(1), tid)
    finally:
        peer.close()
    assert svc.stats()["duplicate_requests"] == 1 and svc.stats()["requests"] == 2


async def test_new_request_from_the_same_port_supersedes_the_old_transfer(make_service, tmp_path: Path) -> None:
    svc = await make_service(timeout=2.0)
    write(tmp_path / "tftp", "s.bin", b"s" * 100)
    peer = RawPeer()
    try:
        await peer.send(encode_request("s.bin", "octet", {"tsize": "0"}), svc.address)
        oack, old_tid = await peer.recv()
        assert oack == OptionAck({"tsize": "100"})
        await peer.send(encode_request("s.bin"), svc.address)  # no ERROR 8 in between
        data, new_tid = await peer.recv()
        assert data == Data(1, b"s" * 100) and new_tid != old_tid
        await peer.send(encode_ack(1), new_tid)
    finally:
        peer.close()
    for _ in range(100):
        if svc.stats()["transfers_sent"]:
            break
        await asyncio.sleep(0.01)
    assert svc.stats()["transfers_sent"] == 1 and svc.stats()["transfers_active"] == 0


async def test_max_sessions_drops_extra_requests(make_service, tmp_path: Path) -> None:
    svc = await make_service(max_sessions=1, timeout=2.0)
    write(tmp_path / "tftp", "e.bin", b"e" * 2000)
    first, second = RawPeer(), RawPeer()
    try:
        await first.send(encode_request("e.bin"), svc.address)
        await first.recv()
        await second.send(encode_request("e.bin"), svc.address)
        with pytest.raises(asyncio.TimeoutError):
            await second.recv(timeout=0.3)
    finally:
        first.close()
        second.close()
    assert svc.stats()["dropped_busy"] == 1


async def test_netascii_mode_converts_line_ends(make_service, tmp_path: Path) -> None:
    svc = await make_service()
    write(tmp_path / "tftp", "cfg.txt", b"line1\nline2\r\n")
    assert await fetch(svc.address[1], "cfg.txt", mode="netascii") == b"line1\r\nline2\r\0\r\n"
    assert await fetch(svc.address[1], "cfg.txt") == b"line1\nline2\r\n"


async def test_cache_is_invalidated_when_the_file_changes(make_service, tmp_path: Path) -> None:
    svc = await make_service()
    path = tmp_path / "tftp" / "v.txt"
    path.write_bytes(b"version 1")
    assert await fetch(svc.address[1], "v.txt") == b"version 1"
    assert await fetch(svc.address[1], "v.txt") == b"version 1"
    path.write_bytes(b"version 2")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000_000))
    assert await fetch(svc.address[1], "v.txt") == b"version 2"
    stats = await settled(svc)
    assert (stats["cache_hits"], stats["cache_misses"]) == (1, 2)


async def test_per_mac_script_comes_first_and_is_reported_as_served(make_service, tmp_path: Path) -> None:
    bus = EventBus()
    scripts = Scripts()
    svc = await make_service(events=bus, scripts=scripts)
    write(tmp_path / "tftp", "boot.ipxe", b"shadowed")
    write(tmp_path / "tftp", "plain.txt", b"from root")
    assert await fetch(svc.address[1], "/boot.ipxe") == f"#!ipxe\necho {MAC}\n".encode()
    assert await fetch(svc.address[1], "plain.txt") == b"from root"
    assert scripts.calls == [MAC]  # only boot.ipxe is rendered
    served = bus.last(MAC)[0]
    assert isinstance(served, ScriptServed) and (served.profile, served.via, served.env) == ("deploy", Via.TFTP, "debian12:1")


async def test_no_events_without_a_mac(make_service, tmp_path: Path) -> None:
    bus = EventBus()
    svc = await make_service(events=bus, mac=None)
    write(tmp_path / "tftp", "n.txt", b"n")
    assert await fetch(svc.address[1], "n.txt") == b"n"
    assert bus.published == 0


@pytest.mark.skipif(not (IPXE_DIR / "undionly.kpxe").is_file(), reason="Debian package ipxe not installed")
async def test_nbps_come_from_ipxe_dir_only_by_their_configured_names(make_service) -> None:
    bus = EventBus()
    sub = bus.subscribe()
    svc = await make_service(events=bus)
    expected = (IPXE_DIR / "undionly.kpxe").read_bytes()
    got = await fetch(svc.address[1], "undionly.kpxe", {"blksize": "1432", "tsize": "0"})  # what iPXE asks
    assert hashlib.sha256(got).digest() == hashlib.sha256(expected).digest()
    await settled(svc)
    assert [type(e) for e in events_of(sub)] == [NbpSent]
    with pytest.raises(TftpClientError) as err:
        await fetch(svc.address[1], "ipxe.lkrn")  # in ipxe_dir but not an NBP name
    assert err.value.code == 1


async def test_200_concurrent_1mb_fetches_complete_intact(make_service, tmp_path: Path) -> None:
    svc = await make_service(timeout=0.5, max_sessions_per_host=256)  # 200 "nodes", all on 127.0.0.1
    root = tmp_path / "tftp"
    files = [write(root, f"node-{i}.img", os.urandom(1 << 20)) for i in range(4)]
    digests = [hashlib.sha256(f).digest() for f in files]
    results = await asyncio.gather(
        *(fetch(svc.address[1], f"node-{i % 4}.img", {"blksize": "1468", "windowsize": "16"}, timeout=2.0) for i in range(200))
    )
    assert [hashlib.sha256(r).digest() for r in results] == [digests[i % 4] for i in range(200)]
    stats = await settled(svc)
    assert stats["transfers_sent"] == 200 and stats["cache_misses"] == 4


async def run_client(*argv: str, cwd: Path) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, f"{argv}: {out.decode(errors='replace')}"


@pytest.mark.skipif(shutil.which("tftp") is None, reason="tftp-hpa not installed")
async def test_real_client_tftp_hpa(make_service, tmp_path: Path) -> None:
    svc = await make_service()
    data = write(tmp_path / "tftp", "hpa.bin", os.urandom(300_000))
    work = tmp_path / "hpa"
    work.mkdir()
    await run_client("tftp", HOST, str(svc.address[1]), "-m", "binary", "-c", "get", "hpa.bin", cwd=work)
    assert (work / "hpa.bin").read_bytes() == data


@pytest.mark.skipif(shutil.which("atftp") is None, reason="atftp not installed")
async def test_real_client_atftp_with_blksize_and_windowsize(make_service, tmp_path: Path) -> None:
    bus = EventBus()
    sub = bus.subscribe()
    svc = await make_service(events=bus)
    data = write(tmp_path / "tftp", "atftp.bin", os.urandom(500_000))
    out = tmp_path / "atftp.out"
    # atftp 0.8 implements RFC 7440 windowsize.
    await run_client(
        "atftp", "--get", "-r", "atftp.bin", "-l", str(out), "--option", "blksize 1428", "--option", "windowsize 8",
        HOST, str(svc.address[1]), cwd=tmp_path,
    )
    assert out.read_bytes() == data
    await settled(svc)
    assert [type(e) for e in events_of(sub)] == [FileSent]
    stats = await settled(svc)
    assert stats["transfers_windowed"] == 1 and stats["transfers_large_blocks"] == 1  # windowsize 8, blksize 1428


async def test_start_raises_the_open_files_soft_limit_to_the_hard_limit(make_service) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip("needs a finite hard limit above 256")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        await make_service()
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_service_keeps_the_service_contract(tmp_path: Path) -> None:
    svc = TftpService(make_config(tmp_path), [].append, mac_for_ip=lambda ip: None)
    assert svc.name == "tftp"
    stats = svc.stats()
    for key in ("received", "sent", "dropped_malformed", "transfers_active"):
        assert stats[key] == 0
