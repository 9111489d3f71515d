"""Calibrating match probabilities (``ccj-eval calibrate``): Platt scaling of cosine scores.

On a held-out retrieval set: every matched (image, text) pair and ``negatives`` sampled
mismatched pairs per matched one (a text with an image that is not among its positives; fixed
``seed``) are scored by cosine similarity, and ``(scale, bias)`` of
``p = sigmoid(scale * cosine + bias)`` are fitted by maximum likelihood (logistic regression on
one feature, Newton's method in float64). The file written (``inference.calibration`` reads it)
holds them, the temperature ``1 / scale``, and the expected calibration error (``ece``, equal
-width bins) before and after: "before" is the model's own sigmoid, ``exp(logit_scale) * cosine
+ logit_bias`` (bias 0 for a softmax-trained model). The probabilities hold for the base rate of
matches in the fitting pairs (``1 / (1 + negatives)``): docs/evaluation.md.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from ..inference.calibration import CALIBRATION_FORMAT, match_probability

__all__ = ["platt_fit", "expected_calibration_error", "sample_pairs", "calibrate", "DEFAULT_BINS"]

DEFAULT_BINS = 15


def platt_fit(scores, labels, *, max_iter: int = 100, tol: float = 1e-10) -> tuple[float, float]:
    """``(scale, bias)`` maximizing the likelihood of ``labels`` (0/1) under
    ``sigmoid(scale * scores + bias)`` (Newton's method; a tiny ridge keeps separable data finite)."""
    x = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels, np.float64).ravel()
    if x.shape != y.shape or x.size == 0:
        raise ValueError(f"scores and labels must be non-empty and of one length, got {x.size} and {y.size}")
    if not ((y == 0) | (y == 1)).all() or y.min() == y.max():
        raise ValueError("labels must be 0/1 with both classes present")
    ridge = 1e-9
    w = np.array([1.0, 0.0])  # scale, bias
    feats = np.stack([x, np.ones_like(x)], axis=1)
    for _ in range(max_iter):
        z = feats @ w
        p = 0.5 * (1.0 + np.tanh(0.5 * z))
        grad = feats.T @ (p - y) + ridge * w
        hess = feats.T @ (feats * (p * (1 - p))[:, None]) + ridge * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w = w - step
        if np.max(np.abs(step)) < tol * (1 + np.max(np.abs(w))):
            break
    return float(w[0]), float(w[1])


def expected_calibration_error(probs, labels, n_bins: int = DEFAULT_BINS) -> float:
    """Sum over equal-width bins of [0, 1] of ``(bin size / N) * |mean label - mean probability|``
    (a probability of exactly 1 falls in the last bin)."""
    p = np.asarray(probs, np.float64).ravel()
    y = np.asarray(labels, np.float64).ravel()
    if p.shape != y.shape or p.size == 0:
        raise ValueError("probs and labels must be non-empty and of one length")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    bins = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            ece += sel.sum() / p.size * abs(y[sel].mean() - p[sel].mean())
    return float(ece)


def sample_pairs(
    text_to_images: list[list[int]], n_images: int, negatives: int = 1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(text index, image index, label) arrays: every (text, positive image) pair (label 1) and,
    per matched pair, ``negatives`` images drawn uniformly from those that are not the text's
    positives (label 0; with replacement, ``np.random.default_rng(seed)``)."""
    rng = np.random.default_rng(seed)
    t_idx, i_idx, lab = [], [], []
    for t, pos in enumerate(text_to_images):
        if not pos:
            continue
        others = np.setdiff1d(np.arange(n_images), np.asarray(pos, np.int64))
        for j in pos:
            t_idx.append(t)
            i_idx.append(int(j))
            lab.append(1)
            if len(others):
                for k in rng.choice(others, size=negatives):
                    t_idx.append(t)
                    i_idx.append(int(k))
                    lab.append(0)
    return np.asarray(t_idx, np.int64), np.asarray(i_idx, np.int64), np.asarray(lab, np.int64)


def calibrate(
    model,
    data,
    output: str | os.PathLike,
    *,
    split: str = "valid",
    negatives: int = 1,
    seed: int = 0,
    n_bins: int = DEFAULT_BINS,
    resize: str | None = None,
    batch_size: int = 64,
    dtype: str = "float32",
    encoding: str = "utf-8",
    max_bad: int | None = None,
    progress: bool | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Fits the calibration on ``data``'s ``split`` (a retrieval set: spec or ``RetrievalSet``),
    writes it to ``output`` (JSON, atomically) and returns what it wrote."""
    from ..data.readers import open_retrieval
    from ..data.sets import RetrievalSet
    from ..io import atomic_write
    from .api import _model, _resize, _retrieval_scores, check_output

    if negatives < 1:
        raise ValueError(f"negatives must be >= 1, got {negatives}")
    if n_bins < 1:
        raise ValueError(f"bins must be >= 1, got {n_bins}")
    check_output(output, "--output", overwrite=overwrite)
    resize = _resize(resize)
    ds = data if isinstance(data, RetrievalSet) else open_retrieval(data, split, encoding)
    clip, model_name = _model(model, dtype)
    scores = _retrieval_scores(clip, ds, resize, batch_size, progress, max_bad)
    texts = scores.text_embeds[scores.scored_texts]
    t, i, y = sample_pairs(scores.text_to_images, len(scores.image_embeds), negatives, seed)
    if y.min() == y.max():
        raise ValueError(f"{ds.source}: calibration needs at least two images (matched and mismatched pairs)")
    cosine = np.sum(texts[t] * scores.image_embeds[i], axis=-1, dtype=np.float64)
    own_bias = float(clip.params["logit_bias"]) if "logit_bias" in clip.params else 0.0
    before = match_probability(cosine, clip.logit_scale, own_bias)
    scale, bias = platt_fit(cosine, y)
    after = match_probability(cosine, scale, bias)
    record = {
        "format": CALIBRATION_FORMAT,
        "scale": scale,
        "bias": bias,
        "temperature": 1.0 / scale if scale else math.inf,
        "ece_before": expected_calibration_error(before, y, n_bins),
        "ece_after": expected_calibration_error(after, y, n_bins),
        "before": {
            "scale": clip.logit_scale,
            "bias": own_bias,
            "what": "the model's own sigmoid: exp(logit_scale) * cosine + logit_bias"
            + ("" if "logit_bias" in clip.params else " (no logit_bias: 0, a softmax-trained model)"),
        },
        "pairs": {"matched": int(y.sum()), "mismatched": int((1 - y).sum()), "base_rate": float(y.mean())},
        "negatives_per_match": negatives,
        "seed": seed,
        "bins": n_bins,
        "model": model_name,
        "data": str(data) if not isinstance(data, RetrievalSet) else ds.source,
        "split": split,
        "resize_mode": resize,
        "bad_images": len(scores.bad_images),
    }
    atomic_write(output, json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    return record
