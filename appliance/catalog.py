"""The environment catalog: images (name, version, owner, visibility) stored and served by the appliance."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import sqlite3
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit

from appliance.yamlsource import load_yaml_mapping
from domain.errors import ConfigError, RackbootError

VISIBILITIES = ("private", "shared", "public")
ENV_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # a directory name under the image root: no '/', no '..'
IMAGE_URL_SCHEMES = ("http", "https")
IMAGE_KINDS = ("tar", "raw")
COMPRESSIONS = ("gzip", "zstd", "xz", "none")
BOOT_KINDS = ("local", "kernel")
WHOLE_DISK = "whole"  # disk.layout of a raw image written over the whole disk, partition table included
# A layout partition's fs: a filesystem, swap, "bios_boot" (GRUB's core image on BIOS/GPT, no filesystem) or none.
PARTITION_FS = ("ext4", "ext3", "ext2", "xfs", "vfat", "swap", "bios_boot", "none")


class CatalogError(RackbootError):
    """An environment cannot be added, found or removed."""


@dataclass(frozen=True)
class Partition:
    """One partition of the target disk layout."""

    name: str
    size: str  # e.g. 512M, 20G, or 'rest'
    fs: str = "ext4"
    mount: str = ""


@dataclass(frozen=True)
class Environment:
    """An installable system: image, disk layout, post-install scripts, how it boots."""

    name: str
    version: int
    owner: str
    visibility: str = "private"
    description: str = ""
    image_path: str = ""          # stored copy, relative to the catalog's image root
    image_kind: str = "tar"
    compression: str = "none"
    sha256: str = ""
    size: int = 0
    target_disk: str = ""         # empty: the node's disk from the inventory
    layout: tuple[Partition, ...] = ()
    deploy_partition: str = "root"
    postinstall: tuple[str, ...] = ()
    boot_kind: str = "local"
    kernel: str = ""
    initrd: str = ""
    cmdline: str = ""
    kexec: bool = True
    created: float = field(default_factory=time.time)

    @property
    def ref(self) -> str:
        """NAME:VERSION."""
        return f"{self.name}:{self.version}"

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        d = asdict(self)
        d["layout"] = [asdict(p) for p in self.layout]
        d["postinstall"] = list(self.postinstall)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Environment":
        """Rebuild from to_json()."""
        d = dict(d)
        d["layout"] = tuple(Partition(**p) for p in d.get("layout", []))
        d["postinstall"] = tuple(d.get("postinstall", []))
        return cls(**d)

    def visible_to(self, user: str, admin: bool) -> bool:
        """Tell whether a user may see and deploy this environment."""
        return admin or self.visibility in ("public", "shared") or self.owner == user


DEFAULT_LAYOUT = (Partition("swap", "512M", "swap"), Partition("root", "rest", "ext4", "/"))


def check_image_url(url: str) -> None:
    """Refuse image URLs other than http(s): file:// and friends would copy the appliance's own files."""
    if urlsplit(url).scheme not in IMAGE_URL_SCHEMES:
        raise CatalogError(f"image URL {url!r}: only {' or '.join(IMAGE_URL_SCHEMES)} URLs are accepted")


def confined(path: Path, roots: Sequence[Path]) -> bool:
    """Tell whether a path, symbolic links resolved, lies under one of the roots."""
    real = path.resolve()
    return any(real.is_relative_to(root.resolve()) for root in roots)


def parse_environment_file(path: Path, owner: str, *, image_roots: Sequence[Path]) -> tuple[Environment, Path | str]:
    """Read an environment description (YAML); return it (without stored image) and its image source.

    An image file must lie under one of image_roots (the upload's directory, the appliance's files
    directory); an image URL must be http(s).
    """
    loc = load_yaml_mapping(path)
    problems: list[str] = []
    allowed = ("name", "version", "description", "visibility", "image", "disk", "postinstall", "boot", "kexec")
    for key in loc.keys():
        if key not in allowed:
            problems.append(f"{loc.at(key)}: {key}: unknown key (expected one of: {', '.join(allowed)})")
    name = str(loc.raw("name", "") or "")
    if not ENV_NAME.match(name):
        problems.append(f"{loc.at('name')}: name: required: letters, digits, '.', '_' and '-', starting with a letter"
                        " or digit, at most 64 characters")
    version = loc.raw("version", 1)
    if not isinstance(version, int) or version < 1:
        problems.append(f"{loc.at('version')}: version: expected a positive integer")
    visibility = str(loc.raw("visibility", "private"))
    if visibility not in VISIBILITIES:
        problems.append(f"{loc.at('visibility')}: visibility: expected one of {' | '.join(VISIBILITIES)}")
    image = loc.child("image")
    source: Path | str = ""
    kind, compression, sha = "tar", "none", ""
    if image is None:
        problems.append(f"{loc.where}: image: required (file or url, kind, compression)")
    else:
        if image.raw("file"):
            source = (path.parent / str(image.raw("file"))).resolve()
            if not confined(source, image_roots):
                problems.append(f"{image.at('file')}: image.file: outside the appliance's image directories"
                                " (upload the image, or put it under the HTTP files directory)")
            elif not Path(source).is_file():
                problems.append(f"{image.at('file')}: image.file: no such file {image.raw('file')}")
        elif image.raw("url"):
            source = str(image.raw("url"))
            try:
                check_image_url(source)
            except CatalogError as exc:
                problems.append(f"{image.at('url')}: image.url: {exc}")
        else:
            problems.append(f"{image.where}: image: needs 'file' or 'url'")
        kind = str(image.raw("kind", "tar"))
        if kind not in IMAGE_KINDS:
            problems.append(f"{image.at('kind')}: image.kind: expected one of {' | '.join(IMAGE_KINDS)}")
        compression = str(image.raw("compression", _guess_compression(str(source))))
        if compression not in COMPRESSIONS:
            problems.append(f"{image.at('compression')}: image.compression: expected one of {' | '.join(COMPRESSIONS)}")
        sha = str(image.raw("sha256", "") or "").lower()
    disk = loc.child("disk")
    # A raw image with no layout is a whole disk (its own table and bootloader); `layout: whole` says so explicitly.
    layout: tuple[Partition, ...] = () if kind == "raw" else DEFAULT_LAYOUT
    target_disk, deploy_part = "", "root"
    if disk is not None:
        target_disk = str(disk.raw("target", "") or "")
        deploy_part = str(disk.raw("deploy_partition", "root"))
        raw_layout = disk.raw("layout")
        if raw_layout == WHOLE_DISK:
            layout = ()
            if kind != "raw":
                problems.append(f"{disk.at('layout')}: disk.layout: whole: only a raw image can be the whole disk")
        elif raw_layout:
            try:
                layout = tuple(Partition(**{k: str(v) for k, v in p.items()}) for p in raw_layout)
            except (TypeError, AttributeError) as exc:
                problems.append(f"{disk.at('layout')}: disk.layout: each partition is a mapping of name, size, fs, mount: {exc}")
            for p in layout:
                if p.fs not in PARTITION_FS:
                    problems.append(f"{disk.at('layout')}: disk.layout: partition {p.name}: fs {p.fs!r}: expected one of "
                                    f"{' | '.join(PARTITION_FS)}")
                if p.mount and (not p.mount.startswith("/") or p.fs in ("swap", "bios_boot", "none")):
                    problems.append(f"{disk.at('layout')}: disk.layout: partition {p.name}: mount {p.mount!r}: an absolute "
                                    "path, for a partition with a filesystem")
        if layout and deploy_part not in [p.name for p in layout]:
            problems.append(f"{disk.at('deploy_partition')}: disk.deploy_partition: {deploy_part!r} is not in the layout")
    boot = loc.child("boot")
    boot_kind, kernel, initrd, cmdline = "local", "", "", ""
    if boot is not None:
        boot_kind = str(boot.raw("kind", "local"))
        if boot_kind not in BOOT_KINDS:
            problems.append(f"{boot.at('kind')}: boot.kind: expected one of {' | '.join(BOOT_KINDS)}")
        kernel, initrd, cmdline = str(boot.raw("kernel", "") or ""), str(boot.raw("initrd", "") or ""), str(boot.raw("cmdline", "") or "")
        if boot_kind == "kernel" and not kernel:
            problems.append(f"{boot.at('kernel')}: boot.kernel: required when boot.kind is kernel")
    post = loc.raw("postinstall", []) or []
    if not isinstance(post, list):
        problems.append(f"{loc.at('postinstall')}: postinstall: expected a list of commands")
        post = []
    if problems:
        raise ConfigError(problems)
    env = Environment(
        name=name, version=int(version), owner=owner, visibility=visibility,
        description=str(loc.raw("description", "") or ""), image_kind=kind, compression=compression, sha256=sha,
        target_disk=target_disk, layout=layout, deploy_partition=deploy_part, postinstall=tuple(str(p) for p in post),
        boot_kind=boot_kind, kernel=kernel, initrd=initrd, cmdline=cmdline, kexec=bool(loc.raw("kexec", True)),
    )
    return env, source


def _guess_compression(name: str) -> str:
    for suffix, comp in ((".gz", "gzip"), (".tgz", "gzip"), (".zst", "zstd"), (".xz", "xz")):
        if name.endswith(suffix):
            return comp
    return "none"


class Catalog:
    """Environments in the state database; images copied under the image root and checked by sha256."""

    def __init__(self, db: sqlite3.Connection, image_root: Path) -> None:
        self._db = db
        self.image_root = image_root
        db.execute("CREATE TABLE IF NOT EXISTS environments (name TEXT, version INTEGER, owner TEXT, visibility TEXT,"
                   " body TEXT NOT NULL, PRIMARY KEY (name, version))")

    def add(self, env: Environment, source: Path | str) -> Environment:
        """Store an environment and a copy of its image; verify the declared sha256; return the stored entry."""
        if not ENV_NAME.match(env.name):
            raise CatalogError(f"bad environment name {env.name!r}")
        if isinstance(source, str):
            check_image_url(source)
        if self._get(env.name, env.version) is not None:
            raise CatalogError(f"environment {env.ref} exists already (bump the version)")
        dest_dir = self.image_root / env.name / str(env.version)
        dest_dir.mkdir(parents=True, exist_ok=True)
        base = Path(str(source)).name or "image"
        dest = dest_dir / base
        tmp = dest.with_suffix(dest.suffix + ".part")
        h = hashlib.sha256()
        size = 0
        try:
            if isinstance(source, Path):
                src_ctx = open(source, "rb")
            else:
                src_ctx = urllib.request.urlopen(source, timeout=60)  # noqa: S310 - the admin's URL
            with src_ctx as src, open(tmp, "wb") as out:
                while chunk := src.read(1 << 20):
                    h.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise CatalogError(f"cannot read image {source}: {exc}") from exc
        digest = h.hexdigest()
        if env.sha256 and env.sha256 != digest:
            tmp.unlink(missing_ok=True)
            raise CatalogError(f"image {source}: sha256 is {digest}, the description says {env.sha256}")
        tmp.rename(dest)
        stored = Environment.from_json({**env.to_json(), "sha256": digest, "size": size, "image_path": str(dest.relative_to(self.image_root))})
        self._db.execute("INSERT INTO environments VALUES (?, ?, ?, ?, ?)",
                         (stored.name, stored.version, stored.owner, stored.visibility, json.dumps(stored.to_json())))
        return stored

    def _get(self, name: str, version: int | None) -> Environment | None:
        if version is None:
            row = self._db.execute("SELECT body FROM environments WHERE name=? ORDER BY version DESC LIMIT 1", (name,)).fetchone()
        else:
            row = self._db.execute("SELECT body FROM environments WHERE name=? AND version=?", (name, version)).fetchone()
        return Environment.from_json(json.loads(row[0])) if row else None

    def get(self, ref: str, user: str = "", admin: bool = True) -> Environment:
        """Return NAME or NAME:VERSION (latest when no version) if the user may see it."""
        name, _, ver = ref.partition(":")
        try:
            version = int(ver) if ver else None
        except ValueError as exc:
            raise CatalogError(f"bad environment version in {ref!r}") from exc
        env = self._get(name, version)
        if env is None or not env.visible_to(user, admin):
            raise CatalogError(f"no environment {ref!r}")
        return env

    def list(self, user: str = "", admin: bool = True) -> list[Environment]:
        """Return every environment the user may see."""
        rows = self._db.execute("SELECT body FROM environments ORDER BY name, version").fetchall()
        envs = [Environment.from_json(json.loads(r[0])) for r in rows]
        return [e for e in envs if e.visible_to(user, admin)]

    def remove(self, ref: str, user: str, admin: bool) -> Environment:
        """Remove an environment and its image; only its owner or an admin may."""
        env = self.get(ref, user, admin)
        if not admin and env.owner != user:
            raise CatalogError(f"{env.ref} belongs to {env.owner}")
        self._db.execute("DELETE FROM environments WHERE name=? AND version=?", (env.name, env.version))
        shutil.rmtree(self.image_root / env.name / str(env.version), ignore_errors=True)
        return env

    def image_file(self, env: Environment) -> Path:
        """Return the stored image's path."""
        return self.image_root / env.image_path
