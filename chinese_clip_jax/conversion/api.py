"""The names ``conversion.api`` held before it was split by job: loading (``load``), checking
(``check``) and writing (``write``). Kept so old imports keep working; new code imports from those."""

from .check import check_params, expected_shapes
from .load import HUB_FILES, Loaded, _is_cn_clip, from_pretrained, hf_to_flax, load_flax_params, load_params
from .write import (
    ASSETS,
    FLAX_META,
    FLAX_PARAMS_DIR,
    PROCESSOR_FILES,
    _unboxed,
    copy_processor_files,
    flax_to_hf,
    iter_hf_tensors,
    output_names,
    save_flax,
    save_pretrained,
    write_safetensors,
)

__all__ = [
    "ASSETS",
    "FLAX_META",
    "FLAX_PARAMS_DIR",
    "HUB_FILES",
    "PROCESSOR_FILES",
    "Loaded",
    "check_params",
    "copy_processor_files",
    "expected_shapes",
    "flax_to_hf",
    "from_pretrained",
    "hf_to_flax",
    "iter_hf_tensors",
    "load_flax_params",
    "load_params",
    "output_names",
    "save_flax",
    "save_pretrained",
    "write_safetensors",
    "_is_cn_clip",
    "_unboxed",
]
