"""Helpers shared by several test files: DHCP requests built by scapy, small per-service settings, a root file system, TFTP peers."""
from __future__ import annotations

import asyncio
import gzip
import io
import ipaddress
import socket
import tarfile
from dataclasses import dataclass, field
from typing import Any

from scapy.layers.dhcp import BOOTP, DHCP

from netboot.dhcp4.settings import BootPrograms, DhcpSettings, Reservation
from netboot.tftp.codec import decode
from netboot.tftp.server import TftpService

NODE1_MAC, NODE1_IP = "52:54:00:77:00:01", "10.77.0.11"
NODE2_MAC, NODE2_IP = "52:54:00:77:00:02", "10.77.0.12"
STRANGER = "02:00:00:00:00:99"
UUID = b"\x00" + bytes(range(16))
NOW = 1_700_000_000.0
BIOS_VC = b"PXEClient:Arch:00000:UNDI:002001"
UEFI_VC = b"PXEClient:Arch:00007:UNDI:003000"
TWO_NODES = (("node-1", NODE1_MAC, NODE1_IP), ("node-2", NODE2_MAC, NODE2_IP))


@dataclass(frozen=True)
class DhcpSetup:
    """What a DHCP policy or service is built from: its settings and the reservations (no appliance config)."""

    settings: DhcpSettings
    reservations: dict[str, Reservation] = field(default_factory=dict)


def make_dhcp(address: str = "10.77.0.1/24", interface: str = "rb0",
              nodes: tuple[tuple[str, str, str], ...] = TWO_NODES, boot: BootPrograms | None = None,
              **dhcp: Any) -> DhcpSetup:
    """DHCP settings for a server at address on interface, with reservations for nodes (name, MAC, IP)."""
    iface = ipaddress.IPv4Interface(address)
    settings = DhcpSettings(interface=interface, address=iface, domain="cluster.test",
                            boot=boot or BootPrograms(http_base=f"http://{iface.ip}:8080"), **dhcp)
    return DhcpSetup(settings, {m: Reservation(ipaddress.IPv4Address(i), n) for n, m, i in nodes})


def pool(first: str, last: str) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """A dynamic pool range."""
    return (ipaddress.IPv4Address(first), ipaddress.IPv4Address(last))


def request_bytes(mac: str, message: str, *, xid: int = 0x1234, flags: int = 0, ciaddr: str = "0.0.0.0",
                  giaddr: str = "0.0.0.0", options: list[Any] | None = None) -> bytes:
    """A client request built by scapy (the independent builder)."""
    chaddr = bytes.fromhex(mac.replace(":", "")) + bytes(10)
    opts = [("message-type", message), *(options or []), "end"]
    return bytes(BOOTP(op=1, chaddr=chaddr, xid=xid, flags=flags, ciaddr=ciaddr, giaddr=giaddr) / DHCP(options=opts))


def pxe_options(arch: int, vendor_class: bytes, *more: Any) -> list[Any]:
    """Options 93, 60 and 97 as a PXE ROM sends them."""
    return [("pxe_client_architecture", arch.to_bytes(2, "big")), ("vendor_class_id", vendor_class),
            ("pxe_client_machine_identifier", UUID), *more]


def opts_of(data: bytes) -> dict[str, Any]:
    """Options of an encoded reply as scapy decodes them (name -> value)."""
    return {x[0]: (x[1] if len(x) == 2 else x[1:]) for x in BOOTP(data)[DHCP].options if isinstance(x, tuple)}


def rootfs_tar_gz() -> bytes:
    """A tiny root file system (kernel, initrd, os-release) as a gzip'd tar."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("boot/vmlinuz", b"\x7fkernel" * 1000), ("boot/initrd.img", b"initrd" * 1000), ("etc/os-release", b"ID=test\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue())


class RawPeer:
    """A bare UDP socket on loopback for hand-made exchanges."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)

    async def send(self, data: bytes, addr: tuple[str, int]) -> None:
        await asyncio.get_running_loop().sock_sendto(self.sock, data, addr)

    async def recv(self, timeout: float = 5.0) -> tuple[object, tuple[str, int]]:
        data, addr = await asyncio.wait_for(asyncio.get_running_loop().sock_recvfrom(self.sock, 70000), timeout)
        return decode(data), addr

    def close(self) -> None:
        self.sock.close()


async def settled(svc: TftpService) -> dict[str, int]:
    """The service's counters once no transfer is in flight (each transfer's thread reports its end to the loop)."""
    for _ in range(500):
        stats = svc.stats()
        if stats["transfers_active"] == 0:
            return stats
        await asyncio.sleep(0.01)
    raise AssertionError(f"transfers still active: {svc.stats()}")
