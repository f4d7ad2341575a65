"""The testbed's QEMU VMs, as the node daemon holds them: a QemuVm, the QemuPower its BMC drives, and a status.

`rackboot testbed up --qemu K` plans K VMs after the namespace nodes (vmtestbed.plan). The node daemon, which
already serves every BMC from one pyghmi farm in the BMC namespace, starts each VM paused (powered off) with
its tap on its rack bridge in the fabric namespace, a sparse raw virtio disk and its serial console in
STATE_DIR/qemu/, and adds a VirtualBmc for it at the node's BMC address; `down` stops them (their pid files
are in STATE_DIR/qemu/, and they run in the fabric namespace, which `down` empties anyway).
"""
from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

from vmtestbed.plan import NodePlan, TestbedPlan
from vmtestbed.qemu import QemuError, QemuVm, power_of
from vmtestbed.qemubmc import QemuPower

VM_TIMEOUT_S = 24 * 3600.0  # QEMU runs under timeout(1): a VM forgotten by a crashed daemon dies within a day
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1bc|[\x00-\x08\x0b-\x1f\x7f]")


def vm_of(plan: TestbedPlan, node: NodePlan) -> QemuVm:
    """The QemuVm of a planned VM: paused at start, tap on its rack bridge, disk and logs in the testbed's qemu dir."""
    return QemuVm(
        name=plan.vm_name(node), netns=plan.fabric_ns, bridge=node.rack, mac=node.mac, workdir=plan.qemu_dir,
        firmware=node.firmware,  # type: ignore[arg-type]  # "bios" or "uefi", checked by QemuVm
        tap=node.fabric_if, memory_mb=plan.qemu_memory_mb, paused=True,
        disk=plan.qemu_dir / f"{node.name}.disk", disk_size_mb=plan.qemu_disk_mb, timeout_s=VM_TIMEOUT_S,
        accel=plan.qemu_accel,
    )


def last_line(path: Path, tail: int = 4096) -> str:
    """Return the last non-empty line of a serial log, without terminal control sequences ("" when none)."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - tail))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [_CONTROL.sub("", line).strip() for line in re.split(r"[\r\n]+", data)]
    return next((line for line in reversed(lines) if line), "")


class QemuNode:
    """One VM of the testbed: what the node daemon's control socket and BMC farm act on."""

    def __init__(self, plan: TestbedPlan, node: NodePlan) -> None:
        self.plan = node
        self.name = node.name
        self.vm = vm_of(plan, node)
        self.bmc_side = QemuPower(self.vm)
        self.run_state = "not started"
        self.since = time.time()

    async def start(self) -> None:
        """Start QEMU paused (powered off) with QMP."""
        await self.vm.start()
        self.run_state = "prelaunch"

    async def refresh(self) -> None:
        """Read the run state from QMP (query-status)."""
        try:
            state = await asyncio.wait_for(self.vm.run_state(), 3)
        except (QemuError, TimeoutError, OSError) as exc:
            state = f"unreachable ({exc})" if self.vm.running else "exited"
        if state != self.run_state:
            self.run_state, self.since = state, time.time()

    def power_on(self) -> bool:
        """Power on through QMP (cont)."""
        self.bmc_side.power_on()
        return True

    def power_off(self) -> bool:
        """Power off through QMP (stop + system_reset)."""
        self.bmc_side.power_off()
        return True

    def reset(self) -> bool:
        """Reset through QMP (system_reset)."""
        self.bmc_side.reset()
        return True

    def set_boot_device(self, device: str, persistent: bool) -> None:
        """Remember the boot device (the VM boots its NIC first anyway)."""
        self.bmc_side.set_boot_device(device, persistent)

    def status(self) -> dict[str, Any]:
        """Return the VM's state in the node status form: power from the last QMP read, detail the serial console's last line."""
        n = self.plan
        if self.run_state.startswith("unreachable"):
            power = "?"
        else:
            power = "off" if self.run_state in ("exited", "not started") else power_of(self.run_state)
        return {
            "name": n.name, "mac": n.mac, "ip": n.ip, "rack": n.rack, "bmc": n.bmc_ip, "power": power,
            "stage": f"qemu {self.run_state}", "detail": last_line(self.vm.serial_log), "since": self.since, "boots": 0,
            "bootdev": self.bmc_side.bootdev + (" (persistent)" if self.bmc_side.bootdev_persistent else ""),
            "faults": "", "counters": {}, "history": [], "vm": {"firmware": n.firmware, "pid_file": str(self.vm.pidfile),
                                                              "serial_log": str(self.vm.serial_log)},
        }
