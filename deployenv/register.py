"""Hand a built deploy environment to the appliance: copy it where rackboot.yaml's deploy section points, or say what to write.

Reads only what it needs of the appliance's config (state_dir, http.files, deploy.kernel/initrds/ssh_key), with
the appliance's defaults (appliance/config.py), without importing the appliance.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

DEFAULT_KERNEL = "deploy/vmlinuz"
DEFAULT_INITRDS = ("deploy/initrd.img",)
DEFAULT_LOCAL_EFI = "deploy/localboot-x64.efi"


class RegisterError(Exception):
    """The appliance's config cannot be read, or points the deploy environment somewhere this cannot write."""


@dataclass(frozen=True)
class ApplianceTarget:
    """Where an appliance serves its deploy environment from, and its deploy key."""

    files_dir: Path
    kernel: str
    initrds: tuple[str, ...]
    deploy_key: Path
    local_efi: str = DEFAULT_LOCAL_EFI


def read_target(config: Path) -> ApplianceTarget:
    """Read the files directory, the deploy kernel/initrd paths and the deploy key from rackboot.yaml."""
    try:
        doc = yaml.safe_load(config.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise RegisterError(f"{config}: {exc}") from exc
    if not isinstance(doc, dict):
        raise RegisterError(f"{config}: not a mapping")
    base = config.resolve().parent
    state = (base / str(doc.get("state_dir", "/var/lib/rackboot"))).resolve()
    http = doc.get("http") or {}
    deploy = doc.get("deploy") or {}
    files = (base / str(http["files"])).resolve() if isinstance(http, dict) and http.get("files") else state / "files"
    initrds = deploy.get("initrds", DEFAULT_INITRDS) if isinstance(deploy, dict) else DEFAULT_INITRDS
    key = deploy.get("ssh_key") if isinstance(deploy, dict) else None
    return ApplianceTarget(
        files_dir=files,
        kernel=str(deploy.get("kernel", DEFAULT_KERNEL)) if isinstance(deploy, dict) else DEFAULT_KERNEL,
        initrds=tuple(str(x) for x in (initrds if isinstance(initrds, list | tuple) else [initrds])),
        deploy_key=(base / str(key)).resolve() if key else state / "deploy_key",
        local_efi=str(deploy.get("local_efi", DEFAULT_LOCAL_EFI)) if isinstance(deploy, dict) else DEFAULT_LOCAL_EFI,
    )


def install(kernel: Path, initrd: Path, target: ApplianceTarget, localboot: Path | None = None) -> list[Path]:
    """Copy the kernel, initrd (and UEFI local-boot loader) to the paths the config names under its files directory."""
    if "://" in target.kernel or any("://" in i for i in target.initrds) or "://" in target.local_efi:
        raise RegisterError("deploy.kernel/initrds/local_efi are URLs in this config: copy the files there yourself")
    if len(target.initrds) != 1:
        raise RegisterError(f"deploy.initrds lists {len(target.initrds)} files; this build makes one initrd")
    written = []
    pairs = [(kernel, target.kernel), (initrd, target.initrds[0])] + ([(localboot, target.local_efi)] if localboot else [])
    for src, rel in pairs:
        dest = (target.files_dir / rel).resolve()
        if target.files_dir.resolve() not in dest.parents:
            raise RegisterError(f"{rel} is outside {target.files_dir}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".new")
        shutil.copyfile(src, tmp)
        tmp.rename(dest)  # atomic: a node fetching it meanwhile gets the old or the new file, whole
        written.append(dest)
    return written


def export(kernel: Path, initrd: Path, out: Path, localboot: Path | None = None) -> list[Path]:
    """Put vmlinuz, initrd.img (and localboot-x64.efi) in out (hard links on the same filesystem, else copies)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for src in (kernel, initrd, *([localboot] if localboot else [])):
        dest = out / src.name
        dest.unlink(missing_ok=True)
        try:
            os.link(src, dest)
        except OSError:
            shutil.copyfile(src, dest)
        written.append(dest)
    return written


def config_lines(kernel: str = DEFAULT_KERNEL, initrd: str = DEFAULT_INITRDS[0], local_efi: str = DEFAULT_LOCAL_EFI) -> str:
    """The rackboot.yaml lines that boot a deploy environment copied under http.files at these paths."""
    return f"deploy:\n  kernel: {kernel}\n  initrds: [{initrd}]\n  local_efi: {local_efi}\n"
