"""Build the deploy environment: mmdebstrap a Debian tree, trim it, add the agent and /init, pack it; cached by input hash.

The result lives in CACHE_DIR/<hash>/ (vmlinuz, initrd.img, manifest.json). A build whose inputs hash to a
directory that is already complete does nothing. Needs root (mmdebstrap into a directory, chroot).
"""
from __future__ import annotations

import json
import lzma
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from deployenv import recipe
from deployenv.cpio import pack
from deployenv.debian import BuildError, cache_slot, chroot, kernel_in, mmdebstrap, need_root_and, package_versions
from deployenv.inputs import BuildInputs
from deployenv.modules import load_order

DEFAULT_CACHE = Path("/var/cache/rackboot/deploy-env")
KERNEL, INITRD, MANIFEST = "vmlinuz", "initrd.img", "manifest.json"
LOCALBOOT = "localboot-x64.efi"  # GRUB for UEFI local boot through the appliance (recipe.LOCALBOOT_CFG)
AGENT_DIR = "usr/lib/rackboot"
# What the build checks inside the tree before packing it: every broadcast module imports with Debian's libraries
# (and recipe.TOOLS run).
SMOKE = ("import importlib, pkgutil, broadcast, domain\n"
         "for m in pkgutil.walk_packages(broadcast.__path__, 'broadcast.'): importlib.import_module(m.name)\n"
         "import broadcast.agent; print('agent imports ok')\n")

Say = Callable[[str], None]


@dataclass(frozen=True)
class BuildResult:
    """Where a built (or cached) deploy environment is, and what the build found."""

    directory: Path
    digest: str
    cached: bool
    seconds: float
    manifest: dict[str, object]

    @property
    def kernel(self) -> Path:
        """The kernel image."""
        return self.directory / KERNEL

    @property
    def initrd(self) -> Path:
        """The initramfs."""
        return self.directory / INITRD

    @property
    def localboot(self) -> Path:
        """The UEFI local-boot loader (GRUB that chains the node's disk)."""
        return self.directory / LOCALBOOT


def cached(inputs: BuildInputs, cache_dir: Path = DEFAULT_CACHE) -> BuildResult | None:
    """Return the cached build of these inputs, or None."""
    digest = inputs.digest()
    done = cache_dir / digest
    if not all((done / f).is_file() for f in (KERNEL, INITRD, LOCALBOOT, MANIFEST)):
        return None
    return BuildResult(done, digest, True, 0.0, json.loads((done / MANIFEST).read_text()))


def build(inputs: BuildInputs, cache_dir: Path = DEFAULT_CACHE, say: Say = print, force: bool = False) -> BuildResult:
    """Build the deploy environment for these inputs into cache_dir/<hash>, unless it is already there."""
    t0 = time.monotonic()
    if not force and (hit := cached(inputs, cache_dir)) is not None:
        return hit
    need_root_and(("mmdebstrap",), "the deploy environment")
    digest = inputs.digest()
    with cache_slot(cache_dir, digest) as work:
        root = work / "root"
        say(f"mmdebstrap {recipe.SUITE}: {len(recipe.PACKAGES)} packages and their dependencies (apt's sources of this machine)")
        mmdebstrap(recipe.SUITE, recipe.PACKAGES, root, [f"/usr/share/{d}/*" for d in ("doc", "man", "info", "locale")])
        kernel_version, kernel = kernel_in(root)
        shutil.copyfile(kernel, work / KERNEL)
        packages = package_versions(root)
        say(f"kernel {kernel_version}; keeping {len(recipe.MODULES)} modules and their dependencies")
        modules, missing = _keep_modules(root, kernel_version)
        for name in missing:
            say(f"warning: module {name} is not in this kernel")
        for path in recipe.TRIM:
            target = root / path
            if target.is_symlink() or target.is_file():
                target.unlink()
            elif target.is_dir():
                shutil.rmtree(target)
        _restore_modules(root, work / "modules", kernel_version)
        _make_localboot(root, work / LOCALBOOT)
        _add_agent(root, inputs)
        out = chroot(root, f"PYTHONPATH=/{AGENT_DIR}", "/usr/bin/python3", "-c", SMOKE)
        if "agent imports ok" not in out:
            raise BuildError(f"the agent does not import inside the tree: {out}")
        chroot(root, "/usr/bin/python3", "-m", "compileall", "-q", f"/{AGENT_DIR}")
        for argv in recipe.TOOLS:
            chroot(root, *argv)
        shutil.rmtree(root / "var/lib/dpkg", ignore_errors=True)
        say("packing the initramfs (newc cpio, zstd)")
        tree_bytes = sum(p.lstat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())
        entries = pack(root, work / INITRD)
        manifest: dict[str, object] = {
            "digest": digest, "suite": recipe.SUITE, "kernel_version": kernel_version,
            "kernel_bytes": (work / KERNEL).stat().st_size, "initrd_bytes": (work / INITRD).stat().st_size,
            "localboot_bytes": (work / LOCALBOOT).stat().st_size,
            "tree_bytes": tree_bytes, "entries": entries, "modules": modules, "packages": packages,
            "build_seconds": round(time.monotonic() - t0, 1), "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        shutil.rmtree(root)
        shutil.rmtree(work / "modules", ignore_errors=True)
    done = cache_dir / digest
    return BuildResult(done, digest, False, time.monotonic() - t0, manifest)


def _keep_modules(root: Path, version: str) -> tuple[list[str], list[str]]:
    """Move the wanted modules (decompressed) out of the tree before it is trimmed; return (load order, missing)."""
    moddir = root / "usr/lib/modules" / version
    order, missing = load_order(recipe.MODULES, moddir / "modules.dep")
    keep = root.parent / "modules"
    plain: list[str] = []
    for rel in order:
        src = moddir / rel
        name = rel.removesuffix(".xz")
        (keep / name).parent.mkdir(parents=True, exist_ok=True)
        (keep / name).write_bytes(lzma.decompress(src.read_bytes()) if rel.endswith(".xz") else src.read_bytes())
        plain.append(name)
    (keep / "modules.order").write_text("".join(f"{m}\n" for m in plain))
    for f in ("modules.builtin", "modules.builtin.modinfo"):
        if (moddir / f).is_file():
            shutil.copyfile(moddir / f, keep / f)
    return plain, missing


def _restore_modules(root: Path, keep: Path, version: str) -> None:
    """Put the kept modules back under /usr/lib/modules/VERSION, with a modules.dep of their own for modprobe."""
    moddir = root / "usr/lib/modules" / version
    moddir.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(keep, moddir)
    (root / "etc/rackboot").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(keep / "modules.order", root / "etc/rackboot/modules.order")
    chroot(root, "/usr/sbin/depmod", version)  # kmod is in the tree (linux-image depends on it)


def _make_localboot(root: Path, out: Path) -> None:
    """Build the UEFI local-boot GRUB image with the tree's grub-mkimage: its modules built in, its grub.cfg in a
    memdisk. The config embedded with -c runs in rescue mode (no `if`), so it only points the prefix at the memdisk
    (with a memdisk, GRUB takes (memdisk)/boot/grub whatever -p says: seen under OVMF), and normal mode reads it."""
    work = root / "tmp" / "localboot"
    (work / recipe.LOCALBOOT_PREFIX).mkdir(parents=True, exist_ok=True)
    (work / recipe.LOCALBOOT_PREFIX / "grub.cfg").write_text(recipe.LOCALBOOT_CFG)
    (work / "early.cfg").write_text(f"set prefix=(memdisk)/{recipe.LOCALBOOT_PREFIX}\n")
    chroot(root, "/usr/bin/tar", "-C", "/tmp/localboot", "-cf", "/tmp/localboot/memdisk.tar", recipe.LOCALBOOT_PREFIX)
    chroot(root, "/usr/bin/grub-mkimage", "-O", "x86_64-efi", "-p", f"(memdisk)/{recipe.LOCALBOOT_PREFIX}",
           "-c", "/tmp/localboot/early.cfg", "-m", "/tmp/localboot/memdisk.tar", "-o", "/tmp/localboot/localboot.efi",
           *recipe.LOCALBOOT_MODULES)
    shutil.move(work / "localboot.efi", out)
    shutil.rmtree(work)


def _add_agent(root: Path, inputs: BuildInputs) -> None:
    """Copy the project's packages, /init, the DHCP hook and the keys into the tree."""
    for rel, content in inputs.project:
        dest = root / AGENT_DIR / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(content)
    data = dict(inputs.data)
    etc = root / "etc/rackboot"
    etc.mkdir(parents=True, exist_ok=True)
    for dest, content, mode in ((root / "init", data["init"], 0o755), (etc / "udhcpc.script", data["udhcpc.script"], 0o755),
                                (etc / "authorized_keys", inputs.authorized_keys.encode(), 0o644)):
        dest.write_bytes(content)
        dest.chmod(mode)
    if inputs.tree_key is not None:
        (etc / "tree_key").write_bytes(inputs.tree_key)
        (etc / "tree_key").chmod(0o600)
    (root / "etc/hostname").write_text("rackboot-deploy\n")
    bindir = root / AGENT_DIR / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    agent = bindir / "rackboot-agent"
    agent.write_text(f"#!/bin/sh\nPYTHONPATH=/{AGENT_DIR} exec /usr/bin/python3 -m broadcast.agent \"$@\"\n")
    agent.chmod(0o755)

