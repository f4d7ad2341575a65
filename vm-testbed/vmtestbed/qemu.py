"""Real QEMU virtual machines that network-boot from a bridge inside a namespace, powered through QMP.

A `QemuVm` is one x86_64 VM with one virtio-net NIC on a tap device. The tap is created in the namespace
that holds the bridge, and QEMU runs in that same namespace (`ip netns exec`): a tap can only be opened
from the namespace it lives in. QEMU runs under KVM when a probe shows KVM runs our firmware, else under TCG
with a capped translation cache (vmtestbed.accel; on these machines KVM does not: see the field notes), always
under a hard `timeout`, and is killed on `stop()`.

Firmware: ``bios`` is SeaBIOS with QEMU's own iPXE option ROM on the NIC; ``uefi`` is OVMF with the NIC's
option ROM disabled (``romfile=``) so OVMF's own UEFI PXE client boots; ``uefi-http`` is OVMF with its PXE
clients switched off through fw_cfg, so its UEFI HTTP boot client is the NIC's first boot option (field notes).

Power: started with ``paused=True`` the VM is created stopped (``-S``, QMP on a unix socket), which a
virtual BMC reads as "powered off"; `power_on()` is QMP ``cont``, `power_reset()` ``system_reset``,
`power_off()` ``stop`` + ``system_reset``, `power_state()` ``query-status``. A paused VM runs without
``-no-reboot`` by default (measured: with it, QMP ``system_reset`` makes QEMU exit), so a guest reboot reboots.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid as uuidlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vmtestbed.accel import ACCELS, OVMF_FD, AccelChoice, choose_accel

QEMU_BINARY = "qemu-system-x86_64"
Firmware = Literal["bios", "uefi", "uefi-http"]
FIRMWARES = ("bios", "uefi", "uefi-http")
# OVMF's knobs (Debian's OVMF 2022.11): with both PXE clients off, the NIC's first boot option is HTTPv4. Leaving
# IPv6 PXE on costs minutes of stalling before HTTP boot is tried.
UEFI_HTTP_FW_CFG = ("-fw_cfg", "name=opt/org.tianocore/IPv4PXESupport,string=no",
                    "-fw_cfg", "name=opt/org.tianocore/IPv6PXESupport,string=no")
# QEMU run states that mean "the guest is not executing" as a BMC reports power.
_OFF_STATES = frozenset({"prelaunch", "paused", "shutdown", "suspended", "guest-panicked", "internal-error", "io-error"})
# Run states from which `cont` is refused until the machine is reset.
_NEEDS_RESET = frozenset({"shutdown", "guest-panicked", "internal-error"})


def power_of(run_state: str) -> str:
    """Return 'on' or 'off' as a BMC reports it, for a QEMU run state (query-status)."""
    return "off" if run_state in _OFF_STATES else "on"


class QemuError(RuntimeError):
    """QEMU could not be started, died, or refused a QMP command."""


class QmpClient:
    """A small asyncio client of the QEMU Machine Protocol over a unix socket (one command at a time)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.events: deque[dict[str, Any]] = deque(maxlen=256)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()
        self._ids = itertools.count(1)

    async def connect(self, timeout: float = 10.0) -> dict[str, Any]:
        """Connect (retrying until QEMU has created the socket), negotiate capabilities, return the greeting."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._reader, self._writer = await asyncio.open_unix_connection(str(self.path), limit=1 << 20)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise QemuError(f"no QMP socket at {self.path} after {timeout:.0f} s") from None
                await asyncio.sleep(0.05)
        greeting = await asyncio.wait_for(self._read_message(), timeout)
        if "QMP" not in greeting:
            raise QemuError(f"unexpected QMP greeting: {greeting}")
        await self.execute("qmp_capabilities", timeout=timeout)
        return greeting

    async def _read_message(self) -> dict[str, Any]:
        assert self._reader is not None
        line = await self._reader.readline()
        if not line:
            raise QemuError("QMP connection closed by QEMU")
        message: dict[str, Any] = json.loads(line)
        return message

    async def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        """Run one QMP command and return its 'return' value; asynchronous events are kept in `events`."""
        if self._writer is None:
            raise QemuError("QMP client is not connected")
        async with self._lock:
            ident = next(self._ids)
            request: dict[str, Any] = {"execute": command, "id": ident}
            if arguments:
                request["arguments"] = arguments
            self._writer.write(json.dumps(request).encode() + b"\r\n")
            await self._writer.drain()
            async with asyncio.timeout(timeout):
                while True:
                    message = await self._read_message()
                    if "event" in message:
                        self.events.append(message)
                        continue
                    if message.get("id") != ident:
                        continue
                    if "error" in message:
                        err = message["error"]
                        raise QemuError(f"QMP {command}: {err.get('class')}: {err.get('desc')}")
                    return message.get("return")

    async def close(self) -> None:
        """Close the connection (QEMU keeps running)."""
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await self._writer.wait_closed()
        self._reader = self._writer = None


def create_tap(netns: str, tap: str, bridge: str) -> None:
    """Create a persistent tap in a namespace, enslave it to the bridge there and bring it up."""
    # `ip -n` switches into the namespace for the TUNSETIFF/TUNSETPERSIST ioctls; plain commands (not
    # pyroute2's sync API) so this also works from a thread while an event loop runs elsewhere.
    for argv in (["tuntap", "add", "dev", tap, "mode", "tap"], ["link", "set", tap, "master", bridge, "up"]):
        done = subprocess.run(["ip", "-n", netns, *argv], capture_output=True, text=True)
        if done.returncode != 0:
            raise QemuError(f"ip -n {netns} {' '.join(argv)}: {done.stderr.strip()}")


def delete_tap(netns: str, tap: str) -> None:
    """Delete a tap (a no-op when it or its namespace is already gone)."""
    subprocess.run(["ip", "-n", netns, "link", "del", tap], capture_output=True)


@dataclass
class QemuVm:
    """One QEMU/TCG virtual machine that PXE-boots from a bridge in a namespace."""

    name: str
    netns: str
    bridge: str
    mac: str
    workdir: Path
    firmware: Firmware = "bios"
    uuid: str = field(default_factory=lambda: str(uuidlib.uuid4()))
    tap: str = ""
    memory_mb: int = 0
    paused: bool = False
    no_reboot: bool | None = None
    timeout_s: float = 600.0
    machine: str = "pc"
    extra_args: tuple[str, ...] = ()
    # A virtio disk (raw, sparse; made at start when missing): booted after the NIC, as on a node that keeps PXE first
    # in its boot order and is sent to its disk by the appliance's local-boot profile.
    disk: Path | None = None
    disk_size_mb: int = 4096
    # "auto": KVM when a probe shows it runs our firmware (vmtestbed.accel), else TCG; or "kvm" / "tcg".
    accel: str = "auto"

    process: asyncio.subprocess.Process | None = field(default=None, init=False, repr=False)
    qmp: QmpClient | None = field(default=None, init=False, repr=False)
    started_at: float | None = field(default=None, init=False)
    powered_on_at: float | None = field(default=None, init=False)
    accel_choice: AccelChoice = field(default=AccelChoice("tcg", "not started"), init=False)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        if self.firmware not in FIRMWARES:
            raise ValueError(f"firmware must be one of {', '.join(FIRMWARES)}, not {self.firmware!r}")
        if self.accel not in ACCELS:
            raise ValueError(f"accel must be one of {', '.join(ACCELS)}, not {self.accel!r}")
        if not self.tap:
            self.tap = ("tap" + re.sub(r"[^0-9a-zA-Z]", "", self.mac)[-8:])[:15]
        if not self.memory_mb:
            self.memory_mb = 256 if self.uefi else 128
        if self.no_reboot is None:
            # With -no-reboot any reset, a guest's or QMP's system_reset, makes QEMU exit: right for a one-shot
            # boot, wrong for a BMC-driven VM whose power off and reset are system_reset.
            self.no_reboot = not self.paused

    @property
    def uefi(self) -> bool:
        """True for OVMF (UEFI PXE or UEFI HTTP boot)."""
        return self.firmware != "bios"

    @property
    def serial_log(self) -> Path:
        """The file QEMU writes the guest's serial console to."""
        return self.workdir / f"{self.name}.serial.log"

    @property
    def qmp_socket(self) -> Path:
        """The QMP unix socket (only when started paused)."""
        return self.workdir / f"{self.name}.qmp"

    @property
    def stderr_log(self) -> Path:
        """QEMU's own stderr."""
        return self.workdir / f"{self.name}.qemu.log"

    @property
    def pidfile(self) -> Path:
        """The pid QEMU writes once started."""
        return self.workdir / f"{self.name}.pid"

    def command(self) -> list[str]:
        """Return QEMU's argv (without the namespace and timeout wrappers)."""
        nic = f"virtio-net-pci,netdev=net0,mac={self.mac}"
        argv = [
            QEMU_BINARY,
            "-name", self.name,
            "-machine", self.machine,
            *self.accel_choice.argv(),
            "-m", str(self.memory_mb),
            "-smp", "1",
            "-uuid", self.uuid,
            # No default VGA, floppy, CD-ROM or parallel port: nothing for the firmware to try before the NIC.
            "-nodefaults",
            # -nographic makes SeaBIOS print on the serial port; serial goes to a file, no monitor on stdio.
            "-nographic",
            "-serial", f"file:{self.serial_log}",
            "-monitor", "none",
            "-netdev", f"tap,id=net0,ifname={self.tap},script=no,downscript=no",
            "-boot", "order=n",
            "-pidfile", str(self.pidfile),
        ]
        if self.disk is not None:
            # bootindex orders the firmware's boot options (SeaBIOS and OVMF both read it): the NIC, then the disk.
            nic += ",bootindex=1"
            argv += ["-drive", f"file={self.disk},if=none,id=disk0,format=raw,cache=unsafe",
                     "-device", "virtio-blk-pci,drive=disk0,bootindex=2"]
        if self.uefi:
            # No option ROM on the NIC: OVMF's own VirtioNetDxe + UEFI PXE (or HTTP) boot, not QEMU's iPXE.
            argv += ["-bios", str(OVMF_FD), "-device", nic + ",romfile="]
            if self.firmware == "uefi-http":
                argv += list(UEFI_HTTP_FW_CFG)
        else:
            argv += ["-device", nic]
        if self.no_reboot:
            argv.append("-no-reboot")
        if self.paused:
            argv += ["-S", "-qmp", f"unix:{self.qmp_socket},server=on,wait=off"]
        return argv + list(self.extra_args)

    async def start(self) -> None:
        """Create the tap, start QEMU in the namespace (paused when asked) and connect QMP."""
        if self.process is not None:
            raise QemuError(f"{self.name} is already started")
        if shutil.which(QEMU_BINARY) is None:
            raise QemuError(f"{QEMU_BINARY} not found (Debian package qemu-system-x86)")
        if self.uefi and not OVMF_FD.is_file():
            raise QemuError(f"{OVMF_FD} not found (Debian package ovmf)")
        self.accel_choice = await choose_accel(self.accel, QEMU_BINARY)
        self.workdir.mkdir(parents=True, exist_ok=True)
        for stale in (self.serial_log, self.qmp_socket, self.pidfile):
            stale.unlink(missing_ok=True)
        self.serial_log.touch()
        if self.disk is not None and not Path(self.disk).exists():
            with open(self.disk, "wb") as f:  # sparse: blocks are allocated as the guest writes them
                f.truncate(self.disk_size_mb << 20)
        await asyncio.to_thread(create_tap, self.netns, self.tap, self.bridge)
        # `timeout` kills QEMU even if this process dies without cleaning up; it forwards SIGTERM to QEMU.
        argv = ["ip", "netns", "exec", self.netns, "timeout", "--kill-after=5", f"{self.timeout_s:.0f}", *self.command()]
        with open(self.stderr_log, "wb") as err:
            self.process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True
            )
        self.started_at = time.time()
        if not self.paused:
            self.powered_on_at = self.started_at
            return
        self.qmp = QmpClient(self.qmp_socket)
        try:
            await self.qmp.connect()
        except QemuError as exc:
            await self.stop()
            raise QemuError(f"{self.name}: {exc}; QEMU said: {self.stderr_text()[-2000:]}") from exc

    def stderr_text(self) -> str:
        """Return what QEMU printed on stderr so far."""
        try:
            return self.stderr_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def serial_text(self) -> str:
        """Return the guest's serial console output so far."""
        try:
            return self.serial_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def running(self) -> bool:
        """True while the QEMU process exists."""
        return self.process is not None and self.process.returncode is None

    async def _qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        if self.qmp is None:
            raise QemuError(f"{self.name}: power control needs a VM started with paused=True (QMP)")
        if not self.running:
            raise QemuError(f"{self.name}: QEMU is not running")
        return await self.qmp.execute(command, arguments)

    async def power_state(self) -> str:
        """Return 'on' or 'off' as a BMC reports it (from QMP query-status)."""
        return power_of(await self.run_state())

    async def run_state(self) -> str:
        """Return QEMU's run state (prelaunch, running, paused, shutdown, ...)."""
        status = await self._qmp("query-status")
        return str(status["status"])

    async def power_on(self) -> None:
        """Power on: resume the CPU (resetting first when the guest had shut down)."""
        state = await self.run_state()
        if state == "running":
            return
        if state in _NEEDS_RESET:
            await self._qmp("system_reset")
        await self._qmp("cont")
        self.powered_on_at = time.time()

    async def power_off(self) -> None:
        """Power off: stop the CPU and reset the machine, so the next power on boots from the firmware."""
        await self._qmp("stop")
        await self._qmp("system_reset")
        self.powered_on_at = None

    async def power_reset(self) -> None:
        """Hard reset (the guest reboots into its firmware)."""
        await self._qmp("system_reset")
        if await self.run_state() == "running":
            self.powered_on_at = time.time()

    async def wait_serial(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait until the serial console matches a regular expression; raise TimeoutError with the log tail."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.serial_text()
            if (m := regex.search(text)) is not None:
                return m
            if not self.running:
                raise QemuError(f"{self.name}: QEMU exited ({self.process.returncode if self.process else '?'}) "
                                f"before {pattern!r}; serial tail: {text[-1500:]!r}; stderr: {self.stderr_text()[-500:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no {pattern!r} on the serial console in {timeout:.0f} s; tail: {text[-1500:]!r}")
            await asyncio.sleep(0.2)

    def _qemu_pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ValueError, ProcessLookupError, OSError):
            return None
        # Guard against pid reuse: it must still be this VM's QEMU.
        return pid if self.name.encode() in cmdline and b"qemu" in cmdline else None

    async def stop(self, grace: float = 3.0) -> int | None:
        """Kill QEMU (SIGTERM, then SIGKILL), close QMP, delete the tap; return QEMU's exit status."""
        if self.qmp is not None:
            await self.qmp.close()
            self.qmp = None
        rc: int | None = None
        if self.process is not None:
            if self.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.process.terminate()  # timeout(1) forwards SIGTERM to QEMU
                try:
                    await asyncio.wait_for(self.process.wait(), grace)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.process.pid, signal.SIGKILL)
                    await self.process.wait()
            rc = self.process.returncode
        if (pid := self._qemu_pid()) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await asyncio.to_thread(delete_tap, self.netns, self.tap)
        self.process = None
        self.powered_on_at = None
        return rc

    async def __aenter__(self) -> "QemuVm":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
