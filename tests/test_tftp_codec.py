"""TFTP codec: golden bytes checked against scapy's TFTP layers as an independent builder and decoder."""
from __future__ import annotations

import pytest
from scapy.layers.tftp import (
    TFTP,
    TFTP_ACK,
    TFTP_DATA,
    TFTP_ERROR,
    TFTP_OACK,
    TFTP_RRQ,
    TFTP_WRQ,
    TFTP_Option,
    TFTP_Options,
)
from scapy.packet import Raw

from domain.errors import MalformedPacket
from netboot.tftp.codec import (
    Ack,
    Data,
    Error,
    ErrorCode,
    OptionAck,
    ReadRequest,
    WriteRequest,
    decode,
    encode,
    encode_ack,
    encode_data,
    encode_error,
    encode_oack,
    encode_request,
)
from netboot.tftp.files import to_netascii


def scapy_options(**opts: str) -> TFTP_Options:
    return TFTP_Options(options=[TFTP_Option(oname=k.encode(), value=v.encode()) for k, v in opts.items()])


def test_rrq_with_options_as_ipxe_sends_it_decodes() -> None:
    wire = bytes(TFTP(op=1) / TFTP_RRQ(filename=b"undionly.kpxe", mode=b"octet") / scapy_options(blksize="1432", tsize="0"))
    assert wire == b"\x00\x01undionly.kpxe\x00octet\x00blksize\x001432\x00tsize\x000\x00"
    assert decode(wire) == ReadRequest("undionly.kpxe", "octet", {"blksize": "1432", "tsize": "0"})


def test_rrq_option_names_and_mode_are_case_insensitive() -> None:
    wire = bytes(TFTP(op=1) / TFTP_RRQ(filename=b"EFI/Boot.efi", mode=b"OCTET") / scapy_options(BlkSize="1468", WINDOWSIZE="4"))
    pkt = decode(wire)
    assert pkt == ReadRequest("EFI/Boot.efi", "octet", {"blksize": "1468", "windowsize": "4"})


def test_rrq_without_options_and_with_padding_nuls() -> None:
    assert decode(b"\x00\x01a\x00netascii\x00") == ReadRequest("a", "netascii", {})
    # Some ROMs pad their request with NULs after the last option.
    assert decode(b"\x00\x01a\x00octet\x00tsize\x000\x00\x00\x00") == ReadRequest("a", "octet", {"tsize": "0"})


def test_encode_request_matches_scapy() -> None:
    ours = encode_request("snponly.efi", "octet", {"tsize": 0, "blksize": 1468, "windowsize": 4})
    theirs = bytes(TFTP(op=1) / TFTP_RRQ(filename=b"snponly.efi", mode=b"octet") / scapy_options(tsize="0", blksize="1468", windowsize="4"))
    assert ours == theirs
    wrq = encode_request("up.bin", write=True)
    assert wrq == bytes(TFTP(op=2) / TFTP_WRQ(filename=b"up.bin", mode=b"octet"))
    assert decode(wrq) == WriteRequest("up.bin", "octet", {})


def test_data_golden_and_scapy_decodes_it() -> None:
    wire = encode_data(7, b"hello")
    assert wire == b"\x00\x03\x00\x07hello"
    parsed = TFTP(wire)
    assert parsed.op == 3 and parsed[TFTP_DATA].block == 7 and parsed[Raw].load == b"hello"
    assert decode(wire) == Data(7, b"hello")


def test_data_block_number_rolls_over_to_zero() -> None:
    assert encode_data(65536, b"") == b"\x00\x03\x00\x00"
    assert encode_data(65537, b"x")[2:4] == b"\x00\x01"
    assert TFTP(encode_data(70000, b"z"))[TFTP_DATA].block == 70000 - 65536


def test_empty_data_block_is_valid() -> None:
    assert decode(bytes(TFTP(op=3) / TFTP_DATA(block=3))) == Data(3, b"")


def test_ack_golden_both_ways() -> None:
    assert encode_ack(0) == bytes(TFTP(op=4) / TFTP_ACK(block=0)) == b"\x00\x04\x00\x00"
    assert decode(bytes(TFTP(op=4) / TFTP_ACK(block=65535))) == Ack(65535)
    assert TFTP(encode_ack(513))[TFTP_ACK].block == 513


def test_error_golden_both_ways() -> None:
    wire = encode_error(ErrorCode.UNKNOWN_TID, "unknown transfer ID")
    assert wire == bytes(TFTP(op=5) / TFTP_ERROR(errorcode=5, errormsg=b"unknown transfer ID"))
    parsed = TFTP(wire)[TFTP_ERROR]
    assert parsed.errorcode == 5 and parsed.errormsg == b"unknown transfer ID"
    # OVMF ends its tsize probe with error 8 (RFC 2347).
    assert decode(bytes(TFTP(op=5) / TFTP_ERROR(errorcode=8, errormsg=b"aborted"))) == Error(8, "aborted")


def test_error_without_terminating_nul_is_tolerated() -> None:
    assert decode(b"\x00\x05\x00\x00oops") == Error(0, "oops")


def test_oack_golden_both_ways() -> None:
    wire = encode_oack({"blksize": "1468", "tsize": "171520", "windowsize": "4"})
    assert wire == bytes(TFTP(op=6) / TFTP_OACK() / scapy_options(blksize="1468", tsize="171520", windowsize="4"))
    opts = {o.oname: o.value for o in TFTP(wire)[TFTP_Options].options}
    assert opts == {b"blksize": b"1468", b"tsize": b"171520", b"windowsize": b"4"}
    assert decode(wire) == OptionAck({"blksize": "1468", "tsize": "171520", "windowsize": "4"})


@pytest.mark.parametrize(
    "packet",
    [
        ReadRequest("pxelinux.cfg/default", "octet", {"blksize": "512"}),
        WriteRequest("x", "netascii", {}),
        Data(1, b"\x00" * 512),
        Ack(9),
        Error(1, "file not found"),
        OptionAck({"tsize": "0"}),
    ],
)
def test_roundtrip(packet: object) -> None:
    assert decode(encode(packet)) == packet  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "wire",
    [
        b"",
        b"\x00",
        b"\x00\x07abc\x00",  # unknown opcode
        b"\x00\x00",  # opcode 0
        b"\x00\x01",  # RRQ without anything
        b"\x00\x01file",  # filename not NUL-terminated
        b"\x00\x01file\x00",  # no mode
        b"\x00\x01file\x00octet",  # mode not terminated
        b"\x00\x01file\x00\x00",  # empty mode
        b"\x00\x01file\x00octet\x00blksize\x00",  # option without value
        b"\x00\x01file\x00octet\x00blksize\x001432",  # value not terminated
        b"\x00\x01file\x00octet\x00\x00512\x00",  # empty option name
        b"\x00\x01\xff\xfe\x00octet\x00",  # not UTF-8
        b"\x00\x02file",  # WRQ not terminated
        b"\x00\x03\x00",  # short DATA
        b"\x00\x04\x00",  # short ACK
        b"\x00\x05\x00",  # short ERROR
        b"\x00\x06blksize\x00",  # OACK option without value
        b"\x00\x06blksize",  # OACK not terminated
    ],
)
def test_malformed_raises(wire: bytes) -> None:
    with pytest.raises(MalformedPacket):
        decode(wire)


def test_encode_refuses_nul_in_strings() -> None:
    with pytest.raises(ValueError):
        encode_request("a\0b")


def test_netascii_conversion() -> None:
    # RFC 1350 / RFC 764: LF -> CR LF, CR -> CR NUL.
    assert to_netascii(b"a\nb\rc\r\n") == b"a\r\nb\r\0c\r\0\r\n"
