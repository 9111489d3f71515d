"""CLIP ViT image tower: bias-free patch embedding, class embedding, learned positions,
pre-LN blocks with quick_gelu, LayerNorm on the class token."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from .config import ChineseCLIPVisionConfig
from .layers import MLP, Attention, ConfiguredModule, LayerStack, constrain, layer_norm, matmul_precision, partitioned
from .position import resize_position_embedding

Dtype = Any


@struct.dataclass
class VisionOutput:
    last_hidden_state: jax.Array  # (batch, 1 + patches, hidden), compute dtype
    pooler_output: jax.Array  # (batch, hidden): post-LN class token


class PatchEmbedding(nn.Module):
    """Conv(kernel=stride=patch, no bias) as one matmul over flattened patches.

    Params: ``kernel`` (patch, patch, channels, hidden), the HWIO layout of ``nn.Conv``.
    Input NCHW float; output (batch, patches, hidden).
    """

    config: ChineseCLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        cfg = self.config
        p, c = cfg.patch_size, cfg.num_channels
        kernel = self.param(
            "kernel",
            partitioned(nn.initializers.normal(cfg.initializer_range), (None, None, None, "embed")),
            (p, p, c, cfg.hidden_size),
            jnp.float32,
        )
        b, _, h, w = pixel_values.shape
        x = pixel_values.astype(self.dtype).reshape(b, c, h // p, p, w // p, p)
        # (b, gh, gw, p_row, p_col, c) matches the kernel's (p_row, p_col, c) order.
        x = x.transpose(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)
        return x @ kernel.reshape(p * p * c, cfg.hidden_size).astype(self.dtype)


class VisionLayer(nn.Module):
    """Pre-LN CLIP block: x += attn(LN(x)); x += mlp(LN(x))."""

    config: ChineseCLIPVisionConfig
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask):
        cfg = self.config
        # transformers' CLIP init (factor 1): scaled by width and depth.
        width_std = cfg.hidden_size**-0.5
        qkv_std = width_std * (2 * cfg.num_hidden_layers) ** -0.5
        x = x + Attention(
            cfg.num_attention_heads,
            cfg.head_dim,
            qkv_std=qkv_std,
            out_std=width_std,
            dtype=self.dtype,
            implementation=self.attention_impl,
            name="attention",
        )(layer_norm(cfg.layer_norm_eps, self.dtype, "layer_norm1")(x), mask)
        x = x + MLP(
            cfg.intermediate_size,
            cfg.hidden_act,
            (2 * cfg.hidden_size) ** -0.5,
            qkv_std,
            dtype=self.dtype,
            name="mlp",
        )(layer_norm(cfg.layer_norm_eps, self.dtype, "layer_norm2")(x))
        return constrain(x), None


class VisionTower(ConfiguredModule):
    """Patch embedding + encoder + post-LN class token; ``config``: ChineseCLIPVisionConfig.

    ``interpolate_pos_encoding``: images of another size (H and W multiples of the patch size)
    get the position grid resized bicubically, as transformers' option of that name.
    """

    @nn.compact
    def __call__(
        self, pixel_values, deterministic: bool = True, interpolate_pos_encoding: bool = False
    ) -> VisionOutput:
        cfg = self.config
        expected = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if interpolate_pos_encoding:
            ok = (
                pixel_values.ndim == 4
                and pixel_values.shape[1] == cfg.num_channels
                and all(s % cfg.patch_size == 0 for s in pixel_values.shape[2:])
            )
            if not ok:
                raise ValueError(
                    f"pixel_values must be NCHW with {cfg.num_channels} channels and H, W multiples of "
                    f"patch_size {cfg.patch_size}, got shape {tuple(pixel_values.shape)}"
                )
        elif pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must be NCHW (batch, {', '.join(map(str, expected))}), got shape "
                f"{tuple(pixel_values.shape)} (interpolate_pos_encoding=True takes other sizes)"
            )
        b, _, h, w = pixel_values.shape
        patches = PatchEmbedding(cfg, self.dtype, name="patch_embedding")(pixel_values)
        cls = self.param(
            "class_embedding",
            partitioned(nn.initializers.normal(cfg.hidden_size**-0.5), ("embed",)),
            (cfg.hidden_size,),
            jnp.float32,
        )
        pos = self.param(
            "position_embedding",
            partitioned(nn.initializers.normal(cfg.initializer_range), (None, "embed")),
            (cfg.num_patches + 1, cfg.hidden_size),
            jnp.float32,
        )
        if interpolate_pos_encoding:  # transformers: bicubic, align_corners=False
            pos = resize_position_embedding(pos, (h // cfg.patch_size, w // cfg.patch_size), align_corners=False)
        cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, cfg.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1) + pos.astype(self.dtype)
        x = constrain(layer_norm(cfg.layer_norm_eps, self.dtype, "pre_layernorm")(x))
        layer_kwargs = dict(
            config=cfg, dtype=self.dtype, attention_impl=self.attention_impl, deterministic=deterministic
        )
        x = LayerStack(
            VisionLayer,
            layer_kwargs,
            cfg.num_hidden_layers,
            scan=self.scan_layers,
            remat=self.remat,
            name="encoder",
        )(x, None)
        pooled = layer_norm(cfg.layer_norm_eps, self.dtype, "post_layernorm")(x[:, 0])
        return VisionOutput(last_hidden_state=x, pooler_output=pooled)


class ChineseCLIPVisionModel(ConfiguredModule):
    """The image tower as transformers' ``ChineseCLIPVisionModel``: params ``{"vision_model": ...}``."""

    @nn.compact
    def __call__(
        self, pixel_values, deterministic: bool = True, interpolate_pos_encoding: bool = False
    ) -> VisionOutput:
        with matmul_precision(self.precision):
            return VisionTower(
                self.config, self.dtype, self.attention_impl, self.scan_layers, self.remat, name="vision_model"
            )(pixel_values, deterministic, interpolate_pos_encoding)
