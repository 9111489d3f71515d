"""The largest train batch that fits one device, per size and remat policy, and its speed.

    python bench/max_batch.py [--sizes base-patch16,large-patch14] [--remats none,dots,full]
    python bench/max_batch.py --smoke --capacity-gib 0.5      # tiny config on CPU (the test's mode)

Per (size, policy): the train step of ``bench/device.py`` (bf16 compute, fp32 params, scan
layers) is compiled at ``--probe-batch`` pairs; XLA's ``memory_analysis()`` gives its temporaries
and arguments. Temporaries grow with the batch, arguments (params + AdamW moments) do not, so
``temp / probe`` pairs per byte is an upper bound of the per-pair slope (the fixed part is
counted as if it grew) and the prediction is conservative:

    max batch = (capacity * --headroom - arguments - outputs not aliased) / (temp / probe)

rounded down to a multiple of ``--multiple``. That batch is then compiled and run
(``device.run_size``): pairs/s, MFU, the device's peak memory; if it runs out of memory the
batch shrinks by 15% (up to twice). Capacity: the device's ``bytes_limit`` (``--capacity-gib``
overrides; CPU has none). The last table line names the policy with the best pairs/s per size.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from device import SIZES, fmt_row, host_batch, peak_flops, run_size, smoke_config  # noqa: E402

import chinese_clip_jax as ccj  # noqa: E402
from chinese_clip_jax import sharding as shd  # noqa: E402
from chinese_clip_jax.training import create_train_state, make_optimizer, make_train_step  # noqa: E402
from chinese_clip_jax.training.recipes.base import get_config as base_config  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="base-patch16,large-patch14")
    p.add_argument("--remats", default="none,dots,full")
    p.add_argument("--impl", default="xla", help="attention implementation")
    p.add_argument("--probe-batch", type=int, default=64, help="pairs per device of the probe compile")
    p.add_argument("--multiple", type=int, default=32, help="round the batch down to a multiple of this")
    p.add_argument("--headroom", type=float, default=0.92, help="fraction of the capacity to plan for")
    p.add_argument("--capacity-gib", type=float, default=0.0, help="device memory (0: the device's bytes_limit)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=0.0)
    p.add_argument("--budget-s", type=float, default=240.0, help="start no new size/policy after this many seconds")
    p.add_argument("--smoke", action="store_true")
    return p.parse_args(argv)


def probe(cfg, remat: str, impl: str | None, mesh, batch: int) -> dict:
    """Bytes of the train step compiled at ``batch`` pairs per device (XLA's memory_analysis)."""
    model = ccj.ChineseCLIPModel(cfg, dtype=jnp.bfloat16, attention_impl=impl, scan_layers=True, remat=remat)
    opt = base_config().optimizer  # the trainer's defaults (train/configs/base.py)
    opt.update(lr=1e-4, warmup_steps=10)
    tx, schedule = make_optimizer(opt, total_steps=1000)
    state, shardings = create_train_state(model, tx, mesh, seed=0)
    step = make_train_step(model, tx, schedule, mesh, shardings)
    b = shd.shard_batch(host_batch(cfg, batch * mesh.devices.size), mesh)
    with shd.use_mesh_and_rules(mesh):
        m = step.lower(state, b).compile().memory_analysis()
    return dict(
        temp=m.temp_size_in_bytes, args=m.argument_size_in_bytes, out=m.output_size_in_bytes - m.alias_size_in_bytes
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    if args.smoke:
        sizes = {"smoke": smoke_config()}
        args.probe_batch, args.multiple, args.steps, args.repeats = 4, 2, 1, 1
    else:
        sizes = {s: ccj.ChineseCLIPConfig.preset(SIZES[s]) for s in args.sizes.split(",")}
    devices = jax.local_devices()
    mesh = shd.make_mesh(devices=devices)
    stats = devices[0].memory_stats() or {}
    capacity = args.capacity_gib * 2**30 or stats.get("bytes_limit")
    if not capacity:
        raise SystemExit("this device reports no bytes_limit: pass --capacity-gib")
    peak, _ = peak_flops(devices[0], args.peak_tflops)
    print(
        f"# {devices[0].device_kind}: capacity {capacity / 2**30:.1f} GiB, headroom {args.headroom}, "
        f"probe {args.probe_batch} pairs/device, attention {args.impl}, scan layers",
        flush=True,
    )
    print(
        f"{'size':<14}{'remat':<6}{'temp/pair MiB':>14}{'fixed GiB':>10}{'batch':>7}{'compile s':>10}{'ms/call':>10}"
        f"{'samples/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>10}",
        flush=True,
    )
    best = {}
    for name, cfg in sizes.items():
        for remat in args.remats.split(","):
            if time.perf_counter() - start > args.budget_s:
                print(f"# {name}/{remat}: skipped, past --budget-s {args.budget_s:.0f}")
                continue
            try:
                m = probe(cfg, remat, args.impl or None, mesh, args.probe_batch)
            except Exception as e:
                print(f"# {name}/{remat}: probe failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
                continue
            per_pair = m["temp"] / args.probe_batch
            fixed = m["args"] + m["out"]
            batch = int((capacity * args.headroom - fixed) // per_pair) // args.multiple * args.multiple
            row = None
            for _ in range(3):
                if batch < args.multiple:
                    break
                run_args = argparse.Namespace(
                    train_batch=batch, infer_batch=0, programs="train", steps=args.steps, repeats=args.repeats
                )
                combo = dict(impl=args.impl or None, layout="scan", rng_impl="threefry", remat=remat)
                try:
                    row = run_size(name, cfg, combo, run_args, mesh, peak)[0]
                    break
                except Exception as e:  # out of memory after all: 15% smaller
                    print(f"# {name}/{remat} x{batch}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                    batch = int(batch * 0.85) // args.multiple * args.multiple
            head = f"{name:<14}{remat:<6}{per_pair / 2**20:>14.1f}{fixed / 2**30:>10.2f}{batch:>7}"
            if row is None:
                print(head + "   did not run", flush=True)
                continue
            print(head + fmt_row(row), flush=True)
            if name not in best or row["rate"] > best[name][1]:
                best[name] = (f"remat={remat} x{batch}", row["rate"])
    for name, (what, rate) in best.items():
        print(f"# best {name}: {what}, {rate:.0f} pairs/s per device")
    print(f"# total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
