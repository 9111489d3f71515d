"""The model card (``README.md``) that ``ccj-convert --to hf`` writes beside the weights.

It says where the weights came from (the source checkpoint and the conversion command), the
architecture (from config.json), the parity measured at conversion (transformers' PyTorch
model loaded from the written directory against this package's Flax model on the same inputs:
the largest absolute difference of the text and image features), and the licence of the
source where the source says it (its own README's ``license:`` field), else what is known.
An existing README.md in OUT is the user's: it is never overwritten.
"""

from __future__ import annotations

import os
import re

import numpy as np

from ..io import atomic_write

__all__ = ["measure_parity", "model_card", "write_model_card", "CARD_NAME"]

CARD_NAME = "README.md"
_LICENSE = re.compile(r"^license:\s*(\S+)\s*$", re.MULTILINE)


def measure_parity(hf_dir: str, cfg, params, *, seed: int = 0) -> dict | str:
    """{"text_max_abs_diff", "image_max_abs_diff", "torch", "inputs"} comparing the written HF
    directory (loaded with transformers, fp32, eval mode) with ``params`` in this package's model,
    or a one-line reason it was not measured (no torch)."""
    try:
        import torch
        import transformers
    except ImportError:
        return "not measured: PyTorch is not installed (pip install 'chinese-clip-jax[torch]')"
    import jax.numpy as jnp

    from ..modeling import ChineseCLIPModel

    rng = np.random.default_rng(seed)
    tc, vc = cfg.text_config, cfg.vision_config
    length = min(16, tc.max_position_embeddings)
    ids = rng.integers(min(1000, tc.vocab_size // 2), tc.vocab_size, (2, length)).astype(np.int64)
    ids[:, 0] = 101  # [CLS]
    mask = np.ones_like(ids)
    mask[1, length // 2 :] = 0  # one padded row
    ids[1, length // 2 :] = 0
    pixels = rng.standard_normal((2, 3, vc.image_size, vc.image_size)).astype(np.float32)
    hf = transformers.ChineseCLIPModel.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref_text = hf.get_text_features(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.zeros_like(torch.tensor(ids)),
        )
        ref_image = hf.get_image_features(pixel_values=torch.tensor(pixels))
    ref_text = getattr(ref_text, "pooler_output", ref_text).numpy()
    ref_image = getattr(ref_image, "pooler_output", ref_image).numpy()
    model = ChineseCLIPModel(cfg, dtype=jnp.float32)
    text = model.apply(
        {"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), method="get_text_features"
    )
    image = model.apply({"params": params}, jnp.asarray(pixels), method="get_image_features")
    return {
        "text_max_abs_diff": float(np.max(np.abs(np.asarray(text) - ref_text))),
        "image_max_abs_diff": float(np.max(np.abs(np.asarray(image) - ref_image))),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "inputs": f"2 texts of {length} tokens (one half padded), 2 random {vc.image_size}x{vc.image_size} images",
    }


def _source_license(source_dir: str | None) -> str | None:
    if not source_dir:
        return None
    path = os.path.join(source_dir, CARD_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        m = _LICENSE.search(f.read(4096))
    return m.group(1) if m else None


def model_card(cfg, *, src: str, kind: str, command: str, parity: dict | str, dtype: str, source_dir=None) -> str:
    """The card's text (YAML front matter + Markdown)."""
    from ..version import __version__

    license_id = _source_license(source_dir)
    if license_id:
        licence = f"`{license_id}`, as the source checkpoint's own card states."
    else:
        license_id = "other"
        licence = (
            "not stated beside the source checkpoint. The official Chinese-CLIP release "
            "(github.com/OFA-Sys/Chinese-CLIP) is published under the MIT licence; check the terms of the "
            "checkpoint you converted before redistributing it."
        )
    if cfg.is_resnet:
        arch = f"ResNet image tower, {cfg.text_config.num_hidden_layers}-layer text tower"
    else:
        v, t = cfg.vision_config, cfg.text_config
        arch = (
            f"ViT image tower ({v.num_hidden_layers} layers, width {v.hidden_size}, patch {v.patch_size}, "
            f"{v.image_size} px), RoBERTa-wwm text tower ({t.num_hidden_layers} layers, width {t.hidden_size}, "
            f"vocab {t.vocab_size}), projection {cfg.projection_dim}"
        )
    if isinstance(parity, dict):
        parity_text = (
            f"measured at conversion: transformers' PyTorch `ChineseCLIPModel` (torch {parity['torch']}, "
            f"transformers {parity['transformers']}) loaded from this directory, against chinese-clip-jax's Flax "
            f"model on the same inputs ({parity['inputs']}), fp32 on CPU. Largest absolute difference: text "
            f"features {parity['text_max_abs_diff']:.2e}, image features {parity['image_max_abs_diff']:.2e}."
        )
    else:
        parity_text = parity
    return f"""---
license: {license_id}
library_name: transformers
tags:
- chinese-clip
- zero-shot-image-classification
- chinese-clip-jax
---

# Chinese-CLIP ({kind} checkpoint, converted)

Chinese-CLIP (Yang et al., arXiv 2211.01335): a contrastive image-text model for Chinese.
These weights load with `transformers.ChineseCLIPModel.from_pretrained` and with
`chinese_clip_jax.from_pretrained` (JAX/Flax).

- **Source checkpoint:** `{src}` ({kind})
- **Converted with:** chinese-clip-jax {__version__}: `{command}`
- **Stored dtype:** {dtype}
- **Architecture:** {arch}
- **Parity:** {parity_text}
- **Licence:** {licence}
"""


def write_model_card(out: str, text: str) -> bool:
    """Writes ``out/README.md`` unless one exists (the user's: kept); returns whether it wrote."""
    path = os.path.join(out, CARD_NAME)
    if os.path.lexists(path):
        return False
    atomic_write(path, text)
    return True
