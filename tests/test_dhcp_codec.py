"""DHCPv4 codec: golden bytes checked with scapy as an independent decoder and builder; malformed input."""
from __future__ import annotations

import random
import socket

import pytest
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, UDP
from scapy.utils import checksum as scapy_checksum

from domain.errors import MalformedPacket
from netboot.dhcp4 import options as o
from netboot.dhcp4.codec import (
    BOOTP_MIN_LEN, BOOTREPLY, DhcpPacket, decode, encode, encode_reply, internet_checksum, ipv4_udp_packet,
)

MAC = bytes.fromhex("525400770001")
UUID = b"\x00" + bytes(range(16))


def scapy_discover(**extra_options: object) -> bytes:
    """A PXE DISCOVER as OVMF sends it, built by scapy."""
    opts = [
        ("message-type", "discover"),
        ("max_dhcp_size", 1464),
        ("param_req_list", [1, 2, 3, 4, 5, 6, 12, 13, 15, 17, 18, 22, 23, 28, 40, 41, 42, 43, 50, 51, 54, 58, 59, 60, 66, 67, 97, 128]),
        ("pxe_client_architecture", b"\x00\x07"),
        ("pxe_client_network_interface", b"\x01\x03\x00"),
        ("pxe_client_machine_identifier", UUID),
        ("vendor_class_id", b"PXEClient:Arch:00007:UNDI:003000"),
        *extra_options.items(),
        "end",
    ]
    return bytes(BOOTP(op=1, chaddr=MAC + bytes(10), xid=0xDEADBEEF, secs=4, flags=0x8000) / DHCP(options=opts))


def test_decode_scapy_discover() -> None:
    pkt = decode(scapy_discover())
    assert (pkt.op, pkt.htype, pkt.hlen, pkt.xid, pkt.secs, pkt.flags) == (1, 1, 6, 0xDEADBEEF, 4, 0x8000)
    assert pkt.mac == "52:54:00:77:00:01"
    assert pkt.message_type == o.DISCOVER
    assert pkt.client_arch == 7
    assert pkt.vendor_class == b"PXEClient:Arch:00007:UNDI:003000"
    assert pkt.options[o.CLIENT_UUID] == UUID
    assert pkt.options[o.MAX_MESSAGE_SIZE] == (1464).to_bytes(2, "big")
    assert pkt.options[o.PARAMETER_REQUEST_LIST][:4] == bytes([1, 2, 3, 4])
    assert not pkt.is_ipxe
    assert pkt.option_ip(o.REQUESTED_IP) is None


def test_decode_ipxe_user_class_and_addresses() -> None:
    raw = bytes(BOOTP(op=1, chaddr=MAC, ciaddr="10.77.0.11", giaddr="10.9.0.1", xid=7)
                / DHCP(options=[("message-type", "request"), ("requested_addr", "10.77.0.11"),
                                ("server_id", "10.77.0.1"), ("user_class", b"iPXE"), "end"]))
    pkt = decode(raw)
    assert pkt.is_ipxe
    assert pkt.message_type == o.REQUEST
    assert socket.inet_ntoa(pkt.ciaddr) == "10.77.0.11"
    assert socket.inet_ntoa(pkt.giaddr) == "10.9.0.1"
    assert socket.inet_ntoa(pkt.option_ip(o.REQUESTED_IP) or b"") == "10.77.0.11"
    assert socket.inet_ntoa(pkt.option_ip(o.SERVER_ID) or b"") == "10.77.0.1"


def test_ipxe_detected_by_option_175_alone() -> None:
    raw = bytes(BOOTP(op=1, chaddr=MAC) / DHCP(options=[("message-type", "discover"), (175, b"\xb1\x05\x01\x80\x86\x10\x0e"), "end"]))
    assert decode(raw).is_ipxe


def test_encode_checked_by_scapy() -> None:
    opts = {
        o.MESSAGE_TYPE: bytes([o.OFFER]),
        o.SERVER_ID: socket.inet_aton("10.77.0.1"),
        o.LEASE_TIME: (3600).to_bytes(4, "big"),
        o.SUBNET_MASK: socket.inet_aton("255.255.255.0"),
        o.DNS_SERVERS: socket.inet_aton("10.77.0.1") + socket.inet_aton("10.77.0.2"),
        o.HOST_NAME: b"node-1",
        o.VENDOR_CLASS: b"PXEClient",
        o.BOOTFILE_NAME: b"undionly.kpxe",
    }
    pkt = DhcpPacket(op=BOOTREPLY, xid=0x01020304, flags=0x8000, yiaddr=socket.inet_aton("10.77.0.11"),
                     siaddr=socket.inet_aton("10.77.0.1"), chaddr=MAC + bytes(10), file=b"undionly.kpxe", options=opts)
    raw = encode(pkt)
    assert len(raw) >= BOOTP_MIN_LEN
    b = BOOTP(raw)
    assert (b.op, b.xid, b.flags, b.yiaddr, b.siaddr) == (2, 0x01020304, 0x8000, "10.77.0.11", "10.77.0.1")
    assert b.chaddr[:6] == MAC
    assert b.file.rstrip(b"\0") == b"undionly.kpxe"
    got = {x[0]: (x[1] if len(x) == 2 else x[1:]) for x in b[DHCP].options if isinstance(x, tuple)}
    assert b[DHCP].options[0] == ("message-type", 2)  # message type first
    assert got["server_id"] == "10.77.0.1"
    assert got["lease_time"] == 3600
    assert got["subnet_mask"] == "255.255.255.0"
    assert got["name_server"] == ("10.77.0.1", "10.77.0.2")
    assert got["hostname"] == b"node-1"
    assert got["vendor_class_id"] == b"PXEClient"
    assert got["boot-file-name"] == b"undionly.kpxe"
    assert "end" in b[DHCP].options
    # And our decoder reads back what it wrote.
    back = decode(raw)
    assert back.options == opts and back.yiaddr == pkt.yiaddr and back.file.rstrip(b"\0") == b"undionly.kpxe"


def test_long_option_split_and_concatenated_rfc3396() -> None:
    value = bytes(range(256)) + bytes(range(100))  # 356 bytes: two instances on the wire
    raw = encode_reply(BOOTREPLY, 1, 6, 1, 0, bytes(4), bytes(4), bytes(4), bytes(4), MAC, b"", b"", o.tlv(43, value))
    instances = [x for x in BOOTP(raw)[DHCP].options if isinstance(x, tuple) and x[0] == "vendor_specific"]
    assert [len(v) for _, v in instances] == [255, 101]
    assert decode(raw).options[43] == value


def test_option_overload_reads_file_then_sname() -> None:
    # RFC 2132 9.3: option 52 = 3, options continue in 'file' and then in 'sname'.
    file_opts = bytes([12, 4]) + b"node" + bytes([255])
    sname_opts = bytes([15, 4]) + b"test" + bytes([255])
    raw = bytes(BOOTP(op=1, chaddr=MAC, file=file_opts, sname=sname_opts)
                / DHCP(options=[("message-type", "discover"), (52, b"\x03"), "end"]))
    pkt = decode(raw)
    assert pkt.options[12] == b"node" and pkt.options[15] == b"test"
    assert pkt.file == b"" and pkt.sname == b""


def test_missing_end_tolerated_and_padding_skipped() -> None:
    raw = scapy_discover()
    body = raw[: raw.index(b"\xff", 240)]  # cut at END
    assert decode(body).message_type == o.DISCOVER
    assert decode(body[:240] + b"\0\0\0" + body[240:]).client_arch == 7


@pytest.mark.parametrize("mutate, why", [
    (lambda raw: raw[:100], "truncated header"),
    (lambda raw: raw[:239], "truncated before the cookie ends"),
    (lambda raw: raw[:236] + b"\x63\x82\x53\x00" + raw[240:], "bad magic cookie"),
    (lambda raw: raw[:240] + bytes([60, 200]) + b"PXEClient", "option overruns the message"),
    (lambda raw: raw[:240] + bytes([53, 1, 1, 60]), "option without a length byte"),
    (lambda raw: bytes([7]) + raw[1:], "bad op"),
    (lambda raw: raw[:2] + bytes([17]) + raw[3:], "hlen over 16"),
    (lambda raw: raw[:240] + bytes([53, 2, 1, 1, 255]), "message type of length 2"),
    (lambda raw: raw[:240] + bytes([53, 1, 1, 52, 1, 9, 255]), "bad overload value"),
    (lambda raw: raw[:108] + bytes([12, 200]) + raw[110:240] + bytes([53, 1, 1, 52, 1, 1, 255]), "overrun inside the overloaded file field"),
])
def test_malformed_raises(mutate: object, why: str) -> None:
    with pytest.raises(MalformedPacket):
        decode(mutate(scapy_discover()))  # type: ignore[operator]


def test_random_corruption_only_raises_malformed() -> None:
    rng = random.Random(2131)
    raw = scapy_discover()
    for cut in range(len(raw) + 1):
        try:
            decode(raw[:cut])
        except MalformedPacket:
            pass
    for _ in range(2000):
        mutated = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            mutated[rng.randrange(236, len(raw))] = rng.randrange(256)
        try:
            decode(bytes(mutated))
        except MalformedPacket:
            pass


def test_internet_checksum_matches_scapy() -> None:
    rng = random.Random(768)
    for n in (0, 1, 2, 3, 20, 301, 1500):
        data = bytes(rng.randrange(256) for _ in range(n))
        assert internet_checksum(data) == scapy_checksum(data), n
    assert internet_checksum(b"\xff\xff") == scapy_checksum(b"\xff\xff")
    assert internet_checksum(bytes(8)) == scapy_checksum(bytes(8))


def test_ipv4_udp_packet_checked_by_scapy() -> None:
    payload = scapy_discover()
    raw = ipv4_udp_packet(socket.inet_aton("10.77.0.1"), socket.inet_aton("10.77.0.11"), 67, 68, payload)
    pkt = IP(raw)
    assert (pkt.src, pkt.dst, pkt.ttl, pkt.proto, pkt.len) == ("10.77.0.1", "10.77.0.11", 64, 17, len(raw))
    assert (pkt[UDP].sport, pkt[UDP].dport, pkt[UDP].len) == (67, 68, 8 + len(payload))
    rebuilt = IP(raw)
    del rebuilt.chksum
    del rebuilt[UDP].chksum
    rebuilt = IP(bytes(rebuilt))
    assert pkt.chksum == rebuilt.chksum
    assert pkt[UDP].chksum == rebuilt[UDP].chksum
    assert bytes(pkt[UDP].payload) == payload
