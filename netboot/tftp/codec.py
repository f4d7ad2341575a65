"""TFTP wire codec (RFC 1350, options RFC 2347): pure functions from bytes to packets and back; no I/O."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Mapping, Union

from domain.errors import MalformedPacket

_HEADER = struct.Struct("!HH")
_OPCODE = struct.Struct("!H")


class Opcode(IntEnum):
    """TFTP opcodes (RFC 1350 sec. 5, OACK from RFC 2347)."""

    RRQ = 1
    WRQ = 2
    DATA = 3
    ACK = 4
    ERROR = 5
    OACK = 6


class ErrorCode(IntEnum):
    """TFTP error codes (RFC 1350 appendix, 8 from RFC 2347)."""

    NOT_DEFINED = 0
    FILE_NOT_FOUND = 1
    ACCESS_VIOLATION = 2
    DISK_FULL = 3
    ILLEGAL_OPERATION = 4
    UNKNOWN_TID = 5
    FILE_EXISTS = 6
    NO_SUCH_USER = 7
    OPTION_REFUSED = 8


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """RRQ: a client asks to read filename; options are lower-cased names (RFC 2347: case-insensitive)."""

    filename: str
    mode: str
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WriteRequest:
    """WRQ: a client asks to write filename (the appliance refuses these)."""

    filename: str
    mode: str
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Data:
    """DATA: one block of the file; block numbers are 16 bits on the wire."""

    block: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    """ACK of a block (block 0 acknowledges an OACK)."""

    block: int


@dataclass(frozen=True, slots=True)
class Error:
    """ERROR: ends the transfer (RFC 1350 sec. 7)."""

    code: int
    message: str


@dataclass(frozen=True, slots=True)
class OptionAck:
    """OACK: the options the server accepted (RFC 2347)."""

    options: dict[str, str] = field(default_factory=dict)


Packet = Union[ReadRequest, WriteRequest, Data, Ack, Error, OptionAck]


def _split_strings(body: bytes, what: str) -> list[str]:
    """Split NUL-terminated netascii strings; the body must end with a NUL."""
    if not body or body[-1] != 0:
        raise MalformedPacket(f"{what}: strings not NUL-terminated")
    try:
        return body[:-1].decode("utf-8").split("\0")
    except UnicodeDecodeError as exc:
        raise MalformedPacket(f"{what}: strings are not UTF-8") from exc


def _options(strings: list[str], what: str) -> dict[str, str]:
    """Pair option names and values (RFC 2347); names are case-insensitive, the first of duplicates wins."""
    # Some ROMs pad requests with extra NULs: trailing empty strings are tolerated.
    while strings and strings[-1] == "":
        strings = strings[:-1]
    if len(strings) % 2:
        raise MalformedPacket(f"{what}: option {strings[-1]!r} has no value")
    out: dict[str, str] = {}
    for i in range(0, len(strings), 2):
        name = strings[i].lower()
        if not name:
            raise MalformedPacket(f"{what}: empty option name")
        out.setdefault(name, strings[i + 1])
    return out


def decode(datagram: bytes) -> Packet:
    """Decode one TFTP datagram; raise MalformedPacket when it is not one."""
    if len(datagram) < 2:
        raise MalformedPacket("datagram shorter than an opcode")
    (op,) = _OPCODE.unpack_from(datagram)
    if op == Opcode.ACK:
        if len(datagram) < 4:
            raise MalformedPacket("ACK shorter than 4 bytes")
        return Ack(_HEADER.unpack_from(datagram)[1])
    if op == Opcode.DATA:
        if len(datagram) < 4:
            raise MalformedPacket("DATA shorter than 4 bytes")
        return Data(_HEADER.unpack_from(datagram)[1], bytes(datagram[4:]))
    if op in (Opcode.RRQ, Opcode.WRQ):
        what = "RRQ" if op == Opcode.RRQ else "WRQ"
        strings = _split_strings(bytes(datagram[2:]), what)
        if len(strings) < 2:
            raise MalformedPacket(f"{what}: no transfer mode")
        filename, mode = strings[0], strings[1].lower()
        if not mode:
            raise MalformedPacket(f"{what}: empty transfer mode")
        options = _options(strings[2:], what)
        return (ReadRequest if op == Opcode.RRQ else WriteRequest)(filename, mode, options)
    if op == Opcode.ERROR:
        if len(datagram) < 4:
            raise MalformedPacket("ERROR shorter than 4 bytes")
        code = _HEADER.unpack_from(datagram)[1]
        # The message is informational: tolerate a missing terminator and odd bytes.
        message = bytes(datagram[4:]).split(b"\0", 1)[0].decode("utf-8", "replace")
        return Error(code, message)
    if op == Opcode.OACK:
        return OptionAck(_options(_split_strings(bytes(datagram[2:]), "OACK"), "OACK"))
    raise MalformedPacket(f"unknown opcode {op}")


def _cstring(text: str) -> bytes:
    raw = text.encode("utf-8")
    if b"\0" in raw:
        raise ValueError(f"TFTP string contains NUL: {text!r}")
    return raw + b"\0"


def _encode_options(options: Mapping[str, str | int]) -> bytes:
    return b"".join(_cstring(str(k)) + _cstring(str(v)) for k, v in options.items())


def encode_data(block: int, payload: bytes | memoryview) -> bytes:
    """Encode DATA for a block number (taken modulo 2**16: block rollover to 0)."""
    return _HEADER.pack(Opcode.DATA, block & 0xFFFF) + payload


def encode_ack(block: int) -> bytes:
    """Encode ACK for a block number (modulo 2**16)."""
    return _HEADER.pack(Opcode.ACK, block & 0xFFFF)


def encode_error(code: int, message: str) -> bytes:
    """Encode ERROR with a code and a human-readable message."""
    return _HEADER.pack(Opcode.ERROR, code) + _cstring(message)


def encode_oack(options: Mapping[str, str | int]) -> bytes:
    """Encode OACK with the accepted options, in the given order."""
    return _OPCODE.pack(Opcode.OACK) + _encode_options(options)


def encode_request(filename: str, mode: str = "octet", options: Mapping[str, str | int] | None = None, *, write: bool = False) -> bytes:
    """Encode RRQ (or WRQ when write) with optional RFC 2347 options."""
    op = Opcode.WRQ if write else Opcode.RRQ
    return _OPCODE.pack(op) + _cstring(filename) + _cstring(mode) + _encode_options(options or {})


def encode(packet: Packet) -> bytes:
    """Encode any packet object."""
    if isinstance(packet, Data):
        return encode_data(packet.block, packet.payload)
    if isinstance(packet, Ack):
        return encode_ack(packet.block)
    if isinstance(packet, Error):
        return encode_error(packet.code, packet.message)
    if isinstance(packet, OptionAck):
        return encode_oack(packet.options)
    if isinstance(packet, ReadRequest):
        return encode_request(packet.filename, packet.mode, packet.options)
    if isinstance(packet, WriteRequest):
        return encode_request(packet.filename, packet.mode, packet.options, write=True)
    raise TypeError(f"not a TFTP packet: {packet!r}")
