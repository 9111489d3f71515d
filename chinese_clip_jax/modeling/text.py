"""RoBERTa-wwm text tower (BERT architecture): word + position + token-type embeddings,
post-LN encoder with erf GELU, LayerNorm eps from the config (1e-12)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from .config import ChineseCLIPTextConfig
from .layers import (
    MLP,
    Attention,
    ConfiguredModule,
    Dense,
    LayerStack,
    constrain,
    layer_norm,
    matmul_precision,
    partitioned,
)

Dtype = Any


@struct.dataclass
class TextOutput:
    last_hidden_state: jax.Array  # (batch, seq, hidden), compute dtype
    pooler_output: jax.Array | None = None  # (batch, hidden): tanh(dense(CLS)), text model only


class TextEmbeddings(nn.Module):
    config: ChineseCLIPTextConfig
    dtype: Dtype = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids):
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)

        def embed(name, num, axes):
            return nn.Embed(num, cfg.hidden_size, dtype=self.dtype, embedding_init=partitioned(init, axes), name=name)

        x = embed("word_embeddings", cfg.vocab_size, ("vocab", "embed"))(input_ids)
        x = x + embed("token_type_embeddings", cfg.type_vocab_size, (None, "embed"))(token_type_ids)
        x = x + embed("position_embeddings", cfg.max_position_embeddings, (None, "embed"))(position_ids)
        x = layer_norm(cfg.layer_norm_eps, self.dtype, "layer_norm")(x)
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=self.deterministic)


class TextLayer(nn.Module):
    """Post-LN BERT layer: x = LN(x + attn(x)); x = LN(x + mlp(x)).

    Attention-probability dropout is not applied (it would rule out fused attention kernels);
    hidden dropout is.
    """

    config: ChineseCLIPTextConfig
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask):
        cfg = self.config
        std = cfg.initializer_range
        drop = nn.Dropout(cfg.hidden_dropout_prob)
        h = Attention(
            cfg.num_attention_heads,
            cfg.head_dim,
            qkv_std=std,
            out_std=std,
            dtype=self.dtype,
            implementation=self.attention_impl,
            name="attention",
        )(x, mask)
        x = layer_norm(cfg.layer_norm_eps, self.dtype, "attention_norm")(x + drop(h, self.deterministic))
        h = MLP(cfg.intermediate_size, cfg.hidden_act, std, std, dtype=self.dtype, name="mlp")(x)
        x = layer_norm(cfg.layer_norm_eps, self.dtype, "mlp_norm")(x + drop(h, self.deterministic))
        return constrain(x), None


def key_padding_mask(attention_mask: jax.Array) -> jax.Array:
    """(batch, seq) 0/1 -> bool (batch, 1, 1, seq) for dot_product_attention."""
    return attention_mask.astype(bool)[:, None, None, :]


class TextTower(ConfiguredModule):
    """Embeddings + encoder; returns the last hidden state (no pooler). ``config``: ChineseCLIPTextConfig."""

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, deterministic: bool = True
    ):
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {input_ids.shape}")
        seq_len = input_ids.shape[1]
        if seq_len > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {seq_len} exceeds max_position_embeddings {cfg.max_position_embeddings}")
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if position_ids is None:
            position_ids = jnp.arange(seq_len)[None, :]
        x = TextEmbeddings(cfg, self.dtype, deterministic, name="embeddings")(input_ids, token_type_ids, position_ids)
        x = constrain(x)
        layer_kwargs = dict(
            config=cfg, dtype=self.dtype, attention_impl=self.attention_impl, deterministic=deterministic
        )
        return LayerStack(
            TextLayer,
            layer_kwargs,
            cfg.num_hidden_layers,
            scan=self.scan_layers,
            remat=self.remat,
            name="encoder",
        )(x, key_padding_mask(attention_mask))


class ChineseCLIPTextModel(ConfiguredModule):
    """The text tower with its BERT pooler, as transformers' ``ChineseCLIPTextModel``.

    Params: ``{"text_model": ..., "pooler": {"kernel", "bias"}}``.
    """

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, deterministic: bool = True
    ) -> TextOutput:
        with matmul_precision(self.precision):
            hidden = TextTower(
                self.config, self.dtype, self.attention_impl, self.scan_layers, self.remat, name="text_model"
            )(input_ids, attention_mask, token_type_ids, position_ids, deterministic)
            pooled = Dense(
                self.config.hidden_size,
                ("embed",),
                (None,),
                std=self.config.initializer_range,
                dtype=self.dtype,
                name="pooler",
            )(hidden[:, 0])
        return TextOutput(last_hidden_state=hidden, pooler_output=jnp.tanh(pooled))
