"""Pictures of a run, drawn with PIL: training curves and a grid of held-out zero-shot predictions.

``run_figure(rows, grid)`` -> one RGB image: the curves of ``train/loss``, the first zero-shot
set's ``top1`` and ``retrieval/mean_recall`` by step (whichever the run logged), above a grid of
held-out images, each marked with its true and predicted class (green frame: right, red:
wrong). Class names are drawn with a CJK font when one is installed (common paths, then
``fc-list :lang=zh``); without one, with the set's ``class_names_en`` (else "class N"), so a
label is never a row of empty boxes.
"""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

__all__ = ["find_font", "can_draw", "curves_image", "grid_image", "run_figure"]

_CJK_FONT_PATHS = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/truetype/arphic/uming.ttc",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/System/Library/Fonts/PingFang.ttc",
    "/System/Library/Fonts/STHeiti Light.ttc",
    "/Library/Fonts/Arial Unicode.ttf",
    "C:/Windows/Fonts/msyh.ttc",
    "C:/Windows/Fonts/simhei.ttf",
)
_LATIN_FONT_PATHS = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:/Windows/Fonts/arial.ttf",
)
GREEN, RED, GREY, BLACK = (30, 150, 60), (200, 40, 40), (120, 120, 120), (20, 20, 20)


def _fc_list_cjk() -> list[str]:
    try:
        out = subprocess.run(["fc-list", ":lang=zh", "file"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted(line.split(":")[0].strip() for line in out.splitlines() if line.strip())


@functools.lru_cache(maxsize=8)
def find_font(size: int = 14, cjk: bool = True):
    """A TrueType font (CJK-capable first when cjk) of ``size`` px; PIL's default if none."""
    paths = (list(_CJK_FONT_PATHS) + _fc_list_cjk() if cjk else []) + list(_LATIN_FONT_PATHS)
    for p in paths:
        if os.path.isfile(p):
            try:
                return PIL.ImageFont.truetype(p, size)
            except OSError:
                continue
    return PIL.ImageFont.load_default(size)


def can_draw(font, text: str) -> bool:
    """True when every character of text has a glyph in font (not the 'missing' box)."""

    def mask(ch):
        m = font.getmask(ch)
        return m.size, bytes(m)

    missing = {mask("\uffff"), mask("\U000effff")}
    return all(ch.isspace() or mask(ch) not in missing for ch in text)


def _panel(title: str, steps: Sequence[int], values: Sequence[float], size=(300, 210)) -> PIL.Image.Image:
    w, h = size
    img = PIL.Image.new("RGB", size, "white")
    d = PIL.ImageDraw.Draw(img)
    font, small = find_font(14, cjk=False), find_font(11, cjk=False)
    d.text((8, 4), title, fill=BLACK, font=font)
    left, top, right, bottom = 46, 26, w - 10, h - 24
    d.rectangle((left, top, right, bottom), outline=GREY)
    if not steps:
        return img
    lo, hi = float(min(values)), float(max(values))
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    s0, s1 = min(steps), max(max(steps), min(steps) + 1)
    pts = [
        (left + (s - s0) / (s1 - s0) * (right - left), bottom - (v - lo) / (hi - lo) * (bottom - top))
        for s, v in zip(steps, values)
    ]
    if len(pts) > 1:
        d.line(pts, fill=(40, 90, 200), width=2)
    for x, y in pts if len(pts) <= 12 else pts[-1:]:
        d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(40, 90, 200))
    d.text((2, top - 2), f"{hi:.3g}", fill=GREY, font=small)
    d.text((2, bottom - 10), f"{lo:.3g}", fill=GREY, font=small)
    d.text((left, bottom + 4), f"step {s0}", fill=GREY, font=small)
    d.text((right - 60, bottom + 4), f"step {max(steps)}", fill=GREY, font=small)
    d.text((right - 90, top + 4), f"last {values[-1]:.3f}", fill=BLACK, font=small)
    return img


def curves_image(rows: Sequence[dict], keys: Sequence[tuple[str, str]]) -> PIL.Image.Image:
    """rows: metrics.jsonl records; keys: (metric key, title) -> panels side by side."""
    panels = []
    for key, title in keys:
        pairs = [(r["step"], r[key]) for r in rows if key in r and np.isfinite(r[key])]
        panels.append(_panel(title, [p[0] for p in pairs], [p[1] for p in pairs]))
    out = PIL.Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)), "white")
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width
    return out


def grid_image(
    images: Sequence[np.ndarray],
    true_names: Sequence[str],
    pred_names: Sequence[str],
    columns: int = 6,
    cell: int = 112,
) -> PIL.Image.Image:
    """Images (uint8 HWC) with "true" / "pred" captions; green frame when right, red when wrong."""
    font = find_font(13, cjk=True)
    rows = -(-len(images) // columns)
    label_h = 36
    texts = [f"true: {t}" for t in true_names] + [f"pred: {p}" for p in pred_names]
    col_w = max([cell] + [int(font.getlength(t)) + 2 for t in texts])
    out = PIL.Image.new("RGB", (columns * (col_w + 10) + 8, rows * (cell + label_h + 8) + 8), "white")
    d = PIL.ImageDraw.Draw(out)
    for i, (im, t, p) in enumerate(zip(images, true_names, pred_names)):
        x, y = 8 + (i % columns) * (col_w + 10), 8 + (i // columns) * (cell + label_h + 8)
        pic = PIL.Image.fromarray(np.asarray(im, np.uint8)).resize((cell - 6, cell - 6), PIL.Image.Resampling.NEAREST)
        ok = t == p
        d.rectangle((x, y, x + cell - 1, y + cell - 1), fill=GREEN if ok else RED)
        out.paste(pic, (x + 3, y + 3))
        d.text((x, y + cell + 2), f"true: {t}", fill=BLACK, font=font)
        d.text((x, y + cell + 18), f"pred: {p}", fill=GREEN if ok else RED, font=font)
    return out


def _names(s: dict, font) -> list[str]:
    names = list(s["class_names"])
    if all(can_draw(font, n) for n in names):
        return names
    return list(s.get("class_names_en") or [f"class {i}" for i in range(len(names))])


def run_figure(
    rows: Sequence[dict], eval_sets: dict | None = None, predictions: dict | None = None, count: int = 18
) -> PIL.Image.Image:
    """Curves from metrics.jsonl ``rows`` above a grid of the first zero-shot set's first
    ``count`` images with their true and predicted classes (``predictions[set]``: class per image)."""
    zs = [n for n, s in (eval_sets or {}).items() if "class_texts" in s and n in (predictions or {})]
    keys = [("train/loss", "training loss")]
    keys += [(f"{zs[0]}/top1", f"zero-shot top-1 ({zs[0]})")] if zs else []
    keys += [(k, "retrieval mean recall") for k in ("retrieval/mean_recall",) if any(k in r for r in rows)]
    parts = [curves_image(rows, keys)]
    if zs:
        s, pred = eval_sets[zs[0]], np.asarray(predictions[zs[0]])
        names = _names(s, find_font(13, cjk=True))
        idx = [i for i in _spread(len(pred), count) if pred[i] >= 0]  # -1: an eval image that could not be read
        images = [np.asarray(s["images"][i]) if "images" in s else None for i in idx]
        if all(im is not None for im in images):
            parts.append(
                grid_image(images, [names[int(s["labels"][i])] for i in idx], [names[int(pred[i])] for i in idx])
            )
    width = max(p.width for p in parts)
    out = PIL.Image.new("RGB", (width, sum(p.height for p in parts)), "white")
    y = 0
    for p in parts:
        out.paste(p, (0, y))
        y += p.height
    return out


def _spread(n: int, count: int) -> list[int]:
    """count indices spread over range(n) (every class of a cycling eval set shows up)."""
    if n <= count:
        return list(range(n))
    return sorted({int(i) for i in np.linspace(0, n - 1, count).round()})
