"""Real machines, as close as this machine allows: QEMU VMs (SeaBIOS and OVMF) deployed with Debian 12 through the whole
workflow, driven over IPMI, ending in the installed system booted from each VM's own disk (issue 10).

The commands are docs/real-hardware.md's, run in its order (paths and node names substituted; the deploy gets
`--steps` so BootNewEnv reboots instead of kexec'ing, and `--json`). The deploy environment (`rackboot build
deploy-env`) and the image (`rackboot build image debian12`) are built from Debian packages once and cached across runs. One BIOS VM and one UEFI VM, each with an empty virtio disk and a
pyghmi BMC that drives it through QMP, are deployed by `rackboot deploy -k` against a real `rackboot serve`:
power on over IPMI into the deploy environment (PXE, iPXE, the deploy kernel over HTTP), GPT with a BIOS boot
partition, an ESP and an ext4 root, the image broadcast and checked, fstab, host name, keys, GRUB for both
firmwares; then a reboot (not kexec: the disk must boot) through the appliance's local-boot profile (iPXE
`sanboot` under SeaBIOS, `exit` to OVMF's next boot option, the removable path EFI/BOOT/BOOTX64.EFI), and the
controller's SSH check finds the environment's stamp. The test then logs in with the user's key and looks at
the installed system: its name, its OS, its root mounted by UUID, and the firmware it booted under.
Second, a whole-disk raw image: the BIOS VM's disk, dumped after a clean power-off and compressed, is deployed
on the UEFI VM (its own table and both bootloaders), which must come back as node-5 with the new environment.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import pytest

from broadcast.agent_client import load_or_create_key
from realnodes import BMC_PASSWORD, BMC_USER, BUILD_TIMEOUT_S, give_vms_bmcs, rackboot, require_builders
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


ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "real-hardware.md"
DOC_CONFIG, DOC_FILES = "/etc/rackboot/rackboot.yaml", "/var/lib/rackboot/files"


def doc_commands() -> list[list[str]]:
    """The commands of docs/real-hardware.md's sh blocks, in order."""
    blocks = re.findall(r"^```sh\n(.*?)^```", DOC.read_text(), re.M | re.S)
    return [shlex.split(line) for block in blocks for line in block.splitlines() if line.strip() and not line.startswith("#")]


def _as_here(app: "E2eAppliance", argv: list[str]) -> list[str]:
    """A documented command with this appliance's config and files, on both VMs."""
    out = []
    for word in argv[1:]:
        word = word.replace(DOC_CONFIG, str(app.config_path)).replace(DOC_FILES, str(app.files_dir))
        out.append("node-[4-5]" if word == "node-4" and argv[1] == "deploy" else word)
    return out


async def _rackboot_in(app: "E2eAppliance", args: list[str], timeout: float) -> tuple[int, str, str]:
    """Run the rackboot CLI in the appliance's namespace as the user of docs/real-hardware.md (HOME with a key)."""
    env = {**app.cli_env(), "HOME": str(app.workdir / "home")}
    proc = await asyncio.create_subprocess_exec("ip", "netns", "exec", app.ns, *app.rackboot_command(), *args,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode(), err.decode()


def _prepare() -> Any:
    def prepare(app: "E2eAppliance") -> None:
        """Before `rackboot serve`: the test deploy key, node-4/5 with BMCs, slow deadlines (TCG), the user's key."""
        give_vms_bmcs(app, {name: port for name, (_, port) in VMS.items()})
        with open(app.config_path, "a") as config:
            config.write("deploy:\n  deadlines:\n    kernel_after_script: 300\n    agent_after_kernel: 300\n"
                         "    os_after_script: 600\n    callback_after_os_dhcp: 300\n    kexec_alive: 180\n")
        # `rackboot deploy -k` takes the user's ~/.ssh/id_*.pub: this test's HOME holds the user's key pair.
        ssh = app.workdir / "home" / ".ssh"
        ssh.mkdir(parents=True)
        key = load_or_create_key(ssh / "id_ed25519")
        assert key is not None
    return prepare


@pytest.fixture(scope="module")
def qemu_appliance(deploy_env: dict[str, Any], debian_image: Path, appliance_factory: Any,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator["E2eAppliance"]:
    """A running appliance whose node-4 (BIOS VM) and node-5 (UEFI VM) have IPMI BMCs, with the deploy env and Debian 12."""
    with appliance_factory(tmp_path_factory.mktemp("dpq"), prefix="dpq", before_serve=_prepare()) as app:
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


@pytest.mark.timeout(2 * BUILD_TIMEOUT_S + 2 * DEPLOY_TIMEOUT_S)  # cold builds run in this test's setup
async def test_bios_and_uefi_vms_deployed_with_debian_boot_from_their_disks(qemu_appliance: "E2eAppliance") -> None:
    app = qemu_appliance
    key = app.workdir / "home" / ".ssh" / "id_ed25519"
    nodes = {n.name: n for n in app.inventory}
    vms = {name: QemuVm(name=f"{app.lab.prefix}-{name}", netns=app.fabric_ns, bridge=app.bridge, mac=nodes[name].mac,
                        workdir=app.workdir / "vms", firmware=fw, paused=True, memory_mb=1024,  # type: ignore[arg-type]
                        disk=app.workdir / "vms" / f"{name}.disk", disk_size_mb=DISK_MB, timeout_s=2 * DEPLOY_TIMEOUT_S + 300)
           for name, (fw, _) in VMS.items()}
    farm: BmcFarm | None = None
    try:
        for vm in vms.values():
            await vm.start()
        farm = serve_bmcs(app.ns, [(QemuPower(vms[n]), app.address, port) for n, (_, port) in VMS.items()],
                          {BMC_USER: BMC_PASSWORD}, asyncio.get_running_loop())
        report: dict[str, Any] = {}
        for argv in doc_commands():
            args = _as_here(app, argv)
            deploying = args[0] == "deploy"
            if deploying:
                args += ["--steps", "BootNewEnv|reboot:0:900", "--json"]
            t0 = time.time()
            rc, out, err = await _rackboot_in(app, args, DEPLOY_TIMEOUT_S if deploying else BUILD_TIMEOUT_S)
            assert rc == 0, f"{' '.join(argv)} exited {rc}: {out[-3000:]} {err[-3000:]}"
            if deploying:
                report = json.loads(out)
                print(f"\n[deploy-qemu] 2 VMs (BIOS + UEFI, TCG) deployed with Debian 12 in {time.time() - t0:.0f}s")
        assert report and sorted(report["ok"]) == ["node-4", "node-5"], report
        print(_step_times(app, report["id"]))
        for name, (fw, _) in VMS.items():
            await _check_installed(app, vms[name], key, nodes[name].ip, name, fw, "debian12:1")

        # A whole-disk raw image: node-4's disk after a clean power-off, deployed on node-5 (UEFI).
        await asyncio.to_thread(_ssh, app, key, nodes["node-4"].ip, "systemctl poweroff")
        assert vms["node-4"].process is not None
        await asyncio.wait_for(vms["node-4"].process.wait(), 120)  # QEMU exits when its guest powers off
        images = app.files_dir / "images"
        t0 = time.time()
        subprocess.run(["zstd", "-q", "-T0", "-3", "-f", str(vms["node-4"].disk), "-o", str(images / "debian12-disk.raw.zst")],
                       check=True, timeout=600)
        (images / "debian12-disk.yaml").write_text(
            "name: debian12-disk\nimage: {file: debian12-disk.raw.zst, kind: raw, compression: zstd}\n"
            "disk: {layout: whole}\nboot: {kind: local}\nkexec: false\n")
        rc, out, err = await _rackboot_in(app, ["env", "add", str(images / "debian12-disk.yaml"), "--config", str(app.config_path)], 300)
        assert rc == 0, out + err
        rc, out, err = await _rackboot_in(app, ["deploy", "-m", "node-5", "-e", "debian12-disk", "-k", "--steps",
                                                "BootNewEnv|reboot:0:900", "--json", "--config", str(app.config_path)], DEPLOY_TIMEOUT_S)
        assert rc == 0, f"raw deployment exited {rc}: {out[-3000:]} {err[-3000:]}"
        raw = json.loads(out)
        assert raw["ok"] == ["node-5"], raw
        print(f"[deploy-qemu] node-5 (UEFI) deployed with a {(images / 'debian12-disk.raw.zst').stat().st_size / 1e6:.0f} MB "
              f"whole-disk raw image ({DISK_MB} MiB written) in {time.time() - t0:.0f}s")
        print(_step_times(app, raw["id"]))
        await _check_installed(app, vms["node-5"], key, nodes["node-5"].ip, "node-5", "uefi", "debian12-disk:1")

        # Last, the default workflow: BootNewEnv kexecs into the installed kernel (no firmware, no bootloader).
        t0 = time.time()
        rc, out, err = await _rackboot_in(app, ["deploy", "-m", "node-5", "-e", "debian12", "-k", "--json", "--config", str(app.config_path)],
                                          DEPLOY_TIMEOUT_S)
        assert rc == 0, f"kexec deployment exited {rc}: {out[-3000:]} {err[-3000:]}"
        kexeced = json.loads(out)
        assert kexeced["ok"] == ["node-5"], kexeced
        steps = json.loads(_cli(app, "stats", "--json", "--deployment", kexeced["id"]).stdout)["steps"]
        assert [(r["step"], r["impl"], r["ok"]) for r in steps if r["step"] == "BootNewEnv"] == [("BootNewEnv", "kexec", True)], steps
        print(f"[deploy-qemu] node-5 redeployed with Debian 12, BootNewEnv by kexec, in {time.time() - t0:.0f}s")
        print(_step_times(app, kexeced["id"]))
        more = await asyncio.to_thread(_ssh, app, key, nodes["node-5"].ip, "hostname; cat /etc/rackboot/deployed.json; cat /proc/cmdline")
        lines = more.stdout.splitlines()
        assert lines[0] == "node-5" and json.loads(lines[1])["env"] == "debian12:1" and "root=UUID=" in lines[2], lines

        # A soft reboot of the stock installed system (no agent in it): its own systemd reboots it, no BMC involved.
        boot_id = (await asyncio.to_thread(_ssh, app, key, nodes["node-5"].ip, "cat /proc/sys/kernel/random/boot_id")).stdout
        restarts = vms["node-5"].serial_text().count("reboot: Restarting system")
        t0 = time.time()
        rc, out, err = await _rackboot_in(app, ["reboot", "-m", "node-5", "--to", "local", "--level", "soft", "--json",
                                                "--config", str(app.config_path)], DEPLOY_TIMEOUT_S)
        assert rc == 0 and json.loads(out)[0]["ok"], out + err
        assert vms["node-5"].serial_text().count("reboot: Restarting system") == restarts + 1  # the kernel's clean restart
        assert "soft reboot impossible" not in app.server_log()
        again = ""
        while time.time() - t0 < 300 and not again:
            seen = await asyncio.to_thread(_ssh, app, key, nodes["node-5"].ip, "cat /proc/sys/kernel/random/boot_id")
            again = seen.stdout if seen.returncode == 0 else ""
        assert again and again != boot_id, (boot_id, again)
        print(f"[deploy-qemu] node-5 soft-rebooted (systemctl over SSH) to its disk and back in SSH in {time.time() - t0:.0f}s")
    except (AssertionError, QemuError, TimeoutError, json.JSONDecodeError, ValueError, IndexError, subprocess.SubprocessError) as exc:
        tails = "".join(f"\n--- {n} serial tail ---\n{vm.serial_text()[-3000:]}\n--- {n} qemu ---\n{vm.stderr_text()[-500:]}"
                        for n, vm in vms.items())
        pytest.fail(f"{exc}{tails}\n--- rackboot serve ---\n{app.server_log()[-4000:]}")
    finally:
        if farm is not None:
            farm.close()
        for vm in vms.values():
            await vm.stop()


def _step_times(app: "E2eAppliance", dep_id: str) -> str:
    """Per node and step: seconds (from `rackboot stats`)."""
    stats = _cli(app, "stats", "--json", "--deployment", dep_id)
    try:
        rows = json.loads(stats.stdout)
    except ValueError:
        return stats.stdout[-1500:]
    return "  " + "; ".join(f"{r['node']} {r['step']}/{r['impl']} {float(r['duration']):.0f}s" for r in rows["steps"])


async def _check_installed(app: "E2eAppliance", vm: QemuVm, key: Path, ip: str, name: str, firmware: str, env: str) -> None:
    """Log in with the user's key: the node booted env from its own disk through GRUB, under its firmware."""
    await vm.wait_serial(r"installed system", 5)  # GRUB's menu entry on the serial console
    looked = await asyncio.to_thread(_ssh, app, key, ip, LOOK)
    assert looked.returncode == 0, looked.stderr
    lines = looked.stdout.splitlines()
    assert lines[0] == name, lines  # the host name the post-install set
    assert lines[1].startswith("Debian GNU/Linux 12"), lines
    assert re.match(r"/dev/vda\d+ ext4", lines[2]), lines  # its root on its own disk
    assert "root=UUID=" in lines[3], lines  # booted by the grub.cfg the post-install wrote, root by UUID
    assert lines[4] == f"firmware={firmware}", lines
    more = await asyncio.to_thread(_ssh, app, key, ip, "grep -c ^UUID= /etc/fstab; cat /etc/rackboot/deployed.json")
    assert more.stdout.splitlines()[0] == "2", more.stdout  # / and /boot/efi by UUID
    assert json.loads(more.stdout.splitlines()[1])["env"] == env
