"""The README's examples run as written: its ```python blocks in order, as one script, and the
lines of its ```bash blocks, in a scratch directory (so `build/...` paths land there), with this
environment's console scripts on PATH. A block right after `<!-- docs-test: skip (why) -->` is
not run (installs, `make`, commands that need real data); every skip must say why, and the
commands they hold are exercised by the tests the reason names."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = re.compile(r"<!-- docs-test: skip \((.+?)\) -->\s*$")
FENCE = re.compile(r"^```(\w*)\s*$")


def blocks(path: str) -> list[tuple[str, str, str | None]]:
    """(language, code, skip reason or None) for each fenced block of a Markdown file."""
    lines = open(path, encoding="utf-8").read().split("\n")
    out, i, skip = [], 0, None
    while i < len(lines):
        m = SKIP.match(lines[i].strip())
        if m:
            skip = m.group(1)
            i += 1
            continue
        m = FENCE.match(lines[i])
        if m:
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            out.append((m.group(1), "\n".join(lines[i + 1 : j]), skip))
            skip, i = None, j + 1
            continue
        if lines[i].strip():
            skip = None
        i += 1
    return out


def _docs_env():
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def _bash_commands(code: str) -> list[str]:
    """Shell commands of a bash block (continuation lines joined, comments dropped)."""
    joined = re.sub(r"\\\n\s*", " ", code)
    cmds = []
    for line in joined.split("\n"):
        line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
        if line:
            cmds.append(line)
    return cmds


def test_every_readme_skip_says_why_and_the_readme_is_short():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert len(text.splitlines()) <= 200
    assert text.count("docs-test: skip") == len([b for b in blocks(os.path.join(ROOT, "README.md")) if b[2]])


@pytest.mark.slow
def test_readme_examples_run(tmp_path):
    """Python blocks and bash blocks interleaved in README order, in one scratch directory."""
    readme = blocks(os.path.join(ROOT, "README.md"))
    run = [(lang, code) for lang, code, skip in readme if not skip]
    assert any(lang == "python" for lang, _ in run) and any(lang == "bash" for lang, _ in run)
    script = []
    for lang, code in run:
        if lang == "python":
            script.append(code)
        elif lang == "bash":
            for cmd in _bash_commands(code):
                script.append(f"_sh({cmd!r})")
    prelude = (
        "import subprocess\n"
        "def _sh(cmd):\n"
        "    r = subprocess.run(cmd, shell=True, capture_output=True, text=True)\n"
        "    assert r.returncode == 0, f'{cmd}: exit {r.returncode}\\n{r.stdout[-2000:]}\\n{r.stderr[-2000:]}'\n"
    )
    path = tmp_path / "readme_examples.py"
    path.write_text(prelude + "\n".join(script), encoding="utf-8")
    r = subprocess.run(
        [sys.executable, str(path)], cwd=tmp_path, env=_docs_env(), capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]


@pytest.mark.parametrize("page", ["README.md"])
def test_links_point_to_files_that_exist(page):
    text = open(os.path.join(ROOT, page), encoding="utf-8").read()
    missing = [t for t in re.findall(r"\]\(([^)#:]+)\)", text) if not os.path.exists(os.path.join(ROOT, t))]
    assert not missing, missing
