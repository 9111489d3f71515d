"""Checking params and checkpoints against a config: the shapes the model expects, in both layouts.

``expected_shapes(cfg)`` (Flax paths) and ``expected_hf_shapes(cfg)`` (HF names) come from the
model definition and the mapping table's own transforms, traced once per config (two
``jax.eval_shape`` calls in all, cached), never once per tensor.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ..modeling import ChineseCLIPModel
from ..modeling.config import ChineseCLIPConfig
from . import mapping
from .sources import CheckpointError, TensorSource


@functools.lru_cache(maxsize=16)
def _flax_shapes(cfg: ChineseCLIPConfig) -> dict[str, tuple[int, ...]]:
    from flax import linen as nn

    v = cfg.vision_config
    shapes = jax.eval_shape(
        ChineseCLIPModel(cfg).init,
        jax.random.key(0),
        jnp.zeros((1, 2), jnp.int32),
        jnp.zeros((1, v.num_channels, v.image_size, v.image_size), jnp.float32),
    )
    return {k: tuple(x.shape) for k, x in mapping.flatten(nn.unbox(shapes["params"])).items()}


@functools.lru_cache(maxsize=16)
def _hf_shapes(cfg: ChineseCLIPConfig) -> dict[str, tuple[int, ...]]:
    rows, flax = mapping.table(cfg), _flax_shapes(cfg)
    structs = {r.hf: jax.ShapeDtypeStruct(flax[r.flax], jnp.float32) for r in rows}
    out = jax.eval_shape(lambda xs: {r.hf: r.transform.to_hf(xs[r.hf]) for r in rows}, structs)
    return {name: tuple(x.shape) for name, x in out.items()}


def expected_shapes(cfg: ChineseCLIPConfig) -> dict[str, tuple[int, ...]]:
    """Flax path (unscanned) -> param shape, from the model definition itself (a fresh dict)."""
    return dict(_flax_shapes(cfg))


def expected_hf_shapes(cfg: ChineseCLIPConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> tensor shape: ``expected_shapes`` through each table row's ``to_hf`` (a fresh dict)."""
    return dict(_hf_shapes(cfg))


def check_source_names(source: TensorSource, rows: list[mapping.Row], rename: dict) -> None:
    """Checks that ``rename`` (HF name -> source tensors) covers exactly the table's HF names, and
    that every source tensor read is floating point. Raises CheckpointError listing what differs."""
    wanted = {r.hf for r in rows}
    missing = sorted(n for n in wanted if n not in rename)
    unexpected = sorted(n for n in rename if n not in wanted and not mapping.IGNORED_HF_KEYS.match(n))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                f"missing keys ({len(missing)}): {', '.join(missing[:30])}" + (" ..." if len(missing) > 30 else "")
            )
        if unexpected:
            parts.append(
                f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:30])}"
                + (" ..." if len(unexpected) > 30 else "")
            )
        raise CheckpointError(f"{source.path} does not match the configured architecture: " + "; ".join(parts))
    not_float = sorted({src for n in wanted for src, _, _ in rename[n] if not source.is_float(src)})
    if not_float:
        raise CheckpointError(
            f"{source.path}: weights must be floating point; {len(not_float)} tensors are not "
            f"(e.g. {not_float[0]!r}): an integer or bool checkpoint is not a model"
        )


def check_params(params: dict, cfg: ChineseCLIPConfig) -> dict:
    """Checks names and shapes of Flax params (scanned or not) against ``cfg``; returns them flat
    and unscanned (views, no copies). Raises CheckpointError naming what differs."""
    flat = mapping.flatten(mapping.unstack_layers(params))
    expected = expected_shapes(cfg)
    expected.update({k: shape for k, shape in mapping.FLAX_ONLY.items() if k in flat})  # optional params
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    wrong = [
        f"{k} {tuple(flat[k].shape)} (expected {expected[k]})"
        for k in sorted(set(flat) & set(expected))
        if tuple(flat[k].shape) != expected[k]
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            "params do not match the config: "
            + "; ".join(
                f"{what} {', '.join(names[:20])}"
                for what, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                if names
            )
        )
    return flat
