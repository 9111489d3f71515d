"""What skipping bad images costs a zero-shot run: the same folder clean and with 1% bad files.

    .venv/bin/python bench/eval_bad_images.py [--images 400] [--repeats 3] [--batch-size 32]

A tiny random ViT (32 px) and a generated folder of PNGs (4 classes, mixed aspect ratios). The
"bad" copy replaces 1% of the files by zero-byte ones (a batch holding one is redone image by
image). Prints the median wall seconds of ``evaluation.zero_shot`` (after one untimed warm-up
that compiles) for each, and the ratio. The model work is tiny here, so the ratio is an upper
bound on the decoding overhead: on a real model the embedding dominates.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image

import chinese_clip_jax as ccj
from chinese_clip_jax import evaluation


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    tower = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    cfg = ccj.ChineseCLIPConfig.from_text_vision_configs(
        ccj.ChineseCLIPTextConfig(**tower), ccj.ChineseCLIPVisionConfig(**tower, image_size=32, patch_size=16), 16
    )
    model = ccj.ChineseCLIPModel(cfg)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 3, 32, 32)))
    clip = ccj.ChineseCLIP(model, params["params"])
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        clean, bad = Path(tmp) / "clean", Path(tmp) / "bad"
        for i in range(args.images):
            d = clean / f"c{i % 4}"
            d.mkdir(parents=True, exist_ok=True)
            image = rng.integers(0, 256, (48 + i % 17, 40 + i % 23, 3), np.uint8)
            PIL.Image.fromarray(image).save(d / f"{i}.png")
        shutil.copytree(clean, bad)
        broken = sorted(bad.rglob("*.png"))[::100][: max(1, args.images // 100)]
        for f in broken:
            f.write_bytes(b"")
        times = {}
        for name, root in (("clean", clean), ("1% bad", bad)):

            def run(root=root):
                return evaluation.zero_shot(
                    clip, f"folder:{root}", labels=["红", "绿", "蓝", "黄"], batch_size=args.batch_size, progress=False
                )

            res = run()
            seconds = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                run()
                seconds.append(time.perf_counter() - t0)
            times[name] = statistics.median(seconds)
            print(f"{name}: {times[name]:.2f} s median of {args.repeats}, {res.counts}")
        print(f"ratio bad/clean: {times['1% bad'] / times['clean']:.2f}")


if __name__ == "__main__":
    main()
