"""The demo's CPU training speed, side by side for two source trees (e.g. before and after a change).

    git archive HEAD~3 | tar -x -C /tmp/old        # the tree to compare against
    python bench/demo_speed.py --trees /tmp/old,. --steps 80 --rounds 3

Each round runs ``train(train/configs/demo.py)`` for ``--steps`` steps in a fresh process per tree
(PYTHONPATH = that tree; the trees alternate, so machine load hits both alike), with evaluation,
the HF export and intermediate checkpoints off, and takes the loop's own ``samples_per_sec``
(the first step, which compiles, is not timed). Prints each run and the median per tree.
A script, not a test: on a shared machine the figures are noisy; ``uptime`` is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = """
import json, sys, tempfile
try:
    from chinese_clip_jax.training.recipes import demo
except ImportError:  # a tree from before the recipes moved into the package
    from train.configs import demo
from chinese_clip_jax.training.loop import train
c = demo.get_config()
c.total_steps, c.eval_every, c.export_hf, c.checkpoint_every = {steps}, 0, False, 10**6
with tempfile.TemporaryDirectory() as d:
    r = train(c, d, progress=False)
print("RESULT " + json.dumps({{"samples_per_sec": r["samples_per_sec"]}}))
"""


def run(tree: str, steps: int) -> float:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree), "JAX_PLATFORMS": "cpu"}
    res = subprocess.run(
        [sys.executable, "-c", CHILD.format(steps=steps)],
        cwd=os.path.abspath(tree),
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if res.returncode != 0:
        raise SystemExit(f"{tree}: failed: {res.stderr.strip().splitlines()[-1:]}")
    line = next(x for x in res.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])["samples_per_sec"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trees", required=True, help="comma list of source trees (each with chinese_clip_jax/, train/)")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    trees = args.trees.split(",")
    for t in trees:
        if not os.path.isdir(os.path.join(t, "chinese_clip_jax")):
            raise SystemExit(f"--trees: {t!r} has no chinese_clip_jax/ directory")
    print("# " + subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    rates = {t: [] for t in trees}
    for r in range(args.rounds):
        for t in trees:
            rates[t].append(run(t, args.steps))
            print(f"round {r + 1} {t}: {rates[t][-1]:.0f} samples/s", flush=True)
    print("# " + subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    first = statistics.median(rates[trees[0]])
    for t in trees:
        m = statistics.median(rates[t])
        print(
            f"{t}: median {m:.0f} samples/s over {args.rounds} runs of {args.steps} steps ({m / first:.3f}x the first)"
        )


if __name__ == "__main__":
    main()
