"""What a TFTP path names: per-MAC virtual files, the TFTP root, the iPXE NBPs; with a bounded in-memory cache."""
from __future__ import annotations

import asyncio
import os
import stat
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from domain.errors import RackbootError
from domain.progress import NodeEvent
from netboot.tftp.codec import ErrorCode


@dataclass(frozen=True)
class VirtualFile:
    """A file rendered for one client (its iPXE script), and the node record to emit once it is sent whole."""

    data: bytes
    event: NodeEvent | None = None


# (client MAC or None, normalized path) -> a rendered file, or None when the path is not a virtual one
VirtualFiles = Callable[[str | None, str], VirtualFile | None]


class TftpFileError(RackbootError):
    """A request cannot be served; carries the TFTP error code to answer with."""

    code: int = ErrorCode.NOT_DEFINED


class FileNotFound(TftpFileError):
    """No such file (TFTP error 1)."""

    code = ErrorCode.FILE_NOT_FOUND


class AccessViolation(TftpFileError):
    """The path tries to leave the TFTP root or is not readable (TFTP error 2)."""

    code = ErrorCode.ACCESS_VIOLATION


def normalize_path(requested: str) -> str:
    """Return the request path relative to the root ('a/b'); raise AccessViolation on '..' or control characters.

    A leading '/' is allowed (many firmwares send one); backslashes count as separators (Windows-style ROMs).
    """
    # RFC 1350 2: file names are netascii (RFC 764: printable ASCII); C0 controls, DEL and the C1 controls
    # (U+0080-U+009F: U+009B is a terminal's CSI) name no file we serve and must not reach logs and events.
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in requested):
        raise AccessViolation(f"control character in path {requested!r}")
    parts = [p for p in requested.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise AccessViolation(f"path {requested!r} leaves the TFTP root")
    if not parts:
        raise FileNotFound("empty file name")
    return "/".join(parts)


def to_netascii(data: bytes) -> bytes:
    """Convert to netascii (RFC 1350 / RFC 764): LF becomes CR LF, a bare CR becomes CR NUL."""
    return data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


@dataclass(frozen=True)
class TftpFile:
    """A file ready to send: its normalized name, its bytes (already in the transfer mode), where it came from."""

    name: str
    data: bytes
    source: str  # "virtual" | "root" | "ipxe"
    is_nbp: bool
    event: NodeEvent | None = None  # what a virtual file's delivery means for the node


@dataclass
class _Entry:
    signature: tuple[int, int, int, int]  # (device, inode, size, mtime_ns)
    data: bytes
    netascii: bytes | None = None


class FileCache:
    """File contents by real path, LRU-bounded in bytes, revalidated by stat (mtime, size, inode) on every use."""

    def __init__(self, max_bytes: int = 512 << 20) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._loading: dict[tuple[str, tuple[int, int, int, int]], asyncio.Future[bytes]] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    async def read(self, path: str, st: os.stat_result, netascii: bool = False) -> bytes:
        """Return the contents of path (stat'ed by the caller); read in a thread on a miss, coalescing concurrent misses."""
        sig = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        entry = self._entries.get(path)
        if entry is not None and entry.signature == sig:
            self.hits += 1
            self._entries.move_to_end(path)
        else:
            key = (path, sig)
            pending = self._loading.get(key)
            if pending is None:
                self.misses += 1  # counts disk reads: concurrent misses share one read
                pending = asyncio.get_running_loop().create_future()
                self._loading[key] = pending
                try:
                    data = await asyncio.to_thread(_read_file, path)
                except asyncio.CancelledError:
                    pending.cancel()
                    raise
                except Exception as exc:
                    pending.set_exception(exc)
                    pending.exception()  # mark retrieved: there may be no other waiter
                    raise
                finally:
                    del self._loading[key]
                pending.set_result(data)
                entry = self._store(path, sig, data)
            else:
                self.hits += 1
                data = await asyncio.shield(pending)
                entry = self._entries.get(path)
                if entry is None or entry.signature != sig:
                    entry = _Entry(sig, data)  # too big to keep, or replaced meanwhile
        if not netascii:
            return entry.data
        if entry.netascii is None:
            entry.netascii = to_netascii(entry.data)
            if path in self._entries and self._entries[path] is entry:
                self.bytes += len(entry.netascii)
                self._evict()
        return entry.netascii

    def _store(self, path: str, sig: tuple[int, int, int, int], data: bytes) -> _Entry:
        entry = _Entry(sig, data)
        old = self._entries.pop(path, None)
        if old is not None:
            self.bytes -= len(old.data) + len(old.netascii or b"")
        if len(data) <= self.max_bytes:
            self._entries[path] = entry
            self.bytes += len(data)
            self._evict()
        return entry

    def _evict(self) -> None:
        while self.bytes > self.max_bytes and self._entries:
            _, old = self._entries.popitem(last=False)
            self.bytes -= len(old.data) + len(old.netascii or b"")


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class FileStore:
    """Resolves a request to bytes: virtual(mac, path), then the TFTP root, then the configured iPXE NBPs."""

    def __init__(
        self,
        root: Path,
        ipxe_dir: Path,
        nbp_names: tuple[str, ...],
        virtual: VirtualFiles | None = None,
        cache: FileCache | None = None,
    ) -> None:
        self.root = root
        self.ipxe_dir = ipxe_dir
        self.nbp_names = frozenset(n for n in nbp_names if n)
        self.virtual = virtual
        self.cache = cache or FileCache()

    async def open(self, mac: str | None, requested: str, netascii: bool = False) -> TftpFile:
        """Return the file a client asked for; raise FileNotFound or AccessViolation."""
        name = normalize_path(requested)
        is_nbp = name in self.nbp_names
        if self.virtual is not None:
            rendered = self.virtual(mac, name)
            if rendered is not None:
                data = to_netascii(rendered.data) if netascii else rendered.data
                return TftpFile(name, data, "virtual", is_nbp, rendered.event)
        found = self._under(self.root, name, confine=True)
        source = "root"
        if found is None and is_nbp:
            # Only the configured NBP names are served from the iPXE directory, nothing else there.
            found = self._under(self.ipxe_dir, name, confine=False)
            source = "ipxe"
        if found is None:
            raise FileNotFound(f"{name}: no such file")
        real, st = found
        try:
            data = await self.cache.read(real, st, netascii)
        except PermissionError as exc:
            raise AccessViolation(f"{name}: not readable") from exc
        except OSError as exc:
            raise FileNotFound(f"{name}: {exc.strerror or exc}") from exc
        return TftpFile(name, data, source, is_nbp)

    @staticmethod
    def _under(base: Path, name: str, confine: bool) -> tuple[str, os.stat_result] | None:
        """Resolve base/name with symlinks; with confine, the real path must stay under base's real path."""
        try:
            real_base = os.path.realpath(base)
            real = os.path.realpath(os.path.join(real_base, name))
            if confine and not real.startswith(real_base.rstrip("/") + "/"):
                raise AccessViolation(f"{name}: resolves outside the TFTP root")
            st = os.stat(real)
        except PermissionError as exc:
            raise AccessViolation(f"{name}: not accessible") from exc
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        return real, st
