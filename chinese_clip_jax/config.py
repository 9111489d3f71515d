"""Chinese-CLIP configuration: frozen dataclasses in the schema of HF ``config.json``.

``ChineseCLIPConfig.to_dict()`` writes the keys transformers' ``ChineseCLIPConfig`` reads, and
``from_dict`` keeps any key it does not know in ``extra`` so a round trip loses nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, ClassVar, Mapping

__all__ = [
    "ChineseCLIPTextConfig",
    "ChineseCLIPVisionConfig",
    "ChineseCLIPConfig",
    "PRESETS",
]


class _ConfigBase:
    """from_dict/to_dict shared by the three configs; unknown keys are kept in ``extra``."""

    model_type: ClassVar[str]
    _nested: ClassVar[dict[str, type]] = {}

    @classmethod
    def _field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        if not isinstance(d, Mapping):
            raise TypeError(f"{cls.__name__}.from_dict expects a mapping, got {type(d).__name__}")
        known, extra = {}, {}
        for key, value in d.items():
            if key in cls._nested:
                known[key] = cls._nested[key].from_dict(value or {})
            elif key in cls._field_names():
                known[key] = value
            elif key != "model_type":
                extra[key] = value
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.extra)
        for name in self._field_names():
            value = getattr(self, name)
            d[name] = value.to_dict() if isinstance(value, _ConfigBase) else value
        d["model_type"] = self.model_type
        return d

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def _check_heads(kind: str, hidden_size: int, num_heads: int) -> None:
    if hidden_size % num_heads:
        raise ValueError(
            f"{kind}: hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads}"
        )


@dataclasses.dataclass(frozen=True)
class ChineseCLIPTextConfig(_ConfigBase):
    """RoBERTa-wwm (BERT architecture) text tower."""

    model_type: ClassVar[str] = "chinese_clip_text_model"
    vocab_size: int = 21128
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    pad_token_id: int = 0
    extra: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        _check_heads("text_config", self.hidden_size, self.num_attention_heads)
        if self.hidden_act not in ("gelu", "gelu_new", "quick_gelu", "relu"):
            raise ValueError(f"text_config: unsupported hidden_act {self.hidden_act!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class ChineseCLIPVisionConfig(_ConfigBase):
    """CLIP ViT image tower."""

    model_type: ClassVar[str] = "chinese_clip_vision_model"
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    projection_dim: int = 512
    extra: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        _check_heads("vision_config", self.hidden_size, self.num_attention_heads)
        for name in ("image_size", "patch_size"):
            if not isinstance(getattr(self, name), int):
                raise ValueError(f"vision_config: {name} must be one int (square), got {getattr(self, name)!r}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"vision_config: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.hidden_act not in ("quick_gelu", "gelu", "gelu_new", "relu"):
            raise ValueError(f"vision_config: unsupported hidden_act {self.hidden_act!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class ChineseCLIPConfig(_ConfigBase):
    """The joint model: both towers, the projection width and the initial logit scale."""

    model_type: ClassVar[str] = "chinese_clip"
    _nested: ClassVar[dict[str, type]] = {
        "text_config": ChineseCLIPTextConfig,
        "vision_config": ChineseCLIPVisionConfig,
    }
    text_config: ChineseCLIPTextConfig = dataclasses.field(default_factory=ChineseCLIPTextConfig)
    vision_config: ChineseCLIPVisionConfig = dataclasses.field(default_factory=ChineseCLIPVisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    extra: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_text_vision_configs(
        cls,
        text_config: ChineseCLIPTextConfig,
        vision_config: ChineseCLIPVisionConfig,
        projection_dim: int = 512,
        **kwargs,
    ) -> "ChineseCLIPConfig":
        return cls(
            text_config=text_config,
            vision_config=vision_config,
            projection_dim=projection_dim,
            **kwargs,
        )

    @classmethod
    def preset(cls, name: str) -> "ChineseCLIPConfig":
        """One of the four published architectures (``OFA-Sys/`` prefix optional)."""
        key = name.split("/")[-1]
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return PRESETS[key]

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "ChineseCLIPConfig":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if d.get("model_type", "chinese_clip") != "chinese_clip":
            raise ValueError(f"{path} describes model_type {d['model_type']!r}, not 'chinese_clip'")
        return cls.from_dict(d)

    @classmethod
    def from_pretrained(cls, src: str | os.PathLike) -> "ChineseCLIPConfig":
        """Reads ``config.json`` from a directory, a file path or a hub id (when online)."""
        src = os.fspath(src)
        if os.path.isdir(src):
            return cls.from_json_file(os.path.join(src, "config.json"))
        if os.path.isfile(src):
            return cls.from_json_file(src)
        if src.count("/") == 1 and not src.startswith((".", "/")):
            return cls.from_json_file(hub_download(src, "config.json"))
        raise FileNotFoundError(f"no such file or directory: {src}")

    def save(self, directory: str | os.PathLike) -> str:
        """Writes ``config.json`` into ``directory``; returns its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "config.json")
        d = self.to_dict()
        d.setdefault("architectures", ["ChineseCLIPModel"])
        with open(path, "w", encoding="utf-8") as f:
            json.dump(d, f, indent=2, ensure_ascii=False)
        return path


def hub_download(repo_id: str, filename: str) -> str:
    """Fetches one file of a hub repo (cached); a clear OSError when offline or missing."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, filename)
    except Exception as e:  # offline, no such repo or file: say which and why
        raise OSError(
            f"could not fetch {filename!r} of hub id {repo_id!r} ({type(e).__name__}: {e}). "
            "Offline? Pass a local directory, or ChineseCLIPConfig.preset(name) for the architecture."
        ) from None


def _text(**kw) -> ChineseCLIPTextConfig:
    return ChineseCLIPTextConfig(vocab_size=21128, **kw)


_ROBERTA_BASE = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
_ROBERTA_LARGE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
_VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14)

PRESETS: dict[str, ChineseCLIPConfig] = {
    "chinese-clip-vit-base-patch16": ChineseCLIPConfig(
        text_config=_text(**_ROBERTA_BASE),
        vision_config=ChineseCLIPVisionConfig(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            patch_size=16, image_size=224, projection_dim=512,
        ),
        projection_dim=512,
    ),
    "chinese-clip-vit-large-patch14": ChineseCLIPConfig(
        text_config=_text(**_ROBERTA_BASE),
        vision_config=ChineseCLIPVisionConfig(**_VIT_L14, image_size=224, projection_dim=768),
        projection_dim=768,
    ),
    "chinese-clip-vit-large-patch14-336px": ChineseCLIPConfig(
        text_config=_text(**_ROBERTA_BASE),
        vision_config=ChineseCLIPVisionConfig(**_VIT_L14, image_size=336, projection_dim=768),
        projection_dim=768,
    ),
    # ViT-H/14: width 1280 with 16 heads of width 80 (cn_clip's vision_head_width=80).
    "chinese-clip-vit-huge-patch14": ChineseCLIPConfig(
        text_config=_text(**_ROBERTA_LARGE),
        vision_config=ChineseCLIPVisionConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
            patch_size=14, image_size=224, projection_dim=1024,
        ),
        projection_dim=1024,
    ),
}
