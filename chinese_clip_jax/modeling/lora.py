"""LoRA adapters as a params-tree transform: low-rank deltas next to the params, merged on use.

The model's own param tree never changes: the adapters live in one extra top-level subtree,
``params["lora"]``, that mirrors the paths of the kernels they adapt::

    params["lora"] = {"scale": alpha / rank,
                      "text_model": {"encoder": {"layer_0": {"attention": {"query": {"a": A, "b": B}}}}}, ...}

``merge_lora(params)`` returns the ordinary param tree with every adapted kernel replaced by
``W + scale * A @ B`` (A: ``in_shape + (rank,)``, B: ``(rank,) + out_shape``; a leading layer
axis under ``scan_layers``), and without the ``"lora"`` subtree: what the towers, the
evaluator, the conversion mapping and every export see. B starts at zero, so a fresh adapter
leaves the model exactly as it was. Why a transform and not a LoRA ``Dense`` module:
docs/training.md ("Parameter-efficient fine-tuning").
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "LORA_KEY",
    "LORA_TARGETS",
    "LORA_TOWERS",
    "init_lora",
    "merge_lora",
    "lora_paths",
    "parse_names",
    "count_params",
]

LORA_KEY = "lora"
# target name -> the projections it adapts (module names inside a layer), and how many leading
# kernel dims are inputs (the attention output kernel is (heads, head_dim, embed)).
LORA_TARGETS = {"attention": ("query", "key", "value", "out"), "mlp": ("fc1", "fc2")}
_N_IN = {"query": 1, "key": 1, "value": 1, "out": 2, "fc1": 1, "fc2": 1}
LORA_TOWERS = {"text": "text_model", "image": "vision_model"}


def parse_names(value: str | Iterable[str], allowed: Iterable[str], key: str) -> tuple[str, ...]:
    """``"a,b"`` (or a sequence) -> ``("a", "b")``, each one of ``allowed``; ValueError naming ``key``."""
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v).strip() for v in value]
    names = [n for n in names if n]
    allowed = tuple(allowed)
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ValueError(f"{key} = {value!r}: must be a comma-separated list of {', '.join(allowed)}")
    return tuple(dict.fromkeys(names))


def lora_paths(params: dict, towers: Iterable[str], targets: Iterable[str]) -> list[tuple[str, ...]]:
    """The module paths (to the dict holding ``kernel``) that adapters go on, in tree order."""
    names = {n for t in targets for n in LORA_TARGETS[t]}
    paths = []
    for tower in towers:
        top = LORA_TOWERS[tower]
        encoder = params.get(top, {}).get("encoder", {}) if isinstance(params.get(top), dict) else {}
        found = 0
        for layer in sorted(encoder, key=_layer_order):
            for block in ("attention", "mlp"):
                for name in sorted(encoder[layer].get(block, {})):
                    if name in names and "kernel" in encoder[layer][block][name]:
                        paths.append((top, "encoder", layer, block, name))
                        found += 1
        if not found:
            raise ValueError(
                f"lora.towers includes {tower!r} but {top} has no transformer layers to adapt "
                "(a ResNet image tower has none: use lora.towers=text)"
            )
    return paths


def _layer_order(name: str):
    return (0, int(name.rsplit("_", 1)[1])) if name.startswith("layer_") else (1, name)


def _get(tree: dict, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


def init_lora(
    params: dict, rank: int, alpha: float, towers: Iterable[str], targets: Iterable[str], seed: int = 0
) -> dict:
    """The ``params["lora"]`` subtree (numpy float32) for ``params`` (arrays or ShapeDtypeStructs).

    A ~ N(0, 1/fan_in) (fan_in: the kernel's input size), B = 0: the adapted model equals the
    base one exactly until B moves. Deterministic in ``seed``.
    """
    if rank < 1:
        raise ValueError(f"lora.rank must be >= 1 to build adapters, got {rank}")
    rng = np.random.default_rng(seed)
    out: dict = {"scale": np.float32(alpha / rank)}
    for path in lora_paths(params, towers, targets):
        shape = tuple(_get(params, path)["kernel"].shape)
        n_in = _N_IN[path[-1]]
        lead = shape[:1] if path[2] == "layers" else ()  # scanned: a leading layer axis
        body = shape[len(lead) :]
        in_shape, out_shape = body[:n_in], body[n_in:]
        fan_in = int(np.prod(in_shape))
        a = (rng.standard_normal(lead + in_shape + (rank,)) / np.sqrt(fan_in)).astype(np.float32)
        b = np.zeros(lead + (rank,) + out_shape, np.float32)
        node = out
        for k in path:
            node = node.setdefault(k, {})
        node.update(a=a, b=b)
    return out


def _adapter_leaves(lora: dict, prefix: tuple[str, ...] = ()):
    for k, v in lora.items():
        if k == "scale" and not prefix:
            continue
        if isinstance(v, dict) and "a" in v and "b" in v:
            yield prefix + (k,), v
        elif isinstance(v, dict):
            yield from _adapter_leaves(v, prefix + (k,))


def _delta(a: jax.Array, b: jax.Array, kernel_shape: tuple[int, ...], scale) -> jax.Array:
    rank = a.shape[-1]
    stacked = b.ndim + a.ndim - 2 > len(kernel_shape)  # one shared leading layer axis
    if stacked:
        n = a.shape[0]
        a2 = a.reshape(n, -1, rank)
        b2 = b.reshape(n, rank, -1)
        d = jnp.einsum("lir,lro->lio", a2, b2)
    else:
        d = a.reshape(-1, rank) @ b.reshape(rank, -1)
    return (scale * d).reshape(kernel_shape)


def merge_lora(params: dict) -> dict:
    """``params`` without ``"lora"``, each adapted kernel replaced by ``W + scale * A @ B`` (fp32).

    Params without adapters come back as they are (the same dict). Works on numpy and jax
    arrays, inside ``jit`` and under ``grad`` (gradients reach A and B)."""
    if LORA_KEY not in params:
        return params
    lora = params[LORA_KEY]
    merged = {k: v for k, v in params.items() if k != LORA_KEY}
    scale = lora["scale"]
    for path, ab in _adapter_leaves(lora):
        # copy the dicts along the path so the input tree is not modified
        node = merged
        for k in path:
            node[k] = dict(node[k])
            node = node[k]
        w = node["kernel"]
        node["kernel"] = w + _delta(ab["a"], ab["b"], tuple(w.shape), scale).astype(w.dtype)
    return merged


def count_params(tree) -> int:
    """Number of scalars in a pytree of arrays."""
    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree)))
