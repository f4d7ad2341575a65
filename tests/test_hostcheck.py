"""`rackboot check-config --host` on loopback: what it finds missing or taken, and a machine that is ready."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from test_appliance import free_port, write_config


def check(config: Path) -> subprocess.CompletedProcess[str]:
    """Run `rackboot check-config --host`."""
    return subprocess.run([sys.executable, "-m", "appliance.cli", "check-config", "--host", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)


def ready(tmp_path: Path, config: Path) -> None:
    """Give the config what the host check looks for: NBPs, a deploy environment, a deploy key."""
    ipxe = tmp_path / "ipxe"
    ipxe.mkdir()
    for nbp in ("undionly.kpxe", "snponly.efi"):
        (ipxe / nbp).write_bytes(b"nbp")
    files = tmp_path / "state" / "files" / "deploy"
    files.mkdir(parents=True)
    for name in ("vmlinuz", "initrd.img", "localboot-x64.efi"):
        (files / name).write_bytes(b"x")
    (tmp_path / "state" / "deploy_key").write_text("key")
    config.write_text(config.read_text() + f"boot: {{ipxe_dir: {ipxe}}}\nhttp: {{files: {tmp_path / 'state' / 'files'}}}\n")


def test_a_ready_host_passes(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port())
    ready(tmp_path, config)
    done = check(config)
    assert done.returncode == 0, done.stderr
    assert "host: the interface, its address, the NBPs, the deploy environment and the ports are ready" in done.stdout


def test_missing_files_are_warnings_and_a_taken_port_an_error(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        port = squatter.getsockname()[1]
        config = write_config(tmp_path, port)
        config.write_text(config.read_text() + f"boot: {{ipxe_dir: {tmp_path / 'none'}}}\n")
        done = check(config)
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert any(f"error: TFTP port UDP 127.0.0.1:{port}: in use by another program" in line for line in lines), lines
    assert any("error: BIOS NBP undionly.kpxe is neither in" in line for line in lines), lines
    assert any("warning: deploy/vmlinuz, deploy/initrd.img, deploy/localboot-x64.efi not under" in line
               and "rackboot build deploy-env" in line for line in lines), lines
    assert any("warning: no deploy key at" in line for line in lines), lines


def test_an_address_not_on_the_interface_and_a_missing_interface(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port())
    ready(tmp_path, config)
    config.write_text(config.read_text().replace("address: 127.0.0.1/8", "address: 127.0.0.1/16"))
    done = check(config)
    assert done.returncode == 1 and "error: lo does not carry 127.0.0.1/16 (it has: 127.0.0.1/8)" in done.stderr, done.stderr
    config.write_text(config.read_text().replace("interface: lo", "interface: rbnope0"))
    done = check(config)
    assert done.returncode == 1 and "error: interface 'rbnope0' does not exist on this machine" in done.stderr, done.stderr


def test_ipmitool_missing_when_it_is_the_ipmi_client(tmp_path: Path) -> None:
    import os
    import shutil

    config = write_config(tmp_path, free_port())
    ready(tmp_path, config)
    (tmp_path / "bmc.yaml").write_text("username: admin\npassword: secret\n")
    (tmp_path / "nodes.yaml").write_text("nodes:\n  - {name: node-1, mac: '52:54:00:77:00:01', ip: 127.0.0.11,\n"
                                         "     bmc: {driver: ipmi, address: 127.0.0.99, credentials: bmc.yaml}}\n")
    bin_dir = tmp_path / "bin"  # a PATH with `ip` (the interface check) and no ipmitool
    bin_dir.mkdir()
    (bin_dir / "ip").symlink_to(shutil.which("ip") or "/usr/sbin/ip")
    env = os.environ | {"PATH": str(bin_dir)}
    argv = [sys.executable, "-m", "appliance.cli", "check-config", "--host", "--config", str(config)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 1 and "error: ipmitool is not installed" in done.stderr and "node-1" in done.stderr, done.stderr
    config.write_text(config.read_text() + "deploy: {ipmi_client: pyghmi}\n")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0 and "ipmitool" not in done.stderr, done.stderr
