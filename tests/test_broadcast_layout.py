"""broadcast/ imports only domain, the stdlib and third-party packages, and none of its modules import each other in a cycle.

The graph is read from the source with ast (every import statement, at any level: function bodies and
`if TYPE_CHECKING:` blocks count too), so the test needs nothing beyond the stdlib; where grimp is
installed (it comes with import-linter) the same is checked against grimp's graph as well.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "broadcast"
FORBIDDEN = ("appliance", "netboot", "ipxe", "vmtestbed")  # the layers above broadcast


def imports_of(path: Path, module: str) -> set[str]:
    """Every module a source file imports (absolute names; `from pkg import name` counts pkg.name when it is a module)."""
    found: set[str] = set()
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def package_graph() -> dict[str, set[str]]:
    """broadcast's modules -> the modules they import (inside broadcast, and the top-level names outside it)."""
    files = {f"{PACKAGE}.{p.stem}" if p.stem != "__init__" else PACKAGE: p for p in (ROOT / PACKAGE).glob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        names = imports_of(path, module if path.stem != "__init__" else f"{PACKAGE}.__init__")
        graph[module] = {n for n in names if n in files and n != module} | {n.split(".")[0] for n in names if n.split(".")[0] != PACKAGE}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Modules of the package reachable from start by import chains."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt in graph and nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_import_cycle_in_broadcast() -> None:
    graph = package_graph()
    assert {"broadcast.receiver", "broadcast.relay", "broadcast.agent", "broadcast.texec"} <= set(graph)
    cycles = sorted(m for m in graph if m in reachable(graph, m))
    assert not cycles, f"modules in an import cycle: {cycles}"


def test_broadcast_imports_nothing_above_it() -> None:
    bad = {m: sorted(n for n in deps if n in FORBIDDEN) for m, deps in package_graph().items()}
    assert not {m: b for m, b in bad.items() if b}


def test_same_with_grimp() -> None:
    grimp = pytest.importorskip("grimp")
    g = grimp.build_graph(PACKAGE, "domain", *FORBIDDEN)
    modules = sorted(m for m in g.modules if m.startswith(PACKAGE + ".") or m == PACKAGE)
    assert [(a, b) for i, a in enumerate(modules) for b in modules[i + 1:]
            if g.chain_exists(a, b) and g.chain_exists(b, a)] == []
    assert [(m, x) for m in modules for x in g.find_modules_directly_imported_by(m) if x.split(".")[0] in FORBIDDEN] == []
