"""The testbed's deploy environment: a kernel stand-in and a real initramfs (gzip'd newc cpio) with the agent's keys.

On hardware the deploy environment is a kernel and an initramfs whose /init starts `rackboot-agent`; the
appliance's deploy key is baked into it as /etc/rackboot/authorized_keys, with the tree key the agents
use to open the next level of a tree exec. The virtual nodes do what that initramfs does: they unpack the
initrd they downloaded (libarchive, the same format the kernel unpacks), read those keys, and run
broadcast.agent.DeployAgent. The files land where the appliance's deploy defaults point
(files/deploy/vmlinuz and files/deploy/initrd.img).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import asyncssh
import libarchive

DEPLOY_DIR = "deploy"
KERNEL_MAGIC = b"RACKBOOT-TESTBED-KERNEL\n"
AUTHORIZED_KEYS = "etc/rackboot/authorized_keys"
TREE_KEY = "etc/rackboot/tree_key"
INIT = b"""#!/bin/sh
# rackboot deploy environment: bring up the network, then the deploy agent (reads /proc/cmdline).
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
udhcpc -i eth0 -q -x hostname:rackboot-deploy
exec rackboot-agent --keys /etc/rackboot/authorized_keys --tree-key /etc/rackboot/tree_key
"""


class InitrdError(Exception):
    """The initrd cannot be read or lacks what the deploy environment needs (the kernel would panic)."""


@dataclass(frozen=True)
class DeployKeys:
    """What the initramfs gives the agent."""

    authorized_keys: tuple[str, ...]
    tree_key: bytes | None  # OpenSSH private key


def write_deploy_environment(files_dir: Path, deploy_key_pub: str, tree_key: asyncssh.SSHKey, kernel_kib: int = 256) -> dict[str, object]:
    """Write files_dir/deploy/{vmlinuz,initrd.img}; return the boot profile (JSON form) that boots them."""
    env_dir = files_dir / DEPLOY_DIR
    env_dir.mkdir(parents=True, exist_ok=True)
    kernel = KERNEL_MAGIC + b'{"kind": "deploy"}\n'
    filler = hashlib.sha256(kernel).digest() * (kernel_kib * 32)
    (env_dir / "vmlinuz").write_bytes((kernel + filler)[: kernel_kib * 1024])
    keys = deploy_key_pub.strip() + "\n" + tree_key.export_public_key().decode().strip() + "\n"
    (env_dir / "initrd.img").write_bytes(build_initrd([
        ("init", INIT, 0o755),
        (AUTHORIZED_KEYS, keys.encode(), 0o644),
        (TREE_KEY, tree_key.export_private_key(), 0o600),
        (TREE_KEY + ".pub", tree_key.export_public_key(), 0o644),
    ]))
    return {"kind": "deploy", "kernel": f"{DEPLOY_DIR}/vmlinuz", "initrds": [f"{DEPLOY_DIR}/initrd.img"],
            "cmdline": "console=ttyS0", "env": "deploy"}


def build_initrd(files: Iterable[tuple[str, bytes, int]]) -> bytes:
    """Return a gzip-compressed newc cpio archive (the initramfs format) holding files (path, data, mode)."""
    chunks: list[bytes] = []

    def write(chunk: bytes) -> int:
        chunks.append(bytes(chunk))
        return len(chunk)

    with libarchive.custom_writer(write, "cpio_newc", "gzip") as archive:
        for path, data, mode in files:
            archive.add_file_from_memory(path, len(data), data, permission=mode)
    return b"".join(chunks)


def read_deploy_keys(initrds: Iterable[bytes]) -> DeployKeys:
    """Unpack the initrds (later ones override earlier files, as the kernel does) and return the agent's keys."""
    found: dict[str, bytes] = {}
    for data in initrds:
        try:
            with libarchive.memory_reader(data) as archive:
                for entry in archive:
                    # Only the agent's keys are kept: a real deploy environment's initrd unpacks to ~195 MB.
                    path = entry.pathname.lstrip("./")
                    if entry.isfile and path in (AUTHORIZED_KEYS, TREE_KEY):
                        found[path] = b"".join(entry.get_blocks())
        except libarchive.ArchiveError as exc:
            raise InitrdError(f"initrd: {exc}") from exc
    if AUTHORIZED_KEYS not in found:
        raise InitrdError(f"initrd has no /{AUTHORIZED_KEYS}: the deploy agent would accept no key")
    keys = tuple(line for line in found[AUTHORIZED_KEYS].decode().splitlines() if line.strip() and not line.startswith("#"))
    return DeployKeys(authorized_keys=keys, tree_key=found.get(TREE_KEY))

