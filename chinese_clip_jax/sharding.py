"""Device mesh, the logical-axis rules table, sharded init and batch placement.

One mesh with axes ``("data", "fsdp", "tensor")``. Params and activations carry logical axis
names (see ``chinese_clip_jax.modeling.layers``); ``RULES`` maps them onto mesh axes:

=========  ====================  =========================================================
logical    mesh axes             why
=========  ====================  =========================================================
batch      ("data", "fsdp")      the batch is split over every data-parallel device
embed      "fsdp"                ZeRO-3 / FSDP: params sharded along the model width
mlp        "tensor"              Megatron-style tensor parallelism of the MLP
heads      "tensor"              ... and of attention heads
vocab      "tensor"              the 21128-row word embedding
kv, norm,  None (replicated)     small or not worth splitting
layers,
seq,
act_embed
=========  ====================  =========================================================

A dimension that a mesh axis does not divide evenly is replicated along that axis instead of
failing (e.g. 12 heads on tensor=8): see ``param_shardings``.

Usage::

    mesh = make_mesh(data=-1, fsdp=1, tensor=1)
    params, shardings = sharded_init(model, mesh, jax.random.key(0), input_ids, pixel_values)
    batch = shard_batch(host_local_numpy_batch, mesh)
    with use_mesh_and_rules(mesh):
        ...  # jitted code: the model's nn.with_logical_constraint calls take effect
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "MESH_AXES",
    "BATCH_AXES",
    "RULES",
    "make_mesh",
    "mesh_shape",
    "use_mesh_and_rules",
    "logical_shardings",
    "param_shardings",
    "sharded_init",
    "model_shardings",
    "shard_params",
    "batch_sharding",
    "replicated",
    "shard_batch",
]

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("norm", None),
    ("layers", None),
    ("seq", None),
    ("act_embed", None),
)


def mesh_shape(data: int = -1, fsdp: int = 1, tensor: int = 1, num_devices: int | None = None) -> tuple[int, int, int]:
    """Resolves the mesh sizes; at most one of them may be -1 (fills the remaining devices)."""
    n = jax.device_count() if num_devices is None else num_devices
    sizes = [data, fsdp, tensor]
    for name, s in zip(MESH_AXES, sizes):
        if not isinstance(s, (int, np.integer)) or (s < 1 and s != -1):
            raise ValueError(f"mesh.{name} must be a positive int or -1, got {s!r}")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data}, fsdp={fsdp}, tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(f"{n} devices cannot be split into mesh data={data}, fsdp={fsdp}, tensor={tensor}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} devices, "
            f"but {n} are available"
        )
    return tuple(int(s) for s in sizes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``Mesh`` over all devices (of every process) with axes ("data", "fsdp", "tensor")."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(data, fsdp, tensor, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


@contextlib.contextmanager
def use_mesh_and_rules(mesh: Mesh, rules=RULES):
    """Context in which ``nn.with_logical_constraint`` in the model resolves against ``mesh``."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drops mesh axes that do not divide their dimension (that dim is then replicated)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        keep = []
        for name in names:
            if dim % (math.prod(mesh.shape[a] for a in keep) * mesh.shape[name]) == 0:
                keep.append(name)
        fitted.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return P(*fitted)


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules=RULES) -> Any:
    """NamedShardings for a pytree of ``nn.Partitioned`` (abstract) arrays; unboxed leaves replicate."""
    specs = nn.get_partition_spec(abstract_boxed)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    shapes = nn.unbox(abstract_boxed)
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, _fit_spec(spec, tuple(x.shape), mesh)),
        mesh_specs,
        shapes,
        is_leaf=lambda s: isinstance(s, P),
    )


def param_shardings(model: nn.Module, mesh: Mesh, *init_args, rules=RULES, **init_kwargs) -> Any:
    """Shardings of ``model.init(rng, *init_args)["params"]``, computed without allocating them."""
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *init_args, **init_kwargs)["params"])
    return logical_shardings(abstract, mesh, rules)


def sharded_init(model: nn.Module, mesh: Mesh, rng: jax.Array, *init_args, rules=RULES, **init_kwargs):
    """Initializes the params directly into their shards (never whole on one device).

    Returns ``(params, shardings)``: an unboxed dict of (global) ``jax.Array`` and the matching
    pytree of ``NamedSharding``. ``init_args`` are example inputs; only their shapes matter.
    """
    shardings = param_shardings(model, mesh, *init_args, rules=rules, **init_kwargs)

    def init(rng):
        return nn.unbox(model.init(rng, *init_args, **init_kwargs)["params"])

    with use_mesh_and_rules(mesh, rules):
        params = jax.jit(init, out_shardings=shardings)(rng)
    return params, shardings


def _example_inputs(model: nn.Module) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Abstract one-row inputs of a joint model (text + image), from its config alone."""
    cfg = model.config
    v = cfg.vision_config
    ids = jax.ShapeDtypeStruct((1, min(8, cfg.text_config.max_position_embeddings)), np.int32)
    pixels = jax.ShapeDtypeStruct((1, v.num_channels, v.image_size, v.image_size), np.float32)
    return ids, pixels


def model_shardings(model: nn.Module, mesh: Mesh, rules=RULES) -> Any:
    """Shardings of a ``ChineseCLIPModel``'s params on ``mesh`` from the model alone (its config
    and the params' logical axis names; nothing allocated, no example inputs needed)."""
    ids, pixels = _example_inputs(model)
    abstract = jax.eval_shape(lambda i, p: model.init(jax.random.key(0), i, p)["params"], ids, pixels)
    return logical_shardings(abstract, mesh, rules)


def shard_params(model: nn.Module, params: Any, mesh: Mesh, rules=RULES) -> Any:
    """Places loaded params (boxed or not; e.g. from ``ccj.from_pretrained``) on ``mesh`` as the
    rules table shards them (``model_shardings``): on a data-only mesh they are replicated, with
    fsdp / tensor axes each device holds only its slices. Returns the unboxed, placed params.

    Jit functions of them as usual; run them inside ``use_mesh_and_rules(mesh)`` so the model's
    activation constraints resolve against the mesh (outside it, they are no-ops and XLA
    chooses the activation layout itself: same values).
    """
    shardings = model_shardings(model, mesh, rules)
    params = nn.unbox(params)
    if jax.tree.structure(shardings) != jax.tree.structure(params):
        diff = sorted(_key_paths(shardings) ^ _key_paths(params))
        raise ValueError(
            f"params do not match the model's param tree (first difference: {diff[0] if diff else 'leaf order'}); "
            "were they loaded for this config and scan_layers setting?"
        )
    return jax.device_put(params, shardings)


def _key_paths(tree) -> set[str]:
    return {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ("data", "fsdp"), the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host-local numpy batch (this process's share, ``global_batch / process_count`` rows) ->
    global ``jax.Array`` s sharded over ("data", "fsdp")."""
    sharding = batch_sharding(mesh)
    n_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        global_rows = value.shape[0] * jax.process_count()
        if global_rows % n_shards:
            raise ValueError(
                f"global batch {global_rows} ({key!r}) is not divisible by data x fsdp = {n_shards} devices"
            )
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out
