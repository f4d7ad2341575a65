"""Environment disk layouts: partitions for a bootable disk (BIOS boot, ESP, root), whole-disk raw images, and what
is refused with a line number."""
from __future__ import annotations

from pathlib import Path

import pytest

from appliance.catalog import DEFAULT_LAYOUT, parse_environment_file
from appliance.deploy.agent_driver import partition_specs
from broadcast.disk import PartitionSpec
from domain.errors import ConfigError

BOOTABLE = """name: debian12
image: {file: img.tar.zst, kind: tar}
disk:
  layout:
    - {name: bios_boot, size: 1M, fs: bios_boot}
    - {name: esp, size: 256M, fs: vfat, mount: /boot/efi}
    - {name: root, size: rest, fs: ext4, mount: /}
"""


def _parse(tmp_path: Path, text: str, image: str = "img.tar.zst"):  # type: ignore[no-untyped-def]
    (tmp_path / image).write_bytes(b"x")
    (tmp_path / "env.yaml").write_text(text)
    return parse_environment_file(tmp_path / "env.yaml", "admin", image_roots=[tmp_path])[0]


def test_a_bootable_layout_becomes_gpt_partitions_for_both_firmwares(tmp_path: Path) -> None:
    env = _parse(tmp_path, BOOTABLE)
    assert [(p.name, p.fs, p.mount) for p in env.layout] == [("bios_boot", "bios_boot", ""), ("esp", "vfat", "/boot/efi"),
                                                             ("root", "ext4", "/")]
    assert partition_specs(env.layout) == [PartitionSpec(1, "bios_boot", None, "bios_boot"), PartitionSpec(256, "efi", "vfat", "esp"),
                                           PartitionSpec(None, "linux", "ext4", "root")]


def test_a_raw_image_is_the_whole_disk_unless_a_layout_is_given(tmp_path: Path) -> None:
    assert _parse(tmp_path, "name: r\nimage: {file: d.raw.zst, kind: raw}\n", "d.raw.zst").layout == ()
    assert _parse(tmp_path, "name: r\nimage: {file: d.raw.zst, kind: raw}\ndisk: {layout: whole}\n", "d.raw.zst").layout == ()
    tar = _parse(tmp_path, "name: t\nimage: {file: img.tar.zst, kind: tar}\n")
    assert tar.layout == DEFAULT_LAYOUT


@pytest.mark.parametrize("disk, problem", [
    ("{layout: whole}", "only a raw image can be the whole disk"),
    ("{layout: [{name: root, size: rest, fs: ntfs}]}", "fs 'ntfs'"),
    ("{layout: [{name: root, size: rest, fs: ext4, mount: boot}]}", "mount 'boot'"),
    ("{layout: [{name: s, size: 1G, fs: swap, mount: /swap}, {name: root, size: rest}]}", "mount '/swap'"),
    ("{layout: [{name: root, size: rest, colour: red}]}", "each partition is a mapping"),
])
def test_bad_layouts_are_refused_with_their_line(tmp_path: Path, disk: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        _parse(tmp_path, f"name: t\nimage: {{file: img.tar.zst, kind: tar}}\ndisk: {disk}\n")
    assert problem in str(err.value) and "env.yaml:3" in str(err.value), str(err.value)
