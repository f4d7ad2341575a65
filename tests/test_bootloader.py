"""The post-install's bootloader step: fstab by UUID, grub.cfg, GRUB for BIOS and UEFI, the disk the agent picks.

The pure parts are checked on their text; the whole operation runs as the deploy agent runs it, on a real
block device (a loop device over a sparse file, partitions made by the kernel), with the real sfdisk, mkfs
and grub-install: the MBR gets GRUB's boot code, the BIOS boot partition its core image, the ESP the
removable-media path. (That the result boots is what tests/e2e/test_deploy_qemu.py shows, under SeaBIOS and OVMF.)
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from broadcast import bootloader
from broadcast.agent import AgentConfig, DeployAgent
from broadcast.bootloader import MountedPart, fstab, grub_cfg, kernel_args
from broadcast.disk import default_disk, mkfs_argv
from broadcast.errors import AgentError

ROOT_UUID = "0b7c1a0e-5a4c-4f4e-9d55-2a1f0c3e9b11"


def test_fstab_by_uuid_root_first_then_others_and_swap() -> None:
    parts = [MountedPart(1, "/dev/vda1", "bios_boot", None, "", ""),
             MountedPart(2, "/dev/vda2", "efi", "vfat", "/boot/efi", "AB12-CD34"),
             MountedPart(3, "/dev/vda3", "swap", "swap", "", "5f0e-swap"),
             MountedPart(4, "/dev/vda4", "linux", "ext4", "/", ROOT_UUID)]
    lines = [line for line in fstab(parts).splitlines() if not line.startswith("#")]
    assert lines == [f"UUID={ROOT_UUID}  /  ext4  errors=remount-ro  0  1",
                     "UUID=AB12-CD34  /boot/efi  vfat  umask=0077  0  2",
                     "UUID=5f0e-swap  none  swap  sw  0  0"]


def test_grub_cfg_boots_the_debian_symlinks_of_the_root_found_by_uuid() -> None:
    cfg = grub_cfg(ROOT_UUID, "ro console=ttyS0,115200n8")
    assert f"search --no-floppy --fs-uuid --set=root {ROOT_UUID}" in cfg
    assert f"linux /vmlinuz root=UUID={ROOT_UUID} ro console=ttyS0,115200n8" in cfg
    assert "initrd /initrd.img" in cfg and "/vmlinuz.old" in cfg


def test_kernel_args_keep_a_root_the_environment_names() -> None:
    assert kernel_args(ROOT_UUID, "ro quiet") == f"root=UUID={ROOT_UUID} ro quiet"
    assert kernel_args(ROOT_UUID, "root=/dev/sda2 ro") == "root=/dev/sda2 ro"


def test_mkfs_commands_carry_labels_within_each_tool_s_limit() -> None:
    assert mkfs_argv("ext4", "/dev/sda3", "root") == ["mkfs.ext4", "-F", "-q", "-L", "root", "/dev/sda3"]
    assert mkfs_argv("vfat", "/dev/sda2", "esp-partition") == ["mkfs.vfat", "-F", "32", "-n", "ESP-PARTITI", "/dev/sda2"]
    assert mkfs_argv("xfs", "/dev/sda4", "a-very-long-label") == ["mkfs.xfs", "-f", "-L", "a-very-long-", "/dev/sda4"]
    assert mkfs_argv("swap", "/dev/sda5") == ["mkswap", "/dev/sda5"]
    with pytest.raises(AgentError):
        mkfs_argv("ntfs", "/dev/sda6")


def _block(sys_block: Path, name: str, sectors: int, removable: int = 0) -> None:
    (sys_block / name).mkdir(parents=True)
    (sys_block / name / "size").write_text(f"{sectors}\n")
    (sys_block / name / "removable").write_text(f"{removable}\n")


def test_default_disk_is_the_first_fixed_disk(tmp_path: Path) -> None:
    sys_block = tmp_path / "block"
    for name in ("loop0", "ram0", "sr0", "zram0"):
        _block(sys_block, name, 1 << 20)
    _block(sys_block, "sda", 1 << 20, removable=1)  # a USB stick
    _block(sys_block, "sdb", 0)  # a card reader with no card
    _block(sys_block, "vda", 8 << 20)
    _block(sys_block, "vdb", 8 << 20)
    assert default_disk(sys_block) == "/dev/vda"
    with pytest.raises(AgentError, match="no disk found"):
        default_disk(tmp_path / "nothing")


def test_a_partition_without_number_is_refused() -> None:
    with pytest.raises(AgentError):
        MountedPart.from_json({"device": "/dev/vda1"})


async def test_a_file_backed_disk_gets_no_bootloader(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 4096)
    agent = DeployAgent(AgentConfig(name="n1", mac="52:54:00:00:00:01", host="127.0.0.1", disk=str(disk), workdir=str(tmp_path)))
    reply = await agent.op_bootloader({"root": str(tmp_path), "partitions": [{"number": 1, "device": "", "fs": "ext4", "mount": "/"}]})
    assert reply["grub"] == [] and "file-backed" in reply["skipped"]


@pytest.fixture
def loop_disk(loop_device: Callable[[int], str]) -> str:
    """A 700 MiB block device, with the tools the bootloader step runs."""
    for tool in ("grub-install", "mkfs.vfat", "sfdisk", "blkid"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (./setup.sh --test)")
    return loop_device(700)


async def test_partitions_fstab_and_grub_cfg_on_a_real_block_device(loop_disk: str, tmp_path: Path) -> None:
    """Everything but grub-install (which cannot map loop-device partitions to a BIOS drive: it runs under QEMU)."""
    workdir = tmp_path / "work"
    agent = DeployAgent(AgentConfig(name="n1", mac="52:54:00:00:00:01", host="127.0.0.1", disk=loop_disk, workdir=str(workdir)))
    layout = [{"size_mib": 1, "type": "bios_boot", "fs": None, "label": "bios_boot"},
              {"size_mib": 64, "type": "swap", "fs": "swap", "label": "swap"},
              {"size_mib": None, "type": "linux", "fs": "ext4", "label": "root"}]
    written = await agent.op_partition({"parts": layout, "label": "gpt"})
    devices = [p["device"] for p in written["partitions"]]
    assert devices == [f"{loop_disk}p{i}" for i in range(1, 4)], written
    root = workdir / "root"
    root.mkdir(parents=True)
    subprocess.run(["mount", devices[2], str(root)], check=True)
    parts = [MountedPart.from_json({**p, "mount": m}) for p, m in zip(written["partitions"], ("", "", "/"))]

    ready = await bootloader.prepare(str(root), parts, "ro console=ttyS0,115200n8")

    uuids = [subprocess.run(["blkid", "-s", "UUID", "-o", "value", d], capture_output=True, text=True).stdout.strip() for d in devices]
    assert subprocess.run(["blkid", "-s", "LABEL", "-o", "value", devices[2]], capture_output=True, text=True).stdout.strip() == "root"
    assert ready.root_uuid == uuids[2] and ready.targets == ("i386-pc",) and ready.esp_dir is None
    lines = [line for line in (root / "etc/fstab").read_text().splitlines() if not line.startswith("#")]
    assert lines == [f"UUID={uuids[2]}  /  ext4  errors=remount-ro  0  1", f"UUID={uuids[1]}  none  swap  sw  0  0"]
    assert f"--set=root {uuids[2]}" in (root / "boot/grub/grub.cfg").read_text()
    with pytest.raises(AgentError, match="neither a bios_boot"):
        await bootloader.prepare(str(root), [parts[1], parts[2]], "ro")
    assert await bootloader.unmount_below(str(workdir)) == [str(root)]
