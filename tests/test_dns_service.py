"""DNS service on loopback: dnslib's client and dig resolve inventory names; NXDOMAIN, REFUSED, forwarding, garbage."""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from pathlib import Path
from typing import AsyncIterator

import pytest
from dnslib import QTYPE, RCODE, RR, A, DNSRecord

from domain.errors import BindError
from netboot.dns import DnsService, DnsSettings

HOSTS = {"node-1": ipaddress.IPv4Address("127.0.0.11"), "node-2": ipaddress.IPv4Address("127.0.0.12")}


def make_service(**dns: object) -> DnsService:
    """DNS on lo/127.0.0.1 for two nodes, on a kernel-chosen port unless told otherwise."""
    forward_timeout = dns.pop("forward_timeout", None)
    settings = DnsSettings(**({"interface": "lo", "address": ipaddress.IPv4Interface("127.0.0.1/8"),  # type: ignore[arg-type]
                               "domain": "cluster.test", "port": 0} | dns))
    if forward_timeout is None:
        return DnsService(settings, HOSTS)
    return DnsService(settings, HOSTS, forward_timeout=float(forward_timeout))  # type: ignore[arg-type]


@pytest.fixture
async def dns(tmp_path: Path) -> AsyncIterator[DnsService]:
    service = make_service()
    await service.start()
    try:
        yield service
    finally:
        await service.close()


async def ask(port: int, name: str, qtype: str = "A", tcp: bool = False) -> DNSRecord:
    """Query with dnslib's own (blocking) client, in a thread so the service keeps running on this loop."""
    q = DNSRecord.question(name, qtype)
    raw = await asyncio.to_thread(q.send, "127.0.0.1", port, tcp, 5)
    reply = DNSRecord.parse(raw)
    assert reply.header.id == q.header.id
    return reply


async def dig(port: int, *args: str) -> str:
    """Run dig against the service; return its +short output."""
    proc = await asyncio.create_subprocess_exec(
        "dig", "@127.0.0.1", "-p", str(port), "+short", "+time=3", "+tries=1", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode().strip()


async def dig_status(port: int, *args: str) -> str:
    """Run dig and return the status word of its header (NOERROR, NXDOMAIN, REFUSED, ...)."""
    proc = await asyncio.create_subprocess_exec(
        "dig", "@127.0.0.1", "-p", str(port), "+time=3", "+tries=1", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    for line in out.decode().splitlines():
        if "status:" in line:
            return line.split("status:")[1].split(",")[0].strip()
    raise AssertionError(f"no status in dig output:\n{out.decode()}")


async def test_dnslib_client_gets_authoritative_a_record(dns: DnsService) -> None:
    reply = await ask(dns.port, "node-1.cluster.test")
    assert reply.header.rcode == RCODE.NOERROR and reply.header.aa == 1
    assert [(str(rr.rname), rr.rtype, str(rr.rdata), rr.ttl) for rr in reply.rr] == [
        ("node-1.cluster.test.", QTYPE.A, "127.0.0.11", 60)
    ]


async def test_names_are_case_insensitive_and_the_appliance_has_one(dns: DnsService) -> None:
    reply = await ask(dns.port, "NODE-2.Cluster.Test")
    assert str(reply.rr[0].rdata) == "127.0.0.12"
    reply = await ask(dns.port, "rackboot.cluster.test")
    assert str(reply.rr[0].rdata) == "127.0.0.1"


async def test_dig_resolves_node_names_and_addresses(dns: DnsService) -> None:
    assert await dig(dns.port, "node-1.cluster.test") == "127.0.0.11"
    assert await dig(dns.port, "-x", "127.0.0.12") == "node-2.cluster.test."
    assert await dig(dns.port, "-x", "127.0.0.1") == "rackboot.cluster.test."
    assert await dig(dns.port, "+tcp", "node-2.cluster.test") == "127.0.0.12"


async def test_unknown_name_in_domain_is_nxdomain_with_soa(dns: DnsService) -> None:
    reply = await ask(dns.port, "node-99.cluster.test")
    assert reply.header.rcode == RCODE.NXDOMAIN and reply.header.aa == 1 and not reply.rr
    assert [rr.rtype for rr in reply.auth] == [QTYPE.SOA]
    assert await dig_status(dns.port, "node-99.cluster.test") == "NXDOMAIN"
    assert await dig_status(dns.port, "-x", "127.0.0.99") == "NXDOMAIN"
    assert dns.stats()["nxdomain"] == 3


async def test_known_name_without_that_record_type_is_nodata(dns: DnsService) -> None:
    reply = await ask(dns.port, "node-1.cluster.test", "AAAA")
    assert reply.header.rcode == RCODE.NOERROR and not reply.rr and reply.auth[0].rtype == QTYPE.SOA


async def test_names_outside_the_domain_are_refused_by_default(dns: DnsService) -> None:
    reply = await ask(dns.port, "example.org")
    assert reply.header.rcode == RCODE.REFUSED and not reply.rr
    assert await dig_status(dns.port, "example.org") == "REFUSED"
    assert await dig_status(dns.port, "-x", "192.0.2.1") == "REFUSED"
    assert dns.stats()["refused"] == 3


async def test_malformed_datagram_is_dropped_and_counted_and_service_keeps_answering(dns: DnsService) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07trunc", ("127.0.0.1", dns.port))
        s.sendto(b"\xff", ("127.0.0.1", dns.port))
    # the service answers the next query, hence has already processed both datagrams (same socket, in order)
    reply = await ask(dns.port, "node-1.cluster.test")
    assert str(reply.rr[0].rdata) == "127.0.0.11"
    assert dns.stats()["dropped_malformed"] == 2
    assert dns.stats()["received"] == 3


def long_name_query(total: int) -> bytes:
    """A query whose name has legal labels (<= 63 octets) but more than 255 octets in all (RFC 1035 2.3.4)."""
    labels = b""
    while len(labels) < total:
        labels += bytes([50]) + b"a" * 50
    return b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + labels + b"\x00\x00\x01\x00\x01"


async def test_over_long_names_are_dropped_quietly(dns: DnsService, caplog: pytest.LogCaptureFixture) -> None:
    """Defect of 2026-12-05: a name over 255 octets raised outside the protected block, a traceback per packet."""
    caplog.set_level(logging.DEBUG, logger="asyncio")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for total in (260, 300, 1000):
            s.sendto(long_name_query(total), ("127.0.0.1", dns.port))
    reply = await ask(dns.port, "node-1.cluster.test")
    assert str(reply.rr[0].rdata) == "127.0.0.11"
    assert dns.stats()["dropped_malformed"] == 3
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text[-2000:]


async def test_bind_error_when_port_taken(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        service = make_service(port=port)
        with pytest.raises(BindError, match=f"127.0.0.1:{port}"):
            await service.start()
        await service.close()


class FakeUpstream(asyncio.DatagramProtocol):
    """A tiny resolver: answers every A query with 192.0.2.1, or stays silent; records the ids it saw."""

    def __init__(self, silent: bool = False) -> None:
        self.silent = silent
        self.ids: list[int] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = DNSRecord.parse(data)
        self.ids.append(query.header.id)
        if self.silent:
            return
        reply = query.reply(aa=0)
        reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A("192.0.2.1"), ttl=30))
        assert self.transport is not None
        self.transport.sendto(reply.pack(), addr)


async def start_upstream(silent: bool = False) -> tuple[asyncio.DatagramTransport, FakeUpstream, int]:
    transport, proto = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: FakeUpstream(silent), local_addr=("127.0.0.1", 0)
    )
    return transport, proto, transport.get_extra_info("sockname")[1]  # type: ignore[return-value]


async def start_tcp_upstream(port: int, seen: list[int]) -> asyncio.Server:
    """The same tiny resolver over TCP (RFC 7766 framing), on the given port."""

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        size = int.from_bytes(await reader.readexactly(2), "big")
        query = DNSRecord.parse(await reader.readexactly(size))
        seen.append(query.header.id)
        reply = query.reply(aa=0)
        reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A("192.0.2.2"), ttl=30))
        data = reply.pack()
        writer.write(len(data).to_bytes(2, "big") + data)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(client, "127.0.0.1", port)


async def test_other_names_are_forwarded_with_a_fresh_id(tmp_path: Path) -> None:
    up_transport, upstream, up_port = await start_upstream()
    service = make_service(unknown="forward", upstream=(("127.0.0.1", up_port),))
    await service.start()
    try:
        queries = [DNSRecord.question(f"host{i}.example.org") for i in range(5)]
        for q in queries:
            q.header.id = 4242  # every client picked the same id: the upstream ids must still differ
        raws = await asyncio.gather(*(asyncio.to_thread(q.send, "127.0.0.1", service.port, False, 5) for q in queries))
        for q, raw in zip(queries, raws):
            reply = DNSRecord.parse(raw)
            assert reply.header.id == 4242
            assert str(reply.q.qname) == str(q.q.qname)
            assert str(reply.rr[0].rdata) == "192.0.2.1"
        assert len(set(upstream.ids)) == 5
        assert await dig(service.port, "www.example.org") == "192.0.2.1"
        tcp_seen: list[int] = []
        tcp_upstream = await start_tcp_upstream(up_port, tcp_seen)
        try:
            assert await dig(service.port, "+tcp", "tcp.example.org") == "192.0.2.2"
        finally:
            tcp_upstream.close()
        assert len(tcp_seen) == 1
        # our own names are still answered locally, not forwarded
        assert await dig(service.port, "node-1.cluster.test") == "127.0.0.11"
        assert service.stats()["forwarded"] == 7 and service.stats()["pending_forwards"] == 0
    finally:
        await service.close()
        up_transport.close()


async def test_silent_upstream_gives_servfail_after_timeout(tmp_path: Path) -> None:
    up_transport, upstream, up_port = await start_upstream(silent=True)
    service = make_service(unknown="forward", upstream=(("127.0.0.1", up_port),), forward_timeout=0.2)
    await service.start()
    try:
        reply = await ask(service.port, "example.org")
        assert reply.header.rcode == RCODE.SERVFAIL
        assert len(upstream.ids) == 1 and service.stats()["forward_timeouts"] == 1
    finally:
        await service.close()
        up_transport.close()


async def test_second_upstream_answers_when_first_is_silent(tmp_path: Path) -> None:
    t1, silent, p1 = await start_upstream(silent=True)
    t2, good, p2 = await start_upstream()
    service = make_service(unknown="forward", upstream=(("127.0.0.1", p1), ("127.0.0.1", p2)), forward_timeout=0.2)
    await service.start()
    try:
        reply = await ask(service.port, "example.org")
        assert str(reply.rr[0].rdata) == "192.0.2.1"
        assert len(silent.ids) == 1 and len(good.ids) == 1
    finally:
        await service.close()
        t1.close()
        t2.close()


async def test_formerr_notimp_and_stray_responses(dns: DnsService) -> None:
    two = DNSRecord.question("node-1.cluster.test")
    two.add_question(DNSRecord.question("node-2.cluster.test").q)
    reply = DNSRecord.parse(await asyncio.to_thread(two.send, "127.0.0.1", dns.port, False, 5))
    assert reply.header.rcode == RCODE.FORMERR
    notify = DNSRecord.question("cluster.test", "SOA")
    notify.header.opcode = 4  # NOTIFY (RFC 1996)
    reply = DNSRecord.parse(await asyncio.to_thread(notify.send, "127.0.0.1", dns.port, False, 5))
    assert reply.header.rcode == RCODE.NOTIMP
    stray = DNSRecord.question("node-1.cluster.test").reply()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(stray.pack(), ("127.0.0.1", dns.port))  # a response is never answered (no reflection loops)
    await ask(dns.port, "node-1.cluster.test")
    assert dns.stats()["dropped_not_query"] == 1 and dns.stats()["formerr"] == 1 and dns.stats()["notimp"] == 1
