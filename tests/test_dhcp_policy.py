"""DHCPv4 policy: requests built by scapy, decoded by our codec, decided, and the replies read back by scapy."""
from __future__ import annotations

import ipaddress
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.dhcp import BOOTP, DHCP

from domain.progress import DhcpFromFirmware, DhcpFromOs, FirmwareKind
from helpers import (
    BIOS_VC, NODE1_IP, NODE1_MAC, NODE2_MAC, NOW, STRANGER, UEFI_VC, UUID, DhcpSetup, opts_of, pool,
    pxe_options, request_bytes,
)
from helpers import make_dhcp as make_config
from netboot.dhcp4 import options as o
from netboot.dhcp4.codec import decode
from netboot.dhcp4.leases import LeaseTable
from netboot.dhcp4.policy import VIA_DHCP, VIA_PXE, Decision, DhcpPolicy
from netboot.dhcp4.settings import BootPrograms, RelayedSubnet


class Harness:
    """A policy over an in-memory lease table, fed with scapy-built requests."""

    def __init__(self, config: DhcpSetup, db: sqlite3.Connection | None = None) -> None:
        reserved = [r.ip for r in config.reservations.values()] + [config.settings.server_ip]
        self.leases = LeaseTable(db, config.settings.pool, reserved)
        self.policy = DhcpPolicy(config.settings, config.reservations, self.leases)

    def __call__(self, mac: str, message: str, *, now: float = NOW, via: str = VIA_DHCP,
                 source: tuple[str, int] | None = None, **kw: Any) -> Decision:
        return self.policy.handle(decode(request_bytes(mac, message, **kw)), now, via, source)


def test_bios_pxe_discover_gets_reservation_and_undionly_over_tftp() -> None:
    h = Harness(make_config())
    d = h(NODE1_MAC, "discover", options=pxe_options(0, BIOS_VC))
    assert d.reply is not None
    b = BOOTP(d.reply.data)
    assert (b.op, b.xid, b.yiaddr, b.siaddr, b.ciaddr) == (2, 0x1234, NODE1_IP, "10.77.0.1", "0.0.0.0")
    assert b.file.rstrip(b"\0") == b"undionly.kpxe"
    opts = opts_of(d.reply.data)
    assert opts["message-type"] == 2
    assert opts["server_id"] == "10.77.0.1"
    assert opts["subnet_mask"] == "255.255.255.0"
    assert opts["broadcast_address"] == "10.77.0.255"
    assert opts["name_server"] == "10.77.0.1"  # the appliance itself when no dns_servers
    assert opts["domain"] == b"cluster.test"
    assert opts["hostname"] == b"node-1"
    assert opts["lease_time"] == 3600 and opts["renewal_time"] == 1800 and opts["rebinding_time"] == 3150
    assert opts["vendor_class_id"] == b"PXEClient"
    assert opts["vendor_specific"] == bytes([6, 1, 8, 255])  # discovery control: boot the file given here
    assert opts["tftp_server_name"] == b"10.77.0.1"
    assert opts["boot-file-name"] == b"undionly.kpxe"
    assert opts["pxe_client_machine_identifier"] == UUID  # echoed
    assert "router" not in opts
    # flags = 0 and no address yet: unicast to yiaddr at chaddr (RFC 2131 4.1).
    assert (d.reply.dest.ip, d.reply.dest.port, d.reply.dest.mac) == (NODE1_IP, 68, bytes.fromhex("525400770001"))
    assert d.event == DhcpFromFirmware(NODE1_MAC, FirmwareKind.BIOS_PXE, 0, ts=d.event.ts)  # type: ignore[union-attr]


@pytest.mark.parametrize("arch", [6, 7, 9])
def test_uefi_pxe_gets_uefi_nbp_and_broadcast_when_flag_set(arch: int) -> None:
    h = Harness(make_config(router=ipaddress.IPv4Address("10.77.0.254"),
                            dns_servers=(ipaddress.IPv4Address("10.77.0.2"), ipaddress.IPv4Address("10.77.0.3"))))
    d = h(NODE2_MAC, "discover", flags=0x8000, options=pxe_options(arch, UEFI_VC))
    assert d.reply is not None
    assert BOOTP(d.reply.data).file.rstrip(b"\0") == b"snponly.efi"
    opts = opts_of(d.reply.data)
    assert opts["router"] == "10.77.0.254"
    assert opts["name_server"] == ("10.77.0.2", "10.77.0.3")
    assert (d.reply.dest.ip, d.reply.dest.port, d.reply.dest.mac) == ("255.255.255.255", 68, None)


def test_arch_taken_from_vendor_class_when_option_93_missing() -> None:
    h = Harness(make_config())
    d = h(NODE1_MAC, "discover", options=[("vendor_class_id", UEFI_VC)])
    assert d.reply is not None and BOOTP(d.reply.data).file.rstrip(b"\0") == b"snponly.efi"


def test_arm64_without_nbp_gets_lease_but_no_boot_file() -> None:
    h = Harness(make_config())
    d = h(NODE1_MAC, "discover", options=pxe_options(11, b"PXEClient:Arch:00011:UNDI:003000"))
    assert d.reply is not None
    b = BOOTP(d.reply.data)
    assert b.yiaddr == NODE1_IP and b.file.rstrip(b"\0") == b"" and b.siaddr == "0.0.0.0"
    assert "boot-file-name" not in opts_of(d.reply.data)


def test_arm64_with_nbp() -> None:
    h = Harness(make_config(boot=BootPrograms("http://10.77.0.1:8080", arm64_nbp="ipxe-arm64.efi")))
    d = h(NODE1_MAC, "discover", options=pxe_options(11, b"PXEClient:Arch:00011:UNDI:003000"))
    assert d.reply is not None and BOOTP(d.reply.data).file.rstrip(b"\0") == b"ipxe-arm64.efi"


def test_uefi_http_boot_gets_url_and_httpclient() -> None:
    h = Harness(make_config())
    d = h(NODE1_MAC, "discover", options=pxe_options(16, b"HTTPClient:Arch:00016:UNDI:003001"))
    assert d.reply is not None
    opts = opts_of(d.reply.data)
    assert opts["vendor_class_id"] == b"HTTPClient"
    assert opts["boot-file-name"] == b"http://10.77.0.1:8080/nbp/snponly.efi"
    assert BOOTP(d.reply.data).file.rstrip(b"\0") == b"http://10.77.0.1:8080/nbp/snponly.efi"


def test_ipxe_gets_its_per_mac_script_and_no_pxedhcp() -> None:
    h = Harness(make_config())
    d = h(NODE1_MAC, "discover", options=pxe_options(0, BIOS_VC, ("user_class", b"iPXE")))
    assert d.reply is not None
    url = b"http://10.77.0.1:8080/boot/52-54-00-77-00-01.ipxe"
    assert BOOTP(d.reply.data).file.rstrip(b"\0") == url
    raw = d.reply.data
    opts = decode(raw).options
    assert opts[o.BOOTFILE_NAME] == url
    assert opts[o.IPXE_ENCAP] == bytes([176, 1, 1])  # no-pxedhcp = 1
    assert o.VENDOR_CLASS not in opts  # no PXE menu/vendor answer: iPXE does not need one
    assert isinstance(d.event, DhcpFromFirmware) and d.event.firmware is FirmwareKind.IPXE


def test_non_pxe_client_gets_reservation_without_boot_file() -> None:
    h = Harness(make_config())
    for vc in (b"rackboot-deploy", None):
        d = h(NODE1_MAC, "discover", options=[("vendor_class_id", vc)] if vc else [])
        assert d.reply is not None
        opts = opts_of(d.reply.data)
        assert BOOTP(d.reply.data).yiaddr == NODE1_IP and opts["hostname"] == b"node-1"
        assert "boot-file-name" not in opts and "vendor_class_id" not in opts
        assert BOOTP(d.reply.data).file.rstrip(b"\0") == b""


def test_unknown_mac_ignored_without_pool() -> None:
    h = Harness(make_config())
    d = h(STRANGER, "discover", options=pxe_options(0, BIOS_VC))
    assert d.reply is None and d.ignored
    assert d.event is None  # a MAC nobody serves is no node's progress


def test_unknown_mac_ignore_mode_gets_plain_lease_from_pool() -> None:
    h = Harness(make_config(pool=pool("10.77.0.100", "10.77.0.109")))
    d = h(STRANGER, "discover", options=pxe_options(0, BIOS_VC))
    assert d.reply is not None
    assert BOOTP(d.reply.data).yiaddr == "10.77.0.100"
    opts = opts_of(d.reply.data)
    assert "boot-file-name" not in opts and "hostname" not in opts


def test_unknown_mac_discovery_mode_boots_from_pool() -> None:
    h = Harness(make_config(pool=pool("10.77.0.100", "10.77.0.109"), discovery=True))
    d = h(STRANGER, "discover", options=pxe_options(7, UEFI_VC))
    assert d.reply is not None
    assert BOOTP(d.reply.data).yiaddr == "10.77.0.100"
    assert opts_of(d.reply.data)["boot-file-name"] == b"snponly.efi"
    d = h(STRANGER, "request", options=[("requested_addr", "10.77.0.100"), ("server_id", "10.77.0.1"),
                                        ("user_class", b"iPXE")])
    assert d.reply is not None and opts_of(d.reply.data)["message-type"] == 5
    assert opts_of(d.reply.data)["boot-file-name"] == b"http://10.77.0.1:8080/boot/02-00-00-00-00-99.ipxe"


def test_request_selecting_ack_and_nak_for_wrong_address() -> None:
    h = Harness(make_config())
    d = h(NODE1_MAC, "request", options=[("requested_addr", NODE1_IP), ("server_id", "10.77.0.1")])
    assert d.reply is not None
    assert opts_of(d.reply.data)["message-type"] == 5
    assert BOOTP(d.reply.data).yiaddr == NODE1_IP
    assert isinstance(d.event, DhcpFromOs)  # no PXE vendor class, no iPXE: a booted system's own client
    d = h(NODE1_MAC, "request", options=[("requested_addr", "10.77.0.99")])  # INIT-REBOOT, wrong address
    assert d.reply is not None
    b = BOOTP(d.reply.data)
    assert opts_of(d.reply.data)["message-type"] == 6
    assert (b.yiaddr, b.ciaddr, b.siaddr) == ("0.0.0.0", "0.0.0.0", "0.0.0.0")
    assert d.reply.dest.ip == "255.255.255.255"  # RFC 2131 4.1: NAKs are broadcast
    assert d.event is None  # the same transaction id: the same exchange, already reported


def test_request_for_another_server_is_ignored() -> None:
    h = Harness(make_config())
    d = h(NODE1_MAC, "request", options=[("requested_addr", NODE1_IP), ("server_id", "10.77.0.250")])
    assert d.reply is None and isinstance(d.event, DhcpFromOs)


def test_renewal_unicast_to_ciaddr() -> None:
    h = Harness(make_config())
    d = h(NODE1_MAC, "request", ciaddr=NODE1_IP)
    assert d.reply is not None
    b = BOOTP(d.reply.data)
    assert (b.ciaddr, b.yiaddr) == (NODE1_IP, NODE1_IP)
    assert (d.reply.dest.ip, d.reply.dest.port, d.reply.dest.mac) == (NODE1_IP, 68, None)


def test_broadcast_replies_config_forces_broadcast() -> None:
    h = Harness(make_config(broadcast_replies=True))
    d = h(NODE1_MAC, "discover")
    assert d.reply is not None and d.reply.dest.ip == "255.255.255.255" and d.reply.dest.mac is None


RACK9 = RelayedSubnet(ipaddress.IPv4Network("10.9.0.0/24"), ipaddress.IPv4Address("10.9.0.1"))
RACK9_MAC = "52:54:00:09:00:21"
RACK9_NODES = (("node-1", NODE1_MAC, NODE1_IP), ("r9-1", RACK9_MAC, "10.9.0.21"))


def test_relayed_request_goes_to_giaddr_port_67_with_option_82_echoed_last() -> None:
    h = Harness(make_config(nodes=RACK9_NODES, relayed_subnets=(RACK9,)))
    agent = b"\x01\x04port\x02\x06switch"
    d = h(RACK9_MAC, "discover", giaddr="10.9.0.1", options=[("relay_agent_information", agent)])
    assert d.reply is not None
    assert (d.reply.dest.ip, d.reply.dest.port, d.reply.dest.mac) == ("10.9.0.1", 67, None)
    b = BOOTP(d.reply.data)
    assert b.giaddr == "10.9.0.1" and b.yiaddr == "10.9.0.21"
    options = [x for x in b[DHCP].options if isinstance(x, tuple)]
    assert options[-1] == ("relay_agent_information", agent)
    nak = h(RACK9_MAC, "request", giaddr="10.9.0.1", options=[("requested_addr", "10.9.0.99")])
    assert nak.reply is not None and nak.reply.dest.ip == "10.9.0.1"
    assert BOOTP(nak.reply.data).flags & 0x8000  # RFC 2131 4.3.2: the relay broadcasts the NAK


def test_a_relayed_node_gets_the_mask_router_and_broadcast_of_its_own_network() -> None:
    """RFC 2131 4.3.1: the network of giaddr; RFC 2132 3.3, 3.5, 5.3: its mask, router and broadcast address,
    not the server's (10.77.0.0/24, no router)."""
    h = Harness(make_config(nodes=RACK9_NODES, relayed_subnets=(RACK9,)))
    ack = h(RACK9_MAC, "request", giaddr="10.9.0.1", options=[("requested_addr", "10.9.0.21")])
    assert ack.reply is not None
    got = opts_of(ack.reply.data)
    assert got["message-type"] == 5 and BOOTP(ack.reply.data).yiaddr == "10.9.0.21"
    assert (got["subnet_mask"], got["router"], got["broadcast_address"]) == ("255.255.255.0", "10.9.0.1", "10.9.0.255")
    assert got["server_id"] == "10.77.0.1" and got["hostname"] == b"r9-1"
    own = opts_of(h(NODE1_MAC, "discover").reply.data)  # type: ignore[union-attr]
    assert own["subnet_mask"] == "255.255.255.0" and own["broadcast_address"] == "10.77.0.255" and "router" not in own


def test_a_request_relayed_from_a_network_the_server_does_not_serve_is_ignored() -> None:
    """As ISC dhcpd ("unknown network segment") and Kea: no address fits a client on a network we know nothing of."""
    h = Harness(make_config(nodes=RACK9_NODES, relayed_subnets=(RACK9,), pool=pool("10.77.0.100", "10.77.0.109")))
    for mac in (RACK9_MAC, NODE1_MAC, STRANGER):
        d = h(mac, "discover", giaddr="10.8.0.1")
        assert d.reply is None and d.ignored == "relayed from 10.8.0.1, on no network in dhcp.relayed_subnets"


def test_a_node_heard_on_another_network_than_its_reservation_is_not_offered_and_its_request_is_naked() -> None:
    h = Harness(make_config(nodes=RACK9_NODES, relayed_subnets=(RACK9,)))
    moved = h(NODE1_MAC, "discover", giaddr="10.9.0.1")  # node-1's address is on the server's own network
    assert moved.reply is None and moved.ignored == f"reserved address {NODE1_IP} is not on the request's network 10.9.0.0/24"
    nak = h(NODE1_MAC, "request", giaddr="10.9.0.1", options=[("requested_addr", NODE1_IP)])
    assert nak.reply is not None and opts_of(nak.reply.data)["message-type"] == 6
    direct = h(RACK9_MAC, "discover")  # r9-1 heard on the server's own segment, without a relay
    assert direct.reply is None and "10.9.0.21 is not on the request's network 10.77.0.0/24" in (direct.ignored or "")


def test_the_pool_serves_the_servers_own_network_only() -> None:
    h = Harness(make_config(nodes=RACK9_NODES, relayed_subnets=(RACK9,), pool=pool("10.77.0.100", "10.77.0.109")))
    far = h(STRANGER, "discover", giaddr="10.9.0.1")
    assert far.reply is None and far.ignored == "unknown MAC on 10.9.0.0/24: the pool is on the server's own network only"
    near = h(STRANGER, "discover", giaddr="10.77.0.2")  # a relay on our own network (what perfdhcp does)
    assert near.reply is not None and BOOTP(near.reply.data).yiaddr == "10.77.0.100"


def test_pool_offer_request_ack_and_persistence_across_restart(tmp_path: Path) -> None:
    config = make_config(pool=pool("10.77.0.100", "10.77.0.109"))
    db = sqlite3.connect(str(tmp_path / "state.db"), isolation_level=None)
    h = Harness(config, db)
    d = h(STRANGER, "discover")
    assert d.reply is not None
    offered = BOOTP(d.reply.data).yiaddr
    assert offered == "10.77.0.100"
    d2 = h("02:00:00:00:00:98", "discover")
    assert d2.reply is not None and BOOTP(d2.reply.data).yiaddr == "10.77.0.101"  # the first offer is held
    d = h(STRANGER, "request", options=[("requested_addr", offered), ("server_id", "10.77.0.1")])
    assert d.reply is not None and opts_of(d.reply.data)["message-type"] == 5
    assert h.leases.mac_for_ip(int(ipaddress.IPv4Address(offered))) == STRANGER
    assert h.leases.flush() == 1
    db.close()
    # A new process: the lease comes back from SQLite and the client gets the same address again.
    db = sqlite3.connect(str(tmp_path / "state.db"), isolation_level=None)
    h2 = Harness(config, db)
    assert h2.leases.mac_for_ip(int(ipaddress.IPv4Address(offered))) == STRANGER
    d = h2(STRANGER, "discover", now=NOW + 10)
    assert d.reply is not None and BOOTP(d.reply.data).yiaddr == offered
    d = h2("02:00:00:00:00:97", "request", options=[("requested_addr", offered)], now=NOW + 10)
    assert d.reply is not None and opts_of(d.reply.data)["message-type"] == 6  # held by another client
    db.close()


def test_pool_nak_for_address_outside_pool_and_silence_for_foreign_static_address() -> None:
    h = Harness(make_config(pool=pool("10.77.0.100", "10.77.0.109")))
    d = h(STRANGER, "request", options=[("requested_addr", "192.168.1.5")])
    assert d.reply is not None and opts_of(d.reply.data)["message-type"] == 6
    d = h(STRANGER, "request", options=[("requested_addr", "10.77.0.50")])
    assert d.reply is None  # RFC 2131 4.3.2: no record of this client, not our pool: remain silent


def test_pool_exhaustion_and_reclaim() -> None:
    h = Harness(make_config(pool=pool("10.77.0.100", "10.77.0.101")))
    for i in range(2):
        assert h(f"02:00:00:00:01:{i:02x}", "discover").reply is not None
    assert h("02:00:00:00:01:ff", "discover").reply is None  # both addresses held by offers
    d = h("02:00:00:00:01:ff", "discover", now=NOW + 120)    # the offers have expired
    assert d.reply is not None and BOOTP(d.reply.data).yiaddr in ("10.77.0.100", "10.77.0.101")


def test_expired_lease_reused_by_another_client_and_rows_replaced(tmp_path: Path) -> None:
    config = make_config(pool=pool("10.77.0.100", "10.77.0.100"), lease_time=60)
    db = sqlite3.connect(str(tmp_path / "state.db"), isolation_level=None)
    h = Harness(config, db)
    ask = [("requested_addr", "10.77.0.100"), ("server_id", "10.77.0.1")]
    h(STRANGER, "discover")
    assert h(STRANGER, "request", options=ask).reply is not None
    h.leases.flush()
    later = NOW + 3600  # the lease and its offer have long expired
    other = "02:00:00:00:00:98"
    d = h(other, "discover", now=later)
    assert d.reply is not None and BOOTP(d.reply.data).yiaddr == "10.77.0.100"
    assert opts_of(h(other, "request", options=ask, now=later).reply.data)["message-type"] == 5  # type: ignore[union-attr]
    h.leases.flush()
    assert db.execute("SELECT mac, ip FROM dhcp4_leases").fetchall() == [(other, "10.77.0.100")]
    assert h.leases.mac_for_ip(int(ipaddress.IPv4Address("10.77.0.100"))) == other
    db.close()


def test_decline_holds_the_address_back() -> None:
    h = Harness(make_config(pool=pool("10.77.0.100", "10.77.0.101")))
    d = h(STRANGER, "discover")
    assert d.reply is not None
    h(STRANGER, "request", options=[("requested_addr", "10.77.0.100"), ("server_id", "10.77.0.1")])
    d = h(STRANGER, "decline", options=[("requested_addr", "10.77.0.100"), ("server_id", "10.77.0.1")])
    assert d.reply is None and d.event is None
    assert h.leases.lease_for(STRANGER) is None
    d = h(STRANGER, "discover")
    assert d.reply is not None and BOOTP(d.reply.data).yiaddr == "10.77.0.101"
    assert h("02:00:00:00:00:98", "discover").reply is None  # .100 declined, .101 offered


def test_decline_counts_only_from_the_client_that_holds_the_address() -> None:
    """Defect of 2026-12-05: a DECLINE from any MAC blocked any pool address for 600 s, leased ones included."""
    h = Harness(make_config(pool=pool("10.77.0.100", "10.77.0.102")))
    h(STRANGER, "discover", xid=1)
    h(STRANGER, "request", xid=1, options=[("requested_addr", "10.77.0.100"), ("server_id", "10.77.0.1")])
    attacker = "02:00:00:00:00:66"
    for ip in ("10.77.0.100", "10.77.0.101", "10.77.0.102"):
        d = h(attacker, "decline", options=[("requested_addr", ip), ("server_id", "10.77.0.1")])
        assert d.reply is None and d.ignored
    lease = h.leases.lease_for(STRANGER)
    assert lease is not None and lease.ip == int(ipaddress.IPv4Address("10.77.0.100"))  # the victim keeps its lease
    d = h("02:00:00:00:00:98", "discover", xid=2)
    assert d.reply is not None and BOOTP(d.reply.data).yiaddr == "10.77.0.101"  # nothing else was blocked


def test_release_ends_the_lease_now() -> None:
    h = Harness(make_config(pool=pool("10.77.0.100", "10.77.0.109")))
    h(STRANGER, "discover")
    h(STRANGER, "request", options=[("requested_addr", "10.77.0.100"), ("server_id", "10.77.0.1")])
    d = h(STRANGER, "release", ciaddr="10.77.0.100", options=[("server_id", "10.77.0.1")], now=NOW + 5)
    assert d.reply is None and d.event is None
    lease = h.leases.lease_for(STRANGER)
    assert lease is not None and lease.expires == NOW + 5


def test_inform_gets_configuration_without_lease() -> None:
    h = Harness(make_config())
    d = h(NODE1_MAC, "inform", ciaddr=NODE1_IP)
    assert d.reply is not None
    b = BOOTP(d.reply.data)
    opts = opts_of(d.reply.data)
    assert opts["message-type"] == 5 and b.yiaddr == "0.0.0.0" and b.ciaddr == NODE1_IP
    assert "lease_time" not in opts and opts["subnet_mask"] == "255.255.255.0"
    assert (d.reply.dest.ip, d.reply.dest.port) == (NODE1_IP, 68)
    assert d.event is None


def test_bootp_without_message_type_and_replies_are_ignored() -> None:
    h = Harness(make_config())
    raw = bytes(BOOTP(op=1, chaddr=bytes.fromhex("525400770001")) / DHCP(options=["end"]))
    assert h.policy.handle(decode(raw), NOW).reply is None
    raw = bytes(BOOTP(op=2, chaddr=bytes.fromhex("525400770001")) / DHCP(options=[("message-type", "offer"), "end"]))
    assert h.policy.handle(decode(raw), NOW).reply is None


# ---------------------------------------------------------------- proxy mode


def test_proxy_offer_for_pxe_client_has_no_address() -> None:
    h = Harness(make_config(mode="proxy"))
    d = h(NODE1_MAC, "discover", options=pxe_options(0, BIOS_VC))
    assert d.reply is not None
    b = BOOTP(d.reply.data)
    opts = opts_of(d.reply.data)
    assert (b.yiaddr, b.siaddr) == ("0.0.0.0", "10.77.0.1")
    assert opts["message-type"] == 2 and opts["server_id"] == "10.77.0.1"
    assert opts["vendor_class_id"] == b"PXEClient" and opts["vendor_specific"] == bytes([6, 1, 8, 255])
    assert opts["pxe_client_machine_identifier"] == UUID
    assert b.file.rstrip(b"\0") == b"undionly.kpxe"
    assert "lease_time" not in opts and "subnet_mask" not in opts
    assert d.reply.dest.ip == "255.255.255.255"
    assert isinstance(d.event, DhcpFromFirmware) and d.event.firmware is FirmwareKind.BIOS_PXE


def test_proxy_ignores_non_pxe_clients_unknown_macs_and_requests_on_67() -> None:
    h = Harness(make_config(mode="proxy"))
    assert h(NODE1_MAC, "discover", options=[("vendor_class_id", b"rackboot-deploy")]).reply is None
    assert h(STRANGER, "discover", options=pxe_options(0, BIOS_VC)).reply is None
    assert h(NODE1_MAC, "request", options=pxe_options(0, BIOS_VC)).reply is None


def test_proxy_port_4011_request_gets_ack_to_source_with_boot_item() -> None:
    h = Harness(make_config(mode="proxy"))
    item = b"\x80\x00\x00\x00"
    d = h(NODE1_MAC, "request", ciaddr="10.77.0.57", via=VIA_PXE, source=("10.77.0.57", 68),
          options=pxe_options(7, UEFI_VC, ("vendor_specific", bytes([71, 4]) + item + b"\xff")))
    assert d.reply is not None
    opts = opts_of(d.reply.data)
    assert opts["message-type"] == 5
    assert opts["vendor_specific"] == bytes([6, 1, 8, 71, 4]) + item + b"\xff"
    assert BOOTP(d.reply.data).file.rstrip(b"\0") == b"snponly.efi"
    assert (d.reply.dest.ip, d.reply.dest.port) == ("10.77.0.57", 68)


def test_proxy_ipxe_gets_script_with_pxeclient_and_without_no_pxedhcp() -> None:
    h = Harness(make_config(mode="proxy"))
    d = h(NODE1_MAC, "discover", options=pxe_options(0, BIOS_VC, ("user_class", b"iPXE")))
    assert d.reply is not None
    opts = decode(d.reply.data).options
    assert opts[o.BOOTFILE_NAME] == b"http://10.77.0.1:8080/boot/52-54-00-77-00-01.ipxe"
    assert opts[o.VENDOR_CLASS] == b"PXEClient"  # iPXE only takes proxy offers that carry it
    assert o.IPXE_ENCAP not in opts


def test_proxy_discovery_mode_answers_unknown_pxe_clients() -> None:
    h = Harness(make_config(mode="proxy", discovery=True))
    d = h(STRANGER, "discover", options=pxe_options(0, BIOS_VC))
    assert d.reply is not None and BOOTP(d.reply.data).yiaddr == "0.0.0.0"


def test_long_boot_file_name_goes_in_option_67_only() -> None:
    h = Harness(make_config(boot=BootPrograms("http://10.77.0.1:8080", uefi_nbp="x" * 130)))
    d = h(NODE1_MAC, "discover", options=pxe_options(7, UEFI_VC))
    assert d.reply is not None
    assert BOOTP(d.reply.data).file.rstrip(b"\0") == b""  # the BOOTP file field holds 127 bytes at most
    assert opts_of(d.reply.data)["boot-file-name"] == b"x" * 130


def test_client_identifier_echoed_rfc6842() -> None:
    h = Harness(make_config())
    d = h(NODE1_MAC, "discover", options=[("client_id", b"\x01\x52\x54\x00\x77\x00\x01")])
    assert d.reply is not None and opts_of(d.reply.data)["client_id"] == b"\x01\x52\x54\x00\x77\x00\x01"


def test_one_record_per_exchange_classified_once() -> None:
    """DISCOVER and REQUEST of one transaction id are one record; a new xid is a new exchange (a reboot)."""
    h = Harness(make_config())
    uefi = pxe_options(7, UEFI_VC)
    first = h(NODE1_MAC, "discover", xid=1, options=uefi)
    assert isinstance(first.event, DhcpFromFirmware) and first.event.firmware is FirmwareKind.UEFI_PXE
    assert first.event.arch == 7
    again = h(NODE1_MAC, "request", xid=1, options=[*uefi, ("requested_addr", NODE1_IP), ("server_id", "10.77.0.1")])
    assert again.reply is not None and again.event is None
    ipxe = h(NODE1_MAC, "discover", xid=2, options=[*uefi, ("user_class", b"iPXE")])
    assert isinstance(ipxe.event, DhcpFromFirmware) and ipxe.event.firmware is FirmwareKind.IPXE
    os_client = h(NODE1_MAC, "discover", xid=3, options=[("vendor_class_id", b"udhcp 1.35.0")])
    assert os_client.event == DhcpFromOs(NODE1_MAC, "udhcp 1.35.0", ts=os_client.event.ts)  # type: ignore[union-attr]
    http = h(NODE1_MAC, "discover", xid=4, options=[("pxe_client_architecture", (16).to_bytes(2, "big")),
                                                     ("vendor_class_id", b"HTTPClient:Arch:00016:UNDI:003000")])
    assert isinstance(http.event, DhcpFromFirmware) and http.event.firmware is FirmwareKind.UEFI_HTTP
