"""``attention_impl="splash"``: jax's Pallas TPU splash kernel, run here in interpret mode, against
the XLA attention path (``jax.nn.dot_product_attention(implementation="xla")``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _makers import run_script
from _train_helpers import fake_batches, max_rel_err, tiny_config

import chinese_clip_jax as ccj
from chinese_clip_jax.modeling.splash import block_size, splash_attention, splash_padded_length


def test_lengths_pad_to_the_kernels_128_lane_blocks():
    # text 52, ViT-B/16 197, L/14 257, L/14@336 577 tokens (hand-computed multiples of 128)
    assert [splash_padded_length(s) for s in (52, 128, 197, 257, 577)] == [128, 128, 256, 384, 640]
    assert [block_size(p) for p in (128, 256, 384, 512, 640, 1024)] == [128, 256, 128, 512, 128, 512]


def _loss_and_features(impl, params, batch, cfg):
    model = ccj.ChineseCLIPModel(cfg, attention_impl=impl, scan_layers=True, remat="dots")

    def loss(p):
        out = model.apply({"params": p}, batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
        # a loss that weighs every feature differently, so the gradients reach every token's path
        w_t = jnp.arange(out.text_embeds.size, dtype=jnp.float32).reshape(out.text_embeds.shape)
        w_i = jnp.arange(out.image_embeds.size, dtype=jnp.float32).reshape(out.image_embeds.shape)
        return jnp.sum(jnp.sin(w_t) * out.text_embeds) + jnp.sum(jnp.cos(w_i) * out.image_embeds), out

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.mark.slow  # interpret mode: 17 s on 2 cores
def test_splash_model_equals_xla_attention_forward_and_gradients():
    """Both towers, scanned layers + remat "dots", fp32: text rows of lengths 2..6 padded to 6
    (the splash kernel runs them at 128 with the padding keys in another segment) and an image of
    1 + 4 patches = 5 tokens (odd; padded to 128, padded query rows dropped). fp32 throughout, so
    the only difference is the order of the sums (the kernel's online softmax over key blocks):
    features and gradients agree to ~1e-6; the tolerance is 1e-5 relative (a masking or scaling
    error would show as O(1e-1))."""
    cfg = tiny_config(heads=2)  # head_dim 8
    batch = fake_batches(1, 3, seed=1, seq=6)[0]
    assert batch["attention_mask"].min() == 0  # some text rows are padded
    params = jax.jit(ccj.ChineseCLIPModel(cfg, scan_layers=True).init)(
        jax.random.key(0), batch["input_ids"], batch["pixel_values"]
    )["params"]
    (want_loss, want), want_grads = _loss_and_features("xla", params, batch, cfg)
    (got_loss, got), got_grads = _loss_and_features("splash", params, batch, cfg)
    for a, b in ((got.text_embeds, want.text_embeds), (got.image_embeds, want.image_embeds)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
    rel, key_bias = max_rel_err(got_grads, want_grads)
    assert rel < 1e-5 and key_bias < 1e-6, (rel, key_bias)


def test_splash_scales_by_the_true_head_dim_and_masks_padding_keys():
    """The functional form against a NumPy softmax: head_dim 80 (huge's; the scale is 80**-0.5,
    not that of any padded width), 3 rows with 7, 2 and 0 padding keys."""
    b, s, h, d = 3, 9, 2, 80
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((b, s, h, d)).astype(np.float32) for _ in range(3))
    lengths = np.array([2, 7, 9])
    mask = (np.arange(s)[None, :] < lengths[:, None]).reshape(b, 1, 1, s)
    scores = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), k) / np.sqrt(d)
    scores = np.where(mask, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    want = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)
    got = jax.jit(splash_attention)(q, k, v, jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_bad_uses_fail_in_one_line_naming_the_problem(monkeypatch):
    x = jnp.zeros((2, 5, 2, 8))
    with pytest.raises(
        ValueError, match=r"^splash attention takes q, k, v of one shape .*\(2, 5, 2, 8\), \(2, 6, 2, 8\)"
    ):
        splash_attention(x, jnp.zeros((2, 6, 2, 8)), x, None)
    with pytest.raises(ValueError, match=r"^splash attention takes a bool key-padding mask .*\(2, 1, 5, 5\)$"):
        splash_attention(x, x, x, jnp.ones((2, 1, 5, 5), jnp.bool_))  # a full (q, k) mask: not key padding
    with pytest.raises(ValueError, match=r"^attention_impl must be one of .*'splash'.*got 'flash'$"):
        ccj.ChineseCLIPModel(tiny_config(), attention_impl="flash")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # no mesh: the default backend decides
    with pytest.raises(ValueError, match=r"^attention_impl='splash' is a TPU kernel .*not for gpu: use 'cudnn'"):
        splash_attention(x, x, x, None)


@pytest.mark.slow
def test_splash_under_an_8_device_mesh_equals_xla_attention():
    """data 2 x fsdp 2 x tensor 2 on 8 CPU devices: the kernel runs in shard_map (rows over data
    and fsdp, heads over tensor) inside the trainer's jitted, scanned, rematerialised gradient;
    on data 2 x tensor 4 the 2 heads, which tensor does not divide, stay whole on each device."""
    out = run_script("_splash_mesh_check.py", timeout=600, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    assert out["devices"] == 8 and len(out["cases"]) == 2
    for case in out["cases"]:
        assert case["rel"] < 1e-5 and case["key_bias"] < 1e-6 and case["loss"] < 1e-6, case
