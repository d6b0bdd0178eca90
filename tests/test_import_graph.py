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


def top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
                names |= set(ast.literal_eval(node.value))  # a package's lazy names
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.If, ast.Try)):  # names bound under a guard at top level
            for sub in ast.walk(node):
                if isinstance(sub, (ast.FunctionDef, ast.ClassDef)):
                    names.add(sub.name)
                elif isinstance(sub, (ast.Import, ast.ImportFrom)):
                    names |= {(a.asname or a.name).split(".")[0] for a in sub.names}
                elif isinstance(sub, ast.Assign):
                    names |= {t.id for t in sub.targets if isinstance(t, ast.Name)}
    return names


def test_every_import_of_the_package_names_something_that_exists():
    # Deferred imports run only when their function does: a module moved or a name renamed
    # would fail there, at run time, in whatever command first reaches it. Checked here for
    # every module of the distribution and the test suite, with ast (nothing is imported).
    mods = modules()
    defined = {m: top_level_names(p) for m, p in mods.items()}
    sources = (
        list(mods.items())
        + [(f"tests.{p.stem}", p) for p in (ROOT / "tests").glob("*.py")]
        + [(f"bench.{p.stem}", p) for p in (ROOT / "bench").glob("*.py")]
    )
    bad = []
    for name, path in sources:
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                if not mod.startswith("alcot"):
                    continue
                if mod not in mods:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: no module {mod}")
                    continue
                for a in node.names:
                    if (
                        a.name != "*"
                        and a.name not in defined[mod]
                        and f"{mod}.{a.name}" not in mods
                    ):
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {mod} has no {a.name}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("alcot.") and a.name not in mods:
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: no module {a.name}")
    assert not bad, "\n".join(bad)


def test_no_two_classes_or_modules_share_a_name():
    # Two things of one name are read as one: a newcomer follows the wrong one. The standalone
    # modeling code shipped with Hugging Face exports (export/hf_remote/) re-implements the
    # model's classes for transformers on purpose and is left out; each package's `config`
    # module holds that package's section of the config.
    classes: dict[str, list[str]] = {}
    stems: dict[str, list[str]] = {}
    for path in modules().values():
        rel = str(path.relative_to(ROOT))
        if "hf_remote" in rel:
            continue
        if path.name != "__init__.py" and path.stem != "config":
            stems.setdefault(path.stem, []).append(rel)
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                classes.setdefault(node.name, []).append(rel)
    dup = {k: v for k, v in {**classes, **stems}.items() if len(v) > 1}
    assert not dup, dup
