"""The virtual firmware's TFTP client against the appliance's TftpService on loopback, with and without loss."""
from __future__ import annotations

import asyncio
import ipaddress
import os
import random
import socket
from pathlib import Path
from typing import AsyncIterator

import pytest

from netboot.tftp import codec
from netboot.tftp.server import TftpService
from netboot.tftp.server import TftpSettings as ServerSettings
from vmtestbed.ipxe_script import FetchError
from vmtestbed.tftp_client import TftpSettings, TransferStats, tftp_get

HOST = "127.0.0.1"


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[TftpService, Path]]:
    root = tmp_path / "tftp"
    root.mkdir()
    settings = ServerSettings(address=ipaddress.IPv4Address(HOST), root=root, ipxe_dir=tmp_path / "no-ipxe", port=0,
                            timeout=0.05, retries=8)
    svc = TftpService(settings, [].append, mac_for_ip=lambda ip: None)
    await svc.start()
    task = asyncio.create_task(svc.serve())
    yield svc, root
    task.cancel()
    await svc.close()


def _sock() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((HOST, 0))
    return s


@pytest.mark.parametrize("windowsize", [1, 4, 16])
async def test_fetch_with_options(server: tuple[TftpService, Path], windowsize: int) -> None:
    svc, root = server
    data = os.urandom(300_000)
    (root / "undionly.kpxe").write_bytes(data)
    stats = TransferStats()
    got = await tftp_get(_sock(), HOST, "undionly.kpxe", TftpSettings(blksize=1456, windowsize=windowsize, timeout=0.2), stats=stats, port=svc.address[1])
    assert got == data
    assert (stats.blksize, stats.windowsize, stats.tsize) == (1456, windowsize, len(data))


async def test_size_probe_then_fetch_like_ovmf(server: tuple[TftpService, Path]) -> None:
    svc, root = server
    (root / "snponly.efi").write_bytes(b"x" * 5000)
    stats = TransferStats()
    assert await tftp_get(_sock(), HOST, "snponly.efi", TftpSettings(), size_probe=True, stats=stats, port=svc.address[1]) == b""
    assert stats.tsize == 5000
    assert await tftp_get(_sock(), HOST, "snponly.efi", TftpSettings(), port=svc.address[1]) == b"x" * 5000


@pytest.mark.parametrize("windowsize", [1, 8])
async def test_lossy_firmware_still_gets_the_file(server: tuple[TftpService, Path], windowsize: int) -> None:
    """20% of the client's packets (both ways) are lost: retransmission and window restarts recover."""
    svc, root = server
    data = os.urandom(60_000)
    (root / "big.bin").write_bytes(data)
    rng = random.Random(3)
    stats = TransferStats()
    got = await tftp_get(_sock(), HOST, "big.bin", TftpSettings(windowsize=windowsize, timeout=0.05, retries=20),
                         drop=lambda: rng.random() < 0.2, stats=stats, port=svc.address[1])
    assert got == data
    assert stats.lost > 0 and stats.retransmits > 0


async def test_missing_file_is_a_fetch_error(server: tuple[TftpService, Path]) -> None:
    svc, _ = server
    with pytest.raises(FetchError, match="error 1"):
        await tftp_get(_sock(), HOST, "nope.kpxe", TftpSettings(timeout=0.2), port=svc.address[1])


async def test_silent_server_times_out() -> None:
    silent = _sock()
    try:
        with pytest.raises(FetchError, match="timed out"):
            await tftp_get(_sock(), HOST, "x", TftpSettings(timeout=0.02, retries=2), port=silent.getsockname()[1])
    finally:
        silent.close()


async def test_server_without_options_gets_plain_rfc1350() -> None:
    """A server that ignores options answers with DATA 512: the client falls back to blksize 512, no window."""
    payload = os.urandom(512 * 3 + 100)
    loop = asyncio.get_running_loop()
    srv = _sock()
    srv.setblocking(False)

    async def serve() -> None:
        req, client = await loop.sock_recvfrom(srv, 2048)
        assert isinstance(codec.decode(req), codec.ReadRequest)
        s = _sock()
        s.setblocking(False)
        for block in range(1, 5):
            chunk = payload[(block - 1) * 512 : block * 512]
            await loop.sock_sendto(s, codec.encode_data(block, chunk), client)
            ack, _ = await loop.sock_recvfrom(s, 2048)
            assert codec.decode(ack) == codec.Ack(block)
        s.close()

    task = asyncio.create_task(serve())
    stats = TransferStats()
    got = await tftp_get(_sock(), HOST, "f", TftpSettings(timeout=0.5), stats=stats, port=srv.getsockname()[1])
    await task
    srv.close()
    assert got == payload and stats.tsize is None
