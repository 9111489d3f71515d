"""The corpus the ccj-serve tests search: a saved tiny random-weight model, a folder of small
coloured-shape images (plus a broken file), a caption file, and ccj-embed's output over them
(images with a faiss index, texts without), written through ccj-embed's Python entry."""

from __future__ import annotations

import numpy as np
import PIL.Image
import PIL.ImageDraw
from _train_helpers import random_params, tiny_config

import chinese_clip_jax as ccj
from chinese_clip_jax import embed

N_IMAGES = 300  # "a few hundred", as the done criterion
CAPTIONS = ["一只猫在沙发上", "红色的汽车", "海边的日落", "两只狗在草地上奔跑", "一碗热腾腾的面条", "", "雪山下的湖"]


def _picture(rng) -> PIL.Image.Image:
    w, h = (int(x) for x in rng.integers(40, 96, 2))
    img = PIL.Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = PIL.ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        box = (x0, y0, x0 + int(rng.integers(8, w)), y0 + int(rng.integers(8, h)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.integers(2) else draw.rectangle)(box, fill=colour)
    return img


def build(root) -> dict:
    """Writes everything under ``root``; returns the paths."""
    cfg = tiny_config(vocab_size=21128, max_positions=64, image_size=32, patch_size=8)
    ccj.save_pretrained(str(root / "model"), cfg, random_params(cfg))
    rng = np.random.default_rng(0)
    images = root / "images"
    for i in range(N_IMAGES):
        d = images / ("风景" if i % 2 else "animals")
        d.mkdir(parents=True, exist_ok=True)
        _picture(rng).save(d / (f"{i:03d}.png" if i % 3 else f"{i:03d}.jpg"))
    (images / "animals" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "captions.txt").write_text("\n".join(CAPTIONS) + "\n", encoding="utf-8")
    out = root / "emb"
    model, params = ccj.from_pretrained(str(root / "model"))
    opts = embed.EmbedOptions(shard_size=128, batch_size=64, dtype="float32", progress=False)
    name = str(root / "model")
    embed.embed_images(model, params, embed.open_images(f"folder:{images}"), out, model_name=name, options=opts)
    embed.build_index(out, "images")
    embed.embed_texts(model, params, embed.read_texts(str(root / "captions.txt")), out, model_name=name, options=opts)
    return {"model": root / "model", "images": images, "out": out, "captions": root / "captions.txt"}
