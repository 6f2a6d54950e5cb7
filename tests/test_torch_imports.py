"""The project's import structure (issue 9). No import cycles: the imports of every module of ``curvopt``,
``torch_backend``, ``jax_backend`` and ``benchmarks`` are read with ``ast`` (module level, inside functions and
in ``if TYPE_CHECKING:`` blocks: a static dependency in a circle is a cycle too), resolved to project modules,
and the graph must have no cycle.

A module's implicit imports of its own parent packages (``from . import x`` in ``pkg/a.py``) are not edges:
Python runs the package ``__init__`` first, so they cannot form a cycle at import time.

And every name a module's ``__all__`` lists is bound at its top level (else ``from module import *`` raises)."""
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


def _defined_names(tree: ast.Module) -> set[str] | None:
    """The names a module binds at its top level (None when it star-imports: unknown)."""
    names: set[str] = set()
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.If, ast.Try)):  # module-level branches bind names too
            stack.extend(node.body + node.orelse + getattr(node, "finalbody", [])
                         + [s for h in getattr(node, "handlers", []) for s in h.body])
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                if a.name == "*":
                    return None
                names.add(a.asname or a.name.split(".")[0])
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


def test_every_name_in_all_is_defined():
    """``from module import *`` raises AttributeError for a name ``__all__`` lists but the module does not bind
    (``torch_backend.tuner`` listed two names it only imported in another module)."""
    bad = []
    for name, path in _modules().items():
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        listed = [n for node in tree.body if isinstance(node, ast.Assign)
                  for t in node.targets if isinstance(t, ast.Name) and t.id == "__all__"
                  for n in ast.literal_eval(node.value)]
        defined = _defined_names(tree)
        if defined is not None:
            bad += [f"{name}.{n}" for n in listed if n not in defined]
    assert not bad, f"listed in __all__ but not defined: {bad}"


@pytest.mark.parametrize("entry,package,framework,extra", [("curvopt.torch", "torch_backend", "torch", "torch"),
                                                           ("curvopt.optax", "jax_backend", "optax", "jax")])
def test_entry_points_say_what_to_install_and_what_shadows_them(tmp_path, entry, package, framework, extra):
    """Found installing the wheel: a framework left out gave ``No module named 'torch'`` (not the extra), and a
    user's ``torch_backend.py`` beside the script gave ``cannot import name 'CDAT' from 'curvopt.torch'``."""
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=ROOT)
    missing = f"import sys; sys.modules[{framework!r}] = None; import {entry}"
    out = subprocess.run([sys.executable, "-c", missing], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode != 0 and f"pip install 'curvopt[{extra}]'" in out.stderr, out.stderr[-2000:]
    (tmp_path / f"{package}.py").write_text("raise SystemExit('the shadowing module was run')\n")
    shadowed = f"import sys; sys.path.insert(0, ''); import {entry}"
    out = subprocess.run([sys.executable, "-c", shadowed], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode != 0 and f"{package}.py is found first" in out.stderr, out.stderr[-2000:]
    # a checkout linked into another folder (found through its links) imports; a module of the name in a folder
    # beside the backends (a checkout's examples/) is refused too (the first check compared grandparent folders)
    farm = tmp_path / "farm"
    (farm / "examples").mkdir(parents=True)
    for name in ("curvopt", "torch_backend", "jax_backend"):
        (farm / name).symlink_to(os.path.join(ROOT, name))
    env = dict(os.environ, PYTHONPATH=str(farm))
    out = subprocess.run([sys.executable, "-c", f"import {entry}"], env=env, capture_output=True, text=True,
                         cwd=farm / "examples")
    assert out.returncode == 0, out.stderr[-2000:]
    (farm / "examples" / f"{package}.py").write_text("raise SystemExit('the shadowing module was run')\n")
    out = subprocess.run([sys.executable, "-c", shadowed], env=env, capture_output=True, text=True,
                         cwd=farm / "examples")
    assert out.returncode != 0 and f"{package}.py is found first" in out.stderr, out.stderr[-2000:]
