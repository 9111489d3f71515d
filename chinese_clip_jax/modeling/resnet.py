"""cn_clip's ModifiedResNet image tower (RN50): a 3-conv stem with an average pool, bottleneck
stages whose strided blocks average-pool instead of striding (anti-aliasing), and attention
pooling (the mean token attends over the grid) projecting straight to ``projection_dim``.

BatchNorm always normalises with its stored statistics (``running_mean`` / ``running_var``),
for inference and for fine-tuning alike (as a frozen BatchNorm): they are params behind
``stop_gradient``, so their gradient is zero, and the optimizer labels them frozen
(``training.optim.NON_TRAINED``), so they hold no optimizer state and never change.

Param tree (cn_clip names in brackets)::

    vision_model/stem/{conv1, bn1, conv2, bn2, conv3, bn3}         [visual.conv1 ... visual.bn3]
    vision_model/layer{1..4}/block_{j}/{conv1, bn1, conv2, bn2, conv3, bn3,
                                        downsample_conv, downsample_bn}   [visual.layerI.J.*]
    vision_model/attnpool/{position_embedding, query, key, value, out}    [visual.attnpool.*]

Conv kernels are HWIO; images enter NCHW (as the processor gives them) and run NHWC.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import ChineseCLIPResNetConfig
from .layers import ConfiguredModule, Dense, head_major_attention, partitioned
from .vision import VisionOutput

Dtype = Any
EXPANSION = 4  # a bottleneck's output channels per plane


class FrozenBatchNorm(nn.Module):
    """``(x - running_mean) / sqrt(running_var + eps) * scale + bias`` over the channel (last) axis,
    in fp32; the statistics are params that never receive a gradient."""

    eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]

        def param(name, init):
            return self.param(name, partitioned(init, ("norm",)), (c,), jnp.float32)

        scale, bias = param("scale", nn.initializers.ones), param("bias", nn.initializers.zeros)
        mean = jax.lax.stop_gradient(param("running_mean", nn.initializers.zeros))
        var = jax.lax.stop_gradient(param("running_var", nn.initializers.ones))
        mul = scale * jax.lax.rsqrt(var + self.eps)
        return (x.astype(jnp.float32) * mul + (bias - mean * mul)).astype(self.dtype)


def conv(features: int, kernel: int, dtype: Dtype, name: str, stride: int = 1) -> nn.Conv:
    """Bias-free conv with padding kernel // 2 on each side (cn_clip's); HWIO kernel, replicated."""
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=kernel // 2,
        use_bias=False,
        dtype=dtype,
        kernel_init=partitioned(nn.initializers.he_normal(), (None, None, None, None)),
        name=name,
    )


def avg_pool(x, k: int):
    """torch ``AvgPool2d(k)``: window = stride = k, no padding, floor."""
    return nn.avg_pool(x, (k, k), strides=(k, k), padding="VALID") if k > 1 else x


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> avgpool(stride) -> 1x1 (x4 channels), residual; the shortcut is
    avgpool(stride) -> 1x1 conv -> BN when the shape changes."""

    planes: int
    stride: int = 1
    eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d, eps = self.dtype, self.eps
        out = nn.relu(FrozenBatchNorm(eps, d, name="bn1")(conv(self.planes, 1, d, "conv1")(x)))
        out = nn.relu(FrozenBatchNorm(eps, d, name="bn2")(conv(self.planes, 3, d, "conv2")(out)))
        out = avg_pool(out, self.stride)
        out = FrozenBatchNorm(eps, d, name="bn3")(conv(self.planes * EXPANSION, 1, d, "conv3")(out))
        identity = x
        if self.stride > 1 or x.shape[-1] != self.planes * EXPANSION:
            identity = conv(self.planes * EXPANSION, 1, d, "downsample_conv")(avg_pool(x, self.stride))
            identity = FrozenBatchNorm(eps, d, name="downsample_bn")(identity)
        return nn.relu(out + identity)


class AttentionPool(nn.Module):
    """Prepends the grid's mean, adds learned positions, and returns what the mean token gets
    from multi-head attention over all tokens, projected by ``out`` to ``output_dim``.

    (batch, h, w, c) -> (batch, output_dim).
    """

    num_heads: int
    output_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)
        pos = self.param(
            "position_embedding",
            partitioned(nn.initializers.normal(c**-0.5), (None, "embed")),
            (h * w + 1, c),
            jnp.float32,
        )
        x = x + pos.astype(x.dtype)
        head_dim, std = c // self.num_heads, c**-0.5

        def proj(name, t):
            return Dense((self.num_heads, head_dim), ("embed",), ("heads", "kv"), std=std, dtype=self.dtype, name=name)(
                t
            )

        y = head_major_attention(proj("query", x[:, :1]), proj("key", x), proj("value", x), None)
        return Dense(self.output_dim, ("heads", "kv"), (None,), std=std, dtype=self.dtype, name="out")(y)[:, 0]


class ResNetTower(ConfiguredModule):
    """cn_clip's ModifiedResNet; ``config``: ChineseCLIPResNetConfig. ``pooler_output`` is the
    attention pool's output, already ``projection_dim`` wide (there is no separate projection);
    ``last_hidden_state`` the last stage's feature map, (batch, grid*grid, hidden).
    ``scan_layers`` / ``remat`` / ``attention_impl`` concern transformer stacks and are not used."""

    @nn.compact
    def __call__(self, pixel_values, deterministic: bool = True) -> VisionOutput:
        cfg: ChineseCLIPResNetConfig = self.config
        expected = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must be NCHW (batch, {', '.join(map(str, expected))}), got shape "
                f"{tuple(pixel_values.shape)}"
            )
        d, eps, width = self.dtype, cfg.batch_norm_eps, cfg.width
        x = pixel_values.astype(d).transpose(0, 2, 3, 1)  # NHWC
        x = _Stem(width, eps, d, name="stem")(x)
        for i, blocks in enumerate(cfg.layers):
            x = _Stage(width * 2**i, blocks, 1 if i == 0 else 2, eps, d, name=f"layer{i + 1}")(x)
        pooled = AttentionPool(cfg.num_attention_heads, cfg.projection_dim, d, name="attnpool")(x)
        b, h, w, c = x.shape
        return VisionOutput(last_hidden_state=x.reshape(b, h * w, c), pooler_output=pooled)


class _Stem(nn.Module):
    width: int
    eps: float
    dtype: Dtype

    @nn.compact
    def __call__(self, x):
        d, half = self.dtype, self.width // 2
        x = nn.relu(FrozenBatchNorm(self.eps, d, name="bn1")(conv(half, 3, d, "conv1", stride=2)(x)))
        x = nn.relu(FrozenBatchNorm(self.eps, d, name="bn2")(conv(half, 3, d, "conv2")(x)))
        x = nn.relu(FrozenBatchNorm(self.eps, d, name="bn3")(conv(self.width, 3, d, "conv3")(x)))
        return avg_pool(x, 2)


class _Stage(nn.Module):
    planes: int
    blocks: int
    stride: int
    eps: float
    dtype: Dtype

    @nn.compact
    def __call__(self, x):
        for j in range(self.blocks):
            x = Bottleneck(self.planes, self.stride if j == 0 else 1, self.eps, self.dtype, name=f"block_{j}")(x)
        return x
