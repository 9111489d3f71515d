"""The optimizer: AdamW with warmup + cosine, a weight-decay mask, tower freezing, clipping.

* No weight decay on biases, LayerNorm scales/biases, embeddings and ``logit_scale``: only
  leaves named ``kernel`` (dense, projection and patch-embedding weights) decay.
* ``freeze="image"`` (the paper's stage 1, LiT) / ``"text"``: that tower's params (and its
  projection) go through ``optax.set_to_zero`` inside ``optax.multi_transform``, so AdamW holds
  no moments for them (``optax.MaskedNode`` in the state) and the train step keeps them bitwise.
* Stored statistics (``NON_TRAINED`` leaf names: a ResNet tower's BatchNorm ``running_mean`` /
  ``running_var``) are params the model reads behind ``stop_gradient``; they are labelled frozen
  too, so the optimizer holds nothing for them and they never change (frozen BatchNorm).
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
    "is_frozen",
]

# Top-level param subtrees of each tower (see chinese_clip_jax.modeling.clip).
FROZEN_PREFIXES = {
    None: (),
    "": (),
    "none": (),
    "image": ("vision_model", "visual_projection"),
    "text": ("text_model", "text_projection"),
}


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


def trainable_labels(params: dict, freeze: str | None) -> dict:
    """ "frozen" / "trainable" label per leaf: by top-level subtree, and ``NON_TRAINED`` leaves."""
    prefixes = _frozen_prefixes(freeze)

    def label(path, _):
        return "frozen" if path[0].key in prefixes or _leaf_name(path) in NON_TRAINED else "trainable"

    return jax.tree_util.tree_map_with_path(label, dict(params))


def make_optimizer(opt_cfg, total_steps: int, freeze: str | None = None):
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
        lambda params: trainable_labels(params, freeze),
    )
    return tx, schedule
