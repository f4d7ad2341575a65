"""End to end: a 20-node, 2-rack testbed boots against the real appliance, powered on through IPMI.

Real ipmitool (lanplus) talks to the virtual BMCs from the appliance's namespace; the virtual firmware
goes through DHCP, TFTP and iPXE's DHCP to its per-MAC script. After `down`, no namespace, link,
process or state of the testbed is left.
"""
from __future__ import annotations

import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.inventory import read_bmc_credentials
from vmtestbed.appliance_files import BMC_USER, bmc_password
from vmtestbed.control import Control, ControlError
from vmtestbed.netns import entered
from vmtestbed.plan import make_plan
from vmtestbed.testbed import (
    BACKLOG_SYSCTL,
    NEIGH_SYSCTLS,
    SYSCTLS_SAVED,
    admin_token,
    backlog_needed,
    down,
    ensure_backlog,
    ensure_neighbour_table,
    list_testbeds,
    restore_sysctls,
    start_appliance,
    up,
)
from vmtestbed.topology import existing_namespaces

pytestmark = pytest.mark.netns
NODES, RACKS = 20, 2
BOOT_WAIT_S = 120.0  # a limit on waiting, not a timed assertion: nodes get there in a few seconds


def _ipmitool(ns: str, bmc_ip: str, password: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "ipmitool", "-I", "lanplus", "-H", bmc_ip, "-U", BMC_USER, "-P", password, *args],
        capture_output=True, text=True, timeout=30,
    )


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if text.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def _wait_for(predicate, what: str, limit: float = BOOT_WAIT_S):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.2)


def test_testbed_boots_every_node_to_its_script_and_leaves_nothing_behind() -> None:
    name = f"ci{secrets.token_hex(3)}"
    plan = make_plan(name, NODES, RACKS, post_s="0.2-1", seed=1)
    links_before = _root_links()
    try:
        result = up(plan)
        config = load_config(result.files.config)  # the generated config is valid for the appliance
        assert len(config.inventory) == NODES
        assert {n.rack for n in config.inventory.nodes} == {"r1", "r2"}
        assert all(n.bmc is not None and read_bmc_credentials(n.bmc) == (BMC_USER, bmc_password(plan)) for n in config.inventory.nodes)
        assert len(existing_namespaces(plan.prefix)) == NODES + 3
        for ns in (plan.node_list[0].namespace, plan.fabric_ns):  # IPv4 only: no multicast the rack bridges flood
            with entered(ns):
                assert Path("/proc/sys/net/ipv6/conf/all/disable_ipv6").read_text().strip() == "1"

        start_appliance(plan, result.files)
        password = bmc_password(plan)
        first = plan.node_list[0]

        # Real ipmitool against a virtual BMC, from the appliance's namespace over the management network.
        status = _ipmitool(plan.appliance_ns, first.bmc_ip, password, "power", "status")
        assert status.returncode == 0, status.stderr
        assert "Chassis Power is off" in status.stdout
        bootdev = _ipmitool(plan.appliance_ns, first.bmc_ip, password, "chassis", "bootdev", "pxe")
        assert bootdev.returncode == 0, bootdev.stderr
        with Control(plan.state_dir) as ctl:
            assert ctl.call("status", nodes=[first.name])["nodes"][0]["bootdev"] == "pxe"
        wrong = _ipmitool(plan.appliance_ns, first.bmc_ip, "wrong-password", "power", "status")
        assert wrong.returncode != 0

        for n in plan.node_list:
            on = _ipmitool(plan.appliance_ns, n.bmc_ip, password, "power", "on")
            assert on.returncode == 0, f"{n.name}: {on.stderr}"
        status = _ipmitool(plan.appliance_ns, first.bmc_ip, password, "power", "status")
        assert "Chassis Power is on" in status.stdout

        with Control(plan.state_dir) as ctl:
            def all_at_script() -> list[dict[str, object]] | None:
                nodes = ctl.call("status")["nodes"]
                return nodes if all(n["stage"] == "script" for n in nodes) else None

            nodes = _wait_for(all_at_script, "every node to fetch its per-MAC script")
        assert {n["ip"] for n in nodes} == {n.ip for n in plan.node_list}
        assert nodes[0]["bootdev"] == "default"  # the one-time pxe override was used up by the boot

        # The appliance saw each node fetch the NBP and its own script (its event stream, via its API).
        import json
        import urllib.request

        # A node's stage says "script" as soon as it asks for the script; under load the fetch may still be on
        # its way, so wait for the appliance to have served it.
        request = urllib.request.Request(f"{plan.appliance_url}/api/v1/nodes?events=64", headers={"Authorization": f"Bearer {admin_token(plan)}"})

        def all_served() -> dict[str, list[str]] | None:
            with entered(plan.appliance_ns):
                with urllib.request.urlopen(request, timeout=30) as resp:
                    api = json.load(resp)
            kinds = {node["name"]: [e["kind"] for e in node["events"]] for node in api["nodes"]}
            return kinds if all("nbp_sent" in k and "script_served" in k for k in kinds.values()) else None

        assert len(_wait_for(all_served, "the appliance to have served every node its NBP and script", limit=60)) == NODES

        off = _ipmitool(plan.appliance_ns, first.bmc_ip, password, "power", "off")
        assert off.returncode == 0
        with Control(plan.state_dir) as ctl:
            assert ctl.call("status", nodes=[first.name])["nodes"][0]["stage"] == "off"
    finally:
        down(name)
    assert existing_namespaces(plan.prefix) == []
    assert not plan.state_dir.exists()
    assert _processes_mentioning(str(plan.state_dir)) == []
    assert _root_links() <= links_before


def test_down_removes_a_crashed_testbed() -> None:
    """A testbed whose daemon was killed (and whose state says so) still goes away completely."""
    name = f"ci{secrets.token_hex(3)}"
    plan = make_plan(name, 3, 1)
    try:
        result = up(plan)
        os.kill(result.daemon_pid, 9)
        (plan.state_dir / "state.json").write_text("{not json")  # a crash mid-write
    finally:
        down(name)
    assert existing_namespaces(plan.prefix) == []
    assert not plan.state_dir.exists()


def _ipmi_listeners(ns: str) -> dict[int, set[str]]:
    """pid -> the addresses it listens on for IPMI (UDP 623) inside a namespace."""
    out = subprocess.run(["ip", "netns", "exec", ns, "ss", "-Hulnp", "sport", "=", ":623"], capture_output=True, text=True, check=True).stdout
    found: dict[int, set[str]] = {}
    for line in out.splitlines():
        address = line.split()[3].rsplit(":", 1)[0]
        for pid in (int(p.split(",")[0]) for p in line.split("pid=")[1:]):
            found.setdefault(pid, set()).add(address)
    return found


def test_two_node_daemons_each_serve_their_racks_and_down_stops_both_after_one_was_killed() -> None:
    """--daemons 2: each process binds only its own nodes' BMC addresses, ipmitool reaches nodes of both, the control
    client answers for all of them as one; after one daemon is killed, down still removes everything."""
    name = f"ci{secrets.token_hex(3)}"
    plan = make_plan(name, 6, 3, post_s="0.2-1", seed=1, daemons=2)
    try:
        result = up(plan)
        assert len(set(result.daemon_pids)) == 2
        by_rack = {0: {n.bmc_ip for n in plan.node_list if n.rack in ("r1", "r2")}, 1: {n.bmc_ip for n in plan.node_list if n.rack == "r3"}}
        assert _ipmi_listeners(plan.bmc_ns) == {result.daemon_pids[i]: by_rack[i] for i in (0, 1)}

        start_appliance(plan, result.files)
        password = bmc_password(plan)
        for n in plan.node_list:  # rack r3 is the second daemon's
            on = _ipmitool(plan.appliance_ns, n.bmc_ip, password, "power", "on")
            assert on.returncode == 0, f"{n.name}: {on.stderr}"
        with Control(plan.state_dir) as ctl:
            def all_at_script() -> list[dict[str, object]] | None:
                nodes = ctl.call("status")["nodes"]
                return nodes if all(n["stage"] == "script" for n in nodes) else None

            nodes = _wait_for(all_at_script, "every node of both daemons to fetch its per-MAC script")
            assert [n["name"] for n in nodes] == [n.name for n in plan.node_list]
            status = ctl.call("status")
            assert [(s["pid"], s["nodes"], s["bmcs"]) for s in status["shards"]] == [(result.daemon_pids[0], 4, 4), (result.daemon_pids[1], 2, 2)]
            assert all(s["cpu_s"] > 0 and s["rss"] > 0 for s in status["shards"])
            assert ctl.call("power", nodes=["node-6", "node-1"], action="off")["changed"] == {"node-1": True, "node-6": True}
            stages = [n["stage"] for n in ctl.call("status", nodes=["node-1", "node-5", "node-6"])["nodes"]]
            assert stages[0] == stages[2] == "off" and stages[1] != "off", stages

        os.kill(result.daemon_pids[1], 9)

        def unreachable() -> bool:
            try:
                Control(plan.state_dir).close()
            except ControlError:
                return True
            return False

        _wait_for(unreachable, "the killed daemon's control socket to refuse", limit=10)
    finally:
        down(name)
    assert existing_namespaces(plan.prefix) == []
    assert not plan.state_dir.exists()
    assert _processes_mentioning(str(plan.state_dir)) == []


def test_the_kernel_settings_are_raised_for_big_testbeds_never_lowered_and_put_back() -> None:
    if list_testbeds():
        pytest.skip("another testbed is up: the settings are restored only by the last down")
    thresholds = [NEIGH_SYSCTLS[0] / f"gc_thresh{i}" for i in (1, 2, 3)]
    backlog, neigh = int(BACKLOG_SYSCTL.read_text()), [int(t.read_text()) for t in thresholds]
    try:
        ensure_backlog(backlog + 1000)
        ensure_neighbour_table(neigh[2] + 800)
        assert int(BACKLOG_SYSCTL.read_text()) == backlog + 1000 and SYSCTLS_SAVED.exists()
        assert int(thresholds[2].read_text()) == neigh[2] + 800
        ensure_backlog(backlog + 10)  # a smaller testbed never lowers it
        ensure_neighbour_table(neigh[2] + 8)
        assert int(BACKLOG_SYSCTL.read_text()) == backlog + 1000 and int(thresholds[2].read_text()) == neigh[2] + 800
    finally:
        restore_sysctls()
    assert int(BACKLOG_SYSCTL.read_text()) == backlog and not SYSCTLS_SAVED.exists()
    assert [int(t.read_text()) for t in thresholds] == neigh
    assert backlog_needed(20) == 1000 and backlog_needed(4000) == 80000
