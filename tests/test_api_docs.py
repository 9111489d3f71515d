"""The API reference (docs/build_api.py, pdoc) builds from the docstrings with no warning and no
broken cross-reference, as CI runs it."""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _builder():
    spec = importlib.util.spec_from_file_location("build_api", ROOT / "docs" / "build_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_api_reference_builds(tmp_path):
    pytest.importorskip("pdoc", reason="pdoc is in the [test] extra")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "build_api.py"), str(tmp_path / "api")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    pages = {p.relative_to(tmp_path / "api").as_posix() for p in (tmp_path / "api").rglob("*.html")}
    for page in (
        "chinese_clip_jax/inference/encoding.html",
        "chinese_clip_jax/sharding.html",
        "chinese_clip_jax/modeling/clip.html",
    ):
        assert page in pages
    encoding_page = (tmp_path / "api" / "chinese_clip_jax" / "inference" / "encoding.html").read_text(encoding="utf-8")
    assert "pad_to_bucket" in encoding_page and "text_fn" in encoding_page


def test_broken_reference_is_reported(tmp_path, monkeypatch):
    (tmp_path / "refs_example.py").write_text(
        textwrap.dedent('''
            """Uses ``encoding.pad_to_bucket``, ``chinese_clip_jax.sharding.shard_params`` and
            ``metrics.jsonl`` (a file name), but also ``encoding.pad_to_buckets`` and
            ``chinese_clip_jax.sharding.no_such_name``."""
            from chinese_clip_jax.inference import encoding

            def f():
                """See ``encoding.model_pixel``."""
        '''),
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    problems = _builder().unresolved_references(["refs_example"])
    assert problems == [
        "refs_example: docstring names chinese_clip_jax.sharding.no_such_name, which does not exist",
        "refs_example: docstring names encoding.model_pixel, which does not exist",
        "refs_example: docstring names encoding.pad_to_buckets, which does not exist",
    ]
