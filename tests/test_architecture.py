"""The architecture as tests: dependencies point one way (import-linter's contracts in pyproject.toml) and no
module imports a module that imports it back, at any distance, anywhere in the project."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("domain", "ipxe", "netboot", "broadcast", "appliance", "vmtestbed", "deployenv")


def test_import_linter_contracts_are_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "Contracts: 6 kept, 0 broken." in done.stdout


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the strongly connected components with more than one module (import cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_between_any_modules() -> None:
    graph = grimp.build_graph(*PACKAGES)
    edges = {m: {i for i in graph.find_modules_directly_imported_by(m) if i.split(".")[0] in PACKAGES}
             for m in graph.modules}
    assert strongly_connected(edges) == []


def test_no_production_code_uses_asyncio_wait_for() -> None:
    """domain.aio.within instead: Python 3.11's wait_for drops a cancel that meets a completed wait (gh-86296), and a
    cancelled deployment went on running. (The vm-testbed guards its boots itself: vmtestbed.firmware.)"""
    offenders = [f"{path.relative_to(ROOT)}:{n}" for package in ("domain", "ipxe", "netboot", "broadcast", "appliance", "deployenv")
                 for path in sorted((ROOT / package).rglob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1) if "asyncio.wait_for(" in line]
    assert offenders == []
