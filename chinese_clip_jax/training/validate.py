"""The one validation of a trainer config, run before anything is built.

``validate_config(config, reference)`` raises a one-line ``ConfigError`` naming the key, the
value and what is allowed: keys missing from ``reference`` (``train/configs/base.py``'s
``get_config()``; misspellings get the close matches), non-positive counts (``eval_every`` /
``checkpoint_every`` may be -1, once per epoch, with ``epochs`` set), unknown choices
(``dtype``, ``loss``, ``loss_impl``, ``freeze``, ``model.remat``, ``data.name``, ``data.cn_clip.format``, ...)
and model sizes the config classes refuse.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from ..modeling.config import ChineseCLIPConfig, ChineseCLIPTextConfig, ChineseCLIPVisionConfig

__all__ = ["ConfigError", "validate_config", "unknown_key_error", "known_keys", "flat_keys"]


class ConfigError(ValueError):
    """A trainer config key or value that cannot work; the message names it and what is allowed."""


def flat_keys(config, prefix: str = "") -> list[str]:
    """Dotted names of every leaf key (``optimizer.lr``, ``model.text.hidden_size``, ...)."""
    out = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items"):
            out.extend(flat_keys(value, name + "."))
        else:
            out.append(name)
    return out


def known_keys(reference) -> set[str]:
    """Dotted keys of ``reference``, plus every tower field under ``model.text`` / ``model.vision``
    (the config classes take them all)."""
    from ..modeling.config import ChineseCLIPTextConfig, ChineseCLIPVisionConfig

    known = set(flat_keys(reference))
    known |= {f"model.text.{k}" for k in ChineseCLIPTextConfig._field_names()}
    known |= {f"model.vision.{k}" for k in ChineseCLIPVisionConfig._field_names()}
    return known


def unknown_key_error(key: str, known: Iterable[str]) -> ConfigError:
    """``ConfigError`` for an unknown dotted key, with the close matches among ``known``."""
    known = sorted(known)
    head, _, leaf = key.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == head]
    initials = "".join(w[:1] for w in leaf.split("_"))  # learning_rate -> lr
    close = [f"{head}.{s}" if head else s for s in siblings if s == initials]
    close += [c for c in difflib.get_close_matches(key, known, n=3, cutoff=0.6) if c not in close]
    if not close:  # the last part alone, among its siblings
        close = [f"{head}.{c}" if head else c for c in difflib.get_close_matches(leaf, siblings, n=3, cutoff=0.3)]
    close = close[:3]
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint} (train/configs/base.py lists every key)")


def _get(config, dotted: str) -> Any:
    for part in dotted.split("."):
        config = config[part]
    return config


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config.{key} = {value!r}: must be {allowed}")


def _int_at_least(config, key: str, low: int) -> None:
    v = _get(config, key)
    _check(isinstance(v, int) and not isinstance(v, bool) and v >= low, key, v, f"an int >= {low}")


def _number_at_least(config, key: str, low: float, strict: bool = False) -> None:
    v = _get(config, key)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (v > low if strict else v >= low)
    _check(ok, key, v, f"a number {'>' if strict else '>='} {low}")


def _choice(config, key: str, choices: Iterable) -> None:
    v = _get(config, key)
    choices = list(choices)
    _check(v in choices, key, v, "one of " + ", ".join(repr(c) for c in choices))


# sources whose training records carry a "label" (loss_positives="label"): the demo's class,
# cn_clip's text_id, a files table's label column
LABELLED_SOURCES = ("demo", "cn_clip", "files")


def validate_config(config, reference=None) -> None:
    """Raises ``ConfigError`` for the first bad key or value of a trainer config.

    reference: the config every key must exist in (``train/configs/base.py``'s); None skips
    the key check (a library caller building its own ConfigDict from base).
    """
    if reference is not None:
        known = known_keys(reference)
        for key in flat_keys(config):
            if key not in known and not any(key.startswith(k + ".") for k in known):
                raise unknown_key_error(key, known)
    from ..data import SOURCES, apply_spec

    try:  # data.spec (a data-set spec) is short for data.name + that source's keys: expanded first
        apply_spec(config.data)
    except (ValueError, ImportError) as e:
        raise ConfigError(str(e)) from None
    from ..modeling.config import DTYPES
    from ..modeling.layers import REMAT_POLICIES
    from .optim import FROZEN_PREFIXES

    for key in ("total_steps", "batch_size", "log_every", "keep_checkpoints"):
        _int_at_least(config, key, 1)
    accum = config.accum_steps
    if accum != "auto":
        ok = isinstance(accum, int) and not isinstance(accum, bool) and accum >= 1
        _check(ok, "accum_steps", accum, "an int >= 1 or 'auto'")
    _number_at_least(config, "epochs", 0.0)
    for key, low in (("checkpoint_every", 1), ("eval_every", 0)):
        if config[key] == -1:  # once per epoch
            _check(config.epochs > 0, key, -1, f"an int >= {low}, or -1 (once per epoch) with config.epochs > 0")
        else:
            _int_at_least(config, key, low)
    _int_at_least(config, "context_length", 2)
    _int_at_least(config, "seed", 0)
    _choice(config, "dtype", ("auto", *DTYPES))
    _choice(config, "loss", ("softmax", "sigmoid"))
    from .ring_losses import LOSS_IMPLS

    _choice(config, "loss_impl", LOSS_IMPLS)
    _int_at_least(config, "loss_chunk", 0)
    from .step import LOSS_POSITIVES

    _choice(config, "loss_positives", LOSS_POSITIVES)
    if config.loss_positives == "label":
        _check(
            config.data.name in LABELLED_SOURCES,
            "loss_positives",
            "label",
            f"'pair' or 'caption' with data.name = {config.data.name!r}: only "
            + ", ".join(LABELLED_SOURCES)
            + " give labels",
        )
    _choice(config, "freeze", [k for k in FROZEN_PREFIXES if k is not None])
    _check_trainable(config)
    for key in ("data", "fsdp", "tensor"):
        v = config.mesh[key]
        _check(isinstance(v, int) and (v >= 1 or v == -1), f"mesh.{key}", v, "an int >= 1, or -1 (fill)")
    _number_at_least(config, "optimizer.lr", 0.0)
    _int_at_least(config, "optimizer.warmup_steps", 0)
    for key in ("optimizer.weight_decay", "optimizer.grad_clip", "optimizer.end_lr_factor"):
        _number_at_least(config, key, 0.0)
    for key in ("optimizer.b1", "optimizer.b2"):
        v = _get(config, key)
        _check(isinstance(v, (int, float)) and 0 <= v < 1, key, v, "a number in [0, 1)")
    _number_at_least(config, "optimizer.eps", 0.0, strict=True)
    remat = config.model.remat
    lowered = remat.lower() if isinstance(remat, str) else remat  # "True" / "False" from a command line
    _check(
        lowered in (True, False, "", "auto", "none", "true", "false") or remat in REMAT_POLICIES,
        "model.remat",
        remat,
        "one of 'auto', 'none', " + ", ".join(repr(k) for k in REMAT_POLICIES),
    )
    _choice(config, "model.attention_impl", ("auto", "", None, "xla", "cudnn", "splash"))
    scan = config.model.scan_layers
    _check(
        scan in (True, False) or (isinstance(scan, str) and scan.lower() in ("auto", "true", "false")),
        "model.scan_layers",
        scan,
        "one of 'auto', True, False",
    )
    from .step import RNG_IMPLS
    from .xla_flags import GPU_FLAG_SETS

    _choice(config, "rng_impl", ("auto", *RNG_IMPLS))
    _choice(config, "xla_gpu_flags", tuple(GPU_FLAG_SETS))
    _choice(config, "data.name", SOURCES)
    if config.data.name == "cn_clip":
        _choice(config, "data.cn_clip.format", ("tsv", "lmdb"))
        _check(
            bool(config.data.cn_clip.root),
            "data.cn_clip.root",
            config.data.cn_clip.root,
            "the cn_clip dataset directory",
        )
    if config.data.name == "webdataset":
        _check(
            bool(config.data.webdataset.shards),
            "data.webdataset.shards",
            config.data.webdataset.shards,
            "a shard pattern, e.g. /data/{00000..00009}.tar",
        )
    _int_at_least(config, "data.num_threads", 1)
    from ..data import check_config as check_data_config

    try:  # the data module's own checks: crops, workers, the source's path schemes and backends
        check_data_config(config.data)
    except (ValueError, ImportError) as e:
        raise ConfigError(str(e)) from None
    if config.require_init_from and not config.init_from:
        raise ConfigError(
            "this config fine-tunes a checkpoint: pass --config.init_from=SRC (a HF dir, a cn_clip "
            ".pt file or a `python -m convert` output)"
        )
    if not config.init_from:
        try:
            build_model_config(config.model)
        except (TypeError, ValueError) as e:
            text = str(e).replace("text_config", "model.text").replace("vision_config", "model.vision")
            raise ConfigError(f"config.{text}" if text.startswith("model.") else f"config.model: {text}") from None


def _check_trainable(config) -> None:
    """``lora.*`` and ``unfreeze_last_layers.*``: values, and no contradiction with ``freeze``."""
    from ..modeling.lora import LORA_TARGETS, LORA_TOWERS, parse_names

    _int_at_least(config, "lora.rank", 0)
    _number_at_least(config, "lora.alpha", 0.0, strict=True)
    try:
        towers = parse_names(config.lora.towers, LORA_TOWERS, "config.lora.towers")
        parse_names(config.lora.targets, LORA_TARGETS, "config.lora.targets")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    frozen = config.freeze or None
    for tower in ("text", "image"):
        key = f"unfreeze_last_layers.{tower}"
        v = _get(config, key)
        _check(isinstance(v, int) and not isinstance(v, bool) and v >= -1, key, v, "an int >= 0, or -1 (off)")
        if v >= 0 and frozen == tower:
            raise ConfigError(f"config.{key} = {v} contradicts config.freeze = {frozen!r}: set one of them")
    if config.lora.rank > 0 and frozen in towers:
        raise ConfigError(
            f"config.lora.towers = {config.lora.towers!r} includes the tower config.freeze = {frozen!r} "
            "freezes: drop it from lora.towers or set freeze=''"
        )
    partial = any(_get(config, f"unfreeze_last_layers.{t}") >= 0 for t in ("text", "image"))
    scan = config.model.scan_layers
    if partial and (scan is True or (isinstance(scan, str) and scan.lower() in ("auto", "true"))):
        raise ConfigError(
            f"config.model.scan_layers = {scan!r}: unfreeze_last_layers needs unrolled layers (one param "
            "subtree per layer): pass --config.model.scan_layers=False"
        )


def lora_settings(config) -> dict | None:
    """``config.lora`` as ``create_train_state`` takes it (towers and targets parsed), or None
    when ``lora.rank`` is 0."""
    from ..modeling.lora import LORA_TARGETS, LORA_TOWERS, parse_names

    c = config.lora
    if int(c.rank) == 0:
        return None
    return dict(
        rank=int(c.rank),
        alpha=float(c.alpha),
        towers=parse_names(c.towers, LORA_TOWERS, "config.lora.towers"),
        targets=parse_names(c.targets, LORA_TARGETS, "config.lora.targets"),
    )


def unfreeze_settings(config) -> dict | None:
    """``config.unfreeze_last_layers`` as the optimizer and the step take it: {tower: N >= 0}, or None."""
    return {t: int(n) for t, n in config.unfreeze_last_layers.items() if int(n) >= 0} or None


def build_model_config(model_cfg) -> ChineseCLIPConfig:
    """``model.preset`` (a published architecture) or ``model.text`` / ``model.vision`` sizes;
    ``model.image_size`` (when set) replaces the image tower's resolution."""
    if model_cfg.preset:
        cfg = ChineseCLIPConfig.preset(model_cfg.preset)
    else:
        text = ChineseCLIPTextConfig(**dict(model_cfg.text))
        vision = ChineseCLIPVisionConfig(**dict(model_cfg.vision))
        cfg = ChineseCLIPConfig.from_text_vision_configs(text, vision, projection_dim=model_cfg.projection_dim)
    if model_cfg.image_size:
        cfg = cfg.replace(vision_config=cfg.vision_config.replace(image_size=int(model_cfg.image_size)))
    return cfg
