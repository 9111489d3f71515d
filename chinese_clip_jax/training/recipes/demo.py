"""The README's demo: a small Chinese-CLIP trained from scratch on the built-in synthetic set
(coloured shapes captioned in Chinese, real 21128-token vocab) on 2 CPU cores in minutes.

    python -m train --config train/configs/demo.py --workdir build/demo
"""

from chinese_clip_jax.training.recipes import base


def get_config():
    c = base.get_config()
    c.seed = 0
    c.total_steps = 1200
    c.batch_size = 128
    c.log_every = 20
    c.eval_every = 300
    c.checkpoint_every = 300
    c.export_hf = True  # build/demo/hf: a converted-format checkpoint, e.g. for configs/finetune.py
    c.context_length = 24  # the demo captions are at most ~15 characters
    # label / caption positives and distinct_captions were measured against it: no clear win (docs/training.md)
    c.loss_positives = "pair"
    c.optimizer.update(lr=2e-3, warmup_steps=50, weight_decay=0.05)
    c.model.projection_dim = 64
    c.model.text.update(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
    )
    c.model.vision.update(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    # one reader thread: the demo's renderer is small numpy calls that hold the GIL, so a second
    # thread only contends for it (data-only 11.4k vs 6.8k samples/s, docs/data.md); same batches
    c.data.num_threads = 1
    c.data.demo.num_train = 100_000
    c.data.demo.eval_per_class = 20
    c.data.demo.num_retrieval = 200
    return c
