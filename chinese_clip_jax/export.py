"""Serving export: the two encoders as serialized ``jax.export`` artefacts (StableHLO), loadable
without flax, this library's model code or the training stack.

    python -m convert SRC OUT --export [--platforms cpu,cuda,tpu]   # or conversion.export.save_exported

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

This module is the loader and the format's names: it imports only jax, numpy and safetensors
(``chinese_clip_jax/__init__`` loads its own names lazily, so importing ``chinese_clip_jax.export``
pulls in nothing else). The writer, which needs the model code, is
``chinese_clip_jax.conversion.export.save_exported``.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["DEFAULT_PLATFORMS", "ExportedCLIP", "load_exported"]

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
        self.meta = _read_meta(meta_path)
        self.context_length = self.meta["context_length"]
        self.image_size = self.meta["image_size"]
        self.projection_dim = self.meta["projection_dim"]
        self.platforms = tuple(self.meta["platforms"])
        params_path = os.path.join(directory, PARAMS_FILE)
        if not os.path.isfile(params_path):
            raise FileNotFoundError(f"missing export artefact {params_path}{_REWRITE}")
        try:
            self.params = {k: jnp.asarray(v) for k, v in load_file(params_path).items()}
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"{params_path}: not a readable safetensors file ({_first_line(e)}){_REWRITE}") from None
        self._text = _deserialize(os.path.join(directory, TEXT_FILE))
        self._image = _deserialize(os.path.join(directory, IMAGE_FILE))
        for name, exp in ((TEXT_FILE, self._text), (IMAGE_FILE, self._image)):
            _check_params(self.params, exp, params_path, os.path.join(directory, name))
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


def _first_line(e: BaseException) -> str:
    """``Type: first line`` (as ``io.first_line``; this module imports nothing else of the package)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


_REWRITE = "; the export is damaged or incomplete: write it again with `python -m convert SRC NEW_OUT --export`"


def _read_meta(path: str) -> dict:
    """export.json -> its dict, every field this loader uses checked (one-line errors naming the file)."""
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({_first_line(e)}){_REWRITE}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: must hold a JSON object, got {type(meta).__name__}{_REWRITE}")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, this loader reads {FORMAT!r}")
    for key in ("context_length", "image_size", "projection_dim"):
        v = meta.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{path}: {key} must be an int >= 1, got {v!r}{_REWRITE}")
    platforms = meta.get("platforms")
    if not isinstance(platforms, list) or not platforms or not all(isinstance(p, str) for p in platforms):
        raise ValueError(f"{path}: platforms must be a non-empty list of names, got {platforms!r}{_REWRITE}")
    return meta


def _deserialize(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing export artefact {path}{_REWRITE}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return jax.export.deserialize(bytearray(data))
    except Exception as e:  # noqa: BLE001 - flatbuffers / StableHLO errors of a truncated or foreign file
        raise ValueError(f"{path}: not a readable jax.export artefact ({_first_line(e)}){_REWRITE}") from None


def _check_params(params: dict, exported, params_path: str, path: str) -> None:
    """The params file holds exactly the arrays (names, shapes) the artefact takes as its first input."""
    try:
        (want, *_), _ = jax.tree_util.tree_unflatten(exported.in_tree, exported.in_avals)
    except Exception:  # noqa: BLE001 - an artefact of another layout: nothing to compare against
        return
    if not isinstance(want, dict):
        return
    missing = sorted(set(want) - set(params))
    extra = sorted(set(params) - set(want))
    wrong = [k for k in sorted(set(want) & set(params)) if tuple(want[k].shape) != tuple(params[k].shape)]
    if missing or extra or wrong:
        what = (
            f"missing {missing[:3]}"
            if missing
            else f"unexpected {extra[:3]}"
            if extra
            else f"{wrong[0]!r} has shape {tuple(params[wrong[0]].shape)}, {tuple(want[wrong[0]].shape)} expected"
        )
        raise ValueError(f"{params_path} does not hold the params {os.path.basename(path)} takes: {what}{_REWRITE}")


def load_exported(directory: str | os.PathLike) -> ExportedCLIP:
    """Loads what ``save_exported`` / ``python -m convert SRC OUT --export`` wrote."""
    return ExportedCLIP(directory)


# --------------------------------------------------------------------------- writing
