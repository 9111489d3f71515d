"""The paper's recipes (pretraining stages 1/2, fine-tuning on MUGE / Flickr30K-CN / COCO-CN):
their hyperparameters as the issue and cn_clip's run_scripts give them, and each one training
2 steps on a tiny local TFDS copy (built here from a cn_clip TSV split) with size overrides."""

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
# (lr, warmup, weight decay, b2, eps, global batch, freeze, train crop)
PAPER = {
    "pretrain_stage1": (1e-4, 5000, 1e-3, 0.98, 1e-6, 32768, "image", "random_resized"),
    "pretrain_stage2": (2e-5, 5000, 1e-3, 0.98, 1e-6, 32768, "", "random_resized"),
    "finetune_muge": (5e-5, 100, 1e-3, 0.98, 1e-6, 1024, "", "random_resized"),
    "finetune_flickr30k_cn": (5e-5, 100, 1e-3, 0.98, 1e-6, 1024, "", "random_resized"),
    "finetune_coco_cn": (3e-5, 6, 1e-3, 0.98, 1e-6, 8192, "", "random_resized"),
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


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_has_the_papers_hyperparameters_and_trains_on_a_tiny_copy(name, tiny_copy, tmp_path):
    from chinese_clip_jax.training.loop import train

    c = importlib.import_module(f"train.configs.{name}").get_config()
    lr, warmup, wd, b2, eps, batch, freeze, crop = PAPER[name]
    o = c.optimizer
    assert (o.lr, o.warmup_steps, o.weight_decay, o.b2, o.eps, c.batch_size, c.freeze, c.data.train_crop) == (
        lr,
        warmup,
        wd,
        b2,
        eps,
        batch,
        freeze,
        crop,
    )
    assert c.require_init_from and c.data.name == "tfds" and c.data.tfds.eval_split == "valid"
    # size overrides for the tiny copy (what a user would pass as --config.K=V)
    c.init_from = str(tiny_copy / "init")
    c.data.tfds.builder_dir = str(tiny_copy / "tfds")
    c.update(
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
    result = train(c, str(tmp_path / "run"), progress=False)
    assert result["step"] == 2 and result["last_eval"] is not None
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        losses = [json.loads(line)["train/loss"] for line in f if "train/loss" in line]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
