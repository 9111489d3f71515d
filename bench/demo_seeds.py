"""The demo's final figures as mean and spread over seeds, and what else they depend on.

    python bench/demo_seeds.py                         # seeds 0 1 2, the full demo (1200 steps each)
    python bench/demo_seeds.py --seeds 0 1 --steps 30  # a short check
    python bench/demo_seeds.py --steps 30 --compare-env   # same seed under other XLA ISA / thread settings
    python bench/demo_seeds.py --set loss_positives=label    # any config overrides, on every run

Each run is ``python -m train --config train/configs/demo.py --config.seed=S`` in a fresh process
and its own workdir (``--config.seed`` sets the model init and the data order; the synthetic
data set itself stays ``data.demo.demo_seed``). Prints the final eval metrics per seed, then
mean, sample standard deviation, min and max per metric, and the environment (jax version, CPU
ISA, cores) the figures come from. ``--compare-env`` instead reruns one seed under different
XLA:CPU instruction sets and thread counts and says whether the losses stay bitwise equal.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_demo(
    workdir: str,
    seed: int,
    steps: int | None,
    env_extra: dict | None = None,
    cpus: str | None = None,
    evaluate: bool = True,
    overrides: list[str] = (),
) -> list[dict]:
    """One demo run in a fresh process; returns its metrics.jsonl records."""
    cmd = [
        sys.executable,
        "-m",
        "train",
        "--config",
        "train/configs/demo.py",
        "--workdir",
        workdir,
        f"--config.seed={seed}",
        "--config.export_hf=False",
        *(f"--config.{kv}" for kv in overrides),
    ]
    if steps:
        cmd += [
            f"--config.total_steps={steps}",
            "--config.log_every=1",
            f"--config.eval_every={steps if evaluate else 0}",
            f"--config.checkpoint_every={steps}",
        ]
    if cpus:
        cmd = ["taskset", "-c", cpus] + cmd
    env = dict(os.environ, PYTHONPATH=REPO, **(env_extra or {}))
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def final_eval(records: list[dict]) -> dict[str, float]:
    """The last record's eval metrics (keys without a ``train/`` or ``data/`` prefix)."""
    evals = [r for r in records if any(not k.startswith(("train/", "data/", "step")) for k in r)]
    last = evals[-1]
    return {k: v for k, v in last.items() if not k.startswith(("train/", "data/")) and k != "step"}


def losses(records: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]


def environment() -> str:
    import jax
    import jaxlib

    flags = set(open("/proc/cpuinfo").read().split()) if os.path.exists("/proc/cpuinfo") else set()
    isa = next((name for name in ("avx512f", "avx2", "avx", "sse4_2") if name in flags), "unknown")
    return (
        f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, CPU ISA up to {isa}, "
        f"{len(os.sched_getaffinity(0))} cores usable, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    )


def compare_env(seed: int, steps: int, root: str) -> None:
    variants = {
        "default": ({}, None),
        "isa=AVX2": ({"XLA_FLAGS": "--xla_cpu_max_isa=AVX2"}, None),
        "isa=SSE4_2": ({"XLA_FLAGS": "--xla_cpu_max_isa=SSE4_2"}, None),
        "1 core": ({}, "0"),
    }
    base = None
    for name, (env, cpus) in variants.items():
        workdir = os.path.join(root, name.replace("=", "_").replace(" ", "_"))
        got = losses(run_demo(workdir, seed, steps, env, cpus, evaluate=False))
        if base is None:
            base = got
        same = got == base
        worst = max(abs(a[1] - b[1]) for a, b in zip(got, base))
        print(f"{name:12s} final loss {got[-1][1]:.8f}  bitwise equal to default: {same}  max |diff| {worst:.3g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None, help="total_steps (default: the demo's 1200)")
    ap.add_argument("--workdir", default=None, help="where the runs go (default: a temporary directory)")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a config override (--config.KEY=VALUE)"
    )
    ap.add_argument(
        "--compare-env",
        action="store_true",
        help="rerun the first seed under other XLA ISAs / 1 core and compare the losses",
    )
    args = ap.parse_args()
    root = args.workdir or tempfile.mkdtemp(prefix="demo_seeds_")
    print(environment() + (f"; overrides {args.set}" if args.set else ""))
    if args.compare_env:
        compare_env(args.seeds[0], args.steps or 30, root)
        return
    per_seed = {}
    for seed in args.seeds:
        records = run_demo(os.path.join(root, f"seed{seed}"), seed, args.steps, overrides=args.set)
        per_seed[seed] = final_eval(records)
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(per_seed[seed].items())), flush=True)
    keys = sorted(set.intersection(*(set(m) for m in per_seed.values())))
    print(f"\n{'metric':40s} {'mean':>7s} {'std':>7s} {'min':>7s} {'max':>7s}  over seeds {args.seeds}")
    for k in keys:
        values = [per_seed[s][k] for s in args.seeds]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{k:40s} {statistics.mean(values):7.3f} {std:7.3f} {min(values):7.3f} {max(values):7.3f}")


if __name__ == "__main__":
    main()
