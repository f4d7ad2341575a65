"""The deploy environment built from Debian packages boots under QEMU and its agent calls back (issue 10, first step).

`rackboot build deploy-env` builds the kernel and initramfs once per session (cached by input hash across
runs), and a second build with the same inputs, through `--config`, does nothing but install them under the
appliance's http.files. Then the most real path there is without real hardware: a BIOS VM (SeaBIOS + QEMU's
iPXE ROM, virtio NIC) in the e2e namespaces, powered through an IPMI BMC (the vm-testbed's pyghmi BMC,
driving the VM through QMP), and `rackboot reboot -m node-4 --to deploy --level hard` against a real
`rackboot serve`: the appliance expects the node's claim, powers it on over IPMI, serves the deploy profile
over PXE/HTTP, and the reboot ends when the agent in the VM has called back with a claimed token. Last, SSH
with the appliance's deploy key reaches the agent (`status` op and a shell command).
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any, Iterator

import pytest

from realnodes import BMC_PASSWORD, BMC_USER, BUILD_TIMEOUT_S, DEPLOYENV_CACHE as CACHE, REBOOT_TIMEOUT_S
from realnodes import give_vms_bmcs, rackboot as _rackboot
from vmtestbed.bmc import BmcFarm
from vmtestbed.qemu import QemuError, QemuVm
from vmtestbed.qemubmc import QemuPower, serve_bmc

if TYPE_CHECKING:  # the fixture helpers come from conftest.py
    from conftest import E2eAppliance

pytestmark = [pytest.mark.netns, pytest.mark.qemu]

NODE = "node-4"


def _prepare(app: "E2eAppliance") -> None:
    """Before `rackboot serve`: the test deploy key as the appliance's, node-4 with a BMC, the deploy env installed."""
    give_vms_bmcs(app, {NODE: 623})  # its BMC listens on the appliance's own address, in the appliance's namespace
    with open(app.config_path, "a") as config:
        config.write("deploy:\n  deadlines:\n    kernel_after_script: 300\n    agent_after_kernel: 300\n")
    done = _rackboot("build", "deploy-env", "--config", str(app.config_path), "--cache-dir", str(CACHE))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "nothing to do" in done.stdout, f"the same key through --config should hit the cache:\n{done.stdout}"
    assert (app.files_dir / "deploy/vmlinuz").is_file() and (app.files_dir / "deploy/initrd.img").is_file(), done.stdout


@pytest.fixture(scope="module")
def deploy_appliance(deploy_env: dict[str, Any], appliance_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator["E2eAppliance"]:
    """A running appliance whose node-4 has an IPMI BMC and whose files hold the built deploy environment."""
    with appliance_factory(tmp_path_factory.mktemp("dpe"), prefix="dpe", before_serve=_prepare) as app:
        yield app


STATUS = """
import asyncio, json, sys
from broadcast.agent_client import AgentClient
async def main():
    async with AgentClient(sys.argv[1], 22, sys.argv[2], connect_timeout=20) as agent:
        status = await agent.call("status", timeout=30)
        shell = await agent.run("uname -r; cat /proc/cmdline; python3 --version", timeout=30)
    print(json.dumps({"status": status, "shell": shell.stdout, "rc": shell.status}))
asyncio.run(main())
"""


@pytest.mark.timeout(BUILD_TIMEOUT_S + REBOOT_TIMEOUT_S)  # the cold build counts: it runs in this test's setup
async def test_deploy_env_boots_and_its_agent_calls_back(deploy_appliance: "E2eAppliance", deploy_env: dict[str, Any]) -> None:
    app = deploy_appliance
    node = next(n for n in app.inventory if n.name == NODE)
    vm = QemuVm(name=f"{app.lab.prefix}-dpe", netns=app.fabric_ns, bridge=app.bridge, mac=node.mac,
                workdir=app.workdir / "vms", firmware="bios", paused=True, memory_mb=1024, timeout_s=REBOOT_TIMEOUT_S + 120)
    farm: BmcFarm | None = None
    try:
        await vm.start()
        farm = serve_bmc(app.ns, app.address, QemuPower(vm), {BMC_USER: BMC_PASSWORD}, asyncio.get_running_loop())
        t0 = time.time()
        reboot = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", app.ns, *app.rackboot_command(), "reboot", "-m", NODE, "--to", "deploy", "--level", "hard",
            "--config", str(app.config_path), "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=app.cli_env())
        out, err = await asyncio.wait_for(reboot.communicate(), REBOOT_TIMEOUT_S)
        done_s = time.time() - t0
        assert reboot.returncode == 0, f"rackboot reboot exited {reboot.returncode}: {out.decode()} {err.decode()}"
        [result] = json.loads(out)
        assert result["ok"], result

        events = [e for e in await asyncio.to_thread(app.events_of, node.mac) if float(e["ts"]) >= t0]
        kinds = [e["kind"] for e in events]
        assert "agent_up" in kinds, kinds  # the callback was accepted: a claimed token, from the node's address
        on = vm.powered_on_at or t0
        at = {k: min(float(e["ts"]) for e in events if e["kind"] == k) - on for k in set(kinds)}
        await vm.wait_serial(r"rackboot-deploy: network up", 5)
        print(f"\n[deploy-env] power-on -> DHCP {at.get('dhcp_from_firmware', -1):.1f}s, script {at.get('script_served', -1):.1f}s, "
              f"initrd fetched {at.get('initrd_fetched', -1):.1f}s, agent callback {at['agent_up']:.1f}s "
              f"(reboot command {done_s:.1f}s); initrd {deploy_env['manifest']['initrd_bytes'] / 1e6:.0f} MB")

        ssh = await asyncio.to_thread(app.run, app.ns, [sys.executable, "-c", STATUS, node.ip, str(app.state_dir / "deploy_key")], 90)
        assert ssh.returncode == 0, ssh.stderr
        answer = json.loads(ssh.stdout)
        assert answer["status"]["name"] == NODE and answer["status"]["ip"] == node.ip and answer["status"]["state"] == "up", answer
        assert answer["rc"] == 0 and deploy_env["manifest"]["kernel_version"] in answer["shell"], answer
        assert f"rackboot.mac={node.mac}" in answer["shell"], answer
    except (AssertionError, QemuError, TimeoutError, json.JSONDecodeError, ValueError) as exc:
        pytest.fail(f"{exc}\n--- serial tail ---\n{vm.serial_text()[-4000:]}\n--- qemu ---\n{vm.stderr_text()[-800:]}"
                    f"\n--- rackboot serve ---\n{app.server_log()[-3000:]}")
    finally:
        if farm is not None:
            farm.close()
        await vm.stop()
