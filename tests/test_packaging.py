"""What a user installs: a wheel of `chinese_clip_jax` alone (train/ and convert/ stay in the
checkout), whose shipped recipes train outside any checkout, and whose core (no extras) imports
and computes features without tensorflow-datasets or array-record."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), ROOT],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = out.glob("chinese_clip_jax-*.whl")
    return path


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env.update(JAX_PLATFORMS="cpu", **extra)
    return env


def test_the_wheel_holds_only_the_library(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"chinese_clip_jax"}, sorted(tops)
    assert "chinese_clip_jax/training/recipes/demo.py" in names
    assert "chinese_clip_jax/assets/vocab.txt" in names
    for page in ("index.html", "app.js", "style.css"):  # ccj-serve's page, shipped as package data
        assert f"chinese_clip_jax/serve/static/{page}" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for script in ("ccj-train", "ccj-convert", "ccj-eval", "ccj-serve"):
        assert script in entry_points


@pytest.mark.slow
def test_a_shipped_recipe_trains_from_the_wheel_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = _clean_env(PYTHONPATH=str(site))
    where = subprocess.run(
        [sys.executable, "-c", "import chinese_clip_jax, importlib.util as u; print(chinese_clip_jax.__file__);"
         "print(u.find_spec('train'))"],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = where.stdout.split()
    assert lines[0].startswith(str(site)), where.stdout + where.stderr
    assert lines[1] == "None"  # no top-level `train` package was installed
    run = subprocess.run(
        [
            str(site / "bin" / "ccj-train"),
            "--config",
            "recipe:demo",
            "--workdir",
            str(work / "w"),
            "--config.total_steps=2",
            "--config.eval_every=0",
            "--config.checkpoint_every=2",
            "--config.export_hf=False",
            "--config.log_every=1",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (work / "w" / "checkpoints" / "2").is_dir()
    assert len((work / "w" / "metrics.jsonl").read_text().splitlines()) >= 2
    bad = subprocess.run(
        [str(site / "bin" / "ccj-train"), "--config", "recipe:nope", "--workdir", str(work / "x")],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: unknown recipe 'nope'"), bad.stderr[-2000:]
    assert "demo" in bad.stderr and "finetune_muge" in bad.stderr
    assert not (work / "x").exists()


@pytest.mark.slow
def test_the_core_install_computes_features_without_tfds(tmp_path):
    """Features computed with tensorflow_datasets made unimportable (what a core install without
    the [tfds] extra has) and without importing array_record (which grain, a core dependency,
    installs: docs/architecture.md), and a TFDS feature then fails in one line naming the extra."""
    script = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("tensorflow_datasets", "tensorflow"):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, Block())

        import jax, jax.numpy as jnp, numpy as np
        import chinese_clip_jax as ccj

        text = ccj.ChineseCLIPTextConfig(vocab_size=21128, hidden_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=64)
        vision = ccj.ChineseCLIPVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64, image_size=32, patch_size=16)
        cfg = ccj.ChineseCLIPConfig.from_text_vision_configs(text, vision, projection_dim=16)
        model = ccj.ChineseCLIPModel(cfg)
        params = model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32), jnp.zeros((1, 3, 32, 32)))["params"]
        ccj.save_pretrained("m", cfg, params)
        clip = ccj.ChineseCLIP.from_pretrained("m")
        assert clip.encode_text(["一只猫"]).shape == (1, 16)
        assert clip.encode_image([np.zeros((40, 40, 3), np.uint8)]).shape == (1, 16)
        assert not any(m.split(".")[0] in ("tensorflow_datasets", "array_record", "grain") for m in sys.modules)
        from chinese_clip_jax import data
        try:
            data.train_iterator(data.default_data_config(name="tfds"), global_batch_size=2, seed=0, image_size=32)
        except ImportError as e:
            print("TFDS:", str(e).splitlines()[0])
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=_clean_env(PYTHONPATH=ROOT), capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    tfds_line = [line for line in r.stdout.splitlines() if line.startswith("TFDS:")]
    assert tfds_line and "chinese-clip-jax[tfds]" in tfds_line[0], r.stdout + r.stderr[-2000:]
