"""Streaming image sinks: decompress chunks while they arrive, write raw or extract tar, hash both sides.

An `ImageSink` is fed the image exactly as the environment catalog publishes it (compressed), chunk by
chunk, in order. It hashes what it received (sha256 of the compressed stream, the catalog's checksum),
decompresses with bounded output pieces (broadcast.decompress),
writes the result raw onto a file or block device (optionally at an offset, e.g. a partition inside a
file-backed disk) or extracts it as a tar stream into a directory, and hashes what it wrote.
`finish()` reports truncated streams, corrupt streams and checksum or size mismatches as ImageError.

The sink is synchronous and blocking (file I/O, decompression and hashing release the GIL): async
callers run `write` in a worker thread, one call at a time (see `AsyncImageSink`).
"""
from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import queue
import shutil
import stat
import struct
import subprocess
import tarfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from broadcast.decompress import COMPRESSIONS, PIECE, Decompressor, make_decompressor
from broadcast.errors import ImageError

SINK_KINDS = ("raw", "tar", "discard")


@dataclass(frozen=True)
class SinkSpec:
    """Where and how a node writes an image; plain data so it travels as JSON (never pickle)."""

    kind: str  # raw | tar | discard (hash only, nothing written)
    compression: str  # gzip | zstd | xz | none
    target: str = ""  # raw: file or block device; tar: directory; discard: unused
    offset: int = 0  # raw only: byte offset in target where the image starts (a partition)
    expected_sha256: str | None = None  # of the compressed stream, as published in the catalog
    expected_size: int | None = None  # of the compressed stream
    # Of the decompressed stream, when the catalog records it; only then is that stream hashed (a whole-disk image is
    # mostly zeros, and hashing gigabytes of them on a slow node took longer than the broadcast's stall timeout).
    expected_written_sha256: str | None = None
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
    written_sha256: str  # of the decompressed stream written (for tar: of the tar stream), when one was expected
    seconds: float = 0.0
    files: int = 0  # tar members extracted

    def to_json(self) -> dict[str, Any]:
        """Return the report as a JSON-ready dict."""
        return asdict(self)


# ---------------------------------------------------------------------------------------------------
# Writers: raw onto a file/device, tar extraction in streaming mode ('r|') on a thread, or nothing.


# ioctl(BLKZEROOUT) (linux/fs.h: _IO(0x12, 127)): zero a byte range of a block device, with the device's write-zeroes
# command when it has one (NVMe, SCSI WRITE SAME, virtio-blk), else the kernel writes the zeros itself.
BLKZEROOUT = 0x127F
SECTOR = 512


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
        # On a block device, runs of zero pieces (most of a whole-disk image) are zeroed with one BLKZEROOUT each
        # instead of written: gigabytes of zeros are seconds, not minutes, and the receiver keeps reading meanwhile.
        self._zero_run_from: int | None = None

    def write(self, piece: bytes) -> None:
        zero = len(piece) <= PIECE and piece == self._zero[: len(piece)]
        if zero and self._sparse:
            self._pos += len(piece)
            return
        if zero and not self._is_reg:
            if self._zero_run_from is None:
                self._zero_run_from = self._pos
            self._pos += len(piece)
            return
        self._flush_zeros()
        self._pwrite(piece, self._pos)
        self._pos += len(piece)

    def _pwrite(self, data: bytes, at: int) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.pwrite(self._fd, view, at)
            except OSError as exc:
                raise ImageError(f"write failed at byte {at}: {exc.strerror}") from exc
            view = view[n:]
            at += n

    def _flush_zeros(self) -> None:
        """Zero the pending run [start, pos): BLKZEROOUT on its sector-aligned middle, plain writes at its ends."""
        start, end = self._zero_run_from, self._pos
        self._zero_run_from = None
        if start is None or start >= end:
            return
        first = -(-start // SECTOR) * SECTOR
        last = end // SECTOR * SECTOR
        if last - first < (1 << 20):  # small: just write it
            self._write_zeros(start, end)
            return
        self._write_zeros(start, first)
        try:
            fcntl.ioctl(self._fd, BLKZEROOUT, struct.pack("=QQ", first, last - first))
        except OSError:
            self._write_zeros(first, last)  # not supported here: the zeros are written like any data
        self._write_zeros(last, end)

    def _write_zeros(self, start: int, end: int) -> None:
        while start < end:
            n = min(PIECE, end - start)
            self._pwrite(self._zero[:n], start)
            start += n

    def close(self, ok: bool) -> int:
        try:
            if ok:
                self._flush_zeros()
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
    """Refuse paths that escape dest (tarfile's 'tar' filter checks, which resolve the links already extracted, so
    nothing is written through one) but keep modes and absolute symbolic links: this is a root filesystem."""
    if member.issym() and member.linkname.startswith("/"):
        checked = tarfile.tar_filter(member.replace(linkname=".", deep=False), dest)
        return checked.replace(linkname=member.linkname, mode=member.mode, deep=False)
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


# GNU tar, when the system has it (the deploy environment does: tar is Essential in Debian): C, so a root filesystem
# of tens of thousands of files unpacks at disk speed, with ownership, modes, xattrs (file capabilities) and device
# nodes. It refuses members whose names hold '..', strips leading '/', and makes links whose targets are absolute or
# hold '..' only once everything else is extracted (placeholders first), so no member is written through a link.
GNU_TAR_ARGS = ("-x", "-f", "-", "--numeric-owner", "--same-permissions", "--xattrs", "--xattrs-include=*",
                "--delay-directory-restore", "--verbose")


class _GnuTarWriter:
    def __init__(self, spec: SinkSpec, tool: str) -> None:
        self._dest = Path(spec.target)
        try:
            self._dest.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ImageError(f"cannot create {self._dest}: {exc.strerror}") from exc
        self._proc = subprocess.Popen([tool, *GNU_TAR_ARGS, "-C", str(self._dest)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self.files = 0
        self._stderr = b""
        self._ended = False  # tar exited (end of archive): what is left is padding
        self._reader = threading.Thread(target=self._read, name=f"tar:{self._dest}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None and self._proc.stderr is not None
        err = threading.Thread(target=lambda: setattr(self, "_stderr", self._proc.stderr.read()), daemon=True)  # type: ignore[union-attr]
        err.start()
        for _ in self._proc.stdout:  # --verbose: one line per member
            self.files += 1
        err.join()

    def write(self, piece: bytes) -> None:
        if self._ended:
            return
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(piece)
        except BrokenPipeError:
            if self._proc.wait() != 0:
                self._reader.join()
                raise ImageError(f"tar extraction failed: {self._stderr.decode(errors='replace').strip()[-500:]}") from None
            self._ended = True

    def close(self, ok: bool) -> int:
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.close()
        except BrokenPipeError:
            pass
        if not ok:
            self._proc.kill()
        status = self._proc.wait()
        self._reader.join()
        if ok and status != 0:
            raise ImageError(f"tar extraction failed (tar exited {status}): {self._stderr.decode(errors='replace').strip()[-500:]}")
        return self.files


def _tar_writer(spec: SinkSpec) -> "_GnuTarWriter | _TarWriter":
    """GNU tar when the system has it, else Python's tarfile (same checks, slower)."""
    tool = shutil.which("tar")
    if tool is not None:
        return _GnuTarWriter(spec, tool)
    return _TarWriter(spec)


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
        self._write_hash = hashlib.sha256() if spec.expected_written_sha256 else None
        self.bytes_received = 0
        self.bytes_written = 0
        self._failure: str | None = None
        self._dec: Decompressor | None = None
        self._writer: _RawWriter | _TarWriter | _GnuTarWriter | _DiscardWriter
        if spec.kind == "discard":
            self._writer = _DiscardWriter()
        else:
            self._dec = make_decompressor(spec.compression)
            self._writer = _RawWriter(spec) if spec.kind == "raw" else _tar_writer(spec)

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
            self._dec.feed(chunk, self._consume)
        except ImageError as exc:
            self._failure = str(exc)

    def _consume(self, piece: bytes) -> None:
        """Hash and write one decompressed piece (called by the decompressor as it makes each)."""
        if self._write_hash is not None:
            self._write_hash.update(piece)
        self.bytes_written += len(piece)
        self._writer.write(piece)

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
        sha, wsha = self._recv_hash.hexdigest(), self._write_hash.hexdigest() if self._write_hash is not None else ""
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
        """Start the writer task, which opens the target in a thread first: the caller does not wait for the open
        (chunks queue meanwhile). A relay opened its disk before it answered its upstream and greeted its children,
        so every hop of a chain waited for a thread of its process's pool (in the vm-testbed 500 nodes share a
        daemon's 6 threads with their disk writes). The stream's head still goes down a 4000-node testbed chain at
        about 14 nodes a second with this (2026-12-06): that pace is the two cores' copying, not the opens."""
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
        try:
            self._sink = await asyncio.to_thread(self._opener, self.spec)
        except ImageError as exc:
            self.open_error = str(exc)
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
