"""Chinese-CLIP in JAX/Flax: models, checkpoint conversion, inference and sharded training."""

from .config import ChineseCLIPConfig, ChineseCLIPResNetConfig, ChineseCLIPTextConfig, ChineseCLIPVisionConfig
from .conversion import CheckpointError, from_pretrained, save_pretrained
from .inference import ChineseCLIP
from .modeling import (
    ChineseCLIPModel,
    ChineseCLIPOutput,
    ChineseCLIPTextModel,
    ChineseCLIPVisionModel,
)
from .processing import ChineseCLIPProcessor

__version__ = "0.1.0"

__all__ = [
    "ChineseCLIPConfig",
    "ChineseCLIPTextConfig",
    "ChineseCLIPVisionConfig",
    "ChineseCLIPResNetConfig",
    "ChineseCLIPModel",
    "ChineseCLIPOutput",
    "ChineseCLIPTextModel",
    "ChineseCLIPVisionModel",
    "CheckpointError",
    "from_pretrained",
    "save_pretrained",
    "ChineseCLIP",
    "ChineseCLIPProcessor",
]
