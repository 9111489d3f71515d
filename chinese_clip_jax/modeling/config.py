"""Chinese-CLIP configuration: frozen dataclasses in the schema of HF ``config.json``.

``ChineseCLIPConfig.to_dict()`` writes the keys transformers' ``ChineseCLIPConfig`` reads, and
``from_dict`` keeps any key it does not know in ``extra`` so a round trip loses nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any, ClassVar

__all__ = [
    "ChineseCLIPTextConfig",
    "ChineseCLIPVisionConfig",
    "ChineseCLIPResNetConfig",
    "ChineseCLIPConfig",
    "vit_config",
    "roberta_config",
    "VISION_ARCHS",
    "TEXT_ARCHS",
    "PRESET_ARCHS",
    "PRESETS",
    "DTYPES",
    "parse_dtype",
    "from_cn_clip_arch",
]

DTYPES = ("float32", "bfloat16", "float16")


def parse_dtype(name):
    """The one parser from a config / command-line dtype string ("float32", "bfloat16",
    "float16") to a jnp dtype; a jnp/numpy dtype passes through."""
    import jax.numpy as jnp

    if not isinstance(name, str):
        return jnp.dtype(name)
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return jnp.dtype(name)


class _ConfigBase:
    """from_dict/to_dict shared by the three configs; unknown keys are kept in ``extra``."""

    model_type: ClassVar[str]
    # key -> config class, or a tuple of classes told apart by the dict's "model_type"
    _nested: ClassVar[dict[str, type | tuple[type, ...]]] = {}

    @classmethod
    def _field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = ""):
        """``where``: the key this dict sits under (for error messages), e.g. "text_config"."""
        if not isinstance(d, Mapping):
            raise ValueError(f"{where or 'config'} must be a JSON object, got {type(d).__name__} {_short(d)}")
        d = _merge_old_layout(d, cls._nested)
        known, extra = {}, {}
        for key, value in d.items():
            if key in cls._nested:
                if isinstance(value, _ConfigBase):
                    known[key] = value
                else:
                    value = {} if value is None else value
                    choices = cls._nested[key] if isinstance(cls._nested[key], tuple) else (cls._nested[key],)
                    sub = _nested_class(choices, value) if isinstance(value, Mapping) else choices[0]
                    known[key] = sub.from_dict(value, where=key)  # a non-mapping fails there, named
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


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _merge_old_layout(d: Mapping[str, Any], nested: Mapping[str, type]) -> Mapping[str, Any]:
    """The older transformers layout: ``text_config_dict`` / ``vision_config_dict``. As
    transformers does, their values (over the tower's defaults) replace ``text_config``'s;
    keys we do not model are kept."""
    if not any(f"{key}_dict" in d for key in nested):
        return d
    d = dict(d)
    for key, sub in nested.items():
        old = d.pop(f"{key}_dict", None)
        if old is None:
            continue
        if not isinstance(old, Mapping):
            raise ValueError(f"{key}_dict must be a JSON object, got {type(old).__name__} {_short(old)}")
        current = d.get(key) if isinstance(d.get(key), Mapping) else {}
        fields = {f for c in (sub if isinstance(sub, tuple) else (sub,)) for f in c._field_names()}
        d[key] = {**{k: v for k, v in current.items() if k not in fields}, **old}
    return d


def _check_fields(
    kind: str, cfg, positive: tuple[str, ...], non_negative: tuple[str, ...] = (), fractions: tuple[str, ...] = ()
) -> None:
    """One-line ValueErrors for sizes that are not positive ints, and bad floats."""
    for name in positive + non_negative:
        v = getattr(cfg, name)
        low = 1 if name in positive else 0
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{kind}.{name} must be an int >= {low}, got {_short(v)}")
    for name in fractions:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise ValueError(f"{kind}.{name} must be a number in [0, 1), got {_short(v)}")
    eps = cfg.layer_norm_eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{kind}.layer_norm_eps must be a number > 0, got {_short(eps)}")


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
        raise ValueError(f"{kind}: hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads}")


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
        _check_fields(
            "text_config",
            self,
            (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "max_position_embeddings",
                "type_vocab_size",
            ),
            ("pad_token_id",),
            ("hidden_dropout_prob", "attention_probs_dropout_prob"),
        )
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
        for name in ("image_size", "patch_size"):
            if isinstance(getattr(self, name), (list, tuple)):
                raise ValueError(f"vision_config.{name} must be one int (square), got {getattr(self, name)!r}")
        _check_fields(
            "vision_config",
            self,
            (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_channels",
                "image_size",
                "patch_size",
                "projection_dim",
            ),
            (),
            ("attention_dropout",),
        )
        _check_heads("vision_config", self.hidden_size, self.num_attention_heads)
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
        if (
            not isinstance(self.layers, (list, tuple))
            or len(self.layers) != 4
            or not all(isinstance(n, int) and n >= 1 for n in self.layers)
        ):
            raise ValueError(f"vision_config: layers must be 4 positive ints (blocks per stage), got {self.layers!r}")
        object.__setattr__(self, "layers", tuple(self.layers))  # a JSON list reads back equal
        if not isinstance(self.image_size, int) or self.image_size % 32:
            raise ValueError(
                f"vision_config: image_size must be a multiple of 32 (the ResNet's stride), got {self.image_size!r}"
            )
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
        default_factory=ChineseCLIPVisionConfig
    )
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    extra: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        v = self.projection_dim
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"projection_dim must be an int >= 1, got {_short(v)}")
        v = self.logit_scale_init_value
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"logit_scale_init_value must be a number, got {_short(v)}")

    @classmethod
    def from_text_vision_configs(
        cls,
        text_config: ChineseCLIPTextConfig,
        vision_config: ChineseCLIPVisionConfig,
        projection_dim: int = 512,
        **kwargs,
    ) -> ChineseCLIPConfig:
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
    def preset(cls, name: str) -> ChineseCLIPConfig:
        """One of the five published architectures (``OFA-Sys/`` prefix optional)."""
        key = name.split("/")[-1]
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return PRESETS[key]

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> ChineseCLIPConfig:
        """Reads and validates a HF ``config.json``; a bad one raises a ValueError naming the file
        and the key."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            with open(path, encoding="utf-8-sig") as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path} must hold a JSON object, got a {type(d).__name__}")
        if d.get("model_type", "chinese_clip") != "chinese_clip":
            raise ValueError(f"{path} describes model_type {d['model_type']!r}, not 'chinese_clip'")
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def from_pretrained(cls, src: str | os.PathLike) -> ChineseCLIPConfig:
        """Reads ``config.json`` from a directory, a file path or a hub id (when online)."""
        from ..io import resolve_local_or_hub

        src = resolve_local_or_hub(src, allow_patterns=["config.json"])
        if os.path.isdir(src):
            return cls.from_json_file(os.path.join(src, "config.json"))
        return cls.from_json_file(src)

    def save(self, directory: str | os.PathLike) -> str:
        """Writes ``config.json`` into ``directory``; returns its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "config.json")
        d = self.to_dict()
        d.setdefault("architectures", ["ChineseCLIPModel"])
        with open(path, "w", encoding="utf-8") as f:
            json.dump(d, f, indent=2, ensure_ascii=False)
        return path


# --------------------------------------------------------------------------- published sizes
# The one table of published architectures, under cn_clip's names (its model_configs/*.json;
# tests/modeling/test_config.py checks every row against those files). Presets and cn_clip ``--arch``
# strings ("ViT-B-16@RoBERTa-wwm-ext-base-chinese") are both read from it.


def vit_config(
    width: int, layers: int, heads: int, patch: int, resolution: int, embed_dim: int
) -> ChineseCLIPVisionConfig:
    """A ViT tower config from cn_clip's architecture numbers (the rows of ``VISION_ARCHS``)."""
    return ChineseCLIPVisionConfig(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        patch_size=patch,
        image_size=resolution,
        projection_dim=embed_dim,
    )


def roberta_config(hidden: int, layers: int, heads: int, intermediate: int) -> ChineseCLIPTextConfig:
    """A RoBERTa-wwm tower config from cn_clip's architecture numbers (the rows of ``TEXT_ARCHS``)."""
    return ChineseCLIPTextConfig(
        vocab_size=21128,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
    )


VISION_ARCHS: dict[str, ChineseCLIPVisionConfig | ChineseCLIPResNetConfig] = {
    # head width 64, except ViT-H: 16 heads of width 80 (cn_clip's vision_head_width=80)
    "ViT-B-32": vit_config(768, 12, 12, 32, 224, 512),
    "ViT-B-16": vit_config(768, 12, 12, 16, 224, 512),
    "ViT-L-14": vit_config(1024, 24, 16, 14, 224, 768),
    "ViT-L-14-336": vit_config(1024, 24, 16, 14, 336, 768),
    "ViT-H-14": vit_config(1280, 32, 16, 14, 224, 1024),
    "RN50": ChineseCLIPResNetConfig(
        layers=(3, 4, 6, 3), width=64, num_attention_heads=32, image_size=224, projection_dim=1024
    ),
}
TEXT_ARCHS: dict[str, ChineseCLIPTextConfig] = {
    "RoBERTa-wwm-ext-base-chinese": roberta_config(768, 12, 12, 3072),
    "RoBERTa-wwm-ext-large-chinese": roberta_config(1024, 24, 16, 4096),
    "RBT3-chinese": roberta_config(768, 3, 12, 3072),
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
