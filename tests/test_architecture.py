"""The package's shape, read from its source with ``ast`` (nothing is imported):

* layers point down: a part of the library imports only parts below it (``LAYERS``), never the
  checkout's applications (train/, convert/, bench/);
* no import cycle between modules (imports inside functions count; ``if TYPE_CHECKING:`` blocks
  do not);
* no module but a package ``__init__`` re-exports names it imports (``__all__`` lists only what
  the module defines).
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = "chinese_clip_jax"

# part -> layer; a part may import its own layer's modules only within itself, and lower layers.
# docs/architecture.md draws the same order.
LAYERS = {
    "io": 0,
    "sharding": 0,  # mesh, logical-axis rules, placing params: inference and training
    "version": 0,
    "export": 0,  # the serving loader: jax + numpy + safetensors only (tests/test_export.py)
    "console": 0,  # library noise, progress bars
    "modeling": 1,
    "processing": 1,
    "conversion": 2,
    "inference": 3,
    "data": 4,
    "evaluation": 5,
    "training": 6,
    "embed": 7,
    "serve": 8,
}
APPLICATIONS = ("train", "convert", "bench", "tests")


def _modules() -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(os.path.join(ROOT, PKG)):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _walk(tree):
    """ast.walk without the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _imports(module: str) -> set[str]:
    """The modules (of any package) that ``module`` imports, as dotted names."""
    path = MODULES[module]
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    found = set()
    for node in _walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES}
            found.update(submodules)  # `from pkg import submodule` needs the submodule only
            if len(submodules) < len(node.names):
                found.add(target)
    return found


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else ""


def _internal(name: str) -> str | None:
    """The module of this package a dotted import name lands in (longest known prefix)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


GRAPH = {m: {t for t in map(_internal, _imports(m)) if t and t != m} for m in MODULES}


def test_every_part_has_a_layer():
    parts = {_part(m) for m in MODULES if m != PKG}
    assert parts <= set(LAYERS), f"parts without a layer in LAYERS: {sorted(parts - set(LAYERS))}"


def test_the_library_never_imports_the_applications():
    bad = [(m, name) for m in MODULES for name in _imports(m) if name.split(".")[0] in APPLICATIONS]
    assert not bad, bad


def test_layers_point_down():
    upward = []
    for m, targets in GRAPH.items():
        if m == PKG:
            continue
        for t in targets:
            if t == PKG:
                continue  # the top-level package (lazy names) sits above everything: see below
            pm, pt = _part(m), _part(t)
            if pm != pt and LAYERS[pt] >= LAYERS[pm]:
                upward.append(f"{m} -> {t}")
    assert not upward, "imports that do not point down:\n" + "\n".join(sorted(upward))


def test_only_the_applications_and_top_level_use_the_top_level_package():
    users = sorted(m for m, targets in GRAPH.items() if PKG in targets and m != PKG)
    assert users == [], f"library modules importing the top-level package (use the part itself): {users}"


def test_no_import_cycles():
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("module", sorted(m for m, p in MODULES.items() if not p.endswith("__init__.py")))
def test_no_module_re_exports_another_modules_names(module):
    tree = ast.parse(open(MODULES[module], encoding="utf-8").read())
    imported = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            imported.update(a.asname or a.name for a in node.names)
    exported = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            exported.update(ast.literal_eval(node.value))
    assert not (exported & imported), f"{module} re-exports {sorted(exported & imported)}"


def _private_imports(module: str) -> list[str]:
    """``from X import _name`` in ``module`` where X is another part of the library."""
    path = MODULES[module]
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = []
    for node in _walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package.split(".")
            target = ".".join(base[: len(base) - (node.level - 1)] + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if not target.startswith(PKG) or _part(target) == _part(module):
            continue
        found += [
            f"{module} imports {target}.{a.name}"
            for a in node.names
            if a.name.startswith("_") and not a.name.startswith("__")
        ]
    return found


def test_no_module_imports_another_parts_private_names():
    bad = [line for m in sorted(MODULES) for line in _private_imports(m)]
    assert not bad, "private names used across parts:\n" + "\n".join(bad)


def test_the_private_import_check_sees_one():
    """The check above reads relative imports as the interpreter does (a planted example)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write("def f():\n    from ..evaluation.sets import _text, open_retrieval\n")
        MODULES["chinese_clip_jax.embed.planted"] = path
        try:
            assert _private_imports("chinese_clip_jax.embed.planted") == [
                "chinese_clip_jax.embed.planted imports chinese_clip_jax.evaluation.sets._text"
            ]
        finally:
            del MODULES["chinese_clip_jax.embed.planted"]
