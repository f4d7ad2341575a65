"""DhcpService over real sockets: loopback ('lo', high ports) and, where replies need a link layer,
a Lab namespace pair with real clients (busybox udhcpc, ISC dhclient, Kea perfdhcp)."""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shutil
import socket
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest
from pyroute2 import NetNS
from scapy.layers.dhcp import BOOTP
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from appliance.statedb import open_state_db
from domain.errors import BindError
from domain.progress import DhcpFromFirmware, FirmwareKind, NodeEvent
from helpers import BIOS_VC, NODE1_IP, NODE1_MAC, STRANGER, DhcpSetup, opts_of, pool, pxe_options, request_bytes
from helpers import make_dhcp as make_config
from netboot.dhcp4.codec import decode
from netboot.dhcp4.server import DhcpService
from netboot.dhcp4.settings import RelayedSubnet
from vmtestbed.netns import Lab, entered, socket_in

REPLY_TIMEOUT = 3.0


def free_udp_port() -> int:
    """A currently free UDP port on 127.0.0.1 (tests run beside other contributors' tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lo_config(tmp_path: Path, **dhcp: Any) -> DhcpSetup:
    """A config on 'lo' with high ports; node-1 at 127.0.0.11."""
    dhcp.setdefault("port", free_udp_port())
    dhcp.setdefault("client_port", free_udp_port())
    return make_config(address="127.0.0.1/8", interface="lo", nodes=(("node-1", NODE1_MAC, "127.0.0.11"),), **dhcp)


def dhcp_service(config: DhcpSetup, db: sqlite3.Connection | None = None, events: list[NodeEvent] | None = None,
                 journal: Path | None = None) -> DhcpService:
    """A DHCP service from its own settings; its node records go to events (or nowhere)."""
    return DhcpService(config.settings, config.reservations, (events if events is not None else []).append, db, journal)


@contextlib.asynccontextmanager
async def serving(service: DhcpService, ns: str | None = None) -> AsyncIterator[DhcpService]:
    """Start (inside a namespace if given), serve in a task, and always close."""
    if ns is None:
        await service.start()
    else:
        with entered(ns):
            await service.start()
    task = asyncio.create_task(service.serve())
    try:
        yield service
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await service.close()


def lo_client(port: int) -> socket.socket:
    """A client socket on the 'lo' device only: receives unicast and the broadcast replies on lo."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.bind(("0.0.0.0", port))
    s.setblocking(False)
    return s


async def recv_reply(sock: socket.socket, xid: int) -> tuple[bytes, tuple[str, int]]:
    """Wait for the reply with this xid (duplicates and other traffic skipped)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(REPLY_TIMEOUT):
        while True:
            data, addr = await loop.sock_recvfrom(sock, 4096)
            if len(data) >= 240 and BOOTP(data).xid == xid:
                return data, addr


# ---------------------------------------------------------------- loopback


async def test_discover_request_ack_over_loopback(tmp_path: Path) -> None:
    config = lo_config(tmp_path)
    events: list[NodeEvent] = []
    service = dhcp_service(config, open_state_db(tmp_path / "state.db"), events)
    async with serving(service):
        with lo_client(config.settings.client_port) as client:
            client.sendto(request_bytes(NODE1_MAC, "discover", xid=1, flags=0x8000, options=pxe_options(0, BIOS_VC)),
                          ("127.0.0.1", config.settings.port))
            data, _ = await recv_reply(client, 1)
            assert opts_of(data)["message-type"] == 2
            assert BOOTP(data).yiaddr == "127.0.0.11"
            assert BOOTP(data).file.rstrip(b"\0") == b"undionly.kpxe"
            client.sendto(request_bytes(NODE1_MAC, "request", xid=2, flags=0x8000,
                                        options=[("requested_addr", "127.0.0.11"), ("server_id", "127.0.0.1")]),
                          ("127.0.0.1", config.settings.port))
            data, _ = await recv_reply(client, 2)
            assert opts_of(data)["message-type"] == 5
    stats = service.stats()
    assert stats["received"] == 2 and stats["offers"] == 1 and stats["acks"] == 1 and stats["broadcast"] == 2
    assert service.latency["request"].count == 2  # each request's time in the server, for /metrics
    # two exchanges (xid 1 and 2), each classified once: BIOS PXE, then a plain client's REQUEST
    assert [type(e).__name__ for e in events] == ["DhcpFromFirmware", "DhcpFromOs"]
    assert isinstance(events[0], DhcpFromFirmware) and events[0].firmware is FirmwareKind.BIOS_PXE


async def test_malformed_datagram_dropped_and_counted_service_keeps_answering(tmp_path: Path) -> None:
    config = lo_config(tmp_path)
    service = dhcp_service(config)
    async with serving(service):
        with lo_client(config.settings.client_port) as client:
            good = request_bytes(NODE1_MAC, "discover", xid=7, flags=0x8000)
            for junk in (b"", b"\x01" * 10, good[:236] + b"XXXX" + good[240:], good[:240] + bytes([60, 250, 1])):
                client.sendto(junk, ("127.0.0.1", config.settings.port))
            client.sendto(good, ("127.0.0.1", config.settings.port))
            data, _ = await recv_reply(client, 7)
            assert BOOTP(data).yiaddr == "127.0.0.11"
    assert service.stats()["dropped_malformed"] == 4
    assert service.stats()["received"] == 5
    assert service.stats()["ignored"] == 0


async def test_inform_answered_by_unicast_to_ciaddr(tmp_path: Path) -> None:
    config = lo_config(tmp_path)
    service = dhcp_service(config)
    async with serving(service):
        with lo_client(config.settings.client_port) as client:
            client.sendto(request_bytes(NODE1_MAC, "inform", xid=9, ciaddr="127.0.0.1"), ("127.0.0.1", config.settings.port))
            data, addr = await recv_reply(client, 9)
            assert opts_of(data)["message-type"] == 5 and BOOTP(data).ciaddr == "127.0.0.1"


async def test_flags_zero_on_non_ethernet_interface_falls_back_to_broadcast(tmp_path: Path) -> None:
    config = lo_config(tmp_path)
    service = dhcp_service(config)
    async with serving(service):
        with lo_client(config.settings.client_port) as client:
            client.sendto(request_bytes(NODE1_MAC, "discover", xid=11, flags=0), ("127.0.0.1", config.settings.port))
            data, _ = await recv_reply(client, 11)
            assert BOOTP(data).yiaddr == "127.0.0.11"
    assert service.stats()["broadcast"] == 1 and service.stats()["unicast_chaddr"] == 0


async def test_proxy_mode_answers_on_both_ports(tmp_path: Path) -> None:
    config = lo_config(tmp_path, mode="proxy", proxy_port=free_udp_port())
    service = dhcp_service(config)
    async with serving(service):
        with lo_client(config.settings.client_port) as client:
            client.sendto(request_bytes(NODE1_MAC, "discover", xid=21, options=pxe_options(0, BIOS_VC)),
                          ("127.0.0.1", config.settings.port))
            data, _ = await recv_reply(client, 21)
            assert BOOTP(data).yiaddr == "0.0.0.0" and opts_of(data)["vendor_class_id"] == b"PXEClient"
            client.sendto(request_bytes(NODE1_MAC, "request", xid=22, ciaddr="127.0.0.1", options=pxe_options(0, BIOS_VC)),
                          ("127.0.0.1", config.settings.proxy_port))
            data, addr = await recv_reply(client, 22)
            assert opts_of(data)["message-type"] == 5 and BOOTP(data).file.rstrip(b"\0") == b"undionly.kpxe"
            assert addr[1] == config.settings.proxy_port
    assert service.stats()["proxy_replies"] == 2


async def test_pool_lease_survives_service_restart(tmp_path: Path) -> None:
    config = lo_config(tmp_path, pool=pool("127.0.1.1", "127.0.1.20"))
    for round_ in range(2):
        db = open_state_db(tmp_path / "state.db")
        service = dhcp_service(config, db)
        async with serving(service):
            with lo_client(config.settings.client_port) as client:
                client.sendto(request_bytes(STRANGER, "discover", xid=30 + round_, flags=0x8000), ("127.0.0.1", config.settings.port))
                data, _ = await recv_reply(client, 30 + round_)
                assert BOOTP(data).yiaddr == "127.0.1.1"
                if round_ == 0:
                    client.sendto(request_bytes(STRANGER, "request", xid=40, flags=0x8000,
                                                options=[("requested_addr", "127.0.1.1"), ("server_id", "127.0.0.1")]),
                                  ("127.0.0.1", config.settings.port))
                    await recv_reply(client, 40)
                else:
                    assert service.mac_for_ip(ipaddress.IPv4Address("127.0.1.1")) == STRANGER
        db.close()
    rows = sqlite3.connect(str(tmp_path / "state.db")).execute("SELECT mac, ip FROM dhcp4_leases").fetchall()
    assert rows == [(STRANGER, "127.0.1.1")]


async def test_a_lease_acked_just_before_a_crash_is_kept(tmp_path: Path) -> None:
    """Defect of 2026-12-05: leases ACKed before the write-behind flush were lost by a crash, and given out twice."""
    config = lo_config(tmp_path, pool=pool("127.0.1.1", "127.0.1.20"))
    journal = tmp_path / "dhcp4-leases.journal"
    db = open_state_db(tmp_path / "state.db")
    service = dhcp_service(config, db, journal=journal)
    await service.start()
    try:
        with lo_client(config.settings.client_port) as client:
            client.sendto(request_bytes(STRANGER, "discover", xid=50, flags=0x8000), ("127.0.0.1", config.settings.port))
            await recv_reply(client, 50)
            client.sendto(request_bytes(STRANGER, "request", xid=51, flags=0x8000,
                                        options=[("requested_addr", "127.0.1.1"), ("server_id", "127.0.0.1")]),
                          ("127.0.0.1", config.settings.port))
            data, _ = await recv_reply(client, 51)
            assert opts_of(data)["message-type"] == 5
        # The process dies here: no flush, no close (the sockets go with the crash).
        for endpoint in service._endpoints:
            endpoint.abort()
    finally:
        db.close()
    assert sqlite3.connect(str(tmp_path / "state.db")).execute("SELECT count(*) FROM dhcp4_leases").fetchone()[0] == 0
    # Restarted: the lease is there, and the address is not offered to anyone else.
    again = dhcp_service(config, open_state_db(tmp_path / "state.db"), journal=journal)
    assert again.mac_for_ip(ipaddress.IPv4Address("127.0.1.1")) == STRANGER
    other = again.policy.handle(decode(request_bytes("02:00:00:00:00:42", "discover", xid=52)), time.time())
    assert other.reply is not None and BOOTP(other.reply.data).yiaddr == "127.0.1.2"
    assert journal.stat().st_size == 0  # replayed into the table
    await again.close()


async def test_lease_rows_are_written_behind_by_a_thread_with_its_own_connection(tmp_path: Path) -> None:
    """The table gets the rows from the writer thread while the loop serves; close leaves nothing pending."""
    config = lo_config(tmp_path, pool=pool("127.0.1.1", "127.0.1.20"))
    journal = tmp_path / "dhcp4-leases.journal"
    db = open_state_db(tmp_path / "state.db")
    service = dhcp_service(config, db, journal=journal)
    await service.start()
    serving = asyncio.create_task(service.serve())
    try:
        with lo_client(config.settings.client_port) as client:
            for i, xid in enumerate((60, 62)):
                mac = f"02:00:00:00:01:{i:02x}"
                client.sendto(request_bytes(mac, "discover", xid=xid, flags=0x8000), ("127.0.0.1", config.settings.port))
                offered = BOOTP((await recv_reply(client, xid))[0]).yiaddr
                client.sendto(request_bytes(mac, "request", xid=xid + 1, flags=0x8000,
                                            options=[("requested_addr", offered), ("server_id", "127.0.0.1")]),
                              ("127.0.0.1", config.settings.port))
                await recv_reply(client, xid + 1)
        reader = sqlite3.connect(str(tmp_path / "state.db"))
        for _ in range(100):  # a few write-behind periods
            if reader.execute("SELECT count(*) FROM dhcp4_leases").fetchone()[0] == 2:
                break
            await asyncio.sleep(0.05)
        assert reader.execute("SELECT count(*) FROM dhcp4_leases").fetchone()[0] == 2
        assert service._writer is not None and service._writer_db is not None  # written by the thread
    finally:
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        await service.close()
        db.close()
    assert service.leases.dirty == 0 and not (tmp_path / "dhcp4-leases.journal.old").exists()


def test_a_crash_while_a_batch_is_written_loses_no_lease(tmp_path: Path) -> None:
    """A batch handed to the writer moves the journal to JOURNAL.old; a crash before its commit replays it, then
    the changes made meanwhile (JOURNAL), in that order."""
    from netboot.dhcp4.leases import LeaseTable, write_batch

    journal = tmp_path / "j"
    db = open_state_db(tmp_path / "state.db")
    table = LeaseTable(db, (ipaddress.IPv4Address("10.0.0.1"), ipaddress.IPv4Address("10.0.0.9")), journal=journal)
    first = table.offer("02:00:00:00:00:01", None, now=100.0)
    assert first is not None and table.bind("02:00:00:00:00:01", first, 100.0, 900)
    batch = table.take_batch()
    assert batch is not None and batch.rotated and (tmp_path / "j.old").exists()
    second = table.offer("02:00:00:00:00:02", None, now=100.0)
    assert second is not None and table.bind("02:00:00:00:00:02", second, 100.0, 900)
    table.bind("02:00:00:00:00:01", first, 1100.0, 900)  # renewed after the batch was taken: JOURNAL only
    # The crash: the batch never committed.
    again = LeaseTable(open_state_db(tmp_path / "state.db"), (ipaddress.IPv4Address("10.0.0.1"), ipaddress.IPv4Address("10.0.0.9")),
                       journal=journal)
    assert again.mac_for_ip(first) == "02:00:00:00:00:01" and again.mac_for_ip(second) == "02:00:00:00:00:02"
    rows = dict(sqlite3.connect(str(tmp_path / "state.db")).execute("SELECT mac, expires FROM dhcp4_leases").fetchall())
    assert rows == {"02:00:00:00:00:01": 2000.0, "02:00:00:00:00:02": 1000.0}  # the renewal won: replayed last
    assert not (tmp_path / "j.old").exists() and journal.stat().st_size == 0
    # A failed batch gives its rows back and keeps JOURNAL.old until a later batch commits them.
    again.bind("02:00:00:00:00:02", second, 2100.0, 900)
    failed = again.take_batch()
    assert failed is not None
    again.batch_done(failed, sqlite3.OperationalError("database is locked"))
    assert again.dirty == 1 and (tmp_path / "j.old").exists()
    retry = again.take_batch()
    assert retry is not None and not retry.rotated  # JOURNAL keeps growing until the retry commits
    write_batch(db, retry)
    again.batch_done(retry, None)
    assert not (tmp_path / "j.old").exists()


async def test_bind_errors_are_clear(tmp_path: Path) -> None:
    config = lo_config(tmp_path)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind(("127.0.0.1", config.settings.port))
        service = dhcp_service(config)
        with pytest.raises(BindError, match="already taken"):
            await service.start()
        await service.close()
    missing = make_config(interface="rbnosuch0", port=free_udp_port())
    service = dhcp_service(missing)
    with pytest.raises(BindError, match="does not exist"):
        await service.start()
    await service.close()


# ---------------------------------------------------------------- namespaces: link layer and real clients

SERVER_IF, CLIENT_IF = "rb0", "eth0"


@pytest.fixture
def pair() -> Iterator[tuple[Lab, str, str]]:
    """Two namespaces joined by a veth: srv (rb0 10.77.0.1/24) and cli (eth0 with node-1's MAC, no address)."""
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    with Lab() as lab:
        srv, cli = lab.ns("srv"), lab.ns("cli")
        lab.veth(srv, SERVER_IF, cli, CLIENT_IF)
        lab.addr(srv, SERVER_IF, "10.77.0.1/24")
        with NetNS(cli) as ipr:
            idx = ipr.link_lookup(ifname=CLIENT_IF)[0]
            ipr.link("set", index=idx, state="down")
            ipr.link("set", index=idx, address=NODE1_MAC)
            ipr.link("set", index=idx, state="up")
        yield lab, srv, cli


async def run_in(ns: str, *argv: str, timeout: float = 30) -> tuple[int, str]:
    """Run a command inside a namespace without blocking the event loop."""
    proc = await asyncio.create_subprocess_exec("ip", "netns", "exec", ns, *argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        return -1, out.decode(errors="replace")
    return proc.returncode or 0, out.decode(errors="replace")


def env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key] = value.strip("'")
    return out


@pytest.mark.netns
async def test_reply_unicast_to_chaddr_without_broadcast_flag(pair: tuple[Lab, str, str], tmp_path: Path) -> None:
    lab, srv, cli = pair
    service = dhcp_service(make_config(interface=SERVER_IF))
    loop = asyncio.get_running_loop()
    async with serving(service, srv):
        capture = socket_in(cli, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
        client = socket_in(cli, socket.AF_INET, socket.SOCK_DGRAM)
        with capture, client:
            capture.bind((CLIENT_IF, 0))
            capture.setblocking(False)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, CLIENT_IF.encode())
            client.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            client.bind(("0.0.0.0", 68))
            client.sendto(request_bytes(NODE1_MAC, "discover", xid=0x51, flags=0), ("255.255.255.255", 67))
            async with asyncio.timeout(REPLY_TIMEOUT):
                while True:
                    frame = Ether(await loop.sock_recv(capture, 4096))
                    if UDP in frame and frame[UDP].dport == 68 and BOOTP in frame and frame[BOOTP].op == 2:
                        break
    assert frame.dst == NODE1_MAC  # a link-layer unicast to chaddr, not a broadcast
    assert (frame[IP].src, frame[IP].dst, frame[UDP].sport) == ("10.77.0.1", NODE1_IP, 67)
    assert frame[BOOTP].yiaddr == NODE1_IP and frame[BOOTP].xid == 0x51
    check = IP(bytes(frame[IP]))
    del check.chksum
    del check[UDP].chksum
    check = IP(bytes(check))
    assert (frame[IP].chksum, frame[UDP].chksum) == (check.chksum, check[UDP].chksum)
    assert service.stats()["unicast_chaddr"] == 1


@pytest.mark.netns
async def test_udhcpc_gets_its_reservation(pair: tuple[Lab, str, str], tmp_path: Path) -> None:
    if shutil.which("udhcpc") is None:
        pytest.skip("busybox udhcpc not installed")
    lab, srv, cli = pair
    script = tmp_path / "udhcpc.sh"
    script.write_text(f"#!/bin/sh\n[ \"$1\" = bound ] && env > {tmp_path}/udhcpc.env\nexit 0\n")
    script.chmod(0o755)
    service = dhcp_service(make_config(interface=SERVER_IF))
    async with serving(service, srv):
        rc, out = await run_in(cli, "udhcpc", "-f", "-q", "-n", "-t", "3", "-T", "1", "-i", CLIENT_IF, "-s", str(script))
    assert rc == 0, out
    env = env_file(tmp_path / "udhcpc.env")
    assert env["ip"] == NODE1_IP
    assert env["subnet"] == "255.255.255.0"
    assert env["hostname"] == "node-1"
    assert env["domain"] == "cluster.test"
    assert env["serverid"] == "10.77.0.1"
    assert env["lease"] == "3600"
    assert service.stats()["unicast_chaddr"] >= 1  # udhcpc sends flags=0


@pytest.mark.netns
async def test_dhclient_gets_its_reservation(pair: tuple[Lab, str, str], tmp_path: Path) -> None:
    if shutil.which("dhclient") is None:
        pytest.skip("ISC dhclient not installed")
    lab, srv, cli = pair
    script = tmp_path / "dhclient.sh"
    script.write_text(f"#!/bin/sh\ncase \"$reason\" in BOUND|REBOOT) env > {tmp_path}/dhclient.env;; esac\nexit 0\n")
    script.chmod(0o755)
    pidfile = tmp_path / "dhclient.pid"
    service = dhcp_service(make_config(interface=SERVER_IF))
    async with serving(service, srv):
        rc, out = await run_in(cli, "dhclient", "-4", "-1", "-v", "-sf", str(script), "-lf", str(tmp_path / "dhclient.leases"),
                               "-pf", str(pidfile), CLIENT_IF)
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int(pidfile.read_text().strip()), 15)  # dhclient stays in the background after binding
    assert rc == 0, out
    env = env_file(tmp_path / "dhclient.env")
    assert env["new_ip_address"] == NODE1_IP
    assert env["new_subnet_mask"] == "255.255.255.0"
    assert env["new_host_name"] == "node-1"
    assert env["new_domain_name"] == "cluster.test"
    assert env["new_dhcp_server_identifier"] == "10.77.0.1"


@pytest.mark.netns
async def test_relayed_request_answered_to_giaddr_port_67(pair: tuple[Lab, str, str], tmp_path: Path) -> None:
    lab, srv, cli = pair
    await asyncio.to_thread(lab.addr, cli, CLIENT_IF, "10.77.0.2/24")  # pyroute2 runs its own loop
    service = dhcp_service(make_config(interface=SERVER_IF, pool=pool("10.77.0.100", "10.77.0.199")))
    loop = asyncio.get_running_loop()
    agent = b"\x01\x06rack-1"
    async with serving(service, srv):
        relay = socket_in(cli, socket.AF_INET, socket.SOCK_DGRAM)
        with relay:
            relay.bind(("10.77.0.2", 67))
            relay.setblocking(False)
            relay.sendto(request_bytes(STRANGER, "discover", xid=0x61, giaddr="10.77.0.2",
                                       options=[("relay_agent_information", agent)]), ("10.77.0.1", 67))
            async with asyncio.timeout(REPLY_TIMEOUT):
                data, addr = await loop.sock_recvfrom(relay, 4096)
    assert addr == ("10.77.0.1", 67)
    assert BOOTP(data).yiaddr == "10.77.0.100" and BOOTP(data).giaddr == "10.77.0.2"
    assert opts_of(data)["relay_agent_information"] == agent
    assert service.stats()["relayed"] == 1


@pytest.mark.netns
async def test_perfdhcp_gets_pool_leases_through_its_relay_behaviour(pair: tuple[Lab, str, str], tmp_path: Path) -> None:
    if shutil.which("perfdhcp") is None:
        pytest.skip("Kea perfdhcp not installed")
    lab, srv, cli = pair
    await asyncio.to_thread(lab.addr, cli, CLIENT_IF, "10.77.0.2/24")  # pyroute2 runs its own loop
    config = make_config(interface=SERVER_IF, pool=pool("10.77.0.100", "10.77.0.250"))
    db = open_state_db(tmp_path / "state.db")
    service = dhcp_service(config, db)
    async with serving(service, srv):
        # 100 four-way exchanges with random MACs; a functional check, the rate is measured in bench/.
        # -W: wait 0.5 s after the last request, or perfdhcp exits before the last OFFER and counts it lost.
        rc, out = await run_in(cli, "perfdhcp", "-4", "-l", "10.77.0.2", "-r", "400", "-n", "100", "-R", "100",
                               "-W", "500000", "10.77.0.1")
    assert rc == 0, (service.stats(), out)
    assert service.stats()["acks"] == 100
    assert db.execute("SELECT count(*) FROM dhcp4_leases").fetchone()[0] == 100
    db.close()


@pytest.fixture
def routed_rack(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """srv (rb0 10.77.0.1/24) routed to a rack network 10.80.5.0/24 through rtr, which runs ISC's dhcrelay
    towards 10.77.0.1; cli (eth0 with node-1's MAC, no address) on the rack network."""
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    for tool in ("udhcpc", "dhcrelay"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (./setup.sh --test)")
    with Lab() as lab:
        srv, rtr, cli = lab.ns("srv"), lab.ns("rtr"), lab.ns("cli")
        lab.veth(srv, SERVER_IF, rtr, "up0")
        lab.veth(rtr, "down0", cli, CLIENT_IF)
        lab.addr(srv, SERVER_IF, "10.77.0.1/24")
        lab.addr(rtr, "up0", "10.77.0.254/24")
        lab.addr(rtr, "down0", "10.80.5.1/24")
        lab.run(srv, ["ip", "route", "add", "10.80.5.0/24", "via", "10.77.0.254"], check=True)
        lab.run(rtr, ["sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)  # the namespace's own setting
        with NetNS(cli) as ipr:
            idx = ipr.link_lookup(ifname=CLIENT_IF)[0]
            ipr.link("set", index=idx, state="down")
            ipr.link("set", index=idx, address=NODE1_MAC)
            ipr.link("set", index=idx, state="up")
        lab.popen(rtr, ["dhcrelay", "-4", "-d", "-q", "-pf", str(tmp_path / "dhcrelay.pid"), "-id", "down0", "-iu", "up0",
                        "10.77.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        yield srv, cli


@pytest.mark.netns
async def test_udhcpc_behind_iscs_dhcrelay_gets_its_reservation_on_the_relayed_network(routed_rack: tuple[str, str],
                                                                                       tmp_path: Path) -> None:
    """A rack routed to the appliance: udhcpc on 10.80.5.0/24, ISC's dhcrelay on the router between the two
    networks, the server on 10.77.0.0/24 with that network in relayed_subnets. The client gets its reservation
    with its own network's mask and router (RFC 2131 4.3.1), the reply going back through the relay."""
    srv, cli = routed_rack
    rack = RelayedSubnet(ipaddress.IPv4Network("10.80.5.0/24"), ipaddress.IPv4Address("10.80.5.1"))
    script = tmp_path / "udhcpc.sh"
    script.write_text(f"#!/bin/sh\n[ \"$1\" = bound ] && env > {tmp_path}/udhcpc.env\nexit 0\n")
    script.chmod(0o755)
    service = dhcp_service(make_config(nodes=(("r5-1", NODE1_MAC, "10.80.5.21"),), relayed_subnets=(rack,)))
    async with serving(service, srv):
        await asyncio.sleep(0.5)  # dhcrelay opens its sockets
        rc, out = await run_in(cli, "udhcpc", "-f", "-q", "-n", "-t", "4", "-T", "1", "-i", CLIENT_IF, "-s", str(script))
    assert rc == 0, out
    env = env_file(tmp_path / "udhcpc.env")
    assert (env["ip"], env["subnet"], env["router"]) == ("10.80.5.21", "255.255.255.0", "10.80.5.1")
    assert env["serverid"] == "10.77.0.1" and env["hostname"] == "r5-1"
