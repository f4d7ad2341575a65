"""`rackboot build image`'s parts that need no root: the recipe hash, the environment YAML, the cache, --out placement."""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
from pathlib import Path

import pytest

from appliance.catalog import Partition, parse_environment_file
from deployenv.cli import register
from deployenv.image import DEFAULT_CACHE, ImageResult, cached, environment_yaml, export, pack, tree_bytes, yaml_beside
from deployenv.image_recipe import DEBIAN12, IMAGES, ImageRecipe

LAYOUT = (Partition("bios_boot", "1M", "bios_boot"), Partition("esp", "256M", "vfat", "/boot/efi"),
          Partition("root", "rest", "ext4", "/"))
SHA = "ab" * 32


def fake_build(recipe: ImageRecipe, cache_dir: Path, content: bytes = b"not really zstd") -> Path:
    """Put what a finished build leaves in cache_dir/<hash> (a stand-in tar.zst, its YAML, the manifest); return the dir."""
    done = cache_dir / recipe.digest()
    done.mkdir(parents=True)
    (done / f"{recipe.name}.tar.zst").write_bytes(content)
    (done / f"{recipe.name}.yaml").write_text(environment_yaml(recipe, f"{recipe.name}.tar.zst", SHA))
    (done / "manifest.json").write_text(json.dumps({"sha256": SHA, "tar_bytes": len(content), "unpacked_bytes": 3 * len(content),
                                                    "kernel_version": "6.1.0-57-amd64"}))
    return done


def test_the_hash_follows_every_part_of_the_recipe() -> None:
    base = DEBIAN12.digest()
    assert len(base) == 16 and int(base, 16) >= 0
    assert dataclasses.replace(DEBIAN12).digest() == base
    changed = [
        dataclasses.replace(DEBIAN12, packages=DEBIAN12.packages + ("vim",)),
        dataclasses.replace(DEBIAN12, dpkg_excludes=DEBIAN12.dpkg_excludes[1:]),
        dataclasses.replace(DEBIAN12, files=((DEBIAN12.files[0][0], DEBIAN12.files[0][1] + "\n", 0o644), *DEBIAN12.files[1:])),
        dataclasses.replace(DEBIAN12, enable=DEBIAN12.enable[:-1]),
        dataclasses.replace(DEBIAN12, zstd_level=19),
        dataclasses.replace(DEBIAN12, cmdline="ro console=ttyS1"),
        dataclasses.replace(DEBIAN12, layout=DEBIAN12.layout[1:]),
        dataclasses.replace(DEBIAN12, version=DEBIAN12.version + 1),
    ]
    digests = {r.digest() for r in changed}
    assert base not in digests and len(digests) == len(changed)
    assert IMAGES == {"debian12": DEBIAN12}


def test_the_recipe_leaves_out_docs_and_unneeded_modules_but_keeps_drm_and_infiniband() -> None:
    ex = DEBIAN12.dpkg_excludes
    assert "/usr/share/doc/*" in ex and "/usr/share/locale/*" in ex
    for d in ("kernel/sound", "kernel/drivers/media", "kernel/net/wireless", "kernel/drivers/bluetooth"):
        assert f"/lib/modules/*/{d}/*" in ex and f"/usr/lib/modules/*/{d}/*" in ex
    assert not any("gpu" in p or "drm" in p or "infiniband" in p for p in ex)
    assert "grub" not in " ".join(DEBIAN12.packages) and "ifupdown" not in DEBIAN12.packages
    files = {path: text for path, text, _ in DEBIAN12.files}
    assert "Name=en* eth*" in files["etc/systemd/network/80-rackboot-dhcp.network"]
    assert "DHCP=ipv4" in files["etc/systemd/network/80-rackboot-dhcp.network"]
    unit = files["etc/systemd/system/rackboot-ssh-hostkeys.service"]
    assert "Before=ssh.service" in unit and "ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key" in unit
    assert "ExecStart=/usr/bin/ssh-keygen -A" in unit
    assert {"systemd-networkd.service", "ssh.service", "rackboot-ssh-hostkeys.service"} <= set(DEBIAN12.enable)


def test_the_environment_yaml_is_what_the_catalog_reads(tmp_path: Path) -> None:
    (tmp_path / "debian12.tar.zst").write_bytes(b"x")
    text = environment_yaml(DEBIAN12, "debian12.tar.zst", SHA)
    (tmp_path / "debian12.yaml").write_text(text)
    env, source = parse_environment_file(tmp_path / "debian12.yaml", "admin", image_roots=[tmp_path])
    assert source == tmp_path / "debian12.tar.zst"
    assert (env.name, env.version, env.visibility) == ("debian12", 1, "public")
    assert (env.image_kind, env.compression, env.sha256) == ("tar", "zstd", SHA)
    assert env.layout == LAYOUT and env.deploy_partition == "root"
    assert (env.boot_kind, env.cmdline, env.kexec) == ("local", "ro console=tty0 console=ttyS0,115200n8", True)
    assert env.description.startswith("Debian 12 (bookworm) minimal: systemd, systemd-networkd (DHCP)")
    assert text.startswith("name: debian12\nversion: 1\n")
    assert "    - {name: esp, size: 256M, fs: vfat, mount: /boot/efi}\n" in text


def test_the_yaml_goes_beside_the_image_with_the_same_stem(tmp_path: Path) -> None:
    assert yaml_beside(Path("/srv/images/debian12.tar.zst")) == Path("/srv/images/debian12.yaml")
    assert yaml_beside(Path("/srv/images/node.tzst")) == Path("/srv/images/node.yaml")
    assert yaml_beside(Path("img.tar")) == Path("img.yaml")
    assert yaml_beside(Path("img")) == Path("img.yaml")


def test_cache_hit_needs_every_file(tmp_path: Path) -> None:
    assert cached(DEBIAN12, tmp_path) is None
    done = fake_build(DEBIAN12, tmp_path)
    hit = cached(DEBIAN12, tmp_path)
    assert hit is not None and hit.cached and hit.tar == done / "debian12.tar.zst" and hit.manifest["sha256"] == SHA
    (done / "debian12.yaml").unlink()
    assert cached(DEBIAN12, tmp_path) is None
    assert cached(dataclasses.replace(DEBIAN12, zstd_level=3), tmp_path) is None
    assert DEFAULT_CACHE == Path("/var/cache/rackboot/images")


def test_out_puts_the_image_and_a_yaml_pointing_at_it(tmp_path: Path) -> None:
    done = fake_build(DEBIAN12, tmp_path / "cache", b"image bytes")
    result = ImageResult(done, "debian12", DEBIAN12.digest(), True, 0.0, {"sha256": SHA})
    out = tmp_path / "srv/images/node-os.tar.zst"
    tar, yaml_path = export(result, out, DEBIAN12)
    assert (tar, yaml_path) == (out, tmp_path / "srv/images/node-os.yaml")
    assert out.stat().st_ino == result.tar.stat().st_ino  # hard link on the same filesystem
    env, source = parse_environment_file(yaml_path, "admin", image_roots=[yaml_path.parent])
    assert source == out and env.name == "debian12" and env.sha256 == SHA
    assert "image: {file: \"node-os.tar.zst\"," in yaml_path.read_text()
    export(result, out, DEBIAN12)  # again: replaced, not refused
    assert out.read_bytes() == b"image bytes" and not out.with_name(out.name + ".new").exists()


def test_cli_with_a_cached_build_says_nothing_to_do_and_writes_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake_build(DEBIAN12, tmp_path / "cache", b"cached image")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    out = tmp_path / "out/debian12.tar.zst"
    args = parser.parse_args(["build", "image", "debian12", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "already built with these inputs, nothing to do" in printed
    assert f"rackboot env add {tmp_path / 'out/debian12.yaml'}" in printed
    assert out.read_bytes() == b"cached image" and (tmp_path / "out/debian12.yaml").is_file()
    with pytest.raises(SystemExit):
        parser.parse_args(["build", "image", "debian11"])
    assert "invalid choice" in capsys.readouterr().err


def test_pack_keeps_symlinks_and_modes_and_tree_bytes_counts_hard_links_once(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "boot").mkdir(parents=True)
    (root / "dev").mkdir()
    (root / "dev/null-ish").write_text("device nodes are not packed")
    (root / "boot/vmlinuz-6.1").write_bytes(b"k" * 1000)
    (root / "vmlinuz").symlink_to("boot/vmlinuz-6.1")
    (root / "boot/hard").hardlink_to(root / "boot/vmlinuz-6.1")
    (root / "usr/lib/modules/6.1/kernel/drivers/net/can/dev").mkdir(parents=True)
    (root / "usr/lib/modules/6.1/kernel/drivers/net/can/dev/can-dev.ko").write_bytes(b"m")
    (root / "etc").mkdir()
    (root / "etc/machine-id").write_text("")
    (root / "etc/machine-id").chmod(0o444)
    assert tree_bytes(root) == 1000 + len("device nodes are not packed") + 1
    pack(root, tmp_path / "t.tar.zst", 3)
    listing = subprocess.run(["tar", "-I", "zstd", "-tvf", str(tmp_path / "t.tar.zst")], capture_output=True, text=True,
                             check=True).stdout.splitlines()
    names = {line.split()[5]: line for line in listing}
    assert "vmlinuz -> boot/vmlinuz-6.1" in names["vmlinuz"]
    assert names["etc/machine-id"].startswith("-r--r--r--") and names["etc/machine-id"].split()[2] == "0"
    assert "dev/" in names and "dev/null-ish" not in names
    assert "usr/lib/modules/6.1/kernel/drivers/net/can/dev/can-dev.ko" in names  # only the top /dev is left empty
