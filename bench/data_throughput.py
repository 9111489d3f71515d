"""Input-pipeline throughput: images/s of the training iterator, per source, reader threads and
grain worker processes, and the demo source against the CPU train loop.

    python bench/data_throughput.py                      # all three tables below
    python bench/data_throughput.py --only workers --workers 0,1,2 --batches 10
    python bench/data_throughput.py --only demo --train-steps 30

Tables:
  threads  demo and webdataset sources (96x128 JPEGs), per reader-thread count (as before);
  workers  a TFDS/ArrayRecord dir of 512x512 JPEGs (built with chinese_clip_jax.data.build)
           decoded and random-resized-cropped to --image-size (224) in 0, 1, 2 grain worker
           processes: images/s, images/s per worker and the 1 -> 2 worker scaling;
  demo     the demo source's data-only rate vs the demo config's CPU train loop (fed one fixed
           batch, so it measures the step alone): the ratio must stay >= 5.
A script, not a test: on a shared machine the figures are noisy; ``uptime`` is printed with them.
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image

from chinese_clip_jax.data import default_data_config, train_iterator


def _write_shard(path: Path, n: int, shape=(96, 128)) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (shape[0] // 8, shape[1] // 8, 3), dtype=np.uint8)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            # smooth photo-like content (upsampled noise), so JPEG sizes are realistic (~30-60 KB at 512 px)
            small = np.roll(base, i, axis=1) ^ np.uint8(i % 256)
            img = PIL.Image.fromarray(small).resize((shape[1], shape[0]), PIL.Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=90)
            for name, data in ((f"{i:09d}.jpg", buf.getvalue()), (f"{i:09d}.txt", f"第{i}张图片".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _rate(cfg, batch: int, batches: int, image_size: int, main_cpu: list | None = None) -> float:
    """Samples/s of the iterator after two warm-up batches (indexing, tokenizer load, workers
    starting, first prefetch); ``main_cpu`` gets this process's CPU seconds per sample."""
    it = train_iterator(cfg, global_batch_size=batch, seed=0, image_size=image_size, process_index=0, process_count=1)
    next(it), next(it)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    rate = batch * batches / (time.perf_counter() - start)
    if main_cpu is not None:
        main_cpu.append((time.process_time() - cpu) / (batch * batches))
    it.close()
    return rate


def threads_table(args, tmp: Path) -> None:
    shard = tmp / "small.tar"
    _write_shard(shard, 1024)
    print(f"\n{'source':<12}{'size':>6}{'threads':>9}{'samples/s':>12}")
    for name in ("demo", "webdataset"):
        for size in (int(s) for s in args.sizes.split(",")):
            for threads in (int(t) for t in args.threads.split(",")):
                cfg = default_data_config(name)
                cfg.num_threads = threads
                cfg.webdataset.shards = str(shard)
                print(f"{name:<12}{size:>6}{threads:>9}{_rate(cfg, args.batch, args.batches, size):>12.0f}", flush=True)


def workers_table(args, tmp: Path) -> None:
    from chinese_clip_jax.data.build import build

    shard = tmp / "big.tar"
    _write_shard(shard, args.images, shape=(512, 512))
    build(str(shard), str(tmp / "tfds"), fmt="webdataset", split="train", progress=False)
    # CPU time per image in this process (read + decode + crop, uint8 out, as the workers do;
    # the device normalises): what one free core sustains, the figure least disturbed by other
    # load on a shared machine
    from chinese_clip_jax.data.pipeline import ImageDecoder
    from chinese_clip_jax.data.tfds_source import TfdsSource

    cfg = default_data_config("tfds")
    cfg.tfds.builder_dir = str(tmp / "tfds")
    source, decode, rng = (
        TfdsSource(cfg.tfds, "train"),
        ImageDecoder(args.image_size, args.crop, args.jpeg_draft, uint8=True),
        np.random.default_rng(0),
    )
    n = min(len(source), 200)
    cpu = time.process_time()
    for i in range(n):
        decode(source[i]["image"], rng)
    per_image = (time.process_time() - cpu) / n
    print(
        f"\nCPU time per 512x512 JPEG -> {args.image_size} px ({args.crop}, jpeg_draft={args.jpeg_draft}): "
        f"{per_image * 1e3:.2f} ms "
        f"= {1 / per_image:.0f} images/s per free core"
    )
    print(f"\nTFDS, 512x512 JPEGs -> {args.image_size} px, crop {args.crop}, batch {args.batch}")
    print(f"{'workers':>8}{'images/s':>10}{'per worker':>12}{'trainer CPU/image':>19}")
    rates = {}
    for workers in (int(w) for w in args.workers.split(",")):
        cfg = default_data_config("tfds")
        cfg.tfds.builder_dir = str(tmp / "tfds")
        cfg.worker_count, cfg.num_threads, cfg.train_crop = workers, 1 if workers else 2, args.crop
        cfg.jpeg_draft = args.jpeg_draft
        main_cpu: list = []
        rates[workers] = _rate(cfg, args.batch, args.batches, args.image_size, main_cpu)
        per = rates[workers] / workers if workers else float("nan")
        print(f"{workers:>8}{rates[workers]:>10.0f}{per:>12.0f}{main_cpu[0] * 1e3:>16.2f} ms", flush=True)
    if 1 in rates and 2 in rates:
        print(f"scaling 1 -> 2 workers: {rates[2] / rates[1]:.2f}x")


def demo_table(args) -> None:
    import jax

    from chinese_clip_jax.training.loop import train
    from chinese_clip_jax.training.recipes import demo

    c = demo.get_config()
    # the source alone (draw + render + caption), CPU time in this thread: what the pipeline adds
    # on top is the data-only rate's remainder
    from chinese_clip_jax.data.demo import DemoSource

    d = c.data.demo
    source = DemoSource(image_size=c.model.vision.image_size, num_train=d.num_train, seed=d.demo_seed)
    for i in range(2000):  # warm the renderer's caches
        source[i]
    cpu = time.process_time()
    for i in range(2000, 7000):
        source[i]
    per_sample = (time.process_time() - cpu) / 5000
    print(f"\ndemo source alone: {per_sample * 1e6:.1f} us CPU per sample = {1 / per_sample:.0f} samples/s per core")
    data_rate = _rate(c.data, c.batch_size, args.batches, c.model.vision.image_size)
    it = train_iterator(
        c.data,
        global_batch_size=c.batch_size,
        seed=0,
        image_size=c.model.vision.image_size,
        context_length=c.context_length,
        process_index=0,
        process_count=1,
    )
    batch = next(it)
    it.close()

    class Fixed:  # the step alone: no data work in the loop
        stats: dict = {}

        def __iter__(self):
            return self

        def __next__(self):
            return batch

        def get_state(self):
            return {}

        def set_state(self, state):
            pass

    c.total_steps, c.eval_every, c.checkpoint_every, c.export_hf = args.train_steps, 0, 10**9, False
    with tempfile.TemporaryDirectory() as work:
        result = train(c, work, data_iter=Fixed(), progress=False)
    step_rate = result["samples_per_sec"]
    print(
        f"\ndemo config on {jax.devices()[0].platform}: data-only {data_rate:.0f} samples/s, "
        f"train loop (fixed batch) {step_rate:.0f} samples/s, ratio {data_rate / step_rate:.1f}x (target >= 5x)"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=("threads", "workers", "demo"), default=None)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--sizes", default="32,64")
    ap.add_argument("--threads", default="0,1,2")
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--images", type=int, default=512, help="512x512 JPEGs in the TFDS set")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--crop", default="random_resized", choices=("center", "random_resized", "squash"))
    ap.add_argument("--jpeg-draft", action="store_true", help="data.jpeg_draft=True (reduced-scale JPEG decode)")
    ap.add_argument("--train-steps", type=int, default=30)
    args = ap.parse_args()
    print(f"uptime: {os.popen('uptime').read().strip()}  (cpus: {os.cpu_count()})")
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "threads"):
            threads_table(args, Path(tmp))
        if args.only in (None, "workers"):
            workers_table(args, Path(tmp))
    if args.only in (None, "demo"):
        demo_table(args)


if __name__ == "__main__":
    main()
