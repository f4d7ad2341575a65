"""The virtual firmware's frames and DHCP messages, decoded by scapy as an independent oracle, and its fault plan."""
from __future__ import annotations

import struct

import pytest
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from domain.errors import MalformedPacket
from vmtestbed import wire
from vmtestbed.faults import assign_faults, draw_post_delay, parse_faults, parse_post_delay
from vmtestbed.plan import make_plan

MAC = "52:54:00:7b:00:01"
UUID = bytes(range(16))


def _options(pkt: DHCP) -> dict[str, object]:
    return {o[0]: o[1] if len(o) == 2 else o[1:] for o in pkt.options if isinstance(o, tuple)}


def test_pxe_discover_frame_as_scapy_reads_it() -> None:
    payload = wire.build_request(wire.DISCOVER, 0x12345678, MAC, wire.pxe_client_options(0, UUID, ipxe=False), secs=3)
    raw_frame = wire.udp_frame(wire.mac_bytes(MAC), wire.BROADCAST_MAC, "0.0.0.0", "255.255.255.255", 68, 67, payload)
    frame = Ether(raw_frame)
    assert frame.dst == "ff:ff:ff:ff:ff:ff" and frame.src == MAC
    ip, udp = frame[IP], frame[UDP]
    assert (ip.src, ip.dst, udp.sport, udp.dport) == ("0.0.0.0", "255.255.255.255", 68, 67)
    # Our IP and UDP checksums equal the ones scapy computes for the same packet.
    rebuilt = Ether(raw_frame)
    del rebuilt[IP].chksum
    del rebuilt[UDP].chksum
    rebuilt = Ether(bytes(rebuilt))
    assert (rebuilt[IP].chksum, rebuilt[UDP].chksum) == (ip.chksum, udp.chksum)
    bootp = frame[BOOTP]
    assert bootp.op == 1 and bootp.xid == 0x12345678 and bootp.flags == 0 and bootp.secs == 3  # flags=0, like ROMs
    assert bootp.chaddr[:6] == wire.mac_bytes(MAC)
    opts = _options(frame[DHCP])
    assert opts["message-type"] == 1
    assert opts["vendor_class_id"] == b"PXEClient:Arch:00000:UNDI:002001"
    assert "user_class" not in opts  # option 77 comes only once the firmware is iPXE
    raw = bytes(frame[DHCP])
    assert b"\x5d\x02\x00\x00" in raw                      # option 93: arch 0 (BIOS)
    assert b"\x5e\x03\x01\x02\x01" in raw                  # option 94: UNDI 2.1
    assert b"\x61\x11\x00" + UUID in raw                   # option 97: type 0 + UUID
    assert len(bytes(frame[BOOTP])) >= 300                 # BOOTP minimum size


def test_ipxe_request_carries_user_class_and_requested_address() -> None:
    opts = [(wire.OPT_REQUESTED_IP, bytes([10, 78, 1, 1])), (wire.OPT_SERVER_ID, bytes([10, 78, 0, 1]))]
    payload = wire.build_request(wire.REQUEST, 7, MAC, opts + wire.pxe_client_options(7, UUID, ipxe=True))
    dhcp = BOOTP(payload)[DHCP]
    o = _options(dhcp)
    assert o["message-type"] == 3
    assert o["requested_addr"] == "10.78.1.1" and o["server_id"] == "10.78.0.1"
    assert o["user_class"] in (b"iPXE", [b"iPXE"]) or b"\x4d\x04iPXE" in bytes(dhcp)
    assert o["vendor_class_id"] == b"PXEClient:Arch:00007:UNDI:003000"


def test_reply_parsed_from_a_scapy_built_frame() -> None:
    reply = (
        Ether(src="02:00:00:00:00:01", dst=MAC) / IP(src="10.78.0.1", dst="10.78.1.1") / UDP(sport=67, dport=68)
        / BOOTP(op=2, xid=99, yiaddr="10.78.1.1", siaddr="10.78.0.1", chaddr=wire.mac_bytes(MAC), file=b"undionly.kpxe")
        / DHCP(options=[("message-type", "offer"), ("server_id", "10.78.0.1"), ("subnet_mask", "255.255.0.0"),
                        ("router", "10.78.0.254"), ("hostname", b"node-1"), "end"])
    )
    dgram = wire.parse_udp_frame(bytes(reply))
    assert (dgram.src_ip, dgram.dst_ip, dgram.dport) == ("10.78.0.1", "10.78.1.1", 68)
    r = wire.parse_reply(dgram.payload)
    assert r.message_type == wire.OFFER and r.xid == 99 and r.yiaddr == "10.78.1.1"
    assert r.server_id == "10.78.0.1" and r.prefixlen == 16 and r.router == "10.78.0.254"
    assert r.bootfile == "undionly.kpxe" and r.next_server == "10.78.0.1"
    assert r.text_option(wire.OPT_HOSTNAME) == "node-1"


def test_option_67_wins_over_the_file_field_and_overload_is_read() -> None:
    body = wire.encode_options([(wire.OPT_MESSAGE_TYPE, b"\x05"), (wire.OPT_OVERLOAD, b"\x01")])
    file_field = wire.encode_options([(wire.OPT_BOOTFILE, b"http://10.78.0.1:8080/boot/x.ipxe")]).ljust(128, b"\0")
    header = struct.pack("!BBBBIHH4s4s4s4s16s64s", 2, 1, 6, 0, 5, 0, 0, b"\0" * 4, bytes([10, 78, 1, 1]), b"\0" * 4, b"\0" * 4, wire.mac_bytes(MAC).ljust(16, b"\0"), b"\0" * 64)
    r = wire.parse_reply(header + file_field + wire.DHCP_MAGIC + body)
    assert r.message_type == wire.ACK and r.bootfile == "http://10.78.0.1:8080/boot/x.ipxe" and r.file == ""


@pytest.mark.parametrize("data", [b"", b"\x02" * 100, bytes(240), bytes([2]) + bytes(235) + wire.DHCP_MAGIC + b"\x35\x05"])
def test_malformed_replies_raise(data: bytes) -> None:
    with pytest.raises(MalformedPacket):
        wire.parse_reply(data)


def test_malformed_frames_raise() -> None:
    with pytest.raises(MalformedPacket):
        wire.parse_udp_frame(b"\0" * 20)
    tcp = bytes(Ether() / IP(proto=6) / (b"\0" * 20))
    with pytest.raises(MalformedPacket):
        wire.parse_udp_frame(tcp)


def test_faults_are_reproducible_from_the_seed() -> None:
    spec = parse_faults("noreturn=0.1,posthang=0.2,bmcdead=0.05,bmcslow=0.1:2,loss=0.3:0.5,die=0.1@tftp")
    names = [f"node-{i}" for i in range(1, 101)]
    a, b = assign_faults(spec, names, seed=7), assign_faults(spec, names, seed=7)
    assert a == b
    assert assign_faults(spec, names, seed=8) != a
    assert sum(f.noreturn for f in a.values()) == 10
    assert sum(f.posthang for f in a.values()) == 20
    assert sum(f.bmc_dead for f in a.values()) == 5
    assert {f.bmc_slow_s for f in a.values() if f.bmc_slow_s} == {2.0}
    assert sum(1 for f in a.values() if f.loss == 0.3) == 50
    assert sum(1 for f in a.values() if f.die_stage == "tftp") == 10
    timed = assign_faults(parse_faults("die=0.5@30"), names, seed=1)
    assert sum(1 for f in timed.values() if f.die_after_s == 30.0) == 50
    assert assign_faults(parse_faults(""), names, seed=1)["node-1"].any is False


@pytest.mark.parametrize("bad", ["loss", "loss=2", "die=0.1", "die=0.1@nowhere", "frobnicate=0.1", "bmcslow=x"])
def test_bad_fault_specs_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_faults(bad)


def test_post_delay_distributions() -> None:
    import random

    rng = random.Random(1)
    assert draw_post_delay(parse_post_delay("2"), rng) == 2.0
    assert all(1.0 <= draw_post_delay(parse_post_delay("1-3"), rng) <= 3.0 for _ in range(100))
    assert all(draw_post_delay(parse_post_delay("normal:1,5"), rng) >= 0 for _ in range(100))
    assert draw_post_delay(parse_post_delay("exp:0"), rng) == 0.0
    with pytest.raises(ValueError):
        parse_post_delay("3-1")


def test_plan_spreads_nodes_over_racks_and_refuses_oversized_racks() -> None:
    plan = make_plan("t", 5, 2)
    assert [n.rack for n in plan.node_list] == ["r1", "r1", "r1", "r2", "r2"]
    assert plan.node_list[4].ip == "10.78.1.5" and plan.node_list[4].bmc_ip == "10.79.1.5"
    assert plan.node_list[4].mac == "52:54:00:7b:00:05"
    assert all(ns.startswith("rbt-t-") for ns in plan.namespaces)
    with pytest.raises(ValueError):
        make_plan("t", 2001, 2)  # 1001 ports on one bridge
    with pytest.raises(ValueError):
        make_plan("Bad Name", 2, 1)
