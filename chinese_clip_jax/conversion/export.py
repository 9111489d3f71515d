"""The serving export's writer: the two encoders of a model as serialized ``jax.export``
artefacts (StableHLO) plus their params, in the format ``chinese_clip_jax.export`` loads.

    python -m convert SRC OUT --export [--platforms cpu,cuda,tpu]
    save_exported(OUT, cfg, params, platforms=("cpu", "cuda", "tpu"))

The batch dimension is symbolic; XLA still compiles once per concrete batch size at load time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..export import DEFAULT_PLATFORMS, FORMAT, IMAGE_FILE, META_FILE, PARAMS_FILE, TEXT_FILE
from ..io import atomic_write
from ..modeling import ChineseCLIPModel
from ..processing import DEFAULT_CONTEXT_LENGTH
from .check import check_params
from .mapping import set_path
from .write import copy_processor_files, write_safetensors

__all__ = ["output_names", "save_exported"]


def output_names() -> tuple[str, ...]:
    """Every name ``save_exported`` may create in its directory (all checked before any work)."""
    from .write import PROCESSOR_FILES

    own = (TEXT_FILE, IMAGE_FILE, PARAMS_FILE, META_FILE)
    return own + (PARAMS_FILE + ".tmp", "config.json") + PROCESSOR_FILES


def save_exported(
    out: str | os.PathLike,
    cfg,
    params: Any,
    *,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    dtype: Any = jnp.float32,
    processor_from: str | None = None,
) -> str:
    """Writes the serving export of ``(cfg, params)`` into directory ``out``; returns it.

    platforms: any of "cpu", "cuda", "tpu", "rocm" (one artefact runs on each). context_length:
    the fixed text length (the processor's, 52 by default). dtype: compute dtype (params are
    stored fp32). Refuses a directory holding any file it would write (``output_names``); writes nothing if the
    params do not match ``cfg``.
    """

    out = os.fspath(out)
    platforms = tuple(platforms)
    bad = [p for p in platforms if p not in ("cpu", "cuda", "tpu", "rocm")]
    if bad or not platforms:
        raise ValueError(f"platforms must be some of cpu, cuda, tpu, rocm; got {list(platforms)}")
    existing = [n for n in output_names() if os.path.lexists(os.path.join(out, n))]
    if existing:
        raise FileExistsError(
            f"{os.path.join(out, existing[0])} already exists; an export never overwrites: "
            "choose a new or empty directory"
        )
    flat = {k: np.asarray(v, np.float32) for k, v in check_params(nn.unbox(params), cfg).items()}
    # "xla" attention: plain XLA ops, which lower for every platform (no cuDNN custom call).
    model = ChineseCLIPModel(cfg, dtype=dtype, attention_impl="xla")

    def nest(p: dict) -> dict:
        tree: dict = {}
        for k, v in p.items():
            set_path(tree, k, v)
        return tree

    def text_features(p, input_ids, attention_mask):
        return model.apply({"params": nest(p)}, input_ids, attention_mask, method="get_text_features")

    def image_features(p, pixel_values):
        return model.apply({"params": nest(p)}, pixel_values, method="get_image_features")

    (b,) = jax.export.symbolic_shape("b")
    v = cfg.vision_config
    p_spec = {k: jax.ShapeDtypeStruct(x.shape, jnp.float32) for k, x in flat.items()}
    ids = jax.ShapeDtypeStruct((b, int(context_length)), jnp.int32)
    px = jax.ShapeDtypeStruct((b, v.num_channels, v.image_size, v.image_size), jnp.float32)
    text = jax.export.export(jax.jit(text_features), platforms=platforms)(p_spec, ids, ids)
    image = jax.export.export(jax.jit(image_features), platforms=platforms)(p_spec, px)

    os.makedirs(out, exist_ok=True)
    for name, exp in ((TEXT_FILE, text), (IMAGE_FILE, image)):
        atomic_write(os.path.join(out, name), exp.serialize())
    write_safetensors(os.path.join(out, PARAMS_FILE), lambda: iter(sorted(flat.items())))
    cfg.save(out)
    copy_processor_files(out, cfg, processor_from)
    meta = {
        "format": FORMAT,
        "platforms": list(platforms),
        "context_length": int(context_length),
        "image_size": v.image_size,
        "projection_dim": cfg.projection_dim,
        "compute_dtype": jnp.dtype(dtype).name,
        "jax_version": jax.__version__,
    }
    atomic_write(os.path.join(out, META_FILE), json.dumps(meta, indent=2))  # last: marks the export complete
    return out
