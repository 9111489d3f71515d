"""Image preprocessing settings: the schema of transformers' ``preprocessor_config.json``,
validated once here.

``ImageSettings.from_dict(d)`` reads a preprocessor config dict as transformers does;
``read_image_settings(directory)`` finds it in a checkpoint directory the way transformers 5
does: the ``image_processor`` entry of ``processor_config.json`` (what
``ChineseCLIPProcessor.save_pretrained`` writes) first, then ``preprocessor_config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import PIL.Image

logger = logging.getLogger(__name__)

__all__ = [
    "ImageSettings",
    "read_image_settings",
    "image_settings_file",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "PROCESSOR_CONFIG",
    "PREPROCESSOR_CONFIG",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROCESSOR_CONFIG = "processor_config.json"  # transformers 5: {"image_processor": {...}, ...}
PREPROCESSOR_CONFIG = "preprocessor_config.json"  # the older, flat file
_RESAMPLE = {int(r) for r in PIL.Image.Resampling}


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class ImageSettings:
    """Image preprocessing settings, with the meaning of transformers' preprocessor_config.json.

    size: {"shortest_edge": s} or {"height": h, "width": w}, in pixels.
    crop_size: {"height": h, "width": w}, in pixels.
    resample: a PIL resampling filter number (3 = bicubic).
    """

    size: dict = dataclasses.field(default_factory=lambda: {"shortest_edge": 224})
    crop_size: dict = dataclasses.field(default_factory=lambda: {"height": 224, "width": 224})
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple = OPENAI_CLIP_MEAN
    image_std: tuple = OPENAI_CLIP_STD
    resample: int = int(PIL.Image.Resampling.BICUBIC)

    def __post_init__(self):
        if not isinstance(self.size, dict) or set(self.size) not in ({"shortest_edge"}, {"height", "width"}):
            raise ValueError(
                f"image size must be {{'shortest_edge': s}} or {{'height': h, 'width': w}}, got {self.size}"
            )
        if not isinstance(self.crop_size, dict) or set(self.crop_size) != {"height", "width"}:
            raise ValueError(f"crop_size must be {{'height': h, 'width': w}}, got {self.crop_size}")
        for name, d in (("size", self.size), ("crop_size", self.crop_size)):
            for k, v in d.items():
                if not _positive_int(v):
                    raise ValueError(f"{name}.{k} must be an int >= 1 (pixels), got {v!r}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"image_mean/image_std need 3 values, got {self.image_mean}, {self.image_std}")
        if not all(_number(x) for x in self.image_mean):
            raise ValueError(f"image_mean must be 3 numbers, got {self.image_mean}")
        if not all(_number(x) and x > 0 for x in self.image_std):
            raise ValueError(f"image_std must be 3 numbers > 0, got {self.image_std}")
        if not _number(self.rescale_factor) or self.rescale_factor <= 0:
            raise ValueError(f"rescale_factor must be a number > 0, got {self.rescale_factor!r}")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"resample must be a PIL filter number {sorted(_RESAMPLE)}, got {self.resample!r}")

    @classmethod
    def at_resolution(cls, r: int) -> ImageSettings:
        """transformers' default settings for a model of input size r x r (shortest edge r, crop r x r)."""
        return cls(size={"shortest_edge": r}, crop_size={"height": r, "width": r})

    @classmethod
    def from_dict(cls, d: dict) -> ImageSettings:
        """Reads a preprocessor_config.json dict the way transformers does.

        An int `size` means the shortest edge, a [h, w] list means height/width; an int
        `crop_size` means a square. Unknown keys (e.g. "feature_extractor_type") are ignored.
        Bad values raise one-line ValueErrors naming the key.
        """
        if not isinstance(d, dict):
            raise ValueError(f"image settings must be a JSON object, got {type(d).__name__}")
        kw: dict[str, Any] = {}
        if d.get("size") is not None:
            kw["size"] = _size_dict(d["size"], int_means="shortest_edge", name="size")
        if d.get("crop_size") is not None:
            kw["crop_size"] = _size_dict(d["crop_size"], int_means="square", name="crop_size")
        for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            if d.get(key) is not None:
                kw[key] = bool(d[key])
        if d.get("rescale_factor") is not None:
            kw["rescale_factor"] = d["rescale_factor"]
        for key in ("image_mean", "image_std"):
            if d.get(key) is not None:
                v = d[key]
                kw[key] = tuple(v) if isinstance(v, (list, tuple)) else (v,) * 3
        if d.get("resample") is not None:
            kw["resample"] = d["resample"]
        if d.get("do_convert_rgb") is False:
            logger.warning("do_convert_rgb=False is ignored: the model needs 3-channel RGB input")
        return cls(**kw)

    def to_dict(self) -> dict:
        """The preprocessor_config.json that transformers' ChineseCLIPProcessor reads back the same."""
        d = dataclasses.asdict(self)
        d.update(
            image_mean=list(self.image_mean),
            image_std=list(self.image_std),
            do_convert_rgb=True,
            image_processor_type="ChineseCLIPImageProcessor",
            processor_class="ChineseCLIPProcessor",
        )
        return d

    def output_size(self) -> tuple[int, int]:
        """(height, width) of the pixel_values this produces, when it does not depend on the image."""
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]
        if self.do_resize and "height" in self.size:
            return self.size["height"], self.size["width"]
        raise ValueError("output size depends on the input image (no center crop, shortest-edge resize)")


def _size_dict(v, int_means: str, name: str) -> dict:
    if isinstance(v, dict):
        return {k: x for k, x in v.items() if x is not None}
    if isinstance(v, int) and not isinstance(v, bool):
        return {"shortest_edge": v} if int_means == "shortest_edge" else {"height": v, "width": v}
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return {"height": v[0], "width": v[1]}
    raise ValueError(f"cannot read {name}={v!r} from the preprocessor config")


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _find_image_settings(directory: str) -> tuple[str, Any] | None:
    path = os.path.join(directory, PROCESSOR_CONFIG)
    if os.path.isfile(path):
        d = _read_json(path)
        if isinstance(d, dict) and d.get("image_processor") is not None:
            return path, d["image_processor"]
    path = os.path.join(directory, PREPROCESSOR_CONFIG)
    if os.path.isfile(path):
        return path, _read_json(path)
    return None


def image_settings_file(directory: str | os.PathLike) -> str | None:
    """The file ``read_image_settings(directory)`` reads its settings from; None where none is there."""
    found = _find_image_settings(os.fspath(directory))
    return found[0] if found else None


def read_image_settings(directory: str | os.PathLike) -> ImageSettings | None:
    """The image settings saved in a checkpoint directory, as transformers 5 finds them
    (``processor_config.json``'s ``image_processor``, else ``preprocessor_config.json``);
    None where neither is there. A bad file raises a ValueError naming it and the key."""
    found = _find_image_settings(os.fspath(directory))
    if found is None:
        return None
    path, d = found
    try:
        return ImageSettings.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
