"""Pack a directory tree into a zstd-compressed newc cpio archive: the initramfs format the kernel unpacks.

Entries are sorted and stamped with one mtime, so the same tree gives the same bytes. Hard links are
written as separate files (the kernel's unpacker needs no link bookkeeping then); device nodes are
skipped but /dev/console, which the kernel opens for init before devtmpfs is mounted. The vm-testbed's
`build_initrd` writes small archives from memory; this one streams a whole root filesystem from disk.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

import zstandard

MAGIC = b"070701"
CHUNK = 1 << 20


def _header(name: str, mode: int, size: int, ino: int, mtime: int, nlink: int = 1, rdev: tuple[int, int] = (0, 0)) -> bytes:
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, mtime, size, 0, 0, rdev[0], rdev[1], len(encoded), 0)
    head = MAGIC + b"".join(b"%08X" % f for f in fields) + encoded
    return head + b"\0" * (-len(head) % 4)


def write_tree(root: Path, out: BinaryIO, mtime: int = 0) -> int:
    """Write every directory, file and symlink under root as newc entries (uid/gid 0); return the entry count."""
    ino = 0

    def entry(name: str, mode: int, data: bytes = b"", size: int = 0) -> None:
        nonlocal ino
        ino += 1
        out.write(_header(name, mode, size or len(data), ino, mtime, 2 if stat.S_ISDIR(mode) else 1))

    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        if rel != ".":
            entry(rel, os.lstat(dirpath).st_mode)
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            path = os.path.join(dirpath, name)
            arc = name if rel == "." else f"{rel}/{name}"
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(path).encode()
                entry(arc, st.st_mode, size=len(target))
                out.write(target + b"\0" * (-len(target) % 4))
            elif stat.S_ISREG(st.st_mode):
                entry(arc, st.st_mode, size=st.st_size)
                with open(path, "rb") as src:
                    while chunk := src.read(CHUNK):
                        out.write(chunk)
                out.write(b"\0" * (-st.st_size % 4))
            # device nodes, fifos and sockets are skipped: /dev is a devtmpfs at boot
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    # The kernel opens /dev/console for init before init can mount devtmpfs: the archive carries that node.
    entry("dev", stat.S_IFDIR | 0o755)
    ino += 1
    out.write(_header("dev/console", stat.S_IFCHR | 0o600, 0, ino, mtime, rdev=(5, 1)))
    out.write(_header("TRAILER!!!", 0, 0, 0, 0))
    return ino


def pack(root: Path, dest: Path, level: int = 9, mtime: int = 0) -> int:
    """Write root as dest (newc cpio, zstd with checksums); return the number of entries."""
    cctx = zstandard.ZstdCompressor(level=level, threads=-1, write_checksum=True)
    tmp = dest.with_name(dest.name + ".part")
    with open(tmp, "wb") as raw, cctx.stream_writer(raw, closefd=False) as zout:
        count = write_tree(root, zout, mtime)  # type: ignore[arg-type]
    tmp.rename(dest)
    return count
