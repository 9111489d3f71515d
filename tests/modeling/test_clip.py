"""fp32 parity of the Flax model with transformers' PyTorch ChineseCLIPModel, for every published size.

Each size: a random-init transformers model built from our preset's config is saved in the HF layout,
loaded with ``ccj.from_pretrained`` (unscanned and scanned) and compared on padded texts of mixed
lengths and random images. bf16 compute is compared against fp32 by cosine similarity.
"""

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import chinese_clip_jax as ccj
from chinese_clip_jax.modeling.config import PRESETS

FEATURE_ATOL = 1e-4
LOGITS_ATOL = 1e-3


def make_inputs(cfg, seed=0):
    rng = np.random.default_rng(seed)
    lengths = [52, 9, 30, 2]  # unpadded, short, medium, [CLS] [SEP] only
    ids = np.zeros((len(lengths), 52), np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(106, cfg.text_config.vocab_size, n)
        ids[i, 0], ids[i, n - 1] = 101, 102
        mask[i, :n] = 1
    r = cfg.vision_config.image_size
    pixels = rng.standard_normal((2, 3, r, r)).astype(np.float32)
    return ids, mask, pixels


def forward(model, params, ids, mask, pixels):
    """Projected text/image features and both logits, in one compiled function."""

    @jax.jit
    def run(params, ids, mask, pixels):
        v = {"params": params}
        text = model.apply(v, ids, mask, method="get_text_features")
        image = model.apply(v, pixels, method="get_image_features")
        out = model.apply(v, input_ids=ids, pixel_values=pixels, attention_mask=mask)
        return text, image, out.logits_per_image, out.logits_per_text

    return [np.asarray(x) for x in run(params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), pixels)]


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(n, marks=pytest.mark.slow)  # RN50: tests/modeling/test_resnet.py
        for n, c in PRESETS.items()
        if not c.is_resnet
    ],
)
def saved_reference(request, tmp_path_factory):
    """(preset config, HF checkpoint dir, inputs, reference outputs); the torch model is freed."""
    cfg = ccj.ChineseCLIPConfig.preset(request.param)
    torch.manual_seed(0)
    hf = transformers.ChineseCLIPModel(transformers.ChineseCLIPConfig.from_dict(cfg.to_dict())).eval()
    with torch.no_grad():  # spread the logit scale so logit errors are not hidden by a small scale
        hf.logit_scale.fill_(np.log(100.0))
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    ids, mask, pixels = make_inputs(cfg)
    t_ids, t_mask, t_px = torch.tensor(ids), torch.tensor(mask), torch.tensor(pixels)
    with torch.no_grad():
        out = hf(input_ids=t_ids, attention_mask=t_mask, pixel_values=t_px)
        ref = [
            hf.get_text_features(input_ids=t_ids, attention_mask=t_mask).pooler_output.numpy(),
            hf.get_image_features(pixel_values=t_px).pooler_output.numpy(),
            out.logits_per_image.numpy(),
            out.logits_per_text.numpy(),
        ]
    del hf, out
    gc.collect()
    yield cfg, path, (ids, mask, pixels), ref
    gc.collect()


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scan"])
def test_fp32_parity(saved_reference, scan_layers):
    cfg, path, inputs, ref = saved_reference
    model, params = ccj.from_pretrained(path, scan_layers=scan_layers)
    assert model.config == cfg
    text, image, lpi, lpt = forward(model, params, *inputs)
    np.testing.assert_allclose(text, ref[0], atol=FEATURE_ATOL, rtol=0)
    np.testing.assert_allclose(image, ref[1], atol=FEATURE_ATOL, rtol=0)
    np.testing.assert_allclose(lpi, ref[2], atol=LOGITS_ATOL, rtol=0)
    np.testing.assert_allclose(lpt, ref[3], atol=LOGITS_ATOL, rtol=0)
    if scan_layers:  # bf16 compute against the fp32 reference, with the same (fp32) params
        bf16 = ccj.ChineseCLIPModel(cfg, dtype=jnp.bfloat16, scan_layers=True)
        b_text, b_image, _, _ = forward(bf16, params, *inputs)
        for got, want in ((b_text, ref[0]), (b_image, ref[1])):
            cos = np.sum(got * want, -1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
            assert cos.min() >= 0.99, cos
