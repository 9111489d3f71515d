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
    Dropout,
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
    """word + token type + position embeddings, LayerNorm, dropout.

    Params as transformers' (``word_embeddings`` / ``token_type_embeddings`` /
    ``position_embeddings``, each an ``embedding`` table). Written so that no gradient is a
    scatter into a small table: the word rows are gathered from the fp32 table and cast after
    (their gradient is accumulated in fp32), token types are a 0/1-weighted sum of the
    ``type_vocab_size`` broadcast rows (gradient: a reduction), and the default positions
    (``position_ids`` None: 0..seq-1) are a slice of the position table (gradient: a pad);
    explicit ``position_ids`` are gathered.
    """

    config: ChineseCLIPTextConfig
    dtype: Dtype = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids=None):
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)

        def table(name, num, axes):
            return nn.Embed(
                num, cfg.hidden_size, dtype=jnp.float32, embedding_init=partitioned(init, axes), name=name
            ).embedding

        words = table("word_embeddings", cfg.vocab_size, ("vocab", "embed"))
        types = table("token_type_embeddings", cfg.type_vocab_size, (None, "embed"))
        positions = table("position_embeddings", cfg.max_position_embeddings, (None, "embed"))
        x = jnp.take(words, input_ids, axis=0).astype(self.dtype)
        # token types: a sum of broadcast rows selected by 0/1 weights (type_vocab_size is 2): exact in
        # any precision, and the table's gradient is a reduction, not a scatter into one row
        one_hot = jax.nn.one_hot(token_type_ids, cfg.type_vocab_size, dtype=self.dtype)[..., None]
        types = types.astype(self.dtype)
        x = x + sum(one_hot[..., i, :] * types[i] for i in range(cfg.type_vocab_size))
        if position_ids is None:
            x = x + positions[: input_ids.shape[1]].astype(self.dtype)
        else:
            x = x + jnp.take(positions, position_ids, axis=0).astype(self.dtype)
        x = layer_norm(cfg.layer_norm_eps, self.dtype, "layer_norm")(x)
        return Dropout(cfg.hidden_dropout_prob)(x, self.deterministic)


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
        drop = Dropout(cfg.hidden_dropout_prob)
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
