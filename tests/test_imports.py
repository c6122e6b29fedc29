"""The package's import graph: every module imports alone, and no two modules import each other
(directly or through others), counting imports inside functions too."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fxsparse"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The fxsparse modules ``path`` imports, anywhere in the file (``from fxsparse import x``
    counts as importing ``fxsparse.x`` when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    # a package's __init__ re-exports its modules: it may import them, they must not need it
    return {name: _imports(path, modules) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle among modules that are not package ``__init__``s (an ``__init__`` importing its
    own submodules is the ordinary re-export), or None."""
    packages = {name for name in graph if (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()}
    edges = {m: {d for d in deps if d not in packages} for m, deps in graph.items() if m not in packages}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for dep in sorted(edges.get(module, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(edges):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_no_module_imports_itself_through_another():
    graph = import_graph()
    assert "fxsparse.graph_module" in graph and "fxsparse.accounting" in graph["fxsparse.graph_module"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"fxsparse.a": {"fxsparse.b"}, "fxsparse.b": {"fxsparse.c"}, "fxsparse.c": {"fxsparse.a"}}) == [
        "fxsparse.a", "fxsparse.b", "fxsparse.c", "fxsparse.a"]
    assert find_cycle({"fxsparse.a": {"fxsparse.b"}, "fxsparse.b": set()}) is None


@pytest.mark.parametrize("module", sorted(import_graph()))
def test_each_module_imports_alone(module):
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
