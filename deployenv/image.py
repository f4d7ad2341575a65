"""`rackboot build image`: a root filesystem to deploy, from Debian packages (mmdebstrap), as tar.zst plus its environment YAML.

The result lives in CACHE_DIR/<hash>/ (NAME.tar.zst, NAME.yaml, manifest.json), the hash being the recipe's
(deployenv/image_recipe.py). A build whose recipe hashes to a complete directory does nothing. Needs root
(mmdebstrap into a directory, chroot to enable units and check the kernel and initrd).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from deployenv.debian import BuildError, cache_slot, chroot, kernel_in, mmdebstrap, need_root_and, package_versions, run
from deployenv.image_recipe import ImageRecipe

DEFAULT_CACHE = Path("/var/cache/rackboot/images")
MANIFEST = "manifest.json"
CHUNK = 1 << 20

Say = Callable[[str], None]


@dataclass(frozen=True)
class ImageResult:
    """Where a built (or cached) image is, and what the build found."""

    directory: Path
    name: str
    digest: str
    cached: bool
    seconds: float
    manifest: dict[str, object]

    @property
    def tar(self) -> Path:
        """The root filesystem, tar.zst."""
        return self.directory / f"{self.name}.tar.zst"

    @property
    def yaml(self) -> Path:
        """The environment description beside it."""
        return self.directory / f"{self.name}.yaml"


def yaml_beside(tar: Path) -> Path:
    """Return where the environment YAML of an image file goes: same directory, same stem (debian12.tar.zst -> debian12.yaml)."""
    name = tar.name
    for suffix in (".tar.zst", ".tzst", ".zst"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return tar.with_name(name.removesuffix(suffix) + ".yaml")
    return tar.with_name(tar.stem + ".yaml")


def environment_yaml(recipe: ImageRecipe, image_file: str, sha256: str) -> str:
    """Return the environment description (appliance/catalog.py's format) of an image at image_file, relative to the YAML."""
    def flow(pairs: tuple[tuple[str, str], ...]) -> str:
        return "{" + ", ".join(f"{k}: {v}" for k, v in pairs) + "}"

    layout = "".join(f"    - {flow(p)}\n" for p in recipe.layout)
    return (f"name: {recipe.name}\n"
            "version: 1\n"
            f"description: {json.dumps(recipe.description)}\n"
            "visibility: public\n"
            f"image: {{file: {json.dumps(image_file)}, kind: tar, compression: zstd, sha256: {sha256}}}\n"
            "disk:\n"
            "  layout:\n"
            f"{layout}"
            "  deploy_partition: root\n"
            f"boot: {{kind: local, cmdline: {json.dumps(recipe.cmdline)}}}\n"
            "kexec: true\n")


def cached(recipe: ImageRecipe, cache_dir: Path = DEFAULT_CACHE) -> ImageResult | None:
    """Return the cached build of this recipe, or None."""
    digest = recipe.digest()
    done = cache_dir / digest
    result = ImageResult(done, recipe.name, digest, True, 0.0, {})
    if not all(p.is_file() for p in (result.tar, result.yaml, done / MANIFEST)):
        return None
    return ImageResult(done, recipe.name, digest, True, 0.0, json.loads((done / MANIFEST).read_text()))


def export(result: ImageResult, out: Path, recipe: ImageRecipe) -> tuple[Path, Path]:
    """Put the image at out (a hard link when on the same filesystem, else a copy) and its YAML beside it; return both."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if not (out.exists() and out.samefile(result.tar)):  # renaming a link onto the same file would leave the link
        tmp = out.with_name(out.name + ".new")
        tmp.unlink(missing_ok=True)
        try:
            os.link(result.tar, tmp)
        except OSError:
            shutil.copyfile(result.tar, tmp)
        tmp.rename(out)  # atomic: whoever reads out meanwhile gets the old or the new image, whole
    yaml_path = yaml_beside(out)
    yaml_path.write_text(environment_yaml(recipe, out.name, str(result.manifest["sha256"])))
    return out, yaml_path


def build_image(recipe: ImageRecipe, cache_dir: Path = DEFAULT_CACHE, say: Say = print, force: bool = False) -> ImageResult:
    """Build this recipe's image into cache_dir/<hash>, unless it is already there."""
    t0 = time.monotonic()
    if not force and (hit := cached(recipe, cache_dir)) is not None:
        return hit
    need_root_and(("mmdebstrap", "zstd", "tar"), "an image")
    digest = recipe.digest()
    with cache_slot(cache_dir, digest) as work:
        root = work / "root"
        say(f"mmdebstrap {recipe.suite}: {len(recipe.packages)} packages and their dependencies (apt's sources of this machine)")
        mmdebstrap(recipe.suite, recipe.packages, root, recipe.dpkg_excludes)
        kernel_version = customize(root, recipe)
        packages = package_versions(root)
        unpacked = tree_bytes(root)
        tar = work / f"{recipe.name}.tar.zst"
        say(f"kernel {kernel_version}; packing {unpacked / 1e6:.0f} MB (tar, zstd -{recipe.zstd_level})")
        pack(root, tar, recipe.zstd_level)
        sha = sha256_file(tar)
        (work / f"{recipe.name}.yaml").write_text(environment_yaml(recipe, tar.name, sha))
        manifest: dict[str, object] = {
            "name": recipe.name, "digest": digest, "suite": recipe.suite, "kernel_version": kernel_version,
            "packages": packages, "tar_bytes": tar.stat().st_size, "unpacked_bytes": unpacked, "sha256": sha,
            "zstd_level": recipe.zstd_level, "build_seconds": round(time.monotonic() - t0, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        shutil.rmtree(root)
    done = cache_dir / digest
    return ImageResult(done, recipe.name, digest, False, time.monotonic() - t0, manifest)


def customize(root: Path, recipe: ImageRecipe) -> str:
    """Make the mmdebstrap tree a deployable system (see docs/images.md); return its kernel version."""
    for rel, content, mode in recipe.files:
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(content)
        dest.chmod(mode)
    (root / "etc/hostname").write_text(recipe.hostname + "\n")
    (root / "etc/hostname").chmod(0o644)  # mmdebstrap copied the build machine's, with its mode
    # systemd-resolved's postinst kept the build machine's resolv.conf (mmdebstrap had copied it in) as a backup.
    (root / "etc/.resolv.conf.systemd-resolved.bak").unlink(missing_ok=True)
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/machine-id").write_text("")  # systemd makes one per node at first boot
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    for pattern in ("var/lib/apt/lists/*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb", "var/log/apt/*",
                    "var/log/dpkg.log", "var/log/alternatives.log", "var/cache/debconf/*-old"):
        for path in root.glob(pattern):
            if path.is_file() or path.is_symlink():
                path.unlink()
    chroot(root, "systemctl", "enable", *recipe.enable)
    version, _ = kernel_in(root)
    boot = root / "boot"
    if not (boot / f"initrd.img-{version}").is_file():
        chroot(root, "update-initramfs", "-c", "-k", version)
    for link, target in (("vmlinuz", f"boot/vmlinuz-{version}"), ("initrd.img", f"boot/initrd.img-{version}")):
        (root / f"{link}.old").unlink(missing_ok=True)  # linux-update-symlinks makes .old links to the same kernel
        if not (root / link).is_symlink() or os.readlink(root / link).lstrip("/") != target:
            (root / link).unlink(missing_ok=True)
            (root / link).symlink_to(target)
    shadow = (root / "etc/shadow").read_text().splitlines()
    root_hash = next((line.split(":")[1] for line in shadow if line.startswith("root:")), "")
    if not root_hash.startswith(("*", "!")):
        raise BuildError("root's password is not locked in the image (etc/shadow)")
    return version


def tree_bytes(root: Path) -> int:
    """Return the bytes of the regular files under root, each hard-linked file counted once."""
    seen: set[int] = set()
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_nlink > 1:
                if st.st_ino in seen:
                    continue
                seen.add(st.st_ino)
            if not os.path.islink(os.path.join(dirpath, name)):
                total += st.st_size
    return total


def pack(root: Path, dest: Path, level: int) -> None:
    """Write root as dest: GNU tar (numeric owners, xattrs, sorted names, /dev left empty), zstd on every core."""
    entries = sorted(p.name for p in root.iterdir())
    # --anchored: unanchored, dev/* would also drop e.g. kernel/drivers/net/can/dev/can-dev.ko
    run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--sort=name", "--anchored", "--exclude=dev/*",
          "-I", f"zstd -T0 -{level}", "-C", str(root), "-cf", str(dest), *entries])


def sha256_file(path: Path) -> str:
    """Return the sha256 of a file, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()
