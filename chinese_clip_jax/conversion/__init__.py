"""PyTorch <-> Flax checkpoint conversion (HF layout and original cn_clip .pt files)."""

from .cn_clip_pt import save_cn_clip, to_cn_clip_state_dict
from .load import from_pretrained, hf_to_flax, load_flax_params, load_params
from .mapping import parse_cn_clip_arch, stack_layers, unstack_layers
from .sources import CheckpointError, open_tensors
from .write import flax_to_hf, output_names, save_flax, save_pretrained

__all__ = [
    "CheckpointError",
    "flax_to_hf",
    "from_pretrained",
    "hf_to_flax",
    "load_flax_params",
    "load_params",
    "open_tensors",
    "output_names",
    "parse_cn_clip_arch",
    "save_cn_clip",
    "save_flax",
    "save_pretrained",
    "stack_layers",
    "to_cn_clip_state_dict",
    "unstack_layers",
]
