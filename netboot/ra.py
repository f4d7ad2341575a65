"""IPv6 Router Advertisements on the appliance interface, so iPXE does not wait ~16 s for one.

The RA says nothing but "a router exists and will not route for you" (RFC 4861 4.2: router lifetime 0,
no prefix, M and O flags clear): iPXE's IPv6 autoconfiguration then ends at once and nodes do not
route through the appliance. Sent unsolicited every few seconds to ff02::1 and in answer to Router
Solicitations, from the interface's link-local address with hop limit 255 (RFC 4861 6.1.2).
"""
from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import random
import socket
import struct

from domain.errors import BindError
from netboot.link import ARPHRD_ETHER, interface_hardware

log = logging.getLogger("rackboot.ra")

ALL_NODES = "ff02::1"
ALL_ROUTERS = "ff02::2"
ICMP6_ROUTER_SOLICIT = 133
ICMP6_ROUTER_ADVERT = 134
ND_OPT_SOURCE_LINKADDR = 1
_ICMP6_FILTER = 1            # <netinet/icmp6.h>: socket option at level IPPROTO_ICMPV6
_IPV6_HOPLIMIT = 52          # cmsg type of the hop limit delivered by IPV6_RECVHOPLIMIT
_IFA_F_TENTATIVE = 0x40
_IFA_F_DADFAILED = 0x08
_SCOPE_LINK = 0x20           # scope column of /proc/net/if_inet6


def build_router_advertisement(source_mac: bytes | None) -> bytes:
    """Return an ICMPv6 RA (RFC 4861 4.2) with router lifetime 0, no prefix, M=O=0; checksum left to the kernel."""
    # type, code, checksum, cur hop limit (0: unspecified), flags, router lifetime, reachable time, retrans timer
    ra = struct.pack("!BBHBBHII", ICMP6_ROUTER_ADVERT, 0, 0, 0, 0, 0, 0, 0)
    if source_mac is not None and len(source_mac) == 6:
        ra += struct.pack("!BB6s", ND_OPT_SOURCE_LINKADDR, 1, source_mac)  # RFC 4861 4.6.1, length in 8-byte units
    return ra


def parse_if_inet6(text: str, interface: str) -> list[tuple[ipaddress.IPv6Address, int]]:
    """Return (address, flags) of the link-local addresses of an interface from /proc/net/if_inet6 text."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 6 or fields[5] != interface or int(fields[3], 16) != _SCOPE_LINK:
            continue
        out.append((ipaddress.IPv6Address(bytes.fromhex(fields[0])), int(fields[4], 16)))
    return out


class RouterAdvertiser:
    """Sends RAs on one interface; idles with a warning while the interface has no usable link-local address."""

    name = "ra"

    def __init__(self, interface: str, interval: tuple[float, float] = (3.0, 5.0)) -> None:
        self.interface = interface
        self.interval = interval
        self._sock: socket.socket | None = None
        self._addrs_fd: int | None = None
        self._ifindex = 0
        self._mac: bytes | None = None
        self._source: ipaddress.IPv6Address | None = None
        self._ra = b""
        self._warned = False
        self.counters: dict[str, int] = {"received": 0, "sent": 0, "dropped_malformed": 0, "solicitations": 0,
                                         "send_errors": 0}

    async def start(self) -> None:
        """Open a raw ICMPv6 socket bound to the interface; raise BindError when impossible."""
        iface = self.interface
        try:
            self._ifindex = socket.if_nametoindex(iface)
        except OSError:
            raise BindError(f"ra: interface {iface!r} does not exist") from None
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        except PermissionError:
            raise BindError("ra: no permission to open a raw ICMPv6 socket (run as root or grant CAP_NET_RAW)") from None
        except OSError as exc:
            if exc.errno == errno.EAFNOSUPPORT:
                log.warning("ra: IPv6 is disabled on this system: not sending router advertisements")
                return
            raise BindError(f"ra: cannot open a raw ICMPv6 socket: {exc.strerror}") from None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, self._ifindex)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
            # Let only Router Solicitations through (RFC 3542 3.2: a set bit blocks that type).
            words = [0xFFFFFFFF] * 8
            words[ICMP6_ROUTER_SOLICIT >> 5] &= ~(1 << (ICMP6_ROUTER_SOLICIT & 31)) & 0xFFFFFFFF
            sock.setsockopt(socket.IPPROTO_ICMPV6, _ICMP6_FILTER, struct.pack("=8I", *words))
        except OSError as exc:
            sock.close()
            raise BindError(f"ra: cannot set up the ICMPv6 socket on {iface}: {exc.strerror}") from None
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
                            socket.inet_pton(socket.AF_INET6, ALL_ROUTERS) + struct.pack("@i", self._ifindex))
        except OSError as exc:
            log.warning("ra: cannot join %s on %s (%s): Router Solicitations go unanswered", ALL_ROUTERS, iface, exc.strerror)
        sock.setblocking(False)
        self._sock = sock
        try:
            hwtype, mac = interface_hardware(sock, iface)
            self._mac = mac if hwtype == ARPHRD_ETHER else None
        except OSError:
            self._mac = None
        self._ra = build_router_advertisement(self._mac)
        # /proc/thread-self/net is this thread's namespace at open time: keeping the file open lets serve()
        # look up the link-local address in the interface's namespace even when it runs elsewhere.
        self._addrs_fd = os.open("/proc/thread-self/net/if_inet6", os.O_RDONLY | os.O_CLOEXEC)
        self._try_bind()

    async def serve(self) -> None:
        """Advertise every few seconds (with jitter) and answer solicitations until cancelled."""
        sock = self._sock
        if sock is None:
            await asyncio.Event().wait()
            return
        loop = asyncio.get_running_loop()
        loop.add_reader(sock.fileno(), self._on_readable)
        try:
            while True:
                if self._source is None and not self._try_bind():
                    await asyncio.sleep(1.0)
                    continue
                self._send(ALL_NODES)
                await asyncio.sleep(random.uniform(*self.interval))
        finally:
            loop.remove_reader(sock.fileno())

    async def close(self) -> None:
        """Close the socket; safe to call twice."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._addrs_fd is not None:
            os.close(self._addrs_fd)
            self._addrs_fd = None

    def stats(self) -> dict[str, int]:
        """Return the counters."""
        return dict(self.counters)

    # ------------------------------------------------------------------ internals

    def _try_bind(self) -> bool:
        """Bind the socket to the interface's link-local address once it is usable (not tentative)."""
        if self._source is not None:
            return True
        if self._sock is None or self._addrs_fd is None:
            return False
        os.lseek(self._addrs_fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(self._addrs_fd, 65536):
            chunks.append(chunk)
        found = parse_if_inet6(b"".join(chunks).decode(), self.interface)
        usable = [a for a, flags in found if not flags & (_IFA_F_TENTATIVE | _IFA_F_DADFAILED)]
        if not usable:
            if not found and not self._warned:
                log.warning("ra: %s has no IPv6 link-local address: not sending router advertisements "
                            "(iPXE will wait ~16 s for one)", self.interface)
                self._warned = True
            return False
        try:
            self._sock.bind((str(usable[0]), 0, 0, self._ifindex))
        except OSError as exc:
            log.warning("ra: cannot bind %s%%%s: %s", usable[0], self.interface, exc.strerror)
            return False
        self._source = usable[0]
        log.info("ra: advertising on %s from %s (router lifetime 0, no prefix)", self.interface, self._source)
        return True

    def _send(self, dest: str) -> None:
        assert self._sock is not None
        try:
            self._sock.sendto(self._ra, (dest, 0, 0, self._ifindex))
            self.counters["sent"] += 1
        except OSError as exc:
            self.counters["send_errors"] += 1
            log.debug("ra: send to %s failed: %s", dest, exc)

    def _on_readable(self) -> None:
        """Read pending Router Solicitations and answer each valid one (RFC 4861 6.1.1, 6.2.6)."""
        sock = self._sock
        if sock is None:
            return
        while True:
            try:
                data, ancdata, _flags, addr = sock.recvmsg(1500, socket.CMSG_SPACE(4))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("ra: receive error %s", exc)
                return
            self.counters["received"] += 1
            hoplimit = None
            for level, kind, value in ancdata:
                if level == socket.IPPROTO_IPV6 and kind == _IPV6_HOPLIMIT and len(value) >= 4:
                    hoplimit = struct.unpack("@i", value[:4])[0]
            # RFC 4861 6.1.1: hop limit 255, code 0, ICMP length 8 or more.
            if len(data) < 8 or data[0] != ICMP6_ROUTER_SOLICIT or data[1] != 0 or hoplimit not in (None, 255):
                self.counters["dropped_malformed"] += 1
                continue
            self.counters["solicitations"] += 1
            if self._source is None and not self._try_bind():
                continue
            src = addr[0].split("%")[0]
            # RFC 4861 6.2.6: answer a solicitation from an unspecified source with a multicast RA.
            self._send(ALL_NODES if src == "::" else src)
