"""Real machines, as close as this machine allows: QEMU VMs (SeaBIOS and OVMF) deployed with Debian 12 through the whole
workflow, driven over IPMI, ending in the installed system booted from each VM's own disk (issue 10).

The deploy environment (`rackboot build deploy-env`) and the image (`rackboot build image debian12`) are built from
Debian packages once and cached across runs. One BIOS VM and one UEFI VM, each with an empty virtio disk and a
pyghmi BMC that drives it through QMP, are deployed by `rackboot deploy -k` against a real `rackboot serve`:
power on over IPMI into the deploy environment (PXE, iPXE, the deploy kernel over HTTP), GPT with a BIOS boot
partition, an ESP and an ext4 root, the image broadcast and checked, fstab, host name, keys, GRUB for both
firmwares; then a reboot (not kexec: the disk must boot) through the appliance's local-boot profile (iPXE
`sanboot` under SeaBIOS, `exit` to OVMF's next boot option, the removable path EFI/BOOT/BOOTX64.EFI), and the
controller's SSH check finds the environment's stamp. The test then logs in with the user's key and looks at
the installed system: its name, its OS, its root mounted by UUID, and the firmware it booted under.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import pytest

from broadcast.agent_client import load_or_create_key
from realnodes import BMC_PASSWORD, BMC_USER, BUILD_TIMEOUT_S, DEPLOYENV_KEY, rackboot, require_builders
from vmtestbed.bmc import BmcFarm
from vmtestbed.qemu import QemuError, QemuVm
from vmtestbed.qemubmc import QemuPower, serve_bmcs

if TYPE_CHECKING:  # the fixture helpers come from conftest.py
    from conftest import E2eAppliance

pytestmark = [pytest.mark.netns, pytest.mark.qemu]

IMAGE_CACHE = Path(os.environ.get("RACKBOOT_IMAGE_CACHE", "/var/cache/rackboot/images"))
DEPLOY_TIMEOUT_S = 1500.0  # two TCG VMs on two cores: deploy env boot, 1 GB written, GRUB, Debian's boot
VMS = {"node-4": ("bios", 623), "node-5": ("uefi", 624)}  # name -> firmware, BMC port (both on the appliance's address)
DISK_MB = 2048


@pytest.fixture(scope="session")
def debian_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`rackboot build image debian12` (cached across runs); yield the tar.zst (its environment YAML beside it)."""
    require_builders()
    out = tmp_path_factory.mktemp("image") / "debian12.tar.zst"
    t0 = time.monotonic()
    done = rackboot("build", "image", "debian12", "--out", str(out), "--cache-dir", str(IMAGE_CACHE), timeout=BUILD_TIMEOUT_S)
    assert done.returncode == 0, done.stdout + done.stderr
    print(f"\n[image] {done.stdout.strip().splitlines()[0]} ({time.monotonic() - t0:.0f}s)")
    yield out


def _user_key(workdir: Path) -> Path:
    """The deploying user's SSH key pair (rackboot deploy -k installs its public half for root)."""
    key = workdir / "user_key"
    load_or_create_key(key)
    return key


def _prepare(image: Path) -> Any:
    def prepare(app: "E2eAppliance") -> None:
        """Before `rackboot serve`: the test deploy key, node-4/5 with BMCs, the deploy env and the image under http.files."""
        app.state_dir.mkdir(parents=True, exist_ok=True)
        for suffix in ("", ".pub"):
            (app.state_dir / f"deploy_key{suffix}").write_bytes(Path(f"{DEPLOYENV_KEY}{suffix}").read_bytes())
        (app.state_dir / "deploy_key").chmod(0o600)
        creds = app.workdir / "bmc.yaml"
        creds.write_text(f"username: {BMC_USER}\npassword: {BMC_PASSWORD}\n")
        creds.chmod(0o600)
        entries = []
        for n in app.inventory:
            entries.append(f"  - name: {n.name}\n    mac: \"{n.mac}\"\n    ip: {n.ip}\n    rack: r1\n")
            if n.name in VMS:
                entries.append(f"    bmc: {{driver: ipmi, address: \"{app.address}\", port: {VMS[n.name][1]}, credentials: {creds.name}}}\n")
        (app.workdir / "nodes.yaml").write_text("nodes:\n" + "".join(entries))
        with open(app.config_path, "a") as config:
            config.write("deploy:\n  deadlines:\n    kernel_after_script: 300\n    agent_after_kernel: 300\n"
                         "    os_after_script: 600\n    callback_after_os_dhcp: 300\n")
        done = rackboot("build", "deploy-env", "--config", str(app.config_path))
        assert done.returncode == 0, done.stdout + done.stderr
        images = app.files_dir / "images"
        images.mkdir(parents=True, exist_ok=True)
        os.link(image, images / image.name) if image.stat().st_dev == images.stat().st_dev else \
            (images / image.name).write_bytes(image.read_bytes())
        (images / "debian12.yaml").write_text(image.with_suffix("").with_suffix(".yaml").read_text())
    return prepare


@pytest.fixture(scope="module")
def qemu_appliance(deploy_env: dict[str, Any], debian_image: Path, appliance_factory: Any,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator["E2eAppliance"]:
    """A running appliance whose node-4 (BIOS VM) and node-5 (UEFI VM) have IPMI BMCs, with the deploy env and Debian 12."""
    with appliance_factory(tmp_path_factory.mktemp("dpq"), prefix="dpq", before_serve=_prepare(debian_image)) as app:
        yield app


def _cli(app: "E2eAppliance", *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the rackboot CLI in the appliance's namespace (as root on the appliance: the admin token)."""
    return app.run(app.ns, [*app.rackboot_command(), *args, "--config", str(app.config_path)], timeout=timeout)


LOOK = "hostname; . /etc/os-release; echo $PRETTY_NAME; findmnt -no SOURCE,FSTYPE /; cat /proc/cmdline; " \
       "[ -d /sys/firmware/efi ] && echo firmware=uefi || echo firmware=bios; systemctl is-system-running || true"


def _ssh(app: "E2eAppliance", key: Path, ip: str, command: str) -> subprocess.CompletedProcess[str]:
    """Log in as root on a deployed node with the user's key (OpenSSH's client, as a user would)."""
    return app.run(app.ns, ["ssh", "-i", str(key), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                            "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=20", f"root@{ip}", command], timeout=90)


@pytest.mark.timeout(2 * BUILD_TIMEOUT_S + DEPLOY_TIMEOUT_S)  # cold builds run in this test's setup
async def test_bios_and_uefi_vms_deployed_with_debian_boot_from_their_disks(qemu_appliance: "E2eAppliance") -> None:
    app = qemu_appliance
    key = _user_key(app.workdir)
    added = _cli(app, "env", "add", str(app.files_dir / "images/debian12.yaml"), timeout=300)
    assert added.returncode == 0, added.stdout + added.stderr
    nodes = {n.name: n for n in app.inventory}
    vms = {name: QemuVm(name=f"{app.lab.prefix}-{name}", netns=app.fabric_ns, bridge=app.bridge, mac=nodes[name].mac,
                        workdir=app.workdir / "vms", firmware=fw, paused=True, memory_mb=1024,  # type: ignore[arg-type]
                        disk=app.workdir / "vms" / f"{name}.disk", disk_size_mb=DISK_MB, timeout_s=DEPLOY_TIMEOUT_S + 300)
           for name, (fw, _) in VMS.items()}
    farm: BmcFarm | None = None
    try:
        for vm in vms.values():
            await vm.start()
        farm = serve_bmcs(app.ns, [(QemuPower(vms[n]), app.address, port) for n, (_, port) in VMS.items()],
                          {BMC_USER: BMC_PASSWORD}, asyncio.get_running_loop())
        t0 = time.time()
        deploy = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", app.ns, *app.rackboot_command(), "deploy", "-m", "node-[4-5]", "-e", "debian12",
            "-k", f"{key}.pub", "--steps", "BootNewEnv|reboot:0:900", "--json", "--config", str(app.config_path),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=app.cli_env())
        out, err = await asyncio.wait_for(deploy.communicate(), DEPLOY_TIMEOUT_S)
        took = time.time() - t0
        assert deploy.returncode == 0, f"rackboot deploy exited {deploy.returncode}: {out.decode()} {err.decode()}"
        report = json.loads(out)
        assert sorted(report["ok"]) == ["node-4", "node-5"], report

        stats = _cli(app, "stats", "--json", "--deployment", report["id"])
        print(f"\n[deploy-qemu] 2 VMs (BIOS + UEFI, TCG) deployed with Debian 12 in {took:.0f}s; steps: {stats.stdout.strip()[:1500]}")
        for name, (fw, _) in VMS.items():
            # Booted from its disk through the appliance: GRUB's menu entry on the serial console, then Debian.
            await vms[name].wait_serial(r"installed system", 5)
            looked = await asyncio.to_thread(_ssh, app, key, nodes[name].ip, LOOK)
            assert looked.returncode == 0, looked.stderr
            lines = looked.stdout.splitlines()
            assert lines[0] == name, lines  # the host name the post-install set
            assert lines[1].startswith("Debian GNU/Linux 12"), lines
            assert re.match(r"/dev/vda\d+ ext4", lines[2]), lines  # its root on its own disk
            assert "root=UUID=" in lines[3], lines  # booted by our grub.cfg, root by UUID
            assert lines[4] == f"firmware={fw}", lines
            fstab = await asyncio.to_thread(_ssh, app, key, nodes[name].ip, "grep -c ^UUID= /etc/fstab; cat /etc/rackboot/deployed.json")
            assert fstab.stdout.splitlines()[0] == "2", fstab.stdout  # / and /boot/efi by UUID
            assert json.loads(fstab.stdout.splitlines()[1])["env"] == "debian12:1"
    except (AssertionError, QemuError, TimeoutError, json.JSONDecodeError, ValueError, IndexError) as exc:
        tails = "".join(f"\n--- {n} serial tail ---\n{vm.serial_text()[-3000:]}\n--- {n} qemu ---\n{vm.stderr_text()[-500:]}"
                        for n, vm in vms.items())
        pytest.fail(f"{exc}{tails}\n--- rackboot serve ---\n{app.server_log()[-4000:]}")
    finally:
        if farm is not None:
            farm.close()
        for vm in vms.values():
            await vm.stop()
