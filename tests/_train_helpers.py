"""Tiny model / optimizer / batches shared by the training tests (and their subprocess scripts)."""

from __future__ import annotations

import numpy as np
import ml_collections

import chinese_clip_jax as ccj


def tiny_config(vocab_size: int = 64, dropout: float = 0.0, layers: int = 2) -> ccj.ChineseCLIPConfig:
    text = ccj.ChineseCLIPTextConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=16, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=0.0,
    )
    vision = ccj.ChineseCLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=4,
        image_size=8, patch_size=4, projection_dim=8,
    )
    return ccj.ChineseCLIPConfig.from_text_vision_configs(text, vision, projection_dim=8)


def opt_config(**kw) -> ml_collections.ConfigDict:
    d = dict(lr=1e-2, warmup_steps=1, weight_decay=0.1, b1=0.9, b2=0.98, eps=1e-6, grad_clip=0.0,
             end_lr_factor=0.0)
    d.update(kw)
    return ml_collections.ConfigDict(d)


def fake_batches(n: int, batch: int, seed: int = 0, seq: int = 8, image: int = 8, vocab: int = 64):
    """Deterministic random host batches in the data iterator's format."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        lengths = rng.integers(2, seq + 1, size=batch)
        mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
        ids = rng.integers(1, vocab, size=(batch, seq)).astype(np.int32) * mask
        pix = rng.standard_normal((batch, 3, image, image)).astype(np.float32)
        out.append({"input_ids": ids, "attention_mask": mask, "pixel_values": pix})
    return out


# Attention key biases have an identically zero gradient (softmax is invariant to adding the same
# q.b_k to every key's score), so their computed gradients are rounding noise (~1e-11) whose
# value depends on reduction order; Adam turns that noise into tiny (~1e-5) but order-dependent
# updates. Comparisons check them with an absolute tolerance instead of a relative one.
ZERO_GRAD_LEAF = "['attention']['key']['bias']"


def max_rel_err(a, b) -> tuple[float, float]:
    """(max relative L2 error over leaves except key biases, max abs error of key biases)."""
    import jax

    rel, key_abs = 0.0, 0.0
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if ZERO_GRAD_LEAF in jax.tree_util.keystr(path):
            key_abs = max(key_abs, float(np.max(np.abs(x - y))))
        else:
            rel = max(rel, float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30)))
    return rel, key_abs
