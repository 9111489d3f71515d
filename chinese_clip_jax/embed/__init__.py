"""Bulk corpus embedding and nearest-neighbour search (``ccj-embed``; guide: docs/embedding.md).

    from chinese_clip_jax import embed
    model, params = ccj.from_pretrained(src)
    report = embed.embed_images(model, params, embed.open_images("folder:photos"), "out", model_name=src)
    rows = embed.load_embeddings("out", "images")          # .ids, .vectors float32 (N, D)
    embed.build_index("out", "images")                     # faiss (the ``index`` extra)
    hits = embed.query("out", texts=["一只猫"], k=5)        # [[(id, cosine similarity), ...]]

Modules: ``runner`` (the sharded, resumable, multi-host loop), ``store`` (the output files),
``index`` (faiss build and search), ``cli``. What is embedded is opened by ``data`` (the one
spec grammar: ``data.readers.open_images``, ``data.readers.read_texts``); its names are here too.
"""

from ..data.readers import open_images, read_texts
from ..data.sets import DatasetError as CorpusError
from ..data.sets import ImageCorpus, TextCorpus
from .index import EmbeddingIndex, build_index, exact_search, query
from .runner import EmbedOptions, Report, embed_images, embed_texts
from .store import Embeddings, EmbedError, load_embeddings

__all__ = [
    "CorpusError",
    "ImageCorpus",
    "TextCorpus",
    "open_images",
    "read_texts",
    "EmbeddingIndex",
    "build_index",
    "exact_search",
    "query",
    "EmbedOptions",
    "Report",
    "embed_images",
    "embed_texts",
    "EmbedError",
    "Embeddings",
    "load_embeddings",
]
