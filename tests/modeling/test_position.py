"""Other resolutions: PyTorch's bicubic in JAX, transformers' interpolate_pos_encoding, cn_clip's
resize_pos_embed (from_pretrained(image_size=R)), and fine-tuning at a new size via init_from."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from _train_helpers import tiny_config

import chinese_clip_jax as ccj
from chinese_clip_jax.modeling.position import bicubic_matrix, resize_grid

VIT = dict(
    vocab_size=21128,
    hidden=32,
    layers=1,
    vision_hidden=48,
    vision_layers=2,
    max_positions=64,
    dropout=0.1,
    attention_dropout=0.1,
    projection_dim=16,
)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("size_in,size_out", [(7, 12), (16, 24), (14, 9), (5, 5), (3, 1)])
def test_bicubic_equals_torch(size_in, size_out, align_corners):
    x = np.random.default_rng(size_in).standard_normal((size_in, size_in + 2, 4)).astype(np.float32)
    want = (
        F.interpolate(
            torch.tensor(x).permute(2, 0, 1)[None],
            size=(size_out, size_out + 1),
            mode="bicubic",
            align_corners=align_corners,
        )[0]
        .permute(1, 2, 0)
        .numpy()
    )
    got = np.asarray(resize_grid(jnp.asarray(x), (size_out, size_out + 1), align_corners))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)  # float32 rounding order
    if size_in == size_out and not align_corners:
        np.testing.assert_array_equal(bicubic_matrix(size_in, size_out, False), np.eye(size_in, dtype=np.float32))


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory, save_hf_model):
    cfg = tiny_config(**VIT, patch_size=8, image_size=32)
    path = tmp_path_factory.mktemp("hf")
    return cfg, path, save_hf_model(cfg, path)


@pytest.mark.parametrize("size", [(48, 48), (64, 40)])
def test_interpolate_pos_encoding_equals_transformers(hf_model, size):
    cfg, path, ref = hf_model
    model, params = ccj.from_pretrained(path)
    px = np.random.default_rng(0).standard_normal((2, 3) + size).astype(np.float32)
    ids = np.random.default_rng(1).integers(106, 21128, (3, 7))
    with torch.no_grad():
        want = ref.get_image_features(pixel_values=torch.tensor(px), interpolate_pos_encoding=True).pooler_output
        want_logits = ref(
            input_ids=torch.tensor(ids), pixel_values=torch.tensor(px), interpolate_pos_encoding=True
        ).logits_per_image
    v = {"params": params}
    got = model.apply(v, jnp.asarray(px), interpolate_pos_encoding=True, method="get_image_features")
    logits = model.apply(v, jnp.asarray(ids), jnp.asarray(px), interpolate_pos_encoding=True).logits_per_image
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(logits), want_logits.numpy(), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True takes other sizes"):
        model.apply(v, jnp.asarray(px), method="get_image_features")


def test_from_pretrained_image_size_resizes_as_cn_clip(hf_model):
    import types

    from _makers import import_cn_clip_model

    import_cn_clip_model()
    from cn_clip.clip.model import resize_pos_embed

    cfg, path, _ = hf_model
    _, params = ccj.from_pretrained(path)
    model, resized = ccj.from_pretrained(path, image_size=56)
    assert model.config.vision_config.image_size == 56
    assert model.config.vision_config.replace(image_size=32) == cfg.vision_config
    state = {"visual.positional_embedding": torch.tensor(np.asarray(params["vision_model"]["position_embedding"]))}
    resize_pos_embed(state, types.SimpleNamespace(visual=types.SimpleNamespace(grid_size=(7, 7))))
    np.testing.assert_allclose(
        np.asarray(resized["vision_model"]["position_embedding"]),
        state["visual.positional_embedding"].numpy(),
        atol=1e-6,
        rtol=0,
    )
    out = model.apply({"params": resized}, jnp.zeros((1, 3, 56, 56)), method="get_image_features")
    assert out.shape == (1, 16) and np.isfinite(np.asarray(out)).all()
    clip = ccj.ChineseCLIP.from_pretrained(path, image_size=56)
    assert clip.processor.image_size == (56, 56)  # the processor follows the new size
    with pytest.raises(ValueError, match="not a multiple of patch_size 8"):
        ccj.from_pretrained(path, image_size=60)


def test_finetune_l14_shaped_model_at_new_resolution(tmp_path, save_hf_model):
    """A ViT-L/14-shaped tiny model (patch 14) trained at 28 px, fine-tuned at 42 px through
    init_from + model.image_size: runs, exports a 42 px model whose processor makes 42 px images."""
    from _train_run import tiny_train_config

    from chinese_clip_jax.training.loop import train

    save_hf_model(tiny_config(**VIT, patch_size=14, image_size=28), tmp_path / "src")
    config = tiny_train_config(2, init_from=str(tmp_path / "src"), export_hf=True)
    config.model.update(image_size=42, scan_layers="false", remat="none")
    config.optimizer.lr = 0.0  # the exported params must be exactly the resized ones
    config.batch_size = 8
    result = train(config, str(tmp_path / "ft"), progress=False)
    assert result["step"] == 2
    exported = ccj.ChineseCLIPConfig.from_pretrained(result["export_dir"])
    assert exported.vision_config.image_size == 42
    with open(os.path.join(result["export_dir"], "preprocessor_config.json")) as f:
        assert json.load(f)["crop_size"] == {"height": 42, "width": 42}
    _, want = ccj.from_pretrained(tmp_path / "src", image_size=42)
    _, got = ccj.from_pretrained(result["export_dir"])
    np.testing.assert_array_equal(
        np.asarray(got["vision_model"]["position_embedding"]), np.asarray(want["vision_model"]["position_embedding"])
    )
    loaded, info = transformers.ChineseCLIPModel.from_pretrained(result["export_dir"], output_loading_info=True)
    assert not info["missing_keys"] and loaded.config.vision_config.image_size == 42
