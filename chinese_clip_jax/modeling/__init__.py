"""The model: its configuration (``config``, json only) and the Flax Linen modules (the text tower,
the image towers and the joint model).

The modules are imported on first use (PEP 562), so ``chinese_clip_jax.modeling.config`` stays
importable without jax or flax.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_LAZY = {
    "ChineseCLIPModel": "clip",
    "ChineseCLIPOutput": "clip",
    "l2_normalize": "clip",
    "ChineseCLIPTextModel": "text",
    "TextOutput": "text",
    "ChineseCLIPVisionModel": "vision",
    "VisionOutput": "vision",
}

__all__ = list(_LAZY)

if TYPE_CHECKING:
    from .clip import ChineseCLIPModel, ChineseCLIPOutput, l2_normalize
    from .text import ChineseCLIPTextModel, TextOutput
    from .vision import ChineseCLIPVisionModel, VisionOutput


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
