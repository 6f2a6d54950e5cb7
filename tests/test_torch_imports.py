"""No import cycles in the project's packages (issue 9): the imports of every module of ``curvopt``,
``torch_backend``, ``jax_backend`` and ``benchmarks`` are read with ``ast`` (module level, inside functions and
in ``if TYPE_CHECKING:`` blocks: a static dependency in a circle is a cycle too), resolved to project modules,
and the graph must have no cycle.

A module's implicit imports of its own parent packages (``from . import x`` in ``pkg/a.py``) are not edges:
Python runs the package ``__init__`` first, so they cannot form a cycle at import time."""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("curvopt", "torch_backend", "jax_backend", "benchmarks")


def _modules() -> dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        base = os.path.join(ROOT, pkg)
        for dirpath, _, files in os.walk(base):
            for f in files:
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(dirpath, f)
    return out


def _imports(name: str, path: str, modules: dict[str, str]) -> set[str]:
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    is_pkg = path.endswith("__init__.py")
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            for a in node.names:
                found.add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            for a in node.names:
                found.add(f"{base}.{a.name}")  # a submodule imported by name
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    ancestors = {".".join(name.split(".")[:k]) for k in range(1, name.count(".") + 1)}
    if is_pkg:
        ancestors.discard(name)
    edges = set()
    for target in found:
        # the longest prefix that is a project module (``curvopt.rules.CDATRule`` -> ``curvopt.rules``)
        parts = target.split(".")
        for k in range(len(parts), 0, -1):
            cand = ".".join(parts[:k])
            if cand in modules:
                if cand != name and cand not in ancestors:
                    edges.add(cand)
                break
    return edges


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_the_import_walker_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle(package):
    graph = _graph()
    assert any(m.split(".")[0] == package for m in graph), package
    bad = [c for c in _cycles(graph) if any(m.split(".")[0] == package for m in c)]
    assert not bad, f"import cycles through {package}: {bad}"


def test_torch_oracles_do_not_import_the_tuner():
    graph = _graph()
    for mod in ("torch_backend.oracles", "torch_backend.probe", "torch_backend.sharpness"):
        assert "torch_backend.tuner" not in graph[mod], mod
