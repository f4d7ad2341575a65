"""Streaming image sinks: decompress chunks while they arrive, write raw or extract tar, hash both sides.

An `ImageSink` is fed the image exactly as the environment catalog publishes it (compressed), chunk by
chunk, in order. It hashes what it received (sha256 of the compressed stream, the catalog's checksum),
decompresses with bounded output pieces (a few KiB of a sparse zstd image can expand to gigabytes),
writes the result raw onto a file or block device (optionally at an offset, e.g. a partition inside a
file-backed disk) or extracts it as a tar stream into a directory, and hashes what it wrote.
`finish()` reports truncated streams, corrupt streams and checksum or size mismatches as ImageError.

The sink is synchronous and blocking (file I/O, decompression and hashing release the GIL): async
callers run `write` in a worker thread, one call at a time (see `AsyncImageSink`).
"""
from __future__ import annotations

import asyncio
import hashlib
import lzma
import os
import queue
import stat
import struct
import tarfile
import threading
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import zstandard

from broadcast.errors import ImageError

COMPRESSIONS = ("gzip", "zstd", "xz", "none")
SINK_KINDS = ("raw", "tar", "discard")
PIECE = 1 << 20  # largest decompressed piece handed to the writer at once


@dataclass(frozen=True)
class SinkSpec:
    """Where and how a node writes an image; plain data so it travels as JSON (never pickle)."""

    kind: str  # raw | tar | discard (hash only, nothing written)
    compression: str  # gzip | zstd | xz | none
    target: str = ""  # raw: file or block device; tar: directory; discard: unused
    offset: int = 0  # raw only: byte offset in target where the image starts (a partition)
    expected_sha256: str | None = None  # of the compressed stream, as published in the catalog
    expected_size: int | None = None  # of the compressed stream
    expected_written_sha256: str | None = None  # of the decompressed stream, when the catalog records it
    sparse: bool = False  # raw onto a fresh regular file: seek over all-zero pieces instead of writing them

    def __post_init__(self) -> None:
        if self.kind not in SINK_KINDS:
            raise ImageError(f"unknown sink kind {self.kind!r} (expected one of {', '.join(SINK_KINDS)})")
        if self.compression not in COMPRESSIONS:
            raise ImageError(f"unknown compression {self.compression!r} (expected one of {', '.join(COMPRESSIONS)})")
        if self.kind != "discard" and not self.target:
            raise ImageError(f"a {self.kind} sink needs a target")
        if self.offset < 0:
            raise ImageError("offset must be >= 0")

    def to_json(self) -> dict[str, Any]:
        """Return the spec as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> "SinkSpec":
        """Build a spec from a decoded JSON object; raise ImageError when it is not one."""
        if not isinstance(data, dict):
            raise ImageError("sink spec: expected an object")
        allowed = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - allowed
        if unknown:
            raise ImageError(f"sink spec: unknown keys {sorted(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ImageError(f"sink spec: {exc}") from exc


@dataclass
class WriteReport:
    """What a sink received and wrote."""

    ok: bool
    reason: str
    bytes_received: int
    bytes_written: int
    sha256: str  # of the received (compressed) stream
    written_sha256: str  # of the decompressed stream written (for tar: of the tar stream)
    seconds: float = 0.0
    files: int = 0  # tar members extracted

    def to_json(self) -> dict[str, Any]:
        """Return the report as a JSON-ready dict."""
        return asdict(self)


# ---------------------------------------------------------------------------------------------------
# Decompressors: push compressed bytes in, get bounded decompressed pieces out; finish() detects truncation.


class Decompressor(Protocol):
    """Incremental decompressor yielding pieces of at most PIECE bytes."""

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Decompress data, yielding output pieces; raise ImageError on corrupt input."""

    def finish(self) -> None:
        """Raise ImageError when the stream ended in the middle of a frame/member."""


class _Identity:
    def feed(self, data: bytes) -> Iterator[bytes]:
        if data:
            yield data

    def finish(self) -> None:
        return None


class _Gzip:
    """gzip (RFC 1952), multi-member streams allowed (as pigz and `cat a.gz b.gz` produce)."""

    def __init__(self) -> None:
        self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._started = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        try:
            while data:
                self._started = True
                out = self._d.decompress(data, PIECE)
                if out:
                    yield out
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

    def feed(self, data: bytes) -> Iterator[bytes]:
        try:
            while True:
                if data:
                    self._started = True
                out = self._d.decompress(data, PIECE)
                data = b""
                if out:
                    yield out
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
    """zstd through python-zstandard's stream writer (bounded output pieces, multi-frame)."""

    def __init__(self) -> None:
        self._out: list[bytes] = []
        self._tracker = _ZstdFrameTracker()
        self._w = zstandard.ZstdDecompressor().stream_writer(self, write_size=PIECE, closefd=False)

    def write(self, b: bytes) -> int:  # called by the zstandard writer with decompressed pieces
        self._out.append(bytes(b))
        return len(b)

    def feed(self, data: bytes) -> Iterator[bytes]:
        self._tracker.feed(data)
        view = memoryview(data)
        # feed in slices so that at most a few pieces are held in memory at once
        step = 1 << 16
        for i in range(0, len(view), step):
            try:
                self._w.write(view[i : i + step])
            except zstandard.ZstdError as exc:
                raise ImageError(f"corrupt zstd stream: {exc}") from exc
            if self._out:
                out, self._out = self._out, []
                yield from out

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


# ---------------------------------------------------------------------------------------------------
# Writers: raw onto a file/device, tar extraction in streaming mode ('r|') on a thread, or nothing.


class _RawWriter:
    def __init__(self, spec: SinkSpec) -> None:
        path = Path(spec.target)
        flags = os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
        if not path.exists():
            flags |= os.O_CREAT
        try:
            self._fd = os.open(path, flags, 0o644)
        except OSError as exc:
            raise ImageError(f"cannot open {path}: {exc.strerror}") from exc
        self._is_reg = stat.S_ISREG(os.fstat(self._fd).st_mode)
        self._sparse = spec.sparse and self._is_reg
        self._pos = spec.offset
        self._zero = bytes(PIECE)

    def write(self, piece: bytes) -> None:
        if self._sparse and len(piece) <= PIECE and piece == self._zero[: len(piece)]:
            self._pos += len(piece)
            return
        view = memoryview(piece)
        while view:
            try:
                n = os.pwrite(self._fd, view, self._pos)
            except OSError as exc:
                raise ImageError(f"write failed at byte {self._pos}: {exc.strerror}") from exc
            view = view[n:]
            self._pos += n

    def close(self, ok: bool) -> int:
        try:
            if ok and self._sparse:
                # holes at the end of a sparse image still count as part of the file
                if os.fstat(self._fd).st_size < self._pos:
                    os.ftruncate(self._fd, self._pos)
            if ok and not self._is_reg:
                os.fsync(self._fd)  # a block device: the data must be on disk before kexec/reboot
        finally:
            os.close(self._fd)
        return 0


class _PipeReader:
    """The file object tarfile reads in 'r|' mode: pulls pieces the feeding thread queued."""

    def __init__(self, q: "queue.Queue[bytes | None]") -> None:
        self._q = q
        self._buf = memoryview(b"")
        self._eof = False

    def read(self, n: int = -1) -> bytes:
        parts: list[memoryview] = []
        want = n
        while (n < 0 or want > 0) and not self._eof:
            if not self._buf:
                item = self._q.get()
                if item is None:
                    self._eof = True
                    break
                self._buf = memoryview(item)
            take = len(self._buf) if n < 0 else min(want, len(self._buf))
            parts.append(self._buf[:take])
            self._buf = self._buf[take:]
            want -= take
        return b"".join(parts)


def _rootfs_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """Refuse paths that escape dest (tarfile's 'tar' filter checks) but keep modes: this is a root filesystem."""
    checked = tarfile.tar_filter(member, dest)
    return checked.replace(mode=member.mode, deep=False)


class _TarWriter:
    def __init__(self, spec: SinkSpec) -> None:
        self._dest = Path(spec.target)
        try:
            self._dest.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ImageError(f"cannot create {self._dest}: {exc.strerror}") from exc
        self._q: queue.Queue[bytes | None] = queue.Queue(maxsize=8)
        self._error: BaseException | None = None
        self._done = threading.Event()
        self.files = 0
        self._thread = threading.Thread(target=self._extract, name=f"untar:{self._dest}", daemon=True)
        self._thread.start()

    def _extract(self) -> None:
        try:
            with tarfile.open(fileobj=_PipeReader(self._q), mode="r|") as tar:  # type: ignore[call-overload]
                for member in tar:
                    tar.extract(member, self._dest, numeric_owner=True, filter=_rootfs_filter)
                    self.files += 1
        except BaseException as exc:  # reported by write()/close() on the feeding side
            self._error = exc
        finally:
            self._done.set()
            # drain so a blocked writer wakes up
            try:
                while True:
                    self._q.get_nowait()
            except queue.Empty:
                pass

    def write(self, piece: bytes) -> None:
        while not self._done.is_set():
            try:
                self._q.put(piece, timeout=0.2)
                return
            except queue.Full:
                continue
        if self._error is not None:
            raise ImageError(f"tar extraction failed: {self._error}") from self._error
        # the archive ended (end-of-archive blocks seen); trailing padding is ignored

    def close(self, ok: bool) -> int:
        while not self._done.is_set():
            try:
                self._q.put(None, timeout=0.2)
                break
            except queue.Full:
                continue
        self._thread.join()
        if ok and self._error is not None:
            raise ImageError(f"tar extraction failed: {self._error}") from self._error
        return self.files


class _DiscardWriter:
    def write(self, piece: bytes) -> None:
        return None

    def close(self, ok: bool) -> int:
        return 0


# ---------------------------------------------------------------------------------------------------


class ImageSink:
    """Consumes the compressed image in order; `finish()` verifies and returns a WriteReport."""

    def __init__(self, spec: SinkSpec) -> None:
        self.spec = spec
        self._started = time.monotonic()
        self._recv_hash = hashlib.sha256()
        self._write_hash = hashlib.sha256()
        self.bytes_received = 0
        self.bytes_written = 0
        self._failure: str | None = None
        self._dec: Decompressor | None = None
        self._writer: _RawWriter | _TarWriter | _DiscardWriter
        if spec.kind == "discard":
            self._writer = _DiscardWriter()
        else:
            self._dec = make_decompressor(spec.compression)
            self._writer = _RawWriter(spec) if spec.kind == "raw" else _TarWriter(spec)

    @property
    def failure(self) -> str | None:
        """The first error met while writing (the sink keeps hashing what it receives after it)."""
        return self._failure

    def write(self, chunk: bytes) -> None:
        """Hash, decompress and write one chunk; an error is remembered and reported by finish()."""
        self._recv_hash.update(chunk)
        self.bytes_received += len(chunk)
        if self._failure is not None or self._dec is None:
            return
        try:
            for piece in self._dec.feed(chunk):
                self._write_hash.update(piece)
                self.bytes_written += len(piece)
                self._writer.write(piece)
        except ImageError as exc:
            self._failure = str(exc)

    def finish(self) -> WriteReport:
        """Close the target and check completeness, size and checksums; never raises for bad data."""
        spec = self.spec
        files = 0
        if self._failure is None and self._dec is not None:
            try:
                self._dec.finish()
            except ImageError as exc:
                self._failure = str(exc)
        try:
            files = self._writer.close(self._failure is None)
        except ImageError as exc:
            self._failure = self._failure or str(exc)
        sha, wsha = self._recv_hash.hexdigest(), self._write_hash.hexdigest()
        reason = self._failure or ""
        if not reason and spec.expected_size is not None and self.bytes_received != spec.expected_size:
            reason = f"size mismatch: received {self.bytes_received} bytes, expected {spec.expected_size}"
        if not reason and spec.expected_sha256 and sha != spec.expected_sha256.lower():
            reason = f"sha256 mismatch: received {sha}, expected {spec.expected_sha256.lower()}"
        if not reason and spec.expected_written_sha256 and self._dec is not None and wsha != spec.expected_written_sha256.lower():
            reason = f"written sha256 mismatch: wrote {wsha}, expected {spec.expected_written_sha256.lower()}"
        return WriteReport(
            ok=not reason,
            reason=reason,
            bytes_received=self.bytes_received,
            bytes_written=self.bytes_written,
            sha256=sha,
            written_sha256=wsha if self._dec is not None else "",
            seconds=time.monotonic() - self._started,
            files=files,
        )

    def abort(self, reason: str) -> WriteReport:
        """Stop writing (the stream will not complete) and report the failure."""
        self._failure = self._failure or reason
        return self.finish()


class AsyncImageSink:
    """Runs an ImageSink's blocking work in worker threads, in order, behind a bounded queue."""

    def __init__(self, spec: SinkSpec, max_queued: int = 8, opener: Callable[[SinkSpec], ImageSink] = ImageSink) -> None:
        self.spec = spec
        self._opener = opener
        self._sink: ImageSink | None = None
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(max_queued)
        self._task: asyncio.Task[WriteReport] | None = None
        self._abort_reason: str | None = None
        self.report: WriteReport | None = None
        self.open_error: str | None = None

    async def start(self) -> None:
        """Open the target in a thread and start the writer task."""
        try:
            self._sink = await asyncio.to_thread(self._opener, self.spec)
        except ImageError as exc:
            self.open_error = str(exc)
        self._task = asyncio.create_task(self._run(), name="image-sink")

    async def put(self, chunk: bytes) -> None:
        """Queue one chunk (waits while the queue is full: backpressure)."""
        await self._queue.put(chunk)

    def has_room(self) -> bool:
        """True when put() would not wait."""
        return not self._queue.full()

    async def close(self) -> WriteReport:
        """Signal the end of the stream and return the verified report."""
        assert self._task is not None
        await self._queue.put(None)
        return await self._task

    async def abort(self, reason: str) -> WriteReport:
        """Drop what is queued, stop the writer and report the stream as failed with reason."""
        if self._task is None:
            return WriteReport(False, reason, 0, 0, "", "")
        if not self._task.done():
            self._abort_reason = reason
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait(None)
        return await self._task

    async def _run(self) -> WriteReport:
        sink = self._sink
        received = 0
        hasher = hashlib.sha256()
        while self._abort_reason is None:
            item = await self._queue.get()
            batch: list[bytes] = []
            end = item is None
            if item is not None:
                batch.append(item)
            while not end and not self._queue.empty():
                nxt = self._queue.get_nowait()
                if nxt is None:
                    end = True
                else:
                    batch.append(nxt)
            if batch and self._abort_reason is None:
                if sink is not None:
                    await asyncio.to_thread(_write_all, sink, batch)
                else:
                    for b in batch:
                        hasher.update(b)
                        received += len(b)
            if end:
                break
        if sink is None:
            self.report = WriteReport(False, self.open_error or "sink not opened", received, 0, hasher.hexdigest(), "")
        elif self._abort_reason is not None:
            self.report = await asyncio.to_thread(sink.abort, self._abort_reason)
        else:
            self.report = await asyncio.to_thread(sink.finish)
        return self.report


def _write_all(sink: ImageSink, batch: list[bytes]) -> None:
    for b in batch:
        sink.write(b)


def sha256_file(path: str | Path, offset: int = 0, length: int | None = None) -> str:
    """Return the sha256 of a file (or of length bytes at offset): a post-write verification read."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left is None or left > 0:
            block = f.read(PIECE if left is None else min(PIECE, left))
            if not block:
                break
            h.update(block)
            if left is not None:
                left -= len(block)
    return h.hexdigest()
