"""`rackboot demo --qemu 1 --nodes 2`: a BIOS QEMU VM deployed with Debian 12 beside two namespace nodes, end to end.

The demo builds its testbed with one VM (SeaBIOS, 1024 MiB, 4 GiB sparse disk, a pyghmi BMC driving it through
QMP in the node daemon), builds (cached) the deploy environment with the testbed appliance's config and the
debian12 image, deploys the sample environment on the namespace nodes and debian12 on the VM (-k, BootNewEnv
by reboot), logs in to the VM with OpenSSH, and tears everything down. The `deploy_env` fixture builds the
deploy environment with the test deploy key first, which the demo's appliance then uses: its build is a cache hit.
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from realnodes import BUILD_TIMEOUT_S, require_builders
from vmtestbed.plan import STATE_ROOT
from vmtestbed.topology import existing_namespaces

pytestmark = [pytest.mark.netns, pytest.mark.qemu]

DEMO_TIMEOUT_S = 900.0  # measured about 4 minutes with cached builds (docs/testbed.md)


def _processes_with(word: str) -> list[str]:
    """Command lines of running processes that contain word."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if word in text:
            found.append(text)
    return found


@pytest.mark.timeout(BUILD_TIMEOUT_S + DEMO_TIMEOUT_S)
def test_demo_deploys_a_bios_vm_beside_two_namespace_nodes_and_removes_everything(deploy_env: dict[str, Any]) -> None:
    require_builders()
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "appliance.cli", "demo", "--qemu", "1", "--nodes", "2"],
                          capture_output=True, text=True, timeout=DEMO_TIMEOUT_S)
    took = time.monotonic() - t0
    out = done.stdout
    print(f"\n[demo-qemu] {took:.0f}s\n{out}")
    m = re.search(r"testbed (demo[0-9a-f]{6})", out)
    assert m, out + done.stderr
    name = m.group(1)
    lines = out.strip().splitlines()
    assert lines[-1] == "deployed 3/3 nodes", out[-6000:] + done.stderr[-3000:]
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ssh root@10.78.1.3 (node-3): hostname node-3, /etc/rackboot/deployed.json env debian12:" in out  # the VM, over SSH
    assert "ok: node-[1-2]" in out  # the namespace nodes' sample deployment
    # Torn down: no namespace, no state, no QEMU or daemon left.
    assert existing_namespaces(f"rbt-{name}-") == []
    assert not (STATE_ROOT / name).exists()
    assert _processes_with(f"rbt-{name}-") == [] and _processes_with(str(STATE_ROOT / name)) == []
