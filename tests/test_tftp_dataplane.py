"""The TFTP data plane with real sockets on loopback: duplicate ACKs (lock-step and windowed), closing mid-transfer."""
from __future__ import annotations

import asyncio
import ipaddress
import os
import threading
from pathlib import Path
from typing import AsyncIterator, Callable

import pytest

from appliance.events import EventBus
from netboot.tftp.codec import Data, Error, OptionAck, encode_ack, encode_request
from netboot.tftp.server import TftpService, TftpSettings
from helpers import RawPeer, settled

HOST = "127.0.0.1"
SLOW = {"timeout": 5.0, "rto_floor": 5.0}  # the retransmission timer never fires within these tests


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    """Start one TftpService on loopback with the given settings; close it after the test."""
    made: list[TftpService] = []

    async def factory(**settings: object) -> TftpService:
        (tmp_path / "tftp").mkdir(exist_ok=True)
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
        await svc.close()
        assert svc.stats()["transfers_active"] == 0
        assert not [t for t in threading.enumerate() if t.name == "tftp data plane"]
        assert len(os.listdir("/proc/self/fd")) <= fds - 5 - 1  # the transfer sockets and the request socket
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
        await other.send(encode_ack(1), tid)
        reply, _ = await other.recv()
        assert isinstance(reply, Error) and reply.code == 5  # RFC 1350 sec. 4: a foreign TID gets ERROR 5
        await peer.send(encode_ack(1), tid)
        assert (await peer.recv())[0] == Data(2, data[512:])
        await peer.send(encode_ack(2), tid)
    finally:
        peer.close()
        other.close()
    stats = await settled(svc)
    assert stats["dropped_malformed"] == 4 and stats["dropped_wrong_tid"] == 1 and stats["transfers_sent"] == 1
