"""The import graph of src/segmap: dependencies point down only.

Read with ``ast`` (nothing is imported): every import statement counts, at module level, inside functions and under
``TYPE_CHECKING`` alike, relative or absolute, because each is a dependency the reader has to follow. An import
names a module (``from .model import digest`` -> ``segmap.model.digest``) or, where the name is not a module, the
module it is taken from (``from ..model import ModelSpec`` -> ``segmap.model``, the package's ``__init__``). A
package's ``__init__`` re-exporting its submodules is an edge from the package to each of them, so a submodule that
imports its own package back (``from segmap.engine import Segmenter`` inside ``segmap.engine.x``) is a cycle, as it
is at run time. The parent packages Python initialises on the way to a module are not counted: they are not a
choice the importing code makes.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SRC = Path(__file__).resolve().parents[1] / "src"

#: Layers that must not know the application: the engine and the writers sit below the settings and the run.
LOWER = ("segmap.engine", "segmap.outputs")
#: What they must not import: the application's settings, the run layer (``segmap.run``, and ``segmap.pipeline``
#: while it exists) and the job service.
UPPER = ("segmap.settings", "segmap.run", "segmap.pipeline", "segmap.service")


def _modules(src: Path = SRC) -> dict[str, Path]:
    """Module name -> file, for every module of the ``segmap`` package (a package by its ``__init__``)."""
    out = {}
    for path in sorted((src / "segmap").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def import_graph(src: Path = SRC) -> dict[str, dict[str, int]]:
    """``{module: {imported segmap module: line of the first such import}}``."""
    modules = _modules(src)
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            for target in targets:
                # ``import segmap.a.b`` names segmap.a.b; an unknown tail (an attribute) falls back to its module
                while target and target not in modules and "." in target:
                    target = target.rpartition(".")[0]
                if target in modules and target != name:
                    edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _describe(graph: dict[str, dict[str, int]], component: list[str]) -> str:
    members = set(component)
    edges = [f"{a} -> {b} (line {line})" for a in component for b, line in sorted(graph[a].items()) if b in members]
    return " | ".join(edges)


def test_the_graph_reads_imports_of_every_kind(tmp_path):
    """The walker sees relative, absolute, function-level and TYPE_CHECKING imports, and a package's __init__."""
    pkg = tmp_path / "segmap"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .leaf import thing\n")
    (pkg / "sub" / "leaf.py").write_text("def f():\n    from .. import top\n")
    (pkg / "top.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import segmap.other\n")
    (pkg / "other.py").write_text("from segmap.sub import thing\n")
    graph = import_graph(tmp_path)
    assert graph["segmap.sub"] == {"segmap.sub.leaf": 1}
    assert graph["segmap.sub.leaf"] == {"segmap.top": 2}
    assert graph["segmap.top"] == {"segmap.other": 3}
    assert graph["segmap.other"] == {"segmap.sub": 1}
    assert cycles(graph) == [["segmap.other", "segmap.sub", "segmap.sub.leaf", "segmap.top"]]


def test_no_import_cycles_among_segmap_modules():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(_describe(graph, c) for c in found)


def test_engine_and_writers_do_not_import_the_application():
    """segmap.engine and segmap.outputs never import the settings, the run layer or the service: the run layer hands
    them plain values (EngineOptions, a writer's arguments)."""
    wrong = [f"{module} imports {target} (line {line})"
             for module, edges in sorted(import_graph().items()) if any(_within(module, p) for p in LOWER)
             for target, line in sorted(edges.items()) if any(_within(target, p) for p in UPPER)]
    assert not wrong, "\n".join(wrong)


def test_settings_and_engine_options_do_not_import_torch():
    """Listing settings (``--help``, ``app.yaml``, the README table) reads the engine's options without torch."""
    code = ("import sys, segmap.settings, segmap.engine.options, segmap.model; "
            "print(sorted(m for m in ('torch', 'segmap.engine.predictor') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_ground_floor_imports_nothing_of_segmap():
    """errors, volume, uids and text sit below everything: every layer may use them, they use none."""
    graph = import_graph()
    ground = ("segmap.errors", "segmap.volume", "segmap.uids", "segmap.text")
    assert {m: sorted(graph[m]) for m in ground if graph[m]} == {}
