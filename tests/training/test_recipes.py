"""The paper's recipes (pretraining stages 1/2, fine-tuning on MUGE / Flickr30K-CN / COCO-CN):
their hyperparameters as the issue and cn_clip's run_scripts give them, and each one training
2 steps on a tiny local TFDS copy (built here from a cn_clip TSV split) with size overrides.
A fine-tuning recipe's ``epochs`` over that copy give the hand-computed total_steps, which the
learning-rate schedule uses and a resume keeps."""

import base64
import importlib
import io
import json
import math

import numpy as np
import PIL.Image
import pytest
from _train_helpers import tiny_config

RECIPES = ["pretrain_stage1", "pretrain_stage2", "finetune_muge", "finetune_flickr30k_cn", "finetune_coco_cn"]
# (lr, warmup, weight decay, b2, eps, global batch, freeze, train crop, epochs (0: total_steps))
PAPER = {
    "pretrain_stage1": (1e-4, 5000, 1e-3, 0.98, 1e-6, 32768, "image", "random_resized", 0),
    "pretrain_stage2": (2e-5, 5000, 1e-3, 0.98, 1e-6, 32768, "", "random_resized", 0),
    "finetune_muge": (5e-5, 100, 1e-3, 0.98, 1e-6, 1024, "", "random_resized", 3),
    "finetune_flickr30k_cn": (5e-5, 100, 1e-3, 0.98, 1e-6, 1024, "", "random_resized", 3),
    "finetune_coco_cn": (3e-5, 6, 1e-3, 0.98, 1e-6, 8192, "", "random_resized", 20),
}


@pytest.fixture(scope="module")
def tiny_copy(tmp_path_factory):
    """A tiny cn_clip-layout data set built into a TFDS dir (train + valid), and a tiny checkpoint."""
    import chinese_clip_jax as ccj
    from chinese_clip_jax.data.build import build

    root = tmp_path_factory.mktemp("recipes")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("valid", 4)):
        lines, caps = [], []
        for i in range(n):
            buf = io.BytesIO()
            PIL.Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(buf, "JPEG")
            lines.append(f"{i}\t{base64.urlsafe_b64encode(buf.getvalue()).decode()}")
            caps.append(json.dumps({"text_id": i, "text": f"图片{i}", "image_ids": [i]}, ensure_ascii=False))
        (root / f"{split}_imgs.tsv").write_text("\n".join(lines) + "\n")
        (root / f"{split}_texts.jsonl").write_text("\n".join(caps) + "\n", encoding="utf-8")
        build(str(root), str(root / "tfds"), fmt="cn_clip", split=split, progress=False)
    cfg = tiny_config(
        vocab_size=21128,
        layers=1,
        heads=2,
        max_positions=64,
        dropout=0.1,
        attention_dropout=0.1,
        image_size=16,
        patch_size=8,
    )
    import jax

    model = ccj.ChineseCLIPModel(cfg)
    params = model.init(jax.random.PRNGKey(0), np.ones((1, 8), np.int32), np.zeros((1, 3, 16, 16), np.float32))
    ccj.save_pretrained(str(root / "init"), cfg, params["params"])
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_has_the_papers_hyperparameters_and_trains_on_a_tiny_copy(name, tiny_copy, tmp_path):
    from chinese_clip_jax.training.loop import train

    c = importlib.import_module(f"train.configs.{name}").get_config()
    lr, warmup, wd, b2, eps, batch, freeze, crop, epochs = PAPER[name]
    o = c.optimizer
    got = (o.lr, o.warmup_steps, o.weight_decay, o.b2, o.eps, c.batch_size, c.freeze, c.data.train_crop, c.epochs)
    assert got == (lr, warmup, wd, b2, eps, batch, freeze, crop, epochs)
    assert c.require_init_from and c.data.name == "tfds" and c.data.tfds.eval_split == "valid"
    # size overrides for the tiny copy (what a user would pass as --config.K=V)
    c.init_from = str(tiny_copy / "init")
    c.data.tfds.builder_dir = str(tiny_copy / "tfds")
    c.update(
        epochs=0,
        total_steps=2,
        batch_size=4,
        log_every=1,
        eval_every=2,
        checkpoint_every=2,
        context_length=16,
        dtype="float32",
        export_hf=False,
    )
    c.optimizer.warmup_steps = 1
    c.data.worker_count = 0
    c.data.num_threads = 1
    assert c.accum_steps == ("auto" if name.startswith("pretrain") else 1)
    result = train(c, str(tmp_path / "run"), progress=False)
    assert result["step"] == 2 and result["last_eval"] is not None
    assert json.loads((tmp_path / "run" / "run_options.json").read_text())["accum_steps"] == 1  # "auto" on CPU
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        losses = [json.loads(line)["train/loss"] for line in f if "train/loss" in line]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


# ------------------------------------------------------------------- epochs -> total_steps


def _sized_iterator(config, hook=None):
    """The real TFDS iterator (its ``shard_records`` tells the split's size) with a hook per batch."""
    from _train_run import HookedIterator

    from chinese_clip_jax.data import train_iterator

    inner = train_iterator(config.data, global_batch_size=config.batch_size, seed=0, image_size=16, context_length=16)
    it = HookedIterator(inner, hook or (lambda index, batch: batch))
    it.shard_records = inner.shard_records
    return it


def _epoch_config(tiny_copy, epochs=None):
    c = importlib.import_module("train.configs.finetune_muge").get_config()
    c.init_from = str(tiny_copy / "init")
    c.data.tfds.builder_dir = str(tiny_copy / "tfds")
    c.update(batch_size=5, log_every=1, context_length=16, dtype="float32", export_hf=False)
    c.eval_every = 0  # speed (the recipe's -1, once per epoch, is resolved below without running it)
    if epochs is not None:
        c.epochs = epochs
    c.optimizer.warmup_steps = 1
    c.data.worker_count = 0
    c.data.num_threads = 1
    return c


@pytest.mark.slow
def test_epochs_give_total_steps_from_the_train_split_and_a_resume_keeps_them(tiny_copy, tmp_path, caplog, monkeypatch):
    import logging
    import os
    import signal

    from chinese_clip_jax.training import loop
    from chinese_clip_jax.training.run_length import resolve_run_length
    from chinese_clip_jax.training.validate import ConfigError

    recipe = importlib.import_module("train.configs.finetune_muge").get_config()
    assert recipe.epochs == 3 and recipe.eval_every == recipe.checkpoint_every == -1  # cn_clip: eval each epoch
    c = _epoch_config(tiny_copy)
    # 8 train pairs, 3 epochs, global batch 5: ceil(3 * 8 / 5) = ceil(4.8) = 5 steps; ceil(8 / 5) = 2 per epoch
    total, lr = 5, c.optimizer.lr
    workdir = str(tmp_path / "run")

    def sigterm_at_3(index, batch):
        if index == 3:
            # raised in this (the loop's) thread, its handler runs before the hook returns: the stop
            # is seen after step 3 however loaded the machine (os.kill could land a step later)
            signal.raise_signal(signal.SIGTERM)  # the loop saves after step 3 and returns
        return batch

    with caplog.at_level(logging.INFO, logger="chinese_clip_jax"):
        first = loop.train(c, workdir, data_iter=_sized_iterator(c, sigterm_at_3), progress=False)
    assert "epochs=3 at global batch 5: 2 steps per epoch, total_steps 5 (train split: 8 records)" in caplog.text
    assert (first["step"], first["stopped_early"], first["total_steps"]) == (3, True, total)
    recorded = json.loads((tmp_path / "run" / "run_length.json").read_text())
    assert recorded == {"epochs": 3.0, "batch_size": 5, "train_records": 8, "steps_per_epoch": 2, "total_steps": 5}
    second = loop.train(_epoch_config(tiny_copy), workdir, data_iter=_sized_iterator(c), progress=False)
    assert (second["step"], second["steps_run"], second["total_steps"]) == (total, 2, total)

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5]
    # lr logged at step s is the schedule at s - 1: warmup 1 step, then cosine to 0 over total - 1 = 4 steps
    expected = [0.0] + [lr * 0.5 * (1 + math.cos(math.pi * k / (total - 1))) for k in range(4)]
    assert [r["train/lr"] for r in train_rows] == pytest.approx(expected, rel=1e-5, abs=1e-12)
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["3", "4", "5"]  # every 2 steps, the stop, the end

    # the train split changed since: a resume keeps the recorded numbers (and says so) ...
    class Six:
        shard_records = 6  # a fresh run would get ceil(3 * 6 / 5) = 4 steps

    caplog.clear()
    from chinese_clip_jax.io import as_path

    per_epoch = _epoch_config(tiny_copy)
    per_epoch.eval_every = -1  # the recipe's: once per epoch
    again = resolve_run_length(per_epoch, Six(), as_path(workdir), resuming=True)
    assert (again.total_steps, again.eval_every, again.checkpoint_every) == (5, 2, 2)
    assert "the train split has 6 records now, 8 when this run started: keeping its total_steps 5" in caplog.text
    (tmp_path / "fresh").mkdir()
    fresh = resolve_run_length(_epoch_config(tiny_copy), Six(), as_path(tmp_path / "fresh"), resuming=False)
    assert (fresh.total_steps, fresh.checkpoint_every) == (4, 2)
    # ... and other epochs would change the schedule: refused in one line, before the train state is built
    monkeypatch.setattr(loop, "create_train_state", lambda *a, **k: pytest.fail("built the train state"))
    with pytest.raises(ConfigError, match=r"started with epochs=3, batch_size=5 \(total_steps 5\); resuming with"):
        loop.train(_epoch_config(tiny_copy, epochs=4), workdir, data_iter=_sized_iterator(c), progress=False)


def test_per_epoch_intervals_need_epochs():
    from chinese_clip_jax.training.recipes import base
    from chinese_clip_jax.training.validate import ConfigError, validate_config

    c = base.get_config()
    c.eval_every = -1
    with pytest.raises(ConfigError, match=r"config.eval_every = -1: must be an int >= 0, or -1 \(once per epoch\)"):
        validate_config(c)
    c.epochs = 2
    validate_config(c)
    c.epochs = -1.0
    with pytest.raises(ConfigError, match=r"config.epochs = -1.0: must be a number >= 0"):
        validate_config(c)
