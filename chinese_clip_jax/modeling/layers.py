"""Building blocks shared by both towers: dense layers with logical axes, attention, MLP, and
the layer stack (unrolled or ``nn.scan``-ed, optionally rematerialised).

Logical axis names used for params: ``vocab``, ``embed``, ``heads``, ``kv``, ``mlp``, ``norm``,
``layers`` (the stacked axis under ``scan_layers``); for activations: ``batch``, ``seq``,
``act_embed``. ``chinese_clip_jax.sharding`` maps them onto the mesh.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from chinese_clip_jax.modeling.splash import splash_attention

Dtype = Any
Initializer = Callable[..., jax.Array]

ACTIVATION_AXES = ("batch", "seq", "act_embed")


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # BERT's erf GELU
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
}


def partitioned(init: Initializer, axes: Sequence[str | None]) -> Initializer:
    return nn.with_logical_partitioning(init, tuple(axes))


def constrain(x: jax.Array) -> jax.Array:
    """Activation sharding hint at block boundaries: (batch, seq, embed)."""
    return nn.with_logical_constraint(x, ACTIVATION_AXES)


def compute_copy(param: jax.Array, dtype: Dtype, axes: Sequence[str | None]) -> jax.Array:
    """``param`` in the compute ``dtype``, cast where it lives: the copy keeps the param's logical
    sharding (``axes``), so under FSDP the all-gather that feeds the matmul moves ``dtype``
    (bf16: half the bytes of gathering fp32 and casting after). A no-op cast for fp32."""
    if param.dtype == dtype:
        return param
    return nn.with_logical_constraint(param.astype(dtype), tuple(axes))


class Dense(nn.Module):
    """``x @ kernel + bias`` over the last ``len(in_axes)`` dims of x; kernel axes named.

    ``features`` may be a tuple (e.g. ``(heads, head_dim)``) for a multi-dim output.
    """

    features: int | tuple[int, ...]
    in_axes: tuple[str | None, ...]
    out_axes: tuple[str | None, ...]
    std: float = 0.02
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        n_in = len(self.in_axes)
        in_shape = x.shape[-n_in:]
        axes = self.in_axes + self.out_axes
        kernel = self.param(
            "kernel",
            partitioned(nn.initializers.normal(self.std), axes),
            in_shape + features,
            jnp.float32,
        )
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        y = jax.lax.dot_general(x.astype(self.dtype), compute_copy(kernel, self.dtype, axes), (contract, ((), ())))
        if self.use_bias:
            bias = self.param("bias", partitioned(nn.initializers.zeros, self.out_axes), features, jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


def layer_norm(eps: float, dtype: Dtype, name: str) -> nn.LayerNorm:
    """LayerNorm whose statistics are fp32 whatever ``dtype`` (flax's force_float32_reductions)."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        scale_init=partitioned(nn.initializers.ones, ("norm",)),
        bias_init=partitioned(nn.initializers.zeros, ("norm",)),
        name=name,
    )


def head_major_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Softmax attention, same maths as ``jax.nn.dot_product_attention(implementation="xla")``.

    q, k, v: (batch, seq, heads, head_dim); mask: bool broadcastable to (batch, heads, q, k) or None.
    Returns (batch, seq, heads, head_dim) in q's dtype; scores and softmax in fp32. The two
    products run head-major, (batch, heads, seq, head_dim), so XLA:CPU gets plain batched GEMMs:
    faster on CPU than ``jax.nn.dot_product_attention`` (figures: docs/performance.md).
    """
    dtype = q.dtype
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    scores = jnp.einsum(
        "bhqd,bhkd->bhqk", q * jnp.asarray(q.shape[-1] ** -0.5, dtype), k, preferred_element_type=jnp.float32
    )
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", probs, v).transpose(0, 2, 1, 3)


# cuDNN's fused attention (jax 0.10.2) refuses an odd sequence length in training ("Unsupported
# sequence length Q 197, KV 197": its bias check fires on the zero-size bias placeholder), so an
# odd length (the ViT's 1 + patches) is padded to a multiple of this and the padding masked.
CUDNN_SEQ_MULTIPLE = 8


def cudnn_padded_length(seq: int) -> int:
    """The length cuDNN attention runs ``seq`` tokens at: ``seq`` if even, else the next multiple of
    ``CUDNN_SEQ_MULTIPLE`` (197 -> 200)."""
    return seq if seq % 2 == 0 else -(-seq // CUDNN_SEQ_MULTIPLE) * CUDNN_SEQ_MULTIPLE


def padded_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, implementation: str):
    """``jax.nn.dot_product_attention`` in the form cuDNN's kernel takes, for any length.

    q, k, v: (batch, seq, heads, head_dim); mask: bool (batch, 1, 1, seq) key-padding mask of
    right-padded sequences, or None. The mask becomes ``key_value_seq_lengths``; an odd ``seq`` is
    zero-padded to ``cudnn_padded_length(seq)``, the padded keys masked by those lengths and the
    padded queries' rows dropped from the output. ``implementation`` is "cudnn" in the model;
    "xla" runs the same arguments on any backend (the tests compare it with the plain form).
    """
    b, seq = q.shape[:2]
    padded = cudnn_padded_length(seq)
    kwargs = attention_mask_kwargs(mask, "cudnn")
    if padded != seq:
        if not kwargs:
            kwargs = {"key_value_seq_lengths": jnp.full((b,), seq, jnp.int32)}
        widths = ((0, 0), (0, padded - seq), (0, 0), (0, 0))
        q, k, v = (jnp.pad(t, widths) for t in (q, k, v))
    y = jax.nn.dot_product_attention(q, k, v, implementation=implementation, **kwargs)
    return y[:, :seq]


def attention_mask_kwargs(mask: jax.Array | None, implementation: str | None) -> dict:
    """The key-padding mask as ``jax.nn.dot_product_attention`` keyword arguments.

    ``mask``: bool (batch, 1, 1, seq), True for keys that may be attended, or None (no mask:
    the image tower). For ``implementation="cudnn"`` it becomes ``key_value_seq_lengths``
    (int32 (batch,), the number of True keys), the padding form cuDNN's fused kernel takes (a
    (batch, 1, 1, seq) mask is turned into a bias cuDNN rejects: "Bias must have same seq
    length as QKV"); this assumes right-padded texts (valid tokens first), as the processor
    and the data pipeline give them. Otherwise it stays ``mask``.
    """
    if mask is None:
        return {}
    if implementation == "cudnn":
        return {"key_value_seq_lengths": mask.reshape(mask.shape[0], -1).sum(-1, dtype=jnp.int32)}
    return {"mask": mask}


class Attention(nn.Module):
    """Multi-head self-attention.

    Params: query/key/value kernels (embed, heads, kv), out kernel (heads, kv, embed).
    ``mask``: bool (batch, 1, 1, seq) with True for keys that may be attended, or None.
    ``implementation``: "xla" or "cudnn" go through ``jax.nn.dot_product_attention`` with that
    implementation (the mask in the form each takes, ``attention_mask_kwargs``; cudnn with odd
    lengths padded, ``padded_attention``); None uses it too (JAX picks) except on the CPU
    backend, where the faster ``head_major_attention`` runs. "splash" runs the Pallas TPU splash
    kernel (``splash.splash_attention``; interpret mode off TPU).
    """

    num_heads: int
    head_dim: int
    qkv_std: float = 0.02
    out_std: float = 0.02
    dtype: Dtype = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        def proj(name):
            return Dense(
                (self.num_heads, self.head_dim),
                ("embed",),
                ("heads", "kv"),
                std=self.qkv_std,
                dtype=self.dtype,
                name=name,
            )(x)

        q, k, v = proj("query"), proj("key"), proj("value")
        if self.implementation is None and jax.default_backend() == "cpu":
            y = head_major_attention(q, k, v, mask)
        elif self.implementation == "cudnn":
            y = padded_attention(q, k, v, mask, "cudnn")
        elif self.implementation == "splash":
            y = splash_attention(q, k, v, mask)
        else:
            y = jax.nn.dot_product_attention(
                q, k, v, implementation=self.implementation, **attention_mask_kwargs(mask, self.implementation)
            )
        return Dense(x.shape[-1], ("heads", "kv"), ("embed",), std=self.out_std, dtype=self.dtype, name="out")(y)


class MLP(nn.Module):
    intermediate_size: int
    activation: str
    fc1_std: float = 0.02
    fc2_std: float = 0.02
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = Dense(self.intermediate_size, ("embed",), ("mlp",), std=self.fc1_std, dtype=self.dtype, name="fc1")(x)
        h = ACTIVATIONS[self.activation](h)
        return Dense(x.shape[-1], ("mlp",), ("embed",), std=self.fc2_std, dtype=self.dtype, name="fc2")(h)


def resolve_scan_layers(scan_layers: bool | str) -> bool:
    """``scan_layers`` option -> bool. "auto": unrolled on GPU (where ``nn.scan``'s while loop
    made the base train step slower, issue 9; figures: docs/accelerators.md), scanned elsewhere
    (CPU: same speed, less memory, faster compiles; TPU: the usual choice).
    "true"/"false" strings (a command line's) are accepted."""
    if isinstance(scan_layers, str):
        key = scan_layers.lower()
        if key == "auto":
            return jax.default_backend() != "gpu"
        if key in ("true", "false"):
            return key == "true"
        raise ValueError(f"scan_layers must be True, False or 'auto', got {scan_layers!r}")
    return bool(scan_layers)


# Names ``precision`` takes (``jax.default_matmul_precision``'s legacy names): "highest" /
# "float32" = full fp32 matmuls (GPU/TPU parity with PyTorch fp32), "high" / "tensorfloat32",
# "default" / "bfloat16" (the backend's fastest).
PRECISIONS = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32")


def matmul_precision(precision: str | None):
    """Context in which every matmul traced gets ``precision`` (a ``PRECISIONS`` name); None: as is."""
    if precision is None:
        return contextlib.nullcontext()
    return jax.default_matmul_precision(precision)


# ``attention_impl`` values (see ``Attention``).
ATTENTION_IMPLS = (None, "xla", "cudnn", "splash")


class ConfiguredModule(nn.Module):
    """Fields of the towers and of the joint model: the architecture and how to run it.

    config: the architecture (a text, vision or joint config). dtype: compute dtype (params stay
    fp32; LayerNorm statistics, softmax and logits are fp32). attention_impl: ``implementation``
    for ``jax.nn.dot_product_attention`` (None, "xla", "cudnn"), or "splash" (the Pallas TPU kernel;
    see ``Attention``). scan_layers:
    stacked layer params run with ``nn.scan`` (True, False or "auto": ``resolve_scan_layers``).
    remat: recompute layer activations in the backward pass, a key of ``REMAT_POLICIES``
    ("dots", "full"; True means "full") or False (see ``LayerStack``). precision: matmul
    precision of every projection and attention product (a ``PRECISIONS`` name; None keeps
    JAX's default, which on GPU/TPU is not fp32: "highest" gives fp32 parity there).
    """

    config: Any
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    scan_layers: bool | str = False
    remat: bool | str = False
    precision: str | None = None

    def __post_init__(self):
        remat_policy(self.remat)  # a bad value fails here, naming the choices, not at the first apply
        resolve_scan_layers(self.scan_layers)
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"precision must be None or one of {PRECISIONS}, got {self.precision!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        super().__post_init__()


DROPOUT_MASK = "dropout_mask"  # the checkpoint name of ``Dropout``'s keep mask


class Dropout(nn.Module):
    """``nn.Dropout`` (same rng stream, same bits) whose keep mask is named ``DROPOUT_MASK``, so the
    remat policies save it: the backward pass reuses the mask instead of drawing the random bits
    again (one bool per element kept, against a full-size RNG expansion per dropout per layer)."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if self.rate == 0.0 or deterministic:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        keep_prob = 1.0 - self.rate
        keep = jax.random.bernoulli(self.make_rng("dropout"), p=keep_prob, shape=x.shape)
        keep = checkpoint_name(keep, DROPOUT_MASK)
        return jax.lax.select(keep, x / keep_prob, jnp.zeros_like(x))


_save_dropout_masks = jax.checkpoint_policies.save_only_these_names(DROPOUT_MASK)

# What each layer keeps for the backward pass under remat; the rest is recomputed. Both keep the
# dropout masks (``Dropout``): recomputing them would draw every random bit twice.
REMAT_POLICIES: dict[str, Callable] = {
    # the outputs of the projections (q, k, v, attention out, fc1, fc2): attention scores,
    # softmax, LayerNorm and activations are recomputed (a few % more FLOPs).
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _save_dropout_masks
    ),
    # nothing but the layer's input: the whole layer runs again (one more forward pass).
    "full": _save_dropout_masks,
}


def remat_policy(remat: bool | str | None) -> Callable | None:
    """The ``jax.checkpoint`` policy for a ``remat`` option; None for no rematerialisation.

    False / None / "" / "none": off; True or "full": ``nothing_saveable``; "dots": save the
    projection matmuls' outputs only. "true" / "false" (any case, as a command line gives them)
    mean True / False. Anything else raises ValueError naming the choices.
    """
    if isinstance(remat, str) and remat.lower() in ("true", "false"):
        remat = remat.lower() == "true"
    if remat is None or remat is False or remat in ("", "none"):
        return None
    if remat is True:
        remat = "full"
    if not isinstance(remat, str) or remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be False, True or one of {sorted(REMAT_POLICIES)}, got {remat!r}")
    return REMAT_POLICIES[remat]


class LayerStack(nn.Module):
    """Applies ``num_layers`` copies of ``layer_cls(**layer_kwargs)`` to ``x``.

    Unrolled, the params are ``layer_0 ... layer_{N-1}``; with ``scan`` they are one ``layers``
    subtree whose leaves have a leading axis of size N (logical name ``layers``), which compiles
    one layer body instead of N. ``remat`` (see ``remat_policy``) recomputes what the policy does
    not save in the backward pass, trading FLOPs for memory.

    On the CPU backend remat only works together with ``scan``: XLA:CPU drops the optimization
    barriers that keep an unrolled layer's recomputation apart, and its CSE then merges the
    recomputation into the forward pass (the train step's memory is unchanged). A warning says so.
    """

    layer_cls: type[nn.Module]
    layer_kwargs: dict
    num_layers: int
    scan: bool | str = False
    remat: bool | str = False

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        cls = self.layer_cls
        policy = remat_policy(self.remat)
        scan = resolve_scan_layers(self.scan)
        if policy is not None:
            if not scan and jax.default_backend() == "cpu":
                warnings.warn(
                    "remat has no effect on the CPU backend without scan_layers=True (XLA:CPU merges "
                    "the recomputation back into the forward pass); use scan_layers=True",
                    stacklevel=2,
                )
            cls = nn.remat(cls, prevent_cse=not scan, policy=policy)
        if scan:
            stack = nn.scan(
                cls,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=nn.broadcast,
                length=self.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(**self.layer_kwargs, name="layers")
            x, _ = stack(x, mask)
            return x
        for i in range(self.num_layers):
            x, _ = cls(**self.layer_kwargs, name=f"layer_{i}")(x, mask)
        return x
