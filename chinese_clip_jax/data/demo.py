"""The embedded demo set: synthetic Chinese image-text pairs drawn deterministically in numpy.

Each image is one coloured shape (6 colours x 5 shapes) at one of 9 positions on a noisy,
low-saturation background, captioned in Chinese with one of several phrasings, e.g.
"左上角有一个红色的圆形". Six colour-shape combinations (one per colour, every shape at least
once) never appear in training: they give the "unseen combinations" zero-shot figure, while
every colour and every shape is still seen in training with other partners.

Images are uint8 (size, size, 3), a pure function of (seed, split, index), so nothing is stored:
the draws come from a hash of the three, the background is one small matmul plus a window of a
cached noise bank, and the shape a cached mask per (shape, radius level, quarter-pixel centre);
about 20 us per 32 px image on one core (docs/data.md), far below the train step's share.

Config keys (``data.demo.*``, used when ``data.name == "demo"``):
  demo_seed        int, seed of the image content (independent of the shuffling seed)
  num_train        images per training epoch (index space; each is drawn on demand)
  eval_per_class   held-out images per class for "zeroshot" and "zeroshot_unseen"
  num_retrieval    held-out image-caption pairs for "retrieval"
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import struct

import numpy as np

from ..processing import DEFAULT_CONTEXT_LENGTH
from .source import Offers, Source

__all__ = [
    "COLORS",
    "SHAPES",
    "POSITIONS",
    "CLASS_NAMES",
    "CLASS_NAMES_EN",
    "UNSEEN_COMBOS",
    "TRAIN_COMBOS",
    "CLASS_PROMPTS",
    "METRIC_LABELS",
    "DemoSource",
    "render",
    "eval_images",
    "eval_attributes",
    "EvalImages",
    "eval_sets",
    "write_eval_datasets",
]

# name -> RGB in [0, 255]
COLORS = {
    "红色": (215, 35, 35),
    "橙色": (245, 135, 20),
    "黄色": (235, 215, 35),
    "绿色": (35, 165, 55),
    "蓝色": (35, 75, 225),
    "紫色": (145, 50, 195),
}
SHAPES = ("圆形", "正方形", "三角形", "十字形", "星形")
# name -> centre as (x, y) fractions of the image side
POSITIONS = {
    "左上角": (0.27, 0.27),
    "上方": (0.5, 0.27),
    "右上角": (0.73, 0.27),
    "左边": (0.27, 0.5),
    "中间": (0.5, 0.5),
    "右边": (0.73, 0.5),
    "左下角": (0.27, 0.73),
    "下方": (0.5, 0.73),
    "右下角": (0.73, 0.73),
}
_COLOR_NAMES = tuple(COLORS)
_POSITION_NAMES = tuple(POSITIONS)

# (colour index, shape index); one held-out shape per colour, every shape held out at most twice.
UNSEEN_COMBOS = tuple((c, c % len(SHAPES)) for c in range(len(COLORS)))
ALL_COMBOS = tuple(itertools.product(range(len(COLORS)), range(len(SHAPES))))
TRAIN_COMBOS = tuple(combo for combo in ALL_COMBOS if combo not in UNSEEN_COMBOS)
# Zero-shot classes are all 30 colour-shape combinations (chance 1/30), in ALL_COMBOS order.
CLASS_NAMES = tuple(f"{_COLOR_NAMES[c]}{SHAPES[s]}" for c, s in ALL_COMBOS)
# English names, for pictures drawn where no CJK font is installed
_COLORS_EN = ("red", "orange", "yellow", "green", "blue", "purple")
_SHAPES_EN = ("circle", "square", "triangle", "cross", "star")
CLASS_NAMES_EN = tuple(f"{_COLORS_EN[c]} {_SHAPES_EN[s]}" for c, s in ALL_COMBOS)

_CAPTIONS = (
    "{pos}有一个{color}的{shape}",
    "一个{color}的{shape}在{pos}",
    "图片的{pos}是一个{color}{shape}",
    "这是一张{color}{shape}的图片",
    "{color}的{shape}",
)
# Phrasings that name all three attributes (used for retrieval, whose positives are exact matches).
_FULL_CAPTIONS = _CAPTIONS[:3]
CLASS_PROMPTS = ("一个{color}的{shape}", "{color}的{shape}", "一张{color}{shape}的照片")

# Wording of the demo's eval metrics in the end-of-run report (training.report), in table order.
METRIC_LABELS = {
    "zeroshot/top1": "zero-shot top-1, held-out images",
    "zeroshot_unseen/top1": "zero-shot top-1, unseen colour-shape combinations",
    "retrieval/t2i_R@1": "text->image R@1",
    "retrieval/i2t_R@1": "image->text R@1",
    "retrieval/mean_recall": "retrieval mean recall (R@1/5/10, both ways)",
}

_SPLITS = {"train": 0, "zeroshot": 1, "zeroshot_unseen": 2, "retrieval": 3}

# ---------------------------------------------------------------- random draws
# Every random choice of an image comes from _draws(seed, split, index): 16 numbers from a
# BLAKE2b hash of the three (~2 us; building a numpy Generator alone costs ~10 us per image).
RENDER_DRAWS = 13  # numbers render() takes; the three before them pick class, position, caption
_DRAWS = 16


def _draws(seed: int, split: str, index: int) -> list[float]:
    """16 numbers in [0, 1) (32-bit resolution), a pure function of (seed, split, index)."""
    digest = hashlib.blake2b(f"demo:{seed}:{_SPLITS[split]}:{index}".encode(), digest_size=4 * _DRAWS).digest()
    return [v * 2.0**-32 for v in struct.unpack(f"<{_DRAWS}I", digest)]


def _pick(u: float, n: int) -> int:
    """A draw in [0, 1) -> an integer in [0, n)."""
    return int(u * n)


# ---------------------------------------------------------------- drawing
_NOISE_WINDOWS = 1 << 16  # noise offsets to draw from
_NOISE_SEED = 0x5EED
_NOISE_STD = 5.0  # clipped at 3 std, so no pixel needs clipping to [0, 255] (see render)
_RADII = 16  # radius levels
_SUBPIXEL = 4  # the centre is placed in steps of 1 / _SUBPIXEL px


@functools.lru_cache(maxsize=8)
def _canvas(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Read-only arrays shared by all images of one size (and by reader threads): the plane
    float32 (size*size, 3) of rows [x - size/2, y - size/2, 1] at pixel centres, and a noise
    bank float32 (_NOISE_WINDOWS + size*size*3,) ~ N(0, 5^2) clipped at +-15."""
    coords = np.arange(size, dtype=np.float32) + 0.5 - size / 2
    xs, ys = np.meshgrid(coords, coords, indexing="xy")
    plane = np.stack([xs.ravel(), ys.ravel(), np.ones(size * size, np.float32)], axis=1)
    bank = np.random.default_rng(_NOISE_SEED).normal(0.0, _NOISE_STD, _NOISE_WINDOWS + size * size * 3)
    bank = np.clip(bank, -3 * _NOISE_STD, 3 * _NOISE_STD).astype(np.float32)
    for a in (plane, bank):
        a.flags.writeable = False
    return plane, bank


def _shape_mask(shape: int, dx: np.ndarray, dy: np.ndarray, r: float, angle: float) -> np.ndarray:
    """Boolean mask of shape ``shape`` of radius ``r`` px; dx, dy are pixel offsets from its centre
    (px), broadcast against each other (a row and a column give an (h, w) mask)."""
    if shape == 0:  # circle
        return dx * dx + dy * dy <= r * r
    if shape == 1:  # axis-aligned square
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.8 * r
    if shape == 2:  # upward triangle: apex at -r, base at +0.7 r
        return (dy <= 0.7 * r) & (np.abs(dx) <= (dy + r) * 0.62)
    if shape == 3:  # plus-shaped cross
        ax, ay = np.abs(dx), np.abs(dy)
        arm = 0.34 * r
        return ((ax <= arm) & (ay <= r)) | ((ay <= arm) & (ax <= r))
    # five-pointed star: radius alternates between r (tips) and 0.45 r over 36-degree sectors
    theta = np.arctan2(dy, dx) - angle
    sector = np.abs(((theta * 5.0 / (2 * np.pi)) % 1.0) * 2.0 - 1.0)  # 1 at tips, 0 between
    return np.hypot(dx, dy) <= r * (0.45 + 0.55 * sector**1.5)


def _radius(size: int, level: int) -> float:
    """Radius (px) of radius level ``level`` in [0, _RADII): 0.15 to 0.21 of the side."""
    return (0.15 + 0.06 * (level + 0.5) / _RADII) * size


@functools.lru_cache(maxsize=16384)
def _placed_mask(size: int, shape: int, level: int, sub_x: int, sub_y: int) -> tuple[int, int, np.ndarray]:
    """(top, left, mask bool (h, w, 1)): the shape's pixels (centres inside it) for a centre at
    (ix + sub_x / _SUBPIXEL, iy + sub_y / _SUBPIXEL) px, as rows iy + top ... and columns ix + left ...
    of the image (ix, iy integers). Cached: the few thousand masks of one size are drawn once."""
    r = _radius(size, level)
    half = int(1.1 * r) + 2  # every shape lies within 1.06 r of its centre (the triangle's base corners)
    offsets = np.arange(-half, half + 1, dtype=np.float32) + 0.5  # pixel centres, relative to (ix, iy)
    mask = _shape_mask(shape, offsets - sub_x / _SUBPIXEL, (offsets - sub_y / _SUBPIXEL)[:, None], r, -np.pi / 2)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    mask = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1, None]
    mask.flags.writeable = False
    return int(rows[0]) - half, int(cols[0]) - half, mask


def render(size: int, color: int, shape: int, position: int, u) -> np.ndarray:
    """Draws one image: uint8 (size, size, 3). ``u``: RENDER_DRAWS numbers in [0, 1) that jitter it:
    u[0] grey level, u[1:4] its tint, u[4:6] gradient, u[6:8] place, u[8] radius, u[9:12] hue,
    u[12] noise."""
    plane, bank = _canvas(size)
    # background: a low-saturation grey (46..204 a channel) with a linear gradient (under 30 from
    # the centre; one (s*s, 3) @ (3, 3) product) and pixel noise (|n| <= 15; the window of the shared
    # bank that starts at a drawn offset): always within 1..249, so nothing is clipped
    level = 60.0 + 130.0 * u[0]
    gx, gy = (60.0 * u[4] - 30.0) / size, (60.0 * u[5] - 30.0) / size
    coef = np.array([gx, gx, gx, gy, gy, gy] + [level + 28.0 * t - 14.0 for t in u[1:4]], np.float32)
    img = plane @ coef.reshape(3, 3)
    start = _pick(u[12], _NOISE_WINDOWS)
    img += bank[start : start + size * size * 3].reshape(size * size, 3)
    img = img.astype(np.uint8).reshape(size, size, 3)
    # the object: a cached mask for its shape, radius level and sub-pixel centre, placed at the
    # centre's whole pixel (the centre stays within 0.22..0.78 of the side and the radius under
    # 0.21 of it, so the mask always lies inside the image)
    fx, fy = POSITIONS[_POSITION_NAMES[position]]
    qx = round((fx + 0.1 * u[6] - 0.05) * size * _SUBPIXEL)
    qy = round((fy + 0.1 * u[7] - 0.05) * size * _SUBPIXEL)
    top, left, mask = _placed_mask(size, shape, _pick(u[8], _RADII), qx % _SUBPIXEL, qy % _SUBPIXEL)
    y0, x0 = qy // _SUBPIXEL + top, qx // _SUBPIXEL + left
    rgb = [min(int(c + 30.0 * t - 15.0), 255) for c, t in zip(COLORS[_COLOR_NAMES[color]], u[9:12])]  # c >= 35
    np.copyto(img[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]], np.array(rgb, np.uint8), where=mask)
    return img


def _caption(template: str, color: int, shape: int, position: int) -> str:
    return template.format(pos=_POSITION_NAMES[position], color=_COLOR_NAMES[color], shape=SHAPES[shape])


class DemoSource:
    """Random-access training source: ``src[i]`` -> {"image": uint8 (s, s, 3), "text": str, "where": str,
    "label": the colour-shape class, an index into CLASS_NAMES}.

    Only TRAIN_COMBOS are drawn; ``len(src) == num_train``; element i depends only on (seed, i).
    """

    def __init__(self, *, image_size: int, num_train: int, seed: int = 0):
        if image_size < 16:
            raise ValueError(f"demo: image_size must be >= 16 px, got {image_size}")
        if num_train <= 0:
            raise ValueError(f"demo: num_train must be positive, got {num_train}")
        self.image_size, self.num_train, self.seed = int(image_size), int(num_train), int(seed)

    def __len__(self) -> int:
        return self.num_train

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_train:
            raise IndexError(f"demo: index {index} out of range [0, {self.num_train})")
        u = _draws(self.seed, "train", index)
        color, shape = TRAIN_COMBOS[_pick(u[0], len(TRAIN_COMBOS))]
        position = _pick(u[1], len(POSITIONS))
        template = _CAPTIONS[_pick(u[2], len(_CAPTIONS))]
        image = render(self.image_size, color, shape, position, u[3:])
        text = _caption(template, color, shape, position)
        return {"image": image, "text": text, "where": f"demo[{index}]", "label": class_label(color, shape)}


def _eval_draw(split: str, i: int, seed: int):
    """(colour, shape, position, caption, draws for ``render``) of held-out image i."""
    u = _draws(seed, split, i)
    combos = UNSEEN_COMBOS if split == "zeroshot_unseen" else TRAIN_COMBOS
    if split == "retrieval":
        color, shape = combos[_pick(u[0], len(combos))]
    else:
        color, shape = combos[i % len(combos)]
    position = _pick(u[1], len(POSITIONS))
    template = _FULL_CAPTIONS[_pick(u[2], len(_FULL_CAPTIONS))]
    return color, shape, position, _caption(template, color, shape, position), u[3:]


class EvalImages:
    """Held-out images of one eval split, drawn on demand: ``seq[i]`` -> uint8 (s, s, 3)."""

    def __init__(self, split: str, *, image_size: int, count: int, seed: int = 0):
        self.split, self.image_size, self.count, self.seed = split, int(image_size), int(count), int(seed)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.count:
            raise IndexError(f"demo {self.split}: index {i} out of range [0, {self.count})")
        color, shape, position, _, u = _eval_draw(self.split, i, self.seed)
        return render(self.image_size, color, shape, position, u)


def eval_attributes(split: str, count: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """(attributes int (count, 3) as (colour, shape, position), one full-attribute caption per image)."""
    draws = [_eval_draw(split, i, seed)[:4] for i in range(count)]
    return np.asarray([d[:3] for d in draws], np.int64).reshape(count, 3), [d[3] for d in draws]


def eval_images(split: str, *, image_size: int, count: int, seed: int = 0):
    """Held-out images of one eval split (their own random streams, disjoint from training).

    split: "zeroshot" (cycles over TRAIN_COMBOS), "zeroshot_unseen" (cycles over UNSEEN_COMBOS)
    or "retrieval" (random TRAIN_COMBOS, random position).
    Returns (images uint8 (count, s, s, 3), attributes int (count, 3) as (colour, shape, position),
    captions list[str] (one full-attribute caption per image)).
    """
    images = EvalImages(split, image_size=image_size, count=count, seed=seed)
    attrs, captions = eval_attributes(split, count, seed)
    return np.stack([images[i] for i in range(count)]), attrs, captions


def eval_sets(c, *, image_size: int, context_length: int = DEFAULT_CONTEXT_LENGTH) -> dict:
    """The demo's eval sets, images drawn lazily (``EvalImages``).

    "zeroshot" / "zeroshot_unseen": {"images", "labels" int32 (n,) indexing "class_names" (all
    30 colour-shape classes, chance 1/30), "class_texts" (prompts per class), "class_names_en"},
    on fresh images of seen / never-trained combinations; "retrieval": {"images", "input_ids",
    "attention_mask" int32 (t, L), "texts", "text_to_images" (positives per text)}.
    ``c``: the ``data.demo`` config (demo_seed, eval_per_class, num_retrieval).
    """
    from .pipeline import CachingTokenizer

    classes = {"class_names": list(CLASS_NAMES), "class_names_en": list(CLASS_NAMES_EN), "class_texts": class_prompts()}
    out = {}
    for split, combos in (("zeroshot", TRAIN_COMBOS), ("zeroshot_unseen", UNSEEN_COMBOS)):
        n = c.eval_per_class * len(combos)
        attrs, _ = eval_attributes(split, n, c.demo_seed)
        labels = np.asarray([class_label(col, shp) for col, shp, _ in attrs], np.int32)
        out[split] = {
            "images": EvalImages(split, image_size=image_size, count=n, seed=c.demo_seed),
            "labels": labels,
            **classes,
        }
    attrs, captions = eval_attributes("retrieval", c.num_retrieval, c.demo_seed)
    # a caption names colour, shape and position: every image with those three is a positive
    positives = [np.flatnonzero((attrs == a).all(axis=1)).tolist() for a in attrs]
    out["retrieval"] = {
        "images": EvalImages("retrieval", image_size=image_size, count=c.num_retrieval, seed=c.demo_seed),
        **CachingTokenizer(context_length)(captions),
        "texts": captions,
        "text_to_images": positives,
    }
    return out


def class_prompts() -> list[list[str]]:
    """Prompts for each of CLASS_NAMES, in the same order."""
    return [[t.format(color=_COLOR_NAMES[c], shape=SHAPES[s]) for t in CLASS_PROMPTS] for c, s in ALL_COMBOS]


def class_label(color: int, shape: int) -> int:
    """Index into CLASS_NAMES of a colour-shape combination."""
    return ALL_COMBOS.index((color, shape))


def write_eval_datasets(
    out: str, *, image_size: int = 32, eval_per_class: int = 20, num_retrieval: int = 200, seed: int = 0
) -> None:
    """Writes the held-out sets as files the evaluation command reads (``docs/evaluation.md``):

    ``out/folder/NN/*.png`` (zero-shot, one folder per seen class, NN = index in CLASS_NAMES),
    ``out/labels.txt`` (their Chinese names, in folder order) and ``out/cn_clip/valid_imgs.tsv``
    + ``valid_texts.jsonl`` (retrieval, cn_clip's layout; image ids 1000 + i, text ids i).
    """
    import base64
    import io
    import json
    import os

    import ml_collections
    import PIL.Image

    def png(a) -> bytes:
        buf = io.BytesIO()
        PIL.Image.fromarray(a).save(buf, "PNG")
        return buf.getvalue()

    c = ml_collections.ConfigDict({"demo_seed": seed, "eval_per_class": eval_per_class, "num_retrieval": num_retrieval})
    sets = eval_sets(c, image_size=image_size)
    z = sets["zeroshot"]
    for i, label in enumerate(z["labels"].tolist()):
        os.makedirs(os.path.join(out, "folder", f"{label:02d}"), exist_ok=True)
        with open(os.path.join(out, "folder", f"{label:02d}", f"{i:04d}.png"), "wb") as f:
            f.write(png(z["images"][i]))
    with open(os.path.join(out, "labels.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(CLASS_NAMES[k] for k in sorted(set(z["labels"].tolist()))) + "\n")
    r = sets["retrieval"]
    os.makedirs(os.path.join(out, "cn_clip"), exist_ok=True)
    with open(os.path.join(out, "cn_clip", "valid_imgs.tsv"), "w", encoding="ascii") as f:
        for i in range(len(r["images"])):
            f.write(f"{1000 + i}\t{base64.urlsafe_b64encode(png(r['images'][i])).decode()}\n")
    with open(os.path.join(out, "cn_clip", "valid_texts.jsonl"), "w", encoding="utf-8") as f:
        for t, (text, pos) in enumerate(zip(r["texts"], r["text_to_images"])):
            f.write(
                json.dumps({"text_id": t, "text": text, "image_ids": [1000 + j for j in pos]}, ensure_ascii=False)
                + "\n"
            )


def _open_train(c, *, image_size: int, shard=None) -> DemoSource:
    del shard  # the pipeline takes this process's part of the index space
    return DemoSource(image_size=image_size, num_train=c.num_train, seed=c.demo_seed)


DEFAULTS = {
    "demo_seed": 0,  # seed of the image content (independent of the shuffling seed)
    "num_train": 100_000,  # images per training epoch (each drawn on demand)
    "eval_per_class": 20,  # held-out images per class for the zero-shot sets
    "num_retrieval": 200,  # held-out image-caption pairs for the retrieval set
}

SOURCE = Source(name="demo", defaults=DEFAULTS, open_train=_open_train, eval_sets=eval_sets)

OFFERS = (Offers("demo", training=lambda spec: ("demo", {})),)
