"""Evaluation results: one object per run, written as JSON in one stable schema.

The JSON is clip_benchmark's flat layout (``dataset``, ``model``, ``task``, ``metrics``) plus
our fields, so result collectors written for clip_benchmark read it unchanged:

    {"schema": "chinese_clip_jax.evaluation/1", "task": "zeroshot_classification",
     "model": SRC, "dataset": SPEC, "split": "test",
     "metrics": {"top1", "top5", "mean_per_class_recall", "acc1", "acc5"}          # zero-shot
              | {"t2i_R@1/5/10", "i2t_R@1/5/10", "mean_recall",
                 "image_retrieval_recall@1/5/10", "text_retrieval_recall@1/5/10"},  # retrieval
     "counts": {...}, "settings": {...}, "bad_images": [{"index", "image", "reason"}],
     "details": {...}, "versions": {...}, "wall_s": float}

``acc1``/``acc5`` and ``image_retrieval_recall@k`` (text -> image, = ``t2i_R@k``) /
``text_retrieval_recall@k`` (image -> text, = ``i2t_R@k``) are clip_benchmark's names for the
same figures. All metrics are fractions in [0, 1]. docs/evaluation.md documents every field.
"""

from __future__ import annotations

import dataclasses
import json
import platform
from typing import Any

from .runner import BadImage

__all__ = ["SCHEMA", "EvaluationResult", "versions"]

SCHEMA = "chinese_clip_jax.evaluation/1"
TASKS = {"zeroshot": "zeroshot_classification", "retrieval": "zeroshot_retrieval"}


def versions() -> dict[str, str]:
    """Versions of what computed a result, and the device it ran on."""
    import flax
    import jax
    import numpy as np

    from ..version import __version__

    return {
        "chinese_clip_jax": __version__,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
    }


def clip_benchmark_names(metrics: dict[str, float]) -> dict[str, float]:
    """Our metric names -> the same figures under clip_benchmark's names."""
    out = {}
    for k, v in metrics.items():
        if k in ("top1", "top5"):
            out[f"acc{k[3:]}"] = v
        elif k.startswith("t2i_R@"):
            out[f"image_retrieval_recall@{k[6:]}"] = v
        elif k.startswith("i2t_R@"):
            out[f"text_retrieval_recall@{k[6:]}"] = v
    return out


@dataclasses.dataclass
class EvaluationResult:
    """What ``evaluation.zero_shot`` / ``evaluation.retrieval`` return.

    task: "zeroshot_classification" or "zeroshot_retrieval"; metrics: our names (see the module
    docstring); counts: set sizes and skips; settings: how it was run (resize mode, batch size,
    labels, templates, ...); bad_images: the images skipped; details: per-class figures and
    confusion (zero-shot with per_class), texts left unscored (retrieval), files written.
    """

    task: str
    model: str
    dataset: str
    split: str
    metrics: dict[str, float]
    counts: dict[str, int]
    settings: dict[str, Any]
    bad_images: list[BadImage]
    details: dict[str, Any]
    versions: dict[str, str]
    wall_s: float

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "task": self.task,
            "model": self.model,
            "dataset": self.dataset,
            "split": self.split,
            "metrics": {**self.metrics, **clip_benchmark_names(self.metrics)},
            "counts": dict(self.counts),
            "settings": dict(self.settings),
            "bad_images": [b.to_dict() for b in self.bad_images],
            "details": dict(self.details),
            "versions": dict(self.versions),
            "wall_s": self.wall_s,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def __getitem__(self, key: str) -> float:
        """result["top1"]: a metric by name."""
        return self.metrics[key]
