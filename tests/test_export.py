"""Serving export: `python -m convert SRC OUT --export`, loaded in a fresh process that never
imports flax or the model code, equal to get_text_features / get_image_features at batch
sizes 1, 3 and 17."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from _makers import REPO
from _makers import run_convert as run_cli
from _train_helpers import CONVERSION_SIZES as SIZES
from _train_helpers import RESNET_SIZES, random_params, tiny_config

import chinese_clip_jax as ccj

BATCHES = (1, 3, 17)

LOADER = """
import sys, numpy as np
from chinese_clip_jax.export import load_exported
enc = load_exported(sys.argv[1])
data = np.load(sys.argv[2])
out = {}
for b in (1, 3, 17):
    out[f"text{b}"] = np.asarray(enc.text(data["ids"][:b], data["mask"][:b]))
    out[f"image{b}"] = np.asarray(enc.image(data["px"][:b]))
# the package __init__ reads the version constant (chinese_clip_jax.version imports nothing)
ours = ("chinese_clip_jax.export", "chinese_clip_jax.version")
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("flax", "optax", "orbax", "transformers", "torch")
               or m.startswith("chinese_clip_jax.") and m not in ours)
assert not heavy, heavy
np.savez(sys.argv[3], **out)
print("platforms", enc.platforms)
"""


def export_inputs(cfg, n=17, seq=52, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(106, 21128, (n, seq)).astype(np.int32)
    lengths = rng.integers(3, seq, n)
    mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int32)
    r = cfg.vision_config.image_size
    return ids * mask, mask, rng.standard_normal((n, 3, r, r)).astype(np.float32)


def check_in_fresh_process(out, model, params, tmp_path):
    with open(os.path.join(out, "export.json")) as f:
        seq = json.load(f)["context_length"]
    ids, mask, px = export_inputs(model.config, seq=seq)
    np.savez(tmp_path / "in.npz", ids=ids, mask=mask, px=px)
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    r = subprocess.run(
        [sys.executable, "-c", LOADER, str(out), str(tmp_path / "in.npz"), str(tmp_path / "got.npz")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = np.load(tmp_path / "got.npz")
    v = {"params": params}
    want_text = np.asarray(model.apply(v, jnp.asarray(ids), jnp.asarray(mask), method="get_text_features"))
    want_image = np.asarray(model.apply(v, jnp.asarray(px), method="get_image_features"))
    for b in BATCHES:
        assert got[f"text{b}"].shape == (b, model.config.projection_dim)
        np.testing.assert_allclose(got[f"text{b}"], want_text[:b], atol=1e-5, rtol=0)
        np.testing.assert_allclose(got[f"image{b}"], want_image[:b], atol=1e-5, rtol=0)
    return r.stdout


@pytest.mark.slow
def test_cli_export_loads_without_flax_and_matches(tmp_path, save_hf_model):
    cfg = tiny_config(**SIZES)
    save_hf_model(cfg, tmp_path / "hf")
    r = run_cli(tmp_path / "hf", tmp_path / "out", "--export")
    assert r.returncode == 0, r.stderr
    assert {
        "text_features.jaxexport",
        "image_features.jaxexport",
        "params.safetensors",
        "export.json",
        "vocab.txt",
        "preprocessor_config.json",
        "config.json",
    } <= set(os.listdir(tmp_path / "out"))
    with open(tmp_path / "out" / "export.json") as f:
        assert json.load(f)["platforms"] == ["cpu", "cuda", "tpu"]
    model, params = ccj.from_pretrained(tmp_path / "hf")
    stdout = check_in_fresh_process(tmp_path / "out", model, params, tmp_path)
    assert "('cpu', 'cuda', 'tpu')" in stdout
    before = {n: (tmp_path / "out" / n).read_bytes() for n in os.listdir(tmp_path / "out")}
    again = run_cli(tmp_path / "hf", tmp_path / "out", "--export")  # nothing overwritten
    assert again.returncode == 2 and "already exists; convert never overwrites" in again.stderr
    assert {n: (tmp_path / "out" / n).read_bytes() for n in os.listdir(tmp_path / "out")} == before
    bad = run_cli(tmp_path / "hf", tmp_path / "out2", "--export", "--platforms", "cpu,metal")
    assert bad.returncode == 2 and "unknown platform(s) metal" in bad.stderr and not (tmp_path / "out2").exists()


def test_export_function_resnet_cpu_only(tmp_path):

    from chinese_clip_jax.conversion.export import save_exported
    from chinese_clip_jax.export import load_exported

    cfg = tiny_config(**RESNET_SIZES)
    params = random_params(cfg)
    save_exported(tmp_path / "rn", cfg, params, platforms=("cpu",), context_length=16)
    enc = load_exported(tmp_path / "rn")
    assert enc.platforms == ("cpu",)
    model = ccj.ChineseCLIPModel(cfg)
    check_in_fresh_process(tmp_path / "rn", model, params, tmp_path)
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, 16\)"):
        enc.text(np.zeros((2, 10), np.int32))
    with pytest.raises(ValueError, match=r"pixel_values must be \(batch, 3, 32, 32\)"):
        enc.image(np.zeros((2, 3, 64, 64), np.float32))
