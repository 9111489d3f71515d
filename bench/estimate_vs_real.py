"""The compile-only peak estimate against the device's real peak, for the trainer's own step.

    python bench/estimate_vs_real.py --sizes base-patch16,large-patch14 --batch 256   # on a GPU / TPU
    python bench/estimate_vs_real.py --smoke                                          # tiny, on CPU

Per size: the step ``ccj-train`` runs on this device's platform is compiled once
(``chinese_clip_jax.training.compile.compile_step`` over the attached devices: the same figures
``--compile-only`` prints for this hardware), then run ``--steps`` times on zero-filled state and
batch (the memory does not depend on the values); the device's ``peak_bytes_in_use`` is the real
peak. Prints one table row per size: estimate, real, real / estimate. On CPU (no memory stats)
the real column is "n/a".
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from chinese_clip_jax import sharding as shd
from chinese_clip_jax.training import compile as aot
from chinese_clip_jax.training import targets
from chinese_clip_jax.training.defaults import current_platform
from chinese_clip_jax.training.recipes import base, demo

SIZES = {"base-patch16": "chinese-clip-vit-base-patch16", "large-patch14": "chinese-clip-vit-large-patch14"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="base-patch16,large-patch14")
    p.add_argument("--batch", type=int, default=256, help="global batch")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="the demo config on CPU")
    return p.parse_args(argv)


def measure(config, platform: str, steps: int) -> tuple[aot.CompileReport, int | None, float]:
    devices = jax.devices()
    stats = devices[0].memory_stats() or {}
    target = targets.Target("attached", platform, devices, int(stats.get("bytes_limit", 0)), devices[0].device_kind)
    report = aot.compile_step(config, target)
    step, state, batch, mesh, *_ = aot.build_step(config, platform, devices)
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype, device=a.sharding), (state, batch))
    state, batch = zeros
    t0 = time.perf_counter()
    with shd.use_mesh_and_rules(mesh):
        for _ in range(max(1, steps)):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
    seconds = time.perf_counter() - t0
    peak = (devices[0].memory_stats() or {}).get("peak_bytes_in_use")
    return report, peak, seconds


def main(argv=None) -> None:
    args = parse_args(argv)
    platform = current_platform()
    print(f"# {jax.devices()[0].device_kind} x {jax.device_count()}, jax {jax.__version__}")
    print("| size | global batch | estimate GiB | real peak GiB | real / estimate | run s |")
    print("|---|---|---|---|---|---|")
    for size in ["smoke"] if args.smoke else args.sizes.split(","):
        c = demo.get_config() if args.smoke else base.get_config()
        if not args.smoke:
            c.model.preset = SIZES[size]
        c.batch_size = args.batch if not args.smoke else 16
        report, peak, seconds = measure(c, platform, args.steps)
        est = report.peak_bytes / targets.GiB
        real = f"{peak / targets.GiB:.2f}" if peak else "n/a"
        ratio = f"{peak / report.peak_bytes:.3f}" if peak else "n/a"
        print(f"| {size} | {c.batch_size} | {est:.2f} | {real} | {ratio} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
