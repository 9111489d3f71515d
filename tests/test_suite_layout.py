"""The test suite's own shape, read with ``ast`` (nothing is imported):

* tests/ mirrors the package: each folder is named after a subpackage of ``chinese_clip_jax`` (or
  ``benchmarks``, for the scripts in bench/: a folder named ``bench`` would shadow them, as
  ``tests/`` is on ``sys.path``) and is a package (``__init__.py``), so basenames may repeat;
* each helper has one home: no top-level function or class (helpers, fixtures) is defined in two
  files of the suite; shared ones live in ``_makers.py``, ``_train_helpers.py`` or ``conftest.py``;
* test files do not import each other (a test file is not a library).
"""

import ast
import collections
import os

from _makers import REPO, TESTS

# The subprocess scripts' entry points share a name on purpose.
SCRIPT_ENTRY_POINTS = {"main"}


def _suite_files():
    for dirpath, dirnames, files in os.walk(TESTS):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for f in sorted(files):
            if f.endswith(".py") and f != "__init__.py":
                yield os.path.join(dirpath, f)


def _top_level_defs(path):
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if not node.name.startswith("test_") and node.name not in SCRIPT_ENTRY_POINTS:
                yield node.name


def test_folders_mirror_the_package():
    package = os.listdir(os.path.join(REPO, "chinese_clip_jax"))
    allowed = {d for d in package if not d.startswith(("_", "."))} | {"benchmarks"}
    for d in ("bench", "train", "convert", "docs", "chinese_clip_jax"):  # would shadow the checkout's
        assert not os.path.exists(os.path.join(TESTS, d)), f"tests/{d}/ shadows {d}/: tests/ is on sys.path"
    for d in sorted(os.listdir(TESTS)):
        path = os.path.join(TESTS, d)
        if not os.path.isdir(path) or d.startswith((".", "_")):
            continue
        assert d in allowed, f"tests/{d}/ is named after no subpackage of chinese_clip_jax (nor benchmarks)"
        assert os.path.isfile(os.path.join(path, "__init__.py")), f"tests/{d}/ needs an __init__.py"
        for f in os.listdir(path):
            assert not (f.endswith(".py") and f.startswith("_") and f != "__init__.py"), (
                f"tests/{d}/{f}: shared helpers and scripts live in tests/ itself"
            )


def test_no_helper_is_defined_in_two_files():
    homes = collections.defaultdict(list)
    for path in _suite_files():
        for name in _top_level_defs(path):
            homes[name].append(os.path.relpath(path, REPO))
    twice = {name: files for name, files in homes.items() if len(files) > 1}
    assert not twice, f"defined in more than one file (move it to tests/_makers.py or conftest.py): {twice}"


def test_test_files_do_not_import_each_other():
    for path in _suite_files():
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                last = name.rsplit(".", 1)[-1]
                assert not last.startswith("test_"), f"{os.path.relpath(path, REPO)} imports {name}"
