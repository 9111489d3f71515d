"""Alias of :mod:`chinese_clip_jax.metrics` (this module's former name); import from there."""

from .metrics import (  # noqa: F401
    RECALL_KS,
    RetrievalAnnotations,
    load_retrieval_jsonl,
    retrieval_metrics,
    topk_indices,
    zero_shot_accuracy,
)
