"""The house rules of samdiffsr/, checked on the source: module and function sizes, one import style, and
imports that only run one way (no circle, nothing imports the launchers, models import no data code)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "samdiffsr"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 350, 60


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every samdiffsr module this file imports, at any depth (deferred imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("samdiffsr"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("samdiffsr"))
    known = {module_name(p) for p in MODULES}
    return {name for name in found if name in known}


def test_modules_and_functions_stay_small():
    too_long = [f"{p.relative_to(PACKAGE)}: {n} lines" for p in MODULES
                if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: {length} lines")
    assert not too_long


def test_imports_are_absolute():
    relative = [f"{p.relative_to(PACKAGE)}:{n.lineno}" for p in MODULES for n in ast.walk(ast.parse(p.read_text()))
                if isinstance(n, ast.ImportFrom) and n.level > 0]
    assert not relative


def test_no_import_circle():
    graph = {module_name(p): imports_of(p) - {module_name(p)} for p in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph.get(name, ())):
            if dep.startswith(name + "."):  # a package importing its own modules is not a circle
                continue
            if state.get(dep) == 1:
                pytest.fail("import circle: " + " -> ".join([*path[path.index(dep):], dep]))
            if dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("lower, upper", [
    ("samdiffsr.models", "samdiffsr.data"), ("samdiffsr.models", "samdiffsr.sharding"),
    ("samdiffsr.models", "samdiffsr.train"), ("samdiffsr.models", "samdiffsr.evaluation"),
    ("samdiffsr.data", "samdiffsr.train"), ("samdiffsr.data", "samdiffsr.evaluation"),
    ("samdiffsr.data", "samdiffsr.sharding"), ("samdiffsr.sharding", "samdiffsr.train"),
    ("samdiffsr.sharding", "samdiffsr.demo"), ("samdiffsr.masks", "samdiffsr.sharding"),
    ("samdiffsr.train", "samdiffsr.evaluation.benchmark_cli"), ("samdiffsr.evaluation", "samdiffsr.train"),
])
def test_arrows_point_one_way(lower, upper):
    wrong = [f"{module_name(p)} imports {dep}" for p in MODULES if module_name(p).startswith(lower)
             for dep in imports_of(p) if dep.startswith(upper)]
    assert not wrong
