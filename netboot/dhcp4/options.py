"""DHCPv4 option codes, message types and option encoders (RFC 2132, RFC 3396, PXE 2.1, iPXE)."""
from __future__ import annotations

import struct
from typing import Iterable

# Message types (RFC 2132 9.6, option 53).
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)
MESSAGE_NAMES = {
    DISCOVER: "DISCOVER", OFFER: "OFFER", REQUEST: "REQUEST", DECLINE: "DECLINE",
    ACK: "ACK", NAK: "NAK", RELEASE: "RELEASE", INFORM: "INFORM",
}

# Option codes.
PAD = 0
SUBNET_MASK = 1
ROUTER = 3
DNS_SERVERS = 6
HOST_NAME = 12
DOMAIN_NAME = 15
BROADCAST_ADDRESS = 28
VENDOR_SPECIFIC = 43          # PXE 2.1: encapsulated PXE options
REQUESTED_IP = 50
LEASE_TIME = 51
OVERLOAD = 52                 # RFC 2132 9.3: options continue in file (1), sname (2) or both (3)
MESSAGE_TYPE = 53
SERVER_ID = 54
PARAMETER_REQUEST_LIST = 55
MESSAGE = 56
MAX_MESSAGE_SIZE = 57
RENEWAL_TIME = 58
REBINDING_TIME = 59
VENDOR_CLASS = 60
CLIENT_ID = 61
TFTP_SERVER_NAME = 66
BOOTFILE_NAME = 67
USER_CLASS = 77
RELAY_AGENT_INFO = 82         # RFC 3046
AGENT_CIRCUIT_ID = 1          # sub-option of 82 (RFC 3046 3.1): the circuit (switch port, VLAN) the request came in on
AGENT_REMOTE_ID = 2           # sub-option of 82 (RFC 3046 3.2): the remote host end of that circuit
CLIENT_ARCH = 93              # RFC 4578 2.1
CLIENT_NDI = 94               # RFC 4578 2.2
CLIENT_UUID = 97              # RFC 4578 2.3
IPXE_ENCAP = 175              # iPXE's encapsulated options
IPXE_NO_PXEDHCP = 176         # sub-option of 175: do not wait for a ProxyDHCP offer
END = 255

# PXE 2.1 vendor sub-options (inside option 43).
PXE_DISCOVERY_CONTROL = 6
PXE_BOOT_ITEM = 71

# RFC 4578 2.1 / IANA "Processor Architecture Types".
ARCH_BIOS = 0
ARCH_EFI_IA32 = 6
ARCH_EFI_BC = 7
ARCH_EFI_X64 = 9
ARCH_EFI_ARM64 = 11
ARCH_HTTP_IA32 = 15
ARCH_HTTP_X64 = 16
ARCH_HTTP_ARM64 = 19


def tlv(code: int, value: bytes) -> bytes:
    """Encode one option; values over 255 bytes are split into consecutive instances (RFC 3396)."""
    if len(value) <= 255:
        return bytes((code, len(value))) + value
    return b"".join(bytes((code, len(value[i:i + 255]))) + value[i:i + 255] for i in range(0, len(value), 255))


def ip_option(code: int, addresses: Iterable[bytes]) -> bytes:
    """Encode an option holding a list of IPv4 addresses (4-byte packed each)."""
    return tlv(code, b"".join(addresses))


def u32_option(code: int, value: int) -> bytes:
    """Encode an option holding one 32-bit unsigned integer."""
    return tlv(code, struct.pack("!I", value))


def text_option(code: int, text: str) -> bytes:
    """Encode an option holding ASCII text (no NUL terminator, RFC 2132 2)."""
    return tlv(code, text.encode("ascii", "replace"))


def parse_suboptions(value: bytes) -> dict[int, bytes]:
    """Parse encapsulated sub-options (option 43, 82, 175); stops quietly at a truncated entry."""
    out: dict[int, bytes] = {}
    i, n = 0, len(value)
    while i < n:
        code = value[i]
        if code == PAD:
            i += 1
            continue
        if code == END or i + 1 >= n:
            break
        end = i + 2 + value[i + 1]
        if end > n:
            break
        out[code] = value[i + 2:end]
        i = end
    return out


def agent_circuit(value: bytes) -> tuple[bytes | None, bytes | None] | None:
    """The agent circuit ID and remote ID (RFC 3046 3.1, 3.2) of an option 82 value, each None when absent;
    None when the option carries neither."""
    subs = parse_suboptions(value)
    circuit, remote = subs.get(AGENT_CIRCUIT_ID), subs.get(AGENT_REMOTE_ID)
    return None if circuit is None and remote is None else (circuit, remote)
