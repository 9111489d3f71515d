"""Runs ``train()`` on a tiny model and the demo data, optionally disturbing it.

    python tests/_train_run.py WORKDIR TOTAL_STEPS [--kill9-after-checkpoint N --at-batch B] [--tfds-dir DIR]
        [--files-table TABLE] [--checkpoint-every N]

With ``--kill9-after-checkpoint N --at-batch B`` the process SIGKILLs itself when fetching
batch B, after checkpoint N is complete on disk (so the kill lands between checkpoints).
Also imported by tests/training/test_loop.py for ``tiny_train_config`` and ``HookedIterator``.
"""

from __future__ import annotations

import argparse
import os
import signal
import time


def tiny_train_config(total_steps: int = 8, **overrides):
    from chinese_clip_jax.training.recipes import base

    c = base.get_config()
    c.total_steps = total_steps
    c.batch_size = 16
    c.log_every = 1
    c.eval_every = 0
    c.checkpoint_every = 4
    c.context_length = 16
    c.optimizer.update(lr=3e-3, warmup_steps=2, weight_decay=0.1)
    c.model.projection_dim = 8
    c.model.text.update(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        hidden_dropout_prob=0.1,
    )  # dropout on: rng must resume too
    c.model.vision.update(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8
    )
    c.data.num_threads = 1
    c.data.prefetch_buffer_size = 16
    c.data.demo.num_train = 200
    for k, v in overrides.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


class HookedIterator:
    """Wraps the real data iterator; ``hook(index, batch)`` runs on each batch (1-based index)
    and may return a replacement batch."""

    def __init__(self, inner, hook):
        self.inner, self.hook, self.count = inner, hook, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.inner)
        self.count += 1
        return self.hook(self.count, batch) or batch

    def get_state(self):
        return {"inner": self.inner.get_state(), "count": self.count}

    def set_state(self, state):
        self.inner.set_state(state["inner"])
        self.count = state["count"]

    @property
    def stats(self):
        return self.inner.stats


def make_iterator(config, hook=None):
    from chinese_clip_jax import data

    it = data.train_iterator(
        config.data,
        global_batch_size=config.batch_size,
        seed=config.seed,
        image_size=config.model.vision.image_size,
        context_length=config.context_length,
    )
    return HookedIterator(it, hook or (lambda i, b: None))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir")
    ap.add_argument("total_steps", type=int)
    ap.add_argument("--kill9-after-checkpoint", type=int, default=0)
    ap.add_argument("--at-batch", type=int, default=0)
    ap.add_argument("--tfds-dir", default="", help="train on this TFDS directory instead of the demo set")
    ap.add_argument("--files-table", default="", help="train on this table of image paths + captions (data.files)")
    ap.add_argument("--checkpoint-every", type=int, default=0)
    args = ap.parse_args()
    from chinese_clip_jax.training.loop import train

    config = tiny_train_config(args.total_steps)
    if args.tfds_dir:
        config.data.name = "tfds"
        config.data.tfds.builder_dir = args.tfds_dir
    if args.files_table:
        config.data.name = "files"
        config.data.files.table = args.files_table
    if args.checkpoint_every:
        config.checkpoint_every = args.checkpoint_every

    def hook(index, batch):
        if args.kill9_after_checkpoint and index == args.at_batch:
            done = os.path.join(args.workdir, "checkpoints", str(args.kill9_after_checkpoint))
            deadline = time.time() + 60
            while not os.path.isdir(done) and time.time() < deadline:
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)

    train(config, args.workdir, data_iter=make_iterator(config, hook), progress=False)


if __name__ == "__main__":
    main()
