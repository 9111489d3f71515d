"""Image preprocessing throughput: ours vs transformers' ChineseCLIPImageProcessor (PIL backend).

    .venv/bin/python bench/preprocess.py --num-images 200

Writes --num-images synthetic 640x480 JPEGs to a temporary directory, then times, from the
file paths (decode included) to float32 NCHW pixel_values: transformers' processor, ours in one
thread, ours with --threads threads. Checks that the outputs agree. Prints images/s (best of
--repeats runs). A benchmark script, not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import PIL.Image


def make_jpegs(directory: str, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        coarse = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
        img = np.asarray(PIL.Image.fromarray(coarse).resize((640, 480), PIL.Image.Resampling.BICUBIC))
        img = np.clip(img.astype(np.int16) + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
        path = os.path.join(directory, f"{i:05d}.jpg")
        PIL.Image.fromarray(img).save(path, quality=90)
        paths.append(path)
    return paths


def best_rate(fn, paths, repeats: int, batch: int) -> tuple[float, np.ndarray]:
    best, first = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = [fn(paths[i : i + batch]) for i in range(0, len(paths), batch)]
        best = min(best, time.perf_counter() - t0)
        first = outs if first is None else first
    return len(paths) / best, np.concatenate(first)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-images", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32, help="images per processor call")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from transformers import ChineseCLIPImageProcessorPil

    from chinese_clip_jax.processing import ChineseCLIPProcessor

    hf = ChineseCLIPImageProcessorPil()
    ours_1 = ChineseCLIPProcessor(num_threads=1)
    ours_n = ChineseCLIPProcessor(num_threads=args.threads)
    with tempfile.TemporaryDirectory() as d:
        paths = make_jpegs(d, args.num_images)
        rows = []
        hf_rate, ref = best_rate(lambda p: hf(p, return_tensors="np")["pixel_values"], paths, args.repeats, args.batch)
        rows.append(("transformers ChineseCLIPImageProcessorPil", hf_rate, 0.0))
        for name, proc in (
            ("chinese_clip_jax, 1 thread", ours_1),
            (f"chinese_clip_jax, {args.threads} threads", ours_n),
        ):
            rate, out = best_rate(proc.preprocess_images, paths, args.repeats, args.batch)
            rows.append((name, rate, float(np.abs(out - ref).max())))
    print(
        f"{args.num_images} JPEGs 640x480 -> (3, 224, 224) float32, batch {args.batch}, "
        f"{os.cpu_count()} CPUs, best of {args.repeats}"
    )
    for name, rate, err in rows:
        print(f"  {name:45s} {rate:8.1f} images/s  ({rate / hf_rate:4.2f}x)  max |diff| {err:.2e}")


if __name__ == "__main__":
    main()
