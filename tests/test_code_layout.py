"""The shape of the code, kept: packages by job, small files and functions, no import cycles.

Read from the source with ``ast`` (nothing is imported): every ``import`` counts, also the
ones inside functions and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ("sharded_ams", "launcher")
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 100
MAX_LAUNCHER_TOP_MODULES = 6  # the CLI entry, config and the like; the rest in packages by job


def _modules(*dirs: str) -> dict[str, Path]:
    """Dotted module name -> file, for the packages in ``dirs`` (benchmarks: flat scripts)."""
    out = {}
    for d in dirs:
        for p in sorted((ROOT / d).rglob("*.py")):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if d == "benchmarks":
                parts = parts[1:]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of ``mods`` it imports (relative imports resolved)."""
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        seen: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                seen.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[:len(pkg.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                seen.add(base)
                seen.update(f"{base}.{a.name}" for a in node.names)
        edges[name] = {m for m in seen if m in mods and m != name}
    return edges


def mutual_imports(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a in edges for b in edges[a] if a < b and a in edges.get(b, ()))


def test_import_graph_sees_cycles(tmp_path):
    """The checker itself: a planted pair importing each other (one under TYPE_CHECKING,
    one relative and inside a function) is found; a one-way import is not a cycle."""
    src = {"a": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import X\n",
           "b": "def f():\n    from .a import Y\n", "c": "import pkg.a\n"}
    mods = {}
    for name, text in src.items():
        (tmp_path / f"{name}.py").write_text(text)
        mods[f"pkg.{name}"] = tmp_path / f"{name}.py"
    assert mutual_imports(import_graph(mods)) == [("pkg.a", "pkg.b")]


@pytest.mark.parametrize("dirs", [LIBRARY, ("benchmarks",)], ids=["library", "benchmarks"])
def test_no_two_modules_import_each_other(dirs):
    assert mutual_imports(import_graph(_modules(*dirs))) == []


def test_library_does_not_import_launcher_or_benchmarks():
    """benchmarks -> launcher -> sharded_ams: no upward arrows."""
    edges = import_graph(_modules(*LIBRARY))
    up = [(a, b) for a, bs in edges.items() if a.startswith("sharded_ams") for b in bs
          if b.startswith("launcher")]
    assert up == []


def test_files_and_functions_are_small():
    long_files, long_functions = [], []
    for d in LIBRARY:
        for p in sorted((ROOT / d).rglob("*.py")):
            text = p.read_text()
            if text.count("\n") > MAX_FILE_LINES:
                long_files.append(f"{p.relative_to(ROOT)}: {text.count(chr(10))} lines")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        long_functions.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert long_files == [], f"split by job (over {MAX_FILE_LINES} lines)"
    assert long_functions == [], f"split into named steps (over {MAX_FUNCTION_LINES} lines)"


def test_launcher_is_grouped_by_job():
    top = sorted(p.name for p in (ROOT / "launcher").glob("*.py"))
    assert len(top) <= MAX_LAUNCHER_TOP_MODULES, top
    for pkg in sorted(p.parent for p in (ROOT / "launcher").glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse((pkg / "__init__.py").read_text()))
        assert doc, f"{pkg.name}/__init__.py must say what the package owns"
