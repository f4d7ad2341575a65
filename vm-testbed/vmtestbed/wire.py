"""What a PXE ROM puts on the wire before it has an address: Ethernet/IPv4/UDP frames and DHCP client messages (pure).

The virtual firmware builds whole frames and sends them on an AF_PACKET socket, as a ROM's UNDI driver does,
and parses the server's replies out of raw frames (they are unicast to an address it does not have yet).
The codec is independent of the appliance's own DHCP codec on purpose: the testbed checks the server's bytes.
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

from domain.errors import MalformedPacket

ETH_P_IP = 0x0800
BROADCAST_MAC = b"\xff" * 6
DHCP_MAGIC = b"\x63\x82\x53\x63"  # RFC 2131 sec. 3: the options field starts with the magic cookie
_BOOTP = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")

# DHCP message types (RFC 2132 sec. 9.6)
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)
MESSAGE_NAMES = {1: "DISCOVER", 2: "OFFER", 3: "REQUEST", 4: "DECLINE", 5: "ACK", 6: "NAK", 7: "RELEASE", 8: "INFORM"}

# Option numbers used here (RFC 2132, RFC 4578 for 93/94/97, RFC 3004 for 77)
OPT_SUBNET_MASK, OPT_ROUTER, OPT_DNS, OPT_HOSTNAME, OPT_DOMAIN = 1, 3, 6, 12, 15
OPT_REQUESTED_IP, OPT_LEASE_TIME, OPT_OVERLOAD, OPT_MESSAGE_TYPE, OPT_SERVER_ID = 50, 51, 52, 53, 54
OPT_PARAM_LIST, OPT_MAX_SIZE, OPT_VENDOR_CLASS, OPT_CLIENT_ID = 55, 57, 60, 61
OPT_TFTP_SERVER, OPT_BOOTFILE, OPT_USER_CLASS = 66, 67, 77
OPT_CLIENT_ARCH, OPT_CLIENT_NDI, OPT_CLIENT_UUID = 93, 94, 97
OPT_IPXE_ENCAP = 175  # iPXE's encapsulated options (ipxe.org/howto/dhcpd)
OPT_END, OPT_PAD = 255, 0

# BPF program for "udp dst port 68" on an Ethernet SOCK_RAW packet socket: the output of
# `tcpdump -dd "udp dst port 68"`. The kernel drops every other frame (other nodes' broadcasts).
BPF_UDP_DST_68 = (
    (0x28, 0, 0, 0x0000000C), (0x15, 0, 4, 0x000086DD), (0x30, 0, 0, 0x00000014), (0x15, 0, 11, 0x00000011),
    (0x28, 0, 0, 0x00000038), (0x15, 8, 9, 0x00000044), (0x15, 0, 8, 0x00000800), (0x30, 0, 0, 0x00000017),
    (0x15, 0, 6, 0x00000011), (0x28, 0, 0, 0x00000014), (0x45, 4, 0, 0x00001FFF), (0xB1, 0, 0, 0x0000000E),
    (0x48, 0, 0, 0x00000010), (0x15, 0, 1, 0x00000044), (0x06, 0, 0, 0x00040000), (0x06, 0, 0, 0x00000000),
)


def mac_bytes(mac: str) -> bytes:
    """Return a colon-separated MAC as 6 bytes."""
    return bytes.fromhex(mac.replace(":", "").replace("-", ""))


def _checksum(data: bytes) -> int:
    """Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_frame(src_mac: bytes, dst_mac: bytes, src_ip: str, dst_ip: str, sport: int, dport: int, payload: bytes, ip_id: int = 0) -> bytes:
    """Build an Ethernet + IPv4 + UDP frame with valid IP and UDP checksums."""
    src, dst = ipaddress.IPv4Address(src_ip).packed, ipaddress.IPv4Address(dst_ip).packed
    ulen = _UDP.size + len(payload)
    pseudo = src + dst + struct.pack("!BBH", 0, 17, ulen)
    ucsum = _checksum(pseudo + _UDP.pack(sport, dport, ulen, 0) + payload) or 0xFFFF  # RFC 768: 0 means none
    udp = _UDP.pack(sport, dport, ulen, ucsum) + payload
    header = _IPV4.pack(0x45, 0, _IPV4.size + len(udp), ip_id & 0xFFFF, 0, 64, 17, 0, src, dst)
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return dst_mac + src_mac + struct.pack("!H", ETH_P_IP) + header + udp


@dataclass(frozen=True)
class UdpDatagram:
    """A UDP datagram taken out of an Ethernet frame."""

    src_mac: bytes
    dst_mac: bytes
    src_ip: str
    dst_ip: str
    sport: int
    dport: int
    payload: bytes


def parse_udp_frame(frame: bytes) -> UdpDatagram:
    """Extract the UDP datagram of an Ethernet/IPv4 frame; raise MalformedPacket otherwise."""
    if len(frame) < 14 + _IPV4.size + _UDP.size:
        raise MalformedPacket("frame too short for Ethernet/IPv4/UDP")
    if struct.unpack_from("!H", frame, 12)[0] != ETH_P_IP:
        raise MalformedPacket("not IPv4")
    vihl = frame[14]
    ihl = (vihl & 0x0F) * 4
    if vihl >> 4 != 4 or ihl < 20:
        raise MalformedPacket("bad IPv4 header")
    total = struct.unpack_from("!H", frame, 16)[0]
    if frame[23] != 17:
        raise MalformedPacket("not UDP")
    if struct.unpack_from("!H", frame, 20)[0] & 0x3FFF:
        raise MalformedPacket("IPv4 fragment")
    off = 14 + ihl
    if len(frame) < off + _UDP.size or total < ihl + _UDP.size:
        raise MalformedPacket("truncated UDP")
    sport, dport, ulen, _ = _UDP.unpack_from(frame, off)
    end = min(off + ulen, 14 + total, len(frame))
    return UdpDatagram(
        src_mac=frame[6:12], dst_mac=frame[0:6],
        src_ip=str(ipaddress.IPv4Address(frame[26:30])), dst_ip=str(ipaddress.IPv4Address(frame[30:34])),
        sport=sport, dport=dport, payload=frame[off + _UDP.size : end],
    )


@dataclass(frozen=True)
class DhcpReply:
    """An OFFER, ACK or NAK as a client reads it."""

    message_type: int
    xid: int
    flags: int
    yiaddr: str
    siaddr: str
    chaddr: bytes
    sname: str
    file: str
    options: dict[int, bytes] = field(default_factory=dict)

    @property
    def server_id(self) -> str | None:
        """Option 54, the address the client names in its REQUEST."""
        raw = self.options.get(OPT_SERVER_ID)
        return str(ipaddress.IPv4Address(raw[:4])) if raw and len(raw) >= 4 else None

    @property
    def prefixlen(self) -> int:
        """The prefix length from option 1 (24 when absent)."""
        raw = self.options.get(OPT_SUBNET_MASK)
        if not raw or len(raw) != 4:
            return 24
        return ipaddress.IPv4Network(f"0.0.0.0/{ipaddress.IPv4Address(raw)}").prefixlen

    @property
    def router(self) -> str | None:
        """The first router of option 3."""
        raw = self.options.get(OPT_ROUTER)
        return str(ipaddress.IPv4Address(raw[:4])) if raw and len(raw) >= 4 else None

    @property
    def next_server(self) -> str:
        """Where to fetch the boot file over TFTP: siaddr, or option 66, or the server id (RFC 2131 sec. 2; RFC 2132 sec. 9.4)."""
        if self.siaddr != "0.0.0.0":
            return self.siaddr
        raw = self.options.get(OPT_TFTP_SERVER)
        if raw:
            return raw.rstrip(b"\0").decode("ascii", "replace")
        return self.server_id or "0.0.0.0"

    @property
    def bootfile(self) -> str:
        """The boot file name: option 67, else the file field (RFC 2132 sec. 9.5)."""
        raw = self.options.get(OPT_BOOTFILE)
        if raw:
            return raw.rstrip(b"\0").decode("utf-8", "replace")
        return self.file

    def text_option(self, code: int) -> str:
        """Return a text option (hostname, domain) or an empty string."""
        raw = self.options.get(code)
        return raw.rstrip(b"\0").decode("utf-8", "replace") if raw else ""


def encode_options(options: list[tuple[int, bytes]]) -> bytes:
    """Encode options as TLVs, splitting values over 255 bytes into several instances (RFC 3396)."""
    out = bytearray()
    for code, value in options:
        chunks = [value[i : i + 255] for i in range(0, len(value), 255)] or [b""]
        for chunk in chunks:
            out += bytes((code, len(chunk))) + chunk
    out.append(OPT_END)
    return bytes(out)


def decode_options(data: bytes, into: dict[int, bytes]) -> None:
    """Decode TLV options into a dict, concatenating repeated options (RFC 3396)."""
    i = 0
    while i < len(data):
        code = data[i]
        if code == OPT_END:
            return
        if code == OPT_PAD:
            i += 1
            continue
        if i + 1 >= len(data) or i + 2 + data[i + 1] > len(data):
            raise MalformedPacket(f"option {code} runs past the end")
        length = data[i + 1]
        into[code] = into.get(code, b"") + data[i + 2 : i + 2 + length]
        i += 2 + length


def build_request(
    message_type: int,
    xid: int,
    mac: str,
    options: list[tuple[int, bytes]],
    secs: int = 0,
    ciaddr: str = "0.0.0.0",
    flags: int = 0,
) -> bytes:
    """Build a DHCP client message (BOOTREQUEST); option 53 is put first, as ROMs do."""
    header = _BOOTP.pack(
        1, 1, 6, 0, xid, min(secs, 0xFFFF), flags,
        ipaddress.IPv4Address(ciaddr).packed, b"\0" * 4, b"\0" * 4, b"\0" * 4,
        mac_bytes(mac) + b"\0" * 10, b"\0" * 64, b"\0" * 128,
    )
    body = encode_options([(OPT_MESSAGE_TYPE, bytes((message_type,)))] + options)
    msg = header + DHCP_MAGIC + body
    return msg + b"\0" * max(0, 300 - len(msg))  # BOOTP minimum size (RFC 1542 sec. 3.1.1)


def parse_reply(data: bytes) -> DhcpReply:
    """Parse a BOOTREPLY; raise MalformedPacket when it is not a DHCP reply."""
    if len(data) < _BOOTP.size + 4:
        raise MalformedPacket("shorter than a BOOTP header")
    op, htype, hlen, _hops, xid, _secs, flags, _ci, yi, si, _gi, chaddr, sname, bfile = _BOOTP.unpack_from(data)
    if op != 2:
        raise MalformedPacket("not a BOOTREPLY")
    if data[_BOOTP.size : _BOOTP.size + 4] != DHCP_MAGIC:
        raise MalformedPacket("no DHCP magic cookie")
    options: dict[int, bytes] = {}
    decode_options(data[_BOOTP.size + 4 :], options)
    overload = options.get(OPT_OVERLOAD, b"\0")[0]
    # RFC 2132 sec. 9.3: option overload moves options into the file and/or sname fields.
    if overload & 1:
        decode_options(bfile, options)
    if overload & 2:
        decode_options(sname, options)
    mtype = options.get(OPT_MESSAGE_TYPE)
    if not mtype:
        raise MalformedPacket("no DHCP message type")
    return DhcpReply(
        message_type=mtype[0], xid=xid, flags=flags,
        yiaddr=str(ipaddress.IPv4Address(yi)), siaddr=str(ipaddress.IPv4Address(si)),
        chaddr=chaddr[: hlen if htype == 1 and hlen <= 16 else 6],
        sname="" if overload & 2 else sname.split(b"\0", 1)[0].decode("ascii", "replace"),
        file="" if overload & 1 else bfile.split(b"\0", 1)[0].decode("utf-8", "replace"),
        options=options,
    )


def pxe_client_options(arch: int, uuid: bytes, ipxe: bool, vendor_class: str | None = None) -> list[tuple[int, bytes]]:
    """The options a PXE ROM (or iPXE, when ipxe) puts in DISCOVER and REQUEST (RFC 4578, PXE spec 2.1)."""
    undi = (3, 0) if arch == 7 else (2, 1)  # OVMF reports UNDI 3.0, BIOS ROMs 2.1
    vendor = vendor_class or f"PXEClient:Arch:{arch:05d}:UNDI:{undi[0]:03d}{undi[1]:03d}"
    opts: list[tuple[int, bytes]] = [
        (OPT_MAX_SIZE, struct.pack("!H", 1472)),
        (OPT_PARAM_LIST, bytes([1, 2, 3, 4, 5, 6, 12, 13, 15, 17, 43, 54, 60, 66, 67, 97, 128, 129, 130, 131, 132, 133, 134, 135, 175])),
        (OPT_CLIENT_ARCH, struct.pack("!H", arch)),
        (OPT_CLIENT_NDI, bytes((1,) + undi)),
        (OPT_CLIENT_UUID, b"\0" + uuid),
        (OPT_VENDOR_CLASS, vendor.encode()),
    ]
    if ipxe:
        opts.append((OPT_USER_CLASS, b"iPXE"))
        # iPXE announces its features in option 175 (include/ipxe/dhcp.h): 16 PXE extensions,
        # 19 HTTP, 21 TFTP, 24 bzImage, 235 version 1.0.0.
        opts.append((OPT_IPXE_ENCAP, bytes((16, 1, 1, 19, 1, 1, 21, 1, 1, 24, 1, 1, 235, 3, 1, 0, 0))))
    return opts


def os_client_options(vendor_class: str) -> list[tuple[int, bytes]]:
    """The options an operating system's DHCP client sends (no PXE options, its own vendor class)."""
    return [
        (OPT_MAX_SIZE, struct.pack("!H", 1472)),
        (OPT_PARAM_LIST, bytes([1, 3, 6, 12, 15, 28, 42, 51, 54])),
        (OPT_VENDOR_CLASS, vendor_class.encode()),
    ]
