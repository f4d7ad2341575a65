"""Pure DHCPv4 decisions: a decoded request, the inventory and the lease table in, a reply (or none) out.

No sockets, no clock, no event bus: `DhcpPolicy.handle()` returns a `Decision` carrying the encoded
reply, where to send it and at most one node record (`DhcpFromFirmware` or `DhcpFromOs`, once per DHCP
exchange of a MAC: the first DISCOVER or REQUEST of a transaction id); the transport does the I/O.
Option bytes that do not depend on the request are encoded once at construction.
"""
from __future__ import annotations

import enum
import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import Mapping

import ipxe
from domain.logfields import fields
from domain.progress import DhcpFromFirmware, DhcpFromOs, FirmwareKind, NodeEvent
from netboot.dhcp4 import options as o
from netboot.dhcp4.codec import (
    BOOTREPLY,
    BOOTREQUEST,
    BROADCAST_FLAG,
    ZERO_IP,
    DhcpPacket,
    encode_reply,
    peek_relay_agent_info,
    peek_source,
)
from netboot.dhcp4.leases import LeaseTable, int_to_ip, ip_to_int
from netboot.dhcp4.ratelimit import SourceLimiter
from netboot.dhcp4.settings import DhcpSettings, RelayedSubnet, Reservation

log = logging.getLogger("rackboot.dhcp")

VIA_DHCP = "dhcp"   # the request came in on the DHCP server port (67)
VIA_PXE = "pxe"     # the request came in on the PXE boot server port (4011), proxy mode only
BROADCAST_IP = "255.255.255.255"

# Architectures (RFC 4578 2.1) booted over TFTP, and over HTTP (UEFI HTTP boot), by NBP role.
_TFTP_ARCHES = {o.ARCH_BIOS: "bios", o.ARCH_EFI_IA32: "uefi", o.ARCH_EFI_BC: "uefi", o.ARCH_EFI_X64: "uefi",
                o.ARCH_EFI_ARM64: "arm64"}
_HTTP_ARCHES = {o.ARCH_HTTP_IA32: "uefi", o.ARCH_HTTP_X64: "uefi", o.ARCH_HTTP_ARM64: "arm64"}
_MT = {t: bytes((o.MESSAGE_TYPE, 1, t)) for t in o.MESSAGE_NAMES}
# Firmware by RFC 4578 2.1 architecture, for PXE clients.
_PXE_FIRMWARE = {o.ARCH_BIOS: FirmwareKind.BIOS_PXE, o.ARCH_EFI_IA32: FirmwareKind.UEFI_PXE,
                 o.ARCH_EFI_BC: FirmwareKind.UEFI_PXE, o.ARCH_EFI_X64: FirmwareKind.UEFI_PXE,
                 o.ARCH_EFI_ARM64: FirmwareKind.UEFI_PXE}
MAX_TRACKED_EXCHANGES = 65536  # MACs whose last transaction id is remembered (oldest forgotten first)
POOL_EXHAUSTED = "pool exhausted"  # Decision.ignored when a new client gets no address (the transport counts it)
QUIET_S = 60.0  # at most one warning a minute per kind (exhaustion, rate limiting, DECLINE)


class Admission(enum.IntEnum):
    """What admit() says of a datagram before its decode: drop it, handle it, or handle it first (false only for DROP)."""

    DROP = 0    # a MAC outside the inventory over its source's rate
    OTHER = 1   # anything else: decoded and decided after the inventory nodes of the same read
    NODE = 2    # an inventory node: never rate-limited, answered first


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a reply goes; mac set means unicast to a client without an address at that hardware address."""

    ip: str
    port: int
    mac: bytes | None = None

    @property
    def broadcast(self) -> bool:
        """True for the limited broadcast address."""
        return self.ip == BROADCAST_IP


@dataclass(frozen=True, slots=True)
class Reply:
    """An encoded reply and its destination."""

    data: bytes
    dest: Destination
    message_type: int


@dataclass(slots=True)
class Decision:
    """What to do about one request: a reply or None, the node record to emit (at most one), and why a
    request was ignored (empty when no reply is the normal answer, as for DECLINE and RELEASE)."""

    reply: Reply | None = None
    event: NodeEvent | None = None
    ignored: str = ""


@dataclass(frozen=True, slots=True)
class Segment:
    """A network the server hands addresses on: the server's own, or one behind a relay (RFC 2131 4.3.1), with the
    encoded options that differ between networks (mask, broadcast address, router)."""

    network: ipaddress.IPv4Network
    first: int                 # the network's address as an int
    last: int                  # its broadcast address as an int
    own: bool                  # the server's own network (the dynamic pool lives here)
    lease_opts: bytes          # server id, lease times, network options: what every OFFER and ACK carries
    inform_opts: bytes         # the same without lease times (RFC 2131 4.3.5)

    def holds(self, packed: bytes) -> bool:
        """Whether a packed IPv4 address lies in this network."""
        return self.first <= int.from_bytes(packed, "big") <= self.last


@dataclass(frozen=True, slots=True)
class BootAnswer:
    """The boot part of a reply: header 'file' and 'siaddr', encoded options, and what it is (ipxe, http, or the NBP role)."""

    file: bytes
    siaddr: bytes
    options: bytes
    kind: str


class DhcpPolicy:
    """Decides replies for authoritative and proxy mode from one validated config and the lease table."""

    def __init__(self, settings: DhcpSettings, reservations: Mapping[str, Reservation], leases: LeaseTable) -> None:
        self.mode = settings.mode
        self.leases = leases
        self.lease_time = settings.lease_time
        self.server_port = settings.port
        self.client_port = settings.client_port
        self.broadcast_replies = settings.broadcast_replies
        self.discovery = settings.discovery
        self.network = settings.address.network
        self.sid = settings.server_ip.packed
        self.http_base = settings.boot.http_base
        self.boot = settings.boot
        self.set_reservations(reservations)
        self._broadcast_dest = Destination(BROADCAST_IP, settings.client_port)
        self._exchanges: dict[str, tuple[int, str]] = {}  # mac -> (xid, client kind) of its last exchange
        self.max_exchanges = MAX_TRACKED_EXCHANGES
        sid_tlv = o.tlv(o.SERVER_ID, self.sid)
        self._sid_tlv = sid_tlv
        self._own = self._segment(settings, RelayedSubnet(self.network, settings.router), own=True)
        # RFC 2131 4.3.1: a relayed request gets an address on the network of its giaddr; few networks, scanned in turn.
        self._relayed = tuple(self._segment(settings, subnet, own=False) for subnet in settings.relayed_subnets)
        self._tftp_server_tlv = o.text_option(o.TFTP_SERVER_NAME, str(settings.server_ip))
        self._no_pxedhcp_tlv = o.tlv(o.IPXE_ENCAP, o.tlv(o.IPXE_NO_PXEDHCP, b"\x01"))
        self._boot_cache: dict[tuple[str, str, bool], BootAnswer | None] = {}
        self._ipxe_cache: dict[tuple[str, bool], BootAnswer] = {}  # inventory MACs only: bounded
        self._quiet_until = 0.0
        self._decline_quiet_until = 0.0
        # Rate limiting of MACs outside the inventory, per relay circuit (option 82), relay or ingress port, decided before the decode.
        self.limiter = SourceLimiter(settings.unknown_rate) if settings.unknown_rate is not None else None
        self._ingress = {VIA_DHCP: f"{settings.interface} port {settings.port}",
                         VIA_PXE: f"{settings.interface} port {settings.proxy_port}"}
        self._rate_quiet_until = 0.0
        self._rate_window_start: float | None = None

    # ------------------------------------------------------------------ admission (before the decode)

    def admit(self, data: bytes, via: str, now: float) -> Admission:
        """DROP when a datagram from a MAC outside the inventory exceeds its source's rate (drop it undecoded);
        NODE for an inventory node's, to be answered first; OTHER for the rest.

        The source is the relay's circuit (giaddr with option 82's agent circuit and remote IDs, RFC 3046 3.1-3.2:
        the switch port the relay heard the client on), the relay alone (giaddr, RFC 2131 4.1 / RFC 3046 2: one
        relay interface is one client segment) when it sends no option 82, or, for a client on our own segment,
        the ingress port. Inventory MACs are always admitted, and spend no token.
        """
        peeked = peek_source(data)
        if peeked is None:
            return Admission.OTHER  # too short to be DHCP: the decoder drops it as malformed
        chaddr, giaddr = peeked
        if chaddr in self._node_chaddrs:
            return Admission.NODE
        limiter = self.limiter
        if limiter is None:
            return Admission.OTHER
        if giaddr == ZERO_IP:
            # Option 82 from our own segment is the client's own word (RFC 3046 2.1: only a relay agent adds it,
            # and 5: a server trusts it from relays only): not a source of its own, the ingress is.
            admitted = limiter.admit(via, now)
        else:
            info = peek_relay_agent_info(data)
            circuit = o.agent_circuit(info) if info is not None else None
            admitted = (limiter.admit(giaddr, now) if circuit is None
                        else limiter.admit((giaddr, *circuit), now, group=giaddr))
        if admitted:
            return Admission.OTHER
        if now >= self._rate_quiet_until:  # one line a minute at most, never one per packet
            self._rate_quiet_until = now + QUIET_S
            report = limiter.take_report()
            worst = sorted(report.items(), key=lambda kv: -kv[1])[:3]
            where = ", ".join(f"{self._source_name(k)}: {n}" for k, n in worst) + (", ..." if len(report) > 3 else "")
            rule = (f"rate limit of MACs outside the inventory ({limiter.limit.rate:g}/s, burst {limiter.limit.burst} "
                    "per relay circuit, relay or port)")
            if self._rate_window_start is None:
                log.warning("dhcp: %s exceeded by %s: dropping the excess (counted as rate_limited; "
                            "one line a minute at most)", rule, where.rsplit(":", 1)[0])
            else:
                log.warning("dhcp: %s: %d requests dropped in the last %.0f s (%s)", rule, sum(report.values()),
                            now - self._rate_window_start, where)
            self._rate_window_start = now
        return Admission.DROP

    def set_reservations(self, reservations: Mapping[str, Reservation]) -> None:
        """Serve another inventory's reservations from now on (a reload); leases and exchanges are kept."""
        self._nodes = reservations
        self._node_ip = {mac: r.ip.packed for mac, r in reservations.items()}
        self._hostname_tlv = {mac: o.text_option(o.HOST_NAME, r.hostname) if r.hostname else b""
                              for mac, r in reservations.items()}
        self._node_chaddrs = frozenset(bytes.fromhex(mac.replace(":", "")) for mac in reservations)

    @property
    def node_chaddrs(self) -> frozenset[bytes]:
        """The inventory nodes' hardware addresses (6 octets each), never rate-limited."""
        return self._node_chaddrs

    def _source_name(self, key: object) -> str:
        """A rate-limited source for a log line: 'relay 10.1.2.3', with 'circuit-id ... remote-id ...' when keyed by
        option 82, or the ingress interface and port."""
        if isinstance(key, bytes):
            return f"relay {_ntoa(key)}"
        if isinstance(key, tuple):
            giaddr, circuit, remote = key
            ids = (("circuit-id", circuit), ("remote-id", remote))
            return " ".join([f"relay {_ntoa(giaddr)}"] + [f"{name} {_printable(v)}" for name, v in ids if v is not None])
        return self._ingress.get(str(key), str(key))

    # ------------------------------------------------------------------ entry point

    def handle(self, req: DhcpPacket, now: float, via: str = VIA_DHCP,
               source: tuple[str, int] | None = None) -> Decision:
        """Decide the reply to one decoded request received at `now` (epoch seconds)."""
        decision = self._decide(req, now, via, source)
        if decision.reply is not None and len(decision.reply.data) > max_reply_size(req):
            # RFC 2131 2: a client need only accept a 576-octet IP datagram (a 548-octet DHCP message) unless
            # it sent a larger maximum DHCP message size (option 57, RFC 2132 9.10). What we must echo unaltered
            # (client identifier, RFC 6842 3; relay agent information, RFC 3046 2.2; the PXE UUID) can push a reply
            # past that: send none rather than one the client or relay cannot take.
            return Decision(None, decision.event, "reply larger than the client's maximum DHCP message size")
        return decision

    def _decide(self, req: DhcpPacket, now: float, via: str, source: tuple[str, int] | None) -> Decision:
        """The decision for one request, before the size check of handle()."""
        if req.op != BOOTREQUEST:
            return Decision(ignored="not a BOOTREQUEST")
        mt = req.message_type
        if mt is None:
            return Decision(ignored="plain BOOTP (no message type)")
        if req.htype != 1 or req.hlen != 6:
            return Decision(ignored="not an Ethernet client")
        if self.mode == "proxy":
            return self._proxy(req, mt, via, source)
        if via != VIA_DHCP:
            return Decision(ignored="PXE port request in authoritative mode")
        segment = self._segment_for(req)
        if segment is None:
            return Decision(ignored=f"relayed from {_ntoa(req.giaddr)}, on no network in dhcp.relayed_subnets")
        mac = req.mac
        if mac in self._nodes:
            return self._reserved(req, mt, mac, now, segment)
        return self._pooled(req, mt, mac, now, segment)

    # ------------------------------------------------------------------ authoritative: inventory nodes

    def _reserved(self, req: DhcpPacket, mt: int, mac: str, now: float, segment: Segment) -> Decision:
        """Answer a node of the inventory with its reservation (RFC 2131 4.3)."""
        ip = self._node_ip[mac]
        extra = self._hostname_tlv[mac]
        if not segment.holds(ip):
            # The node's request came from another network than its reservation's (moved to another rack, a
            # wrong relay): RFC 2131 4.3.1 gives addresses on the client's network only; 4.3.2 NAKs a REQUEST there.
            if mt == o.REQUEST:
                return Decision(self._nak(req, f"reserved address {_ntoa(ip)} is not on this network"), self._seen(req, mac))
            return Decision(None, self._seen(req, mac) if mt == o.DISCOVER else None,
                            f"reserved address {_ntoa(ip)} is not on the request's network {segment.network}")
        if mt == o.DISCOVER:
            boot = self._boot_for(req, mac, proxy=False)
            return Decision(self._lease_reply(req, o.OFFER, ip, extra, boot, segment), self._seen(req, mac))
        if mt == o.REQUEST:
            event = self._seen(req, mac)
            sid = req.option_ip(o.SERVER_ID)
            if sid is not None and sid != self.sid:
                return Decision(None, event, "client chose another server")
            wanted = req.option_ip(o.REQUESTED_IP) or (req.ciaddr if req.ciaddr != ZERO_IP else None)
            if wanted is None:
                return Decision(None, event, "REQUEST without an address")
            if wanted != ip:
                return Decision(self._nak(req, f"address reserved for this client is {_ntoa(ip)}"), event)
            boot = self._boot_for(req, mac, proxy=False)
            return Decision(self._lease_reply(req, o.ACK, ip, extra, boot, segment), event)
        if mt == o.INFORM:
            return self._inform(req, extra, segment)
        if mt == o.DECLINE:
            wanted = req.option_ip(o.REQUESTED_IP) or ip
            if now >= self._decline_quiet_until:  # one line a minute at most
                self._decline_quiet_until = now + QUIET_S
                log.warning("dhcp: %s declined its reserved address %s: another host uses it", mac, _ntoa(wanted),
                            extra=fields(mac=mac))
            return Decision()
        if mt == o.RELEASE:
            return Decision()
        return Decision(ignored=f"message type {mt}")

    # ------------------------------------------------------------------ authoritative: the dynamic pool

    def _pooled(self, req: DhcpPacket, mt: int, mac: str, now: float, segment: Segment) -> Decision:
        """Answer a MAC outside the inventory from the dynamic pool (if any)."""
        leases = self.leases
        if not leases.has_pool:
            return Decision(ignored="unknown MAC and no pool")
        if not segment.own:
            return Decision(ignored=f"unknown MAC on {segment.network}: the pool is on the server's own network only")
        if mt == o.DISCOVER:
            event = self._seen(req, mac)
            requested = req.option_ip(o.REQUESTED_IP)
            value = leases.offer(mac, ip_to_int(requested) if requested else None, now)
            if value is None:
                if now >= self._quiet_until:  # one warning per minute, not one per DISCOVER
                    self._quiet_until = now + QUIET_S
                    log.warning("dhcp: pool %s-%s exhausted: %d leases, %d offers pending; no address for %s "
                                "(and maybe others for a minute)", _ntoa(int_to_ip(leases.first)),
                                _ntoa(int_to_ip(leases.last)), len(leases), leases.offers_pending, mac)
                return Decision(None, event, POOL_EXHAUSTED)
            ip = int_to_ip(value)
            boot = self._boot_for(req, mac, proxy=False) if self.discovery else None
            return Decision(self._lease_reply(req, o.OFFER, ip, b"", boot, segment), event)
        if mt == o.REQUEST:
            event = self._seen(req, mac)
            sid = req.option_ip(o.SERVER_ID)
            if sid is not None and sid != self.sid:
                leases.forget_offer(mac)
                return Decision(None, event, "client chose another server")
            wanted = req.option_ip(o.REQUESTED_IP) or (req.ciaddr if req.ciaddr != ZERO_IP else None)
            if wanted is None:
                return Decision(None, event, "REQUEST without an address")
            value = ip_to_int(wanted)
            known = leases.lease_for(mac) is not None
            if leases.bind(mac, value, now, self.lease_time):
                boot = self._boot_for(req, mac, proxy=False) if self.discovery else None
                return Decision(self._lease_reply(req, o.ACK, wanted, b"", boot, segment), event)
            # RFC 2131 4.3.2: NAK what we are authoritative for (our offer, a client we know, our pool,
            # an address from another network); stay silent about other addresses of clients we do not know.
            ours = (sid is not None or known or leases.first <= value <= leases.last
                    or (req.giaddr == ZERO_IP and ipaddress.IPv4Address(value) not in self.network))
            if not ours:
                return Decision(None, event, "REQUEST for an address outside the pool from an unknown client")
            return Decision(self._nak(req, "requested address not available"), event)
        if mt == o.INFORM:
            return self._inform(req, b"", segment)
        if mt == o.DECLINE:
            wanted = req.option_ip(o.REQUESTED_IP)
            sid = req.option_ip(o.SERVER_ID)
            if wanted is None or (sid is not None and sid != self.sid):
                return Decision(ignored="DECLINE not for us")
            if not leases.decline(mac, ip_to_int(wanted), now):
                return Decision(ignored="DECLINE of an address this client does not hold")
            if now >= self._decline_quiet_until:  # one line a minute at most: DECLINEs must not fill the log
                self._decline_quiet_until = now + QUIET_S
                log.warning("dhcp: %s declined %s: another host uses it; held back for a while", mac, _ntoa(wanted),
                            extra=fields(mac=mac))
            return Decision()
        if mt == o.RELEASE:
            sid = req.option_ip(o.SERVER_ID)
            if sid is not None and sid != self.sid:
                return Decision(ignored="RELEASE not for us")
            leases.release(mac, ip_to_int(req.ciaddr), now)
            return Decision()
        return Decision(ignored=f"message type {mt}")

    # ------------------------------------------------------------------ proxy mode (PXE 2.1 ProxyDHCP)

    def _proxy(self, req: DhcpPacket, mt: int, via: str, source: tuple[str, int] | None) -> Decision:
        """Answer PXE clients only, without addresses: an OFFER on port 67, an ACK on port 4011."""
        mac = req.mac
        if mac not in self._nodes and not self.discovery:
            return Decision(ignored="unknown MAC")
        vc = req.vendor_class
        if not (vc.startswith(b"PXEClient") or vc.startswith(b"HTTPClient")):
            return Decision(ignored="not a PXE client")
        if via == VIA_DHCP and mt == o.DISCOVER:
            reply_type = o.OFFER
        elif via == VIA_PXE and mt in (o.REQUEST, o.INFORM):
            reply_type = o.ACK
        else:
            return Decision(ignored=f"proxy mode ignores message type {mt} on the {via} port")
        event = self._seen(req, mac)
        boot = self._boot_for(req, mac, proxy=True)
        if boot is None:
            return Decision(None, event, "no boot file for this client")
        boot_opts = boot.options
        if via == VIA_PXE and boot.kind != "http":
            # PXE 2.1 2.2.4: the boot server echoes the requested boot item (sub-option 71).
            item = o.parse_suboptions(req.options.get(o.VENDOR_SPECIFIC, b"")).get(o.PXE_BOOT_ITEM)
            if item is not None and len(item) == 4:
                boot_opts = boot_opts.replace(_PXE_VENDOR_TLV, _pxe_vendor_tlv(item))
        opts = _MT[reply_type] + self._sid_tlv + boot_opts + self._echoed(req)
        data = encode_reply(BOOTREPLY, req.htype, req.hlen, req.xid, req.flags, req.ciaddr, ZERO_IP, boot.siaddr,
                            req.giaddr, req.chaddr, b"", boot.file, opts)
        if via == VIA_PXE and source is not None:
            dest = Destination(source[0], source[1])  # PXE 2.1: the boot server answers the request's source
        elif req.giaddr != ZERO_IP:
            dest = Destination(_ntoa(req.giaddr), self.server_port)
        elif req.ciaddr != ZERO_IP:
            dest = Destination(_ntoa(req.ciaddr), self.client_port)
        else:
            dest = self._broadcast_dest  # no yiaddr in a proxy offer: broadcast it
        return Decision(Reply(data, dest, reply_type), event)

    # ------------------------------------------------------------------ networks

    def _segment(self, settings: DhcpSettings, subnet: RelayedSubnet, own: bool) -> Segment:
        """Encode the options of one network once (RFC 2132 3.3 mask, 3.5 router, 5.3 broadcast address)."""
        net = subnet.network
        network_tlvs = (
            o.tlv(o.SUBNET_MASK, net.netmask.packed)
            + o.tlv(o.BROADCAST_ADDRESS, net.broadcast_address.packed)
            + (o.tlv(o.ROUTER, subnet.router.packed) if subnet.router else b"")
            + o.ip_option(o.DNS_SERVERS, [a.packed for a in (settings.dns_servers or (settings.server_ip,))])
            + (o.text_option(o.DOMAIN_NAME, settings.domain) if settings.domain else b"")
        )
        # RFC 2131 4.3.1 / RFC 2132 9.11: T1 = 0.5 * lease, T2 = 0.875 * lease.
        lease_tlvs = (o.u32_option(o.LEASE_TIME, settings.lease_time)
                      + o.u32_option(o.RENEWAL_TIME, settings.lease_time // 2)
                      + o.u32_option(o.REBINDING_TIME, settings.lease_time * 7 // 8))
        return Segment(net, int(net.network_address), int(net.broadcast_address), own,
                       self._sid_tlv + lease_tlvs + network_tlvs, self._sid_tlv + network_tlvs)

    def _segment_for(self, req: DhcpPacket) -> Segment | None:
        """RFC 2131 4.3.1: the network of giaddr for a relayed request, else the server's own; None when the relay
        sits on a network the server is not told about."""
        if req.giaddr == ZERO_IP or self._own.holds(req.giaddr):
            return self._own  # on our segment, or a relay on it (perfdhcp always acts as one)
        for segment in self._relayed:
            if segment.holds(req.giaddr):
                return segment
        return None

    # ------------------------------------------------------------------ node progress

    @property
    def exchanges_tracked(self) -> int:
        """How many MACs' last exchange is remembered (at most MAX_TRACKED_EXCHANGES)."""
        return len(self._exchanges)

    def _seen(self, req: DhcpPacket, mac: str) -> NodeEvent | None:
        """The node record of a request: one per exchange (transaction id) of a MAC, classified once here."""
        event = classify_client(req, mac)
        last = self._exchanges.pop(mac, None)
        if len(self._exchanges) >= self.max_exchanges:
            del self._exchanges[next(iter(self._exchanges))]
        key = (req.xid, event.firmware if isinstance(event, DhcpFromFirmware) else event.kind)
        self._exchanges[mac] = key
        if last == key:
            return None  # the same exchange goes on (REQUEST after DISCOVER, a retransmission)
        return event

    # ------------------------------------------------------------------ boot file selection

    def _boot_for(self, req: DhcpPacket, mac: str, proxy: bool) -> BootAnswer | None:
        """Pick the boot answer for a client: iPXE script, UEFI HTTP URL, TFTP NBP by arch, or None."""
        if req.is_ipxe:
            answer = self._ipxe_cache.get((mac, proxy))
            if answer is None:
                url = self.http_base + ipxe.script_path(mac)
                extra = _PXECLIENT_TLV if proxy else self._no_pxedhcp_tlv  # iPXE takes a proxy offer only with 60
                opts = o.text_option(o.BOOTFILE_NAME, url) + extra
                answer = BootAnswer(_file_field(url), self.sid, opts, "ipxe")
                if mac in self._nodes:
                    self._ipxe_cache[(mac, proxy)] = answer
            return answer
        vc = req.vendor_class
        if vc.startswith(b"HTTPClient"):
            key = ("http", _arch_key(req.client_arch, vc, _HTTP_ARCHES, o.ARCH_HTTP_X64), proxy)
        elif vc.startswith(b"PXEClient"):
            key = ("tftp", _arch_key(req.client_arch, vc, _TFTP_ARCHES, o.ARCH_BIOS), proxy)
        else:
            return None  # not a network-boot client (an installed OS, a deploy environment)
        if key not in self._boot_cache:
            self._boot_cache[key] = self._make_boot(*key)
        return self._boot_cache[key]

    def _make_boot(self, transport: str, role: str, proxy: bool) -> BootAnswer | None:
        """Build the (cacheable) answer for one transport and NBP role."""
        nbp = {"bios": self.boot.bios_nbp, "uefi": self.boot.uefi_nbp, "arm64": self.boot.arm64_nbp}.get(role)
        if not nbp:
            return None
        if transport == "http":
            # UEFI HTTP boot (UEFI 2.5+ 24.7): the offer must carry vendor class HTTPClient and a URL.
            url = self.http_base + ipxe.nbp_path(nbp)
            opts = o.text_option(o.VENDOR_CLASS, "HTTPClient") + o.text_option(o.BOOTFILE_NAME, url)
            return BootAnswer(_file_field(url), self.sid, opts, "http")
        # PXE 2.1: vendor class PXEClient and option 43 with discovery control 8 (boot the file in this offer,
        # no boot server discovery); next-server in siaddr and option 66, the file in 'file' and option 67.
        opts = _PXECLIENT_TLV + _PXE_VENDOR_TLV + self._tftp_server_tlv + o.text_option(o.BOOTFILE_NAME, nbp)
        return BootAnswer(_file_field(nbp), self.sid, opts, role)

    # ------------------------------------------------------------------ reply construction

    def _echoed(self, req: DhcpPacket) -> bytes:
        """Options echoed from the request: UUID (PXE), client id (RFC 6842), relay info last (RFC 3046 2.2)."""
        opts = req.options
        if o.CLIENT_UUID not in opts and o.CLIENT_ID not in opts and o.RELAY_AGENT_INFO not in opts:
            return b""
        out = b""
        for code in (o.CLIENT_UUID, o.CLIENT_ID, o.RELAY_AGENT_INFO):
            value = opts.get(code)
            if value is not None:
                out += o.tlv(code, value)
        return out

    def _lease_reply(self, req: DhcpPacket, mt: int, ip: bytes, extra: bytes, boot: BootAnswer | None,
                     segment: Segment) -> Reply:
        """Encode an OFFER or ACK of `ip` with the lease options of its network, host name and boot answer."""
        opts = _MT[mt] + segment.lease_opts + extra
        if boot is not None:
            opts += boot.options
            siaddr, file = boot.siaddr, boot.file
        else:
            siaddr, file = ZERO_IP, b""
        opts += self._echoed(req)
        # RFC 2131 table 3: ciaddr is 0 in an OFFER and the request's ciaddr in an ACK.
        ciaddr = req.ciaddr if mt == o.ACK else ZERO_IP
        data = encode_reply(BOOTREPLY, req.htype, req.hlen, req.xid, req.flags, ciaddr, ip, siaddr, req.giaddr,
                            req.chaddr, b"", file, opts)
        return Reply(data, self._destination(req, ip), mt)

    def _inform(self, req: DhcpPacket, extra: bytes, segment: Segment) -> Decision:
        """RFC 2131 4.3.5: an ACK with configuration but no lease and no yiaddr, sent to ciaddr."""
        opts = _MT[o.ACK] + segment.inform_opts + extra + self._echoed(req)
        data = encode_reply(BOOTREPLY, req.htype, req.hlen, req.xid, req.flags, req.ciaddr, ZERO_IP, ZERO_IP,
                            req.giaddr, req.chaddr, b"", b"", opts)
        return Decision(Reply(data, self._destination(req, ZERO_IP), o.ACK))

    def _nak(self, req: DhcpPacket, message: str) -> Reply:
        """Encode a NAK (RFC 2131 table 3: only type, server id and a message; no addresses)."""
        opts = _MT[o.NAK] + self._sid_tlv + o.text_option(o.MESSAGE, message) + self._echoed(req)
        flags = req.flags
        if req.giaddr != ZERO_IP:
            flags |= BROADCAST_FLAG  # RFC 2131 4.3.2: a relayed NAK asks the relay to broadcast it
            dest = Destination(_ntoa(req.giaddr), self.server_port)
        else:
            dest = self._broadcast_dest  # RFC 2131 4.1: with giaddr 0 a NAK is always broadcast
        data = encode_reply(BOOTREPLY, req.htype, req.hlen, req.xid, flags, ZERO_IP, ZERO_IP, ZERO_IP, req.giaddr,
                            req.chaddr, b"", b"", opts)
        return Reply(data, dest, o.NAK)

    def _destination(self, req: DhcpPacket, yiaddr: bytes) -> Destination:
        """RFC 2131 4.1: giaddr -> relay port 67; ciaddr -> unicast; broadcast flag -> broadcast; else chaddr."""
        if req.giaddr != ZERO_IP:
            return Destination(_ntoa(req.giaddr), self.server_port)
        if req.ciaddr != ZERO_IP:
            return Destination(_ntoa(req.ciaddr), self.client_port)
        if req.flags & BROADCAST_FLAG or self.broadcast_replies or yiaddr == ZERO_IP:
            return self._broadcast_dest
        return Destination(_ntoa(yiaddr), self.client_port, req.chaddr[:6])


# PXE 2.1 table 2-1: vendor class "PXEClient" in replies marks a PXE-aware server.
_PXECLIENT_TLV = o.text_option(o.VENDOR_CLASS, "PXEClient")


def _pxe_vendor_tlv(boot_item: bytes | None = None) -> bytes:
    """Option 43 for PXE clients: discovery control 8 = boot the file of this offer, no discovery (PXE 2.1 2.4.2)."""
    inner = bytes((o.PXE_DISCOVERY_CONTROL, 1, 8))
    if boot_item is not None:
        inner += bytes((o.PXE_BOOT_ITEM, 4)) + boot_item
    return o.tlv(o.VENDOR_SPECIFIC, inner + bytes((o.END,)))


_PXE_VENDOR_TLV = _pxe_vendor_tlv()


def _arch_key(arch: int | None, vendor_class: bytes, table: dict[int, str], default: int) -> str:
    """Map option 93, or the Arch field of the vendor class ('PXEClient:Arch:00007:...'), to an NBP role."""
    if arch is None:
        parts = vendor_class.split(b":")
        arch = int(parts[2]) if len(parts) > 2 and parts[1] == b"Arch" and parts[2].isdigit() else default
    return table.get(arch, "none")


def _file_field(name: str) -> bytes:
    """The BOOTP 'file' field holds at most 127 bytes plus NUL; longer names go in option 67 only."""
    raw = name.encode("ascii", "replace")
    return raw if len(raw) < 128 else b""


MIN_IP_DATAGRAM = 576  # RFC 2131 2 / RFC 1122 3.3.3: the IP datagram size every host accepts
_IP_UDP_HEADERS = 28   # IPv4 header without options (20) + UDP header (8)


def max_reply_size(req: DhcpPacket) -> int:
    """The largest DHCP message (UDP payload) the client accepts: 548 octets, or option 57 minus IP and UDP headers.

    RFC 2132 9.10: option 57 is at least 576 octets; like ISC dhcpd, it is read as the IP datagram size.
    """
    mms = req.options.get(o.MAX_MESSAGE_SIZE)
    size = int.from_bytes(mms, "big") if mms is not None and len(mms) == 2 else 0
    return max(MIN_IP_DATAGRAM, size) - _IP_UDP_HEADERS


def _ntoa(packed: bytes) -> str:
    return socket.inet_ntoa(packed)


def _printable(value: bytes, limit: int = 32) -> str:
    """A relay's sub-option for a log line: quoted when printable ASCII, else hex; at most `limit` octets shown."""
    shown, more = value[:limit], "..." if len(value) > limit else ""
    if shown and all(0x20 <= c < 0x7f for c in shown):
        return repr(shown.decode("ascii") + more)
    return "0x" + shown.hex() + more


def classify_client(req: DhcpPacket, mac: str) -> DhcpFromFirmware | DhcpFromOs:
    """Tell firmware (PXE, UEFI HTTP, iPXE) from a booted system's own DHCP client, by options 60, 77 and 93."""
    arch = req.client_arch
    if req.is_ipxe:
        return DhcpFromFirmware(mac, FirmwareKind.IPXE, arch)
    vc = req.vendor_class
    if vc.startswith(b"HTTPClient"):
        return DhcpFromFirmware(mac, FirmwareKind.UEFI_HTTP, arch)
    if vc.startswith(b"PXEClient") or arch is not None:
        # RFC 4578 2.1: option 93 is sent by PXE clients only; without it the vendor class carries the arch.
        if arch is None:
            parts = vc.split(b":")
            arch = int(parts[2]) if len(parts) > 2 and parts[1] == b"Arch" and parts[2].isdigit() else None
        return DhcpFromFirmware(mac, _PXE_FIRMWARE.get(arch, FirmwareKind.PXE) if arch is not None else FirmwareKind.PXE, arch)
    return DhcpFromOs(mac, vc.decode("latin-1"))
