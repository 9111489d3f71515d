"""Contrastive losses over the GLOBAL batch, in fp32 whatever the compute dtype.

Both take L2-normalized embeddings of the whole (globally sharded) batch: row i of
``text_embeds`` and of ``image_embeds`` is a positive pair, every other pairing a negative,
unless ``groups`` (one int per pair, the config's ``loss_positives``) says otherwise: pairs with
equal group ids are then positives of each other (many images of one caption or label), so they
are not pushed apart as false negatives.
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
    "positive_counts",
    "caption_groups",
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


def positive_counts(groups: jax.Array) -> jax.Array:
    """int32 (n,): how many pairs of the batch share pair i's group (itself included), by sorting
    (never an (n, n) matrix, so the ring loss can use it too)."""
    ordered = jnp.sort(groups)
    upper = jnp.searchsorted(ordered, groups, side="right")
    return (upper - jnp.searchsorted(ordered, groups, side="left")).astype(jnp.int32)


def caption_groups(input_ids: jax.Array) -> jax.Array:
    """int32 (n,): a hash of each row of token ids (n, L): equal captions get equal ids, so
    ``groups=caption_groups(input_ids)`` makes pairs with the same caption positives of each other.

    FNV-1a over the ids, then a final avalanche (murmur3's fmix32), in uint32 arithmetic: the
    same on every host and device, computed on the global batch inside the step. Two different
    captions share an id with probability 2**-32 (a batch of 32k captions: about one pair in
    eight batches merges two groups)."""
    ids = jnp.asarray(input_ids).astype(jnp.uint32)
    h = jnp.full(ids.shape[:1], 2166136261, jnp.uint32)
    for col in range(ids.shape[1]):
        h = (h ^ ids[:, col]) * jnp.uint32(16777619)
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    h = h ^ (h >> 16)
    return jax.lax.bitcast_convert_type(h, jnp.int32)


def _positives(groups, n: int) -> jax.Array:
    """bool (n, n): pair j is a positive of pair i (the diagonal without ``groups``)."""
    if groups is None:
        return jnp.eye(n, dtype=bool)
    groups = jnp.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups must be one int per pair, shape ({n},), got {groups.shape}")
    return groups[:, None] == groups[None, :]


def softmax_contrastive_loss(
    text_embeds: jax.Array, image_embeds: jax.Array, logit_scale: jax.Array, groups: jax.Array | None = None
) -> jax.Array:
    """Symmetric InfoNCE (CLIP): mean of text->image and image->text cross-entropies.

    Args:
      text_embeds, image_embeds: (batch, dim), L2-normalized.
      logit_scale: scalar, log inverse temperature.
      groups: optional int (batch,); the target of each row (text->image) and column
        (image->text) is uniform over the pairs of its group. None: pair i only (the diagonal).
    Returns: scalar fp32 loss (nats), averaged over the batch.
    """
    _check(text_embeds, image_embeds)
    logits = _logits(text_embeds, image_embeds, logit_scale)
    if groups is None:
        target_rows = target_cols = jnp.diagonal(logits)
    else:
        positive = _positives(groups, logits.shape[0])
        count = jnp.sum(positive, axis=1).astype(jnp.float32)  # symmetric: rows and columns agree
        target_rows = jnp.sum(jnp.where(positive, logits, 0.0), axis=1) / count
        target_cols = jnp.sum(jnp.where(positive, logits, 0.0), axis=0) / count
    t2i = jax.nn.logsumexp(logits, axis=1) - target_rows
    i2t = jax.nn.logsumexp(logits, axis=0) - target_cols
    return 0.5 * (jnp.mean(t2i) + jnp.mean(i2t))


def sigmoid_contrastive_loss(
    text_embeds: jax.Array,
    image_embeds: jax.Array,
    logit_scale: jax.Array,
    logit_bias: jax.Array,
    groups: jax.Array | None = None,
) -> jax.Array:
    """SigLIP (Zhai et al. 2023): every pair is a binary problem, positives on the diagonal.

    loss = -1/n * sum_ij log sigmoid(z_ij * (exp(logit_scale) * <t_i, v_j> + logit_bias)),
    z_ij = 1 if i == j (with ``groups``: if groups[i] == groups[j]) else -1. Returns a scalar
    fp32 (nats per example).
    """
    _check(text_embeds, image_embeds)
    logits = _logits(text_embeds, image_embeds, logit_scale) + jnp.asarray(logit_bias, jnp.float32)
    n = logits.shape[0]
    signs = jnp.where(_positives(groups, n), 1.0, -1.0)
    return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / n


def contrastive_loss(kind: str, text_embeds, image_embeds, logit_scale, logit_bias=None, groups=None) -> jax.Array:
    """Dispatch on ``kind``: "softmax" (CLIP InfoNCE) or "sigmoid" (SigLIP, needs ``logit_bias``).

    ``groups``: None (pair i's positive is pair i) or int (batch,): equal ids are positives of
    each other (``softmax_contrastive_loss``, ``sigmoid_contrastive_loss``)."""
    if kind == "softmax":
        return softmax_contrastive_loss(text_embeds, image_embeds, logit_scale, groups)
    if kind == "sigmoid":
        if logit_bias is None:
            raise ValueError("the sigmoid loss needs a logit_bias")
        return sigmoid_contrastive_loss(text_embeds, image_embeds, logit_scale, logit_bias, groups)
    raise ValueError(f"unknown loss {kind!r}; expected 'softmax' or 'sigmoid'")


def clamp_logit_scale(logit_scale: jax.Array) -> jax.Array:
    """Keeps the learnable log inverse temperature in [0, ln 100] (CLIP's clamp)."""
    return jnp.clip(logit_scale, 0.0, MAX_LOGIT_SCALE)
