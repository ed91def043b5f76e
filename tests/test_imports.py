"""The package's import graph: no cycles (lazy imports inside functions included), and every module
imports on its own in a fresh interpreter."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "nsa_codegen"
MODULES = sorted(p.stem for p in PKG.glob("*.py") if p.stem not in ("__init__", "__main__"))


def _imports(module: str) -> set[str]:
    """nsa_codegen modules `module` imports anywhere in its text (relative or absolute)."""
    out = set()
    for node in ast.walk(ast.parse((PKG / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                out |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif node.module and node.module.startswith("nsa_codegen."):
                out.add(node.module.split(".")[1])
    return out & set(MODULES)


def test_no_import_cycles():
    graph = {m: _imports(m) - {m} for m in MODULES}

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return path + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None
    cycles = [c for c in map(cycle_from, MODULES) if c]
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone(module):
    r = subprocess.run([sys.executable, "-c", f"import nsa_codegen.{module}"], capture_output=True, text=True,
                       cwd=PKG.parent)
    assert r.returncode == 0, r.stderr[-2000:]


def _private_uses(module: str) -> list[str]:
    """Private names (a leading underscore) of other nsa_codegen modules that `module` imports or
    reads as module attributes (`reference._x`)."""
    tree = ast.parse((PKG / f"{module}.py").read_text())
    mods = {}  # local name -> nsa_codegen module it is bound to
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            for a in node.names:
                if node.module is None and a.name in MODULES:  # from . import reference
                    mods[a.asname or a.name] = a.name
                elif node.module and node.module.split(".")[0] in MODULES and a.name.startswith("_"):
                    out.append(f"from .{node.module} import {a.name}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in mods
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            out.append(f"{node.value.id}.{node.attr}")
    return out


@pytest.mark.parametrize("module", MODULES)
def test_no_module_uses_another_modules_private_names(module):
    assert _private_uses(module) == []
