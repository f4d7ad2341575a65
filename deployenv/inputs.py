"""The inputs of a deploy-environment build and their hash (the cache key)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from importlib.util import find_spec
from pathlib import Path

from deployenv import recipe

DATA_FILES = ("init", "udhcpc.script")


@dataclass(frozen=True)
class BuildInputs:
    """Everything that decides the bytes of a deploy environment."""

    authorized_keys: str  # OpenSSH public key lines (the appliance's deploy key, and the tree key's public half)
    tree_key: bytes | None  # OpenSSH private key the agents open the next tree-exec level with, or None
    data: tuple[tuple[str, bytes], ...]  # init and udhcpc.script, as shipped with this package
    project: tuple[tuple[str, bytes], ...]  # (path under /usr/lib/rackboot, content) of the copied packages

    def digest(self) -> str:
        """Return the cache key: sha256 over the recipe, the scripts, the project files and the keys (16 hex digits)."""
        h = hashlib.sha256()
        head = {"suite": recipe.SUITE, "version": recipe.RECIPE_VERSION, "packages": recipe.PACKAGES,
                "modules": recipe.MODULES, "trim": recipe.TRIM, "project": recipe.PROJECT_PACKAGES,
                "localboot": [recipe.LOCALBOOT_CFG, recipe.LOCALBOOT_MODULES, recipe.LOCALBOOT_PREFIX, "early prefix"]}
        h.update(json.dumps(head, sort_keys=True).encode())
        for name, content in (*self.data, *self.project, ("authorized_keys", self.authorized_keys.encode()),
                              ("tree_key", self.tree_key or b"")):
            h.update(f"\0{name}\0{len(content)}\0".encode())
            h.update(content)
        return h.hexdigest()[:16]


def package_data(name: str) -> bytes:
    """Return one of the files shipped in deployenv/data (the init script, the udhcpc hook)."""
    return resources.files("deployenv").joinpath("data", name).read_bytes()


def project_files() -> tuple[tuple[str, bytes], ...]:
    """Return the .py files of the project packages the agent needs, from where this checkout imports them."""
    files: list[tuple[str, bytes]] = []
    for package in recipe.PROJECT_PACKAGES:
        spec = find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"cannot find the {package!r} package to copy into the deploy environment")
        root = Path(list(spec.submodule_search_locations)[0])
        for path in sorted(root.rglob("*.py")):
            files.append((f"{package}/{path.relative_to(root).as_posix()}", path.read_bytes()))
    return tuple(files)


def collect(authorized_keys: str, tree_key: bytes | None) -> BuildInputs:
    """Gather the inputs of a build with these keys."""
    keys = "\n".join(line.strip() for line in authorized_keys.splitlines() if line.strip()) + "\n"
    return BuildInputs(authorized_keys=keys, tree_key=tree_key, data=tuple((n, package_data(n)) for n in DATA_FILES),
                       project=project_files())
