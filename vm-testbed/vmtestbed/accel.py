"""Which QEMU accelerator the VMs get: KVM when it really runs our firmware, TCG otherwise.

`/dev/kvm` existing proves little: on some hosts it is backed by a paravirtual KVM (kvm_pvm) under which SeaBIOS
starts but iPXE and OVMF die with "KVM internal error. Suberror: 1" and QEMU pauses (field notes). So "auto"
probes with the guests the testbed runs: SeaBIOS with QEMU's iPXE ROM on a NIC with no peer (no traffic at all),
and OVMF, each under `-accel kvm` for a few seconds; KVM is used only when both print their banners on the
serial port and QEMU reports no KVM error. The answer is cached for the process.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Accel = Literal["kvm", "tcg"]
ACCELS = ("auto", "kvm", "tcg")
KVM_DEVICE = Path("/dev/kvm")
OVMF_FD = Path("/usr/share/ovmf/OVMF.fd")  # Debian's ovmf (vmtestbed.qemu boots it too)
PROBE_TIMEOUT_S = 20.0
# What each probe guest prints on its serial port once its firmware really runs: iPXE's banner after it initialised
# its devices (under kvm_pvm it stops at "starting execution.."), OVMF's boot manager (BdsDxe) trying its options.
_PROBES = {"seabios+ipxe": ((), "Open Source Network Boot Firmware"), "ovmf": (("-bios", str(OVMF_FD)), "BdsDxe")}
_chosen: dict[str, "AccelChoice"] = {}


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator for the VMs, and why."""

    accel: Accel
    reason: str

    def argv(self) -> list[str]:
        """QEMU's arguments for it (TCG with a capped translation cache: field notes)."""
        return ["-accel", "kvm", "-cpu", "host"] if self.accel == "kvm" else ["-accel", "tcg,tb-size=64"]


async def choose_accel(requested: str = "auto", qemu: str = "qemu-system-x86_64") -> AccelChoice:
    """Resolve "auto", "kvm" or "tcg" to the accelerator to use ("auto" probes once per process)."""
    if requested == "tcg":
        return AccelChoice("tcg", "asked for")
    if requested == "kvm":
        return AccelChoice("kvm", "asked for")
    if requested != "auto":
        raise ValueError(f"accelerator must be one of {', '.join(ACCELS)}, not {requested!r}")
    if qemu not in _chosen:
        works, why = await probe_kvm(qemu)
        _chosen[qemu] = AccelChoice("kvm", why) if works else AccelChoice("tcg", why)
    return _chosen[qemu]


async def probe_kvm(qemu: str = "qemu-system-x86_64", timeout: float = PROBE_TIMEOUT_S,
                    device: Path = KVM_DEVICE) -> tuple[bool, str]:
    """Return (True, how long it took) when KVM runs SeaBIOS+iPXE and OVMF, else (False, why not)."""
    if not os.access(device, os.R_OK | os.W_OK):
        return False, f"{device} is missing or not usable by this user"
    if shutil.which(qemu) is None:
        return False, f"{qemu} not found"
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rackboot-kvm-probe-") as tmp:
        pending = {asyncio.ensure_future(_probe_one(qemu, Path(tmp), name, args, banner, timeout))
                   for name, (args, banner) in _PROBES.items()}
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    ok, why = task.result()
                    if not ok:
                        return False, why  # one guest that does not run is enough to say no
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    return True, f"SeaBIOS+iPXE and OVMF ran under KVM (probe {time.monotonic() - t0:.1f} s)"


async def _probe_one(qemu: str, tmp: Path, name: str, firmware_args: tuple[str, ...], banner: str,
                     timeout: float) -> tuple[bool, str]:
    if name == "ovmf" and not Path(firmware_args[1]).is_file():
        return False, f"{firmware_args[1]} not found"
    serial = tmp / f"{name}.serial"
    serial.touch()
    argv = [qemu, "-accel", "kvm", "-cpu", "host", "-machine", "pc", "-m", "256", "-nodefaults", "-nographic",
            "-monitor", "none", "-serial", f"file:{serial}", "-device", "virtio-net-pci", "-boot", "order=n",
            *firmware_args]
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    said = bytearray()

    async def collect() -> None:
        while chunk := await proc.stdout.read(4096):  # type: ignore[union-attr]
            said.extend(chunk)

    reader = asyncio.ensure_future(collect())
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if banner in serial.read_text(errors="replace"):
                return True, f"{name}: ok"
            if b"KVM internal error" in said or b"failed to initialize kvm" in said.lower() or proc.returncode is not None:
                break
            await asyncio.sleep(0.1)
        errors = [line for line in said.decode(errors="replace").splitlines() if "kvm" in line.lower()]
        return False, f"{name} under KVM: {errors[0].strip() if errors else f'no {banner!r} on its serial port within {timeout:g} s'}"
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        reader.cancel()
