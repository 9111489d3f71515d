"""Pretraining stage 2 (the paper's contrastive tuning): both towers unfrozen, from stage 1.

    python -m train --config train/configs/pretrain_stage2.py --workdir gs://bucket/stage2 \\
        --config.init_from=gs://bucket/stage1/hf --config.data.tfds.builder_dir=gs://bucket/pairs

Paper: everything as stage 1 (AdamW b2 0.98, eps 1e-6, weight decay 1e-3, global batch 32768,
224 px) but nothing frozen and lr 2e-5. ``init_from`` is stage 1's export (``export_hf``
writes ``WORKDIR/hf`` at the end of stage 1). When to switch to ``loss_impl="ring"``: as stage 1.
"""

from chinese_clip_jax.training.recipes import pretrain_stage1


def get_config():
    c = pretrain_stage1.get_config()
    c.freeze = ""
    c.optimizer.lr = 2e-5
    c.export_hf = True
    return c
