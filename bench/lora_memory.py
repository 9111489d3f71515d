"""LoRA vs full fine-tuning: train-step memory and speed, side by side (CPU fp32 by default).

    .venv/bin/python bench/lora_memory.py [--preset chinese-clip-vit-base-patch16] [--batch 8] [--steps 3]
        [--variants full,lora:4,lora:8,last:2]
    .venv/bin/python bench/lora_memory.py --tiny     # tiny config, seconds (smoke)

Each variant runs in its own process: random-init ``ChineseCLIPModel`` of the preset (scanned
layers, remat "dots": the CPU defaults; ``last:N`` needs unrolled layers and runs them), AdamW
with the trainer's defaults, the trainer's ``make_train_step`` (donated state) on a 1-device
mesh, ``--batch`` pairs with 52-token texts. Variants: ``full`` (every weight trains),
``lora:R`` (rank-R adapters on attention + MLP of both towers, alpha 16, base frozen),
``last:N`` (the last N layers of each tower and the heads train, the rest frozen). Reported:

* ``trainable``: trained parameters (and their share of the total);
* ``state MiB``: params + optimizer state as held on the device (what a checkpoint holds);
* ``temp MiB``: the temporaries XLA plans for one step (``compiled.memory_analysis()``:
  activations kept for the backward pass, gradients, merged LoRA kernels, scratch);
* ``step s``: median wall time of ``--steps`` steps after a warm-up step;
* ``peak MiB``: the process's peak RSS (VmHWM) over those steps, reset after the warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = "full,lora:4,lora:8,last:2"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default=VARIANTS, help=f"comma list (default {VARIANTS})")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    p.add_argument("--batch", type=int, default=8, help="image-text pairs per step")
    p.add_argument("--preset", default="chinese-clip-vit-base-patch16")
    p.add_argument("--tiny", action="store_true", help="tiny config (smoke test)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def parse_variant(v: str) -> tuple[str, int]:
    kind, _, n = v.partition(":")
    if kind == "full" and not n:
        return kind, 0
    if kind in ("lora", "last") and n.isdigit():
        return kind, int(n)
    raise SystemExit(f"bad variant {v!r}: expected full, lora:RANK or last:N")


def worker(args) -> None:
    import jax
    import numpy as np
    from compare_torch import base_config, bench_config

    import chinese_clip_jax as ccj
    from chinese_clip_jax import sharding as shd
    from chinese_clip_jax.modeling.lora import count_params
    from chinese_clip_jax.training import create_train_state, make_optimizer, make_train_step
    from chinese_clip_jax.training.optim import label_count, trainable_labels

    kind, n = parse_variant(args.worker)
    cfg = bench_config(True) if args.tiny else ccj.ChineseCLIPConfig.preset(args.preset)
    model = ccj.ChineseCLIPModel(cfg, scan_layers=kind != "last", remat="dots" if kind != "last" else "none")
    unfreeze = {"text": n, "image": n} if kind == "last" else None
    lora = dict(rank=n, alpha=16.0, towers=("text", "image"), targets=("attention", "mlp")) if kind == "lora" else None
    mesh = shd.make_mesh(devices=jax.devices()[:1])
    opt = base_config().optimizer
    opt.update(lr=1e-5, warmup_steps=10)
    tx, schedule = make_optimizer(opt, total_steps=1000, unfreeze_last_layers=unfreeze)
    state, shardings = create_train_state(model, tx, mesh, seed=0, lora=lora)
    step = make_train_step(model, tx, schedule, mesh, shardings, unfreeze_last_layers=unfreeze)
    trainable, total = label_count(state.params, trainable_labels(state.params, None, unfreeze))
    state_bytes = 4 * (count_params(state.params) + count_params(state.opt_state))
    rng = np.random.default_rng(0)
    b, seq, r = args.batch, 52, cfg.vision_config.image_size
    lengths = rng.integers(4, seq + 1, b)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
    batch = shd.shard_batch(
        {
            "input_ids": (rng.integers(106, cfg.text_config.vocab_size, (b, seq)) * mask).astype(np.int32),
            "attention_mask": mask,
            "pixel_values": rng.standard_normal((b, 3, r, r)).astype(np.float32),
        },
        mesh,
    )
    with shd.use_mesh_and_rules(mesh):
        temp = step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
        state, metrics = step(state, batch)
        metrics["loss"].block_until_ready()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            state, metrics = step(state, batch)
            metrics["loss"].block_until_ready()
            times.append(time.perf_counter() - t)
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    out = {"trainable": trainable, "total": total, "state": state_bytes, "temp": temp, "s": statistics.median(times)}
    print("@@" + json.dumps({**out, "mib": hwm, "loss": float(metrics["loss"])}))


def main(argv=None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # compare_torch's helpers
    if args.worker:
        return worker(args)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        parse_variant(v)
    print(
        f"# {'tiny config' if args.tiny else args.preset}, fp32, batch {args.batch}, {args.steps} timed steps, "
        f"cores {len(os.sched_getaffinity(0))}, load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    head = f"{'variant':<10}{'trainable':>22}{'state MiB':>11}{'temp MiB':>10}{'step s':>9}{'peak MiB':>10}{'loss':>9}"
    print(head, flush=True)
    for v in variants:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", v, "--steps", str(args.steps)]
        cmd += ["--batch", str(args.batch), "--preset", args.preset] + ["--tiny"] * args.tiny
        res = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in res.stdout.splitlines() if line.startswith("@@")]
        if res.returncode or not lines:
            raise SystemExit(f"variant {v} failed (exit {res.returncode}):\n{res.stderr[-2000:]}")
        r = json.loads(lines[-1][2:])
        share = f"{r['trainable']:,} ({100 * r['trainable'] / r['total']:.2f}%)"
        print(
            f"{v:<10}{share:>22}{r['state'] / 2**20:>11.0f}{r['temp'] / 2**20:>10.1f}{r['s']:>9.2f}"
            f"{r['mib']:>10.0f}{r['loss']:>9.4f}",
            flush=True,
        )
    print(f"# load at the end {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
