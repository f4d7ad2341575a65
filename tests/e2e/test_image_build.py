"""`rackboot build image debian12` builds a deployable Debian 12 root filesystem (cached across runs), and a second build does nothing.

The tar.zst's listing is checked for what a node needs to boot from disk and be reached: the kernel and a real
initrd with the /vmlinuz and /initrd.img links the deploy environment's grub.cfg points at, sshd, the networkd
DHCP file, the units enabled, and none of what must differ per node (SSH host keys, machine-id). Needs root and
mmdebstrap; no network namespace.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from appliance.catalog import parse_environment_file

CACHE = Path(os.environ.get("RACKBOOT_IMAGE_CACHE", "/var/cache/rackboot/images"))
BUILD_TIMEOUT_S = 1800.0  # cold: mmdebstrap (about 80 s here) + tar/zstd; cached: about a second
WANTS = "etc/systemd/system/multi-user.target.wants"


def _rackboot(*args: str, timeout: float = BUILD_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("rackboot")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "appliance.cli"]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Build the image twice (the second a cache hit, with --out); yield the paths, manifest and listing."""
    if os.geteuid() != 0:
        pytest.skip("building an image needs root")
    for tool in ("mmdebstrap", "zstd"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (./setup.sh --test)")
    t0 = time.monotonic()
    first = _rackboot("build", "image", "debian12", "--cache-dir", str(CACHE))
    first_s = time.monotonic() - t0
    assert first.returncode == 0, first.stdout + first.stderr
    out = tmp_path_factory.mktemp("images") / "debian12.tar.zst"
    t0 = time.monotonic()
    again = _rackboot("build", "image", "debian12", "--cache-dir", str(CACHE), "--out", str(out))
    again_s = time.monotonic() - t0
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing to do" in again.stdout, again.stdout
    digest = again.stdout.split()[2].rstrip(":")
    manifest = json.loads((CACHE / digest / "manifest.json").read_text())
    listing = subprocess.run(["tar", "-I", "zstd", "-tvf", str(out)], capture_output=True, text=True, check=True).stdout
    print(f"\n[image] first build {first_s:.1f}s ({'cached' if 'nothing to do' in first.stdout else 'cold'}), second "
          f"{again_s:.1f}s; debian12.tar.zst {manifest['tar_bytes'] / 1e6:.1f} MB ({manifest['unpacked_bytes'] / 1e6:.0f} MB "
          f"unpacked, {len(manifest['packages'])} packages, kernel {manifest['kernel_version']}), cold build took "
          f"{manifest['build_seconds']}s")
    yield {"out": out, "manifest": manifest, "listing": listing.splitlines(), "stdout": again.stdout}


def entries(listing: list[str]) -> dict[str, str]:
    """Map each archive path (without a leading ./) to its `tar -tv` line."""
    table = {}
    for line in listing:
        name = line.split(None, 5)[5].split(" -> ")[0].removeprefix("./").rstrip("/")
        table[name] = line
    return table


def test_the_image_has_a_kernel_a_real_initrd_and_the_links_grub_boots(image: dict[str, Any]) -> None:
    table = entries(image["listing"])
    version = image["manifest"]["kernel_version"]
    assert f"boot/vmlinuz-{version}" in table
    initrd = table[f"boot/initrd.img-{version}"]
    assert int(initrd.split()[2]) > 10_000_000, initrd  # initramfs-tools really ran (MODULES=most: tens of MB)
    assert table["vmlinuz"].endswith(f"vmlinuz -> boot/vmlinuz-{version}")
    assert table["initrd.img"].endswith(f"initrd.img -> boot/initrd.img-{version}")
    assert not any(n.startswith(("vmlinuz.old", "initrd.img.old")) for n in table)
    assert not any(re.search(r"grub", n) for n in table if n.startswith(("boot/", "usr/sbin/")))
    assert any(n.startswith(f"usr/lib/modules/{version}/kernel/drivers/gpu/drm/ast/") for n in table)
    assert f"usr/lib/modules/{version}/kernel/drivers/net/can/dev/can-dev.ko" in table  # only the top /dev is emptied
    assert not any(n.startswith(f"usr/lib/modules/{version}/kernel/sound/") and n.endswith(".ko") for n in table)


def test_the_image_serves_ssh_over_dhcp_with_per_node_identity(image: dict[str, Any]) -> None:
    table = entries(image["listing"])
    assert "usr/sbin/sshd" in table
    assert "etc/systemd/network/80-rackboot-dhcp.network" in table
    for unit in ("ssh.service", "systemd-networkd.service", "rackboot-ssh-hostkeys.service"):
        assert f"{WANTS}/{unit}" in table, unit
    assert "etc/systemd/system/rackboot-ssh-hostkeys.service" in table
    assert not [n for n in table if n.startswith("etc/ssh/ssh_host_")]
    assert table["etc/machine-id"].split()[2] == "0"
    assert "var/lib/dbus/machine-id" not in table
    assert table["etc/hostname"].startswith("-rw-r--r--") and "etc/.resolv.conf.systemd-resolved.bak" not in table
    assert not [n for n in table if n.startswith("usr/share/doc/") and not table[n].startswith("d")]
    assert not [n for n in table if n.startswith("var/lib/apt/lists/") and n.endswith("Packages")]
    assert not [n for n in table if n.startswith("dev/")]


def test_the_yaml_beside_out_describes_it(image: dict[str, Any]) -> None:
    out: Path = image["out"]
    env, source = parse_environment_file(out.with_name("debian12.yaml"), "admin", image_roots=[out.parent])
    assert source == out and env.sha256 == image["manifest"]["sha256"] and env.compression == "zstd"
    assert [p.name for p in env.layout] == ["bios_boot", "esp", "root"]
    assert f"rackboot env add {out.with_name('debian12.yaml')}" in image["stdout"]
