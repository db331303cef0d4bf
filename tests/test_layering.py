"""The package's layers: no import cycle inside escarda_lab, and the framework names no plugin."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

from escarda_lab import registry

PKG = Path(__file__).resolve().parents[1] / "escarda_lab"


def dotted(path: Path) -> str:
    """A module's name inside escarda_lab: `compare`, `grid.spec`, `grid` (its __init__)."""
    parts = path.relative_to(PKG).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {dotted(p): p for p in sorted(PKG.rglob("*.py")) if p.parent != PKG or p.stem != "__init__"}
MODULES = sorted(FILES)


def imports(module: str) -> set[str]:
    """Every module `module` imports anywhere (top level or inside a function), by full name."""
    tree = ast.parse(FILES[module].read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}  # `from pkg import module`
    return out


def owner(name: str) -> str | None:
    """The escarda_lab module an imported name lives in (the longest module prefix), or None."""
    parts = name.split(".")[1:] if name.startswith("escarda_lab.") else []
    found = [".".join(parts[:k]) for k in range(len(parts), 0, -1) if ".".join(parts[:k]) in FILES]
    return found[0] if found else None


def graph() -> dict[str, set[str]]:
    """module -> the escarda_lab modules it imports (a package's __init__ is its own node)."""
    return {m: {o for i in imports(m) if (o := owner(i)) is not None and o != m} for m in MODULES}


def test_every_module_imports():
    for m in MODULES:
        importlib.import_module(f"escarda_lab.{m}")


def test_no_import_cycle_inside_escarda_lab():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(g[m]):
            if state.get(n) == 1:
                cycles.append(path[path.index(n) :] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_library_modules_never_import_an_entry_point():
    entry_points = {"run", "bench", "compare", "evaluate", "generate", "export", "accounting", "lm_eval_adapter"}
    g = graph()
    # a CLI module may serve others as a library only through functions it defines for that
    allowed = {
        ("bench", "generate"),
        ("lm_eval_adapter", "generate"),
        ("lm_eval_adapter", "evaluate"),
        ("module", "evaluate"),
        ("run", "evaluate"),
        ("run", "accounting"),
        ("bench", "accounting"),
        ("run", "grid"),
        ("grid.matching", "accounting"),
    }
    bad = [(m, n) for m in MODULES for n in g[m] if n in entry_points and (m, n) not in allowed]
    assert bad == []


def test_no_escarda_lab_module_imports_or_names_a_plugin():
    registry.discover()
    plugins = set(registry.names())
    for m in MODULES:
        assert not [i for i in imports(m) if i.startswith("components.")], m
        tree = ast.parse(FILES[m].read_text())
        docstrings = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
            and n.body
            and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant)
        }
        named = [
            n.value
            for n in ast.walk(tree)
            if isinstance(n, ast.Constant)
            and isinstance(n.value, str)
            and id(n) not in docstrings
            and (n.value in plugins or any(f"components.{p}" in n.value for p in plugins))
        ]
        assert named == [], f"{FILES[m]} names plugins {named}"
