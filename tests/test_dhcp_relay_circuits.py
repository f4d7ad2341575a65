"""Rate limiting of MACs outside the inventory per relay agent circuit (issue 11; RFC 3046 option 82).

Codec tier: option 82 read from golden bytes without a decode (scapy builds the same bytes). Policy tier: the key
of a relayed request is giaddr with the agent circuit and remote IDs, giaddr alone without option 82, the ingress
on our own segment whatever the client puts in option 82; circuits per relay bounded. Service tier: two switch
ports behind one relay over loopback UDP, one flooding: the other's requests are all answered.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from pathlib import Path

import pytest
from scapy.layers.dhcp import BOOTP

from fakes import FakeClock
from helpers import NODE1_MAC, STRANGER, opts_of, pool, request_bytes
from helpers import make_dhcp as make_config
from netboot.dhcp4 import options as o
from netboot.dhcp4.codec import decode, peek_relay_agent_info
from netboot.dhcp4.leases import LeaseTable
from netboot.dhcp4.policy import VIA_DHCP, Admission, DhcpPolicy
from netboot.dhcp4.ratelimit import RateLimit, SourceLimiter
from netboot.dhcp4.server import DhcpService
from test_dhcp_service import free_udp_port, serving

# A relayed DISCOVER as a switch's relay agent sends it: option 82 with the agent circuit ID (RFC 3046 3.1, here
# the port "Gi1/0/17") and the agent remote ID (3.2, here the switch's MAC), appended last (2.1).
CIRCUIT_17 = b"\x01\x08Gi1/0/17\x02\x06\x00\x1b\x21\x0a\x0b\x0c"
GOLDEN_OPTIONS = bytes.fromhex(
    "63825363"                                    # magic cookie (RFC 2131 3)
    "350101"                                      # 53: DISCOVER
    "5212" "0108" "4769312f302f3137" "0206" "001b210a0b0c"  # 82, length 18: circuit ID, remote ID
    "ff")                                         # end


def test_option_82_is_read_without_a_decode_from_golden_bytes() -> None:
    data = request_bytes(STRANGER, "discover", giaddr="10.9.0.1", options=[("relay_agent_information", CIRCUIT_17)])
    assert data[236:] == GOLDEN_OPTIONS  # scapy, the independent builder, writes the golden bytes
    assert peek_relay_agent_info(data) == CIRCUIT_17 == decode(data).options[o.RELAY_AGENT_INFO]
    assert o.agent_circuit(CIRCUIT_17) == (b"Gi1/0/17", bytes.fromhex("001b210a0b0c"))
    # RFC 3396: an option split into instances is their concatenation
    split = data[:236] + bytes.fromhex("63825363" "350101" "520a") + CIRCUIT_17[:10] + b"\x52\x08" + CIRCUIT_17[10:] + b"\xff"
    assert peek_relay_agent_info(split) == CIRCUIT_17
    assert peek_relay_agent_info(request_bytes(STRANGER, "discover")) is None  # no option 82
    asks_82 = request_bytes(STRANGER, "discover", giaddr="10.9.0.1", options=[("param_req_list", [1, 3, 82])])
    assert b"\x52" in asks_82[240:] and peek_relay_agent_info(asks_82) is None  # octet 82 as a value only
    assert peek_relay_agent_info(data[:239]) is None  # too short
    assert peek_relay_agent_info(data[:236] + b"\0\0\0\0" + data[240:]) is None  # no magic cookie
    assert peek_relay_agent_info(data[:236] + bytes.fromhex("63825363" "350101" "5212" "0108")) is None  # overruns
    # only the circuit ID, only the remote ID, neither (a link selection sub-option 5, RFC 3527, only)
    assert o.agent_circuit(b"\x01\x02p1") == (b"p1", None) and o.agent_circuit(b"\x02\x01r") == (None, b"r")
    assert o.agent_circuit(b"\x05\x04\x0a\x09\x00\x00") is None and o.agent_circuit(b"") is None


def test_a_group_has_a_bounded_number_of_buckets_beyond_which_its_keys_share_the_groups(fake_clock: FakeClock) -> None:
    limiter = SourceLimiter(RateLimit(rate=1.0, burst=2), max_sources=10, max_per_group=3)
    now = fake_clock.now()
    for circuit in range(3):
        assert limiter.admit(("r", circuit), now, group="r") and limiter.admit(("r", circuit), now, group="r")
        assert not limiter.admit(("r", circuit), now, group="r")
    # the group is full: new keys of it spend the group's own bucket, made-up keys buy no bucket
    assert [limiter.admit(("r", circuit), now, group="r") for circuit in range(3, 100)] == [True, True] + [False] * 95
    assert len(limiter) == 4 and limiter.take_report()["r"] == 95
    # other sources keep theirs; when the group's keys are forgotten (least recently heard), it has room again
    for key in range(10):
        limiter.admit(key, now)
    assert len(limiter) == 10 and limiter._members == {}
    assert limiter.admit(("r", 50), now, group="r") and limiter.admit(("r", 50), now, group="r")
    assert limiter._members == {"r": 1}


def _policy(rate: RateLimit = RateLimit(rate=2.0, burst=3)) -> DhcpPolicy:
    config = make_config(unknown_rate=rate)
    reserved = [r.ip for r in config.reservations.values()] + [config.settings.server_ip]
    return DhcpPolicy(config.settings, config.reservations, LeaseTable(None, config.settings.pool, reserved))


def _relayed(mac: str, agent: bytes | None, giaddr: str = "10.9.0.1") -> bytes:
    options = [("relay_agent_information", agent)] if agent is not None else []
    return request_bytes(mac, "discover", giaddr=giaddr, options=options)


def test_unknown_macs_are_limited_per_circuit_of_a_relay(fake_clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    policy = _policy()
    now = fake_clock.now()
    port_17, port_18 = _relayed(STRANGER, CIRCUIT_17), _relayed(STRANGER, b"\x01\x08Gi1/0/18\x02\x06\x00\x1b\x21\x0a\x0b\x0c")
    with caplog.at_level(logging.WARNING, logger="rackboot.dhcp"):
        assert [policy.admit(port_17, VIA_DHCP, now) for _ in range(100)] == [True] * 3 + [False] * 97
    assert "relay 10.9.0.1 circuit-id 'Gi1/0/17' remote-id 0x001b210a0b0c" in caplog.records[0].getMessage()
    # another port of the same relay, and the same port of another switch (remote ID): buckets of their own
    assert [policy.admit(port_18, VIA_DHCP, now) for _ in range(4)] == [True] * 3 + [False]
    other_switch = _relayed(STRANGER, CIRCUIT_17.replace(b"\x0a\x0b\x0c", b"\x0a\x0b\x0d"))
    assert all(policy.admit(other_switch, VIA_DHCP, now) for _ in range(3))
    # a circuit ID alone, a remote ID alone: each a circuit of its own
    assert all(policy.admit(_relayed(STRANGER, b"\x01\x02p9"), VIA_DHCP, now) for _ in range(3))
    assert all(policy.admit(_relayed(STRANGER, b"\x02\x02r9"), VIA_DHCP, now) for _ in range(3))
    # without option 82, or with neither ID in it, the relay (giaddr) is the source: one bucket for both
    bare, link_only = _relayed(STRANGER, None), _relayed(STRANGER, b"\x05\x04\x0a\x09\x00\x00")
    assert [policy.admit(p, VIA_DHCP, now) for p in (bare, link_only, bare, link_only)] == [True] * 3 + [False]
    # the same circuit ID behind another relay is another circuit
    assert policy.admit(_relayed(STRANGER, CIRCUIT_17, giaddr="10.9.0.2"), VIA_DHCP, now)
    # inventory nodes behind the flooded port: never limited
    assert policy.admit(_relayed(NODE1_MAC, CIRCUIT_17), VIA_DHCP, now) is Admission.NODE


def test_option_82_from_our_own_segment_is_not_a_source(fake_clock: FakeClock) -> None:
    # RFC 3046 2.1 and 5: only a relay adds option 82; a client that forges one per request gets no bucket each
    policy = _policy()
    now = fake_clock.now()
    forged = [request_bytes(STRANGER, "discover", options=[("relay_agent_information", b"\x01\x02" + n.to_bytes(2, "big"))])
              for n in range(10)]
    assert [policy.admit(p, VIA_DHCP, now) for p in forged] == [True] * 3 + [False] * 7
    assert policy.limiter is not None and len(policy.limiter) == 1


# ---------------------------------------------------------------- service tier: real sockets on loopback

RELAY = "127.0.0.2"  # the relay agent: its own address on lo, where the server sends its replies (RFC 2131 4.1)


def relay_socket(port: int) -> socket.socket:
    """A relay agent's socket at RELAY:port; the server's wildcard sockets share the port (SO_REUSEPORT), and the
    kernel gives a datagram for RELAY to the socket bound to that very address."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind((RELAY, port))
    s.setblocking(False)
    return s


async def test_a_flooding_port_behind_a_relay_does_not_starve_the_relays_other_port(tmp_path: Path) -> None:
    limit = RateLimit(rate=5.0, burst=20)
    config = make_config(address="127.0.0.1/8", interface="lo", nodes=(("node-1", NODE1_MAC, "127.0.0.11"),), port=free_udp_port(),
                         client_port=free_udp_port(), pool=pool("127.0.0.100", "127.0.0.199"), unknown_rate=limit)
    service = DhcpService(config.settings, config.reservations, lambda _: None, None, tmp_path / "leases.journal")
    port = config.settings.port
    loop = asyncio.get_running_loop()
    quiet_port = b"\x01\x08Gi1/0/18\x02\x06\x00\x1b\x21\x0a\x0b\x0c"
    async with serving(service):
        if not service.steered:
            pytest.skip("no SO_REUSEPORT steering here: the relay's socket cannot share the server's port")
        with relay_socket(port) as relay:
            flood = [request_bytes(f"02:00:00:01:{n >> 8:02x}:{n & 0xff:02x}", "discover", xid=n, giaddr=RELAY,
                                   options=[("relay_agent_information", CIRCUIT_17)]) for n in range(1000)]
            quiet = [request_bytes(f"02:00:00:02:00:{n:02x}", "discover", xid=0x10000 + n, giaddr=RELAY,
                                   options=[("relay_agent_information", quiet_port)]) for n in range(10)]
            sent = 0
            for n, data in enumerate(flood):  # the quiet port's DISCOVERs in the thick of the flood
                relay.sendto(data, ("127.0.0.1", port))
                sent += 1
                if n % 100 == 50:
                    relay.sendto(quiet[n // 100], ("127.0.0.1", port))
                    sent += 1
                    while service.counters["received"] < sent:  # as fast as the server reads: no kernel drop
                        await asyncio.sleep(0)
            while service.counters["received"] < len(flood) + len(quiet):
                await asyncio.sleep(0.01)
            replies: dict[int, bytes] = {}
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    while len(replies) < service.counters["relayed"]:  # every reply sent to the relay, read
                        data = await loop.sock_recv(relay, 4096)
                        replies[int.from_bytes(data[4:8], "big")] = data
            stats = service.stats()
    for n in range(10):  # every request of the quiet port answered, through its relay, with its option 82 echoed
        data = replies[0x10000 + n]
        assert opts_of(data)["message-type"] == 2 and BOOTP(data).giaddr == RELAY
        assert opts_of(data)["relay_agent_information"] == quiet_port
    flooded = sum(1 for xid in replies if xid < 0x10000)
    assert stats["rate_limited"] == len(flood) - flooded >= len(flood) - 100  # only the flooding port was limited
    assert stats["rate_limit_sources"] == 2 and stats["errors"] == 0
