"""Builds the API reference (HTML, with pdoc) from the library's docstrings.

    python docs/build_api.py build/api        # then open build/api/index.html

Every module of ``chinese_clip_jax`` gets a page (packages' ``__all__`` lists names, not which
submodules to document, so the modules are listed here explicitly). The build fails (exit 1,
one line per problem) on any warning pdoc raises (a module that does not import, a docstring
or annotation it cannot read) and on any broken cross-reference in a docstring
(``unresolved_references``).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import pkgutil
import re
import sys
import types
import warnings
from pathlib import Path

PACKAGE = "chinese_clip_jax"


def module_names() -> list[str]:
    import chinese_clip_jax

    names = [PACKAGE]
    for info in pkgutil.walk_packages(chinese_clip_jax.__path__, PACKAGE + "."):
        if info.name.startswith(f"{PACKAGE}.training.recipes."):
            continue  # the recipe files: config, documented by their package (and ccj-train --help)
        if not info.name.rsplit(".", 1)[-1].startswith("_"):
            names.append(info.name)
    return sorted(names)


_SPAN = re.compile(r"`{1,2}([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?:\(\))?`{1,2}")
_FILE_SUFFIXES = {"json", "jsonl", "txt", "py", "md", "safetensors", "tsv", "bin", "pt", "msgpack", "png", "jpg"}


def _docstrings(source: str):
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield doc


def _resolve(obj, attrs: list[str]) -> bool:
    for a in attrs:
        if hasattr(obj, a):
            obj = getattr(obj, a)
        elif isinstance(obj, types.ModuleType):
            try:
                obj = importlib.import_module(f"{obj.__name__}.{a}")
            except ModuleNotFoundError:
                return False
        else:
            return False
    return True


def unresolved_references(modules: list[str]) -> list[str]:
    """Dotted names in docstrings that point into this package but resolve to nothing (a typo, a
    renamed function): ``chinese_clip_jax.x.y`` anywhere, and ``m.y`` where the documented
    module binds ``m`` to one of the package's modules (``from . import encoding``)."""
    problems = []
    for name in modules:
        module = importlib.import_module(name)
        source = Path(module.__file__).read_text(encoding="utf-8")
        for doc in _docstrings(source):
            for ref in _SPAN.findall(doc):
                head, *rest = ref.split(".")
                if rest[-1] in _FILE_SUFFIXES:
                    continue
                if head == PACKAGE:
                    target = importlib.import_module(PACKAGE)
                else:
                    target = getattr(module, head, None)
                    if not (isinstance(target, types.ModuleType) and target.__name__.startswith(PACKAGE)):
                        continue
                if not _resolve(target, rest):
                    problems.append(f"{name}: docstring names {ref}, which does not exist")
    return sorted(set(problems))


_ANNOTATION = re.compile(r"Error parsing type annotation .* for ([\w.]+)\.__init__\.")


def _namedtuple_init(message: str) -> bool:
    """pdoc cannot evaluate the string annotations (``from __future__ import annotations``) of a
    NamedTuple's generated ``__init__`` (its globals are not the module's): not a docs error.
    The class's own fields, documented from the module, still resolve."""
    m = _ANNOTATION.match(message)
    if not m:
        return False
    module_name, _, cls_name = m.group(1).rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name, None)
    return isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields")


def build(out: Path) -> list[str]:
    import pdoc
    import pdoc.render

    pdoc.render.configure(docformat="restructuredtext", show_source=False)
    modules = module_names()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*modules, output_directory=out)
    problems = [
        f"pdoc: {str(w.message).splitlines()[0]}"
        for w in caught
        if not issubclass(w.category, DeprecationWarning) and not _namedtuple_init(str(w.message))
    ]
    return problems + unresolved_references(modules)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output directory (created)")
    args = parser.parse_args(argv)
    problems = build(args.out)
    for p in problems:
        print(p, file=sys.stderr)
    print(f"API reference: {args.out / 'index.html'} ({len(module_names())} modules, {len(problems)} problems)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
