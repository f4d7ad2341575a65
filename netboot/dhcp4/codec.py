"""Sans-io DHCPv4 codec (RFC 2131 message format, RFC 2132 options, RFC 3396 long options).

`decode()` turns a UDP payload into a `DhcpPacket` or raises MalformedPacket; `encode()` and
`encode_reply()` turn header fields plus option bytes into a payload. Pure functions over bytes,
built on struct, a few microseconds a packet: the server's hot path.
"""
from __future__ import annotations

import struct

from domain.errors import MalformedPacket
from netboot.dhcp4 import options as o

# RFC 2131 2: op htype hlen hops xid secs flags ciaddr yiaddr siaddr giaddr chaddr sname file, then the cookie.
_HEADER = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")
HEADER_LEN = _HEADER.size  # 236
MAGIC = b"\x63\x82\x53\x63"  # RFC 2131 3: the "magic cookie" before the options
OPTIONS_OFFSET = HEADER_LEN + 4
BOOTP_MIN_LEN = 300  # RFC 1542 2.1: pad replies to the minimum BOOTP message size; some ROMs reject less
BOOTREQUEST, BOOTREPLY = 1, 2
BROADCAST_FLAG = 0x8000  # RFC 2131 2, figure 2
ZERO_IP = b"\0\0\0\0"
_END = bytes((o.END,))


class DhcpPacket:
    """One decoded DHCP message; addresses stay packed (4 bytes), options map code -> concatenated value."""

    __slots__ = ("op", "htype", "hlen", "hops", "xid", "secs", "flags", "ciaddr", "yiaddr", "siaddr",
                 "giaddr", "chaddr", "sname", "file", "options")

    def __init__(self, op: int = BOOTREQUEST, htype: int = 1, hlen: int = 6, hops: int = 0, xid: int = 0,
                 secs: int = 0, flags: int = 0, ciaddr: bytes = ZERO_IP, yiaddr: bytes = ZERO_IP,
                 siaddr: bytes = ZERO_IP, giaddr: bytes = ZERO_IP, chaddr: bytes = b"", sname: bytes = b"",
                 file: bytes = b"", options: dict[int, bytes] | None = None) -> None:
        self.op = op
        self.htype = htype
        self.hlen = hlen
        self.hops = hops
        self.xid = xid
        self.secs = secs
        self.flags = flags
        self.ciaddr = ciaddr
        self.yiaddr = yiaddr
        self.siaddr = siaddr
        self.giaddr = giaddr
        self.chaddr = chaddr
        self.sname = sname
        self.file = file
        self.options: dict[int, bytes] = {} if options is None else options

    def __repr__(self) -> str:
        return f"DhcpPacket(op={self.op} type={self.message_type} mac={self.mac} xid={self.xid:#x} options={sorted(self.options)})"

    @property
    def message_type(self) -> int | None:
        """The DHCP message type (option 53), or None for plain BOOTP."""
        value = self.options.get(o.MESSAGE_TYPE)
        return value[0] if value else None

    @property
    def mac(self) -> str:
        """The client hardware address as lower-case colon hex (chaddr cut to hlen)."""
        return self.chaddr[:self.hlen].hex(":")

    def option_ip(self, code: int) -> bytes | None:
        """Return an option holding one IPv4 address (packed), or None when absent or not 4 bytes."""
        value = self.options.get(code)
        return value if value is not None and len(value) == 4 else None

    @property
    def client_arch(self) -> int | None:
        """The first client system architecture of option 93 (RFC 4578 2.1), or None."""
        value = self.options.get(o.CLIENT_ARCH)
        if not value or len(value) % 2:
            return None
        return (value[0] << 8) | value[1]

    @property
    def vendor_class(self) -> bytes:
        """The vendor class identifier (option 60), empty when absent."""
        return self.options.get(o.VENDOR_CLASS, b"")

    @property
    def user_class(self) -> bytes:
        """The user class (option 77) as sent: iPXE sends the bare string, RFC 3004 clients length-prefix it."""
        return self.options.get(o.USER_CLASS, b"")

    @property
    def is_ipxe(self) -> bool:
        """True when the client is iPXE: user class 'iPXE' or iPXE's encapsulated option 175 present."""
        return b"iPXE" in self.options.get(o.USER_CLASS, b"") or o.IPXE_ENCAP in self.options


_CHADDR_OFFSET = 28   # RFC 2131 2: op(1) htype(1) hlen(1) hops(1) xid(4) secs(2) flags(2) ciaddr yiaddr siaddr giaddr
_GIADDR_OFFSET = 24


def peek_source(data: bytes) -> tuple[bytes, bytes] | None:
    """The first 6 octets of chaddr and giaddr of a datagram, without decoding it; None when too short to be DHCP.

    For decisions taken before the full decode (rate limiting): the caller still decodes what it admits.
    """
    if len(data) < OPTIONS_OFFSET:
        return None
    return bytes(data[_CHADDR_OFFSET:_CHADDR_OFFSET + 6]), bytes(data[_GIADDR_OFFSET:_GIADDR_OFFSET + 4])


def peek_relay_agent_info(data: bytes) -> bytes | None:
    """The relay agent information (option 82) of a datagram's options field, without decoding the rest; None when
    absent or when the options are malformed (the decoder then drops the datagram).

    RFC 3046 2.1: a relay agent appends the option to the options field (never to 'file' or 'sname', so option
    overload is not followed here); RFC 3396 instances of it are concatenated, as decode() does.
    """
    if len(data) < OPTIONS_OFFSET or data[HEADER_LEN:OPTIONS_OFFSET] != MAGIC:
        return None
    if data.find(b"\x52", OPTIONS_OFFSET) < 0:  # no octet 82 at all, so no option 82: the parse is not needed
        return None
    opts: dict[int, bytes] = {}
    try:
        _parse_options(bytes(data), OPTIONS_OFFSET, len(data), opts)
    except MalformedPacket:
        return None
    return opts.get(o.RELAY_AGENT_INFO)


def decode(data: bytes) -> DhcpPacket:
    """Decode one DHCP message; raise MalformedPacket on anything that is not a well-formed one."""
    if len(data) < OPTIONS_OFFSET:
        raise MalformedPacket(f"DHCP message too short: {len(data)} bytes")
    data = bytes(data)
    if data[HEADER_LEN:OPTIONS_OFFSET] != MAGIC:
        raise MalformedPacket("no DHCP magic cookie (plain BOOTP or garbage)")
    op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr, sname, file = _HEADER.unpack_from(data)
    if op not in (BOOTREQUEST, BOOTREPLY):
        raise MalformedPacket(f"bad BOOTP op {op}")
    if hlen > 16:
        raise MalformedPacket(f"bad hardware address length {hlen}")
    opts: dict[int, bytes] = {}
    _parse_options(data, OPTIONS_OFFSET, len(data), opts)
    overload = opts.get(o.OVERLOAD)
    if overload is not None:
        # RFC 2131 4.1 / RFC 2132 9.3: the options field first, then 'file', then 'sname'.
        if len(overload) != 1 or overload[0] not in (1, 2, 3):
            raise MalformedPacket(f"bad option overload value {overload.hex()}")
        if overload[0] & 1:
            _parse_options(file, 0, len(file), opts)
            file = b""
        if overload[0] & 2:
            _parse_options(sname, 0, len(sname), opts)
            sname = b""
    mt = opts.get(o.MESSAGE_TYPE)
    if mt is not None and (len(mt) != 1 or not 1 <= mt[0] <= 18):
        raise MalformedPacket(f"bad message type option {mt.hex()}")
    return DhcpPacket(op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr,
                      sname, file, opts)


def _parse_options(data: bytes, i: int, n: int, opts: dict[int, bytes]) -> None:
    """Parse code/length/value options from data[i:n] into opts; repeated codes concatenate (RFC 3396)."""
    try:
        while i < n:
            code = data[i]
            if code == 0:
                i += 1
                continue
            if code == 255:
                return
            i += 2
            end = i + data[i - 1]
            if end > n:
                raise MalformedPacket(f"option {code} overruns the message ({end} > {n})")
            if code in opts:
                opts[code] += data[i:end]
            else:
                opts[code] = data[i:end]
            i = end
    except IndexError:
        raise MalformedPacket(f"option {code} has no length byte") from None
    # A missing END option is tolerated when the last option ends exactly at the end of the buffer.


def encode_reply(op: int, htype: int, hlen: int, xid: int, flags: int, ciaddr: bytes, yiaddr: bytes,
                 siaddr: bytes, giaddr: bytes, chaddr: bytes, sname: bytes, file: bytes, options: bytes,
                 hops: int = 0, secs: int = 0) -> bytes:
    """Encode a message from header fields and already-encoded options (END and padding are added)."""
    if len(file) > 128 or len(sname) > 64:
        raise ValueError("file must fit 128 bytes and sname 64 bytes (use options 67/66 for longer values)")
    head = _HEADER.pack(op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr,
                        sname, file)
    out = head + MAGIC + options + _END
    if len(out) < BOOTP_MIN_LEN:
        out += bytes(BOOTP_MIN_LEN - len(out))
    return out


def encode_options(opts: dict[int, bytes]) -> bytes:
    """Encode an option mapping in its order (message type first when present), without END."""
    parts = []
    mt = opts.get(o.MESSAGE_TYPE)
    if mt is not None:
        parts.append(o.tlv(o.MESSAGE_TYPE, mt))
    parts.extend(o.tlv(code, value) for code, value in opts.items() if code != o.MESSAGE_TYPE)
    return b"".join(parts)


def encode(packet: DhcpPacket) -> bytes:
    """Encode a DhcpPacket (the inverse of decode(), without option overload)."""
    return encode_reply(packet.op, packet.htype, packet.hlen, packet.xid, packet.flags, packet.ciaddr,
                        packet.yiaddr, packet.siaddr, packet.giaddr, packet.chaddr, packet.sname, packet.file,
                        encode_options(packet.options), hops=packet.hops, secs=packet.secs)


_IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")
_UDP_HEADER = struct.Struct("!HHHH")


def internet_checksum(data: bytes) -> int:
    """RFC 1071 checksum; the ones'-complement sum of 16-bit words is the big integer modulo 0xFFFF."""
    if len(data) & 1:
        data += b"\0"
    value = int.from_bytes(data, "big")
    total = value % 0xFFFF  # 2**16 == 1 (mod 0xFFFF): the end-around carry for free
    if total == 0 and value:
        total = 0xFFFF
    return ~total & 0xFFFF


def ipv4_udp_packet(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes, ttl: int = 64) -> bytes:
    """Return an IPv4 header + UDP header + payload with both checksums, for an AF_PACKET socket."""
    udp_len = 8 + len(payload)
    header = _IPV4_HEADER.pack(0x45, 0, 20 + udp_len, 0, 0x4000, ttl, 17, 0, src, dst)  # DF, no options
    header = header[:10] + internet_checksum(header).to_bytes(2, "big") + header[12:]
    udp = _UDP_HEADER.pack(sport, dport, udp_len, 0)
    check = internet_checksum(src + dst + b"\0\x11" + udp_len.to_bytes(2, "big") + udp + payload)
    # RFC 768: a computed checksum of zero is sent as all ones (zero means "no checksum").
    return header + _UDP_HEADER.pack(sport, dport, udp_len, check or 0xFFFF) + payload
