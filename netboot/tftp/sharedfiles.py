"""File contents shared with data-plane worker processes: one sealed memfd per content, mapped once per worker.

The service holds a file's bytes (from its FileCache, a rendered boot.ipxe, a netascii conversion); a worker
process needs them without a copy per transfer. `SharedFiles` (service side) writes each distinct content into a
memfd once, seals it, and hands out its descriptor for as long as transfers use it (then keeps a few idle ones,
bounded in bytes and in number). `MappedFiles` (worker side) maps a received memfd read-only, once per memfd (by inode).
"""
from __future__ import annotations

import fcntl
import mmap
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

from netboot.tftp.session import Datagrams

K = TypeVar("K")
V = TypeVar("V")
_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


@dataclass
class _Shared:
    data: bytes  # held so that id(data) names this content while the entry lives
    fd: int
    users: int = 0


class SharedFiles:
    """Service side: a sealed memfd per distinct bytes object in use; idle ones kept up to keep_bytes and keep_count."""

    def __init__(self, keep_bytes: int = 256 << 20, keep_count: int = 64) -> None:
        self.keep_bytes = keep_bytes
        self.keep_count = keep_count  # a rendered boot.ipxe is a new object per request: bound descriptors too
        self._entries: dict[int, _Shared] = {}
        self._idle: OrderedDict[int, _Shared] = OrderedDict()
        self._idle_bytes = 0

    def acquire(self, data: bytes) -> int:
        """The descriptor of a memfd holding data (owned here: do not close it); pair with release(data)."""
        entry = self._entries.get(id(data))
        if entry is None:
            fd = os.memfd_create("rackboot-tftp", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            try:
                view, written = memoryview(data), 0
                while written < len(view):
                    written += os.write(fd, view[written:])
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)  # a worker maps it: nobody may change it under it
            except BaseException:
                os.close(fd)
                raise
            entry = self._entries[id(data)] = _Shared(data, fd)
        elif entry.users == 0:
            del self._idle[id(data)]
            self._idle_bytes -= len(data)
        entry.users += 1
        return entry.fd

    def release(self, data: bytes) -> None:
        """One transfer of data ended; an unused memfd stays for the next one while idle ones fit keep_bytes."""
        entry = self._entries.get(id(data))
        if entry is None or entry.data is not data or entry.users == 0:
            return
        entry.users -= 1
        if entry.users:
            return
        self._idle[id(data)] = entry
        self._idle_bytes += len(data)
        while self._idle and (self._idle_bytes > self.keep_bytes or len(self._idle) > self.keep_count):
            key, old = self._idle.popitem(last=False)
            self._idle_bytes -= len(old.data)
            del self._entries[key]
            os.close(old.fd)

    @property
    def open_descriptors(self) -> int:
        """How many memfds are open (in use or idle)."""
        return len(self._entries)

    def close(self) -> None:
        """Close every memfd (workers keep their own mappings)."""
        for entry in self._entries.values():
            os.close(entry.fd)
        self._entries.clear()
        self._idle.clear()
        self._idle_bytes = 0


class HeldContents(Generic[K, V]):
    """Contents held while transfers use them (counted), each with the DATA datagrams its transfers encode
    (session.Datagrams), shared by every transfer of it in this process and dropped with it."""

    def __init__(self) -> None:
        self._held: dict[K, tuple[V, int, Datagrams]] = {}  # key -> (contents, users, datagrams)

    def hold(self, key: K, make: Callable[[], V]) -> tuple[V, Datagrams]:
        """One more user of key's contents (made by make() for the first); return them and their datagrams."""
        found = self._held.get(key)
        contents, users, datagrams = found if found is not None else (make(), 0, {})
        self._held[key] = (contents, users + 1, datagrams)
        return contents, datagrams

    def release(self, key: K) -> None:
        """One user of key's contents ended; the last one drops them."""
        found = self._held.get(key)
        if found is None:
            return
        if found[1] > 1:
            self._held[key] = (found[0], found[1] - 1, found[2])
        else:
            del self._held[key]

    def __len__(self) -> int:
        return len(self._held)


class MappedFiles:
    """Worker side: each received memfd mapped read-only once (keyed by inode), unmapped when its last user ends,
    with the DATA datagrams of its transfers (HeldContents)."""

    def __init__(self) -> None:
        self._maps: HeldContents[int, mmap.mmap | bytes] = HeldContents()

    def open(self, fd: int) -> tuple[int, mmap.mmap | bytes, Datagrams]:
        """Map the memfd fd (closed here in every case); return its key for release(), its contents and datagrams."""
        try:
            st = os.fstat(fd)
            contents, datagrams = self._maps.hold(
                st.st_ino, lambda: mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ) if st.st_size else b"")
            return st.st_ino, contents, datagrams
        finally:
            os.close(fd)

    def release(self, key: int) -> None:
        """One transfer of the file ended; the last one drops the mapping (unmapped once no view of it is left)."""
        self._maps.release(key)

    def __len__(self) -> int:
        return len(self._maps)
