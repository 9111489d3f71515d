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
    "ChineseCLIPResNetConfig",
    "ChineseCLIPConfig",
    "VISION_ARCHS",
    "TEXT_ARCHS",
    "PRESET_ARCHS",
    "PRESETS",
    "from_cn_clip_arch",
]


class _ConfigBase:
    """from_dict/to_dict shared by the three configs; unknown keys are kept in ``extra``."""

    model_type: ClassVar[str]
    # key -> config class, or a tuple of classes told apart by the dict's "model_type"
    _nested: ClassVar[dict[str, type | tuple[type, ...]]] = {}

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
                known[key] = value if isinstance(value, _ConfigBase) else _nested_class(
                    cls._nested[key], value or {}).from_dict(value or {})
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


def _nested_class(choices, d: Mapping[str, Any]) -> type:
    """The config class for a nested dict: by its ``model_type``, the first choice when absent."""
    choices = choices if isinstance(choices, tuple) else (choices,)
    if not isinstance(d, Mapping):
        raise TypeError(f"a nested config must be a mapping, got {type(d).__name__}")
    model_type = d.get("model_type")
    for c in choices:
        if model_type in (None, c.model_type):
            return c
    raise ValueError(f"unknown model_type {model_type!r}; known: {', '.join(c.model_type for c in choices)}")


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
class ChineseCLIPResNetConfig(_ConfigBase):
    """cn_clip's ModifiedResNet image tower (RN50): 3-conv stem, anti-aliased bottleneck stages,
    attention pooling whose output projection gives ``projection_dim`` directly.

    transformers has no such tower: a config with it is ours (``model_type`` below) and is written
    only in our own layouts (Flax directory, cn_clip ``.pt``), never as a HF checkpoint.
    """

    model_type: ClassVar[str] = "chinese_clip_resnet_vision_model"
    layers: tuple = (3, 4, 6, 3)  # bottleneck blocks per stage
    width: int = 64  # stem width; stage i has width * 2**i planes, 4x as many output channels
    num_attention_heads: int = 32  # of the attention pool (cn_clip: width * 32 // 64)
    num_channels: int = 3
    image_size: int = 224
    batch_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    projection_dim: int = 1024
    extra: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.layers, (list, tuple)) or len(self.layers) != 4 or not all(
                isinstance(n, int) and n >= 1 for n in self.layers):
            raise ValueError(f"vision_config: layers must be 4 positive ints (blocks per stage), got {self.layers!r}")
        object.__setattr__(self, "layers", tuple(self.layers))  # a JSON list reads back equal
        if not isinstance(self.image_size, int) or self.image_size % 32:
            raise ValueError(f"vision_config: image_size must be a multiple of 32 (the ResNet's stride), "
                             f"got {self.image_size!r}")
        _check_heads("vision_config", self.hidden_size, self.num_attention_heads)

    @property
    def hidden_size(self) -> int:
        """Channels of the last stage, the attention pool's width (2048 for RN50)."""
        return self.width * 32

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        """Side of the last feature map (image_size / 32)."""
        return self.image_size // 32


@dataclasses.dataclass(frozen=True)
class ChineseCLIPConfig(_ConfigBase):
    """The joint model: both towers, the projection width and the initial logit scale."""

    model_type: ClassVar[str] = "chinese_clip"
    _nested: ClassVar[dict[str, type]] = {
        "text_config": ChineseCLIPTextConfig,
        "vision_config": (ChineseCLIPVisionConfig, ChineseCLIPResNetConfig),
    }
    text_config: ChineseCLIPTextConfig = dataclasses.field(default_factory=ChineseCLIPTextConfig)
    vision_config: ChineseCLIPVisionConfig | ChineseCLIPResNetConfig = dataclasses.field(
        default_factory=ChineseCLIPVisionConfig)
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

    @property
    def is_resnet(self) -> bool:
        """Whether the image tower is cn_clip's ModifiedResNet (no HF layout exists for it)."""
        return isinstance(self.vision_config, ChineseCLIPResNetConfig)

    @classmethod
    def preset(cls, name: str) -> "ChineseCLIPConfig":
        """One of the five published architectures (``OFA-Sys/`` prefix optional)."""
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


# --------------------------------------------------------------------------- published sizes
# The one table of published architectures, under cn_clip's names (its model_configs/*.json;
# tests/test_config.py checks every row against those files). Presets and cn_clip ``--arch``
# strings ("ViT-B-16@RoBERTa-wwm-ext-base-chinese") are both read from it.

def _vit(width: int, layers: int, heads: int, patch: int, resolution: int, embed_dim: int) -> ChineseCLIPVisionConfig:
    return ChineseCLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                                   num_attention_heads=heads, patch_size=patch, image_size=resolution,
                                   projection_dim=embed_dim)


def _roberta(hidden: int, layers: int, heads: int, intermediate: int) -> ChineseCLIPTextConfig:
    return ChineseCLIPTextConfig(vocab_size=21128, hidden_size=hidden, intermediate_size=intermediate,
                                 num_hidden_layers=layers, num_attention_heads=heads)


VISION_ARCHS: dict[str, ChineseCLIPVisionConfig | ChineseCLIPResNetConfig] = {
    # head width 64, except ViT-H: 16 heads of width 80 (cn_clip's vision_head_width=80)
    "ViT-B-32": _vit(768, 12, 12, 32, 224, 512),
    "ViT-B-16": _vit(768, 12, 12, 16, 224, 512),
    "ViT-L-14": _vit(1024, 24, 16, 14, 224, 768),
    "ViT-L-14-336": _vit(1024, 24, 16, 14, 336, 768),
    "ViT-H-14": _vit(1280, 32, 16, 14, 224, 1024),
    "RN50": ChineseCLIPResNetConfig(layers=(3, 4, 6, 3), width=64, num_attention_heads=32, image_size=224,
                                    projection_dim=1024),
}
TEXT_ARCHS: dict[str, ChineseCLIPTextConfig] = {
    "RoBERTa-wwm-ext-base-chinese": _roberta(768, 12, 12, 3072),
    "RoBERTa-wwm-ext-large-chinese": _roberta(1024, 24, 16, 4096),
    "RBT3-chinese": _roberta(768, 3, 12, 3072),
}
PRESET_ARCHS: dict[str, str] = {  # HF name (OFA-Sys/...) -> cn_clip architecture
    "chinese-clip-vit-base-patch16": "ViT-B-16@RoBERTa-wwm-ext-base-chinese",
    "chinese-clip-vit-large-patch14": "ViT-L-14@RoBERTa-wwm-ext-base-chinese",
    "chinese-clip-vit-large-patch14-336px": "ViT-L-14-336@RoBERTa-wwm-ext-base-chinese",
    "chinese-clip-vit-huge-patch14": "ViT-H-14@RoBERTa-wwm-ext-large-chinese",
    "chinese-clip-rn50": "RN50@RBT3-chinese",  # cn_clip only: transformers has no ResNet Chinese-CLIP
}


def from_cn_clip_arch(arch: str) -> ChineseCLIPConfig:
    """``"ViT-B-16@RoBERTa-wwm-ext-base-chinese"`` (cn_clip's ``--arch`` form) -> config."""
    if not isinstance(arch, str) or "@" not in arch:
        raise ValueError(f"arch must look like 'ViT-B-16@RoBERTa-wwm-ext-base-chinese', got {arch!r}")
    vision, text = arch.split("@", 1)
    if vision not in VISION_ARCHS:
        raise ValueError(f"unknown vision arch {vision!r}; known: {', '.join(VISION_ARCHS)}")
    if text not in TEXT_ARCHS:
        raise ValueError(f"unknown text arch {text!r}; known: {', '.join(TEXT_ARCHS)}")
    v = VISION_ARCHS[vision]
    return ChineseCLIPConfig(text_config=TEXT_ARCHS[text], vision_config=v, projection_dim=v.projection_dim)


PRESETS: dict[str, ChineseCLIPConfig] = {name: from_cn_clip_arch(arch) for name, arch in PRESET_ARCHS.items()}
