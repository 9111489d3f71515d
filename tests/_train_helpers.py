"""Tiny models, optimizer settings and batches shared by the tests and their subprocess scripts.

The single home of these builders: test modules import it directly (pytest puts ``tests/`` on
``sys.path``), and so do the scripts run as ``python tests/_x.py`` (their own directory is
``sys.path[0]``). Shared fixtures are in ``conftest.py``.
"""

from __future__ import annotations

import functools
import math

import ml_collections
import numpy as np

import chinese_clip_jax as ccj


def tiny_config(
    *,
    vocab_size: int = 64,
    hidden: int = 16,
    layers: int = 2,
    heads: int = 4,
    max_positions: int = 16,
    dropout: float = 0.0,
    attention_dropout: float = 0.0,
    vision_hidden: int | None = None,
    vision_layers: int | None = None,
    image_size: int = 8,
    patch_size: int = 4,
    projection_dim: int = 8,
    resnet: tuple[int, ...] | None = None,
) -> ccj.ChineseCLIPConfig:
    """A tiny ChineseCLIPConfig; every tower's MLP is twice its width.

    ``hidden``/``layers``/``heads`` size both towers unless ``vision_hidden``/``vision_layers`` say
    otherwise; ``dropout``/``attention_dropout`` are the text tower's. ``resnet`` (stage depths)
    makes the vision tower a width-4 ResNet instead of a ViT (``patch_size`` and the vision
    sizes then do not apply). ``vocab_size=21128`` is the bundled tokenizer's.
    """
    text = ccj.ChineseCLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_positions,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=attention_dropout,
    )
    if resnet is not None:
        vision = ccj.ChineseCLIPResNetConfig(
            layers=tuple(resnet),
            width=4,
            num_attention_heads=heads,
            image_size=image_size,
            projection_dim=projection_dim,
        )
    else:
        v_hidden = hidden if vision_hidden is None else vision_hidden
        vision = ccj.ChineseCLIPVisionConfig(
            hidden_size=v_hidden,
            intermediate_size=2 * v_hidden,
            num_hidden_layers=layers if vision_layers is None else vision_layers,
            num_attention_heads=heads,
            image_size=image_size,
            patch_size=patch_size,
            projection_dim=projection_dim,
        )
    return ccj.ChineseCLIPConfig.from_text_vision_configs(text, vision, projection_dim=projection_dim)


def random_params(cfg: ccj.ChineseCLIPConfig, seed: int = 0):
    """Random params of the model's shapes, drawn with numpy (no XLA compile); BatchNorm variances > 0."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    r = cfg.vision_config.image_size
    shapes = nn.unbox(
        jax.eval_shape(
            ccj.ChineseCLIPModel(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 3, r, r))
        )["params"]
    )
    rng = np.random.default_rng(seed)

    def draw(path, s):
        x = 0.1 * rng.standard_normal(s.shape).astype(np.float32)
        return np.abs(x) + 0.5 if jax.tree_util.keystr(path).endswith("['running_var']") else x

    return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.cache
def data_mesh():
    """A mesh with every device on the data axis (the tests' single-host layout), made once."""
    from chinese_clip_jax import sharding as shd

    return shd.make_mesh(-1, 1, 1)


def mesh_for(shape):
    """A (data, fsdp, tensor) mesh of ``shape`` on the first prod(shape) devices."""
    import jax

    from chinese_clip_jax import sharding as shd

    return shd.make_mesh(*shape, devices=jax.devices()[: int(np.prod(shape))])


def opt_config(**kw) -> ml_collections.ConfigDict:
    d = dict(lr=1e-2, warmup_steps=1, weight_decay=0.1, b1=0.9, b2=0.98, eps=1e-6, grad_clip=0.0, end_lr_factor=0.0)
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


# Sizes shared by several test files.
# The conversion tests' ViT: 2 text layers, 3 vision layers (95 conversion rows), the bundled vocabulary.
CONVERSION_SIZES = dict(
    vocab_size=21128,
    hidden=32,
    vision_hidden=48,
    vision_layers=3,
    max_positions=64,
    image_size=32,
    patch_size=8,
    projection_dim=16,
)
# A tiny RN50-style model (stage depths 1, 2, 1, 1) with dropout in the text tower.
RESNET_SIZES = dict(vocab_size=21128, layers=1, dropout=0.1, attention_dropout=0.1, image_size=32, resnet=(1, 2, 1, 1))
# A one-layer ViT at 32 px with the bundled vocabulary (the ``small_hf_dir`` fixture's model).
SMALL_SIZES = dict(
    vocab_size=21128, hidden=32, layers=1, max_positions=64, image_size=32, patch_size=8, projection_dim=16
)


# -- multi-positive losses: a float64 NumPy reference and a batch with repeated captions ---------------

KINDS = {"softmax": (math.log(20.0), None), "sigmoid": (math.log(10.0), -3.0)}  # (logit_scale, logit_bias)


def reference_loss(kind, t, v, logit_scale, logit_bias, groups) -> float:
    """float64 NumPy, from the definition: cross-entropy against a target row (text->image) and
    column (image->text) uniform over the pair's group; SigLIP with +1 labels on the group."""
    t, v = np.asarray(t, np.float64), np.asarray(v, np.float64)
    logits = math.exp(logit_scale) * t @ v.T
    same = np.equal.outer(groups, groups).astype(np.float64)
    if kind == "softmax":
        total = 0.0
        for scores in (logits, logits.T):  # text->image rows, then image->text rows
            log_p = scores - scores.max(1, keepdims=True)
            log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
            target = same / same.sum(1, keepdims=True)
            total += -np.sum(target * log_p) / len(t)
        return total / 2
    labels = 2 * same - 1
    return float(np.sum(np.logaddexp(0.0, -labels * (logits + logit_bias))) / len(t))


def with_repeated_captions(batch):
    """A fake batch in which rows 1, 6, 11 carry row 0's caption and rows 3, 9 row 2's."""
    batch = {k: np.array(x) for k, x in batch.items()}
    for dst, src in ((1, 0), (6, 0), (11, 0), (3, 2), (9, 2)):
        batch["input_ids"][dst], batch["attention_mask"][dst] = batch["input_ids"][src], batch["attention_mask"][src]
    batch["label"] = np.array([0, 1, 2, 2, 1, 0, 3, 3, 0, 4, 5, 0, 6, 1, 7, 8], np.int32)
    return batch
