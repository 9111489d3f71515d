"""Ring-scheduled contrastive losses that never hold the (local_B, global_B) logit matrix.

``losses.py`` computes each device's (local_B, global_B) logits from all-gathered embeddings:
its memory and all-gather grow with the global batch. Here every device keeps its own text rows
and the image rows travel round the batch devices (``jax.lax.ppermute`` inside ``jax.shard_map``
over ``sharding.BATCH_AXES``), one (local_B, local_B) block per ring step, split further into
(local_B, ``chunk``) column slices. The loss and gradients are the all-gather version's
(same formulas, fp32; only the summation order differs):

* ``ring_sigmoid_loss``: SigLIP; each block adds its sum of log sigmoid (positives are the
  diagonal of the device's own block, ring step 0).
* ``chunked_softmax_loss``: symmetric InfoNCE with an online log-sum-exp (the running max and
  the sum of exponentials below it). The text->image statistics of the local rows stay put;
  the image->text statistics of a column slice travel with its image rows and are home after
  the last hop.

Gradients are a ``jax.custom_vjp`` whose backward pass is a second ring: it recomputes each
block's logits (from the inputs and, for InfoNCE, the two (B,) log-sum-exps saved by the
forward pass) instead of storing them, and the image rows' gradient travels with them and is
home after one more hop. Reverse-mode through the forward loop would store every visiting block
(global_B x dim per device) or every block of logits (local_B x global_B): the memory this
module exists to avoid. What each device holds at once: its own rows, one visiting block of
rows and its gradient, and (local_B, chunk) logits, whatever the global batch.

Communication per step: the forward and backward passes each move every device's image rows
once round the ring (global_B x dim per device in n - 1 hops, as the all-gather does), plus
2 x local_B floats of statistics (InfoNCE) and the image gradient (backward).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ..sharding import BATCH_AXES
from .losses import _check, contrastive_loss

__all__ = ["LOSS_IMPLS", "ring_sigmoid_loss", "chunked_softmax_loss", "sharded_contrastive_loss"]

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


# --- sigmoid (SigLIP) ------------------------------------------------------------------------


def _signs(k, j, b: int, chunk: int):
    """+1 on the positives (the diagonal of the device's own block, ring step 0), else -1."""
    pos = (k == 0) & (jnp.arange(b)[:, None] == j * chunk + jnp.arange(chunk)[None, :])
    return jnp.where(pos, 1.0, -1.0)


def _sigmoid_fwd_local(t, v, logit_scale, logit_bias, *, n, chunk, total):
    scale, b = jnp.exp(logit_scale), t.shape[0]

    def block(k, acc, travel):
        (v,) = travel

        def part(acc, xs):
            j, vj = xs
            z = _signs(k, j, b, chunk)
            return acc + jnp.sum(jax.nn.log_sigmoid(z * (scale * _dot(t, vj) + logit_bias))), None

        acc, _ = jax.lax.scan(part, acc, (jnp.arange(b // chunk), _slices(v, chunk)))
        return acc, (v,)

    acc, _ = _ring(n, block, jnp.float32(0.0), (v,), (False,))
    return -jax.lax.psum(acc, BATCH_AXES) / total


def _sigmoid_bwd_local(t, v, logit_scale, logit_bias, g, *, n, chunk, total):
    scale, b = jnp.exp(logit_scale), t.shape[0]
    coef = -g / total  # d loss / d log_sigmoid(z * logit)

    def block(k, carry, travel):
        v, gv = travel

        def part(carry, xs):
            gt, g_scale, g_bias = carry
            j, vj, gvj = xs
            z = _signs(k, j, b, chunk)
            scaled = scale * _dot(t, vj)  # exp(logit_scale) * cosine
            grad = coef * z * jax.nn.sigmoid(-z * (scaled + logit_bias))  # d loss / d logit
            gt = gt + scale * jnp.matmul(grad, vj, precision=_HI)
            gvj = gvj + scale * jnp.matmul(grad.T, t, precision=_HI)
            return (gt, g_scale + jnp.sum(grad * scaled), g_bias + jnp.sum(grad)), gvj

        xs = (jnp.arange(b // chunk), _slices(v, chunk), _slices(gv, chunk))
        carry, gv = jax.lax.scan(part, carry, xs)
        return carry, (v, gv.reshape(v.shape))

    zero = jnp.float32(0.0)
    (gt, g_scale, g_bias), (gv,) = _ring(
        n, block, (jnp.zeros_like(t), zero, zero), (v, jnp.zeros_like(v)), (False, True)
    )
    return gt, gv, jax.lax.psum(g_scale, BATCH_AXES), jax.lax.psum(g_bias, BATCH_AXES)


# --- softmax (InfoNCE) -----------------------------------------------------------------------


def _lse_update(m, s, logits, axis):
    """Online log-sum-exp along ``axis``: (running max, sum of exp(x - max)) with new ``logits``."""
    new_m = jnp.maximum(m, jnp.max(logits, axis=axis))
    s = s * jnp.exp(m - new_m) + jnp.sum(jnp.exp(logits - jnp.expand_dims(new_m, axis)), axis=axis)
    return new_m, s


def _softmax_fwd_local(t, v, logit_scale, *, n, chunk, total):
    """-> (loss, text->image log-sum-exp of the local rows, image->text one of the local columns)."""
    scale, b = jnp.exp(logit_scale), t.shape[0]
    neg_inf = jnp.full((b,), -jnp.inf, jnp.float32)
    zeros = jnp.zeros((b,), jnp.float32)

    def block(k, rows, travel):
        v, col_m, col_s = travel

        def part(rows, xs):
            vj, mj, sj = xs
            logits = scale * _dot(t, vj)
            return _lse_update(*rows, logits, 1), _lse_update(mj, sj, logits, 0)

        rows, (col_m, col_s) = jax.lax.scan(
            part, rows, (_slices(v, chunk), _slices(col_m, chunk), _slices(col_s, chunk))
        )
        return rows, (v, col_m.reshape(b), col_s.reshape(b))

    (row_m, row_s), (col_m, col_s) = _ring(n, block, (neg_inf, zeros), (v, neg_inf, zeros), (False, True, True))
    row_lse, col_lse = row_m + jnp.log(row_s), col_m + jnp.log(col_s)
    diag = scale * jnp.sum(t * v, axis=1)
    loss = 0.5 * jax.lax.psum(jnp.sum(row_lse - diag) + jnp.sum(col_lse - diag), BATCH_AXES) / total
    return loss, row_lse, col_lse


def _softmax_bwd_local(t, v, logit_scale, row_lse, col_lse, g, *, n, chunk, total):
    scale = jnp.exp(logit_scale)
    coef = 0.5 * g / total
    # the diagonal's -logit_ii in both directions: d/d logit_ii = -2 coef
    diag = scale * jnp.sum(t * v, axis=1)
    gt0, gv0 = -2 * coef * scale * v, -2 * coef * scale * t
    g_scale0 = -2 * coef * jnp.sum(diag)

    def block(k, carry, travel):
        v, lse_v, gv = travel

        def part(carry, xs):
            gt, g_scale = carry
            vj, lse_j, gvj = xs
            logits = scale * _dot(t, vj)
            grad = coef * (jnp.exp(logits - row_lse[:, None]) + jnp.exp(logits - lse_j[None, :]))
            gt = gt + scale * jnp.matmul(grad, vj, precision=_HI)
            gvj = gvj + scale * jnp.matmul(grad.T, t, precision=_HI)
            return (gt, g_scale + jnp.sum(grad * logits)), gvj

        xs = (_slices(v, chunk), _slices(lse_v, chunk), _slices(gv, chunk))
        carry, gv = jax.lax.scan(part, carry, xs)
        return carry, (v, lse_v, gv.reshape(v.shape))

    (gt, g_scale), (gv,) = _ring(n, block, (gt0, g_scale0), (v, col_lse, gv0), (False, False, True))
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


def ring_sigmoid_loss(text_embeds, image_embeds, logit_scale, logit_bias, mesh: Mesh, *, chunk: int = 0) -> jax.Array:
    """``losses.sigmoid_contrastive_loss`` of the global batch, by ring steps (see module docstring).

    Args:
      text_embeds, image_embeds: (B, D) global arrays, B divisible by the data x fsdp devices.
      logit_scale, logit_bias: fp32 scalars (log inverse temperature, bias).
      mesh: the training mesh ("data", "fsdp", "tensor"); rows are split over data x fsdp.
      chunk: column slice of a ring block; 0 = the whole per-device batch. Must divide it.
    Returns: scalar fp32 loss, nats per example; differentiable in all four inputs.
    """
    sizes = _layout(text_embeds, image_embeds, mesh, chunk)
    fwd_map = _sharded(partial(_sigmoid_fwd_local, **sizes), mesh, (_ROWS, _ROWS, _REP, _REP), _REP)
    bwd_map = _sharded(
        partial(_sigmoid_bwd_local, **sizes), mesh, (_ROWS,) * 2 + (_REP,) * 3, (_ROWS, _ROWS, _REP, _REP)
    )

    @jax.custom_vjp
    def loss(t, v, s, bias):
        return fwd_map(t, v, s, bias)

    def fwd(t, v, s, bias):
        return fwd_map(t, v, s, bias), (t, v, s, bias)

    def bwd(res, g):
        return bwd_map(*res, g)

    loss.defvjp(fwd, bwd)
    f32 = partial(jnp.asarray, dtype=jnp.float32)
    return loss(f32(text_embeds), f32(image_embeds), f32(logit_scale), f32(logit_bias))


def chunked_softmax_loss(text_embeds, image_embeds, logit_scale, mesh: Mesh, *, chunk: int = 0) -> jax.Array:
    """``losses.softmax_contrastive_loss`` (symmetric InfoNCE) of the global batch, by ring steps
    with an online log-sum-exp in both directions (see module docstring). Arguments as
    ``ring_sigmoid_loss``; returns a scalar fp32 loss (nats), differentiable in all three inputs."""
    sizes = _layout(text_embeds, image_embeds, mesh, chunk)
    fwd_map = _sharded(partial(_softmax_fwd_local, **sizes), mesh, (_ROWS, _ROWS, _REP), (_REP, _VEC, _VEC))
    bwd_map = _sharded(
        partial(_softmax_bwd_local, **sizes), mesh, (_ROWS, _ROWS, _REP, _VEC, _VEC, _REP), (_ROWS, _ROWS, _REP)
    )

    @jax.custom_vjp
    def loss(t, v, s):
        return fwd_map(t, v, s)[0]

    def fwd(t, v, s):
        value, row_lse, col_lse = fwd_map(t, v, s)
        return value, (t, v, s, row_lse, col_lse)

    def bwd(res, g):
        return bwd_map(*res, g)

    loss.defvjp(fwd, bwd)
    f32 = partial(jnp.asarray, dtype=jnp.float32)
    return loss(f32(text_embeds), f32(image_embeds), f32(logit_scale))


def sharded_contrastive_loss(
    kind: str,
    text_embeds,
    image_embeds,
    logit_scale,
    logit_bias=None,
    *,
    impl: str = "gather",
    mesh: Mesh | None = None,
    chunk: int = 0,
) -> jax.Array:
    """``losses.contrastive_loss`` computed by ``impl``: "gather" (the (local_B, global_B) logits
    of the all-gathered batch) or "ring" (this module; needs ``mesh``). Same value and gradients."""
    if impl == "gather":
        return contrastive_loss(kind, text_embeds, image_embeds, logit_scale, logit_bias)
    if impl != "ring":
        raise ValueError(f"unknown loss_impl {impl!r}; expected one of {LOSS_IMPLS}")
    if mesh is None:
        raise ValueError("loss_impl 'ring' needs the training mesh")
    if kind == "softmax":
        return chunked_softmax_loss(text_embeds, image_embeds, logit_scale, mesh, chunk=chunk)
    if kind == "sigmoid":
        if logit_bias is None:
            raise ValueError("the sigmoid loss needs a logit_bias")
        return ring_sigmoid_loss(text_embeds, image_embeds, logit_scale, logit_bias, mesh, chunk=chunk)
    raise ValueError(f"unknown loss {kind!r}; expected 'softmax' or 'sigmoid'")
