"""Images -> pixel_values, identical to transformers' ChineseCLIPImageProcessor (PIL backend).

Images are decoded and resized with PIL and normalized with numpy, step for step as transformers:

  1. convert to RGB (transparent pixels composited onto white, as transformers does);
  2. resize with PIL (`size` = {"shortest_edge": s}: the short side becomes s and the long side
     `int(s * long / short)`; `size` = {"height": h, "width": w}: squash to h x w);
  3. center crop to `crop_size` (zero padding when the image is smaller, as transformers does);
  4. rescale and normalize: `(x * rescale_factor - mean) / std` in float32, via a 256-entry table.

`resize_mode="squash"` instead reproduces cn_clip's evaluation transform: bicubic resize of the
image as given to r x r (no crop), then `convert("RGB")`, `/ 255` and normalize (mean/std from
the settings; r x r = the processor's output size). The settings' schema is
``chinese_clip_jax.processing.image_settings``; ``normalize_pixels`` is the one normalisation the data
pipeline uses too.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from collections.abc import Sequence

import numpy as np
import PIL.Image
import PIL.ImageOps

from .image_settings import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageSettings

__all__ = [
    "EVAL_TRANSFORMS",
    "eval_transform",
    "ImagePreprocessor",
    "ImageLoadError",
    "ImageInput",
    "to_rgb",
    "normalize_pixels",
    "default_normalize_table",
    "apply_normalize_table",
    "MAX_RESIZED_PIXELS",
]

logger = logging.getLogger(__name__)

MAX_RESIZED_PIXELS = 1 << 26  # 64 Mpixel; above this, resize only the centre-crop window (extreme aspect ratios)

ImageInput = PIL.Image.Image | np.ndarray | str | os.PathLike


class ImageLoadError(ValueError):
    """An input image could not be read or converted; the message names the image and why."""


def _normalize_table(scale: float | None, mean, std, torch_style: bool = False) -> np.ndarray:
    """(3, 256) float32 table: normalized value of grey level v in channel c.

    Same float32 arithmetic as transformers (float64 rescale then cast) or, with torch_style,
    as torchvision's ToTensor (float32 division by 255).
    """
    v = np.arange(256, dtype=np.float64)
    if torch_style:
        x = v.astype(np.float32) / np.float32(255)
    elif scale is not None:
        x = (v * scale).astype(np.float32)
    else:
        x = v.astype(np.float32)
    table = np.stack([x, x, x])
    if mean is not None:
        m = np.asarray(mean, np.float32)[:, None]
        s = np.asarray(std, np.float32)[:, None]
        table = (table - m) / s
    return table.astype(np.float32)


def _from_torch(x):
    """A torch tensor (e.g. transformers' uint8 (3, H, W) test images) -> numpy; anything else as is.
    Recognised by its type's module, so torch is never imported here."""
    if type(x).__module__.startswith("torch") and hasattr(x, "numpy"):
        return x.detach().cpu().numpy()
    return x


def _image_name(image, index: int) -> str:
    if isinstance(image, (str, os.PathLike)):
        return f"image {index} ({os.fspath(image)!r})"
    return f"image {index} ({type(image).__name__})"


def _open_path(path) -> PIL.Image.Image:
    img = PIL.Image.open(path)
    img.load()
    return PIL.ImageOps.exif_transpose(img)


def _array_to_pil(a: np.ndarray) -> PIL.Image.Image:
    """uint8 (H, W), (H, W, C) or (C, H, W) with C in {1, 3, 4} -> PIL image (L, RGB or RGBA).

    Channels-last is assumed whenever the last axis has 1, 3 or 4 entries.
    """
    if a.dtype != np.uint8:
        raise ValueError(f"arrays must be uint8 (0..255), got dtype {a.dtype}")
    if a.ndim == 3 and a.shape[-1] not in (1, 3, 4) and a.shape[0] in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        return PIL.Image.fromarray(np.ascontiguousarray(a), mode="L")
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise ValueError(f"arrays must be (H, W), (H, W, 1|3|4) or (1|3|4, H, W), got shape {a.shape}")
    if a.shape[-1] == 4:  # composite onto white, rounded, as transformers does for arrays
        alpha = a[..., 3:4] / 255.0
        a = np.round(alpha * a[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return PIL.Image.fromarray(np.ascontiguousarray(a), mode="RGB")


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL mode -> RGB; images with an alpha band or a transparency key go onto white."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


EVAL_TRANSFORMS = ("center", "squash")
_OLD_TRANSFORM_NAMES = {"crop": "center", "processor": "center"}  # earlier spellings, still accepted


def eval_transform(name: str, *, what: str = "resize_mode") -> str:
    """The one name of an evaluation image transform: "center" (transformers' processor: shortest
    edge, then a centre crop) or "squash" (cn_clip's eval: bicubic to the square resolution).
    The earlier spellings "crop" and "processor" mean "center"; anything else is a one-line
    ValueError naming ``what``."""
    name = _OLD_TRANSFORM_NAMES.get(name, name)
    if name not in EVAL_TRANSFORMS:
        raise ValueError(f"{what} must be one of {EVAL_TRANSFORMS}, got {name!r}")
    return name


class ImagePreprocessor:
    """Images -> float32 pixel_values (N, 3, H, W).

    resize_mode: ``eval_transform``'s "center" (the settings, as transformers) or "squash"
    (cn_clip's eval transform at resolution `crop_size`). num_threads: images decoded/resized in
    parallel (PIL releases the GIL); 1 = in the calling thread.
    """

    def __init__(
        self, settings: ImageSettings | None = None, resize_mode: str = "center", num_threads: int | None = None
    ):
        resize_mode = eval_transform(resize_mode)
        self.settings = settings or ImageSettings()
        self.resize_mode = resize_mode
        self.num_threads = num_threads or min(8, os.cpu_count() or 1)
        s = self.settings
        if resize_mode == "squash":
            self._table = _normalize_table(None, s.image_mean, s.image_std, torch_style=True)
        else:
            self._table = _normalize_table(
                s.rescale_factor if s.do_rescale else None, s.image_mean if s.do_normalize else None, s.image_std
            )

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the output pixels."""
        if self.resize_mode == "squash":  # the processor's output size, else crop_size
            try:
                return self.settings.output_size()
            except ValueError:
                return self.settings.crop_size["height"], self.settings.crop_size["width"]
        return self.settings.output_size()

    def __call__(self, images: ImageInput | Sequence[ImageInput], start_index: int = 0) -> np.ndarray:
        """images: one image or a list -> (N, 3, H, W) float32.

        Raises ImageLoadError naming the image (its position, counted from start_index).
        torch tensors are read as the numpy arrays they hold (uint8, HWC or CHW).
        """
        images = _from_torch(images)
        if isinstance(images, (PIL.Image.Image, str, os.PathLike)) or (
            isinstance(images, np.ndarray) and images.ndim in (2, 3)
        ):
            images = [images]
        images = list(images)
        if not images:
            raise ValueError("no images given")
        if self.num_threads > 1 and len(images) > 1:
            with concurrent.futures.ThreadPoolExecutor(min(self.num_threads, len(images))) as pool:
                arrays = list(pool.map(self._one, images, range(start_index, start_index + len(images))))
        else:
            arrays = [self._one(im, i) for i, im in enumerate(images, start_index)]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"images came out with different sizes {sorted(shapes)}; set a crop_size")
        return np.stack(arrays)

    def _one(self, image: ImageInput, index: int) -> np.ndarray:
        return self._normalize(self.resized(image, index))

    def resized(self, image: ImageInput, index: int = 0) -> np.ndarray:
        """One image -> uint8 (H, W, 3): resized and cropped, not yet rescaled or normalized
        (``self.table`` finishes it: ``apply_normalize_table``)."""
        try:
            if self.resize_mode == "squash":
                return self._squash(self._load(image, convert=False))
            return self._process(self._load(image, convert=True))
        except ImageLoadError:
            raise
        except Exception as e:  # noqa: BLE001 - reported with the image's name
            raise ImageLoadError(f"cannot read {_image_name(image, index)}: {type(e).__name__}: {e}") from e

    def resized_batch(self, images: Sequence[ImageInput], start_index: int = 0) -> np.ndarray:
        """Images -> uint8 (N, H, W, 3), resized and cropped: the light worker-side half of
        ``__call__`` (numpy + PIL only; 4x smaller than float pixels). Finish on the host with
        ``apply_normalize_table(batch, self.table)`` or on the device with
        ``encoding.model_pixels`` (default settings)."""
        arrays = [self.resized(im, i) for i, im in enumerate(images, start_index)]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"images came out with different sizes {sorted(shapes)}; set a crop_size")
        return np.stack(arrays)

    @property
    def table(self) -> np.ndarray:
        """(3, 256) float32: normalized value of grey level v in channel c for these settings."""
        return self._table

    @staticmethod
    def _load(image: ImageInput, convert: bool) -> PIL.Image.Image:
        image = _from_torch(image)
        if isinstance(image, (str, os.PathLike)):
            img = _open_path(image)
            # transformers' load_image: plain convert("RGB") for files (alpha is dropped, not composited)
            return img.convert("RGB") if convert else img
        if isinstance(image, np.ndarray):
            img = _array_to_pil(image)
        elif isinstance(image, PIL.Image.Image):
            img = image
        else:
            raise TypeError(f"expected a PIL image, a uint8 array or a path, got {type(image).__name__}")
        return to_rgb(img) if convert else img

    def _process(self, img: PIL.Image.Image) -> np.ndarray:
        s = self.settings
        if s.do_resize:
            w, h = img.size
            if "shortest_edge" in s.size:
                short, long = (w, h) if w <= h else (h, w)
                new_short, new_long = s.size["shortest_edge"], int(s.size["shortest_edge"] * long / short)
                new_h, new_w = (new_long, new_short) if w <= h else (new_short, new_long)
            else:
                new_h, new_w = s.size["height"], s.size["width"]
            # Not resize(box=crop window): PIL may then run its two passes in the other order,
            # and the uint8 rounding between them moves pixels by a grey level or two. Only for
            # extreme aspect ratios (a 1x4000 strip -> 224x896000) is the work bounded that way.
            if new_w * new_h > MAX_RESIZED_PIXELS and s.do_center_crop:
                img = _resize_crop_window(img, new_w, new_h, s.crop_size["height"], s.crop_size["width"], s.resample)
            else:
                img = img.resize((new_w, new_h), resample=s.resample)
        arr = np.asarray(img)
        if s.do_center_crop:
            arr = _center_crop(arr, s.crop_size["height"], s.crop_size["width"])
        return arr

    def _squash(self, img: PIL.Image.Image) -> np.ndarray:
        h, w = self.image_size
        return np.asarray(img.resize((w, h), resample=PIL.Image.Resampling.BICUBIC).convert("RGB"))

    def _normalize(self, arr: np.ndarray) -> np.ndarray:
        return apply_normalize_table(arr, self._table)


def apply_normalize_table(images: np.ndarray, table: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) through a (3, 256) table from
    ``_normalize_table``: the one place pixels are rescaled and normalized."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[-1:] != (3,):
        raise ValueError(f"expected uint8 (..., H, W, 3) pixels, got {images.dtype} {images.shape}")
    out = np.empty(images.shape[:-3] + (3,) + images.shape[-3:-1], np.float32)
    for c in range(3):
        np.take(table[c], images[..., c], out=out[..., c, :, :])
    return out


_DEFAULT_TABLE = None


def normalize_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) with transformers' default settings
    (``x * (1/255)`` in float64, cast, then ``(x - OPENAI_CLIP_MEAN) / OPENAI_CLIP_STD`` in
    float32): bit-equal to ``ChineseCLIPImageProcessor`` without resize and crop."""
    return apply_normalize_table(images, default_normalize_table())


def default_normalize_table() -> np.ndarray:
    """(3, 256) float32 table of ``normalize_pixels`` (transformers' default rescale and CLIP
    mean/std); ``encoding.model_pixels`` applies the same table on the device."""
    global _DEFAULT_TABLE
    if _DEFAULT_TABLE is None:
        _DEFAULT_TABLE = _normalize_table(1 / 255, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    return _DEFAULT_TABLE


def _resize_crop_window(img: PIL.Image.Image, new_w: int, new_h: int, ch: int, cw: int, resample: int):
    """The part of ``img.resize((new_w, new_h))`` that a centre crop to (ch, cw) keeps, with PIL's
    own two passes: the horizontal one as PIL runs it first (``new_w x h`` pixels, at most the
    crop size times the long side), then the vertical one over the kept rows only."""
    w, h = img.size
    top, left = (new_h - ch) // 2, (new_w - cw) // 2
    r0, r1 = (top, top + ch) if top >= 0 else (0, new_h)
    c0, c1 = (left, left + cw) if left >= 0 else (0, new_w)
    rows = img.resize((new_w, h), resample=resample) if new_w != w else img
    rows = rows.crop((c0, 0, c1, h))
    return rows.resize((c1 - c0, r1 - r0), resample=resample, box=(0, r0 * h / new_h, c1 - c0, r1 * h / new_h))


def _center_crop(arr: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """(H, W, 3) -> (ch, cw, 3), zero-padded where the image is smaller (as transformers)."""
    h, w = arr.shape[:2]
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        return arr[top : top + ch, left : left + cw]
    nh, nw = max(ch, h), max(cw, w)
    pad_top, pad_left = -(-(nh - h) // 2), -(-(nw - w) // 2)  # ceil, as transformers
    canvas = np.zeros((nh, nw, 3), arr.dtype)
    canvas[pad_top : pad_top + h, pad_left : pad_left + w] = arr
    top, left = top + pad_top, left + pad_left
    return canvas[max(0, top) : min(nh, top + ch), max(0, left) : min(nw, left + cw)]
