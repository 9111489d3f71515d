"""docs/jax.md ("Use in your own JAX code"): every ```python block runs, in order, in one
session on 8 simulated CPU devices, as the guide says (its asserts pin the values)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "jax.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


@pytest.mark.slow
def test_guide_examples_run(tmp_path):
    blocks = python_blocks(GUIDE.read_text(encoding="utf-8"))
    assert len(blocks) >= 9, "the guide lost its examples"
    script = "\n\n".join(f"# --- block {i}\n{b}" for i, b in enumerate(blocks))
    (tmp_path / "guide.py").write_text(script, encoding="utf-8")
    root = str(GUIDE.parent.parent)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "TMPDIR": str(tmp_path),
    }
    run = subprocess.run(
        [sys.executable, str(tmp_path / "guide.py")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    assert "outside the vocabulary" in run.stdout and "float NCHW pixels" in run.stdout
