"""Text and image preprocessing: the processor (tokenizer + images, as transformers'
ChineseCLIPProcessor), the numpy/PIL image path, image settings and prompt templates.

The image path (``ImagePreprocessor``, ``normalize_pixels``, ``ImageSettings``) needs numpy and
PIL only: it is what grain / tf.data workers import.
"""

from .image import (
    EVAL_TRANSFORMS,
    MAX_RESIZED_PIXELS,
    ImageInput,
    ImageLoadError,
    ImagePreprocessor,
    apply_normalize_table,
    default_normalize_table,
    eval_transform,
    normalize_pixels,
    to_rgb,
)
from .image_settings import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageSettings, read_image_settings
from .processor import ASSETS_DIR, DEFAULT_CONTEXT_LENGTH, ChineseCLIPProcessor
from .templates import CHINESE_TEMPLATES, fill

__all__ = [
    "EVAL_TRANSFORMS",
    "eval_transform",
    "ASSETS_DIR",
    "CHINESE_TEMPLATES",
    "DEFAULT_CONTEXT_LENGTH",
    "MAX_RESIZED_PIXELS",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ChineseCLIPProcessor",
    "ImageInput",
    "ImageLoadError",
    "ImagePreprocessor",
    "ImageSettings",
    "apply_normalize_table",
    "default_normalize_table",
    "fill",
    "normalize_pixels",
    "read_image_settings",
    "to_rgb",
]
