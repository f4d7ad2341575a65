"""A TFTP client as boot firmware runs it: options (RFC 2347/2348/2349/7440), windows, retransmission, size probe.

Packets are encoded and decoded with the appliance's TFTP codec (netboot.tftp.codec); the client logic
(which ACK to send when, timeouts) is independent of the server's.
"""
from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Callable

from domain.errors import MalformedPacket
from netboot.tftp import codec
from vmtestbed.ipxe_script import FetchError

TFTP_PORT = 69


@dataclass(frozen=True)
class TftpSettings:
    """What the firmware asks for and how patiently it waits."""

    blksize: int = 1468
    windowsize: int = 4
    ask_tsize: bool = True
    timeout: float = 1.0
    retries: int = 6
    max_bytes: int = 256 * 1024 * 1024


class _Queue(asyncio.DatagramProtocol):
    """Datagrams in, as (bytes, address) on an asyncio queue."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue(maxsize=4096)
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not self.queue.full():
            self.queue.put_nowait((data, addr))


@dataclass
class TransferStats:
    """What one transfer did: counters for the node's status and for tests."""

    sent: int = 0
    received: int = 0
    retransmits: int = 0
    lost: int = 0
    blksize: int = 512
    windowsize: int = 1
    tsize: int | None = None


async def tftp_get(
    sock: socket.socket,
    server: str,
    filename: str,
    settings: TftpSettings = TftpSettings(),
    size_probe: bool = False,
    drop: Callable[[], bool] = lambda: False,
    stats: TransferStats | None = None,
    port: int = TFTP_PORT,
) -> bytes:
    """Read a file over TFTP on a bound UDP socket (which this closes); raise FetchError on failure.

    With size_probe the client stops after the OACK with error 8, as OVMF does before the real request,
    and returns b"" (stats.tsize holds the announced size). drop() says whether to lose a packet (faults).
    """
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    st = stats if stats is not None else TransferStats()
    transport, proto = await loop.create_datagram_endpoint(_Queue, sock=sock)
    try:
        return await _transfer(transport, proto, server, port, filename, settings, size_probe, drop, st)
    finally:
        transport.close()


async def _transfer(
    transport: asyncio.DatagramTransport, proto: _Queue, server: str, port: int, filename: str,
    settings: TftpSettings, size_probe: bool, drop: Callable[[], bool], st: TransferStats,
) -> bytes:
    def send(data: bytes, addr: tuple[str, int]) -> None:
        st.sent += 1
        if drop():
            st.lost += 1
            return
        transport.sendto(data, addr)

    options: dict[str, str | int] = {}
    if settings.ask_tsize:
        options["tsize"] = 0
    if settings.blksize != 512:
        options["blksize"] = settings.blksize
    if settings.windowsize > 1:
        options["windowsize"] = settings.windowsize
    rrq = codec.encode_request(filename, "octet", options)
    send(rrq, (server, port))
    tid: tuple[str, int] | None = None
    blksize, window = 512, 1
    chunks: list[bytes] = []
    received = 0
    expected = 1          # next block number wanted (unwrapped; the wire carries it modulo 2**16)
    in_window = 0
    last_ack: bytes | None = None
    attempts = 0
    loop = asyncio.get_running_loop()
    # The retransmission timer runs from the last progress, not the last packet: a server resending a
    # window we already have must not keep us from timing out and re-sending our ACK.
    deadline = loop.time() + settings.timeout
    while True:
        try:
            # Queued datagrams first: wait_for() with an expired timeout would not even look at the queue.
            if proto.queue.empty():
                data, addr = await asyncio.wait_for(proto.queue.get(), max(0.0, deadline - loop.time()))
            else:
                data, addr = proto.queue.get_nowait()
        except TimeoutError:
            attempts += 1
            deadline = loop.time() + settings.timeout * (1 + attempts)
            if attempts > settings.retries:
                raise FetchError(f"tftp://{server}/{filename}: timed out after {attempts - 1} retransmissions") from None
            st.retransmits += 1
            # RFC 1350 sec. 2: the side waiting retransmits its last packet; before any reply that is the RRQ.
            # Inside a window the ACK names the last block received in order (RFC 7440 sec. 4), which may be
            # past the last ACK sent: the server then resends only what is missing.
            if tid is None:
                send(rrq, (server, port))
            elif last_ack is not None:
                last_ack = codec.encode_ack((expected - 1) & 0xFFFF)
                send(last_ack, tid)
            in_window = 0
            continue
        if drop():
            st.lost += 1
            continue
        if tid is None:
            if addr[0] != server:
                continue
            tid = addr
        elif addr != tid:
            transport.sendto(codec.encode_error(codec.ErrorCode.UNKNOWN_TID, "unknown transfer id"), addr)
            continue
        st.received += 1
        try:
            packet = codec.decode(data)
        except MalformedPacket:
            continue
        if isinstance(packet, codec.Error):
            raise FetchError(f"tftp://{server}/{filename}: error {packet.code}: {packet.message}")
        if isinstance(packet, codec.OptionAck):
            if expected != 1:
                continue
            try:
                blksize = int(packet.options.get("blksize", 512))
                window = int(packet.options.get("windowsize", 1))
                st.tsize = int(packet.options["tsize"]) if "tsize" in packet.options else None
            except ValueError as exc:
                raise FetchError(f"tftp://{server}/{filename}: bad OACK {packet.options}") from exc
            if not 8 <= blksize <= settings.blksize or not 1 <= window <= max(settings.windowsize, 1):
                send(codec.encode_error(codec.ErrorCode.OPTION_REFUSED, "option value not requested"), tid)
                raise FetchError(f"tftp://{server}/{filename}: OACK with values we did not ask for: {packet.options}")
            st.blksize, st.windowsize = blksize, window
            if size_probe:
                # OVMF aborts its size probe after the OACK with error 8 (RFC 2347: the client may refuse).
                send(codec.encode_error(codec.ErrorCode.OPTION_REFUSED, "size probe done"), tid)
                return b""
            last_ack = codec.encode_ack(0)
            send(last_ack, tid)
            attempts = 0
            deadline = loop.time() + settings.timeout
            continue
        if not isinstance(packet, codec.Data):
            continue
        if packet.block == expected & 0xFFFF:
            chunks.append(packet.payload)
            received += len(packet.payload)
            if received > settings.max_bytes:
                raise FetchError(f"tftp://{server}/{filename}: larger than {settings.max_bytes} bytes")
            expected += 1
            in_window += 1
            attempts = 0
            deadline = loop.time() + settings.timeout
            last = len(packet.payload) < blksize
            if last or in_window >= window:
                last_ack = codec.encode_ack(packet.block)
                send(last_ack, tid)
                in_window = 0
            if last:
                if size_probe:
                    return b""
                return b"".join(chunks)
        elif ((expected & 0xFFFF) - packet.block) & 0xFFFF > 0x7FFF:
            # A block beyond the one expected: one went missing inside the window. RFC 7440 sec. 4: the
            # receiver acknowledges the last block it got in order and the sender restarts from there.
            if in_window or last_ack is None or last_ack != codec.encode_ack((expected - 1) & 0xFFFF):
                last_ack = codec.encode_ack((expected - 1) & 0xFFFF)
                send(last_ack, tid)
                in_window = 0
        elif last_ack is not None and packet.block == (expected - 1) & 0xFFFF:
            # The server resends a window holding the last block we have: our ACK was lost. Acknowledge it
            # again, once per resent window (on that one block), not once per duplicate, so that a server
            # answering every ACK cannot start the Sorcerer's Apprentice syndrome (RFC 1123 sec. 4.2.3.1).
            last_ack = codec.encode_ack(packet.block)
            send(last_ack, tid)
            in_window = 0
        # else: another duplicate of a block already received: ignore it.
