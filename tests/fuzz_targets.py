"""Fuzz targets shared by tests/test_fuzz.py (hypothesis) and bench/fuzz_codecs.py (random.Random, 1,000,000 inputs).

For each protocol: a corpus of valid packets built by an independent encoder (scapy for DHCP, dnslib for
DNS, the request forms real TFTP clients send), a byte-level mutator, and a `check_*` function that feeds
one input to our codec and policy and asserts the properties every input must keep. A check returns what
became of the input ("malformed", "decoded" or "reply") and raises AssertionError when a property breaks;
any other exception escaping a check is a bug of the code under test.
"""
from __future__ import annotations

import ipaddress
import math
import random
import unicodedata
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from dnslib import EDNS0, QTYPE, DNSRecord
from scapy.layers.dhcp import BOOTP, DHCP

from domain.errors import MalformedPacket
from helpers import BIOS_VC, NODE1_IP, NODE1_MAC, NODE2_IP, NODE2_MAC, STRANGER, UEFI_VC, make_dhcp, pool, pxe_options, request_bytes
from netboot import dns
from netboot.dhcp4 import codec as dhcp_codec
from netboot.dhcp4 import options as o
from netboot.dhcp4.leases import LeaseTable
from netboot.dhcp4.policy import Admission, DhcpPolicy, VIA_DHCP, VIA_PXE
from netboot.tftp import codec as tftp_codec
from netboot.tftp.files import TftpFileError, normalize_path
from netboot.tftp.session import (
    BACKOFF_CAP, BLKSIZE_RANGE, TIMEOUT_RANGE, WINDOWSIZE_RANGE, ReadSession, SessionLimits, give_up_after,
)

MALFORMED, DECODED, REPLY = "malformed", "decoded", "reply"
NOW = 1_700_000_000.0

# ---------------------------------------------------------------------------------------------- mutation


def mutate(rng: random.Random, data: bytes, corpus: Sequence[bytes], tlv_from: int = 0,
           tlv_codes: Sequence[int] = ()) -> bytes:
    """Apply 1-4 random byte-level mutations: bit flips, overwrites, inserts, deletes, truncation, splices, TLVs.

    TLVs go at offset tlv_from (the start of the options) or after it, with a code from tlv_codes half of the time.
    """
    buf = bytearray(data)

    def where(n: int) -> int:
        """A position, mostly in the option area (inserts and deletes in the header mostly break the cookie)."""
        return rng.randint(min(tlv_from, n), n) if rng.random() < 0.8 else rng.randint(0, n)

    for _ in range(rng.choice((1, 1, 1, 2, 3, 4))):
        op = rng.randrange(8)
        n = len(buf)
        if op == 0 and n:  # flip 1-8 bits
            for _ in range(rng.randint(1, 8)):
                buf[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # overwrite bytes with interesting values
            i = rng.randrange(n)
            buf[i] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op == 2:  # insert random bytes
            i = where(n)
            buf[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 3 and n:  # delete a range
            i = where(n - 1)
            del buf[i:i + rng.randint(1, 16)]
        elif op == 4 and n:  # truncate
            del buf[where(n - 1):]
        elif op == 5 and corpus:  # splice with another valid packet
            other = rng.choice(corpus)
            cut = rng.randint(0, min(n, len(other)))
            buf = buf[:cut] + bytearray(other[cut:])
        elif op == 6:  # a random TLV (code, length, value) in the option area, length not always honest
            i = min(tlv_from, n) if rng.random() < 0.5 else rng.randint(min(tlv_from, n), n)  # an option boundary, or anywhere
            value = rng.randbytes(rng.choice((0, 1, 2, 4, 6, rng.randint(0, 255), rng.randint(150, 255), rng.randint(0, 300))))
            length = len(value) if rng.random() < 0.8 else rng.randrange(256)
            code = rng.choice(tlv_codes) if tlv_codes and rng.random() < 0.5 else rng.randrange(256)
            buf[i:i] = bytes((code, length & 0xFF)) + value
        elif op == 7 and n:  # duplicate a chunk
            i = where(n - 1)
            buf[i:i] = buf[i:i + rng.randint(1, 64)]
    return bytes(buf)


# ---------------------------------------------------------------------------------------------- DHCP

DHCP_MODES = ("authoritative", "proxy", "discovery")
RESERVED = {ipaddress.IPv4Address(NODE1_IP).packed: NODE1_MAC, ipaddress.IPv4Address(NODE2_IP).packed: NODE2_MAC}
SERVER_IP = ipaddress.IPv4Address("10.77.0.1").packed
# Options a client sends that matter to the policy or are echoed in replies: the mutator favours them.
DHCP_TLV_CODES = (o.REQUESTED_IP, o.OVERLOAD, o.MESSAGE_TYPE, o.SERVER_ID, o.MAX_MESSAGE_SIZE, o.VENDOR_CLASS,
                  o.CLIENT_ID, o.USER_CLASS, o.RELAY_AGENT_INFO, o.CLIENT_ARCH, o.CLIENT_UUID, o.IPXE_ENCAP,
                  o.VENDOR_SPECIFIC, o.END, o.PAD)
MIN_IP_DATAGRAM = 576    # RFC 2131 2 / RFC 1122 3.3.3: every host accepts an IP datagram of 576 octets
IP_UDP_HEADERS = 28      # 20 (IPv4 without options) + 8 (UDP)


@dataclass
class DhcpTarget:
    """One DHCP policy of a mode over an in-memory lease table whose pool overlaps the reservations."""

    mode: str
    policy: DhcpPolicy
    leases: LeaseTable


def dhcp_target(mode: str) -> DhcpTarget:
    """A policy in authoritative, proxy or discovery (authoritative, unknown MACs booted too) mode."""
    setup = make_dhcp(mode="proxy" if mode == "proxy" else "authoritative", discovery=mode == "discovery",
                      pool=pool("10.77.0.5", "10.77.0.40"))
    reserved = [r.ip for r in setup.reservations.values()] + [setup.settings.server_ip]
    leases = LeaseTable(None, setup.settings.pool, reserved)
    return DhcpTarget(mode, DhcpPolicy(setup.settings, setup.reservations, leases), leases)


def dhcp_corpus() -> list[bytes]:
    """Valid client requests built by scapy: every message type, PXE/UEFI/HTTP/iPXE clients, relayed, renewing."""
    out = []
    clients = [NODE1_MAC, NODE2_MAC, STRANGER, "02:00:00:00:00:42"]
    kinds: list[list[Any]] = [
        [],
        pxe_options(0, BIOS_VC),
        pxe_options(7, UEFI_VC),
        pxe_options(16, b"HTTPClient:Arch:00016:UNDI:003001"),
        pxe_options(0, BIOS_VC, ("user_class", b"iPXE")),
        [("vendor_class_id", b"PXEClient"), ("vendor_specific", bytes([71, 4, 0x80, 0, 0, 0, 255]))],
        [("client_id", b"\x01" + bytes(6)), ("relay_agent_information", b"\x01\x04eth0"), ("max_dhcp_size", 1500)],
        [("hostname", b"node"), ("param_req_list", [1, 3, 6, 15, 66, 67])],
    ]
    for i, mac in enumerate(clients):
        for j, extra in enumerate(kinds):
            for message in ("discover", "request", "inform", "decline", "release"):
                more: list[Any] = list(extra)
                ciaddr = "0.0.0.0"
                if message == "request":
                    more += [("requested_addr", (NODE1_IP, NODE2_IP, "10.77.0.5", "10.77.0.9")[(i + j) % 4])]
                    if j % 2:
                        more += [("server_id", "10.77.0.1")]
                elif message in ("decline", "release"):
                    more += [("requested_addr", "10.77.0.5"), ("server_id", "10.77.0.1")]
                    ciaddr = "10.77.0.5"
                elif message == "inform":
                    ciaddr = "10.77.0.7"
                giaddr = "10.77.5.1" if (i + j) % 3 == 0 else "0.0.0.0"
                out.append(request_bytes(mac, message, xid=0x1000 + len(out), flags=0x8000 if j % 2 else 0,
                                         ciaddr=ciaddr, giaddr=giaddr, options=more))
    return out


def dhcp_reply_limit(req: dhcp_codec.DhcpPacket) -> int:
    """The largest DHCP message (UDP payload) a client accepts: 576 - 28 unless option 57 allows more (RFC 2132 9.10)."""
    mms = req.options.get(o.MAX_MESSAGE_SIZE)
    size = int.from_bytes(mms, "big") if mms is not None and len(mms) == 2 else 0
    return max(MIN_IP_DATAGRAM, size) - IP_UDP_HEADERS


def check_dhcp(target: DhcpTarget, data: bytes, now: float = NOW, via: str = VIA_DHCP,
               scapy_check: bool = True) -> str:
    """admit + decode + handle one datagram; every reply re-decodes (ours, scapy), fits the client, keeps reservations."""
    admission = target.policy.admit(data, via, now)  # never raises; its verdict does not gate the checks below
    assert admission in (Admission.DROP, Admission.OTHER, Admission.NODE), admission
    try:
        req = dhcp_codec.decode(data)
    except MalformedPacket:
        return MALFORMED
    # an inventory node's datagram is always admitted and answered first (the rate limit is for the others)
    assert (admission is Admission.NODE) == (bytes(req.chaddr[:6]) in target.policy.node_chaddrs), (admission, req)
    decision = target.policy.handle(req, now, via, ("10.77.0.50", 68) if via == VIA_PXE else None)
    reply = decision.reply
    if reply is None:
        return DECODED
    raw = reply.data
    again = dhcp_codec.decode(raw)  # our own reply must decode (MalformedPacket here is a failure)
    assert again.op == dhcp_codec.BOOTREPLY and again.xid == req.xid and again.chaddr == req.chaddr
    assert again.message_type == reply.message_type in (o.OFFER, o.ACK, o.NAK)
    assert len(raw) <= dhcp_reply_limit(req), f"{len(raw)}-byte reply, limit {dhcp_reply_limit(req)}"
    owner = RESERVED.get(again.yiaddr)
    assert owner is None or owner == req.mac, f"{req.mac} was given {NODE1_MAC}'s or {NODE2_MAC}'s address"
    assert again.yiaddr != SERVER_IP, "the server's own address was handed out"
    if target.mode == "proxy":
        assert again.yiaddr == dhcp_codec.ZERO_IP, "a proxy reply carries no address"
    if scapy_check:
        pkt = BOOTP(raw)  # the independent decoder
        assert pkt.op == 2 and pkt.xid == req.xid and DHCP in pkt
        scapy_opts = {x[0]: x[1] for x in pkt[DHCP].options if isinstance(x, tuple) and len(x) >= 2}
        assert scapy_opts.get("message-type") == reply.message_type
    return REPLY


# ---------------------------------------------------------------------------------------------- TFTP

TFTP_OPTION_NAMES = ("blksize", "windowsize", "tsize", "timeout", "multicast", "BLKSIZE", "")


def tftp_corpus() -> list[bytes]:
    """Valid datagrams: RRQs as PXE ROMs, iPXE, OVMF and tftp-hpa send them, ACKs, ERRORs, DATA, OACK, WRQ."""
    enc = tftp_codec
    return [
        enc.encode_request("undionly.kpxe"),
        enc.encode_request("/pxelinux.0", "netascii"),
        enc.encode_request("snponly.efi", options={"blksize": 1468, "tsize": 0}),
        enc.encode_request("boot\\x64\\wdsnbp.com", options={"blksize": 1432, "windowsize": 4, "tsize": 0}),
        enc.encode_request("52-54-00-77-00-01.ipxe", options={"timeout": 3, "windowsize": 16}),
        enc.encode_request("../etc/passwd"),
        enc.encode_request("upload.bin", write=True),
        enc.encode_ack(0), enc.encode_ack(1), enc.encode_ack(65535),
        enc.encode_error(8, "tsize probe"), enc.encode_error(0, ""),
        enc.encode_data(1, b"x" * 512), enc.encode_oack({"blksize": 1468}),
    ]


TFTP_CORPUS = tftp_corpus()


@dataclass
class TftpRun:
    """What a random ReadSession run did: the datagrams it sent and the ticks it took to end once the client fell silent."""

    datagrams: int
    ticks_to_end: int


def check_tftp_datagram(data: bytes) -> str:
    """decode one datagram; it is a packet or MalformedPacket, and a decoded packet encodes back to a datagram."""
    try:
        pkt = tftp_codec.decode(data)
    except MalformedPacket:
        return MALFORMED
    options = getattr(pkt, "options", None)
    if options is not None and ("" in options.values() or (not options and isinstance(pkt, tftp_codec.OptionAck))):
        # Trailing NULs are tolerated (some ROMs pad requests), so an option with an empty value last, or an
        # OACK of no options, decodes but does not encode back to itself; no client or server sends those.
        return DECODED
    again = tftp_codec.decode(tftp_codec.encode(pkt))
    if isinstance(pkt, (tftp_codec.ReadRequest, tftp_codec.WriteRequest)):
        assert again.filename == pkt.filename and again.options == pkt.options  # type: ignore[union-attr]
    return DECODED


def check_tftp_session(file: bytes, requested: dict[str, str], limits: SessionLimits,
                       events: Iterable[tuple[str, Any]]) -> TftpRun:
    """Run a ReadSession through events ("ack" n, "error" code, "packet" bytes, "tick" seconds), then silence.

    Checks: negotiation stays within the limits and RFC 2348/2349/7440 ranges; every DATA block lies inside
    the file with the right bytes; a window is never wider than negotiated; once the client is silent the
    session ends within the time `retries` fixed-timer retransmissions take (session.give_up_after), in at most
    retries + 1 ticks plus the doublings that take the adaptive timeout from its floor to its cap.
    """
    s = ReadSession(file, requested, limits)
    p = s.params
    assert BLKSIZE_RANGE[0] <= p.blksize <= max(limits.max_blksize, 512) and p.blksize <= BLKSIZE_RANGE[1]
    assert WINDOWSIZE_RANGE[0] <= p.windowsize <= max(limits.max_windowsize, 1)
    assert set(p.oack) <= {"blksize", "windowsize", "tsize", "timeout"}
    if "timeout" in p.oack:
        assert TIMEOUT_RANGE[0] <= int(p.oack["timeout"]) <= TIMEOUT_RANGE[1]
    if "tsize" in p.oack:
        assert p.oack["tsize"] == str(len(file))
    now = 0.0
    sent = 0

    def sent_ok(datagrams: list[bytes]) -> None:
        """Check what the session sent in one step: a lone OACK as negotiated, or DATA inside the file and window."""
        nonlocal sent
        sent += len(datagrams)
        data_blocks = 0
        for d in datagrams:
            pkt = tftp_codec.decode(d)
            if isinstance(pkt, tftp_codec.OptionAck):
                assert pkt.options == p.oack and len(datagrams) == 1
                continue
            assert isinstance(pkt, tftp_codec.Data), pkt
            data_blocks += 1
            assert 1 <= pkt.block <= s.last_block, f"block {pkt.block} beyond the file's {s.last_block}"
            off = (pkt.block - 1) * p.blksize
            assert pkt.payload == file[off:off + p.blksize]
        assert data_blocks <= p.windowsize

    sent_ok(s.start(now))
    for kind, arg in events:
        if kind == "ack":
            sent_ok(s.receive(tftp_codec.Ack(arg & 0xFFFF), now))
        elif kind == "error":
            sent_ok(s.receive(tftp_codec.Error(arg & 0xFFFF, "fuzz"), now))
        elif kind == "packet":
            try:
                pkt = tftp_codec.decode(arg)
            except MalformedPacket:
                continue
            sent_ok(s.receive(pkt, now))
        else:
            now += arg
            sent_ok(s.tick(now))
    ticks = 0
    doublings = math.ceil(math.log2(max(p.timeout, limits.timeout) * BACKOFF_CAP / min(limits.rto_floor, p.timeout)))
    bound = limits.retries + 1 + doublings
    silent_from = now
    while not s.finished:
        assert s.deadline is not None and ticks <= bound, f"not finished after {ticks} ticks"
        assert s.deadline - silent_from <= give_up_after(p.timeout, limits.retries) + 1e-6
        now = max(now, s.deadline)
        sent_ok(s.tick(now))
        ticks += 1
    assert s.deadline is None
    return TftpRun(sent, ticks)


def is_control(c: str) -> bool:
    """True for a control character (Unicode category Cc: C0, DEL, C1)."""
    return unicodedata.category(c) == "Cc"


def check_tftp_path(path: str) -> str:
    """normalize_path refuses (TftpFileError) or returns a relative path without '..', empty parts or control characters."""
    try:
        name = normalize_path(path)
    except TftpFileError:
        return MALFORMED
    parts = name.split("/")
    assert name and not name.startswith("/") and "\\" not in name
    assert ".." not in parts and "" not in parts and "." not in parts, name
    assert not any(is_control(c) for c in name), repr(name)
    return DECODED


# ---------------------------------------------------------------------------------------------- DNS

DNS_HOSTS = {"node-1": ipaddress.IPv4Address("10.77.0.11"), "node-2": ipaddress.IPv4Address("10.77.0.12")}


def dns_zone() -> dns.DnsZone:
    """The zone of a small appliance: cluster.test, two nodes, reverse zone 10.77.0.0/24."""
    settings = dns.DnsSettings(interface="rb0", address=ipaddress.IPv4Interface("10.77.0.1/24"), domain="cluster.test")
    return dns.DnsZone(settings, DNS_HOSTS)


def dns_corpus() -> list[bytes]:
    """Valid queries built by dnslib: names in and out of the zone, reverse names, every common type, EDNS."""
    names = ["node-1.cluster.test", "NODE-2.Cluster.Test", "cluster.test", "rackboot.cluster.test", "nobody.cluster.test",
             "11.0.77.10.in-addr.arpa", "99.0.77.10.in-addr.arpa", "1.1.1.1.in-addr.arpa", "example.com", "x." * 60 + "test"]
    out = []
    for i, name in enumerate(names):
        for qtype in ("A", "AAAA", "PTR", "SOA", "NS", "ANY", "TXT"):
            q = DNSRecord.question(name, qtype)
            if (i + len(qtype)) % 2:
                q.add_ar(EDNS0(udp_len=4096 if i % 3 else 1232))
            out.append(q.pack())
    multi = DNSRecord.question("node-1.cluster.test")
    multi.add_question(*DNSRecord.question("node-2.cluster.test").questions)
    out.append(multi.pack())
    out.append(DNSRecord.question("node-1.cluster.test", "A", "CH").pack())
    return out


def check_dns(zone: dns.DnsZone, data: bytes) -> str:
    """decode_query, then answer() and pack() on anything decoded; a packed reply parses again and fits UDP."""
    try:
        request = dns.decode_query(data)
    except MalformedPacket:
        return MALFORMED
    reply = zone.answer(request)
    if reply is None:
        return DECODED
    raw = reply.pack()
    again = DNSRecord.parse(raw)
    assert again.header.qr == 1 and again.header.id == request.header.id
    udp = dns._pack(request, reply, True)  # what the service sends over UDP (truncated with TC when too big)
    limit = next((max(512, rr.rclass) for rr in request.ar if rr.rtype == QTYPE.OPT), 512)
    assert len(udp) <= limit
    return REPLY




# ---------------------------------------------------------------------------------------------- random inputs (bench)

INTERESTING_INTS = ("0", "1", "7", "8", "512", "1468", "1469", "65464", "65465", "65535", "65536", "-1", "255", "256",
                     " 16 ", "1_0", "٣", "0x10", "", "99999999999999999999")


def random_option_value(rng: random.Random) -> str:
    """An option value: an interesting number, a random number, or random text."""
    r = rng.random()
    if r < 0.5:
        return rng.choice(INTERESTING_INTS)
    if r < 0.85:
        return str(rng.randint(-10, 70000))
    return "".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.randint(0, 8)))


def random_tftp_session(rng: random.Random) -> tuple[bytes, dict[str, str], SessionLimits, list[tuple[str, Any]]]:
    """A file, requested options, limits and a sequence of client packets and clock ticks for check_tftp_session."""
    size = rng.choice((0, 1, 7, 8, 511, 512, 513, 1024, rng.randint(0, 4000)))
    file = rng.randbytes(size)
    requested = {rng.choice(TFTP_OPTION_NAMES).lower(): random_option_value(rng) for _ in range(rng.randint(0, 5))}
    limits = SessionLimits(max_blksize=rng.choice((512, 1428, 1468, 8192, 65464)), max_windowsize=rng.choice((1, 4, 8, 64)),
                           timeout=rng.choice((0.5, 1.0, 2.0)), retries=rng.randint(0, 6), first_retries=rng.randint(0, 3))
    events: list[tuple[str, Any]] = []
    block = 0
    for _ in range(rng.randint(0, 40)):
        r = rng.random()
        if r < 0.55:  # mostly plausible ACKs: the next window, a duplicate, or anything
            block = rng.choice((block + rng.randint(0, 16), block, block - 1, rng.randrange(65536)))
            events.append(("ack", block))
        elif r < 0.62:
            events.append(("error", rng.randrange(9)))
        elif r < 0.8:
            events.append(("packet", mutate(rng, rng.choice(TFTP_CORPUS), TFTP_CORPUS)))
        else:
            events.append(("tick", rng.choice((0.0, 0.3, 1.0, 2.5, 10.0))))
    return file, requested, limits, events


def random_path(rng: random.Random) -> str:
    """A request path assembled from traversal pieces, separators, control and odd Unicode characters."""
    pieces = ("..", ".", "/", "\\", "a", "boot", "..\\", "%2e%2e", "\x00", "\x1f", "\x7f", "\x85", "\u202e", "é",
              "....", " ", "~", "C:", "//", "./", "\t", "\u2024\u2024", "\uff0e\uff0e")
    return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))

