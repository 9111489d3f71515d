"""Pretraining stage 1 (the paper's locked-image tuning, LiT): the image tower is frozen, only the
text tower, the projections and the temperature learn.

    python -m train --config train/configs/pretrain_stage1.py --workdir gs://bucket/stage1 \\
        --config.init_from=INIT --config.data.tfds.builder_dir=gs://bucket/pairs

Paper (Yang et al. 2022, sec. 3 and appendix): image tower from OpenAI CLIP, text tower from
RoBERTa-wwm; AdamW lr 1e-4, b1 0.9, b2 0.98, eps 1e-6, weight decay 1e-3, 5000 warmup steps
then cosine, global batch 32768, 224 px, random resized crop. INIT is a checkpoint holding those
two towers (anything ``ccj.from_pretrained`` reads; its config.json fixes the architecture).
``total_steps`` depends on how much data you have: set it, or ``--config.epochs=E`` to derive
it from the train split once opened (ceil(E x pairs / batch_size)).

The loss: the default ``loss_impl="gather"`` holds each device's (local_B, 32768) logits, about
20 bytes x local_B x 32768 of temporaries (InfoNCE; 16 for sigmoid): 320 MiB at 512 rows per
device, small beside the towers. Switch to ``--config.loss_impl=ring`` (same loss and gradients,
the loss's memory flat in the global batch) when that share matters: a larger global batch, or a
per-device batch raised until memory is tight (docs/performance.md, "Contrastive loss memory").
"""

from chinese_clip_jax.training.recipes import base


def get_config():
    c = base.get_config()
    c.init_from = ""  # required: the initial towers
    c.require_init_from = True
    c.freeze = "image"
    c.total_steps = 20_000
    c.batch_size = 32_768  # global
    # the fewest micro-batches that fit the devices (same gradient: GradCache), so the paper's batch
    # runs on any slice; a pod where it fits at once gets 1 (training/compile.py)
    c.accum_steps = "auto"
    c.dtype = "bfloat16"
    c.log_every = 100
    c.eval_every = 1000
    c.checkpoint_every = 1000
    c.optimizer.update(lr=1e-4, warmup_steps=5000, weight_decay=1e-3, b1=0.9, b2=0.98, eps=1e-6)
    c.data = base.default_data_config("tfds")
    c.data.train_crop = "random_resized"
    c.data.jpeg_draft = True  # training only: ~2.4x faster decoding of big JPEGs
    c.data.eval_crop = "center"
    c.data.worker_count = 8
    c.data.tfds.split = "train"
    c.data.tfds.eval_split = "valid"
    c.export_hf = True  # WORKDIR/hf: stage 2 starts from it
    return c
