"""The deploy-environment builder's parts that need no root nor network: module order, cpio, input hash, registration."""
from __future__ import annotations

import io
import stat
from pathlib import Path

import libarchive
import pytest
import zstandard

from deployenv import cpio
from deployenv.build import DEFAULT_CACHE, cached
from deployenv.cli import register
from deployenv.inputs import collect, package_data
from deployenv.modules import load_order, module_name
from deployenv.register import RegisterError, config_lines, export, install, read_target

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOeXq3sVY9Gm1FAZP8Q6hnvXqq2UyO9Vf2fkoJ1z3T5u rackboot-deploy"


def test_load_order_puts_dependencies_first_and_reports_missing(tmp_path: Path) -> None:
    dep = tmp_path / "modules.dep"
    dep.write_text(
        "kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz kernel/net/core/failover.ko.xz\n"
        "kernel/drivers/net/net_failover.ko.xz: kernel/net/core/failover.ko.xz\n"
        "kernel/net/core/failover.ko.xz:\n"
        "kernel/fs/ext4/ext4.ko: kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko\n"
        "kernel/fs/mbcache.ko:\nkernel/fs/jbd2/jbd2.ko:\n")
    (tmp_path / "modules.builtin").write_text("kernel/drivers/block/virtio_blk.ko\n")
    order, missing = load_order(("virtio_net", "ext4", "virtio-blk", "nosuch"), dep)
    assert order == ["kernel/net/core/failover.ko.xz", "kernel/drivers/net/net_failover.ko.xz",
                     "kernel/drivers/net/virtio_net.ko.xz", "kernel/fs/mbcache.ko", "kernel/fs/jbd2/jbd2.ko", "kernel/fs/ext4/ext4.ko"]
    assert missing == ["nosuch"]  # virtio_blk is built in: not missing
    assert module_name("kernel/drivers/net/ethernet/intel/e1000e/e1000e.ko.xz") == "e1000e"


def test_cpio_round_trips_files_symlinks_and_console(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "usr/bin/tool").chmod(0o755)
    (root / "bin").symlink_to("usr/bin")
    (root / "init").write_bytes(b"x" * 5)
    out = tmp_path / "initrd.img"
    cpio.pack(root, out, level=3)
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(out.read_bytes())).read()
    entries = {}
    with libarchive.memory_reader(raw) as archive:
        for e in archive:
            entries[e.pathname] = (e.mode, e.linkpath if e.issym else b"".join(e.get_blocks()))
    assert entries["init"][1] == b"xxxxx"
    assert entries["usr/bin/tool"] == (stat.S_IFREG | 0o755, b"#!/bin/sh\necho hi\n")
    assert entries["bin"][1] == "usr/bin"
    assert stat.S_ISCHR(entries["dev/console"][0])
    cpio.pack(root, tmp_path / "again.img", level=3)
    assert (tmp_path / "again.img").read_bytes() == out.read_bytes()  # reproducible


def test_input_hash_follows_keys_and_nothing_else() -> None:
    a, b = collect(KEY, None), collect(KEY + "\n\n", None)
    assert a.digest() == b.digest()
    assert collect(KEY.replace("AAAAIO", "AAAAIP"), None).digest() != a.digest()
    assert collect(KEY, b"private").digest() != a.digest()
    assert any(name == "broadcast/agent.py" for name, _ in a.project)
    assert package_data("init").startswith(b"#!/bin/busybox sh")
    assert b"rackboot-deploy" in package_data("init")  # the vendor class the appliance's DHCP recognizes


def test_cache_hit_needs_every_file(tmp_path: Path) -> None:
    inputs = collect(KEY, None)
    done = tmp_path / inputs.digest()
    done.mkdir()
    (done / "vmlinuz").write_bytes(b"k")
    (done / "initrd.img").write_bytes(b"i")
    (done / "manifest.json").write_text('{"initrd_bytes": 1}')
    assert cached(inputs, tmp_path) is None  # a build from before the UEFI local-boot loader: built again
    (done / "localboot-x64.efi").write_bytes(b"MZ")
    hit = cached(inputs, tmp_path)
    assert hit is not None and hit.cached and hit.initrd == done / "initrd.img"
    assert DEFAULT_CACHE == Path("/var/cache/rackboot/deploy-env")


def test_register_reads_the_config_and_installs_atomically(tmp_path: Path) -> None:
    config = tmp_path / "rackboot.yaml"
    config.write_text("interface: rb0\naddress: 10.77.0.1/24\nstate_dir: state\ninventory: nodes.yaml\n")
    target = read_target(config)
    assert target.files_dir == tmp_path / "state/files" and target.deploy_key == tmp_path / "state/deploy_key"
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(b"kernel")
    initrd.write_bytes(b"initrd")
    localboot = tmp_path / "localboot-x64.efi"
    localboot.write_bytes(b"MZ")
    written = install(kernel, initrd, target, localboot)
    assert [p.read_bytes() for p in written] == [b"kernel", b"initrd", b"MZ"]
    assert written[0] == tmp_path / "state/files/deploy/vmlinuz"
    assert written[2] == tmp_path / "state/files/deploy/localboot-x64.efi"
    outs = export(kernel, initrd, tmp_path / "out")
    assert outs[1].stat().st_ino == initrd.stat().st_ino  # hard link on the same filesystem
    config.write_text("state_dir: s\nhttp: {files: www}\ndeploy: {kernel: ../../etc/x, initrds: [a.img]}\n")
    with pytest.raises(RegisterError, match="outside"):
        install(kernel, initrd, read_target(config))
    assert config_lines() == "deploy:\n  kernel: deploy/vmlinuz\n  initrds: [deploy/initrd.img]\n  local_efi: deploy/localboot-x64.efi\n"


def test_cli_needs_a_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["build", "deploy-env", "--cache-dir", str(tmp_path)])
    assert args.func(args) == 1
    assert "--authorized-keys" in capsys.readouterr().err
