"""Inference: the high-level model (``ChineseCLIP``) and the jitted sharded encoder (the mesh helpers
are ``chinese_clip_jax.sharding``).

clip = ChineseCLIP.from_pretrained(src)      # model.py
enc = Encoder(model, params, mesh)           # encoding.py: embeddings, bucketing, prompt ensembles
"""

from .encoding import Encoder, bucket_sizes, image_embeddings, model_pixels, text_embeddings
from .model import ChineseCLIP

__all__ = ["ChineseCLIP", "Encoder", "bucket_sizes", "image_embeddings", "model_pixels", "text_embeddings"]
