"""Kernel modules: resolve the wanted ones and their dependencies from modules.dep, in a load order."""
from __future__ import annotations

from pathlib import Path


def module_name(path: str) -> str:
    """Return a module's name from its path in modules.dep (kernel/net/core/failover.ko.xz -> failover)."""
    name = path.rsplit("/", 1)[-1]
    for suffix in (".xz", ".zst", ".gz"):
        name = name.removesuffix(suffix)
    return name.removesuffix(".ko").replace("-", "_")


def read_modules_dep(path: Path) -> dict[str, tuple[str, list[str]]]:
    """Parse modules.dep: module name -> (its path, the paths of the modules it needs)."""
    table: dict[str, tuple[str, list[str]]] = {}
    for line in path.read_text().splitlines():
        if ":" not in line:
            continue
        mod, _, deps = line.partition(":")
        table[module_name(mod)] = (mod.strip(), deps.split())
    return table


def load_order(wanted: tuple[str, ...], dep_file: Path) -> tuple[list[str], list[str]]:
    """Return (paths relative to the modules dir of wanted modules and their deps, each after its deps; missing names).

    A module built into the kernel (absent from modules.dep, listed in modules.builtin beside it) is skipped
    silently; any other name not found is returned in the second list.
    """
    table = read_modules_dep(dep_file)
    builtin_file = dep_file.with_name("modules.builtin")
    builtin = {module_name(p) for p in builtin_file.read_text().split()} if builtin_file.is_file() else set()
    by_path = {path: name for name, (path, _) in table.items()}
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        path, deps = table[name]
        for dep in deps:  # modules.dep lists dependencies as paths
            visit(by_path.get(dep, module_name(dep)))
        order.append(path)

    missing = []
    for raw in wanted:
        name = raw.replace("-", "_")
        if name in table:
            visit(name)
        elif name not in builtin:
            missing.append(name)
    return order, missing
