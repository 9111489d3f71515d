"""The ring loss (``loss_impl="ring"``): contrastive losses that never hold the (local_B, global_B)
logit matrix.

``losses.py`` computes each device's (local_B, global_B) logits from all-gathered embeddings:
its memory and all-gather grow with the global batch. Here every device keeps its own text rows
and the image rows travel round the batch devices (``jax.lax.ppermute`` inside ``jax.shard_map``
over ``sharding.BATCH_AXES``), one (local_B, local_B) block per ring step, split further into
(local_B, ``chunk``) column slices. The loss and gradients are the all-gather version's
(same formulas, fp32; only the summation order differs), with or without ``groups``:

* ``ring_sigmoid_loss``: SigLIP; each block adds its sum of log sigmoid (positives are the
  pairs of the same group; without groups the diagonal of the device's own block).
* ``ring_softmax_loss``: symmetric InfoNCE with an online log-sum-exp (the running max and
  the sum of exponentials below it). The text->image statistics of the local rows stay put;
  the image->text statistics of a column slice travel with its image rows and are home after
  the last hop. The targets' part (the positives' logits, each weighted by 1 / its group's
  size) is one more running sum.
* ``ring_contrastive_loss``: either, by name, as ``losses.contrastive_loss``.

The group ids travel with the image rows; each group's size in the global batch is counted once
up front by sorting (``losses.positive_counts``). Gradients are a ``jax.custom_vjp`` whose
backward pass is a second ring: it recomputes each block's logits (from the inputs and, for
InfoNCE, the two (B,) log-sum-exps saved by the forward pass) instead of storing them, and the
image rows' gradient travels with them and is home after one more hop. Reverse-mode through the
forward loop would store every visiting block (global_B x dim per device) or every block of
logits (local_B x global_B): the memory this module exists to avoid. What each device holds at
once: its own rows, one visiting block of rows and its gradient, and (local_B, chunk) logits,
whatever the global batch.

Communication per step: the forward and backward passes each move every device's image rows
once round the ring (global_B x dim per device in n - 1 hops, as the all-gather does), plus
2 x local_B floats of statistics (InfoNCE), the group ids and the image gradient (backward).

Earlier spellings still work: ``chunked_softmax_loss`` (``ring_softmax_loss``) and
``sharded_contrastive_loss(kind, ..., impl=)`` (``contrastive_loss_by_impl``).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ..sharding import BATCH_AXES
from .losses import _check, contrastive_loss, positive_counts

__all__ = [
    "LOSS_IMPLS",
    "ring_sigmoid_loss",
    "ring_softmax_loss",
    "ring_contrastive_loss",
    "contrastive_loss_by_impl",
    "chunked_softmax_loss",
    "sharded_contrastive_loss",
]

# "gather": losses.py over the all-gathered batch; "ring": this module.
LOSS_IMPLS = ("gather", "ring")

_HI = jax.lax.Precision.HIGHEST
_ROWS, _VEC, _REP = P(BATCH_AXES, None), P(BATCH_AXES), P()


def _dot(a, b):  # (m, d) x (k, d) -> (m, k), fp32
    return jnp.matmul(a, b.T, precision=_HI)


def _hop(x, n: int):
    """Sends ``x`` (a pytree) one step round the ring of batch devices: device j -> j + 1."""
    return jax.lax.ppermute(x, BATCH_AXES, [(j, (j + 1) % n) for j in range(n)])


def _slices(x, chunk: int):
    """(b, ...) -> (b // chunk, chunk, ...): the column slices of a block."""
    return x.reshape(x.shape[0] // chunk, chunk, *x.shape[1:])


def _ring(n: int, block, carry, travel, last_hop: tuple[bool, ...]):
    """Runs ``block(k, carry, travel) -> (carry, travel)`` for ring steps k = 0..n-1; ``travel``
    (a tuple) hops between steps, and its parts marked in ``last_hop`` hop once more at the end
    (an accumulator that has visited every device then is home)."""

    def step(k, state):
        carry, travel = block(k, *state)
        return carry, _hop(travel, n)

    carry, travel = jax.lax.fori_loop(0, n - 1, step, (carry, travel))
    carry, travel = block(n - 1, carry, travel)
    home = _hop(tuple(x for x, h in zip(travel, last_hop) if h), n) if any(last_hop) else ()
    return carry, home


def _positive(g_rows, g_cols):
    """bool (b, chunk): column j of the slice is a positive of row i (same group)."""
    return g_rows[:, None] == g_cols[None, :]


# --- sigmoid (SigLIP) ------------------------------------------------------------------------


def _sigmoid_fwd_local(t, v, groups, logit_scale, logit_bias, *, n, chunk, total):
    scale = jnp.exp(logit_scale)

    def block(k, acc, travel):
        v, gv = travel

        def part(acc, xs):
            vj, gj = xs
            z = jnp.where(_positive(groups, gj), 1.0, -1.0)
            return acc + jnp.sum(jax.nn.log_sigmoid(z * (scale * _dot(t, vj) + logit_bias))), None

        acc, _ = jax.lax.scan(part, acc, (_slices(v, chunk), _slices(gv, chunk)))
        return acc, (v, gv)

    acc, _ = _ring(n, block, jnp.float32(0.0), (v, groups), (False, False))
    return -jax.lax.psum(acc, BATCH_AXES) / total


def _sigmoid_bwd_local(t, v, groups, logit_scale, logit_bias, g, *, n, chunk, total):
    scale = jnp.exp(logit_scale)
    coef = -g / total  # d loss / d log_sigmoid(z * logit)

    def block(k, carry, travel):
        v, g_v, gv = travel

        def part(carry, xs):
            gt, g_scale, g_bias = carry
            vj, g_vj, gvj = xs
            z = jnp.where(_positive(groups, g_vj), 1.0, -1.0)
            scaled = scale * _dot(t, vj)  # exp(logit_scale) * cosine
            grad = coef * z * jax.nn.sigmoid(-z * (scaled + logit_bias))  # d loss / d logit
            gt = gt + scale * jnp.matmul(grad, vj, precision=_HI)
            gvj = gvj + scale * jnp.matmul(grad.T, t, precision=_HI)
            return (gt, g_scale + jnp.sum(grad * scaled), g_bias + jnp.sum(grad)), gvj

        xs = (_slices(v, chunk), _slices(g_v, chunk), _slices(gv, chunk))
        carry, gv = jax.lax.scan(part, carry, xs)
        return carry, (v, g_v, gv.reshape(v.shape))

    zero = jnp.float32(0.0)
    (gt, g_scale, g_bias), (gv,) = _ring(
        n, block, (jnp.zeros_like(t), zero, zero), (v, groups, jnp.zeros_like(v)), (False, False, True)
    )
    return gt, gv, jax.lax.psum(g_scale, BATCH_AXES), jax.lax.psum(g_bias, BATCH_AXES)


# --- softmax (InfoNCE) -----------------------------------------------------------------------


def _lse_update(m, s, logits, axis):
    """Online log-sum-exp along ``axis``: (running max, sum of exp(x - max)) with new ``logits``."""
    new_m = jnp.maximum(m, jnp.max(logits, axis=axis))
    s = s * jnp.exp(m - new_m) + jnp.sum(jnp.exp(logits - jnp.expand_dims(new_m, axis)), axis=axis)
    return new_m, s


def _softmax_fwd_local(t, v, groups, counts, logit_scale, *, n, chunk, total):
    """-> (loss, text->image log-sum-exp of the local rows, image->text one of the local columns).

    The targets' part: row i's target is uniform over its group (``counts[i]`` pairs), and so is
    column j's; a positive (i, j) has counts[i] == counts[j], so both directions together take
    2 * logit_ij / counts[i] from every positive, summed over the ring in ``pos``."""
    scale, b = jnp.exp(logit_scale), t.shape[0]
    neg_inf = jnp.full((b,), -jnp.inf, jnp.float32)
    zeros = jnp.zeros((b,), jnp.float32)
    weight = 1.0 / counts.astype(jnp.float32)

    def block(k, carry, travel):
        v, g_v, col_m, col_s = travel

        def part(carry, xs):
            rows, pos = carry
            vj, gj, mj, sj = xs
            logits = scale * _dot(t, vj)
            pos = pos + jnp.sum(jnp.where(_positive(groups, gj), logits, 0.0) * weight[:, None])
            return (_lse_update(*rows, logits, 1), pos), _lse_update(mj, sj, logits, 0)

        xs = (_slices(v, chunk), _slices(g_v, chunk), _slices(col_m, chunk), _slices(col_s, chunk))
        carry, (col_m, col_s) = jax.lax.scan(part, carry, xs)
        return carry, (v, g_v, col_m.reshape(b), col_s.reshape(b))

    ((row_m, row_s), pos), (col_m, col_s) = _ring(
        n, block, ((neg_inf, zeros), jnp.float32(0.0)), (v, groups, neg_inf, zeros), (False, False, True, True)
    )
    row_lse, col_lse = row_m + jnp.log(row_s), col_m + jnp.log(col_s)
    loss = 0.5 * jax.lax.psum(jnp.sum(row_lse) + jnp.sum(col_lse) - 2.0 * pos, BATCH_AXES) / total
    return loss, row_lse, col_lse


def _softmax_bwd_local(t, v, groups, counts, logit_scale, row_lse, col_lse, g, *, n, chunk, total):
    scale = jnp.exp(logit_scale)
    coef = 0.5 * g / total
    weight = 2.0 / counts.astype(jnp.float32)  # a positive's -logit_ij / counts[i] in both directions

    def block(k, carry, travel):
        v, g_v, lse_v, gv = travel

        def part(carry, xs):
            gt, g_scale = carry
            vj, gj, lse_j, gvj = xs
            logits = scale * _dot(t, vj)
            target = jnp.where(_positive(groups, gj), weight[:, None], 0.0)
            grad = coef * (jnp.exp(logits - row_lse[:, None]) + jnp.exp(logits - lse_j[None, :]) - target)
            gt = gt + scale * jnp.matmul(grad, vj, precision=_HI)
            gvj = gvj + scale * jnp.matmul(grad.T, t, precision=_HI)
            return (gt, g_scale + jnp.sum(grad * logits)), gvj

        xs = (_slices(v, chunk), _slices(g_v, chunk), _slices(lse_v, chunk), _slices(gv, chunk))
        carry, gv = jax.lax.scan(part, carry, xs)
        return carry, (v, g_v, lse_v, gv.reshape(v.shape))

    init = (jnp.zeros_like(t), jnp.float32(0.0))
    (gt, g_scale), (gv,) = _ring(n, block, init, (v, groups, col_lse, jnp.zeros_like(v)), (False, False, False, True))
    return gt, gv, jax.lax.psum(g_scale, BATCH_AXES)


# --- the global functions ----------------------------------------------------------------------


def _layout(text_embeds, image_embeds, mesh: Mesh, chunk: int) -> dict:
    """Static sizes of the ring; one-line errors for a batch or chunk that does not split."""
    _check(text_embeds, image_embeds)
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    total = text_embeds.shape[0]
    if total % n:
        raise ValueError(f"ring loss: global batch {total} is not divisible by data x fsdp = {n} devices")
    b = total // n
    chunk = chunk or b
    if chunk < 1 or b % chunk:
        raise ValueError(f"ring loss: chunk {chunk} must divide the per-device batch {b} (global {total} / {n})")
    return dict(n=n, chunk=chunk, total=total)


def _sharded(fn, mesh, in_specs, out_specs):
    # check_vma off: the ring's loop carries start replicated (zeros) and become per-device;
    # the replicated outputs are psums by construction. Nothing differentiates through it.
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def _group_ids(groups, total: int) -> jax.Array:
    """int32 (B,): ``groups``, or every pair its own group when None."""
    if groups is None:
        return jnp.arange(total, dtype=jnp.int32)
    groups = jnp.asarray(groups)
    if groups.shape != (total,):
        raise ValueError(f"groups must be one int per pair, shape ({total},), got {groups.shape}")
    return groups.astype(jnp.int32)


def ring_sigmoid_loss(
    text_embeds, image_embeds, logit_scale, logit_bias, mesh: Mesh, *, chunk: int = 0, groups=None
) -> jax.Array:
    """``losses.sigmoid_contrastive_loss`` of the global batch, by ring steps (see module docstring).

    Args:
      text_embeds, image_embeds: (B, D) global arrays, B divisible by the data x fsdp devices.
      logit_scale, logit_bias: fp32 scalars (log inverse temperature, bias).
      mesh: the training mesh ("data", "fsdp", "tensor"); rows are split over data x fsdp.
      chunk: column slice of a ring block; 0 = the whole per-device batch. Must divide it.
      groups: optional int (B,); equal ids are positives of each other (None: the diagonal).
    Returns: scalar fp32 loss, nats per example; differentiable in the embeddings, scale and bias.
    """
    sizes = _layout(text_embeds, image_embeds, mesh, chunk)
    fwd_map = _sharded(partial(_sigmoid_fwd_local, **sizes), mesh, (_ROWS, _ROWS, _VEC, _REP, _REP), _REP)
    bwd_map = _sharded(
        partial(_sigmoid_bwd_local, **sizes), mesh, (_ROWS, _ROWS, _VEC) + (_REP,) * 3, (_ROWS, _ROWS, _REP, _REP)
    )

    @jax.custom_vjp
    def loss(t, v, g, s, bias):
        return fwd_map(t, v, g, s, bias)

    def fwd(t, v, g, s, bias):
        return fwd_map(t, v, g, s, bias), (t, v, g, s, bias)

    def bwd(res, ct):
        gt, gv, g_scale, g_bias = bwd_map(*res, ct)
        return gt, gv, None, g_scale, g_bias

    loss.defvjp(fwd, bwd)
    f32 = partial(jnp.asarray, dtype=jnp.float32)
    g = _group_ids(groups, sizes["total"])
    return loss(f32(text_embeds), f32(image_embeds), g, f32(logit_scale), f32(logit_bias))


def ring_softmax_loss(text_embeds, image_embeds, logit_scale, mesh: Mesh, *, chunk: int = 0, groups=None) -> jax.Array:
    """``losses.softmax_contrastive_loss`` (symmetric InfoNCE) of the global batch, by ring steps
    with an online log-sum-exp in both directions (see module docstring). Arguments as
    ``ring_sigmoid_loss``; returns a scalar fp32 loss (nats), differentiable in the embeddings
    and the scale."""
    sizes = _layout(text_embeds, image_embeds, mesh, chunk)
    fwd_map = _sharded(partial(_softmax_fwd_local, **sizes), mesh, (_ROWS, _ROWS, _VEC, _VEC, _REP), (_REP, _VEC, _VEC))
    bwd_map = _sharded(
        partial(_softmax_bwd_local, **sizes),
        mesh,
        (_ROWS, _ROWS, _VEC, _VEC, _REP, _VEC, _VEC, _REP),
        (_ROWS, _ROWS, _REP),
    )

    @jax.custom_vjp
    def loss(t, v, g, c, s):
        return fwd_map(t, v, g, c, s)[0]

    def fwd(t, v, g, c, s):
        value, row_lse, col_lse = fwd_map(t, v, g, c, s)
        return value, (t, v, g, c, s, row_lse, col_lse)

    def bwd(res, ct):
        gt, gv, g_scale = bwd_map(*res, ct)
        return gt, gv, None, None, g_scale

    loss.defvjp(fwd, bwd)
    f32 = partial(jnp.asarray, dtype=jnp.float32)
    g = _group_ids(groups, sizes["total"])
    return loss(f32(text_embeds), f32(image_embeds), g, positive_counts(g), f32(logit_scale))


def ring_contrastive_loss(
    kind: str, text_embeds, image_embeds, logit_scale, logit_bias=None, groups=None, *, mesh: Mesh, chunk: int = 0
) -> jax.Array:
    """``losses.contrastive_loss`` (same arguments, same value and gradients) by ring steps over
    ``mesh``'s batch devices, ``chunk`` columns at a time (``ring_sigmoid_loss``)."""
    if kind == "softmax":
        return ring_softmax_loss(text_embeds, image_embeds, logit_scale, mesh, chunk=chunk, groups=groups)
    if kind == "sigmoid":
        if logit_bias is None:
            raise ValueError("the sigmoid loss needs a logit_bias")
        return ring_sigmoid_loss(text_embeds, image_embeds, logit_scale, logit_bias, mesh, chunk=chunk, groups=groups)
    raise ValueError(f"unknown loss {kind!r}; expected 'softmax' or 'sigmoid'")


def contrastive_loss_by_impl(
    kind: str,
    text_embeds,
    image_embeds,
    logit_scale,
    logit_bias=None,
    groups=None,
    *,
    impl: str = "gather",
    mesh: Mesh | None = None,
    chunk: int = 0,
) -> jax.Array:
    """The config's ``loss_impl``: "gather" (``losses.contrastive_loss``, the (local_B, global_B)
    logits of the all-gathered batch) or "ring" (``ring_contrastive_loss``; needs ``mesh``).
    Same value and gradients."""
    if impl == "gather":
        return contrastive_loss(kind, text_embeds, image_embeds, logit_scale, logit_bias, groups)
    if impl != "ring":
        raise ValueError(f"unknown loss_impl {impl!r}; expected one of {LOSS_IMPLS}")
    if mesh is None:
        raise ValueError("loss_impl 'ring' needs the training mesh")
    return ring_contrastive_loss(
        kind, text_embeds, image_embeds, logit_scale, logit_bias, groups, mesh=mesh, chunk=chunk
    )


def chunked_softmax_loss(text_embeds, image_embeds, logit_scale, mesh: Mesh, *, chunk: int = 0, groups=None):
    """The earlier name of ``ring_softmax_loss`` (kept so callers keep working)."""
    return ring_softmax_loss(text_embeds, image_embeds, logit_scale, mesh, chunk=chunk, groups=groups)


def sharded_contrastive_loss(kind, text_embeds, image_embeds, logit_scale, logit_bias=None, groups=None, **kwargs):
    """The earlier name of ``contrastive_loss_by_impl`` (kept so callers keep working)."""
    return contrastive_loss_by_impl(kind, text_embeds, image_embeds, logit_scale, logit_bias, groups, **kwargs)
