"""What goes into the images `rackboot build image` makes: Debian packages, what dpkg leaves out, files written, units enabled.

An `ImageRecipe` is the whole input of a build (its digest is the cache key); `IMAGES` names the recipes the CLI
offers. The bootloader is not in the image: the deploy environment installs GRUB (BIOS and UEFI) with its own
copy and writes grub.cfg pointing at /vmlinuz and /initrd.img.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

# Left out by dpkg at unpack time (inside the image they stay in /etc/dpkg/dpkg.cfg.d/99mmdebstrap, so packages
# installed later on a node are trimmed the same way): documentation, locales, and kernel modules a server does
# not load. Debian 12's kernel package ships its modules under /lib/modules (merged-/usr makes that
# /usr/lib/modules); both spellings are listed. gpu/drm stays (BMC consoles: ast, mgag200), and so does infiniband.
DOC_EXCLUDES: tuple[str, ...] = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*")
MODULE_DIRS_LEFT_OUT: tuple[str, ...] = (
    "kernel/sound", "kernel/drivers/media", "kernel/drivers/net/wireless", "kernel/net/wireless", "kernel/net/mac80211",
    "kernel/drivers/bluetooth", "kernel/net/bluetooth",
)

NETWORK_FILE = "etc/systemd/network/80-rackboot-dhcp.network"
NETWORK = """\
# Written by rackboot build image: DHCP (IPv4) on every Ethernet NIC; the hostname is sent to the DHCP server.
[Match]
Name=en* eth*

[Network]
DHCP=ipv4

[DHCPv4]
SendHostname=yes
"""

HOSTKEYS_UNIT = "rackboot-ssh-hostkeys.service"
HOSTKEYS = """\
# Written by rackboot build image: the image carries no SSH host keys, so each node makes its own at first boot.
[Unit]
Description=Generate this node's SSH host keys (first boot)
Before=ssh.service
ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
"""

FSTAB = "# Written by rackboot build image. The deployment's post-install writes the mounts here, by UUID.\n"
HOSTS = "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\nff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n"


@dataclass(frozen=True)
class ImageRecipe:
    """Everything that decides the bytes of an image and of its environment description."""

    name: str  # the image's and the environment's name: NAME.tar.zst, NAME.yaml
    suite: str
    packages: tuple[str, ...]
    dpkg_excludes: tuple[str, ...]  # dpkg path-exclude patterns
    files: tuple[tuple[str, str, int], ...]  # (path in the image, content, mode) written after the packages
    enable: tuple[str, ...]  # units enabled with systemctl in the image
    hostname: str
    zstd_level: int
    description: str
    layout: tuple[tuple[tuple[str, str], ...], ...]  # the environment's disk layout: each partition's (key, value) pairs
    cmdline: str
    version: int = 2  # bump when the build steps change what they produce from the same recipe

    def digest(self) -> str:
        """Return the cache key: sha256 of the whole recipe (16 hex digits)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def module_excludes(dirs: tuple[str, ...]) -> tuple[str, ...]:
    """Return the dpkg path-exclude patterns that leave out these directories of every kernel's modules."""
    return tuple(f"{prefix}/modules/*/{d}/*" for d in dirs for prefix in ("/lib", "/usr/lib"))


DEBIAN12 = ImageRecipe(
    name="debian12",
    suite="bookworm",
    # systemd-resolved (a package of its own in Debian 12) puts the DNS servers of networkd's DHCP lease in
    # /etc/resolv.conf (a link to its stub resolver); without it a node has no name resolution.
    packages=("systemd-sysv", "udev", "kmod", "dbus", "linux-image-amd64", "initramfs-tools", "openssh-server",
              "iproute2", "netbase", "procps", "systemd-resolved"),
    dpkg_excludes=DOC_EXCLUDES + module_excludes(MODULE_DIRS_LEFT_OUT),
    files=((NETWORK_FILE, NETWORK, 0o644), (f"etc/systemd/system/{HOSTKEYS_UNIT}", HOSTKEYS, 0o644),
           ("etc/fstab", FSTAB, 0o644), ("etc/hosts", HOSTS, 0o644)),
    enable=("systemd-networkd.service", "systemd-resolved.service", "ssh.service", HOSTKEYS_UNIT),
    hostname="debian12",
    # zstd -12 on every core. Measured on 2 cores with the 548 MB tar of this recipe: -6 3.4 s 155.8 MB, -12 9.4 s 149.7 MB,
    # -15 43 s 149.0 MB; -19 took 38 s for the last 150 MB alone (12% smaller there than -12): over 2 minutes for the whole.
    zstd_level=12,
    description="Debian 12 (bookworm) minimal: systemd, systemd-networkd (DHCP), openssh-server, linux-image-amd64; "
                "built by rackboot build image",
    layout=((("name", "bios_boot"), ("size", "1M"), ("fs", "bios_boot")),
            (("name", "esp"), ("size", "256M"), ("fs", "vfat"), ("mount", "/boot/efi")),
            (("name", "root"), ("size", "rest"), ("fs", "ext4"), ("mount", "/"))),
    cmdline="ro console=tty0 console=ttyS0,115200n8",
)

IMAGES: dict[str, ImageRecipe] = {DEBIAN12.name: DEBIAN12}
