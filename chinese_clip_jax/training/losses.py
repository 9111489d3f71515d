"""Contrastive losses over the GLOBAL batch, in fp32 whatever the compute dtype.

Both take L2-normalized embeddings of the whole (globally sharded) batch: row i of
``text_embeds`` and of ``image_embeds`` is a positive pair, every other pairing a negative.
Inside ``jax.jit`` with batch-sharded inputs, XLA inserts the all-gathers that the (n, n)
similarity matrix needs, as cn_clip's ``gather_features`` does by hand.

``logit_scale`` is the log of the temperature's inverse (CLIP's parametrisation, clamped to
[0, ln 100] by the optimizer step, see ``clamp_logit_scale``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = [
    "MAX_LOGIT_SCALE",
    "SIGLIP_INIT_LOGIT_SCALE",
    "SIGLIP_INIT_LOGIT_BIAS",
    "softmax_contrastive_loss",
    "sigmoid_contrastive_loss",
    "contrastive_loss",
    "clamp_logit_scale",
]

MAX_LOGIT_SCALE = math.log(100.0)
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)  # SigLIP paper: t' = log 10
SIGLIP_INIT_LOGIT_BIAS = -10.0  # SigLIP paper: b = -10

_HI = jax.lax.Precision.HIGHEST


def _check(text_embeds: jax.Array, image_embeds: jax.Array) -> None:
    if text_embeds.ndim != 2 or text_embeds.shape != image_embeds.shape:
        raise ValueError(
            f"text_embeds and image_embeds must both be (batch, dim), got {text_embeds.shape} and {image_embeds.shape}"
        )


def _logits(text_embeds, image_embeds, logit_scale) -> jax.Array:
    """(n_text, n_image) fp32 = exp(logit_scale) * cosine similarity."""
    t = text_embeds.astype(jnp.float32)
    i = image_embeds.astype(jnp.float32)
    return jnp.exp(jnp.asarray(logit_scale, jnp.float32)) * jnp.matmul(t, i.T, precision=_HI)


def softmax_contrastive_loss(text_embeds: jax.Array, image_embeds: jax.Array, logit_scale: jax.Array) -> jax.Array:
    """Symmetric InfoNCE (CLIP): mean of text->image and image->text cross-entropies.

    Args:
      text_embeds, image_embeds: (batch, dim), L2-normalized.
      logit_scale: scalar, log inverse temperature.
    Returns: scalar fp32 loss (nats), averaged over the batch.
    """
    _check(text_embeds, image_embeds)
    logits = _logits(text_embeds, image_embeds, logit_scale)
    diag = jnp.diagonal(logits)
    t2i = jax.nn.logsumexp(logits, axis=1) - diag
    i2t = jax.nn.logsumexp(logits, axis=0) - diag
    return 0.5 * (jnp.mean(t2i) + jnp.mean(i2t))


def sigmoid_contrastive_loss(
    text_embeds: jax.Array, image_embeds: jax.Array, logit_scale: jax.Array, logit_bias: jax.Array
) -> jax.Array:
    """SigLIP (Zhai et al. 2023): every pair is a binary problem, positives on the diagonal.

    loss = -1/n * sum_ij log sigmoid(z_ij * (exp(logit_scale) * <t_i, v_j> + logit_bias)),
    z_ij = 1 if i == j else -1. Returns a scalar fp32 (nats per example).
    """
    _check(text_embeds, image_embeds)
    logits = _logits(text_embeds, image_embeds, logit_scale) + jnp.asarray(logit_bias, jnp.float32)
    n = logits.shape[0]
    signs = 2.0 * jnp.eye(n, dtype=jnp.float32) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / n


def contrastive_loss(kind: str, text_embeds, image_embeds, logit_scale, logit_bias=None) -> jax.Array:
    """Dispatch on ``kind``: "softmax" (CLIP InfoNCE) or "sigmoid" (SigLIP, needs ``logit_bias``)."""
    if kind == "softmax":
        return softmax_contrastive_loss(text_embeds, image_embeds, logit_scale)
    if kind == "sigmoid":
        if logit_bias is None:
            raise ValueError("the sigmoid loss needs a logit_bias")
        return sigmoid_contrastive_loss(text_embeds, image_embeds, logit_scale, logit_bias)
    raise ValueError(f"unknown loss {kind!r}; expected 'softmax' or 'sigmoid'")


def clamp_logit_scale(logit_scale: jax.Array) -> jax.Array:
    """Keeps the learnable log inverse temperature in [0, ln 100] (CLIP's clamp)."""
    return jnp.clip(logit_scale, 0.0, MAX_LOGIT_SCALE)
