"""The package's import graph has no cycle, deferred (function-level) imports included.

A cycle hidden by a deferred import still ties two modules together: neither can be read,
tested or moved without the other. The graph is built with ``ast`` from every module of the
distribution (``alcot.<folder>`` for each package folder), one edge per import of a module of
the distribution: ``from .x import y`` is an edge to ``x.y`` when that is a module, else to
``x``; importing a package is an edge to its ``__init__``. Imports under ``if TYPE_CHECKING:``
never run and are left out.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def package_dirs() -> dict[str, Path]:
    """``alcot.<name>`` -> folder, from pyproject's package-dir (the distribution's own map)."""
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: ROOT / path for name, path in cfg["package-dir"].items()}


def modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in package_dirs().items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        here = name if is_pkg else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        typing_only = {
            id(n)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING")
            for stmt in block.body
            for n in ast.walk(stmt)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                for a in node.names:
                    sub = f"{mod}.{a.name}"
                    targets.append(sub if sub in mods else mod)
            for t in targets:
                while t and t not in mods:  # `import alcot.model.x.y` names a module above
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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
            visit(v)
    return out


def test_the_graph_sees_deferred_imports():
    # A check that cannot fail is no check: a deferred import inside a function is an edge.
    graph = import_graph()
    assert len(graph) > 50
    assert any(graph.values())


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles (deferred imports included):\n" + "\n".join(
        " <-> ".join(c) for c in found
    )


def test_data_does_not_import_model():
    graph = import_graph()
    bad = sorted(
        f"{m} -> {t}"
        for m, ts in graph.items()
        if m.startswith("alcot.data")
        for t in ts
        if t.startswith("alcot.model")
    )
    assert not bad, bad
