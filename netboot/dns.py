"""The DNS responder: A and PTR records for the inventory's names, other names forwarded or refused.

dnslib is the codec; the transport is asyncio (UDP, and TCP per RFC 7766), not dnslib's threaded server.
Codec: decode_query() turns bytes into a DNSRecord or raises MalformedPacket. Policy: DnsZone.answer()
turns a query into an authoritative reply, or None when the name is not ours. Transport: DnsService.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import struct
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

from dnslib import EDNS0, NS, OPCODE, PTR, QTYPE, RCODE, RR, SOA, A, DNSRecord

from domain.latency import Latency
from domain.errors import BindError, MalformedPacket
from domain.aio import within

log = logging.getLogger("rackboot.dns")


@dataclass(frozen=True)
class DnsSettings:
    """The DNS service's own settings: its address and network, the zone, and what to do with other names."""

    interface: str
    address: ipaddress.IPv4Interface     # where to listen; the network is the reverse zone we answer for
    domain: str = "cluster.test"
    port: int = 53
    ttl: int = 60
    unknown: str = "refuse"              # refuse | forward
    upstream: tuple[tuple[str, int], ...] = ()

FORWARD_TIMEOUT_S = 2.0
MAX_PENDING_FORWARDS = 4096
TCP_IDLE_TIMEOUT_S = 10.0
EDNS_UDP_SIZE = 1232  # the DNS Flag Day 2020 recommendation
CLASSIC_UDP_SIZE = 512  # RFC 1035 4.2.1
CLASS_IN, CLASS_ANY = 1, 255  # RFC 1035 3.2.4, 3.2.5


MAX_NAME_OCTETS = 255  # RFC 1035 2.3.4: a name, as encoded (length octets included), is at most 255 octets
MAX_LABEL_OCTETS = 63  # RFC 1035 2.3.4; length octets 0x40-0xBF are reserved label types (RFC 1035 4.1.4)


def decode_query(data: bytes) -> DNSRecord:
    """Decode a DNS message; raise MalformedPacket when dnslib cannot or a name breaks RFC 1035's size limits."""
    try:
        record = DNSRecord.parse(data)
    except Exception as exc:  # dnslib raises DNSError and, on some inputs, other errors: all mean malformed
        raise MalformedPacket(f"dns: undecodable message ({len(data)} bytes): {exc}") from exc
    for q in record.questions:
        # dnslib reads such names (a reserved label type as a length) but cannot write them back: a reply would
        # raise (RFC 1035 2.3.4).
        labels = q.qname.label
        if sum(len(label) + 1 for label in labels) + 1 > MAX_NAME_OCTETS:
            raise MalformedPacket(f"dns: question name over {MAX_NAME_OCTETS} octets")
        if any(len(label) > MAX_LABEL_OCTETS for label in labels):
            raise MalformedPacket(f"dns: question label over {MAX_LABEL_OCTETS} octets")
    return record


def _name(label: object) -> str:
    return str(label).rstrip(".").lower()


def _reverse_ip(name: str) -> ipaddress.IPv4Address | None:
    """Return the address of a full in-addr.arpa name (RFC 1035 3.5), else None."""
    labels = name.split(".")
    if len(labels) != 6 or labels[4:] != ["in-addr", "arpa"]:
        return None
    if not all(x.isdigit() and len(x) <= 3 for x in labels[:4]):
        return None
    try:
        return ipaddress.IPv4Address(".".join(reversed(labels[:4])))
    except ValueError:
        return None


def new_reply(request: DNSRecord, *, ra: bool, aa: bool) -> DNSRecord:
    """Return an empty reply to request: id, RD and CD echoed; AD cleared, we validate nothing (RFC 4035 3.2.3)."""
    reply = request.reply(ra=int(ra), aa=int(aa))
    reply.header.ad = 0
    reply.header.rcode = RCODE.NOERROR
    return reply


class DnsZone:
    """Policy: authoritative answers for the nodes' names in the configured domain (pure)."""

    def __init__(self, settings: DnsSettings, hosts: Mapping[str, ipaddress.IPv4Address], *,
                 recursion_available: bool = False) -> None:
        self.domain = settings.domain.strip(".").lower()
        self.ttl = settings.ttl
        self.network = settings.address.network
        self.recursion_available = recursion_available
        self.appliance_name = f"rackboot.{self.domain}"
        self._addresses: dict[str, ipaddress.IPv4Address] = {self.appliance_name: settings.address.ip}
        self._names: dict[ipaddress.IPv4Address, str] = {settings.address.ip: self.appliance_name}
        for name, ip in hosts.items():
            fqdn = f"{name.lower()}.{self.domain}"
            self._addresses[fqdn] = ip
            self._names[ip] = fqdn
        # serial: any constant works, the zone is rebuilt from the inventory at each start
        self._soa = SOA(self.appliance_name, f"hostmaster.{self.domain}", (1, 3600, 600, 86400, self.ttl))

    def is_ours(self, name: str) -> bool:
        """Return whether a (lower-case, dot-less) name lies in the domain or in the appliance's reverse zone."""
        if name == self.domain or name.endswith("." + self.domain):
            return True
        ip = _reverse_ip(name)
        return ip is not None and (ip in self._names or ip in self.network)

    def answer(self, request: DNSRecord) -> DNSRecord | None:
        """Return the authoritative reply to a one-question query, or None when the name is not ours."""
        q = request.q
        name = _name(q.qname)
        if q.qclass not in (CLASS_IN, CLASS_ANY) or not self.is_ours(name):
            return None
        reply = new_reply(request, ra=self.recursion_available, aa=True)
        if name.endswith(".in-addr.arpa"):
            ip = _reverse_ip(name)
            target = self._names.get(ip) if ip is not None else None
            if target is None:
                reply.header.rcode = RCODE.NXDOMAIN
            elif q.qtype in (QTYPE.PTR, QTYPE.ANY):
                reply.add_answer(RR(q.qname, QTYPE.PTR, rdata=PTR(target + "."), ttl=self.ttl))
            return reply
        address = self._addresses.get(name)
        if name == self.domain:
            if q.qtype in (QTYPE.SOA, QTYPE.ANY):
                reply.add_answer(RR(q.qname, QTYPE.SOA, rdata=self._soa, ttl=self.ttl))
            if q.qtype in (QTYPE.NS, QTYPE.ANY):
                reply.add_answer(RR(q.qname, QTYPE.NS, rdata=NS(self.appliance_name + "."), ttl=self.ttl))
                reply.add_ar(RR(self.appliance_name + ".", QTYPE.A, rdata=A(str(self._addresses[self.appliance_name])), ttl=self.ttl))
        elif address is None:
            reply.header.rcode = RCODE.NXDOMAIN
        elif q.qtype in (QTYPE.A, QTYPE.ANY):
            reply.add_answer(RR(q.qname, QTYPE.A, rdata=A(str(address)), ttl=self.ttl))
        if not reply.rr:
            # NXDOMAIN or NODATA: the SOA lets resolvers cache the negative answer (RFC 2308 3)
            reply.add_auth(RR(self.domain + ".", QTYPE.SOA, rdata=self._soa, ttl=self.ttl))
        return reply


def _error_reply(request: DNSRecord, rcode: int, ra: bool) -> DNSRecord:
    reply = new_reply(request, ra=ra, aa=False)
    reply.header.rcode = rcode
    return reply


def _edns_size(request: DNSRecord) -> int | None:
    """Return the requester's EDNS UDP payload size (RFC 6891 6.1.2), or None without EDNS."""
    for rr in request.ar:
        if rr.rtype == QTYPE.OPT:
            return max(CLASSIC_UDP_SIZE, int(rr.rclass))
    return None


def _pack(request: DNSRecord, reply: DNSRecord, udp: bool) -> bytes:
    """Encode a reply, with an OPT record when the query had one; over UDP, truncate (TC) what does not fit."""
    edns = _edns_size(request)
    if edns is not None:
        reply.add_ar(EDNS0(udp_len=EDNS_UDP_SIZE))
    data = reply.pack()
    if udp and len(data) > (edns or CLASSIC_UDP_SIZE):
        # RFC 1035 4.2.1 / RFC 6891 7: keep the header and question, set TC, the client retries over TCP
        short = new_reply(request, ra=bool(reply.header.ra), aa=bool(reply.header.aa))
        short.header.rcode = reply.header.rcode
        short.header.tc = 1
        data = short.pack()
    return data


@dataclass
class _Pending:
    """A query forwarded upstream under a fresh id, waiting for the answer."""

    request: DNSRecord
    question: tuple[str, int, int]
    query: bytes
    reply_to: Callable[[bytes], None]
    upstream: int = 0
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


class _ServerProtocol(asyncio.DatagramProtocol):
    def __init__(self, service: "DnsService") -> None:
        self.service = service

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.service._udp_query(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("dns: socket error %s", exc)


class _UpstreamProtocol(asyncio.DatagramProtocol):
    def __init__(self, service: "DnsService", index: int) -> None:
        self.service = service
        self.index = index

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.service._upstream_reply(data, self.index)

    def error_received(self, exc: Exception) -> None:
        # e.g. ICMP port unreachable from a dead upstream: the pending query times out and moves on
        log.debug("dns: upstream %d error %s", self.index, exc)


class DnsService:
    """Authoritative for the inventory's names; forwards or refuses the rest."""

    name = "dns"

    def __init__(self, settings: DnsSettings, hosts: Mapping[str, ipaddress.IPv4Address], *,
                 forward_timeout: float = FORWARD_TIMEOUT_S) -> None:
        self._settings = settings
        self._forward_timeout_s = forward_timeout
        self._forward = settings.unknown == "forward" and bool(settings.upstream)
        self.set_hosts(hosts)
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._upstreams: list[asyncio.DatagramTransport] = []
        self._pending: dict[int, _Pending] = {}
        self._tcp_tasks: set[asyncio.Task[None]] = set()
        self._tcp_writers: set[asyncio.StreamWriter] = set()
        self.port = settings.port
        self._quiet_until = 0.0
        self.latency = {"query": Latency()}
        self._counters = dict.fromkeys(
            ("received", "sent", "dropped_malformed", "dropped_not_query", "answered", "nxdomain", "refused",
             "formerr", "notimp", "forwarded", "forward_replies", "forward_timeouts", "forward_dropped",
             "servfail", "tcp_connections", "errors"),
            0,
        )

    def set_hosts(self, hosts: Mapping[str, ipaddress.IPv4Address]) -> None:
        """Answer for a reloaded inventory's names from now on."""
        self.zone = DnsZone(self._settings, hosts, recursion_available=self._forward)

    # -- Service contract ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind UDP and TCP on the appliance address and open the upstream sockets; BindError on failure."""
        loop = asyncio.get_running_loop()
        host = str(self._settings.address.ip)
        try:
            transport, _ = await loop.create_datagram_endpoint(lambda: _ServerProtocol(self), local_addr=(host, self.port))
        except OSError as exc:
            raise BindError(f"dns: cannot bind UDP {host}:{self.port}: {exc.strerror or exc} "
                            f"(another DNS server on the port, or the address is not on {self._settings.interface}?)") from exc
        self._udp = transport  # type: ignore[assignment]
        self.port = transport.get_extra_info("sockname")[1]
        try:
            self._tcp = await asyncio.start_server(self._tcp_client, host, self.port)
            if self._forward:
                for i, (up_host, up_port) in enumerate(self._settings.upstream):
                    up, _ = await loop.create_datagram_endpoint(lambda i=i: _UpstreamProtocol(self, i), remote_addr=(up_host, up_port))
                    self._upstreams.append(up)  # type: ignore[arg-type]
        except OSError as exc:
            await self.close()
            raise BindError(f"dns: cannot bind TCP {host}:{self.port} or reach an upstream: {exc.strerror or exc}") from exc
        log.info("dns: serving %s on %s:%d (%s)", self.zone.domain, host, self.port,
                 "forwarding to " + ", ".join(f"{h}:{p}" for h, p in self._settings.upstream) if self._forward else "refusing others")

    async def serve(self) -> None:
        """Serve until cancelled (the sockets bound in start() deliver to the protocol callbacks)."""
        await asyncio.get_running_loop().create_future()

    async def close(self) -> None:
        """Close every socket and pending forward; safe to call twice and after a failed start."""
        for pending in self._pending.values():
            if pending.timer is not None:
                pending.timer.cancel()
        self._pending.clear()
        for up in self._upstreams:
            up.close()
        self._upstreams.clear()
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for task in list(self._tcp_tasks):
                task.cancel()
            for writer in list(self._tcp_writers):
                writer.close()
            await self._tcp.wait_closed()
            self._tcp = None

    def stats(self) -> dict[str, int]:
        """Return counters (received, sent, dropped_malformed, answered, forwarded, ...)."""
        return dict(self._counters) | {"pending_forwards": len(self._pending)}

    # -- one query ----------------------------------------------------------------------------------

    def _handle(self, data: bytes, reply_to: Callable[[bytes], None], udp: bool) -> None:
        """Answer, forward or refuse one message; drop and count what cannot be decoded or is not a query."""
        self._counters["received"] += 1
        try:
            request = decode_query(data)
        except MalformedPacket as exc:
            self._counters["dropped_malformed"] += 1
            log.debug("%s", exc)
            return
        if request.header.qr:
            self._counters["dropped_not_query"] += 1
            return

        def send(reply: DNSRecord) -> None:
            self._counters["sent"] += 1
            reply_to(_pack(request, reply, udp))

        if request.header.opcode != OPCODE.QUERY:
            self._counters["notimp"] += 1
            return send(_error_reply(request, RCODE.NOTIMP, self._forward))
        if len(request.questions) != 1:
            self._counters["formerr"] += 1
            return send(_error_reply(request, RCODE.FORMERR, self._forward))
        try:
            reply = self.zone.answer(request)
        except Exception:  # a policy bug must not cost the other queries: log it, answer SERVFAIL
            log.exception("dns: cannot answer %s", request.q)
            self._counters["servfail"] += 1
            return send(_error_reply(request, RCODE.SERVFAIL, self._forward))
        if reply is not None:
            self._counters["nxdomain" if reply.header.rcode == RCODE.NXDOMAIN else "answered"] += 1
            return send(reply)
        if not self._forward:
            self._counters["refused"] += 1
            return send(_error_reply(request, RCODE.REFUSED, False))
        if not udp:
            task = asyncio.get_running_loop().create_task(self._forward_tcp(request, data, reply_to))
            self._tcp_tasks.add(task)
            task.add_done_callback(self._tcp_tasks.discard)
        else:
            self._forward_udp(request, data, reply_to)

    def _udp_query(self, data: bytes, addr: tuple[str, int]) -> None:
        def reply_to(payload: bytes) -> None:
            if self._udp is not None:
                self._udp.sendto(payload, addr)

        started = time.perf_counter()
        try:
            self._handle(data, reply_to, True)
            self.latency["query"].observe(time.perf_counter() - started)  # forwarded: until handed upstream
        except Exception:  # a datagram nobody foresaw: count it; one traceback a minute at most (logs stay bounded)
            self._counters["errors"] += 1
            now = time.monotonic()
            if now >= self._quiet_until:
                self._quiet_until = now + 60.0
                log.exception("dns: cannot handle a datagram from %s:%d (more are only counted for a minute)", *addr[:2])

    # -- forwarding over UDP, with id remapping --------------------------------------------------------

    def _forward_udp(self, request: DNSRecord, data: bytes, reply_to: Callable[[bytes], None]) -> None:
        if len(self._pending) >= MAX_PENDING_FORWARDS:
            self._counters["servfail"] += 1
            self._counters["sent"] += 1
            reply_to(_pack(request, _error_reply(request, RCODE.SERVFAIL, True), True))
            return
        # A fresh, unpredictable id per forwarded query: clients' ids may collide, and a guessable id
        # would let anyone on the path inject answers (RFC 5452 9.2).
        upstream_id = secrets.randbelow(65536)
        while upstream_id in self._pending:
            upstream_id = secrets.randbelow(65536)
        q = request.q
        pending = _Pending(
            request=request,
            question=(_name(q.qname), int(q.qtype), int(q.qclass)),
            query=struct.pack("!H", upstream_id) + data[2:],
            reply_to=reply_to,
        )
        self._pending[upstream_id] = pending
        self._counters["forwarded"] += 1
        self._send_upstream(upstream_id, pending)

    def _send_upstream(self, upstream_id: int, pending: _Pending) -> None:
        self._upstreams[pending.upstream].sendto(pending.query)
        pending.timer = asyncio.get_running_loop().call_later(self._forward_timeout_s, self._forward_timeout, upstream_id)

    def _forward_timeout(self, upstream_id: int) -> None:
        pending = self._pending.get(upstream_id)
        if pending is None:
            return
        self._counters["forward_timeouts"] += 1
        if pending.upstream + 1 < len(self._upstreams):
            pending.upstream += 1
            self._send_upstream(upstream_id, pending)
            return
        del self._pending[upstream_id]
        self._counters["servfail"] += 1
        self._counters["sent"] += 1
        pending.reply_to(_pack(pending.request, _error_reply(pending.request, RCODE.SERVFAIL, True), True))

    def _upstream_reply(self, data: bytes, index: int) -> None:
        if len(data) < 12:
            self._counters["forward_dropped"] += 1
            return
        upstream_id = struct.unpack("!H", data[:2])[0]
        pending = self._pending.get(upstream_id)
        try:
            response = decode_query(data)
        except MalformedPacket:
            response = None
        if (
            pending is None
            or index > pending.upstream  # never sent to that upstream (a late answer of an earlier one is fine)
            or response is None
            or not response.header.qr
            or len(response.questions) != 1
            or (_name(response.q.qname), int(response.q.qtype), int(response.q.qclass)) != pending.question
        ):
            # unknown id (late or duplicate), wrong upstream, or not answering our question: drop it
            self._counters["forward_dropped"] += 1
            return
        del self._pending[upstream_id]
        if pending.timer is not None:
            pending.timer.cancel()
        self._counters["forward_replies"] += 1
        self._counters["sent"] += 1
        pending.reply_to(struct.pack("!H", pending.request.header.id) + data[2:])

    # -- TCP (RFC 7766): two-byte length prefix, several queries per connection --------------------------

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._counters["tcp_connections"] += 1
        self._tcp_writers.add(writer)

        def reply_to(payload: bytes) -> None:
            if not writer.is_closing():
                writer.write(struct.pack("!H", len(payload)) + payload)

        try:
            while True:
                prefix = await within(reader.readexactly(2), TCP_IDLE_TIMEOUT_S)
                data = await within(reader.readexactly(struct.unpack("!H", prefix)[0]), TCP_IDLE_TIMEOUT_S)
                self._handle(data, reply_to, False)
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            self._tcp_writers.discard(writer)
            writer.close()

    async def _forward_tcp(self, request: DNSRecord, data: bytes, reply_to: Callable[[bytes], None]) -> None:
        """Forward a query that came over TCP over TCP too (its answer may not fit a datagram)."""
        self._counters["forwarded"] += 1
        for host, port in self._settings.upstream:
            try:
                reader, writer = await within(asyncio.open_connection(host, port), self._forward_timeout_s)
            except (OSError, asyncio.TimeoutError):
                self._counters["forward_timeouts"] += 1
                continue
            try:
                writer.write(struct.pack("!H", len(data)) + data)
                prefix = await within(reader.readexactly(2), self._forward_timeout_s)
                answer = await within(reader.readexactly(struct.unpack("!H", prefix)[0]), self._forward_timeout_s)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                self._counters["forward_timeouts"] += 1
                continue
            finally:
                writer.close()
            self._counters["forward_replies"] += 1
            self._counters["sent"] += 1
            reply_to(answer)
            return
        self._counters["servfail"] += 1
        self._counters["sent"] += 1
        reply_to(_pack(request, _error_reply(request, RCODE.SERVFAIL, True), False))
