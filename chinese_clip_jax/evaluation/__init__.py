"""Evaluation: zero-shot classification and text-image retrieval, cn_clip's protocol by default.

The one home of evaluation (the sets it scores are ``data``'s: a spec string is opened by
``data.readers.open_classification`` / ``open_retrieval``, names kept here), ``prompts`` (label
sets and templates, ours and cn_clip's), ``metrics`` (recall@K, top-k accuracy, per-class
recall), ``runner`` (embedding with bad images skipped and reported, then scoring: what the
trainer's ``Evaluator`` calls too), ``api`` (``zero_shot`` / ``retrieval``), ``results`` (the
result object and its JSON) and ``cli`` (``ccj-eval`` / ``python -m chinese_clip_jax.evaluation``).

    from chinese_clip_jax import evaluation
    res = evaluation.zero_shot(model_or_src, "folder:PATH", labels=None, templates=None)
    res = evaluation.retrieval(model_or_src, data_dir); res.to_json()
"""

from ..data.readers import open_classification, open_retrieval
from ..data.sets import ClassificationSet, DatasetError, RetrievalSet
from .api import retrieval, zero_shot
from .metrics import (
    RECALL_KS,
    confusion_matrix,
    load_retrieval_jsonl,
    mean_per_class_recall,
    per_class_recall,
    retrieval_metrics,
    topk_indices,
    zero_shot_accuracy,
)
from .prompts import read_labels, read_templates
from .results import EvaluationResult
from .runner import BadImage, TooManyBadImages

__all__ = [
    "zero_shot",
    "retrieval",
    "EvaluationResult",
    "BadImage",
    "TooManyBadImages",
    "ClassificationSet",
    "RetrievalSet",
    "DatasetError",
    "open_classification",
    "open_retrieval",
    "read_labels",
    "read_templates",
    "RECALL_KS",
    "load_retrieval_jsonl",
    "retrieval_metrics",
    "zero_shot_accuracy",
    "topk_indices",
    "per_class_recall",
    "mean_per_class_recall",
    "confusion_matrix",
]
