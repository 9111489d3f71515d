"""Pallas TPU splash attention for the towers (``attention_impl="splash"``).

jax's splash attention kernel (``jax.experimental.pallas.ops.tpu.splash_attention``) run over the
q, k, v the other attention paths take, (batch, seq, heads, head_dim):

* q is scaled by ``head_dim ** -0.5`` in its own dtype before the kernel (the kernel applies no
  scale), as ``layers.head_major_attention`` does;
* the sequence is zero-padded to a multiple of ``SPLASH_SEQ_MULTIPLE`` (the kernel's block sizes
  are multiples of 128 lanes: text 52 -> 128, image 197 -> 256, 257 -> 384, 577 -> 640), the
  padded keys masked and the padded query rows dropped from the output;
* the key-padding mask (the text tower's; right- or left-padded alike) becomes segment ids:
  every query is segment 0, a key is segment 0 when it may be attended and 1 when it is padding;
  the kernel's static mask is full (non-causal);
* under a mesh (``jax.set_mesh``, as ``sharding.use_mesh_and_rules`` sets it inside the train
  step) the kernel runs in ``jax.shard_map``: a ``pallas_call`` is opaque to XLA's SPMD
  partitioner, so each device runs it on its own rows (batch over ("data", "fsdp")) and heads
  (over "tensor"); an axis that does not divide its dimension is left out (that dimension is then
  replicated along it, as ``sharding.param_shardings`` does for params); with no mesh set, the
  kernel is called as it is (one device; XLA would gather sharded inputs to run it whole);
* on CPU (the tests) the same kernel runs in Pallas' interpret mode; on GPU it is refused. The
  platform is the current mesh's (so a step compiled for a TPU topology on a CPU host gets the
  real kernel), else ``jax.default_backend()``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from chinese_clip_jax.sharding import BATCH_AXES

SPLASH_SEQ_MULTIPLE = 128  # the kernel's lane width: every block size is a multiple of it
_BLOCKS = (512, 256, 128)  # block sizes tried, largest first, for q and kv alike


def splash_padded_length(seq: int) -> int:
    """The length splash attention runs ``seq`` tokens at: the next multiple of 128."""
    return -(-seq // SPLASH_SEQ_MULTIPLE) * SPLASH_SEQ_MULTIPLE


def block_size(padded: int) -> int:
    """The kernel's q / kv block (forward and backward) for a padded length: the largest of 512,
    256, 128 that divides it."""
    return next(b for b in _BLOCKS if padded % b == 0)


def _platform() -> str:
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    return jax.default_backend() if device is None else device.platform


def _check(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> None:
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            "splash attention takes q, k, v of one shape (batch, seq, heads, head_dim), "
            f"got {q.shape}, {k.shape}, {v.shape}"
        )
    b, seq = q.shape[:2]
    if mask is not None and (mask.dtype != jnp.bool_ or mask.size != b * seq or mask.shape[-1] != seq):
        raise ValueError(
            f"splash attention takes a bool key-padding mask (batch, 1, 1, seq) = {(b, 1, 1, seq)}, "
            f"got {mask.dtype} {mask.shape}"
        )


def _kernel(padded: int, heads: int, interpret: bool, seq_minor: bool):
    block = block_size(padded)
    layout = splash.QKVLayout.SEQ_MINOR if seq_minor else splash.QKVLayout.HEAD_DIM_MINOR
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
        q_layout=layout,
        k_layout=layout,
        v_layout=layout,
    )
    mask = splash.MultiHeadMask([splash.FullMask((padded, padded))] * heads)
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _fit(axes: tuple[str, ...], dim: int, mesh) -> tuple[str, ...]:
    keep: list[str] = []
    for name in axes:
        if dim % (math.prod(mesh.shape[a] for a in keep) * mesh.shape[name]) == 0:
            keep.append(name)
    return tuple(keep)


def splash_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *, seq_minor: bool = True
) -> jax.Array:
    """Softmax attention by the Pallas splash kernel, same maths as ``head_major_attention``.

    q, k, v: (batch, seq, heads, head_dim); mask: bool (batch, 1, 1, seq), True for keys that may
    be attended, or None. Returns (batch, seq, heads, head_dim) in q's dtype. Scores, softmax and
    the probabilities-times-values product are fp32 inside the kernel. ``seq_minor``: the kernel
    takes q, k, v laid out (heads, head_dim, seq); with head_dim (64, 80) minor instead, TPU's
    128-lane tiles pad every copy around the kernel to 128 wide (the base step's temporaries at
    batch 512 on v5e: 11.8 GiB against 10.7; ``bench/attention_memory.py``, docs/accelerators.md).
    """
    _check(q, k, v, mask)
    b, seq, heads, head_dim = q.shape
    padded = splash_padded_length(seq)
    valid = jnp.ones((b, seq), jnp.bool_) if mask is None else mask.reshape(b, seq)
    valid = jnp.pad(valid, ((0, 0), (0, padded - seq)))  # the padding keys: False
    kv_segments = jnp.where(valid, 0, 1).astype(jnp.int32)
    q = q * jnp.asarray(head_dim**-0.5, q.dtype)
    widths = ((0, 0), (0, padded - seq), (0, 0), (0, 0))
    q, k, v = (jnp.pad(t, widths).transpose(0, 2, 1, 3) for t in (q, k, v))  # (b, heads, padded, d)
    platform = _platform()
    if platform not in ("tpu", "cpu"):
        raise ValueError(
            f"attention_impl='splash' is a TPU kernel (interpret mode on CPU), not for {platform}: "
            "use 'cudnn' or 'xla' there"
        )
    interpret = platform == "cpu"

    def run(q, k, v, kv_segments):
        kernel = _kernel(padded, q.shape[1], interpret, seq_minor)
        q_segments = jnp.zeros_like(kv_segments)
        return jax.vmap(lambda *a: kernel(*a[:3], segment_ids=splash.SegmentIds(*a[3:])))(
            q, k, v, q_segments, kv_segments
        )

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        y = run(q, k, v, kv_segments)
    else:
        rows = _fit(tuple(a for a in BATCH_AXES if a in mesh.axis_names), b, mesh) or None
        cols = _fit(("tensor",) if "tensor" in mesh.axis_names else (), heads, mesh) or None
        spec = P(rows, cols, None, None)
        y = jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec, P(rows, None)), out_specs=spec, check_vma=False)(
            q, k, v, kv_segments
        )
    return y.transpose(0, 2, 1, 3)[:, :seq]
