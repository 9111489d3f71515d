"""Flax params -> an original cn_clip ``.pt`` checkpoint (the inverse of reading one).

``save_cn_clip(path, cfg, params)`` writes ``{"state_dict": {"module." + name: tensor}}`` as
cn_clip's training script saves it, which ``cn_clip.clip.utils.load_from_name`` /
``create_model`` and ``ccj.from_pretrained`` read back. ViT towers get their fused attention
``in_proj`` back; ResNet towers (RN50) get BatchNorm's ``num_batches_tracked`` counters (zero:
the counter is not kept, it does nothing at cn_clip's fixed momentum). Needs torch.
"""

from __future__ import annotations

import os
import re

import numpy as np

from ..io import atomic_output
from ..modeling.config import ChineseCLIPConfig
from . import mapping

_VIT_QKV = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")


def _hf_to_cn_clip_names() -> tuple[dict, dict]:
    global_map = {hf: (cn, tr) for cn, hf, tr in mapping.CN_CLIP_GLOBAL}
    layer_map = {hf: cn for cn, hf in mapping.CN_CLIP_VISION_LAYER}
    return global_map, layer_map


def to_cn_clip_state_dict(params: dict, cfg: ChineseCLIPConfig) -> dict[str, np.ndarray]:
    """Flax params (scanned or not) -> cn_clip-named fp32 numpy tensors (no ``module.`` prefix)."""
    from .check import check_params
    from .write import iter_hf_tensors

    flat = check_params(params, cfg)
    global_map, layer_map = _hf_to_cn_clip_names()
    out: dict[str, np.ndarray] = {}
    fused: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for hf, x in iter_hf_tensors(flat, cfg):
        if hf.startswith("text_model."):
            out["bert." + hf[len("text_model.") :]] = x
        elif hf.startswith("visual."):  # a ResNet tower: the table holds cn_clip's own names
            out[hf] = x
        elif hf in global_map:
            cn, transpose = global_map[hf]
            out[cn] = x.T if transpose else x
        elif m := _VIT_QKV.match(hf):
            i, part, kind = m.groups()
            fused.setdefault((i, kind), {})[part] = x
        elif m := re.match(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)$", hf):
            out[f"visual.transformer.resblocks.{m.group(1)}.{layer_map[m.group(2)]}"] = x
        else:  # the mapping table and this inverse disagree: a bug, say which name
            raise KeyError(f"no cn_clip name for {hf!r}")
    for (i, kind), parts in fused.items():
        out[f"visual.transformer.resblocks.{i}.attn.in_proj_{kind}"] = np.concatenate([parts[p] for p in "qkv"])
    return {k: np.array(v, np.float32, order="C") for k, v in out.items()}  # copies; 0-d stays 0-d


def save_cn_clip(path: str | os.PathLike, cfg: ChineseCLIPConfig, params: dict) -> str:
    """Writes ``path`` (a ``.pt`` file) in cn_clip's checkpoint layout; returns it. The file
    appears only once complete; an existing file is refused."""
    import torch

    path = os.fspath(path)
    if os.path.exists(path):
        raise FileExistsError(f"{path} already exists; choose a new file name")
    tensors = to_cn_clip_state_dict(params, cfg)  # validates before anything is written
    state = {"module." + k: torch.from_numpy(v) for k, v in tensors.items()}
    if cfg.is_resnet:
        for name in tensors:
            if name.endswith(".running_var"):
                state["module." + name[: -len("running_var")] + "num_batches_tracked"] = torch.tensor(0)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_output(path) as f:
        torch.save({"epoch": 0, "step": 0, "name": "chinese_clip_jax", "state_dict": state}, f)
    return path
