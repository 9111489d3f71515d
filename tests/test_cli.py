"""The installed console scripts (ccj-train, ccj-convert, ccj-eval) run our code from any working
directory: a user's own train.py / convert.py there does not shadow the packages, and known-bad
input gives one line and exit status 2. ``python -m train`` / ``python -m convert`` still work."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def run(cmd, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # as a user's shell has it
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def shadowing_dir(tmp_path):
    for name in ("train.py", "convert.py", "chinese_clip_jax.py"):
        (tmp_path / name).write_text('raise SystemExit("a user file shadowed the package")\n')
    return tmp_path


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("ccj-convert", ["/nonexistent/ckpt", "out"], "error: no such local path: /nonexistent/ckpt"),
        (
            "ccj-train",
            [
                "--config",
                os.path.join(ROOT, "train/configs/demo.py"),
                "--workdir",
                "w",
                "--config.optimizer.learning_rate=1",
            ],
            "error: unknown config key 'optimizer.learning_rate'; did you mean 'optimizer.lr'",
        ),
        (
            "ccj-eval",
            ["zeroshot", "--model", "m", "--dataset", "folder:/nonexistent/classes"],
            "error: folder:/nonexistent/classes: no such directory /nonexistent/classes",
        ),
    ],
)
def test_console_scripts_are_ours_from_any_directory(shadowing_dir, script, args, message):
    proc = run([os.path.join(BIN, script), *args], cwd=shadowing_dir)
    assert "shadowed" not in proc.stderr + proc.stdout
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-2000:]
    assert sorted(os.listdir(shadowing_dir)) == ["chinese_clip_jax.py", "convert.py", "train.py"]  # nothing made


def test_python_dash_m_entry_points_still_work(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    convert = subprocess.run(
        [sys.executable, "-m", "convert", "/nonexistent/ckpt", str(tmp_path / "o")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert convert.returncode == 2 and "no such local path" in convert.stderr
    train = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "--config",
            "train/configs/demo.py",
            "--workdir",
            str(tmp_path / "w"),
            "--config.optimizer.nope=1",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert train.returncode == 2 and "unknown config key 'optimizer.nope'" in train.stderr
    assert not (tmp_path / "w").exists()
