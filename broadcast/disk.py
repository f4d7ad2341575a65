"""Partitioning and formatting for the deploy agent: real tools on real disks, the same on file-backed disks.

`partition_disk` writes the table with `sfdisk` (util-linux) onto a block device or onto the sparse file
that backs a virtual node's disk (sfdisk works on regular files), then reads it back with `sfdisk --json`
to learn each partition's byte offset. Without sfdisk it writes a plain MBR itself (the documented
fallback layout: a standard DOS partition table, 1 MiB aligned; GPT needs sfdisk). `format_partitions`
runs mkfs on block-device partitions, and on file-backed disks uses mke2fs' `-E offset=` so the
filesystem lands inside the partition of the file.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from broadcast.errors import AgentError
from broadcast.tools import run_tool

SECTOR = 512
ALIGN = 1 << 20  # first partition and every start on a 1 MiB boundary
_SFDISK_TYPES = {"linux": "linux", "swap": "swap", "efi": "uefi", "bios_boot": "21686148-6449-6E6F-744E-656564454649"}
_MBR_TYPES = {"linux": 0x83, "swap": 0x82, "efi": 0xEF}
_FS = ("ext4", "ext3", "ext2", "xfs", "vfat", "swap")


@dataclass(frozen=True)
class PartitionSpec:
    """One partition to create: size in MiB (None: the rest of the disk), type and optional filesystem."""

    size_mib: int | None = None
    type: str = "linux"  # linux | swap | efi | bios_boot
    fs: str | None = None  # ext4 | ext3 | ext2 | xfs | vfat | swap | None (leave unformatted)
    label: str = ""
    bootable: bool = False

    @classmethod
    def from_json(cls, data: Any) -> "PartitionSpec":
        """Build from a decoded JSON object; raise AgentError when it is not one."""
        if not isinstance(data, dict) or set(data) - set(cls.__dataclass_fields__):
            raise AgentError(f"partition spec: expected an object with keys {sorted(cls.__dataclass_fields__)}")
        spec = cls(**data)
        if spec.type not in _SFDISK_TYPES:
            raise AgentError(f"partition type {spec.type!r}: expected one of {', '.join(_SFDISK_TYPES)}")
        if spec.fs is not None and spec.fs not in _FS:
            raise AgentError(f"filesystem {spec.fs!r}: expected one of {', '.join(_FS)}")
        if spec.size_mib is not None and (not isinstance(spec.size_mib, int) or spec.size_mib < 1):
            raise AgentError("size_mib must be a positive integer or null")
        return spec


@dataclass
class Partition:
    """A partition as written: number, byte range, and how to address it."""

    number: int
    start: int  # bytes from the start of the disk
    size: int  # bytes
    type: str
    device: str  # block device node (/dev/sda2) or "" on a file-backed disk (use disk + start)
    fs: str | None = None
    label: str = ""  # the filesystem label mkfs gives it (and the GPT partition name)

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return asdict(self)


def is_block_device(path: str | Path) -> bool:
    """True when path is a block device (a real disk), False for a regular (file-backed) disk."""
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def partition_device(disk: str, number: int) -> str:
    """The device node of partition `number` of a block device (sda -> sda2, nvme0n1 -> nvme0n1p2)."""
    return f"{disk}p{number}" if disk[-1].isdigit() else f"{disk}{number}"


def sfdisk_script(parts: Sequence[PartitionSpec], label: str) -> str:
    """The sfdisk input that creates parts under a dos or gpt label."""
    lines = [f"label: {label}", ""]
    for p in parts:
        fields = []
        if p.size_mib is not None:
            fields.append(f"size={p.size_mib}MiB")
        kind = _SFDISK_TYPES[p.type]
        if label == "dos" and p.type == "efi":
            kind = "ef"
        elif label == "dos" and p.type == "bios_boot":
            raise AgentError("bios_boot partitions are for GPT")
        fields.append(f"type={kind}")
        if label == "gpt" and p.label:
            fields.append(f'name="{p.label}"')
        if label == "dos" and p.bootable:
            fields.append("bootable")
        lines.append(", ".join(fields))
    return "\n".join(lines) + "\n"


def write_mbr(disk: str | Path, parts: Sequence[PartitionSpec]) -> list[Partition]:
    """Fallback without sfdisk: write a DOS MBR (1 MiB aligned primary partitions, max 4) into disk."""
    if len(parts) > 4:
        raise AgentError("the MBR fallback holds at most 4 partitions (install sfdisk for more)")
    with open(disk, "r+b") as f:
        total = f.seek(0, os.SEEK_END)
        entries, out, start = b"", [], ALIGN
        for i, p in enumerate(parts, 1):
            if p.type not in _MBR_TYPES:
                raise AgentError(f"the MBR fallback cannot make a {p.type} partition")
            size = p.size_mib * (1 << 20) if p.size_mib is not None else (total - start) // ALIGN * ALIGN
            if size <= 0 or start + size > total:
                raise AgentError(f"partition {i} does not fit on the disk ({total} bytes)")
            # MBR partition entry: status, CHS first (unused: 0xFEFFFF), type, CHS last, LBA first, sector count
            entries += struct.pack("<B3sB3sII", 0x80 if p.bootable else 0, b"\xfe\xff\xff", _MBR_TYPES[p.type],
                                   b"\xfe\xff\xff", start // SECTOR, size // SECTOR)
            out.append(Partition(number=i, start=start, size=size, type=p.type, device="", fs=p.fs, label=p.label))
            start += (size + ALIGN - 1) // ALIGN * ALIGN
        f.seek(0)
        mbr = bytearray(f.read(SECTOR).ljust(SECTOR, b"\0"))
        mbr[440:446] = os.urandom(4) + b"\0\0"  # disk signature
        mbr[446:510] = entries.ljust(64, b"\0")
        mbr[510:512] = b"\x55\xaa"
        f.seek(0)
        f.write(mbr)
    return out


async def partition_disk(disk: str, parts: Sequence[PartitionSpec], label: str = "gpt") -> list[Partition]:
    """Write a partition table onto a disk (block device or file) and return the partitions' byte ranges."""
    if label not in ("gpt", "dos"):
        raise AgentError(f"label {label!r}: expected gpt or dos")
    if not parts:
        raise AgentError("no partitions requested")
    if not os.path.exists(disk):
        raise AgentError(f"no such disk: {disk}")
    block = is_block_device(disk)
    sfdisk = shutil.which("sfdisk")
    if sfdisk is None:
        if label != "dos" or block:
            raise AgentError("sfdisk is not installed (needed for GPT and for block devices)")
        return write_mbr(disk, parts)
    argv = [sfdisk, "--quiet", "--wipe", "always"] + ([] if block else ["--no-reread", "--no-tell-kernel"]) + [disk]
    await run_tool(argv, sfdisk_script(parts, label).encode())
    table = json.loads(await run_tool([sfdisk, "--json", disk]))["partitiontable"]
    sector = int(table.get("sectorsize", SECTOR))
    out = []
    for i, (p, spec) in enumerate(zip(table["partitions"], parts), 1):
        out.append(Partition(number=i, start=int(p["start"]) * sector, size=int(p["size"]) * sector, type=spec.type,
                             device=partition_device(disk, i) if block else "", fs=spec.fs, label=spec.label))
    if block:
        await _settle(disk, [p.device for p in out])
    return out


# How long the partition nodes may take to appear after the re-read before partx adds them itself.
PARTX_AFTER_S = 1.0


async def _settle(disk: str, devices: Sequence[str], wait_s: float = 10.0) -> None:
    """Make the kernel see the new table and wait until the partition nodes exist.

    sfdisk asks the kernel to re-read the table itself (BLKRRPART); with udev (a full system) `udevadm settle`
    waits for the nodes, and in the deploy environment (devtmpfs, no udev) the kernel makes them: poll.
    """
    for tool in (["partprobe", disk], ["udevadm", "settle", "--timeout=10"]):
        if shutil.which(tool[0]):
            try:
                await run_tool(tool, timeout=30)
            except AgentError:
                pass
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + wait_s
    added = False
    while missing := [d for d in devices if not os.path.exists(d)]:
        if not added and loop.time() > started + PARTX_AFTER_S and shutil.which("partx"):
            # The re-read did not make them (seen with loop devices whose driver ignores BLKRRPART): add each
            # partition to the kernel one by one (BLKPG), as partx does.
            added = True
            try:
                await run_tool(["partx", "-a", disk], timeout=30)
            except AgentError:
                pass
        if loop.time() > deadline:
            raise AgentError(f"the kernel did not create {', '.join(missing)} within {wait_s:g} s of writing the table")
        await asyncio.sleep(0.1)


# Whole-disk block devices that are never a deployment target: RAM disks, loops, CD-ROMs, device-mapper, zram.
_NOT_TARGETS = ("loop", "ram", "sr", "dm-", "zram", "md", "fd", "nbd")


def default_disk(sys_block: Path = Path("/sys/block"), dev: Path = Path("/dev")) -> str:
    """Return the node's first fixed disk (/sys/block order: nvme, sd, vd, xvd...), for a node with no disk named."""
    found = []
    for entry in sorted(sys_block.iterdir()) if sys_block.is_dir() else ():
        name = entry.name
        if name.startswith(_NOT_TARGETS):
            continue
        try:
            removable = (entry / "removable").read_text().strip() == "1"
            sectors = int((entry / "size").read_text().strip() or 0)
        except (OSError, ValueError):
            continue
        if not removable and sectors > 0:
            found.append(name)
    if not found:
        raise AgentError(f"no disk found in {sys_block} (no driver for the disk controller among the deploy environment's "
                         "modules?); name it with the node's disk: in the inventory")
    return str(dev / found[0])


SWAP_PAGE = 4096


def write_swap_header(disk: str, start: int, size: int, label: str = "") -> None:
    """Write a version-1 swap header (what mkswap writes) into a partition of a disk file.

    Layout of union swap_header (linux/swap.h): 1024 boot bytes, then u32 version = 1, u32 last_page,
    u32 nr_badpages, 16-byte UUID, 16-byte label; the magic "SWAPSPACE2" ends the first page.
    """
    import struct
    import uuid

    pages = size // SWAP_PAGE
    if pages < 10:
        raise AgentError(f"swap partition of {size} bytes is too small")
    header = struct.pack("<III16s16s", 1, pages - 1, 0, uuid.uuid4().bytes, label.encode()[:16])
    with open(disk, "r+b") as f:
        f.seek(start + 1024)
        f.write(header)
        f.seek(start + SWAP_PAGE - 10)
        f.write(b"SWAPSPACE2")


def mkfs_argv(fs: str, device: str, label: str = "") -> list[str]:
    """The command that makes filesystem fs on a partition device, labelled (each tool's label length limit kept)."""
    if fs == "swap":
        return ["mkswap", *(["-L", label[:15]] if label else []), device]
    if fs.startswith("ext"):
        return [f"mkfs.{fs}", "-F", "-q", *(["-L", label[:16]] if label else []), device]
    if fs == "xfs":
        return ["mkfs.xfs", "-f", *(["-L", label[:12]] if label else []), device]
    if fs == "vfat":  # FAT32 (the UEFI spec's ESP filesystem); labels are upper case, at most 11 characters
        return ["mkfs.vfat", "-F", "32", *(["-n", label[:11].upper()] if label else []), device]
    raise AgentError(f"no mkfs for filesystem {fs!r}")


async def format_partitions(disk: str, parts: Sequence[Partition]) -> list[str]:
    """Create each partition's filesystem (mkfs on block devices, mke2fs -E offset= inside a disk file)."""
    done = []
    for p in parts:
        if not p.fs:
            continue
        if p.device:
            argv = mkfs_argv(p.fs, p.device, p.label)
        elif p.fs.startswith("ext"):
            # A disk file (the vm-testbed's nodes, images being built) is sparse: mke2fs would zero the journal and
            # inode tables into it, 69 MB of 8 GiB, which filled this machine's disk at 1000-2000 testbed nodes.
            # Lazy init writes 4 MB; the kernel initialises inode tables on first mount, and a fresh journal is
            # never replayed (its superblock is new).
            lazy = ",lazy_itable_init=1,lazy_journal_init=1" if p.fs != "ext2" else ",lazy_itable_init=1"
            argv = [f"mkfs.{p.fs}", "-F", "-q", *(["-L", p.label[:16]] if p.label else []), "-E", f"offset={p.start}{lazy}",
                    disk, f"{p.size // 1024}k"]
        elif p.fs == "swap":
            write_swap_header(disk, p.start, p.size)  # mkswap has no offset option
            done.append(f"swap@{p.start}")
            continue
        else:
            raise AgentError(f"{p.fs} inside a disk file is not supported (ext2/3/4 and swap are)")
        if shutil.which(argv[0]) is None:
            raise AgentError(f"{argv[0]} is not installed")
        await run_tool(argv, timeout=600)
        done.append(f"{p.number}:{p.fs}")
    return done
