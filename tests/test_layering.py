"""The package's layers: no import cycle inside escarda_lab, and the framework names no plugin."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

from escarda_lab import registry

PKG = Path(__file__).resolve().parents[1] / "escarda_lab"
MODULES = sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__init__")


def imports(module: str) -> set[str]:
    """Every module `module` imports anywhere (top level or inside a function), by full name."""
    tree = ast.parse((PKG / f"{module}.py").read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            if node.module == "escarda_lab":
                out |= {f"escarda_lab.{a.name}" for a in node.names}
    return out


def graph() -> dict[str, set[str]]:
    return {
        m: {i.split(".")[1] for i in imports(m) if i.startswith("escarda_lab.") and i.split(".")[1] in MODULES}
        for m in MODULES
    }


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
        ("compare", "grid"),
        ("grid", "accounting"),
    }
    bad = [(m, n) for m in MODULES for n in g[m] if n in entry_points and (m, n) not in allowed]
    assert bad == []


def test_no_escarda_lab_module_imports_or_names_a_plugin():
    registry.discover()
    plugins = set(registry.names())
    for m in MODULES:
        assert not [i for i in imports(m) if i.startswith("components.")], m
        tree = ast.parse((PKG / f"{m}.py").read_text())
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
        assert named == [], f"escarda_lab/{m}.py names plugins {named}"
