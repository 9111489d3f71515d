"""Contrastive losses against hand-written numpy references."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from chinese_clip_jax.training.losses import (
    MAX_LOGIT_SCALE,
    clamp_logit_scale,
    contrastive_loss,
    sigmoid_contrastive_loss,
    softmax_contrastive_loss,
)


def _embeds(n=6, d=5, seed=0):
    rng = np.random.default_rng(seed)
    t, i = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    return t / np.linalg.norm(t, axis=1, keepdims=True), i / np.linalg.norm(i, axis=1, keepdims=True)


def _softmax_ref(t, i, s):
    logits = math.exp(s) * t.astype(np.float64) @ i.T.astype(np.float64)
    n = len(t)
    ce_rows = [-(logits[r, r] - np.log(np.exp(logits[r]).sum())) for r in range(n)]
    ce_cols = [-(logits[c, c] - np.log(np.exp(logits[:, c]).sum())) for c in range(n)]
    return 0.5 * (np.mean(ce_rows) + np.mean(ce_cols))


def _sigmoid_ref(t, i, s, b):
    logits = math.exp(s) * t.astype(np.float64) @ i.T.astype(np.float64) + b
    total = 0.0
    for r in range(len(t)):
        for c in range(len(t)):
            z = 1.0 if r == c else -1.0
            total += np.log1p(np.exp(-z * logits[r, c]))
    return total / len(t)


@pytest.mark.parametrize("scale", [0.0, 2.6592, MAX_LOGIT_SCALE])
def test_softmax_matches_reference(scale):
    t, i = _embeds()
    got = softmax_contrastive_loss(jnp.asarray(t, jnp.float32), jnp.asarray(i, jnp.float32), scale)
    np.testing.assert_allclose(float(got), _softmax_ref(t, i, scale), rtol=1e-5)


def test_softmax_perfect_alignment_is_near_zero_and_symmetric():
    t, _ = _embeds(n=4, d=4)
    eye = np.eye(4)
    assert float(softmax_contrastive_loss(jnp.asarray(eye), jnp.asarray(eye), MAX_LOGIT_SCALE)) < 1e-30 + 1e-6
    a, b = _embeds(seed=3)
    l1 = softmax_contrastive_loss(jnp.asarray(a), jnp.asarray(b), 1.0)
    l2 = softmax_contrastive_loss(jnp.asarray(b), jnp.asarray(a), 1.0)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)


def test_sigmoid_matches_reference():
    t, i = _embeds(seed=1)
    got = sigmoid_contrastive_loss(jnp.asarray(t, jnp.float32), jnp.asarray(i, jnp.float32), math.log(10), -10.0)
    np.testing.assert_allclose(float(got), _sigmoid_ref(t, i, math.log(10), -10.0), rtol=1e-5)
    got = contrastive_loss("sigmoid", jnp.asarray(t), jnp.asarray(i), 1.5, 0.3)
    np.testing.assert_allclose(float(got), _sigmoid_ref(t, i, 1.5, 0.3), rtol=1e-5)


def test_losses_are_fp32_for_bf16_inputs():
    t, i = _embeds()
    tb, ib = jnp.asarray(t, jnp.bfloat16), jnp.asarray(i, jnp.bfloat16)
    for loss in (softmax_contrastive_loss(tb, ib, 2.0), sigmoid_contrastive_loss(tb, ib, 2.0, -1.0)):
        assert loss.dtype == jnp.float32
    ref = _softmax_ref(np.asarray(tb, np.float32), np.asarray(ib, np.float32), 2.0)
    np.testing.assert_allclose(float(softmax_contrastive_loss(tb, ib, 2.0)), ref, rtol=1e-5)


def test_clamp_and_errors():
    assert float(clamp_logit_scale(jnp.float32(7.0))) == pytest.approx(math.log(100), rel=1e-6)
    assert float(clamp_logit_scale(jnp.float32(-1.0))) == 0.0
    assert float(clamp_logit_scale(jnp.float32(1.25))) == 1.25
    t, i = _embeds()
    with pytest.raises(ValueError, match="batch, dim"):
        softmax_contrastive_loss(jnp.asarray(t), jnp.asarray(i[:3]), 1.0)
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        contrastive_loss("hinge", jnp.asarray(t), jnp.asarray(i), 1.0)
    with pytest.raises(ValueError, match="logit_bias"):
        contrastive_loss("sigmoid", jnp.asarray(t), jnp.asarray(i), 1.0)
