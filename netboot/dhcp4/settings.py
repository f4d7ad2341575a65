"""The DHCP service's own settings and the narrow lookups it needs, built by the composition root."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from netboot.dhcp4.ratelimit import RateLimit

DHCP_MODES = ("authoritative", "proxy", "off")
# Requests a second per relay circuit (option 82), relay or ingress port from MACs outside the inventory, and the burst: see
# docs/configuration.md (dhcp.unknown_rate) for why it is on by default and why this high.
DEFAULT_UNKNOWN_RATE = RateLimit(rate=200.0, burst=1000)


@dataclass(frozen=True, slots=True)
class Reservation:
    """A node's fixed address and host name (option 12)."""

    ip: ipaddress.IPv4Address
    hostname: str = ""


@dataclass(frozen=True, slots=True)
class RelayedSubnet:
    """A network whose nodes reach the server through a DHCP relay (its giaddr lies in it), and its gateway."""

    network: ipaddress.IPv4Network
    router: ipaddress.IPv4Address | None = None   # option 3; usually the relay's own address on that network


@dataclass(frozen=True)
class BootPrograms:
    """What network-boot clients are pointed at: NBP file names by role, and the HTTP server iPXE scripts live on."""

    http_base: str
    bios_nbp: str = "undionly.kpxe"
    uefi_nbp: str = "snponly.efi"
    arm64_nbp: str | None = None


@dataclass(frozen=True)
class DhcpSettings:
    """Everything the DHCP policy and transport need, validated by whoever built it."""

    interface: str
    address: ipaddress.IPv4Interface           # the server's own address and the network it serves
    boot: BootPrograms
    mode: str = "authoritative"
    port: int = 67
    client_port: int = 68
    proxy_port: int = 4011
    lease_time: int = 3600
    pool: tuple[ipaddress.IPv4Address, ipaddress.IPv4Address] | None = None
    router: ipaddress.IPv4Address | None = None
    dns_servers: tuple[ipaddress.IPv4Address, ...] = ()   # empty: the server itself
    domain: str = ""
    discovery: bool = False                  # boot MACs outside the reservations too (unknown_macs: discovery)
    broadcast_replies: bool = False
    reserved: tuple[ipaddress.IPv4Address, ...] = field(default=())  # never handed out from the pool
    unknown_rate: RateLimit | None = DEFAULT_UNKNOWN_RATE  # None: MACs outside the inventory are not rate-limited
    relayed_subnets: tuple[RelayedSubnet, ...] = ()  # networks served through relays, besides the server's own

    @property
    def server_ip(self) -> ipaddress.IPv4Address:
        """The server identifier (option 54) and next-server."""
        return self.address.ip
