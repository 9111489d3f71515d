"""Serving export: the two encoders as serialized ``jax.export`` artefacts (StableHLO), loadable
without flax, this library's model code or the training stack.

    python -m convert SRC OUT --export [--platforms cpu,cuda,tpu]      # or save_exported(...)

    from chinese_clip_jax.export import load_exported                  # jax + numpy + safetensors
    enc = load_exported(OUT)
    text = enc.text(input_ids, attention_mask)   # (B, context_length) int -> (B, D) float32
    image = enc.image(pixel_values)              # (B, 3, R, R) float32 -> (B, D) float32

``OUT`` holds ``text_features.jaxexport`` and ``image_features.jaxexport`` (batch dimension
symbolic, lowered for each platform asked; the loader compiles once per batch size it meets),
``params.safetensors`` (the params are an input of both functions, not constants inside them:
a huge model exceeds what one serialized module may hold), ``export.json`` (shapes,
platforms) and the processor files (``vocab.txt``, ``preprocessor_config.json``). Outputs
are ``get_text_features`` / ``get_image_features``: unnormalized projections, as the
model's methods of those names.

This module imports only jax, numpy and safetensors (``save_exported`` imports the model code
when called); ``chinese_clip_jax/__init__`` loads its own names lazily, so importing
``chinese_clip_jax.export`` pulls in nothing else.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["DEFAULT_PLATFORMS", "ExportedCLIP", "load_exported", "save_exported"]

DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
TEXT_FILE = "text_features.jaxexport"
IMAGE_FILE = "image_features.jaxexport"
PARAMS_FILE = "params.safetensors"
META_FILE = "export.json"
FORMAT = "chinese_clip_jax.export/1"


class ExportedCLIP:
    """The deserialized encoders and their params (placed on the default device once).

    ``text(input_ids, attention_mask)`` and ``image(pixel_values)`` take numpy or jax arrays of
    any batch size and return (batch, projection_dim) float32 jax arrays.

    Compilation: the serialized artefact is shape-polymorphic in the batch (one file serves
    every batch size, nothing is re-exported), but XLA compiles for static shapes, so each
    distinct batch size compiles once, on first use, in this process. To bound the compiles, pad
    batches to a few sizes (``chinese_clip_jax.inference.encoding.pad_to_bucket``) and keep ``out[:n]``.
    """

    def __init__(self, directory: str | os.PathLike):
        from safetensors.numpy import load_file

        directory = os.fspath(directory)
        meta_path = os.path.join(directory, META_FILE)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(
                f"{directory} is not an export directory: no {META_FILE} "
                "(write one with `python -m convert SRC OUT --export`)"
            )
        with open(meta_path, encoding="utf-8") as f:
            self.meta = json.load(f)
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: format {self.meta.get('format')!r}, this loader reads {FORMAT!r}")
        self.context_length = int(self.meta["context_length"])
        self.image_size = int(self.meta["image_size"])
        self.projection_dim = int(self.meta["projection_dim"])
        self.platforms = tuple(self.meta["platforms"])
        self.params = {k: jnp.asarray(v) for k, v in load_file(os.path.join(directory, PARAMS_FILE)).items()}
        self._text = _deserialize(os.path.join(directory, TEXT_FILE))
        self._image = _deserialize(os.path.join(directory, IMAGE_FILE))
        self._text_fn = jax.jit(self._text.call)
        self._image_fn = jax.jit(self._image.call)

    def text(self, input_ids, attention_mask=None) -> jax.Array:
        """(B, context_length) token ids (and 0/1 mask; default all ones) -> (B, D) float32."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or ids.shape[1] != self.context_length:
            raise ValueError(
                f"input_ids must be (batch, {self.context_length}) (the exported context length), got shape {ids.shape}"
            )
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
        return self._text_fn(self.params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))

    def image(self, pixel_values) -> jax.Array:
        """(B, 3, R, R) float32 pixels, as the processor makes them -> (B, D) float32."""
        px = jnp.asarray(pixel_values, jnp.float32)
        r = self.image_size
        if px.ndim != 4 or tuple(px.shape[1:]) != (3, r, r):
            raise ValueError(f"pixel_values must be (batch, 3, {r}, {r}), got shape {tuple(px.shape)}")
        return self._image_fn(self.params, px)


def _deserialize(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing export artefact {path}")
    with open(path, "rb") as f:
        return jax.export.deserialize(bytearray(f.read()))


def load_exported(directory: str | os.PathLike) -> ExportedCLIP:
    """Loads what ``save_exported`` / ``python -m convert SRC OUT --export`` wrote."""
    return ExportedCLIP(directory)


# --------------------------------------------------------------------------- writing


def output_names() -> tuple[str, ...]:
    """Every name ``save_exported`` may create in its directory (all checked before any work)."""
    from .conversion.write import PROCESSOR_FILES

    own = (TEXT_FILE, IMAGE_FILE, PARAMS_FILE, META_FILE)
    return own + tuple(n + ".tmp" for n in own[:3]) + ("config.json",) + PROCESSOR_FILES


def save_exported(
    out: str | os.PathLike,
    cfg,
    params: Any,
    *,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
    context_length: int = 52,
    dtype: Any = jnp.float32,
    processor_from: str | None = None,
) -> str:
    """Writes the serving export of ``(cfg, params)`` into directory ``out``; returns it.

    platforms: any of "cpu", "cuda", "tpu", "rocm" (one artefact runs on each). context_length:
    the fixed text length (the processor's, 52 by default). dtype: compute dtype (params are
    stored fp32). Refuses a directory holding any file it would write (``output_names``); writes nothing if the
    params do not match ``cfg``.
    """
    import flax.linen as nn

    from .conversion.check import check_params
    from .conversion.mapping import set_path
    from .conversion.write import copy_processor_files
    from .modeling import ChineseCLIPModel

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

    from .conversion.write import write_safetensors

    os.makedirs(out, exist_ok=True)
    for name, exp in ((TEXT_FILE, text), (IMAGE_FILE, image)):
        tmp = os.path.join(out, name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(exp.serialize())
        os.replace(tmp, os.path.join(out, name))
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
    with open(os.path.join(out, META_FILE), "w", encoding="utf-8") as f:  # last: marks the export complete
        json.dump(meta, f, indent=2)
    return out
