"""LoRA rank 4 / 8 vs full fine-tuning from a demo checkpoint on a shifted task (CPU).

    python -m train --config train/configs/demo.py --workdir build/demo      # the checkpoint (build/demo/hf)
    .venv/bin/python bench/lora_shift.py --init build/demo/hf --out build/lora_shift \
        [--steps 150] [--batch 64] [--lr 1e-3] [--variants full,lora:4,lora:8]

The shifted task: the demo's coloured shapes (``data.demo.render``, the same images) captioned
with phrasings the demo never trained on (``NEW_PHRASINGS``), over all 30 colour-shape
combinations (the 6 the demo holds out of training included). Writes a training table
(``--train-pairs`` pairs) and a held-out table (``--test-pairs``, other draws) of PNG files under
``--out``, fine-tunes each variant from ``--init`` for ``--steps`` steps (the trainer's loop:
``data.name=files``, same seed, lr, warmup and batch for every variant; LoRA on attention + MLP
of both towers, alpha 16, base frozen) and scores each exported (merged) model, and the
checkpoint before fine-tuning, by text-image retrieval on the held-out table
(``evaluation.retrieval``: R@1 both ways, mean recall). One table row per model, with the
trainable share that ``DIR/run_options.json`` records and the wall time of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import time

NEW_PHRASINGS = ("画面{pos}画着{color}{shape}", "{shape}，颜色是{color}，位置在{pos}", "能看到{pos}的{color}{shape}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--init", required=True, help="the demo checkpoint (e.g. build/demo/hf)")
    p.add_argument("--out", required=True, help="working directory (tables, runs)")
    p.add_argument("--variants", default="full,lora:4,lora:8")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-pairs", type=int, default=4000)
    p.add_argument("--test-pairs", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def write_table(directory: str, n: int, seed: int, size: int) -> str:
    """n PNGs of random colour-shape-position draws (all 30 combinations) + table.csv."""
    import numpy as np
    import PIL.Image

    from chinese_clip_jax.data import demo

    os.makedirs(directory, exist_ok=True)
    table = os.path.join(directory, "table.csv")
    if os.path.exists(table):
        return table
    rng = np.random.default_rng(seed)
    colors, positions = tuple(demo.COLORS), tuple(demo.POSITIONS)
    rows = ["image,caption"]
    for i in range(n):
        c, s, pos = rng.integers(len(colors)), rng.integers(len(demo.SHAPES)), rng.integers(len(positions))
        image = demo.render(size, int(c), int(s), int(pos), rng.uniform(size=demo.RENDER_DRAWS))
        path = os.path.join(directory, f"{i}.png")
        PIL.Image.fromarray(image).save(path)
        caption = NEW_PHRASINGS[rng.integers(len(NEW_PHRASINGS))].format(
            pos=positions[pos], color=colors[c], shape=demo.SHAPES[s]
        )
        rows.append(f"{path},{caption}")
    with open(table + ".tmp", "w", encoding="utf-8") as f:
        f.write("\n".join(rows) + "\n")
    os.replace(table + ".tmp", table)
    return table


def run_variant(args, variant: str, train_table: str) -> tuple[str, dict, float]:
    from chinese_clip_jax.training.loop import train
    from chinese_clip_jax.training.recipes import demo as demo_recipe

    c = demo_recipe.get_config()
    c.init_from = args.init
    c.total_steps, c.batch_size, c.seed = args.steps, args.batch, args.seed
    c.eval_every, c.checkpoint_every, c.log_every, c.export_hf = 0, args.steps, 50, True
    c.optimizer.update(lr=args.lr, warmup_steps=min(20, args.steps // 5))
    c.data.name = "files"
    c.data.files.table = train_table
    kind, _, rank = variant.partition(":")
    if kind == "lora":
        c.lora.rank = int(rank)
    workdir = os.path.join(args.out, variant.replace(":", "_"))
    t0 = time.time()
    result = train(c, workdir, progress=False)
    options = json.load(open(os.path.join(workdir, "run_options.json")))
    return result["export_dir"], options, time.time() - t0


def main(argv=None) -> None:
    args = parse_args(argv)
    from chinese_clip_jax import evaluation
    from chinese_clip_jax.modeling.config import ChineseCLIPConfig

    size = ChineseCLIPConfig.from_pretrained(args.init).vision_config.image_size
    train_table = write_table(os.path.join(args.out, "train"), args.train_pairs, args.seed + 1, size)
    test_table = write_table(os.path.join(args.out, "test"), args.test_pairs, args.seed + 2, size)
    print(
        f"# shifted task: new phrasings, all 30 combinations; {args.train_pairs} train / {args.test_pairs} "
        f"held-out pairs; {args.steps} steps of batch {args.batch}, lr {args.lr}; load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    print(f"{'model':<12}{'trainable':>12}{'t2i R@1':>9}{'i2t R@1':>9}{'mean R':>8}{'wall s':>8}", flush=True)

    def score(src):
        m = evaluation.retrieval(src, test_table, resize="crop", progress=False).metrics
        return m["t2i_R@1"], m["i2t_R@1"], m["mean_recall"]

    t2i, i2t, mean = score(args.init)
    print(f"{'before':<12}{'-':>12}{t2i:>9.3f}{i2t:>9.3f}{mean:>8.3f}{'-':>8}", flush=True)
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        export_dir, options, wall = run_variant(args, variant, train_table)
        t2i, i2t, mean = score(export_dir)
        share = f"{100 * options['trainable_fraction']:.2f}%"
        print(f"{variant:<12}{share:>12}{t2i:>9.3f}{i2t:>9.3f}{mean:>8.3f}{wall:>8.0f}", flush=True)
    print(f"# load at the end {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
