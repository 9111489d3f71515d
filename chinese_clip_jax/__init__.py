"""Chinese-CLIP in JAX/Flax: models, checkpoint conversion, inference and sharded training.

Names are imported on first use (PEP 562 module ``__getattr__``), so ``import chinese_clip_jax``
is cheap and a light submodule (``chinese_clip_jax.export``, the serving loader) imports neither flax nor
the model code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .version import __version__ as __version__

_LAZY = {  # public name -> submodule that defines it
    "ChineseCLIPConfig": "modeling.config",
    "ChineseCLIPResNetConfig": "modeling.config",
    "ChineseCLIPTextConfig": "modeling.config",
    "ChineseCLIPVisionConfig": "modeling.config",
    "ChineseCLIPModel": "modeling",
    "ChineseCLIPOutput": "modeling",
    "ChineseCLIPTextModel": "modeling",
    "ChineseCLIPVisionModel": "modeling",
    "CheckpointError": "conversion",
    "from_pretrained": "conversion",
    "save_pretrained": "conversion",
    "ChineseCLIP": "inference",
    "ChineseCLIPProcessor": "processing",
}

__all__ = list(_LAZY)

if TYPE_CHECKING:  # static tools see the real imports
    from .conversion import CheckpointError, from_pretrained, save_pretrained
    from .inference import ChineseCLIP
    from .modeling import ChineseCLIPModel, ChineseCLIPOutput, ChineseCLIPTextModel, ChineseCLIPVisionModel
    from .modeling.config import (
        ChineseCLIPConfig,
        ChineseCLIPResNetConfig,
        ChineseCLIPTextConfig,
        ChineseCLIPVisionConfig,
    )
    from .processing import ChineseCLIPProcessor


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    try:  # a submodule, e.g. ccj.conversion
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
