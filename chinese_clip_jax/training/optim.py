"""The optimizer: AdamW with warmup + cosine, a weight-decay mask, tower freezing, clipping.

* No weight decay on biases, LayerNorm scales/biases, embeddings and ``logit_scale``: only
  leaves named ``kernel`` (dense, projection and patch-embedding weights) decay.
* ``freeze="image"`` (the paper's stage 1, LiT) / ``"text"``: that tower's params (and its
  projection) go through ``optax.set_to_zero`` inside ``optax.multi_transform``, so AdamW holds
  no moments for them (``optax.MaskedNode`` in the state) and the train step keeps them bitwise.
* Stored statistics (``NON_TRAINED`` leaf names: a ResNet tower's BatchNorm ``running_mean`` /
  ``running_var``) are params the model reads behind ``stop_gradient``; they are labelled frozen
  too, so the optimizer holds nothing for them and they never change (frozen BatchNorm).
* LoRA (``params["lora"]``, ``modeling.lora``): only the adapters train; the whole base
  (``logit_scale`` / ``logit_bias`` included) is frozen, so AdamW holds moments for the
  adapters alone. ``unfreeze_last_layers`` ({"text": N, "image": N}, -1 = off) trains the last N
  transformer layers of a tower, the layers after them (the ViT's ``post_layernorm``) and its
  projection, and freezes the rest of that tower (embeddings, earlier layers); with LoRA they
  train next to the adapters.
* Optional global-norm clipping (over the trainable params only).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

__all__ = [
    "FROZEN_PREFIXES",
    "NON_TRAINED",
    "make_schedule",
    "make_optimizer",
    "decay_mask",
    "trainable_labels",
    "label_count",
    "is_frozen",
    "TOWER_KEYS",
]

# Top-level param subtrees of each tower (see chinese_clip_jax.modeling.clip).
FROZEN_PREFIXES = {
    None: (),
    "": (),
    "none": (),
    "image": ("vision_model", "visual_projection"),
    "text": ("text_model", "text_projection"),
}


# Top-level param subtrees of each tower, by the tower names of ``freeze`` / ``unfreeze_last_layers``.
TOWER_KEYS = {"text": ("text_model", "text_projection"), "image": ("vision_model", "visual_projection")}
_TOWER_OF = {k: tower for tower, keys in TOWER_KEYS.items() for k in keys}
# Params of a tower model that come after its transformer layers (trained with the last N).
_AFTER_LAYERS = frozenset({"post_layernorm"})


# Leaf names of params that are statistics, not weights: never updated by the optimizer.
NON_TRAINED = frozenset({"running_mean", "running_var"})


def _frozen_prefixes(freeze: str | None) -> tuple[str, ...]:
    if freeze not in FROZEN_PREFIXES:
        raise ValueError(f"freeze must be None, 'image' or 'text', got {freeze!r}")
    return FROZEN_PREFIXES[freeze]


def is_frozen(top_level_key: str, freeze: str | None) -> bool:
    """Whether the top-level param subtree ``top_level_key`` is frozen under ``freeze``."""
    return top_level_key in _frozen_prefixes(freeze)


def make_schedule(lr: float, warmup_steps: int, total_steps: int, end_lr_factor: float = 0.0) -> optax.Schedule:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then cosine to ``lr * end_lr_factor``."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup_steps = min(int(warmup_steps), total_steps - 1) if total_steps > 1 else 0
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=lr,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=lr * end_lr_factor,
    )


def _leaf_name(path) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def decay_mask(params: Any) -> Any:
    """True for leaves that get weight decay: those named ``kernel``."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_name(path) == "kernel", params)


def _layer_count(params: dict, top: str) -> int:
    encoder = params[top].get("encoder", {})
    if "layers" in encoder:
        raise ValueError(
            "unfreeze_last_layers needs unrolled layers (their params one per layer): pass "
            "--config.model.scan_layers=False"
        )
    return sum(1 for k in encoder if k.startswith("layer_"))


def trainable_labels(params: dict, freeze: str | None, unfreeze_last_layers: dict | None = None) -> dict:
    """ "frozen" / "trainable" label per leaf: by ``freeze``, LoRA (a ``"lora"`` subtree),
    ``unfreeze_last_layers`` and ``NON_TRAINED`` leaves (module docstring)."""
    from ..modeling.lora import LORA_KEY

    prefixes = _frozen_prefixes(freeze)
    lora = LORA_KEY in params
    last = {t: int(n) for t, n in dict(unfreeze_last_layers or {}).items() if int(n) >= 0}
    counts = {t: _layer_count(params, TOWER_KEYS[t][0]) for t in last}

    def in_last_layers(keys, tower) -> bool:
        if keys[0] == TOWER_KEYS[tower][1]:  # the projection
            return True
        if keys[1] in _AFTER_LAYERS:
            return True
        if keys[1] != "encoder" or not keys[2].startswith("layer_"):
            return False  # embeddings, pre-LayerNorm: before the layers
        return int(keys[2].rsplit("_", 1)[1]) >= counts[tower] - last[tower]

    def label(path, _):
        keys = [str(getattr(k, "key", k)) for k in path]
        if keys[-1] in NON_TRAINED or keys[0] in prefixes:
            return "frozen"
        if keys[0] == LORA_KEY:
            return "frozen" if keys == [LORA_KEY, "scale"] else "trainable"
        tower = _TOWER_OF.get(keys[0])
        if tower in last:
            return "trainable" if in_last_layers(keys, tower) else "frozen"
        return "frozen" if lora else "trainable"

    return jax.tree_util.tree_map_with_path(label, dict(params))


def label_count(params: dict, labels: dict) -> tuple[int, int]:
    """(trainable, total) numbers of scalars of ``params`` under ``labels``."""
    import numpy as np

    trainable = total = 0
    for x, lab in zip(jax.tree.leaves(params), jax.tree.leaves(labels)):
        n = int(np.prod(x.shape))
        total += n
        trainable += n if lab == "trainable" else 0
    return trainable, total


def make_optimizer(opt_cfg, total_steps: int, freeze: str | None = None, unfreeze_last_layers: dict | None = None):
    """Builds ``(tx, schedule)`` from ``opt_cfg`` (a ConfigDict or mapping) with keys:

    lr, warmup_steps, weight_decay, b1, b2, eps, grad_clip (0 = off), end_lr_factor; every key
    is required (defaults live once, in ``train/configs/base.py``). ``schedule(step)`` is the
    learning rate used at ``step``.
    """
    o = opt_cfg
    if o["warmup_steps"] < 0:
        raise ValueError(f"optimizer.warmup_steps must be >= 0, got {o['warmup_steps']}")
    schedule = make_schedule(o["lr"], o["warmup_steps"], total_steps, o["end_lr_factor"])
    chain = []
    if o["grad_clip"]:
        chain.append(optax.clip_by_global_norm(o["grad_clip"]))
    chain.append(
        optax.adamw(
            schedule,
            b1=o["b1"],
            b2=o["b2"],
            eps=o["eps"],
            weight_decay=o["weight_decay"],
            mask=decay_mask,
        )
    )
    trainable = optax.chain(*chain)
    _frozen_prefixes(freeze)  # validates
    tx = optax.multi_transform(
        {"trainable": trainable, "frozen": optax.set_to_zero()},
        lambda params: trainable_labels(params, freeze, unfreeze_last_layers),
    )
    return tx, schedule
