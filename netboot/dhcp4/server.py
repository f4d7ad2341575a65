"""The DHCPv4 service: a thin asyncio transport around the codec and the policy.

One UDP socket bound to the appliance interface on the DHCP port (and, in proxy mode, one on the
PXE port 4011). Replies go where RFC 2131 4.1 says; a reply to a client that has no address yet and
did not ask for broadcast is sent as a link-layer frame to its chaddr through an AF_PACKET socket
(as ISC dhcpd does with LPF), falling back to broadcast when that is impossible.

Each wake-up drains up to READ_BATCH datagrams: requests from MACs outside the inventory over their source's
rate (relay circuit, relay or port) are dropped undecoded (`DhcpPolicy.admit`), inventory nodes' requests are answered before
the others of the same read. This keeps the kernel queue short under a flood (docs/reliability.md, Starvation).
"""
from __future__ import annotations

import asyncio
import ctypes
import errno
import ipaddress
import logging
import socket
import sqlite3
import struct
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Mapping

from domain.errors import BindError, MalformedPacket
from domain.progress import EventSink
from domain.latency import Latency
from domain.aio import within
from netboot.dhcp4 import options as o
from netboot.dhcp4.codec import decode, ipv4_udp_packet
from netboot.dhcp4.leases import LeaseBatch, LeaseTable, write_batch
from netboot.dhcp4.policy import BROADCAST_IP, POOL_EXHAUSTED, VIA_DHCP, VIA_PXE, Admission, DhcpPolicy, Reply
from netboot.dhcp4.settings import DhcpSettings, Reservation
from netboot.dhcp4.steering import Insn, encode_program, socket_filters, steering_program
from netboot.link import ARPHRD_ETHER, interface_hardware

log = logging.getLogger("rackboot.dhcp")

FLUSH_INTERVAL_S = 0.25    # write-behind period of lease rows
FLUSH_BATCH = 2048         # flush at once when this many rows wait
RECEIVE_BUFFER = 4 << 20   # absorbs bursts (perfdhcp, a rack powering on)
READ_BATCH = 256           # datagrams read per wake-up; inventory nodes' requests of a batch are answered first
MAX_DATAGRAM = 65536
_SO_RCVBUFFORCE = 33        # <asm/socket.h>: SO_RCVBUF above rmem_max, for CAP_NET_ADMIN
_SO_ATTACH_FILTER = 26          # <asm/socket.h>
_SO_ATTACH_REUSEPORT_CBPF = 51  # <asm/socket.h>, Linux 4.5
_ETH_P_IP = 0x0800
_COUNTERS = ("received", "sent", "dropped_malformed", "ignored", "errors", "send_errors", "offers", "acks",
             "naks", "proxy_replies", "relayed", "broadcast", "unicast_chaddr", "lease_write_errors",
             "rate_limited", "pool_exhausted")
_REPLY_COUNTER = {o.OFFER: "offers", o.ACK: "acks", o.NAK: "naks"}


class _Endpoint:
    """One bound UDP socket, read in batches by the event loop's reader callback and written to directly."""

    def __init__(self, service: "DhcpService", sock: socket.socket, via: str) -> None:
        self.service = service
        self.sock = sock
        self.via = via
        self.received = 0  # datagrams read from this socket
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), service.read_batch, self)

    def sendto(self, data: bytes, addr: tuple[str, int]) -> bool:
        """Send one datagram; False (counted) when the kernel refuses it (full buffer, no route): UDP may drop."""
        try:
            self.sock.sendto(data, addr)
            return True
        except OSError as exc:
            self.service.counters["send_errors"] += 1
            log.debug("dhcp: cannot send to %s:%d: %s", addr[0], addr[1], exc)
            return False

    def close(self) -> None:
        """Stop reading and close the socket (the port can be bound again at once); safe to call twice."""
        if self.sock.fileno() >= 0:
            self._loop.remove_reader(self.sock.fileno())
            self.sock.close()

    abort = close


class DhcpService:
    """DHCPv4 server (authoritative or proxyDHCP) on the appliance interface; keeps the Service contract."""

    name = "dhcp"

    def __init__(self, settings: DhcpSettings, reservations: Mapping[str, Reservation], emit: EventSink,
                 db: sqlite3.Connection | None, journal: Path | None = None) -> None:
        self.settings = settings
        self.emit = emit
        self.leases = LeaseTable(db, settings.pool, self._reserved(reservations), journal)
        # The database file the writer thread opens its own connection to ('' for none or an in-memory one).
        self._db_file = next((row[2] for row in db.execute("PRAGMA database_list") if row[1] == "main"), "") if db else ""
        self._writer: ThreadPoolExecutor | None = None
        self._writer_db: sqlite3.Connection | None = None
        self._writing: tuple[Future[None], LeaseBatch] | None = None
        self._flush_now = asyncio.Event()
        self.policy = DhcpPolicy(settings, reservations, self.leases)
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self._endpoints: list[_Endpoint] = []
        self._raw: socket.socket | None = None
        self._sid = settings.server_ip.packed
        self.steered = False  # inventory nodes' requests have a socket (a kernel queue) of their own
        # From the wake-up that read a request to its reply sent (or the decision not to answer): the time a request
        # spends in the server once the kernel hands it over, batch-mates ahead of it included.
        self.latency = {"request": Latency()}
        self._closed = False

    # ------------------------------------------------------------------ Service contract

    async def start(self) -> None:
        """Bind the DHCP port (and 4011 in proxy mode) on the interface; raise BindError when impossible."""
        dhcp = self.settings
        if dhcp.mode == "off":
            return
        ports = [(dhcp.port, VIA_DHCP)]
        if dhcp.mode == "proxy":
            ports.append((dhcp.proxy_port, VIA_PXE))
        try:
            for port, via in ports:
                socks = self._bind_steered(port) if via == VIA_DHCP else None
                for sock in socks or [_bind_udp(dhcp.interface, port)]:
                    try:
                        self._endpoints.append(_Endpoint(self, sock, via))
                    except BaseException:
                        sock.close()
                        raise
        except BaseException:
            await self.close()
            raise
        if not dhcp.broadcast_replies and dhcp.mode == "authoritative":
            self._raw = _open_packet_socket(dhcp.interface)
        log.info("dhcp: %s on %s ports %s%s", dhcp.mode, dhcp.interface, ", ".join(str(p) for p, _ in ports),
                 f", pool {dhcp.pool[0]}-{dhcp.pool[1]}" if dhcp.pool else "")

    def set_reservations(self, reservations: Mapping[str, Reservation]) -> None:
        """Serve a reloaded inventory's reservations: leases and offers are kept, the reserved addresses leave the
        pool, and the steering programs are replaced so the new nodes' requests reach the nodes' socket."""
        self.leases.set_reserved(self._reserved(reservations))
        self.policy.set_reservations(reservations)
        socks = [e.sock for e in self._endpoints if e.via == VIA_DHCP]
        if not self.steered or len(socks) != 2:
            return
        programs = self._steering_programs("the nodes added keep the shared queue", logging.WARNING)
        if programs is None:
            return
        prog, filters = programs
        try:
            # The kernel swaps each program atomically; between the three calls a broadcast may reach both
            # sockets or neither for a moment, which DHCP's retransmissions absorb (RFC 2131 4.1).
            _attach(socks[0], _SO_ATTACH_FILTER, filters[0])
            _attach(socks[1], _SO_ATTACH_FILTER, filters[1])
            _attach(socks[0], _SO_ATTACH_REUSEPORT_CBPF, prog)
        except OSError as exc:
            log.warning("dhcp: could not steer the reloaded inventory's nodes to their socket: %s", exc)

    def _reserved(self, reservations: Mapping[str, Reservation]) -> list[ipaddress.IPv4Address]:
        """The addresses the pool never hands out: the inventory's, the server's, the network's and broadcast."""
        network = self.settings.address.network
        return [r.ip for r in reservations.values()] + [self.settings.server_ip, network.network_address,
                                                         network.broadcast_address, *self.settings.reserved]

    def _steering_programs(self, otherwise: str, level: int) -> tuple[list[Insn], tuple[list[Insn], list[Insn]]] | None:
        """The steering program and the two sockets' filters for the inventory's MACs (steering.py); None, said
        once in the log with what happens `otherwise`, when the MACs are too many for BPF."""
        macs = self.policy.node_chaddrs
        prog = steering_program(macs) if macs else None
        filters = socket_filters(macs) if macs else None
        if prog is None or filters is None:
            if macs:
                log.log(level, "dhcp: %d inventory MACs are too many for a BPF program: %s", len(macs), otherwise)
            return None
        return prog, filters

    def _bind_steered(self, port: int) -> list[socket.socket] | None:
        """Two sockets on the DHCP port, the first for inventory nodes only (steering.py); None when impossible."""
        programs = self._steering_programs("one socket for all", logging.INFO)
        if programs is None:
            return None
        prog, filters = programs
        _bind_udp(self.settings.interface, port).close()  # BindError when another server holds the port
        socks: list[socket.socket] = []
        try:
            # Unicasts: the kernel picks the socket; broadcasts: each socket keeps its share (steering.py). Attached
            # before the bind: no datagram is ever read by both sockets.
            socks.append(_bind_udp(self.settings.interface, port, [(_SO_ATTACH_FILTER, filters[0]),
                                                                   (_SO_ATTACH_REUSEPORT_CBPF, prog)]))
            socks.append(_bind_udp(self.settings.interface, port, [(_SO_ATTACH_FILTER, filters[1])]))
        except (OSError, BindError) as exc:
            for sock in socks:
                sock.close()
            log.info("dhcp: no socket of its own for the inventory nodes (%s): one queue for all", exc)
            return None
        self.steered = True
        return socks

    async def serve(self) -> None:
        """Write lease rows behind, a few times a second (at once when FLUSH_BATCH rows wait), until cancelled."""
        try:
            while True:
                try:
                    await within(self._flush_now.wait(), FLUSH_INTERVAL_S)
                except TimeoutError:
                    pass
                self._flush_now.clear()
                await self._write_behind()
        finally:
            self._finish_writing()
            self._flush()

    async def _write_behind(self) -> None:
        """Commit the changed lease rows in the writer thread, with its own connection: the event loop goes on
        answering meanwhile (a transaction of 1,000-2,000 rows took 2-22 ms on the loop: docs/benchmarks.md)."""
        if not self._db_file:
            self._flush()  # an in-memory database has one connection: written here
            return
        batch = self.leases.take_batch()
        if batch is None:
            return
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dhcp-leases")
        future = self._writer.submit(self._write_in_thread, batch)
        self._writing = (future, batch)
        try:
            await asyncio.wrap_future(future)
        except sqlite3.Error:
            pass  # reported by _written
        finally:
            if future.done():
                self._written()

    def _write_in_thread(self, batch: LeaseBatch) -> None:
        if self._writer_db is None:
            self._writer_db = sqlite3.connect(self._db_file, isolation_level=None, check_same_thread=False)
            self._writer_db.execute("PRAGMA busy_timeout=5000")  # the appliance's own writes take the lock for ms
        write_batch(self._writer_db, batch)

    def _written(self) -> None:
        """The writer thread is done with the batch in flight: settle it on the loop."""
        if self._writing is None:
            return
        (future, batch), self._writing = self._writing, None
        error = future.exception()
        self.leases.batch_done(batch, error)
        if error is not None:
            self.counters["lease_write_errors"] += 1
            log.warning("dhcp: cannot write leases (%s); will retry", error)

    def _finish_writing(self) -> None:
        """Wait for the batch in flight (serve was cancelled meanwhile), so that a last flush comes after it."""
        if self._writing is not None:
            wait([self._writing[0]])
            self._written()

    async def close(self) -> None:
        """Close the sockets and write pending lease rows; safe to call twice."""
        endpoints, self._endpoints = self._endpoints, []
        for endpoint in endpoints:
            endpoint.close()
        if self._raw is not None:
            self._raw.close()
            self._raw = None
        if not self._closed:
            self._closed = True
            self._finish_writing()
            self._flush()
            self.leases.close()
            if self._writer is not None:
                self._writer.shutdown(wait=True)
            if self._writer_db is not None:
                self._writer_db.close()
                self._writer_db = None

    def stats(self) -> dict[str, int]:
        """Return the counters plus the sizes of the per-MAC tables (all bounded, see docs/reliability.md)."""
        limiter = self.policy.limiter
        return dict(self.counters, leases=len(self.leases), lease_rows_pending=self.leases.dirty,
                    offers_pending=self.leases.offers_pending, exchanges_tracked=self.policy.exchanges_tracked,
                    rate_limit_sources=len(limiter) if limiter is not None else 0)

    def mac_for_ip(self, addr: ipaddress.IPv4Address) -> str | None:
        """Return the MAC holding a dynamic lease on addr, or None."""
        return self.leases.mac_for_ip(int(addr))

    # ------------------------------------------------------------------ hot path

    def read_batch(self, endpoint: _Endpoint) -> None:
        """Read what waits on a socket (up to READ_BATCH datagrams): admit, then answer inventory nodes first.

        Draining the socket in one wake-up, and dropping the requests over their source's rate before any decode,
        keeps the kernel's receive queue short under a flood, so a node's request is not lost behind it.
        """
        counters = self.counters
        admit = self.policy.admit
        sock, via = endpoint.sock, endpoint.via
        now = time.time()
        woke = time.perf_counter()
        observe = self.latency["request"].observe
        later: list[tuple[bytes, tuple[str, int]]] = []
        for _ in range(READ_BATCH):
            try:
                data, addr = sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # the socket was closed under us, or a pending error: try again at the next wake-up
                log.debug("dhcp: receive error %s", exc)
                break
            counters["received"] += 1
            endpoint.received += 1
            admission = admit(data, via, now)
            if admission is Admission.NODE:
                self._handle(data, addr, via, endpoint, now)
                observe(time.perf_counter() - woke)
            elif admission is Admission.OTHER:
                later.append((data, addr))
            else:
                counters["rate_limited"] += 1  # a MAC outside the inventory over its source's rate (relay circuit, relay or port)
        for data, addr in later:
            self._handle(data, addr, via, endpoint, now)
            observe(time.perf_counter() - woke)
        if self.leases.dirty >= FLUSH_BATCH:
            self._flush_now.set()

    def _handle(self, data: bytes, addr: tuple[str, int], via: str, endpoint: _Endpoint, now: float) -> None:
        """Decode, decide, publish events and send the reply of one datagram; never raises."""
        counters = self.counters
        try:
            req = decode(data)
        except MalformedPacket as exc:
            counters["dropped_malformed"] += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("dhcp: dropped malformed datagram from %s:%d: %s", addr[0], addr[1], exc)
            return
        try:
            decision = self.policy.handle(req, now, via, addr)
            if decision.event is not None:
                self.emit(decision.event)
            reply = decision.reply
            if reply is None:
                if decision.ignored:
                    counters["ignored"] += 1
                    if decision.ignored == POOL_EXHAUSTED:
                        counters["pool_exhausted"] += 1
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("dhcp: no reply to %s from %s: %s", req, addr[0], decision.ignored)
            else:
                self._send(reply, endpoint, via)
        except Exception:  # one bad request must not stop the service
            counters["errors"] += 1
            log.exception("dhcp: error handling a request from %s:%d", addr[0], addr[1])

    def _send(self, reply: Reply, transport: _Endpoint, via: str) -> None:
        """Send one reply where its destination says (RFC 2131 4.1)."""
        counters = self.counters
        dest = reply.dest
        if via == VIA_PXE or self.settings.mode == "proxy":
            counters["proxy_replies"] += 1
        else:
            counters[_REPLY_COUNTER.get(reply.message_type, "acks")] += 1
        if dest.mac is not None:
            raw = self._raw
            if raw is not None:
                frame = ipv4_udp_packet(self._sid, socket.inet_aton(dest.ip), self.settings.port, dest.port, reply.data)
                try:
                    raw.sendto(frame, (self.settings.interface, _ETH_P_IP, 0, 0, dest.mac))
                    counters["sent"] += 1
                    counters["unicast_chaddr"] += 1
                    return
                except OSError as exc:
                    counters["send_errors"] += 1
                    log.debug("dhcp: link-layer unicast to %s failed (%s); broadcasting", dest.mac.hex(":"), exc)
            target: tuple[str, int] = (BROADCAST_IP, dest.port)
        else:
            target = (dest.ip, dest.port)
        if target[0] == BROADCAST_IP:
            counters["broadcast"] += 1
        elif dest.port == self.settings.port and via == VIA_DHCP:
            counters["relayed"] += 1
        if transport.sendto(reply.data, target):
            counters["sent"] += 1

    def _flush(self) -> None:
        """Write pending lease rows; a failure is logged and retried at the next flush."""
        if not self.leases.dirty:
            return
        try:
            self.leases.flush()
        except (sqlite3.Error, sqlite3.ProgrammingError) as exc:
            self.counters["lease_write_errors"] += 1
            log.warning("dhcp: cannot write leases (%s); will retry", exc)


def _bind_udp(interface: str, port: int, programs: list[tuple[int, list[Insn]]] | None = None) -> socket.socket:
    """Return a UDP socket bound to port on one interface only (SO_BINDTODEVICE), broadcast-capable.

    With programs (socket option, classic BPF program), the socket shares the port (SO_REUSEPORT) and gets
    them before it is bound.
    """
    try:
        socket.if_nametoindex(interface)
    except OSError:
        raise BindError(f"dhcp: interface {interface!r} does not exist") from None
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        if programs is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            for option, prog in programs:
                _attach(sock, option, prog)
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, RECEIVE_BUFFER)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        # Requests are broadcasts (and unicasts to our address): bind the wildcard, restricted to the device.
        sock.bind(("0.0.0.0", port))
    except PermissionError:
        sock.close()
        raise BindError(f"dhcp: no permission to bind UDP port {port} on {interface} "
                        "(run as root, or grant CAP_NET_BIND_SERVICE and CAP_NET_RAW)") from None
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise BindError(f"dhcp: UDP port {port} on {interface} is already taken (another DHCP server running?)") from None
        if exc.errno == errno.ENODEV:
            raise BindError(f"dhcp: interface {interface!r} does not exist") from None
        raise BindError(f"dhcp: cannot bind UDP port {port} on {interface}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def _attach(sock: socket.socket, option: int, prog: list[Insn]) -> None:
    """Attach a classic BPF program to a socket (the kernel copies it: the buffer need not outlive the call)."""
    code = encode_program(prog)
    buffer = ctypes.create_string_buffer(code, len(code))
    sock.setsockopt(socket.SOL_SOCKET, option, struct.pack("HL", len(prog), ctypes.addressof(buffer)))  # sock_fprog


def _open_packet_socket(interface: str) -> socket.socket | None:
    """Return a send-only AF_PACKET socket for unicast to chaddr, or None (non-Ethernet, no permission)."""
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)  # protocol 0: it receives nothing
    except OSError as exc:
        log.warning("dhcp: no packet socket (%s): replies to clients without an address will be broadcast", exc)
        return None
    try:
        hwtype, _ = interface_hardware(sock, interface)
    except OSError as exc:
        sock.close()
        log.warning("dhcp: cannot read the hardware type of %s (%s): broadcasting replies", interface, exc)
        return None
    if hwtype != ARPHRD_ETHER:
        sock.close()
        log.info("dhcp: %s is not Ethernet: replies to clients without an address will be broadcast", interface)
        return None
    sock.setblocking(False)
    return sock
