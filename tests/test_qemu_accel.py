"""Choosing the VMs' accelerator: the KVM probe against fake QEMU binaries that behave as a working KVM and as
the kvm_pvm of these machines do (service tier: real processes, no VM), and the choice through the plan."""
from __future__ import annotations

from pathlib import Path

import pytest

from vmtestbed.accel import AccelChoice, choose_accel, probe_kvm
from vmtestbed.plan import make_plan
from vmtestbed.qemunodes import vm_of

# A stand-in for qemu-system-x86_64: finds its -serial file: argument and behaves as told.
FAKE_QEMU = """#!/bin/sh
serial=""
bios=""
prev=""
for a in "$@"; do
  [ "$prev" = "-serial" ] && serial="${a#file:}"
  [ "$prev" = "-bios" ] && bios="$a"
  prev="$a"
done
%s
exec sleep 30
"""
WORKING = """if [ -n "$bios" ]; then echo "BdsDxe: loading Boot0001" > "$serial"
else echo "iPXE 1.21.1+ -- Open Source Network Boot Firmware -- https://ipxe.org" > "$serial"; fi"""
# kvm_pvm as measured here: OVMF stops at once with an internal error, iPXE hangs after "starting execution".
PVM = """if [ -n "$bios" ]; then echo "KVM internal error. Suberror: 1" >&2; echo "emulation failure" >&2
else echo "iPXE (PCI 00:02.0) starting execution.." > "$serial"; fi"""


def fake_qemu(tmp_path: Path, body: str) -> str:
    path = tmp_path / "qemu-system-x86_64"
    path.write_text(FAKE_QEMU % body)
    path.chmod(0o755)
    return str(path)


async def test_kvm_is_chosen_only_when_both_firmwares_run_under_it(tmp_path: Path) -> None:
    ok, why = await probe_kvm(fake_qemu(tmp_path, WORKING), timeout=10, device=Path("/dev/null"))
    assert ok and why.startswith("SeaBIOS+iPXE and OVMF ran under KVM"), why


async def test_a_kvm_that_breaks_ovmf_means_tcg_with_the_reason(tmp_path: Path) -> None:
    ok, why = await probe_kvm(fake_qemu(tmp_path, PVM), timeout=10, device=Path("/dev/null"))
    assert not ok and why == "ovmf under KVM: KVM internal error. Suberror: 1"


async def test_a_guest_that_never_prints_its_banner_means_tcg(tmp_path: Path) -> None:
    hangs = PVM.replace('echo "KVM internal error. Suberror: 1" >&2; echo "emulation failure" >&2', 'echo "BdsDxe: loading" > "$serial"')
    ok, why = await probe_kvm(fake_qemu(tmp_path, hangs), timeout=1.5, device=Path("/dev/null"))
    assert not ok and why == "seabios+ipxe under KVM: no 'Open Source Network Boot Firmware' on its serial port within 1.5 s"


async def test_no_usable_device_means_tcg_without_running_qemu(tmp_path: Path) -> None:
    ok, why = await probe_kvm(fake_qemu(tmp_path, WORKING), device=tmp_path / "kvm")
    assert not ok and why == f"{tmp_path / 'kvm'} is missing or not usable by this user"


async def test_explicit_choices_and_their_qemu_arguments() -> None:
    assert (await choose_accel("tcg")).argv() == ["-accel", "tcg,tb-size=64"]
    assert (await choose_accel("kvm")).argv() == ["-accel", "kvm", "-cpu", "host"]
    with pytest.raises(ValueError, match="accelerator must be one of auto, kvm, tcg"):
        await choose_accel("hvf")


def test_the_plan_carries_the_accelerator_to_each_vm() -> None:
    plan = make_plan("ta", 0, 1, qemu=1, qemu_accel="tcg")
    vm = vm_of(plan, plan.node("node-1"))
    assert vm.accel == "tcg" and vm.accel_choice == AccelChoice("tcg", "not started")
    assert make_plan("ta", 0, 1, qemu=1).qemu_accel == "auto"
    with pytest.raises(ValueError, match="QEMU accelerator 'xen'"):
        make_plan("ta", 0, 1, qemu=1, qemu_accel="xen")
