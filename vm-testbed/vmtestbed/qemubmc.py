"""IPMI BMCs for QEMU VMs: the vm-testbed's pyghmi BMC (bmc.VirtualBmc) driving a VM through QMP.

`QemuPower` is the node side a VirtualBmc acts on (what a namespace node's daemon is for the other nodes):
power on = QMP `cont`, off = `stop` + `system_reset`, reset = `system_reset` (QemuVm), and the boot device
the BMC was told, remembered (the VM boots from its NIC first anyway: bootindex). `serve_bmc` serves one
BMC on an address inside a network namespace, from a thread switched into it (pyroute2 setns), since
pyghmi opens its own sockets.
"""
from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Any, Coroutine, Sequence

from vmtestbed.bmc import IPMI_PORT, BmcFarm
from vmtestbed.qemu import QemuVm


class QemuPower:
    """The node side of a VirtualBmc, for one QEMU VM: power through QMP, the boot device remembered."""

    def __init__(self, vm: QemuVm) -> None:
        self.vm = vm
        self.name = vm.name
        self.power = "off"
        self.bootdev = "default"
        self.bootdev_persistent = False
        self.plan = SimpleNamespace(firmware=vm.firmware)
        self._tasks: set[asyncio.Task[None]] = set()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def power_on(self) -> None:
        """Resume the paused VM."""
        self.power = "on"
        self._spawn(self.vm.power_on())

    def power_off(self) -> None:
        """Stop and reset the VM."""
        self.power = "off"
        self._spawn(self.vm.power_off())

    def reset(self) -> None:
        """Reset the VM."""
        self._spawn(self.vm.power_reset())

    def set_boot_device(self, device: str, persistent: bool) -> None:
        """Remember the next boot device (the VM boots from its NIC anyway)."""
        self.bootdev, self.bootdev_persistent = device, persistent


def serve_bmc(ns: str, address: str, node: QemuPower, users: dict[str, str], loop: asyncio.AbstractEventLoop) -> BmcFarm:
    """Serve node's IPMI BMC on address:623 inside namespace ns; return the farm (close() it to stop)."""
    return serve_bmcs(ns, [(node, address, IPMI_PORT)], users, loop)


def serve_bmcs(ns: str, bmcs: Sequence[tuple[QemuPower, str, int]], users: dict[str, str], loop: asyncio.AbstractEventLoop) -> BmcFarm:
    """Serve each (VM, address, port) BMC inside namespace ns, from one farm; return it (close() it to stop)."""
    made: dict[str, Any] = {}

    def make() -> None:
        from pyroute2.netns import setns

        try:
            setns(ns, flags=0)
            farm = BmcFarm(loop)
            for node, address, port in bmcs:
                farm.add(node, address, users, port=port)  # type: ignore[arg-type]
            farm.wake()
            made["farm"] = farm
        except Exception as exc:  # reported in the caller's thread
            made["error"] = exc

    thread = threading.Thread(target=make, name="bmc-in-netns")
    thread.start()
    thread.join()
    if "error" in made:
        raise made["error"]
    return made["farm"]
