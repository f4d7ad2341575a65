"""Real firmware in QEMU (TCG) network-boots from the appliance: DHCP, the NBP over TFTP, then its per-MAC script.

Two clients, one after the other (the machine has 2 cores): SeaBIOS with QEMU's iPXE ROM on a virtio NIC,
and OVMF's own UEFI PXE client (which fetches snponly.efi over TFTP, whose iPXE then DHCPs again).
Each VM starts powered off (paused, QMP) and is powered on the way a virtual BMC will do it. The proof
is the appliance's own node events, cross-checked on the serial console. Times from power-on are
printed (not asserted: TCG speed depends on the machine's load).
"""
from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import pytest

from ipxe import script_path
from vmtestbed.qemu import QemuError, QemuVm

if TYPE_CHECKING:  # the fixture comes from conftest.py; its types are only needed by type checkers
    from conftest import E2eAppliance, NodeSpec

pytestmark = [pytest.mark.netns, pytest.mark.qemu]

BOOT_TIMEOUT_S = 90.0  # TCG: ~5 s BIOS and ~10 s UEFI when idle; generous for a loaded CI machine
POLL_S = 0.5


def _node(app: "E2eAppliance", name: str) -> "NodeSpec":
    return next(n for n in app.inventory if n.name == name)


async def _wait_for_event(app: "E2eAppliance", vm: QemuVm, kind: str, since: float) -> list[dict[str, Any]]:
    """Poll /api/v1/nodes until the VM's MAC has an event of this kind after `since`; return its events."""
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while True:
        events = [e for e in await asyncio.to_thread(app.events_of, vm.mac) if float(e["ts"]) >= since]
        if any(e["kind"] == kind for e in events):
            return events
        app.assert_alive()
        if not vm.running:
            raise QemuError(f"{vm.name}: QEMU exited before {kind}; events {events}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{vm.name}: no {kind} within {BOOT_TIMEOUT_S:.0f} s of power-on; events: {events}")
        await asyncio.sleep(POLL_S)


def _timeline(events: list[dict[str, Any]], t0: float) -> str:
    return ", ".join(f"{e['kind']} +{float(e['ts']) - t0:.2f}s" for e in events)


def _first(events: list[dict[str, Any]], kind: str, t0: float) -> str:
    ts = [float(e["ts"]) for e in events if e["kind"] == kind]
    return f"{min(ts) - t0:.2f}s" if ts else "-"


async def _boot_once(app: "E2eAppliance", vm: QemuVm, label: str) -> list[dict[str, Any]]:
    """Power the VM on and wait until the appliance saw it fetch its script; print the timings."""
    await vm.power_on()
    t0 = vm.powered_on_at
    assert t0 is not None
    events = await _wait_for_event(app, vm, "script_served", since=t0)
    acks = [float(e["ts"]) - t0 for e in events if e["kind"] == "dhcp_from_firmware"]
    print(f"\n[{label}] power-on -> first firmware DHCP {_first(events, 'dhcp_from_firmware', t0)}, "
          f"NBP {_first(events, 'nbp_sent', t0)}, script {_first(events, 'script_served', t0)} "
          f"(ACKs at {', '.join(f'{a:.2f}s' for a in acks)})\n[{label}] events: {_timeline(events, t0)}")
    return events


async def _diagnose(app: "E2eAppliance", vm: QemuVm, pcap: Any, exc: BaseException) -> str:
    return (f"{exc}\n--- serial tail ---\n{vm.serial_text()[-2500:]}\n--- qemu ---\n{vm.stderr_text()[-800:]}"
            f"\n--- bridge capture ---\n{app.pcap_text(pcap)}\n--- rackboot serve ---\n{app.server_log()[-3000:]}")


async def test_seabios_ipxe_boots_to_its_script(appliance: "E2eAppliance") -> None:
    node = _node(appliance, "node-4")
    vm = QemuVm(name=f"{appliance.lab.prefix}-bios", netns=appliance.fabric_ns, bridge=appliance.bridge, mac=node.mac,
                workdir=appliance.workdir / "vms", firmware="bios", paused=True, timeout_s=300)
    with appliance.capture("qemu-bios") as pcap:
        try:
            await vm.start()
            assert await vm.power_state() == "off"
            events = await _boot_once(appliance, vm, "bios")
            kinds = [e["kind"] for e in events]
            assert kinds.index("dhcp_from_firmware") < kinds.index("script_served")
            # The serial console shows the same boot from the firmware's side: its reservation, then the script.
            await vm.wait_serial(rf"net0: {node.ip}/", 10)
            await vm.wait_serial(script_path(node.mac).replace(".", r"\."), 10)

            # A virtual BMC's power cycle: off (stop + reset), on again, and the node boots once more.
            await vm.power_off()
            assert await vm.power_state() == "off"
            await _boot_once(appliance, vm, "bios, after QMP power cycle")
        except (AssertionError, QemuError, TimeoutError) as exc:
            pytest.fail(await _diagnose(appliance, vm, pcap, exc))
        finally:
            await vm.stop()


async def test_ovmf_uefi_pxe_boots_to_its_script(appliance: "E2eAppliance") -> None:
    node = _node(appliance, "node-5")
    vm = QemuVm(name=f"{appliance.lab.prefix}-uefi", netns=appliance.fabric_ns, bridge=appliance.bridge, mac=node.mac,
                workdir=appliance.workdir / "vms", firmware="uefi", paused=True, no_reboot=True, timeout_s=300)
    with appliance.capture("qemu-uefi") as pcap:
        try:
            await vm.start()
            events = await _boot_once(appliance, vm, "uefi")
            kinds = [e["kind"] for e in events]
            # OVMF's DHCP, the NBP over TFTP, then iPXE's own DHCP and the script, in this order.
            assert "nbp_sent" in kinds, kinds
            first_ack, nbp, script = kinds.index("dhcp_from_firmware"), kinds.index("nbp_sent"), kinds.index("script_served")
            assert first_ack < nbp < script, kinds
            assert "dhcp_from_firmware" in kinds[nbp:script], kinds
            # OVMF reports the NBP it downloaded, then iPXE (snponly.efi) configures its reservation.
            await vm.wait_serial(r"NBP filename is snponly\.efi", 10)
            await vm.wait_serial(r"NBP file downloaded successfully", 10)
            await vm.wait_serial(rf"net0: {node.ip}/", 10)
            await vm.wait_serial(script_path(node.mac).replace(".", r"\."), 10)
        except (AssertionError, QemuError, TimeoutError) as exc:
            pytest.fail(await _diagnose(appliance, vm, pcap, exc))
        finally:
            await vm.stop()
