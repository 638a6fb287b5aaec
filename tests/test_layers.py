"""mpp's subpackages are layers (docs/architecture.md): a module imports only from its own layer or the
layers below it, and no two modules import each other, directly or around a loop. Every import counts:
at the top, inside a function, or under TYPE_CHECKING."""
from __future__ import annotations

import ast
from pathlib import Path

from helpers.imports import imported_modules

REPO = Path(__file__).resolve().parents[1]
# Lowest first: each may import from those before it, never from those after it.
LAYERS = ("core", "data", "model", "run", "eval", "train", "report", "bench")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(tree: ast.AST, known: set[str]) -> set[str]:
    """The mpp modules an AST imports: `from mpp.x import y` names mpp.x.y when that is a module."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("mpp."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mpp" and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if f"{node.module}.{alias.name}" in known)
    return {name for name in found if name in known}


def graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """Module → the mpp modules it imports (a package's __init__ counts as a module of its own)."""
    known = set(sources)
    return {name: imports_of(ast.parse(src), known) - {name} for name, src in sources.items()}


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def upward(edges: dict[str, set[str]]) -> list[str]:
    return [f"{a} (layer {LAYERS[layer_of(a)]}) imports {b} (layer {LAYERS[layer_of(b)]})"
            for a, deps in sorted(edges.items()) for b in sorted(deps)
            if layer_of(a) is not None and layer_of(b) is not None and layer_of(b) > layer_of(a)]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected set of more than one module (Tarjan's algorithm)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def mpp_sources() -> dict[str, str]:
    return {module_name(p): p.read_text() for p in sorted((REPO / "mpp").rglob("*.py"))}


def test_every_module_lives_in_a_layer():
    """No flat module beside the layers, and no folder the layer list does not name."""
    stray = [name for name in mpp_sources() if name != "mpp" and layer_of(name) is None]
    assert not stray, f"modules outside the layers {LAYERS} (move each into the lowest layer it fits): {stray}"


def test_no_module_imports_a_higher_layer():
    bad = upward(graph(mpp_sources()))
    assert not bad, "imports from a higher layer (move the shared code down):\n" + "\n".join(bad)


def test_no_import_cycles():
    found = cycles(graph(mpp_sources()))
    assert not found, f"modules that import each other (break each loop): {found}"


def test_triton_kernels_import_nothing_of_mpp():
    """The kernels are the bottom of everything: mpp.model.ops uses them, never the other way round."""
    bad = [str(p.relative_to(REPO)) for p in (REPO / "triton_kernels").rglob("*.py")
           if "mpp" in {n.split(".")[0] for n in imported_modules(ast.parse(p.read_text()))}]
    assert not bad, f"triton_kernels modules importing mpp: {bad}"


def test_the_checks_see_a_violation():
    """An upward import (core → train, even inside a function) and a loop of two are both found."""
    sources = {
        "mpp.core.a": "def f():\n    from mpp.train.b import g\n",
        "mpp.train.b": "from mpp.core import a\n",
        "mpp.data.c": "import mpp.data.d\n",
        "mpp.data.d": "from mpp.data.c import x\n",
    }
    edges = graph(sources)
    assert upward(edges) == ["mpp.core.a (layer core) imports mpp.train.b (layer train)"]
    assert sorted(map(tuple, cycles(edges))) == [("mpp.core.a", "mpp.train.b"), ("mpp.data.c", "mpp.data.d")]
    assert layer_of("mpp.flat") is None
