"""Does a training config fit in this host's memory? A rough estimate, made before anything is allocated.

On the CPU backend the params, the optimizer state and the activations kept for the backward
pass all live in host RAM, and a full-size recipe (ViT-B/16 and RoBERTa-base at batch 256) needs
far more than a laptop has: without this check the run allocates, compiles and dies out of
memory with a traceback. ``check_fits(config, options)`` estimates:

- params, gradients and AdamW's two moments: 4 + 4 + 8 bytes per trainable parameter, 4 per
  frozen one (counted from the model's shapes, ``jax.eval_shape``: nothing allocated);
- the activations kept for the backward pass of one micro-batch (``batch_size / accum_steps``),
  per transformer layer and sample, in elements (s tokens, h hidden, a heads; Korthikanti et al.,
  2022, for ``remat="none"``): ``none`` 17 s h + 2.5 a s^2, ``dots`` (matmul outputs kept)
  10 s h + a s^2, ``full`` (layer inputs kept, one layer recomputed at a time) s h; times 4
  bytes (2 in bfloat16). A frozen tower keeps none. A ResNet tower is not counted (the
  estimate is then a lower bound).

and raises ``HostMemoryError`` when that exceeds the memory available (``MemAvailable`` of
``/proc/meminfo``), naming both and what to change. It is an estimate, not a measurement: set
``CCJ_SKIP_MEMORY_CHECK=1`` to start anyway. Other backends are not checked (their own
allocator reports what does not fit in device memory).
"""

from __future__ import annotations

import os

__all__ = ["HostMemoryError", "SKIP_ENV", "estimate_bytes", "available_bytes", "check_fits"]

SKIP_ENV = "CCJ_SKIP_MEMORY_CHECK"
_GIB = 2**30


class HostMemoryError(MemoryError):
    """The config's estimated memory exceeds what this host has available."""


def available_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (bytes); None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _param_counts(model_config) -> dict[str, int]:
    """Parameters per top-level params key (``text_model``, ``vision_model``, projections, ...)."""
    import jax
    import numpy as np

    from ..modeling import ChineseCLIPModel
    from .state import example_inputs

    model = ChineseCLIPModel(model_config)
    ids, pixels = example_inputs(model)
    shapes = jax.eval_shape(lambda i, x: model.init(jax.random.key(0), i, x)["params"], ids, pixels)
    import flax.linen as nn

    shapes = nn.unbox(shapes)
    return {k: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v)) for k, v in shapes.items()}


def _accum_steps(config) -> int:
    """The micro-batches of ``config`` on this CPU host ("auto" resolves to 1 on CPU: training.compile)."""
    return 1 if config.accum_steps == "auto" else max(1, int(config.accum_steps))


def _layer_elements(s: int, h: int, a: int, remat: str) -> float:
    if remat == "full":
        return s * h
    if remat == "dots":
        return 10 * s * h + a * s * s
    return 17 * s * h + 2.5 * a * s * s


def estimate_bytes(config, model_config, remat: str, compute_dtype: str) -> dict[str, int]:
    """{"params": params + grads + optimizer bytes, "activations": bytes, "total"} (see the module)."""
    from .optim import is_frozen

    freeze = config.freeze or None
    counts = _param_counts(model_config)
    state = sum(n * (4 if is_frozen(k, freeze) else 16) for k, n in counts.items())
    width = 2 if compute_dtype == "bfloat16" else 4
    micro = config.batch_size // _accum_steps(config)
    t, v = model_config.text_config, model_config.vision_config
    towers = [("text_model", config.context_length, t)]
    if not model_config.is_resnet:
        towers.append(("vision_model", (v.image_size // v.patch_size) ** 2 + 1, v))
    per_sample = 0.0
    for key, tokens, tower in towers:
        if not is_frozen(key, freeze):
            layer = _layer_elements(tokens, tower.hidden_size, tower.num_attention_heads, remat)
            if remat == "full":  # one layer's activations recomputed at a time
                layer_total = layer * tower.num_hidden_layers + _layer_elements(
                    tokens, tower.hidden_size, tower.num_attention_heads, "none"
                )
            else:
                layer_total = layer * tower.num_hidden_layers
            per_sample += layer_total * width
    activations = int(per_sample * micro)
    return {"params": state, "activations": activations, "total": state + activations}


def check_fits(config, model_config, options, available: int | None = None) -> dict[str, int] | None:
    """Raises ``HostMemoryError`` when ``config`` (with its resolved run ``options``) is estimated
    to need more than ``available`` bytes (default: this host's); returns the estimate, or None
    when not checked (another backend, ``CCJ_SKIP_MEMORY_CHECK=1``, memory unknown)."""
    import jax

    if os.environ.get(SKIP_ENV, "") not in ("", "0") or jax.default_backend() != "cpu":
        return None
    available = available_bytes() if available is None else available
    if available is None:
        return None
    est = estimate_bytes(config, model_config, options.remat, options.dtype)
    if est["total"] <= available:
        return est
    micro = config.batch_size // _accum_steps(config)
    raise HostMemoryError(
        f"this config needs about {est['total'] / _GIB:.1f} GiB on this CPU-only host (params and optimizer "
        f"{est['params'] / _GIB:.1f} GiB, activations of a micro-batch of {micro} about "
        f"{est['activations'] / _GIB:.1f} GiB) and {available / _GIB:.1f} GiB is available: lower "
        "--config.batch_size, raise --config.accum_steps, set --config.model.remat=full, pick a smaller model, "
        f"or run on an accelerator; {SKIP_ENV}=1 starts anyway"
    )


def check_config(config) -> dict[str, int] | None:
    """``check_fits`` for a trainer config as the trainer will build it: run options resolved for
    this platform, the model from ``model.*`` (or ``init_from``'s ``config.json`` when it is a
    local directory; another ``init_from`` is not checked)."""
    from ..modeling.config import ChineseCLIPConfig
    from .defaults import resolve_run_options
    from .validate import build_model_config

    if config.init_from:
        if not os.path.isfile(os.path.join(str(config.init_from), "config.json")):
            return None
        model_config = ChineseCLIPConfig.from_pretrained(str(config.init_from))
        if config.model.image_size:
            vision = model_config.vision_config.replace(image_size=int(config.model.image_size))
            model_config = model_config.replace(vision_config=vision)
    else:
        model_config = build_model_config(config.model)
    return check_fits(config, model_config, resolve_run_options(config))
