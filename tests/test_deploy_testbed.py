"""End to end: real deployments on the vm-testbed through the appliance's API and CLI.

20 virtual nodes in 2 racks, one whose BMC never answers and one that never comes back from a reboot.
The deployment powers the nodes on over IPMI, they PXE/iPXE-boot the deploy environment, the real
deploy agents (broadcast.agent) partition their disks, receive the image through the chain, run the
post-install, kexec into the installed system and call back with their one-time token. Healthy nodes
must succeed; the faulty ones must be reported with the step and the reason. Rights and one-time
tokens are checked on the same appliance. Then the chain and the tree broadcasts, each with a node
powered off while the image is on its way.
"""
from __future__ import annotations

import json
import re
import secrets
import subprocess
import threading
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Iterator

import pytest

from vmtestbed.appliance_files import write_sample_environment
from vmtestbed.control import Control
from vmtestbed.demo import rackboot_cli
from vmtestbed.faults import assign_faults, parse_faults
from vmtestbed.netns import entered
from vmtestbed import plan as testbed_plan
from vmtestbed.plan import make_plan
from vmtestbed.testbed import admin_token, down, start_appliance, up

pytestmark = [pytest.mark.netns, pytest.mark.timeout(600)]
FAULTS = "noreturn=0.05,bmcdead=0.05"


def api(plan: testbed_plan.TestbedPlan, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    """Call the appliance from its namespace; return (status, decoded JSON)."""
    headers = {"Content-Type": "application/json"}
    token = admin_token(plan) if token is None else token
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(plan.appliance_url + path, data=None if body is None else json.dumps(body).encode(),
                                 method=method, headers=headers)
    with entered(plan.appliance_ns):
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.load(resp)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")


def cli(plan: testbed_plan.TestbedPlan, *argv: str, timeout: float = 420) -> subprocess.CompletedProcess[str]:
    """Run the rackboot CLI as the admin, from the appliance's namespace."""
    return subprocess.run(rackboot_cli(plan, *argv), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def testbed(tmp_path: Path) -> Iterator[testbed_plan.TestbedPlan]:
    """A 20-node testbed with its appliance up and the sample environment in the catalog."""
    name = f"cd{secrets.token_hex(3)}"
    plan = make_plan(name, 20, 2, post_s="0.2-1", faults=FAULTS, seed=3)
    try:
        result = up(plan)
        start_appliance(plan, result.files)
        added = cli(plan, "env", "add", str(write_sample_environment(tmp_path / "env", size_mib=2)))
        assert added.returncode == 0, added.stderr
        yield plan
    finally:
        down(name)


def node_token(ctl: Control, node: str) -> str:
    """The one-time token a node got on its kernel command line (the firmware keeps what it booted)."""
    history = ctl.call("status", nodes=[node], history=True)["nodes"][0]["history"]
    for entry in reversed(history):
        m = re.search(r"rackboot\.token=(\S+)", entry["detail"])
        if m:
            return m.group(1)
    return ""


def test_deployment_with_faulty_nodes_rights_and_tokens(testbed: testbed_plan.TestbedPlan) -> None:
    plan = testbed
    faults = assign_faults(parse_faults(FAULTS), [n.name for n in plan.node_list], plan.seed)
    noreturn = next(n for n, f in faults.items() if f.noreturn)
    bmcdead = next(n for n, f in faults.items() if f.bmc_dead)
    assert noreturn != bmcdead

    # Rights: a user with deploy rights on rack r1 only cannot deploy on the whole set.
    status, alice = api(plan, "POST", "/api/v1/users", {"name": "alice"})
    assert status == 201, alice
    assert api(plan, "POST", "/api/v1/users/alice/rights", {"nodes": "node-[1-10]", "perms": ["deploy"]})[0] == 200
    status, refused = api(plan, "POST", "/api/v1/deployments", {"nodes": "node-[1-20]", "env": "sample"}, token=alice["token"])
    assert status == 403, refused
    assert api(plan, "POST", "/api/v1/deployments", {"nodes": "node-[1-20]", "env": "sample"}, token="not-a-token")[0] == 401

    # Tokens: while the deployment runs, a callback for node-2 carrying node-1's one-time token is refused.
    forged: dict[str, int] = {}

    def forge() -> None:
        with Control(plan.state_dir) as ctl:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not (token := node_token(ctl, "node-1")):
                time.sleep(0.2)
        node2 = plan.node("node-2").mac.replace(":", "-")
        body = {"stage": "agent_up", "status": "ok", "token": token}
        for label, tok in (("other node's token", token), ("no token", "")):
            req = urllib.request.Request(f"{plan.appliance_url}/callback/{node2}", data=json.dumps({**body, "token": tok}).encode(),
                                         method="POST", headers={"Content-Type": "application/json"})
            with entered(plan.appliance_ns):
                try:
                    with urllib.request.urlopen(req, timeout=30) as resp:
                        forged[label] = resp.status
                except urllib.error.HTTPError as exc:
                    forged[label] = exc.code

    forger = threading.Thread(target=forge)
    forger.start()
    out = cli(plan, "deploy", "-m", "node-[1-20]", "-e", "sample", "--broadcast", "chain", "--json")
    forger.join()
    assert out.returncode == 2, out.stderr  # some nodes failed: the distinct exit status
    report = json.loads(out.stdout)
    ko = {k["node"]: k for k in report["ko"]}
    assert set(ko) == {noreturn, bmcdead}, report["ko"]
    assert len(report["ok"]) == 18
    assert forged == {"other node's token": 403, "no token": 403}

    # The dead BMC: the node could never be rebooted into the deploy environment.
    assert ko[bmcdead]["step"] == "SetDeploymentEnv"
    assert "BMC" in ko[bmcdead]["reason"] and "reboot failed" in ko[bmcdead]["reason"], ko[bmcdead]
    # The node that never reboots: it got the image, then never came back into the installed system,
    # seen from the boot services (no DHCP after the reboot), not from the end of a step timeout.
    assert ko[noreturn]["step"] == "BootNewEnv"
    assert "no DHCP" in ko[noreturn]["reason"], ko[noreturn]

    # The per-node timeline from the CLI: a bar for each node's stays, the two failures marked with their reasons.
    svg = plan.state_dir / "timeline.svg"
    drawn = cli(plan, "stats", "--deployment", report["id"], "--svg", str(svg))
    assert drawn.returncode == 0, drawn.stderr
    root = ET.fromstring(svg.read_text())
    rects = list(root.iter("{http://www.w3.org/2000/svg}rect"))
    assert {r.get("data-state") for r in rects if r.get("class") == "stay"} == {"SetDeploymentEnv", "BroadcastEnv", "BootNewEnv"}
    assert len([r for r in rects if r.get("class") == "failed"]) == 2

    # Every healthy node runs the installed system it reported, the image's files on its deploy partition.
    with Control(plan.state_dir) as ctl:
        nodes = {n["name"]: n for n in ctl.call("status")["nodes"]}
    for name in report["ok"]:
        assert nodes[name]["stage"] == "running" and nodes[name]["detail"] == "installed system: sample:1", nodes[name]
        root = plan.state_dir / "nodes" / name / "root"
        assert (root / "etc/rackboot-release").read_text() == "sample:1\n"  # the post-install ran
        assert json.loads((root / "etc/rackboot/deployed.json").read_text())["env"] == "sample:1"

    # Commands run on the deployed nodes through the tree (their installed systems' agents have no tree key,
    # so each level hands its children back to the appliance), identical outputs grouped.
    ok_set = report["ok_nodeset"]
    ran = cli(plan, "exec", "-m", ok_set, "--json", "--", 'cat "$RACKBOOT_WORKDIR/root/etc/rackboot-release"', timeout=120)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    grouped = json.loads(ran.stdout)["grouped"]
    assert [(names, r["stdout"]) for names, r in grouped] == [(ok_set, "sample:1\n")]

    # The per-node stats and the deployment record agree with the report.
    status, stats = api(plan, "GET", f"/api/v1/stats?deployment={report['id']}")
    assert status == 200
    assert {r["node"] for r in stats["steps"] if not r["ok"]} >= {noreturn, bmcdead}


@pytest.mark.parametrize("method", ["chain", "tree"])
def test_broadcast_with_a_node_killed_midway(tmp_path: Path, method: str) -> None:
    name = f"cd{secrets.token_hex(3)}"
    plan = make_plan(name, 6, 2, post_s="0.2", link_mbit=100, seed=1)
    try:
        result = up(plan)
        start_appliance(plan, result.files)
        # 24 MiB through 100 Mbit/s links takes ~2 s per hop: time to kill a node while the image flows.
        assert cli(plan, "env", "add", str(write_sample_environment(tmp_path / "env", size_mib=24))).returncode == 0
        victim = "node-2"

        def kill_when_broadcasting() -> None:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                status, dep = api(plan, "GET", "/api/v1/deployments")
                running = [d for d in dep.get("deployments", []) if d.get("status") == "running"]
                if running:
                    status, one = api(plan, "GET", f"/api/v1/deployments/{running[0]['id']}")
                    if any(n["node"] == victim and n["state"] == "BroadcastEnv" for n in one.get("nodes", [])):
                        time.sleep(0.5)
                        with Control(plan.state_dir) as ctl:
                            ctl.call("power", nodes=[victim], action="off")
                        return
                time.sleep(0.1)

        killer = threading.Thread(target=kill_when_broadcasting)
        killer.start()
        out = cli(plan, "deploy", "-m", "node-[1-6]", "-e", "sample", "--broadcast", method, "--json")
        killer.join()
        report = json.loads(out.stdout)
        ko = {k["node"]: k for k in report["ko"]}
        assert set(ko) == {victim}, report["ko"]
        assert ko[victim]["step"] == "BroadcastEnv", ko[victim]
        # The others got every byte around the dead node (the chain resumes past it from the acked offset).
        for n in report["ok"]:
            assert (plan.state_dir / "nodes" / n / "root/usr/share/rackboot-sample/payload.bin").stat().st_size == 24 << 20
        assert sorted(report["ok"]) == sorted(n.name for n in plan.node_list if n.name != victim)
    finally:
        down(name)


def test_broadcast_with_a_node_that_hangs_midway(tmp_path: Path) -> None:
    """The die@broadcast fault: a node's kernel hangs with the image half received. Unlike a power cut, nothing
    resets its connections: the node before it in the chain finds out by its own timeouts, and goes on past it."""
    name = f"cd{secrets.token_hex(3)}"
    spec = "die=0.17@broadcast"  # one node of 6
    plan = make_plan(name, 6, 2, post_s="0.2", link_mbit=100, faults=spec, seed=1)
    victim = next(n for n, f in assign_faults(parse_faults(spec), [n.name for n in plan.node_list], plan.seed).items() if f.die_stage)
    try:
        result = up(plan)
        start_appliance(plan, result.files)
        assert cli(plan, "env", "add", str(write_sample_environment(tmp_path / "env", size_mib=24))).returncode == 0
        out = cli(plan, "deploy", "-m", "node-[1-6]", "-e", "sample", "--broadcast", "chain", "--json")
        report = json.loads(out.stdout)
        ko = {k["node"]: k for k in report["ko"]}
        assert set(ko) == {victim}, report["ko"]
        assert ko[victim]["step"] == "BroadcastEnv", ko[victim]
        with Control(plan.state_dir) as ctl:
            dead = ctl.call("status", nodes=[victim])["nodes"][0]
        assert dead["stage"] == "dead" and "mid-broadcast" in dead["detail"], dead
        for n in report["ok"]:
            assert (plan.state_dir / "nodes" / n / "root/usr/share/rackboot-sample/payload.bin").stat().st_size == 24 << 20
    finally:
        down(name)
