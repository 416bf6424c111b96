"""The registry package has no import cycle, and each of its modules imports on its own in a
fresh interpreter (so no module works only because another was imported first)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import registry

PACKAGE = Path(registry.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def registry_modules() -> dict[str, Path]:
    # Alembic's env.py and revisions are scripts alembic loads by path, not importable modules.
    return {
        module_name(p): p
        for p in sorted(PACKAGE.rglob("*.py"))
        if "migrations" not in p.relative_to(PACKAGE).parts[:1] or p.name == "__init__.py"
    }


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every registry module `path` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in known}
    return found


def test_registry_import_graph_has_no_cycle() -> None:
    modules = registry_modules()
    graph = {m: imports_of(p, set(modules)) - {m} for m, p in modules.items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = path[path.index(module) :] + [module]
            raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
        if module in done:
            return
        for dep in sorted(graph[module]):
            visit(dep, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert "registry.files" in graph["registry.schema"]  # the walk saw real edges


def test_each_registry_module_imports_alone() -> None:
    procs = {
        m: subprocess.Popen(
            [sys.executable, "-c", f"import {m}"], stderr=subprocess.PIPE, text=True
        )
        for m in registry_modules()
    }
    failed = {}
    for module, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        if proc.returncode != 0:
            failed[module] = err.strip().splitlines()[-1:]
    assert failed == {}
