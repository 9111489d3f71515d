"""The train state: params, optimizer state, step and RNG, placed on the mesh.

``params`` are the model's (fp32, unboxed); for the sigmoid loss the model carries the
``logit_bias`` param (``ChineseCLIPModel(..., logit_bias_init=...)``). With LoRA they also hold
the adapters, ``params["lora"]`` (``modeling.lora``: small, replicated on the mesh).
``rng`` is a raw ``uint32[2]`` key (checkpointable as a plain array); dropout keys are folded
from it and the step, so a resumed run draws the same dropout masks.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .. import sharding as shd
from ..modeling.lora import LORA_KEY, init_lora
from .losses import SIGLIP_INIT_LOGIT_SCALE

__all__ = ["TrainState", "create_train_state", "abstract_train_state", "example_inputs"]


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    params: Any  # fp32 param dict
    opt_state: Any
    rng: jax.Array  # uint32[2]


def example_inputs(model) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """Shapes that ``model.init`` needs (batch 1): input_ids (1, 8), pixel_values (1, 3, H, W)."""
    v = model.config.vision_config
    return (
        jax.ShapeDtypeStruct((1, 8), jnp.int32),
        jax.ShapeDtypeStruct((1, v.num_channels, v.image_size, v.image_size), jnp.float32),
    )


def _opt_state_shardings(abstract_opt, params, param_shardings, mesh: Mesh):
    """Moments shard like their params (matched by the trailing dict-key path and shape);
    counts and other leaves replicate."""
    by_path = {}
    for (path, s), x in zip(jax.tree_util.tree_flatten_with_path(param_shardings)[0], jax.tree.leaves(params)):
        by_path[tuple(k.key for k in path)] = (s, tuple(x.shape))
    rep = NamedSharding(mesh, P())

    def pick(path, leaf):
        keys = []
        for entry in reversed(path):
            if not isinstance(entry, jax.tree_util.DictKey):
                break
            keys.insert(0, entry.key)
        found = by_path.get(tuple(keys))
        return found[0] if found is not None and found[1] == tuple(leaf.shape) else rep

    return jax.tree_util.tree_map_with_path(pick, abstract_opt)


def create_train_state(
    model,
    tx,
    mesh: Mesh,
    seed: int,
    *,
    loss: str = "softmax",
    init_params: dict | None = None,
    lora: dict | None = None,
) -> tuple[TrainState, TrainState]:
    """A fresh ``TrainState`` sharded on ``mesh`` and the matching pytree of shardings.

    ``init_params`` (e.g. from ``ccj.from_pretrained``) replaces the random init; the random
    init is done shard by shard (``jax.jit(init, out_shardings=...)``). ``lora``: a mapping
    with rank (> 0 adds adapters), alpha, towers, targets (``modeling.lora.init_lora``; the
    adapters are drawn from ``seed``).
    """
    has_bias = getattr(model, "logit_bias_init", None) is not None
    if loss == "sigmoid" and not has_bias:
        raise ValueError(
            "the sigmoid loss needs a model with a logit_bias: ChineseCLIPModel(cfg, ..., "
            "logit_bias_init=losses.SIGLIP_INIT_LOGIT_BIAS)"
        )
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
    ids, pixels = example_inputs(model)
    if init_params is None:
        params, p_shard = shd.sharded_init(
            model, mesh, init_rng, jnp.zeros(ids.shape, ids.dtype), jnp.zeros(pixels.shape, pixels.dtype)
        )
        params = dict(params)
        if loss == "sigmoid":
            params["logit_scale"] = jax.device_put(jnp.float32(SIGLIP_INIT_LOGIT_SCALE), p_shard["logit_scale"])
    else:
        p_shard = shd.param_shardings(
            model, mesh, jnp.zeros(ids.shape, ids.dtype), jnp.zeros(pixels.shape, pixels.dtype)
        )
        init_params = dict(init_params)
        if has_bias and "logit_bias" not in init_params:  # e.g. a HF checkpoint: no bias in that layout
            init_params["logit_bias"] = np.float32(model.logit_bias_init)
        _check_same_tree(init_params, p_shard)
        params = jax.tree.map(
            lambda x, s: jax.device_put(np.asarray(x, np.float32), s), dict(init_params), dict(p_shard)
        )
    p_shard = dict(p_shard)
    if lora is not None and int(lora["rank"]) > 0:
        adapters = init_lora(
            params, int(lora["rank"]), float(lora["alpha"]), lora["towers"], lora["targets"], seed=seed
        )
        p_shard[LORA_KEY] = jax.tree.map(lambda _: NamedSharding(mesh, P()), adapters)
        params = dict(params)
        params[LORA_KEY] = jax.device_put(adapters, p_shard[LORA_KEY])
    abstract_opt = jax.eval_shape(tx.init, params)
    o_shard = _opt_state_shardings(abstract_opt, params, p_shard, mesh)
    opt_state = jax.jit(tx.init, out_shardings=o_shard)(params)
    rep = NamedSharding(mesh, P())
    state = TrainState(
        step=jax.device_put(jnp.int32(0), rep),
        params=params,
        opt_state=opt_state,
        rng=jax.device_put(train_rng, rep),
    )
    shardings = TrainState(step=rep, params=p_shard, opt_state=o_shard, rng=rep)
    return state, shardings


def abstract_train_state(model, tx, mesh: Mesh, lora: dict | None = None) -> TrainState:
    """The ``TrainState`` that ``create_train_state`` would build, as ``jax.ShapeDtypeStruct`` s with
    their shardings, computed without allocating anything (to trace or lower the train step of a
    model too big for this host); ``lora`` as there."""
    import flax.linen as nn

    ids, pixels = example_inputs(model)
    boxed = jax.eval_shape(lambda i, x: model.init(jax.random.key(0), i, x)["params"], ids, pixels)
    p_shard = dict(shd.logical_shardings(boxed, mesh))
    shapes = dict(nn.unbox(boxed))
    params = {
        k: jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=s), shapes[k], p_shard[k])
        for k in shapes
    }
    if lora is not None and int(lora["rank"]) > 0:
        rep = NamedSharding(mesh, P())
        adapters = init_lora(shapes, int(lora["rank"]), float(lora["alpha"]), lora["towers"], lora["targets"])
        params[LORA_KEY] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=rep), adapters)
        p_shard[LORA_KEY] = jax.tree.map(lambda _: rep, adapters)
    abstract_opt = jax.eval_shape(tx.init, params)
    o_shard = _opt_state_shardings(abstract_opt, params, p_shard, mesh)
    opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_opt, o_shard)
    rep = NamedSharding(mesh, P())
    return TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
        params=params,
        opt_state=opt_state,
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep),
    )


def _check_same_tree(params: dict, expected: dict) -> None:
    got = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    want = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(expected)[0]}
    if got != want:
        missing, unexpected = sorted(want - got)[:5], sorted(got - want)[:5]
        raise ValueError(
            f"init params do not match the model config: missing {missing}, unexpected {unexpected} "
            "(was the checkpoint converted with scan_layers matching this run?)"
        )
