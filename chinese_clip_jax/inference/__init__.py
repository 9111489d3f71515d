"""Inference: the high-level model (``ChineseCLIP``), the jitted sharded encoder and the mesh helpers.

clip = ChineseCLIP.from_pretrained(src)      # model.py
enc = Encoder(model, params, mesh)           # encoding.py: embeddings, bucketing, prompt ensembles
mesh = sharding.make_mesh(...)               # sharding.py: mesh, logical-axis rules, placement
"""

from .encoding import Encoder, bucket_sizes, image_embeddings, model_pixels, text_embeddings
from .model import ChineseCLIP

__all__ = ["ChineseCLIP", "Encoder", "bucket_sizes", "image_embeddings", "model_pixels", "text_embeddings"]
