"""Fine-tuning from released or converted weights (anything ``ccj.from_pretrained`` reads:
a HF checkpoint dir, a cn_clip ``.pt``, a ``python -m convert`` output, or ``build/demo/hf``).

    python -m train --config train/configs/finetune.py --workdir build/finetune \\
        --config.init_from=build/demo/hf --config.total_steps=100

The architecture comes from the checkpoint's config.json. Everything is trainable with a small
learning rate (cn_clip's fine-tuning recipe: lr 5e-5, warmup, weight decay 0.001, AdamW
b2 0.98, eps 1e-6). For the paper's stage 1 (LiT, image tower frozen) add
``--config.freeze=image``; stage 2 starts from a stage-1 export with everything trainable.
For your own data set ``--config.data.name=cn_clip --config.data.cn_clip.root=DIR`` (or
webdataset shards). For a real model on accelerators, e.g. ``--config.batch_size=1024
--config.mesh.fsdp=8`` (dtype, attention, layer loop and ``model.remat`` follow the platform by
default, chinese_clip_jax/training/defaults.py; ``--config.model.remat=full`` saves the most
memory for one more forward pass).
"""

from chinese_clip_jax.training.recipes import base


def get_config():
    c = base.get_config()
    c.init_from = ""  # required: set on the command line
    c.require_init_from = True
    c.total_steps = 1000
    c.batch_size = 128
    c.log_every = 10
    c.eval_every = 100
    c.checkpoint_every = 100
    c.optimizer.update(lr=5e-5, warmup_steps=100, weight_decay=0.001, grad_clip=1.0)
    c.data.demo.num_retrieval = 200
    return c
