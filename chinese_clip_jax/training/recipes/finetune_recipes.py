"""Fine-tuning recipes of the paper's retrieval benchmarks, as cn_clip's run_scripts give them
for ViT-B/16 on 8 GPUs (its per-GPU batch x 8 = our global ``batch_size``); one function per
data set, each a config file of its own (``finetune_muge.py``, ``finetune_flickr30k_cn.py``,
``finetune_coco_cn.py``).

All three: AdamW b2 0.98, eps 1e-6, weight decay 0.001, context length 52, cn_clip's
augmentation (random resized crop, scale 0.9-1.0, bicubic; cn_clip adds AutoAugment, which
this project does not do), cn_clip's eval resize (squash), retrieval eval on "valid".

They train for cn_clip's number of ``epochs`` over the train split they open: ``total_steps``
becomes ceil(epochs x train pairs / batch_size) once the data is opened, retrieval eval and
checkpoints come once per epoch (``eval_every`` = ``checkpoint_every`` = -1), and the numbers are
logged and recorded for resumes (``chinese_clip_jax/training/run_length.py``). To train a fixed
number of steps instead: ``--config.epochs=0 --config.total_steps=N``.
"""

from chinese_clip_jax.processing import DEFAULT_CONTEXT_LENGTH
from chinese_clip_jax.training.recipes import base

# name: (global batch, lr, warmup steps, epochs, remat)
RECIPES = {
    "muge": (1024, 5e-5, 100, 3, "dots"),
    "flickr30k_cn": (1024, 5e-5, 100, 3, "dots"),
    "coco_cn": (8192, 3e-5, 6, 20, "full"),  # cn_clip: --grad-checkpointing
}


def recipe(name: str):
    batch, lr, warmup, epochs, remat = RECIPES[name]
    c = base.get_config()
    c.init_from = ""  # required: a pretrained Chinese-CLIP (HF dir, cn_clip .pt, converted dir)
    c.require_init_from = True
    c.batch_size = batch
    c.epochs = epochs  # total_steps from the opened train split's size
    c.context_length = DEFAULT_CONTEXT_LENGTH
    c.log_every = 10
    c.eval_every = -1  # once per epoch, as cn_clip's valid-epoch-interval
    c.checkpoint_every = -1  # once per epoch
    c.optimizer.update(lr=lr, warmup_steps=warmup, weight_decay=0.001, b1=0.9, b2=0.98, eps=1e-6)
    c.model.remat = remat
    c.data = base.default_data_config("tfds")
    c.data.train_crop = "random_resized"
    c.data.jpeg_draft = True  # training only: ~2.4x faster decoding of big JPEGs
    c.data.eval_crop = "squash"
    c.data.worker_count = 4
    c.data.tfds.split = "train"
    c.data.tfds.eval_split = "valid"
    c.export_hf = True
    return c
