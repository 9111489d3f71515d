"""Train-step memory and speed per layer layout and remat policy (CPU fp32, base-patch16).

    .venv/bin/python bench/train_memory.py [--steps 3] [--batch 16] [--variants unrolled:none,scan:dots]
    .venv/bin/python bench/train_memory.py --tiny     # tiny config, seconds (what the tests run)

Each variant (``LAYOUT:REMAT``, LAYOUT ``unrolled`` or ``scan``, REMAT ``none``, ``dots`` or
``full``) runs in its own process: random-init ``ChineseCLIPModel`` of the preset, AdamW, the
trainer's ``make_train_step`` (donated state) on a 1-device mesh, ``--batch`` pairs with
52-token texts. Reported per variant:

* ``temp MiB``: the temporaries XLA plans for one step (``compiled.memory_analysis()``: the
  activations kept for the backward pass, the gradients and scratch), a property of the compiled
  program, the same on every run;
* ``step s``: median wall time of ``--steps`` steps after a warm-up step;
* ``peak MiB``: the process's peak RSS (VmHWM) over those steps, reset after the warm-up
  (params and AdamW moments included: 2.1 GiB for base-patch16).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = "unrolled:none,unrolled:full,scan:none,scan:full,scan:dots"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default=VARIANTS, help=f"comma list of LAYOUT:REMAT (default {VARIANTS})")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    p.add_argument("--batch", type=int, default=16, help="image-text pairs per step")
    p.add_argument("--preset", default="chinese-clip-vit-base-patch16")
    p.add_argument("--tiny", action="store_true", help="tiny config (smoke test)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def parse_variant(v: str) -> tuple[bool, str]:
    layout, _, remat = v.partition(":")
    if layout not in ("unrolled", "scan") or remat not in ("none", "dots", "full"):
        raise SystemExit(f"bad variant {v!r}: expected LAYOUT:REMAT with LAYOUT unrolled|scan, REMAT none|dots|full")
    return layout == "scan", remat


def model_config(args):
    from compare_torch import bench_config

    import chinese_clip_jax as ccj

    return bench_config(True) if args.tiny else ccj.ChineseCLIPConfig.preset(args.preset)


def worker(args) -> None:
    import warnings

    import numpy as np
    from compare_torch import jax_train_setup

    import chinese_clip_jax as ccj
    from chinese_clip_jax import sharding as shd

    warnings.simplefilter("ignore", UserWarning)  # unrolled remat on CPU warns; measuring that is the point
    scan, remat = parse_variant(args.worker)
    cfg = model_config(args)
    model = ccj.ChineseCLIPModel(cfg, scan_layers=scan, remat=remat)
    rng = np.random.default_rng(0)
    b, seq, r = args.batch, 52, cfg.vision_config.image_size
    lengths = rng.integers(4, seq + 1, b)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
    step, state, batch, mesh = jax_train_setup(
        model,
        {
            "input_ids": (rng.integers(106, cfg.text_config.vocab_size, (b, seq)) * mask).astype(np.int32),
            "attention_mask": mask,
            "pixel_values": rng.standard_normal((b, 3, r, r)).astype(np.float32),
        },
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
    print("@@" + json.dumps({"temp": temp, "s": statistics.median(times), "mib": hwm, "loss": float(metrics["loss"])}))


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
        f"cores {len(os.sched_getaffinity(0))}, load {os.getloadavg()[0]:.2f}, "
        f"allocator {os.environ.get('LD_PRELOAD') or 'glibc'}",
        flush=True,
    )
    print(f"{'variant':<16}{'temp MiB':>10}{'step s':>9}{'peak MiB':>10}{'loss':>10}", flush=True)
    for v in variants:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            v,
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--preset",
            args.preset,
        ] + ["--tiny"] * args.tiny
        res = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in res.stdout.splitlines() if line.startswith("@@")]
        if res.returncode or not lines:
            raise SystemExit(f"variant {v} failed (exit {res.returncode}):\n{res.stderr[-2000:]}")
        r = json.loads(lines[-1][2:])
        print(f"{v:<16}{r['temp'] / 2**20:>10.1f}{r['s']:>9.2f}{r['mib']:>10.0f}{r['loss']:>10.4f}", flush=True)


if __name__ == "__main__":
    main()
