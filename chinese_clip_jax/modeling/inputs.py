"""Input contracts of the joint model's public methods, checked at their entry.

- pixel_values must be floating point, NCHW, already rescaled and normalized (what the processor
  returns). Integer pixels are refused with a one-line error: their normalization (mean, std,
  rescale factor) belongs to the checkpoint's preprocessor settings, not to the model, so the
  model cannot convert them. ``chinese_clip_jax.inference.encoding.model_pixels`` converts uint8 NHWC or
  NCHW images on the device.
- input_ids must be integers. Out-of-range ids (< 0 or >= vocab_size) are refused when their
  values are known (a concrete array, outside ``jax.jit``); inside a trace they are clamped into
  [0, vocab_size - 1], so a bad id gives a finite (if meaningless) embedding, never NaN (JAX's
  default out-of-bounds gather fills with NaN).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _concrete(x) -> np.ndarray | None:
    """x's values when they are known here (not a tracer), else None."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def check_pixels(pixel_values) -> jax.Array:
    """Refuses integer (or bool) pixels; returns the pixels as a jax array."""
    dtype = jnp.asarray(pixel_values).dtype if not hasattr(pixel_values, "dtype") else pixel_values.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        shape = tuple(np.shape(pixel_values))
        raise TypeError(
            f"pixel_values are {jnp.dtype(dtype).name} {shape}: the model takes float NCHW pixels, rescaled and "
            "normalized (the processor's output); convert uint8 images with "
            "chinese_clip_jax.inference.encoding.model_pixels"
        )
    return jnp.asarray(pixel_values)


def check_token_ids(input_ids, vocab_size: int) -> jax.Array:
    """Integer ids in [0, vocab_size): refused when out of range and concrete, clamped when traced."""
    ids = jnp.asarray(input_ids) if not hasattr(input_ids, "dtype") else input_ids
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"input_ids must be integer token ids, got dtype {jnp.dtype(ids.dtype).name}")
    values = _concrete(ids)
    if values is not None:
        if values.size and (values.min() < 0 or values.max() >= vocab_size):
            bad = values[(values < 0) | (values >= vocab_size)].ravel()[0]
            raise ValueError(
                f"input_ids holds token id {int(bad)}, outside the vocabulary [0, {vocab_size}): "
                "was the text tokenized with this checkpoint's vocab?"
            )
        return jnp.asarray(ids)
    return jnp.clip(ids, 0, vocab_size - 1)
