"""Router advertiser: RA bytes checked with scapy, idling without a link-local address, and RAs received
in another namespace (unsolicited and in answer to a Router Solicitation)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import AsyncIterator, Iterator

import pytest
from pyroute2 import NetNS
from scapy.layers.inet6 import ICMPv6ND_RA, ICMPv6ND_RS, ICMPv6NDOptPrefixInfo, ICMPv6NDOptSrcLLAddr, IPv6
from scapy.layers.l2 import Ether

from domain.errors import BindError
from netboot.ra import RouterAdvertiser, build_router_advertisement, parse_if_inet6
from vmtestbed.netns import Lab, entered, socket_in

SERVER_MAC = "02:00:00:77:00:01"
CLIENT_MAC = "52:54:00:77:00:01"
TIMEOUT = 5.0


def test_router_advertisement_bytes_checked_by_scapy() -> None:
    ra = ICMPv6ND_RA(build_router_advertisement(bytes.fromhex("020000770001")))
    assert (ra.type, ra.code, ra.routerlifetime, ra.M, ra.O, ra.chlim, ra.reachabletime, ra.retranstimer) == (134, 0, 0, 0, 0, 0, 0, 0)
    assert ra[ICMPv6NDOptSrcLLAddr].lladdr == SERVER_MAC
    assert ICMPv6NDOptPrefixInfo not in ra
    assert len(build_router_advertisement(None)) == 16


def test_parse_if_inet6_keeps_link_local_of_the_interface() -> None:
    text = ("00000000000000000000000000000001 01 80 10 80       lo\n"
            "fe800000000000000000000000000001 05 40 20 c0      rb0\n"
            "fe800000000000000000000000000002 05 40 20 80      rb0\n"
            "20010db8000000000000000000000001 05 40 00 80      rb0\n"
            "fe800000000000000000000000000003 06 40 20 80     rb01\n")
    assert [(str(a), f) for a, f in parse_if_inet6(text, "rb0")] == [("fe80::1", 0xC0), ("fe80::2", 0x80)]


async def test_no_link_local_address_warns_and_idles(caplog: pytest.LogCaptureFixture) -> None:
    # 'lo' has ::1 (host scope) but never a link-local address: nothing is sent, nothing crashes.
    ra = RouterAdvertiser("lo", interval=(0.05, 0.05))
    with caplog.at_level(logging.WARNING, logger="rackboot.ra"):
        await ra.start()
        task = asyncio.create_task(ra.serve())
        await asyncio.sleep(0.2)
        assert not task.done()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await ra.close()
        await ra.close()
    assert ra.stats()["sent"] == 0
    assert "no IPv6 link-local address" in caplog.text


async def test_missing_interface_is_a_bind_error() -> None:
    with pytest.raises(BindError, match="does not exist"):
        await RouterAdvertiser("rbnosuch0").start()


# ---------------------------------------------------------------- namespaces


@pytest.fixture
def pair() -> Iterator[tuple[str, str]]:
    """srv (rb0) and cli (eth0) joined by a veth, DAD off so link-local addresses are usable at once."""
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    with Lab() as lab:
        srv, cli = lab.ns("srv"), lab.ns("cli")
        for ns in (srv, cli):
            lab.run(ns, ["sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"], check=True)
        lab.veth(srv, "rb0", cli, "eth0")
        for ns, ifname, mac in ((srv, "rb0", SERVER_MAC), (cli, "eth0", CLIENT_MAC)):
            with NetNS(ns) as ipr:
                idx = ipr.link_lookup(ifname=ifname)[0]
                ipr.link("set", index=idx, state="down")
                ipr.link("set", index=idx, address=mac)
                ipr.link("set", index=idx, state="up")
        yield srv, cli


@contextlib.asynccontextmanager
async def advertising(srv: str, interval: tuple[float, float]) -> AsyncIterator[RouterAdvertiser]:
    ra = RouterAdvertiser("rb0", interval=interval)
    with entered(srv):
        await ra.start()
    task = asyncio.create_task(ra.serve())  # runs outside the namespace: the socket stays in it
    try:
        yield ra
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await ra.close()


async def next_ra(capture: socket.socket) -> Ether:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(TIMEOUT):
        while True:
            frame = Ether(await loop.sock_recv(capture, 4096))
            if ICMPv6ND_RA in frame:
                return frame


def ipv6_capture(cli: str) -> socket.socket:
    capture = socket_in(cli, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x86DD))
    capture.bind(("eth0", 0))
    capture.setblocking(False)
    return capture


@pytest.mark.netns
async def test_unsolicited_ra_received_in_another_namespace(pair: tuple[str, str]) -> None:
    srv, cli = pair
    with ipv6_capture(cli) as capture:
        async with advertising(srv, (0.1, 0.2)) as ra:
            first = await next_ra(capture)
            second = await next_ra(capture)
    for frame in (first, second):
        assert frame.dst == "33:33:00:00:00:01" and frame.src == SERVER_MAC
        assert frame[IPv6].hlim == 255 and frame[IPv6].dst == "ff02::1"
        assert frame[IPv6].src.startswith("fe80::")
        adv = frame[ICMPv6ND_RA]
        assert adv.routerlifetime == 0 and adv.M == 0 and adv.O == 0
        assert ICMPv6NDOptPrefixInfo not in frame
        assert frame[ICMPv6NDOptSrcLLAddr].lladdr == SERVER_MAC
        checked = IPv6(bytes(frame[IPv6]))
        del checked[ICMPv6ND_RA].cksum
        assert IPv6(bytes(checked))[ICMPv6ND_RA].cksum == adv.cksum  # the kernel filled a valid checksum
    assert ra.stats()["sent"] >= 2


def _set_link(ns: str, ifname: str, state: str) -> None:
    with NetNS(ns) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], state=state)


@pytest.mark.netns
async def test_starts_advertising_when_the_link_local_address_appears_later(pair: tuple[str, str]) -> None:
    srv, cli = pair
    await asyncio.to_thread(_set_link, srv, "rb0", "down")  # down: no link-local address yet
    with ipv6_capture(cli) as capture:
        async with advertising(srv, (0.1, 0.2)) as ra:
            await asyncio.sleep(0.1)
            assert ra.stats()["sent"] == 0
            # serve() runs outside the namespace; it still finds the new address in the interface's namespace.
            await asyncio.to_thread(_set_link, srv, "rb0", "up")
            frame = await next_ra(capture)
    assert frame[IPv6].src.startswith("fe80::") and frame[IPv6].hlim == 255


@pytest.mark.netns
async def test_router_solicitation_answered(pair: tuple[str, str]) -> None:
    srv, cli = pair
    with ipv6_capture(cli) as capture:
        async with advertising(srv, (60.0, 60.0)) as ra:
            await next_ra(capture)  # the first unsolicited one, sent at once
            rs = socket_in(cli, socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
            with rs:
                rs.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
                ifindex = _ifindex(cli, "eth0")
                rs.sendto(bytes(ICMPv6ND_RS()), ("ff02::2", 0, 0, ifindex))
                answer = await next_ra(capture)
    assert answer[IPv6].dst.startswith("fe80::")  # unicast back to the soliciting node
    assert answer.dst == CLIENT_MAC
    assert answer[ICMPv6ND_RA].routerlifetime == 0
    assert ra.stats()["solicitations"] == 1


def _ifindex(ns: str, ifname: str) -> int:
    with entered(ns):
        return socket.if_nametoindex(ifname)

