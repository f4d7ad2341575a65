"""Link-layer facts about an interface, shared by the services that send frames themselves (DHCP, RA)."""
from __future__ import annotations

import fcntl
import socket
import struct
from typing import Any

ARPHRD_ETHER = 1
_SIOCGIFHWADDR = 0x8927


def interface_hardware(sock: socket.socket, interface: str) -> tuple[int, bytes]:
    """Return (ARPHRD type, hardware address) of an interface in the socket's namespace (SIOCGIFHWADDR)."""
    ifreq: Any = fcntl.ioctl(sock.fileno(), _SIOCGIFHWADDR, struct.pack("256s", interface.encode()))
    family = struct.unpack_from("=H", ifreq, 16)[0]
    return family, bytes(ifreq[18:24])
