"""What the real-machine e2e tests share: the rackboot CLI, the deploy environment and image builds (cached across
runs), and the QEMU VMs' IPMI BMCs. The `deploy_env` fixture is registered in conftest.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import pytest

from broadcast.agent_client import load_or_create_key

if TYPE_CHECKING:  # conftest.py's
    from conftest import E2eAppliance

DEPLOYENV_CACHE = Path(os.environ.get("RACKBOOT_DEPLOYENV_CACHE", "/var/cache/rackboot/deploy-env"))
DEPLOYENV_KEY = DEPLOYENV_CACHE / "test-deploy-key"  # kept across runs: the key is one of the build's inputs
BUILD_TIMEOUT_S = 1800.0  # cold: mmdebstrap + packing, a few minutes; cached: about a second
REBOOT_TIMEOUT_S = 600.0  # TCG: iPXE downloads the initrd, the kernel unpacks it, python starts
BMC_USER, BMC_PASSWORD = "admin", "deployenv-test"


def rackboot(*args: str, timeout: float = BUILD_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run the rackboot CLI of this checkout; return the finished process (text output)."""
    script = Path(sys.executable).with_name("rackboot")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "appliance.cli"]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=timeout)


def require_builders() -> None:
    """Skip unless this machine can build (root, mmdebstrap) and run (QEMU) what the real-node tests need."""
    if os.geteuid() != 0:
        pytest.skip("building the deploy environment needs root")
    for tool in ("mmdebstrap", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (./setup.sh --test)")


@pytest.fixture(scope="session")
def deploy_env() -> Iterator[dict[str, Any]]:
    """Build the deploy environment with the test deploy key (cached across runs); yield the build's figures."""
    require_builders()
    load_or_create_key(DEPLOYENV_KEY)
    t0 = time.monotonic()
    first = rackboot("build", "deploy-env", "--authorized-keys", f"{DEPLOYENV_KEY}.pub", "--cache-dir", str(DEPLOYENV_CACHE))
    first_s = time.monotonic() - t0
    assert first.returncode == 0, first.stdout + first.stderr
    t0 = time.monotonic()
    again = rackboot("build", "deploy-env", "--authorized-keys", f"{DEPLOYENV_KEY}.pub", "--cache-dir", str(DEPLOYENV_CACHE))
    again_s = time.monotonic() - t0
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing to do" in again.stdout, again.stdout
    digest = again.stdout.split()[2].rstrip(":")
    manifest = json.loads((DEPLOYENV_CACHE / digest / "manifest.json").read_text())
    print(f"\n[deploy-env] first build {first_s:.1f}s ({'cached' if 'nothing to do' in first.stdout else 'cold'}), "
          f"second {again_s:.1f}s; vmlinuz {manifest['kernel_bytes'] / 1e6:.1f} MB, initrd.img "
          f"{manifest['initrd_bytes'] / 1e6:.1f} MB ({manifest['tree_bytes'] / 1e6:.0f} MB unpacked), "
          f"cold build took {manifest['build_seconds']}s")
    yield {"digest": digest, "manifest": manifest}


def give_vms_bmcs(app: "E2eAppliance", bmc_ports: dict[str, int]) -> None:
    """Before `rackboot serve`: the test deploy key as the appliance's (so the deploy environment build is the cached
    one), and an inventory whose nodes named in bmc_ports have an IPMI BMC on the appliance's address at that port."""
    app.state_dir.mkdir(parents=True, exist_ok=True)
    for suffix in ("", ".pub"):
        shutil.copyfile(f"{DEPLOYENV_KEY}{suffix}", app.state_dir / f"deploy_key{suffix}")
    (app.state_dir / "deploy_key").chmod(0o600)
    creds = app.workdir / "bmc.yaml"
    creds.write_text(f"username: {BMC_USER}\npassword: {BMC_PASSWORD}\n")
    creds.chmod(0o600)
    entries = []
    for n in app.inventory:
        entries.append(f"  - name: {n.name}\n    mac: \"{n.mac}\"\n    ip: {n.ip}\n    rack: r1\n")
        if n.name in bmc_ports:
            entries.append(f"    bmc: {{driver: ipmi, address: \"{app.address}\", port: {bmc_ports[n.name]}, "
                           f"credentials: {creds.name}}}\n")
    (app.workdir / "nodes.yaml").write_text("nodes:\n" + "".join(entries))
