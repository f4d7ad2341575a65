"""The TFTP data plane with real sockets on loopback, in the service's thread and in worker processes: duplicate ACKs
(lock-step and windowed), closing mid-transfer, a worker killed mid-transfer, no descriptor left behind; the memfds
that carry files to the workers and the messages to and from them."""
from __future__ import annotations

import asyncio
import ipaddress
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import AsyncIterator, Callable

import pytest

from appliance.events import EventBus
from domain.errors import MalformedPacket
from domain.progress import TransferFailed
from netboot.tftp.codec import Data, OptionAck, encode_ack, encode_request
from netboot.tftp.server import TftpService, TftpSettings
from netboot.tftp import handoff
from netboot.tftp.datapath import TransferResult, open_transfer_socket
from netboot.tftp.handoff import AddTransfer, RemoveTransfer, TransferDone
from netboot.tftp.session import Outcome, SessionLimits
from netboot.tftp.sharedfiles import MappedFiles, SharedFiles
from helpers import RawPeer, settled

HOST = "127.0.0.1"
SLOW = {"timeout": 5.0, "rto_floor": 5.0}  # the retransmission timer never fires within these tests


@pytest.fixture(params=[{"data_workers": 0}, {"data_workers": 2}, {"data_workers": 2, "busy_poll": 0.0001}],
                ids=["thread", "processes", "processes-busy-poll"])
async def service(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    """Start one TftpService on loopback with the given settings (the data plane in a thread, or in 2 worker
    processes, busy-polling or not); close it after the test."""
    made: list[TftpService] = []

    async def factory(**settings: object) -> TftpService:
        (tmp_path / "tftp").mkdir(exist_ok=True)
        settings = request.param | settings
        svc = TftpService(TftpSettings(address=ipaddress.IPv4Address(HOST), root=tmp_path / "tftp", port=0, **settings),  # type: ignore[arg-type]
                          EventBus().publish, mac_for_ip=lambda ip: None)
        await svc.start()
        made.append(svc)
        return svc

    yield factory
    for svc in made:
        await svc.close()


async def test_lock_step_duplicate_ack_is_never_answered(service, tmp_path: Path) -> None:
    svc = await service(**SLOW)
    data = os.urandom(512 * 2 + 100)
    (tmp_path / "tftp" / "f.bin").write_bytes(data)
    peer = RawPeer()
    try:
        await peer.send(encode_request("f.bin"), svc.address)
        first, tid = await peer.recv()
        assert first == Data(1, data[:512])
        await peer.send(encode_ack(1), tid)
        assert (await peer.recv())[0] == Data(2, data[512:1024])
        # Delayed duplicates of ACK 1: answering them would double every later block (RFC 1350's Sorcerer's
        # Apprentice, RFC 1123 4.2.3.1); nothing comes back.
        await peer.send(encode_ack(1), tid)
        await peer.send(encode_ack(1), tid)
        with pytest.raises(asyncio.TimeoutError):
            await peer.recv(timeout=0.3)
        await peer.send(encode_ack(2), tid)
        assert (await peer.recv())[0] == Data(3, data[1024:])
        await peer.send(encode_ack(3), tid)
    finally:
        peer.close()
    stats = await settled(svc)
    assert stats["duplicate_acks"] == 2 and stats["retransmitted"] == 0 and stats["transfers_sent"] == 1


async def test_windowed_duplicate_ack_resends_the_window_once(service, tmp_path: Path) -> None:
    svc = await service(**SLOW)
    data = os.urandom(512 * 9 + 100)
    (tmp_path / "tftp" / "w.bin").write_bytes(data)
    peer = RawPeer()

    async def window() -> list[int]:
        got = []
        for _ in range(4):
            pkt, _ = await peer.recv()
            assert isinstance(pkt, Data)
            got.append(pkt.block)
        return got

    try:
        await peer.send(encode_request("w.bin", "octet", {"windowsize": "4"}), svc.address)
        oack, tid = await peer.recv()
        assert oack == OptionAck({"windowsize": "4"})
        await peer.send(encode_ack(0), tid)
        assert await window() == [1, 2, 3, 4]
        await peer.send(encode_ack(4), tid)
        assert await window() == [5, 6, 7, 8]
        await asyncio.sleep(0.05)  # more than a round trip on loopback
        # block 5 "lost": the client acknowledges 4 again (RFC 7440 sec. 4) and gets the window at once
        await peer.send(encode_ack(4), tid)
        assert await window() == [5, 6, 7, 8]
        await peer.send(encode_ack(4), tid)  # once per window: further duplicates wait for the timer
        with pytest.raises(asyncio.TimeoutError):
            await peer.recv(timeout=0.3)
        await peer.send(encode_ack(8), tid)
        rest = [await peer.recv(), await peer.recv()]
        assert [p.block for p, _ in rest] == [9, 10]  # type: ignore[attr-defined]
        await peer.send(encode_ack(10), tid)
    finally:
        peer.close()
    stats = await settled(svc)
    assert stats["retransmitted"] == 4 and stats["duplicate_acks"] == 2 and stats["transfers_sent"] == 1


async def test_close_mid_transfer_ends_the_data_plane_and_its_sockets(service, tmp_path: Path) -> None:
    svc = await service(**SLOW)
    (tmp_path / "tftp" / "big.bin").write_bytes(os.urandom(512 * 50))
    peers = [RawPeer() for _ in range(5)]
    try:
        for peer in peers:
            await peer.send(encode_request("big.bin"), svc.address)
        for peer in peers:
            assert isinstance((await peer.recv())[0], Data)
        assert svc.stats()["transfers_active"] == 5
        fds = len(os.listdir("/proc/self/fd"))
        workers = svc.data_worker_pids
        # closed here: the request socket, and the 5 transfer sockets (thread) or the 2 control sockets and the
        # file's memfd (processes: the transfer sockets went to the workers)
        gone = 1 + (5 if not workers else 2 + 1)
        await svc.close()
        await asyncio.sleep(0.01)  # the request socket's transport closes on the next loop iteration
        assert svc.stats()["transfers_active"] == 0
        assert not [t for t in threading.enumerate() if t.name == "tftp data plane"]
        assert svc.data_worker_pids == []
        assert len(os.listdir("/proc/self/fd")) <= fds - gone
        assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]  # ended and reaped
    finally:
        for peer in peers:
            peer.close()


async def test_malformed_and_foreign_datagrams_on_a_transfer_socket_do_not_end_it(service, tmp_path: Path) -> None:
    svc = await service(**SLOW)
    data = os.urandom(700)
    (tmp_path / "tftp" / "m.bin").write_bytes(data)
    peer, other = RawPeer(), RawPeer()
    try:
        await peer.send(encode_request("m.bin"), svc.address)
        _, tid = await peer.recv()
        for junk in (b"", b"\x00", b"\x00\x09zz", b"\x00\x04\x00"):
            await peer.send(junk, tid)
        other.sock.connect(tid)  # the transfer socket is connected to peer: the kernel refuses another TID (ICMP)
        await other.send(encode_ack(1), tid)
        with pytest.raises(ConnectionRefusedError):
            await other.recv()
        await peer.send(encode_ack(1), tid)
        assert (await peer.recv())[0] == Data(2, data[512:])
        await peer.send(encode_ack(2), tid)
    finally:
        peer.close()
        other.close()
    stats = await settled(svc)
    assert stats["dropped_malformed"] == 4 and stats["dropped_wrong_tid"] == 0 and stats["transfers_sent"] == 1


async def fetch(peer: RawPeer, server: tuple[str, int], name: str, options: dict[str, str] | None = None) -> bytes:
    """Fetch a file as a client does: lock-step, or in windows when options ask for a windowsize (RFC 7440)."""
    await peer.send(encode_request(name, "octet", options or {}), server)
    got: list[bytes] = []
    first, tid = await peer.recv()
    if isinstance(first, OptionAck):
        await peer.send(encode_ack(0), tid)
        first, _ = await peer.recv()
    packet = first
    blksize = int((options or {}).get("blksize", 512))
    window = int((options or {}).get("windowsize", 1))
    while True:
        assert isinstance(packet, Data) and packet.block == (len(got) + 1) & 0xFFFF
        got.append(packet.payload)
        if len(packet.payload) < blksize or len(got) % window == 0:
            await peer.send(encode_ack(packet.block), tid)
        if len(packet.payload) < blksize:
            return b"".join(got)
        packet, _ = await peer.recv()


@pytest.mark.parametrize("options", [{}, {"blksize": "1468", "windowsize": "4"}], ids=["lock-step", "windowed"])
async def test_worker_processes_send_files_whole(service, tmp_path: Path, options: dict[str, str]) -> None:
    svc = await service()
    files = {f"f{i}.bin": os.urandom(size) for i, size in enumerate((0, 511, 512, 1468 * 7, 100_000))}
    for name, data in files.items():
        (tmp_path / "tftp" / name).write_bytes(data)
    peers = [RawPeer() for _ in files]
    try:
        got = await asyncio.gather(*(fetch(peer, svc.address, name, options) for peer, name in zip(peers, files)))
    finally:
        for peer in peers:
            peer.close()
    assert got == list(files.values())
    stats = await settled(svc)
    assert stats["transfers_sent"] == len(files) and stats["transfers_failed"] == 0
    assert stats["bytes_sent"] == sum(map(len, files.values()))


async def test_a_killed_worker_fails_its_transfers_and_the_service_keeps_serving(tmp_path: Path) -> None:
    (tmp_path / "tftp").mkdir()
    data = os.urandom(512 * 40)
    (tmp_path / "tftp" / "k.bin").write_bytes(data)
    events: list[object] = []
    svc = TftpService(TftpSettings(address=ipaddress.IPv4Address(HOST), root=tmp_path / "tftp", port=0, data_workers=2, **SLOW),  # type: ignore[arg-type]
                      events.append, mac_for_ip=lambda ip: "52:54:00:00:00:01")
    await svc.start()
    peers = [RawPeer() for _ in range(4)]
    try:
        for peer in peers:  # 4 transfers, 2 a worker (the least busy one gets the next)
            await peer.send(encode_request("k.bin"), svc.address)
            assert isinstance((await peer.recv())[0], Data)
        before = svc.data_worker_pids
        os.kill(before[0], signal.SIGKILL)
        for _ in range(300):
            if svc.stats()["transfers_failed"] == 2:
                break
            await asyncio.sleep(0.01)
        failed = [e for e in events if isinstance(e, TransferFailed)]
        assert len(failed) == 2 and all("data-plane worker" in e.reason for e in failed)
        assert svc.stats()["transfers_active"] == 2
        after = svc.data_worker_pids
        assert len(after) == 2 and before[0] not in after and before[1] in after  # replaced
        fresh = RawPeer()
        try:
            assert await fetch(fresh, svc.address, "k.bin") == data  # served by either worker
        finally:
            fresh.close()
    finally:
        for peer in peers:
            peer.close()
        await svc.close()
    assert svc.stats()["transfers_active"] == 0


async def test_service_with_workers_leaves_no_descriptor_or_process_behind(tmp_path: Path) -> None:
    (tmp_path / "tftp").mkdir()
    data = os.urandom(5000)
    (tmp_path / "tftp" / "d.bin").write_bytes(data)
    before = set(os.listdir("/proc/self/fd"))
    svc = TftpService(TftpSettings(address=ipaddress.IPv4Address(HOST), root=tmp_path / "tftp", port=0, data_workers=2),
                      EventBus().publish, mac_for_ip=lambda ip: None)
    await svc.start()
    workers = svc.data_worker_pids
    peers = [RawPeer() for _ in range(6)]
    try:
        got = await asyncio.gather(*(fetch(peer, svc.address, "d.bin") for peer in peers))
        assert got == [data] * 6
        await settled(svc)
    finally:
        for peer in peers:
            peer.close()
        await svc.close()
    await asyncio.sleep(0.01)
    assert set(os.listdir("/proc/self/fd")) <= before
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]


def test_shared_files_share_one_memfd_per_content_and_bound_the_idle_ones() -> None:
    shared = SharedFiles(keep_bytes=1 << 20, keep_count=2)
    nbp = os.urandom(3000)
    fd = shared.acquire(nbp)
    assert shared.acquire(nbp) == fd and os.pread(fd, 3000, 0) == nbp  # 200 fetches of one NBP: one memfd
    shared.release(nbp)
    shared.release(nbp)
    scripts = [os.urandom(100) for _ in range(5)]  # boot.ipxe: rendered anew for every request
    for script in scripts:
        shared.acquire(script)
        shared.release(script)
    assert shared.open_descriptors == 2  # idle ones beyond keep_count closed, the oldest first (the NBP's too)
    mapped = MappedFiles()
    key, contents, datagrams = mapped.open(os.dup(shared.acquire(scripts[-1])))
    again = mapped.open(os.dup(shared.acquire(scripts[-1])))  # a second transfer of it: the same mapping and datagrams
    assert bytes(contents) == scripts[-1] and len(mapped) == 1 and again[0] == key and again[2] is datagrams
    mapped.release(key)
    assert len(mapped) == 1
    mapped.release(key)
    assert len(mapped) == 0
    shared.close()
    assert shared.open_descriptors == 0


def test_handoff_messages_round_trip_and_junk_is_refused() -> None:
    limits = SessionLimits(max_blksize=1468, max_windowsize=16, timeout=2.0, retries=4, first_retries=1, rto_floor=0.01)
    result = TransferResult(Outcome.SENT, "", 173792, 1468, 1, received=120, sent=119, retransmitted=1, duplicate_acks=2)
    for message in (AddTransfer(7, ("10.0.0.5", 2070), {"blksize": "1468", "tsize": "0"}, limits), RemoveTransfer(7),
                    TransferDone(7, result), TransferDone(8, TransferResult(None, "data-plane worker: boom", 0, 0, 0))):
        assert handoff.decode(handoff.encode(message)) == message
    for junk in (b"", b"{}", b"[1]", b'{"op": "add", "id": 1}', b'{"op": "nope", "id": 1}', b"\xff"):
        with pytest.raises(MalformedPacket):
            handoff.decode(junk)


def test_transfer_socket_is_connected_to_its_client_only() -> None:
    client, other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        client.bind((HOST, 0))
        other.bind((HOST, 0))
        sock, dropped = open_transfer_socket(HOST, client.getsockname())
        with sock:
            assert dropped == 0 and sock.getpeername() == client.getsockname() and not sock.getblocking()
            other.sendto(b"\x00\x04\x00\x01", sock.getsockname())  # a foreign TID: not delivered (RFC 1350 sec. 4)
            client.sendto(b"\x00\x04\x00\x02", sock.getsockname())
            time.sleep(0.05)
            assert sock.recv(16) == b"\x00\x04\x00\x02"
            with pytest.raises(BlockingIOError):
                sock.recv(16)
    finally:
        client.close()
        other.close()
