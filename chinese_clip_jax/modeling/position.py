"""Position embeddings at another resolution: PyTorch's bicubic interpolation, exactly.

``torch.nn.functional.interpolate(mode="bicubic")`` uses the cubic convolution kernel with
a = -0.75, clamps taps at the border, and maps output pixel ``i`` to source coordinate
``(i + 0.5) * in / out - 0.5`` (``align_corners=False``, transformers' ``interpolate_pos_encoding``)
or ``i * (in - 1) / (out - 1)`` (``align_corners=True``, cn_clip's ``resize_pos_embed``).
``jax.image.resize``'s cubic uses a = -0.5 and antialiasing, so it is not used here. The
interpolation is separable: one (out, in) weight matrix per axis, built with numpy at trace time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

CUBIC_A = -0.75  # PyTorch's cubic convolution coefficient


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """(n,) fractional offsets -> (n, 4) weights of taps floor-1 .. floor+2, as PyTorch."""
    a = np.float32(CUBIC_A)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    one = np.float32(1)
    return np.stack([far(t + one), near(t), near(one - t), far(2 * one - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int, align_corners: bool) -> np.ndarray:
    """(out_size, in_size) float32 matrix M with ``M @ x`` = PyTorch's 1-D bicubic resize of x."""
    i = np.arange(out_size, dtype=np.float32)
    if align_corners:
        scale = np.float32((in_size - 1) / (out_size - 1)) if out_size > 1 else np.float32(0)
        src = scale * i
    else:
        scale = np.float32(in_size / out_size)
        src = scale * (i + np.float32(0.5)) - np.float32(0.5)  # not clamped at 0 for cubic
    base = np.minimum(np.floor(src), in_size - 1).astype(np.int64)
    t = np.clip(src - base, 0, 1).astype(np.float32)
    weights = _cubic_weights(t)
    m = np.zeros((out_size, in_size), np.float32)
    for k in range(4):
        np.add.at(m, (np.arange(out_size), np.clip(base - 1 + k, 0, in_size - 1)), weights[:, k])
    return m


def resize_grid(x: jax.Array, out_hw: tuple[int, int], align_corners: bool) -> jax.Array:
    """(h, w, c) -> (out_h, out_w, c), bicubic as PyTorch (fp32, highest matmul precision)."""
    h, w, _ = x.shape
    my = jnp.asarray(bicubic_matrix(h, out_hw[0], align_corners))
    mx = jnp.asarray(bicubic_matrix(w, out_hw[1], align_corners))
    hi = jax.lax.Precision.HIGHEST
    y = jnp.einsum("oh,hwc->owc", my, x.astype(jnp.float32), precision=hi)
    return jnp.einsum("pw,owc->opc", mx, y, precision=hi)


def resize_position_embedding(pos: jax.Array, out_grid: tuple[int, int], align_corners: bool) -> jax.Array:
    """(1 + g*g, c) ViT position embeddings (class token first) -> (1 + out_h*out_w, c).

    The class token's row is kept; the square grid is resized bicubically. An unchanged size
    returns ``pos`` itself.
    """
    n, c = pos.shape
    g = int(round((n - 1) ** 0.5))
    if g * g != n - 1:
        raise ValueError(f"position embeddings of {n} rows are not 1 + a square grid")
    if (g, g) == tuple(out_grid):
        return pos
    grid = resize_grid(pos[1:].reshape(g, g, c), out_grid, align_corners).reshape(-1, c)
    return jnp.concatenate([pos[:1].astype(jnp.float32), grid], axis=0)


def at_resolution(params: dict, cfg, image_size: int):
    """``(params, cfg)`` of a ViT model moved to ``image_size``: the position grid resized once,
    bicubic with ``align_corners=True`` as cn_clip's ``resize_pos_embed`` (for training or
    inference at that size). The same size returns them unchanged; a ResNet tower raises."""
    v = cfg.vision_config
    if image_size == v.image_size:
        return params, cfg
    if cfg.is_resnet:
        raise ValueError(
            f"image_size={image_size}: only ViT image towers can change resolution "
            f"(this ResNet takes {v.image_size} px)"
        )
    new_v = v.replace(image_size=int(image_size))  # validates: a multiple of patch_size
    g = new_v.image_size // new_v.patch_size
    vision = dict(params["vision_model"])
    vision["position_embedding"] = resize_position_embedding(vision["position_embedding"], (g, g), align_corners=True)
    return {**params, "vision_model": vision}, cfg.replace(vision_config=new_v)
