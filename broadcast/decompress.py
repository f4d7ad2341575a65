"""Incremental decompressors for image streams: push compressed bytes in, get bounded pieces out.

Each hands decompressed pieces of at most PIECE bytes to a consumer as they are made, so at most one piece
is held at a time: a few KiB of a sparse zstd image expand to gigabytes (RLE blocks: 4 bytes for 128 KiB of
zeros, RFC 8878 section 3.1.1.2), which collected before being consumed killed a 1 GiB deploy environment
writing a whole-disk image. `finish()` detects a stream that ended inside a frame or member (truncation).
"""
from __future__ import annotations

import lzma
import struct
import zlib
from typing import Callable, Protocol

import zstandard

from broadcast.errors import ImageError

COMPRESSIONS = ("gzip", "zstd", "xz", "none")
PIECE = 1 << 20  # largest decompressed piece handed to the writer at once


Emit = Callable[[bytes], None]  # takes one decompressed piece (hashes it, writes it) before the next is made


class Decompressor(Protocol):
    """Incremental decompressor handing pieces of at most PIECE bytes to a consumer."""

    def feed(self, data: bytes, emit: Emit) -> None:
        """Decompress data, passing each output piece to emit; raise ImageError on corrupt input."""

    def finish(self) -> None:
        """Raise ImageError when the stream ended in the middle of a frame/member."""


class _Identity:
    def feed(self, data: bytes, emit: Emit) -> None:
        view = memoryview(data)
        for i in range(0, len(view), PIECE):
            emit(bytes(view[i : i + PIECE]))

    def finish(self) -> None:
        return None


class _Gzip:
    """gzip (RFC 1952), multi-member streams allowed (as pigz and `cat a.gz b.gz` produce)."""

    def __init__(self) -> None:
        self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._started = False

    def feed(self, data: bytes, emit: Emit) -> None:
        try:
            while data:
                self._started = True
                out = self._d.decompress(data, PIECE)
                if out:
                    emit(out)
                if self._d.eof:
                    data = self._d.unused_data
                    if data:
                        self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                else:
                    data = self._d.unconsumed_tail
        except zlib.error as exc:
            raise ImageError(f"corrupt gzip stream: {exc}") from exc

    def finish(self) -> None:
        if not self._started or not self._d.eof:
            raise ImageError("truncated gzip stream (end of data inside a member)")


class _Xz:
    """xz (and legacy lzma), concatenated streams allowed."""

    def __init__(self) -> None:
        self._d = lzma.LZMADecompressor()
        self._started = False

    def feed(self, data: bytes, emit: Emit) -> None:
        try:
            while True:
                if data:
                    self._started = True
                out = self._d.decompress(data, PIECE)
                data = b""
                if out:
                    emit(out)
                if self._d.eof:
                    rest = self._d.unused_data
                    # xz stream padding (multiples of 4 NUL bytes) may follow a stream
                    if rest and rest.strip(b"\0"):
                        self._d = lzma.LZMADecompressor()
                        data = rest
                        continue
                    return
                if self._d.needs_input:
                    return
        except lzma.LZMAError as exc:
            raise ImageError(f"corrupt xz stream: {exc}") from exc

    def finish(self) -> None:
        if not self._started or not self._d.eof:
            raise ImageError("truncated xz stream (end of data inside a stream)")


class _ZstdFrameTracker:
    """Walks zstd frame and block headers (RFC 8878 sections 3.1.1, 3.1.2) to know where frames end.

    python-zstandard's bounded-output writer does not say whether the last frame was complete, so this
    parses only the headers (a few per 128 KiB block) and skips block contents.
    """

    MAGIC = 0xFD2FB528
    SKIPPABLE = 0x184D2A50  # 0x184D2A50..0x184D2A5F (RFC 8878 3.1.2)

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skip = 0
        self._state = "magic"
        self._checksum = False
        self.frames = 0

    def _need(self) -> int:
        if self._state == "magic":
            return 4
        if self._state == "fhd":
            return 1
        if self._state == "skipsize":
            return 4
        if self._state == "block":
            return 3
        raise AssertionError(self._state)

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        pos = 0
        n = len(view)
        while pos < n:
            if self._skip:
                take = min(self._skip, n - pos)
                self._skip -= take
                pos += take
                if not self._skip and self._state == "after":
                    self._state = "magic"
                    self.frames += 1
                continue
            need = self._need() - len(self._buf)
            take = min(need, n - pos)
            self._buf += view[pos : pos + take]
            pos += take
            if len(self._buf) == self._need():
                self._advance(bytes(self._buf))
                self._buf.clear()

    def _advance(self, hdr: bytes) -> None:
        if self._state == "magic":
            magic = struct.unpack("<I", hdr)[0]
            if magic == self.MAGIC:
                self._state = "fhd"
            elif magic & 0xFFFFFFF0 == self.SKIPPABLE:
                self._state = "skipsize"
            else:
                raise ImageError(f"corrupt zstd stream: bad frame magic 0x{magic:08x}")
        elif self._state == "skipsize":
            self._skip = struct.unpack("<I", hdr)[0]
            self._state = "after"
            if not self._skip:
                self._state = "magic"
        elif self._state == "fhd":
            fhd = hdr[0]
            fcs_flag, single, checksum, dict_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 2) & 1, fhd & 3
            if (fhd >> 3) & 1:
                raise ImageError("corrupt zstd stream: reserved frame header bit set")
            fcs = (1 if single else 0, 2, 4, 8)[fcs_flag]
            self._skip = (0 if single else 1) + (0, 1, 2, 4)[dict_flag] + fcs
            self._checksum = bool(checksum)
            self._state = "block"
        elif self._state == "block":
            bh = hdr[0] | hdr[1] << 8 | hdr[2] << 16
            last, btype, size = bh & 1, (bh >> 1) & 3, bh >> 3
            if btype == 3:
                raise ImageError("corrupt zstd stream: reserved block type")
            self._skip = 1 if btype == 1 else size
            if last:
                self._skip += 4 if self._checksum else 0
                self._state = "after"
                if not self._skip:
                    self._state = "magic"
                    self.frames += 1

    def complete(self) -> bool:
        """True when the data ended exactly on a frame boundary after at least one frame."""
        return self._state == "magic" and not self._buf and not self._skip and self.frames > 0


class _Zstd:
    """zstd through python-zstandard's stream writer: it calls write() with each piece (at most PIECE bytes) as it
    decompresses, and write() hands it straight to the consumer; multi-frame streams allowed."""

    def __init__(self) -> None:
        self._emit: Emit | None = None
        self._tracker = _ZstdFrameTracker()
        self._w = zstandard.ZstdDecompressor().stream_writer(self, write_size=PIECE, closefd=False)

    def write(self, b: bytes) -> int:  # called by the zstandard writer with decompressed pieces
        assert self._emit is not None
        self._emit(bytes(b))
        return len(b)

    def feed(self, data: bytes, emit: Emit) -> None:
        self._tracker.feed(data)
        self._emit = emit
        try:
            self._w.write(data)
        except zstandard.ZstdError as exc:
            raise ImageError(f"corrupt zstd stream: {exc}") from exc
        finally:
            self._emit = None

    def finish(self) -> None:
        if not self._tracker.complete():
            raise ImageError("truncated zstd stream (end of data inside a frame)")


def make_decompressor(compression: str) -> Decompressor:
    """Return an incremental decompressor for gzip, zstd, xz or none."""
    if compression == "gzip":
        return _Gzip()
    if compression == "zstd":
        return _Zstd()
    if compression == "xz":
        return _Xz()
    if compression == "none":
        return _Identity()
    raise ImageError(f"unknown compression {compression!r}")
