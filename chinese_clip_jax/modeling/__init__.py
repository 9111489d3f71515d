"""Flax Linen modules: the text tower, the image tower and the joint model."""

from .clip import ChineseCLIPModel, ChineseCLIPOutput, l2_normalize
from .text import ChineseCLIPTextModel, TextOutput
from .vision import ChineseCLIPVisionModel, VisionOutput

__all__ = [
    "ChineseCLIPModel",
    "ChineseCLIPOutput",
    "ChineseCLIPTextModel",
    "ChineseCLIPVisionModel",
    "TextOutput",
    "VisionOutput",
    "l2_normalize",
]
