"""Evaluation: zero-shot classification and text-image retrieval, as cn_clip's evaluation scripts.

``metrics`` (recall@K, zero-shot accuracy, top-k), ``sets`` (classification and retrieval data
sets), ``cli`` (``ccj-eval`` / ``python -m chinese_clip_jax.evaluation``).
"""

from .metrics import (
    RECALL_KS,
    RetrievalAnnotations,
    load_retrieval_jsonl,
    retrieval_metrics,
    topk_indices,
    zero_shot_accuracy,
)

__all__ = [
    "RECALL_KS",
    "RetrievalAnnotations",
    "load_retrieval_jsonl",
    "retrieval_metrics",
    "topk_indices",
    "zero_shot_accuracy",
]
