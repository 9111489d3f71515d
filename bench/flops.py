"""Model FLOPs of Chinese-CLIP from its config, the figure behind GFLOP/s and MFU in the benches.

Formula (multiply-add = 2 FLOPs; matmuls only, the usual "model FLOPs" convention):

* one transformer layer of width ``d``, MLP width ``f`` over ``n`` tokens::

      2 * n * (4 d^2 + 2 d f)      q/k/v/out and fc1/fc2 kernels: 2 x matmul params x tokens
    + 4 * n^2 * d                  attention: q k^T and probs @ v (all heads together)

* image tower: ``layers x layer(n = patches + 1)`` + patch embedding ``2 * patches * p^2 c * d``
  + visual projection ``2 * d * proj`` (one token);
* text tower: ``layers x layer(n = seq)`` + text projection ``2 * d * proj``; the embedding
  lookups are gathers (0 FLOPs) and padded tokens count (they are computed);
* a training step is 3x the forward (backward = 2x forward), no rematerialisation counted,
  plus nothing for the loss and the optimizer (they are O(params) or O(batch^2 * proj), < 0.1%).

LayerNorm, softmax, GELU and biases are left out (elementwise, well under 1%).
For base-patch16 at 224 px: 35.1 GFLOPs per image forward, 8.9 GFLOPs per 52-token text.
"""

from __future__ import annotations

__all__ = ["layer_flops", "image_forward_flops", "text_forward_flops", "train_step_flops", "matmul_flops"]


def layer_flops(hidden: int, intermediate: int, tokens: int) -> float:
    """Forward FLOPs of one transformer layer over one sequence of ``tokens`` tokens."""
    d, f, n = hidden, intermediate, tokens
    return 2.0 * n * (4 * d * d + 2 * d * f) + 4.0 * n * n * d


def image_forward_flops(cfg) -> float:
    """Forward FLOPs of ``get_image_features`` for ONE image of ``cfg`` (a ChineseCLIPConfig)."""
    v = cfg.vision_config
    patches = (v.image_size // v.patch_size) ** 2
    d = v.hidden_size
    embed = 2.0 * patches * (v.patch_size**2 * v.num_channels) * d
    return embed + v.num_hidden_layers * layer_flops(d, v.intermediate_size, patches + 1) + 2.0 * d * cfg.projection_dim


def text_forward_flops(cfg, seq_len: int) -> float:
    """Forward FLOPs of ``get_text_features`` for ONE text of ``seq_len`` tokens (padding included)."""
    t = cfg.text_config
    d = t.hidden_size
    return t.num_hidden_layers * layer_flops(d, t.intermediate_size, seq_len) + 2.0 * d * cfg.projection_dim


def train_step_flops(cfg, batch: int, seq_len: int) -> float:
    """FLOPs of one contrastive training step on ``batch`` image-text pairs: 3 x forward."""
    return 3.0 * batch * (image_forward_flops(cfg) + text_forward_flops(cfg, seq_len))


def matmul_flops(n: int) -> float:
    """FLOPs of one (n, n) @ (n, n) matmul."""
    return 2.0 * n**3
