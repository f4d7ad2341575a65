"""What goes into the deploy environment: Debian packages, kernel modules, project packages, what is trimmed."""
from __future__ import annotations

SUITE = "bookworm"  # Debian 12
RECIPE_VERSION = 1  # bump when the build steps change what they produce from the same inputs

# Debian packages (with their dependencies). busybox-static: /init, udhcpc, insmod, the debug shell (it
# conflicts with the dynamically linked `busybox`, which minbase does not install).
PACKAGES: tuple[str, ...] = (
    "linux-image-amd64",
    "busybox-static",
    "python3",
    # What broadcast/ imports beyond the standard library (Debian 12: asyncssh 2.10, aiohttp 3.8, zstandard 0.20).
    "python3-asyncssh", "python3-aiohttp", "python3-zstandard", "python3-clustershell",
    # Partitioning, filesystems, kexec.
    "fdisk", "gdisk", "e2fsprogs", "xfsprogs", "dosfstools", "kexec-tools",
    # The bootloader the post-install puts on the disk: grub-install (grub2-common) with the BIOS (i386-pc) and
    # UEFI (x86_64-efi) images; the two -bin packages install side by side (unlike grub-pc and grub-efi-amd64).
    "grub2-common", "grub-pc-bin", "grub-efi-amd64-bin",
)

# Kernel modules to load at boot (their dependencies come from modules.dep), in this order: the field
# notes' virtio order first, then storage, NICs and filesystems.
MODULES: tuple[str, ...] = (
    "failover", "net_failover", "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
    "virtio_pci", "virtio_net", "virtio_blk", "virtio_scsi",
    "libata", "ahci", "ata_piix", "scsi_mod", "sd_mod", "nvme",
    "e1000", "e1000e", "igb", "ixgbe", "i40e", "bnxt_en", "mlx5_core",
    # crc32c is a soft dependency of libcrc32c (ext4, xfs): not in modules.dep, so listed before them.
    "crc32c_generic", "crc32c_intel", "ext4", "xfs", "vfat", "nls_cp437", "nls_ascii",
)

# Removed from the Debian tree before it is packed: documentation, locales, package-manager state, the
# kernel's own /boot and every module not listed above (added back from MODULES).
TRIM: tuple[str, ...] = (
    "boot", "usr/lib/modules", "lib/modules", "usr/share/doc", "usr/share/man", "usr/share/info",
    "usr/share/locale", "usr/share/i18n", "usr/share/lintian", "usr/share/zoneinfo", "usr/share/common-licenses",
    "var/cache/apt", "var/lib/apt/lists", "var/cache/debconf", "var/log", "usr/lib/x86_64-linux-gnu/gconv",
    "usr/share/perl", "usr/lib/x86_64-linux-gnu/perl", "usr/share/python3/debian_defaults",
    "usr/lib/python3.11/ensurepip", "usr/lib/python3.11/idlelib", "usr/lib/python3.11/tkinter",
    "usr/lib/python3.11/turtledemo", "usr/lib/python3.11/pydoc_data", "usr/lib/python3.11/lib2to3",
    "usr/lib/python3.11/unittest", "usr/lib/python3.11/distutils", "usr/lib/python3.11/test",
    # udev's hardware database (no udev runs here) and ICU (31 MB of data, only xfs_scrub of xfsprogs links it;
    # mkfs.xfs does not: checked by TOOLS at build time).
    "usr/lib/udev/hwdb.bin", "usr/lib/udev/hwdb.d", "usr/lib/x86_64-linux-gnu/libicudata.so.72",
    "usr/lib/x86_64-linux-gnu/libicudata.so.72.1", "usr/lib/x86_64-linux-gnu/libicui18n.so.72",
    "usr/lib/x86_64-linux-gnu/libicui18n.so.72.1", "usr/lib/x86_64-linux-gnu/libicuuc.so.72",
    "usr/lib/x86_64-linux-gnu/libicuuc.so.72.1", "usr/sbin/xfs_scrub", "usr/sbin/xfs_scrub_all",
)

# Run inside the trimmed tree before it is packed: each must exit 0 (the tools the agent and post-installs use).
TOOLS: tuple[tuple[str, ...], ...] = (
    ("sfdisk", "--version"), ("sgdisk", "--version"), ("mkfs.ext4", "-V"), ("mkfs.xfs", "-V"), ("mkfs.vfat", "--help"),
    ("kexec", "--version"), ("busybox", "udhcpc", "--help"), ("grub-install", "--version"), ("blkid", "--version"),
)

# The project's packages copied in (from the checkout this command runs from), under /usr/lib/rackboot.
PROJECT_PACKAGES: tuple[str, ...] = ("broadcast", "domain")

# The UEFI local-boot loader the appliance chains from iPXE for nodes whose profile is "local" (firmware that keeps
# PXE first in its boot order): GRUB for x86_64-efi made with grub-mkimage from the tree's grub-efi-amd64-bin, its
# modules built in and this grub.cfg in its memdisk. It finds the disk's removable-media loader and chains it (the bootloader
# the post-install wrote, or a whole-disk image's own), else the installed system's grub.cfg; else it returns to iPXE.
LOCALBOOT_MODULES: tuple[str, ...] = (
    "part_gpt", "part_msdos", "fat", "ext2", "xfs", "btrfs", "search", "search_fs_file", "search_fs_uuid", "search_label",
    "chain", "configfile", "normal", "linux", "gzio", "echo", "test", "sleep", "serial", "terminal", "all_video",
    "memdisk", "tar",
)
LOCALBOOT_CFG = """\
echo "rackboot: local boot: GRUB from the appliance looks for this node's disk"
if search --no-floppy --file --set=esp /EFI/BOOT/BOOTX64.EFI; then
  echo "rackboot: chaining ($esp)/EFI/BOOT/BOOTX64.EFI"
  # GRUB 2.06's EFI chainloader takes the device of $root, not the one the path names.
  set root=$esp
  chainloader /EFI/BOOT/BOOTX64.EFI
  boot
fi
if search --no-floppy --file --set=disk /boot/grub/grub.cfg; then
  echo "rackboot: loading ($disk)/boot/grub/grub.cfg"
  set root=$disk
  set prefix=($disk)/boot/grub
  configfile /boot/grub/grub.cfg
fi
echo "rackboot: no bootable system found on the local disks"
sleep 5
"""
# Where that grub.cfg lives in the loader's memdisk (its prefix): not /boot/grub, which the search above looks for.
LOCALBOOT_PREFIX = "rackboot"
