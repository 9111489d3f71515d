"""ccj-embed throughput: images/s of ``embed.embed_images`` over a folder of JPEGs, next to the
decode ceiling of the same input pipeline (grain, the same decoder, no model) measured in the
same run, and where the embedding run's time went (waiting for input vs model vs writing).

    python bench/embed_throughput.py                                    # ViT-B/16, 256 images
    python bench/embed_throughput.py --preset chinese-clip-vit-base-patch16 --images 512 --workers 1

Random weights of the preset's shapes (speed does not depend on the values). The images are
512x384 JPEGs of smooth content (realistic sizes), decoded and centre-cropped to the model's
resolution. A script, not a test: on a shared machine the figures are noisy; ``uptime`` is printed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import PIL.Image

import chinese_clip_jax as ccj
from chinese_clip_jax import embed
from chinese_clip_jax.embed import runner
from chinese_clip_jax.inference import encoding


def _write_images(root: Path, n: int, shape=(384, 512)) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (shape[0] // 16, shape[1] // 16, 3), dtype=np.uint8)
    for i in range(n):
        small = np.roll(base, i, axis=1) ^ np.uint8(i % 256)
        img = PIL.Image.fromarray(small).resize((shape[1], shape[0]), PIL.Image.Resampling.BICUBIC)
        img.save(root / f"{i:06d}.jpg", quality=90)


def _random_params(model, seed: int = 0):
    import flax.linen as nn
    import jax.numpy as jnp

    r = model.config.vision_config.image_size
    shapes = nn.unbox(
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 3, r, r)))["params"]
    )
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: 0.02 * rng.standard_normal(s.shape).astype(np.float32), shapes)


def decode_ceiling(corpus, image_size: int, options) -> float:
    """Images/s of the input pipeline alone (after its first batch)."""
    spans = [(s, min(len(corpus), s + options.batch_size)) for s in range(0, len(corpus), options.batch_size)]
    it = runner._decoded_batches(corpus, spans, image_size, options)
    next(it)
    start = time.perf_counter()
    n = sum(len(b["ids"]) for b in it)
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="chinese-clip-vit-base-patch16")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    cfg = ccj.ChineseCLIPConfig.preset(args.preset)
    model = ccj.ChineseCLIPModel(cfg)
    params = _random_params(model)
    r = cfg.vision_config.image_size
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        _write_images(root / "images", args.images)
        corpus = embed.open_images(f"folder:{root / 'images'}")
        options = embed.EmbedOptions(
            shard_size=args.images,
            batch_size=args.batch_size,
            workers=args.workers,
            threads=args.threads,
            progress=False,
        )
        ceiling = decode_ceiling(corpus, r, options)
        # warm-up: compile the encoder's buckets on a first run, then time a fresh run
        warm = embed.open_images(f"list:{_list(root, args.batch_size)}")
        enc = encoding.Encoder(model, params, batch_size=args.batch_size)
        embed.embed_images(model, None, warm, root / "warm", model_name=args.preset, options=options, encoder=enc)
        rep = embed.embed_images(
            model, None, corpus, root / "out", model_name=args.preset, options=options, encoder=enc
        )
    devices = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    print(f"jax {jax.__version__}, {devices}, {os.cpu_count()} CPUs; {args.preset} at {r} px, random weights")
    print(f"{args.images} JPEGs 512x384, batch {args.batch_size}, workers {args.workers}, threads {args.threads}")
    print(f"decode ceiling (input pipeline alone): {ceiling:.1f} images/s")
    print(f"ccj-embed: {rep.line()} (image tower compiled {enc.trace_counts['image']}x, warm-up included)")
    print(
        f"| {args.preset} | {args.images} | {args.batch_size} | {args.workers} | {rep.rate:.1f} | {ceiling:.1f} | "
        f"{rep.input_s:.1f} / {rep.model_s:.1f} / {rep.write_s:.1f} |"
    )


def _list(root: Path, n: int) -> Path:
    """A list file of the first ``n`` images (the warm-up corpus: same shapes, another manifest)."""
    f = root / "warm.txt"
    f.write_text("\n".join(f"images/{i:06d}.jpg" for i in range(n)) + "\n")
    return f


if __name__ == "__main__":
    main()
