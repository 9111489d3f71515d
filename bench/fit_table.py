"""The largest batch per device that fits, per published size x accelerator x run option, compiled
for the accelerator on this host (``chinese_clip_jax.training.compile.search_max_batch``).

    python bench/fit_table.py --out bench/results/fit_table.md
    python bench/fit_table.py --sizes base-patch16 --targets h100:1 --variants default,remat=dots

Each row: ``--targets`` (TPU topology or GPU:N), ``--variants`` of the trainer's base config
(``default``: the platform's run options; ``remat=dots`` / ``remat=full``; ``fsdp``: params and
optimizer state sharded over every device; ``KEY=VALUE``: any config override), each searched
with ``--max-compiles`` compiles: the first at ``--start`` rows per device (default: a per-size
guess; the next variant of the same size and target starts where the previous one ended), then
where a line through the measured peaks puts the limit. The row gives the largest batch that
compiled and fitted and, where one was compiled, the smallest that did not: the bracket the
search ended on. A row is appended to ``--out`` as soon as it is known, so an interrupted run
keeps what it measured.
Needs ``[tpu-compile]`` for TPU targets, ``[cuda-compile]`` for GPU ones.
"""

from __future__ import annotations

import argparse
import ast
import os
import platform
import time

import jax

from chinese_clip_jax.training import compile as aot
from chinese_clip_jax.training import targets
from chinese_clip_jax.training.recipes import base

# rows per device of a row's first compile when --start is 0: near the limit of a 16 GiB chip
FIRST_GUESS = {"base-patch16": 128, "large-patch14": 32, "large-patch14-336px": 16, "huge-patch14": 16}
SIZES = {
    "base-patch16": "chinese-clip-vit-base-patch16",
    "large-patch14": "chinese-clip-vit-large-patch14",
    "large-patch14-336px": "chinese-clip-vit-large-patch14-336px",
    "huge-patch14": "chinese-clip-vit-huge-patch14",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=",".join(SIZES))
    p.add_argument("--targets", default="h100:1,v5e:2x2,v5p:2x2x1")
    p.add_argument("--variants", default="default,remat=dots,fsdp")
    p.add_argument("--start", type=int, default=0, help="rows per device of the first compile (0: per size)")
    p.add_argument("--max-compiles", type=int, default=3)
    p.add_argument("--out", default="", help="append markdown rows here")
    return p.parse_args(argv)


def variant_config(size: str, variant: str, devices: int, start: int):
    c = base.get_config()
    c.model.preset = SIZES[size]
    c.batch_size = start * devices
    if variant == "fsdp":
        c.mesh.update(data=1, fsdp=-1, tensor=1)
    elif variant != "default":
        key, _, raw = variant.partition("=")
        key = {"remat": "model.remat", "attention": "model.attention_impl"}.get(key, key)
        node, *rest = key.split(".")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        if rest:
            c[node][rest[0]] = value
        else:
            c[node] = value
    return c


def main(argv=None) -> None:
    args = parse_args(argv)
    header = (
        "| size | target | variant | largest batch per device found | peak / usable GiB | compiles | s |\n"
        "|---|---|---|---|---|---|---|"
    )
    print(f"# jax {jax.__version__}, host {platform.node()}; compiled on CPU for each target")
    print(header)
    if args.out and not os.path.exists(args.out):
        with open(args.out, "w") as f:
            f.write(header + "\n")
    for target_text in args.targets.split(","):
        target = targets.open_target(target_text)
        n = len(target.devices)
        for size in args.sizes.split(","):
            start = args.start or FIRST_GUESS[size]
            for variant in args.variants.split(","):
                config = variant_config(size, variant, n, start)
                t0 = time.perf_counter()
                try:
                    best, tried = aot.search_max_batch(
                        config, target, max_compiles=args.max_compiles, log=lambda line: print("  " + line)
                    )
                except Exception as e:  # noqa: BLE001 - one row's failure is a row, not the end
                    row = f"| {size} | {target_text} | {variant} | error: {str(e).splitlines()[0][:80]} | | | |"
                else:
                    shards = tried[0].mesh["data"] * tried[0].mesh["fsdp"]
                    if best and not args.start:
                        start = best.batch_size // shards
                    misses = [r.batch_size // shards for r in tried if not r.fits]
                    low, gib = tried[0], targets.GiB  # the smallest batch compiled
                    per_device = (
                        f"{best.batch_size // shards}"
                        if best
                        else f"none fits ({low.batch_size // shards} rows need {low.peak_bytes / gib:.1f} GiB; "
                        f"params + optimizer state alone {low.state_bytes / gib:.1f})"
                    )
                    if misses and best:  # the bracket the search ended on
                        per_device += f" ({min(misses)} does not fit)"
                    peak = (
                        f"{best.peak_bytes / targets.GiB:.1f} / {best.usable_bytes / targets.GiB:.1f}" if best else ""
                    )
                    row = (
                        f"| {size} | {target_text} | {variant} | {per_device} | {peak} | {len(tried)} | "
                        f"{time.perf_counter() - t0:.0f} |"
                    )
                print(row, flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(row + "\n")


if __name__ == "__main__":
    main()
