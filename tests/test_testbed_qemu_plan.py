"""The testbed's QEMU VMs in the plan and the generated inventory (unit tier: no namespace, no QEMU)."""
from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.inventory import read_bmc_credentials
from vmtestbed.appliance_files import BMC_USER, QEMU_DEADLINES, bmc_password, write_appliance_files
from vmtestbed.demo import installed_problem, watch_line
from vmtestbed.plan import TestbedPlan as Plan, make_plan
from vmtestbed.qemunodes import last_line, vm_of


def test_vms_come_after_the_namespace_nodes_with_their_own_addresses_and_no_namespace() -> None:
    plan = make_plan("tq", 2, 2, qemu=2, qemu_firmware="mixed", qemu_disk_mb=2048)
    assert [n.name for n in plan.node_list] == ["node-1", "node-2", "node-3", "node-4"]
    assert [n.kind for n in plan.node_list] == ["netns", "netns", "qemu", "qemu"]
    assert [n.rack for n in plan.node_list] == ["r1", "r1", "r2", "r2"]
    assert [n.firmware for n in plan.vms] == ["bios", "uefi"]
    vm = plan.node("node-4")
    assert (vm.mac, vm.ip, vm.bmc_ip, vm.fabric_if, vm.namespace) == ("52:54:00:7b:00:04", "10.78.1.4", "10.79.1.4", "q4", "")
    assert plan.namespaces == ["rbt-tq-fabric", "rbt-tq-appliance", "rbt-tq-bmc", "rbt-tq-node-1", "rbt-tq-node-2"]
    assert [n.name for n in plan.netns_nodes] == ["node-1", "node-2"]
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.vms == plan.vms


def test_vm_only_plans_and_their_limits() -> None:
    plan = make_plan("tq", 0, 1, qemu=1)
    assert [(n.name, n.kind, n.rack, n.firmware) for n in plan.node_list] == [("node-1", "qemu", "r1", "bios")]
    assert plan.namespaces == ["rbt-tq-fabric", "rbt-tq-appliance", "rbt-tq-bmc"]
    with pytest.raises(ValueError, match="racks would be empty"):
        make_plan("tq", 0, 2, qemu=1)
    with pytest.raises(ValueError):
        make_plan("tq", 0, 1)
    with pytest.raises(ValueError):
        make_plan("tq", 1, 1, qemu=1, qemu_firmware="coreboot")
    with pytest.raises(ValueError):
        make_plan("tq", 1, 1, qemu=1, qemu_disk_mb=512)


def test_vm_is_started_paused_on_its_rack_bridge_with_its_disk_in_the_state_dir() -> None:
    plan = make_plan("tq", 1, 1, qemu=1, qemu_disk_mb=2048)
    vm = vm_of(plan, plan.node("node-2"))
    argv = vm.command()
    assert vm.paused and "-S" in argv and vm.netns == "rbt-tq-fabric" and vm.bridge == "r1" and vm.tap == "q2"
    assert argv[argv.index("-m") + 1] == "1024" and "tcg,tb-size=64" in argv
    assert vm.disk == plan.qemu_dir / "node-2.disk" and vm.disk_size_mb == 2048
    assert argv[argv.index("-name") + 1] == "rbt-tq-node-2"  # the testbed's prefix: `down` recognises a leftover QEMU
    assert vm.serial_log.parent == plan.state_dir / "qemu"


def test_mixed_vms_go_round_bios_uefi_pxe_and_uefi_http_boot() -> None:
    plan = make_plan("tq", 0, 1, qemu=3, qemu_firmware="mixed")
    vms = [vm_of(plan, plan.node(f"node-{i}")) for i in (1, 2, 3)]
    assert [vm.firmware for vm in vms] == ["bios", "uefi", "uefi-http"]
    bios, pxe, http = (vm.command() for vm in vms)
    assert "-bios" not in bios and "-fw_cfg" not in bios
    assert "-bios" in pxe and "-fw_cfg" not in pxe  # OVMF, its UEFI PXE client first
    # OVMF with both PXE clients off: HTTPv4 is the NIC's first boot option (field notes)
    assert "-bios" in http and "name=opt/org.tianocore/IPv4PXESupport,string=no" in http
    assert "name=opt/org.tianocore/IPv6PXESupport,string=no" in http


def test_inventory_lists_vms_like_the_other_nodes(tmp_path: Path) -> None:
    plan = make_plan("tq", 3, 2, qemu=2)
    files = write_appliance_files(plan, tmp_path)
    config = load_config(files.config)
    nodes = {n.name: n for n in config.inventory.nodes}
    assert sorted(nodes) == [f"node-{i}" for i in range(1, 6)]
    for p in plan.node_list:
        n = nodes[p.name]
        assert (str(n.mac), str(n.ip), n.rack) == (p.mac, p.ip, p.rack)
        assert n.bmc is not None and n.bmc.address == p.bmc_ip
        assert read_bmc_credentials(n.bmc) == (BMC_USER, bmc_password(plan))
        assert ("qemu" in n.tags) == p.is_vm
    # TCG VMs get the slow boot deadlines; a testbed without VMs keeps the short ones.
    assert {k: config.deploy.deadlines[k] for k in QEMU_DEADLINES} == QEMU_DEADLINES
    plain = load_config(write_appliance_files(make_plan("tp", 2, 1), tmp_path / "plain").config)
    assert "agent_after_kernel" not in plain.deploy.deadlines


def test_installed_check_wants_the_node_name_and_the_debian12_stamp() -> None:
    good = 'node-3\n{"env": "debian12:1", "sha256": "ab"}\n'
    assert installed_problem(good, "node-3") == ""
    assert "not 'node-3'" in installed_problem('debian12\n{"env": "debian12:1"}', "node-3")
    assert "not JSON" in installed_problem("node-3\ncat: /etc/rackboot/deployed.json: No such file", "node-3")
    assert "sample:1" in installed_problem('node-3\n{"env": "sample:1"}', "node-3")
    assert installed_problem("", "node-3")


def test_watch_line_counts_namespace_nodes_and_shows_each_vms_console(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    log.write_bytes(b"SeaBIOS\r\n\x1b[2J\x1b[1;1HiPXE 1.0 -- Open Source\r\nhttp://10.78.0.1:8080/boot ok\r\n\r\n")
    assert last_line(log) == "http://10.78.0.1:8080/boot ok"
    assert last_line(tmp_path / "none.log") == ""
    nodes = [{"name": "node-1", "stage": "os", "detail": ""}, {"name": "node-2", "stage": "os", "detail": ""},
             {"name": "node-3", "stage": "qemu running", "detail": last_line(log)}]
    assert watch_line(nodes) == "os 2, node-3 running: http://10.78.0.1:8080/boot ok"
