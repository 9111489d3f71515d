"""The standalone towers against transformers' ChineseCLIPTextModel (with its pooler) and
ChineseCLIPVisionModel, weights mapped with the conversion table's rows for each tower."""

import jax.numpy as jnp
import numpy as np
import torch
import transformers
from _train_helpers import tiny_config

import chinese_clip_jax as ccj
from chinese_clip_jax.conversion import mapping

CFG = tiny_config(vocab_size=21128, hidden=48, max_positions=40, image_size=32, patch_size=8, projection_dim=16)
TEXT, VISION = CFG.text_config, CFG.vision_config


def tower_params(state_dict, tower):
    """Flax params of one tower from a standalone HF tower's state dict (names without the prefix)."""
    params = {}
    for row in mapping.table(CFG):
        if row.hf.startswith(tower + "."):
            x = state_dict[row.hf[len(tower) + 1 :]].numpy()  # standalone towers have no prefix
            mapping.set_path(params, row.flax, jnp.asarray(row.transform.to_flax(x, row.num_heads)))
    return params


def test_text_model_with_pooler_matches_transformers():
    torch.manual_seed(0)
    hf = transformers.ChineseCLIPTextModel(transformers.ChineseCLIPTextConfig(**TEXT.to_dict())).eval()
    sd = hf.state_dict()
    params = tower_params(sd, "text_model")
    params["pooler"] = {
        "kernel": jnp.asarray(sd["pooler.dense.weight"].numpy().T),
        "bias": jnp.asarray(sd["pooler.dense.bias"].numpy()),
    }
    ids = np.random.default_rng(0).integers(106, 21128, (3, 20))
    mask = np.ones_like(ids)
    mask[2, 7:] = 0
    types = np.zeros_like(ids)
    types[:, 10:] = 1  # token-type embeddings exercised
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types))
    out = ccj.ChineseCLIPTextModel(TEXT).apply(
        {"params": params}, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types)
    )
    valid = mask.astype(bool)
    np.testing.assert_allclose(
        np.asarray(out.last_hidden_state)[valid], ref.last_hidden_state.numpy()[valid], atol=1e-4
    )
    np.testing.assert_allclose(np.asarray(out.pooler_output), ref.pooler_output.numpy(), atol=1e-4)


def test_vision_model_matches_transformers():
    torch.manual_seed(0)
    hf = transformers.ChineseCLIPVisionModel(transformers.ChineseCLIPVisionConfig(**VISION.to_dict())).eval()
    params = tower_params(hf.state_dict(), "vision_model")
    px = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = hf(pixel_values=torch.tensor(px))
    out = ccj.ChineseCLIPVisionModel(VISION).apply({"params": params}, jnp.asarray(px))
    np.testing.assert_allclose(np.asarray(out.last_hidden_state), ref.last_hidden_state.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(out.pooler_output), ref.pooler_output.numpy(), atol=1e-4)
