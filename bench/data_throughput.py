"""Samples/s of the training iterator (demo set and webdataset JPEG shards), per reader-thread count.

    python bench/data_throughput.py [--batch 256] [--batches 20] [--sizes 32,64] [--threads 0,1,2]

A script, not a test: timings on a shared machine are noisy. The webdataset case writes a
temporary shard of 1024 random 96x128 JPEGs with Chinese captions.
"""

from __future__ import annotations

import argparse
import io
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image

from chinese_clip_jax.data import default_data_config, train_iterator


def _write_shard(path: Path, n: int = 1024) -> None:
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            PIL.Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(buf, "JPEG")
            for name, data in ((f"{i:09d}.jpg", buf.getvalue()), (f"{i:09d}.txt", f"第{i}张图片".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _rate(cfg, batch: int, batches: int, image_size: int) -> float:
    it = train_iterator(cfg, global_batch_size=batch, seed=0, image_size=image_size,
                        process_index=0, process_count=1)
    next(it)  # warm-up: indexing, tokenizer load, first prefetch
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batch * batches / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--sizes", default="32,64")
    ap.add_argument("--threads", default="0,1,2")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "00000.tar"
        _write_shard(shard)
        print(f"{'source':<12}{'size':>6}{'threads':>9}{'samples/s':>12}")
        for name in ("demo", "webdataset"):
            for size in (int(s) for s in args.sizes.split(",")):
                for threads in (int(t) for t in args.threads.split(",")):
                    cfg = default_data_config(name)
                    cfg.num_threads = threads
                    cfg.webdataset.shards = str(shard)
                    rate = _rate(cfg, args.batch, args.batches, size)
                    print(f"{name:<12}{size:>6}{threads:>9}{rate:>12.0f}", flush=True)


if __name__ == "__main__":
    main()
