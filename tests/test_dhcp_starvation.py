"""Starvation (issue 11): random MACs flooding DISCOVER/REQUEST while inventory nodes keep asking.

Policy tier: the token buckets on a fake clock, what `DhcpPolicy.admit` limits (MACs outside the inventory, per
relay or ingress port), pool exhaustion reported. Service tier: a flood of 2,000 random MACs over loopback UDP
beside inventory nodes, with and without the rate limit. No timing is asserted here: bench/dhcp_starvation.py
carries the latency target (every inventory node answered within 1 s) with 10,000 MACs.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
import time
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from appliance.app import dhcp_settings
from appliance.config import load_config
from appliance.events import EventBus
from appliance.metrics import ApplianceCollector
from fakes import FakeClock
from helpers import NODE1_MAC, NODE2_MAC, NOW, STRANGER, opts_of, pool, request_bytes
from helpers import make_dhcp as make_config
from netboot.dhcp4 import options as o
from netboot.dhcp4.codec import DhcpPacket, decode, encode
from netboot.dhcp4.leases import LeaseTable
from netboot.dhcp4.policy import POOL_EXHAUSTED, VIA_DHCP, VIA_PXE, Admission, DhcpPolicy
from netboot.dhcp4.ratelimit import RateLimit, SourceLimiter, TokenBucket, parse_rate
from netboot.dhcp4.server import DhcpService
from bpf_interpreter import run_program
from netboot.dhcp4.steering import DROP, KEEP, NODE_SOCKET, OTHER_SOCKET, socket_filters, steering_program
from test_config import MINIMAL_CONFIG, MINIMAL_NODES, problems_of, write
from test_dhcp_service import free_udp_port, lo_client, serving

# ---------------------------------------------------------------- policy tier


def test_token_bucket_spends_its_burst_then_refills_at_its_rate(fake_clock: FakeClock) -> None:
    bucket = TokenBucket(RateLimit(rate=4.0, burst=5), fake_clock.now())
    assert [bucket.take(fake_clock.now()) for _ in range(6)] == [True] * 5 + [False]
    fake_clock.advance(0.125)  # half a token
    assert not bucket.take(fake_clock.now())
    fake_clock.advance(0.125)  # one token
    assert bucket.take(fake_clock.now()) and not bucket.take(fake_clock.now())
    fake_clock.advance(3600)  # refills up to the burst, no further
    assert sum(bucket.take(fake_clock.now()) for _ in range(10)) == 5
    fake_clock.t -= 100  # a clock going backwards refills nothing
    assert not bucket.take(fake_clock.now())


def test_source_limiter_keeps_a_bucket_per_source_and_a_bounded_number_of_them(fake_clock: FakeClock) -> None:
    limiter = SourceLimiter(RateLimit(rate=1.0, burst=2), max_sources=3)
    now = fake_clock.now()
    assert [limiter.admit("a", now) for _ in range(3)] == [True, True, False]
    assert limiter.admit("b", now) and limiter.admit("b", now) and not limiter.admit("b", now)
    assert limiter.dropped == 2 and limiter.take_report() == {"a": 1, "b": 1} and limiter.take_report() == {}
    for key in range(100):  # many sources: the least recently heard are forgotten
        limiter.admit(key, now)
    assert len(limiter) == 3
    fake_clock.advance(1.0)
    assert limiter.admit("a", fake_clock.now())  # "a" was forgotten: a new full bucket


def test_rates_read_per_second_or_per_minute() -> None:
    assert parse_rate("100/s") == 100 and parse_rate("6000/min") == 100 and parse_rate("2.5") == 2.5
    for bad in ("0/s", "-1/s", "ten/s", "5/h", "nan", "inf/s"):
        with pytest.raises(ValueError):
            parse_rate(bad)


@pytest.mark.parametrize("value, expected", [("", (200.0, 1000)), ("\n  unknown_rate: 50/s\n  unknown_burst: 20", (50.0, 20)),
                                             ("\n  unknown_rate: 600/min", (10.0, 1000)), ("\n  unknown_rate: off", None),
                                             ("\n  unknown_rate: 'off'", None)])
def test_unknown_rate_in_the_config(tmp_path: Path, value: str, expected: tuple[float, int] | None) -> None:
    config = load_config(write(tmp_path, MINIMAL_CONFIG.replace("  mode: authoritative", "  mode: authoritative" + value),
                               MINIMAL_NODES))
    rate = dhcp_settings(config).unknown_rate
    assert (rate.rate, rate.burst) == expected if rate is not None else expected is None


def test_a_bad_unknown_rate_is_a_config_error(tmp_path: Path) -> None:
    config = MINIMAL_CONFIG.replace("  mode: authoritative", "  mode: authoritative\n  unknown_rate: lots\n  unknown_burst: 0")
    text = "\n".join(problems_of(write(tmp_path, config, MINIMAL_NODES)))
    assert "dhcp.unknown_rate: expected a rate like 200/s or 6000/min, or 'off', got 'lots'" in text
    assert "dhcp.unknown_burst: expected a positive int" in text


def _policy(rate: RateLimit | None = RateLimit(rate=2.0, burst=3), **dhcp: Any) -> DhcpPolicy:
    config = make_config(unknown_rate=rate, **dhcp)
    reserved = [r.ip for r in config.reservations.values()] + [config.settings.server_ip]
    return DhcpPolicy(config.settings, config.reservations, LeaseTable(None, config.settings.pool, reserved))


def test_unknown_macs_are_limited_per_relay_and_per_port_inventory_never(fake_clock: FakeClock) -> None:
    policy = _policy()
    now = fake_clock.now()
    direct = request_bytes(STRANGER, "discover")
    assert [policy.admit(direct, VIA_DHCP, now) for _ in range(4)] == [True, True, True, False]
    # another relay (RFC 3046: giaddr names the client's segment) and the PXE port have buckets of their own
    relayed = request_bytes("02:00:00:00:01:01", "discover", giaddr="10.9.0.1")
    assert [policy.admit(relayed, VIA_DHCP, now) for _ in range(4)] == [True, True, True, False]
    assert policy.admit(request_bytes(STRANGER, "request", giaddr="10.9.0.2"), VIA_DHCP, now)
    assert policy.admit(direct, VIA_PXE, now)
    # inventory nodes: never limited, and they spend no token of their segment
    for _ in range(1000):
        assert policy.admit(request_bytes(NODE1_MAC, "discover"), VIA_DHCP, now) is Admission.NODE
        assert policy.admit(request_bytes(NODE2_MAC, "request", giaddr="10.9.0.1"), VIA_DHCP, now) is Admission.NODE
    assert not policy.admit(direct, VIA_DHCP, now)
    fake_clock.advance(0.5)  # one token back at 2/s
    assert policy.admit(direct, VIA_DHCP, fake_clock.now()) and not policy.admit(direct, VIA_DHCP, fake_clock.now())
    assert policy.admit(b"short", VIA_DHCP, now)  # not DHCP at all: the decoder drops it as malformed
    assert policy.limiter is not None and policy.limiter.dropped == 4
    assert _policy(rate=None).admit(direct, VIA_DHCP, now) is Admission.OTHER  # unknown_rate: off
    assert _policy(rate=None).admit(request_bytes(NODE1_MAC, "discover"), VIA_DHCP, now) is Admission.NODE


def test_rate_limiting_warns_once_a_minute_naming_the_sources(fake_clock: FakeClock,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    policy = _policy()
    relayed = request_bytes(STRANGER, "discover", giaddr="10.9.0.1")
    with caplog.at_level(logging.WARNING, logger="rackboot.dhcp"):
        for _ in range(1000):
            policy.admit(relayed, VIA_DHCP, fake_clock.now())
            fake_clock.advance(0.01)  # 100/s against 2/s for 10 s
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "relay 10.9.0.1" in lines[0] and "2/s, burst 3" in lines[0]
    with caplog.at_level(logging.WARNING, logger="rackboot.dhcp"):
        fake_clock.advance(60)
        for _ in range(10):
            policy.admit(relayed, VIA_DHCP, fake_clock.now())
    assert len(caplog.records) == 2 and "requests dropped in" in caplog.records[1].getMessage()


def test_pool_exhaustion_is_reported_once_a_minute_with_leases_and_offers(caplog: pytest.LogCaptureFixture) -> None:
    policy = _policy(pool=pool("10.77.0.100", "10.77.0.102"))
    with caplog.at_level(logging.WARNING, logger="rackboot.dhcp"):
        for i in range(3):
            mac = f"02:00:00:00:02:{i:02x}"
            assert policy.handle(decode(request_bytes(mac, "discover")), NOW).reply is not None
        policy.handle(decode(request_bytes("02:00:00:00:02:00", "request",
                                           options=[("requested_addr", "10.77.0.100"), ("server_id", "10.77.0.1")])), NOW)
        for i in range(50):
            decision = policy.handle(decode(request_bytes(f"02:00:00:00:03:{i:02x}", "discover")), NOW + i)
            assert decision.reply is None and decision.ignored == POOL_EXHAUSTED
        # the inventory is untouched by an exhausted pool
        reply = policy.handle(decode(request_bytes(NODE1_MAC, "discover")), NOW + 50).reply
        assert reply is not None and decode(reply.data).yiaddr == ipaddress.IPv4Address("10.77.0.11").packed
        # a minute later the two offers have expired (leases.OFFER_HOLD_S): two new MACs get them, a third none
        late = [policy.handle(decode(request_bytes(f"02:00:00:00:04:{i:02x}", "discover")), NOW + 61) for i in range(3)]
        assert [d.ignored for d in late] == ["", "", POOL_EXHAUSTED]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("dhcp: pool 10.77.0.100-10.77.0.102 exhausted: 1 leases, 2 offers pending")
    assert len(lines) == 2  # once at NOW, once a minute later


def test_steering_programs_tell_inventory_nodes_from_the_rest() -> None:
    nodes = [bytes.fromhex(m.replace(":", "")) for m in (NODE1_MAC, NODE2_MAC)]
    nodes += [bytes([2, 0, 0, 0x10, i >> 8, i & 0xff]) for i in range(450)]  # one prefix, three chunks of comparisons
    prog = steering_program(nodes)
    filters = socket_filters(nodes)
    assert prog is not None and filters is not None
    udp = bytes(8)  # a socket filter sees the UDP header first
    for mac, node in ((NODE1_MAC, True), (NODE2_MAC, True), ("02:00:00:10:01:c1", True), ("02:00:00:10:01:c2", False),
                      (STRANGER, False), ("52:54:00:77:00:03", False), ("52:54:00:78:00:01", False)):
        data = request_bytes(mac, "discover")
        assert run_program(prog, data) == (NODE_SOCKET if node else OTHER_SOCKET), mac
        assert run_program(filters[0], udp + data) == (KEEP if node else DROP), mac
        assert run_program(filters[1], udp + data) == (DROP if node else KEEP), mac
    short = request_bytes(NODE1_MAC, "discover")[:239]  # too short for DHCP: never on the nodes' socket
    assert run_program(prog, short) == OTHER_SOCKET and run_program(filters[0], udp + short) == DROP
    assert steering_program([bytes([i >> 16, 0, i >> 8 & 0xff, 0, i & 0xff, 1]) for i in range(5000)]) is None


# ---------------------------------------------------------------- service tier: real sockets on loopback

POOL_FIRST, POOL_LAST = "127.0.0.100", "127.0.0.119"  # 20 addresses for 2,000 random MACs
NODES = tuple((f"node-{i}", f"52:54:00:77:01:{i:02x}", f"127.0.0.{10 + i}") for i in range(1, 9))
FLOOD_MACS = 2000
SID = socket.inet_aton("127.0.0.1")
NODE_MAC = NODES[0][1]


def flood_packets(count: int, seed: int) -> list[bytes]:
    """A DISCOVER and a REQUEST (for a random pool address, to us) from each of `count` random MACs."""
    rng = random.Random(seed)
    first, last = int(ipaddress.IPv4Address(POOL_FIRST)), int(ipaddress.IPv4Address(POOL_LAST))
    out = []
    for n in range(count):
        chaddr = bytes([0x02]) + rng.randbytes(5) + bytes(10)
        xid = rng.getrandbits(31) | (1 << 31)  # inventory nodes use xids below 2**31: no collision
        wanted = rng.randint(first, last).to_bytes(4, "big")
        out.append(encode(DhcpPacket(xid=xid, flags=0x8000, chaddr=chaddr, options={o.MESSAGE_TYPE: bytes([o.DISCOVER])})))
        out.append(encode(DhcpPacket(xid=xid, flags=0x8000, chaddr=chaddr, options={
            o.MESSAGE_TYPE: bytes([o.REQUEST]), o.REQUESTED_IP: wanted, o.SERVER_ID: SID})))
    return out


class Replies:
    """Reads every reply on the clients' port and hands each to whoever waits for its transaction id."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.waiting: dict[int, asyncio.Future[bytes]] = {}
        self.others = 0

    async def run(self) -> None:
        """Dispatch replies until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            data, _ = await loop.sock_recvfrom(self.sock, 4096)
            fut = self.waiting.pop(int.from_bytes(data[4:8], "big"), None) if len(data) >= 240 else None
            if fut is not None and not fut.done():
                fut.set_result(data)
            else:
                self.others += 1

    async def ask(self, data: bytes, port: int) -> bytes:
        """Send one request and wait for its reply, resending every 2 s as a client would (at most 10 times)."""
        xid = int.from_bytes(data[4:8], "big")
        for _ in range(10):
            fut = self.waiting[xid] = asyncio.get_running_loop().create_future()
            self.sock.sendto(data, ("127.0.0.1", port))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    return await fut
        raise AssertionError(f"no reply to xid {xid:#x}")


@contextlib.asynccontextmanager
async def flooded_service(tmp_path: Path, rate: RateLimit | None) -> AsyncIterator[tuple[DhcpService, Replies, EventBus]]:
    """A DHCP service on 'lo' (high ports) with 8 inventory nodes and a 20-address pool, its events on a small bus."""
    config = make_config(address="127.0.0.1/8", interface="lo", nodes=NODES, port=free_udp_port(),
                         client_port=free_udp_port(), pool=pool(POOL_FIRST, POOL_LAST), unknown_rate=rate)
    bus = EventBus(max_macs=500)
    service = DhcpService(config.settings, config.reservations, bus.publish, None, tmp_path / "leases.journal")
    service.policy.max_exchanges = 500
    async with serving(service):
        with lo_client(config.settings.client_port) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            replies = Replies(sock)
            reader = asyncio.create_task(replies.run())
            try:
                yield service, replies, bus
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader


async def flood(service: DhcpService, sock: socket.socket, packets: list[bytes], chunk: int = 64) -> None:
    """Send the flood as fast as the server reads it: a chunk, then wait until the server has received it."""
    port = service.settings.port
    base = service.counters["received"]
    for start in range(0, len(packets), chunk):
        for data in packets[start:start + chunk]:
            sock.sendto(data, ("127.0.0.1", port))
        while service.counters["received"] - base < start + chunk - 64:  # keep about a chunk in flight
            await asyncio.sleep(0)


async def inventory_nodes_keep_asking(service: DhcpService, replies: Replies, rounds: int) -> dict[str, list[str]]:
    """Every inventory node does `rounds` DISCOVER/REQUEST exchanges; return the addresses offered and ACKed, by MAC."""
    got: dict[str, list[str]] = {mac: [] for _, mac, _ in NODES}

    async def node(i: int, mac: str, ip: str) -> None:
        for r in range(rounds):
            xid = (i << 16) | (r << 1)
            offer = await replies.ask(request_bytes(mac, "discover", xid=xid, flags=0x8000), service.settings.port)
            ack = await replies.ask(request_bytes(mac, "request", xid=xid + 1, flags=0x8000, options=[
                ("requested_addr", ip), ("server_id", "127.0.0.1")]), service.settings.port)
            for data, kind in ((offer, 2), (ack, 5)):
                assert opts_of(data)["message-type"] == kind
                got[mac].append(socket.inet_ntoa(data[16:20]))
            await asyncio.sleep(0)

    await asyncio.gather(*(node(i, mac, ip) for i, (_, mac, ip) in enumerate(NODES, 1)))
    return got


async def test_flood_rate_limited_inventory_served_exhaustion_reported_tables_bounded(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    limit = RateLimit(rate=50.0, burst=100)
    packets = flood_packets(FLOOD_MACS, seed=11)
    with caplog.at_level(logging.WARNING, logger="rackboot.dhcp"):
        async with flooded_service(tmp_path, limit) as (service, replies, bus):
            started = time.monotonic()
            _, got = await asyncio.gather(flood(service, replies.sock, packets),
                                          inventory_nodes_keep_asking(service, replies, rounds=5))
            while service.counters["received"] < len(packets) + 2 * 5 * len(NODES):
                await asyncio.sleep(0.01)  # the last chunk (and resent inventory requests) read
            elapsed = time.monotonic() - started
            stats = service.stats()
    assert got == {mac: [ip] * 10 for _, mac, ip in NODES}  # every offer and ACK: the node's reservation
    inventory = stats["received"] - len(packets)
    admitted = len(packets) - stats["rate_limited"]
    assert admitted <= limit.burst + limit.rate * elapsed + 1  # the limiter let through no more than its rate
    assert stats["rate_limited"] >= len(packets) - (limit.burst + limit.rate * elapsed + 1) and inventory >= 80
    assert stats["pool_exhausted"] > 0  # 20 addresses for the admitted random MACs
    assert stats["rate_limit_sources"] == 1  # every flood packet came in on the one port, without a relay
    assert stats["leases"] + stats["offers_pending"] <= 20 and stats["exchanges_tracked"] <= 500
    assert stats["errors"] == 0 and len(bus.macs()) <= 500
    # what Prometheus scrapes: the drops and exhaustion as counters, the table sizes as gauges
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ApplianceCollector(lambda: {"dhcp": stats}, lambda: []))  # type: ignore[arg-type]
    samples = {s.name: s.value for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}
    assert samples["rackboot_dhcp_rate_limited_total"] == stats["rate_limited"]
    assert samples["rackboot_dhcp_pool_exhausted_total"] == stats["pool_exhausted"]
    assert samples["rackboot_dhcp_offers_pending"] == stats["offers_pending"] and "rackboot_dhcp_exchanges_tracked" in samples
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"dhcp: pool {POOL_FIRST}-{POOL_LAST} exhausted: ") for m in messages)
    assert any("rate limit of MACs outside the inventory (50/s, burst 100" in m and "lo port" in m for m in messages)
    assert len(messages) <= 2 * (1 + int(elapsed // 60))  # one line a minute at most of each kind


async def test_flood_without_rate_limit_inventory_served_and_every_table_bounded(tmp_path: Path) -> None:
    packets = flood_packets(FLOOD_MACS, seed=12)
    async with flooded_service(tmp_path, None) as (service, replies, bus):
        _, got = await asyncio.gather(flood(service, replies.sock, packets),
                                      inventory_nodes_keep_asking(service, replies, rounds=3))
        while service.counters["received"] < len(packets) + 2 * 3 * len(NODES):
            await asyncio.sleep(0.01)
        stats = service.stats()
        leases = service.leases
    assert got == {mac: [ip] * 6 for _, mac, ip in NODES}
    assert stats["rate_limited"] == 0 and stats["pool_exhausted"] > 0 and stats["errors"] == 0
    # 4,000 requests from 2,000 MACs: the lease table and the offers never outgrow the pool, the per-MAC
    # exchange memory and the event history stay at their caps
    assert len(leases) <= 20 and stats["offers_pending"] <= 20 and stats["acks"] >= 20
    assert stats["exchanges_tracked"] == 500 and len(bus.macs()) == 500
    assert all(int(ipaddress.IPv4Address(POOL_FIRST)) <= leases.lease_for(m).ip <= int(ipaddress.IPv4Address(POOL_LAST))  # type: ignore[union-attr]
               for m in bus.macs() if leases.lease_for(m) is not None)


async def test_inventory_nodes_have_a_socket_of_their_own_for_unicasts_and_broadcasts(tmp_path: Path) -> None:
    async with flooded_service(tmp_path, RateLimit(rate=50.0, burst=100)) as (service, replies, _):
        assert service.steered and len(service._endpoints) == 2
        nodes, others = service._endpoints
        replies.sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        port = service.settings.port
        for n, dest in enumerate(("127.0.0.1", "255.255.255.255")):  # a relay's unicast, a client's broadcast
            for mac in (NODE_MAC, STRANGER):
                xid = 0x700 + 2 * n + (mac == STRANGER)
                replies.sock.sendto(request_bytes(mac, "discover", xid=xid, flags=0x8000), (dest, port))
        await asyncio.sleep(0)
        await flood(service, replies.sock, flood_packets(200, seed=13))
        while service.counters["received"] < 404:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # a duplicate (a broadcast given to both sockets) would arrive by now
        assert (nodes.received, others.received, service.counters["received"]) == (2, 402, 404)
