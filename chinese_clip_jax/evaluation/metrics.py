"""Retrieval recall and zero-shot accuracy from embeddings, as cn_clip's evaluation scripts.

Definitions (cn_clip `eval/evaluation.py`, `evaluation_tr.py`, `zeroshot_evaluation.py`):

* text-to-image R@K: the fraction of texts with at least one of their positive images among
  the K highest-scoring images (all images are candidates). A text with no positive counts as
  a miss, as in cn_clip (it stays in the denominator).
* image-to-text R@K: the same with images as queries and all texts as candidates, over the
  images that are the positive of at least one text (cn_clip builds its image-to-text reference
  from the text annotations, so images without a text are not queries).
* mean_recall: the mean of the six recalls.
* zero-shot top-k: the fraction of images whose label is among the k highest-scoring classes.
* per-class recall of class c: the fraction of c's images whose top-1 class is c; mean per-class
  recall: its mean over the classes that have at least one image (balanced accuracy, what
  clip_benchmark reports as ``mean_per_class_recall``; the headline for imbalanced sets).

Scores are dot products of the embeddings as given (pass L2-normalized embeddings for cosine
similarity). Ties are broken deterministically by index: among equal scores the candidate with
the lower index ranks first (what cn_clip's stable `sorted` over image order does). Identical
vectors score bit-identically: exact duplicate rows (of the queries and of the candidates) are
scored once and share that score, because a matrix product can give the same vector scores
1-2 ulp apart at different positions, which would break the tie rule.

Memory is bounded: scores are computed block by block (block_size x block_size floats) while a
running top-10 per query is kept; the full N x M similarity matrix is never materialized.
All results are fractions in [0, 1].
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ..data.sets import RetrievalSet

__all__ = [
    "RECALL_KS",
    "retrieval_metrics",
    "zero_shot_accuracy",
    "topk_indices",
    "per_class_recall",
    "mean_per_class_recall",
    "confusion_matrix",
    "load_retrieval_jsonl",
]

RECALL_KS = (1, 5, 10)


def _as_embeddings(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _unique_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows of x without exact duplicates, in first-occurrence order; inverse: x == unique[inverse])."""
    x = np.ascontiguousarray(x)
    keys = x.view(np.dtype((np.void, x.dtype.itemsize * x.shape[1]))).ravel()
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # unique id (sorted by bytes) -> rank of first occurrence
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return x[first[order]], rank[inverse.ravel()]


def topk_indices(queries, candidates, k: int, block_size: int = 2048) -> np.ndarray:
    """(N, D), (M, D) -> (N, min(k, M)) candidate indices by descending score, ties by lower index.

    Exact duplicate rows are scored once, so identical vectors always score identically.
    """
    queries = _as_embeddings(queries, "queries")
    candidates = _as_embeddings(candidates, "candidates")
    uq, q_inv = _unique_rows(queries)
    uc, c_inv = _unique_rows(candidates)
    k = min(k, len(candidates))
    if len(uc) == len(candidates):  # no duplicate candidates: unique order is the index order
        return _topk_distinct(uq, uc, k, block_size)[q_inv]
    # rank unique candidates (first occurrence order = lowest member index), then expand each to its
    # members; k unique candidates always hold the top k members (each has >= 1 member)
    top_u, score_u = _topk_distinct(uq, uc, k, block_size, return_scores=True)
    order = np.argsort(c_inv, kind="stable")  # member indices grouped by unique candidate, ascending
    starts = np.searchsorted(c_inv[order], np.arange(len(uc)))
    ends = np.append(starts[1:], len(order))
    out = np.empty((len(uq), k), np.int64)
    for r in range(len(uq)):
        members = [order[starts[u] : ends[u]] for u in top_u[r]]
        idx = np.concatenate(members)
        sc = np.repeat(score_u[r], [len(m) for m in members])
        out[r] = idx[np.lexsort((idx, -sc))[:k]]
    return out[q_inv]


def _topk_distinct(queries: np.ndarray, candidates: np.ndarray, k: int, block_size: int, return_scores: bool = False):
    """(N, D), (M, D) -> (N, min(k, M)) candidate indices by descending score, ties by lower index."""
    n, m = len(queries), len(candidates)
    k = min(k, m)
    out = np.empty((n, k), np.int64)
    out_s = np.empty((n, k), np.float32)
    for q0 in range(0, n, block_size):
        q = queries[q0 : q0 + block_size]
        best_s = np.empty((len(q), 0), np.float32)
        best_i = np.empty((len(q), 0), np.int64)
        for c0 in range(0, m, block_size):  # increasing index order: needed for the tie rule
            s = q @ candidates[c0 : c0 + block_size].T
            bs, bi = _block_topk(s, k)
            s_cat = np.concatenate([best_s, bs], axis=1)
            i_cat = np.concatenate([best_i, bi + c0], axis=1)
            # stable: for equal scores the earlier (lower-index) entries stay first
            order = np.argsort(-s_cat, axis=1, kind="stable")[:, :k]
            best_s = np.take_along_axis(s_cat, order, axis=1)
            best_i = np.take_along_axis(i_cat, order, axis=1)
        out[q0 : q0 + len(q)] = best_i
        out_s[q0 : q0 + len(q)] = best_s
    return (out, out_s) if return_scores else out


def _block_topk(s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of s (B, C): the min(k, C) best (score, column), by descending score then column."""
    b, c = s.shape
    k = min(k, c)
    kth = np.partition(s, c - k, axis=1)[:, c - k][:, None]  # k-th largest value per row
    greater = s > kth
    equal = s == kth
    room = k - greater.sum(axis=1, keepdims=True)
    chosen = greater | (equal & (np.cumsum(equal, axis=1) <= room))  # exactly k per row
    cols = np.nonzero(chosen)[1].reshape(b, k)  # row-major: columns ascending
    scores = np.take_along_axis(s, cols, axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(cols, order, axis=1)


def _recalls(top: np.ndarray, positives: Sequence[Sequence[int]], ks=RECALL_KS) -> list[float]:
    """top (Q, k) ranked candidates; positives[q] candidate indices -> [R@k for k in ks]."""
    n_queries, width = top.shape
    if n_queries == 0:
        return [0.0 for _ in ks]
    width = max(width, 1)
    rows = np.repeat(np.arange(n_queries), [len(p) for p in positives])
    cols = np.fromiter((c for p in positives for c in p), np.int64, count=len(rows))
    stride = max(int(top.max(initial=0)), int(cols.max(initial=0))) + 1  # codes q * stride + c
    pos_codes = rows * stride + cols
    hit = np.isin(np.arange(n_queries)[:, None] * stride + top, pos_codes)  # (Q, k)
    first_hit = np.where(hit.any(axis=1), hit.argmax(axis=1), width + max(ks))
    return [float(np.mean(first_hit < kk)) for kk in ks]


def retrieval_metrics(
    text_embeds, image_embeds, text_to_images: Sequence[Sequence[int]], block_size: int = 2048
) -> dict[str, float]:
    """Text-image retrieval recall with several positives per query.

    text_embeds: (N, D); image_embeds: (M, D); text_to_images[i]: indices into image_embeds of
    the positive images of text i. block_size bounds memory to ~block_size^2 float32 scores.
    Returns "t2i_R@1/5/10", "i2t_R@1/5/10" and "mean_recall" (the mean of the six), in [0, 1].
    """
    texts = _as_embeddings(text_embeds, "text_embeds")
    images = _as_embeddings(image_embeds, "image_embeds")
    if texts.shape[1] != images.shape[1]:
        raise ValueError(f"embedding sizes differ: text {texts.shape[1]}, image {images.shape[1]}")
    if len(text_to_images) != len(texts):
        raise ValueError(f"text_to_images has {len(text_to_images)} entries for {len(texts)} texts")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if len(texts) == 0 or len(images) == 0:
        raise ValueError("retrieval needs at least one text and one image")
    t2i = []
    i2t: list[list[int]] = [[] for _ in range(len(images))]
    for t, imgs in enumerate(text_to_images):
        imgs = [int(j) for j in imgs]
        bad = [j for j in imgs if not 0 <= j < len(images)]
        if bad:
            raise ValueError(f"text {t}: image index {bad[0]} out of range [0, {len(images)})")
        t2i.append(sorted(set(imgs)))
        for j in t2i[-1]:
            i2t[j].append(t)
    k = max(RECALL_KS)
    t2i_r = _recalls(topk_indices(texts, images, k, block_size), t2i)
    queried = np.array([j for j in range(len(images)) if i2t[j]], np.int64)
    i2t_r = _recalls(topk_indices(images[queried], texts, k, block_size), [i2t[j] for j in queried])
    out = {f"t2i_R@{kk}": r for kk, r in zip(RECALL_KS, t2i_r)}
    out.update({f"i2t_R@{kk}": r for kk, r in zip(RECALL_KS, i2t_r)})
    out["mean_recall"] = float(np.mean(t2i_r + i2t_r))
    return out


def zero_shot_accuracy(
    image_embeds, class_embeds, labels, topk: Sequence[int] = (1, 5), block_size: int = 2048
) -> dict[str, float]:
    """Zero-shot classification accuracy from embeddings.

    image_embeds: (N, D); class_embeds: (C, D) (one, e.g. template-averaged, embedding per
    class); labels: (N,) ints in [0, C). Returns {"top1": ..., "top5": ...} (one key per k in
    topk), fractions in [0, 1]. k > C counts every image as correct at k. Ties: lower class
    index first.
    """
    images = _as_embeddings(image_embeds, "image_embeds")
    classes = _as_embeddings(class_embeds, "class_embeds")
    labels = np.asarray(labels)
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be {len(images)} integers, got shape {labels.shape} {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        raise ValueError(f"labels must be in [0, {len(classes)}), got range [{labels.min()}, {labels.max()}]")
    if images.shape[1] != classes.shape[1]:
        raise ValueError(f"embedding sizes differ: image {images.shape[1]}, class {classes.shape[1]}")
    if len(images) == 0:
        raise ValueError("no images")
    ks = tuple(int(k) for k in topk)
    if any(k < 1 for k in ks):
        raise ValueError(f"topk values must be >= 1, got {ks}")
    top = topk_indices(images, classes, max(ks), block_size)
    hit = top == labels[:, None]
    return {f"top{k}": float(hit[:, :k].any(axis=1).mean()) for k in ks}


def _check_predictions(predicted, labels, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    if predicted.shape != labels.shape or predicted.ndim != 1:
        raise ValueError(f"predicted {predicted.shape} and labels {labels.shape} must be the same (N,) shape")
    for name, x in (("predicted", predicted), ("labels", labels)):
        if x.size and (not np.issubdtype(x.dtype, np.integer) or x.min() < 0 or x.max() >= num_classes):
            raise ValueError(f"{name} must be integers in [0, {num_classes})")
    return predicted.astype(np.int64), labels.astype(np.int64)


def confusion_matrix(predicted, labels, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts: [true class, predicted class]."""
    predicted, labels = _check_predictions(predicted, labels, num_classes)
    out = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(out, (labels, predicted), 1)
    return out


def per_class_recall(predicted, labels, num_classes: int) -> np.ndarray:
    """(C,) float64: per class, the fraction of its images predicted as it (NaN: no image)."""
    cm = confusion_matrix(predicted, labels, num_classes)
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


def mean_per_class_recall(predicted, labels, num_classes: int) -> float:
    """Mean of ``per_class_recall`` over the classes with at least one image."""
    r = per_class_recall(predicted, labels, num_classes)
    if np.all(np.isnan(r)):
        raise ValueError("no images")
    return float(np.nanmean(r))


def load_retrieval_jsonl(path: str | os.PathLike, image_ids: Sequence | None = None) -> RetrievalSet:
    """Reads a MUGE / Flickr30K-CN / COCO-CN `*_texts.jsonl` file as a ``RetrievalSet`` of
    annotations only (``images`` is None: the embeddings come from elsewhere).

    Each line: {"text_id": int, "text": str, "image_ids": [int, ...]}. image_ids, when given,
    is the image pool in embedding order (e.g. the order of the split's image tsv); otherwise
    the pool is the sorted set of image ids the annotations mention. The lines are read by the one
    caption parser (``data.cn_clip.read_captions``); here a line that is not a caption is an error.
    """
    from ..data.cn_clip import read_captions

    skipped: list = [0, None]  # the count and (from index 2) the reasons
    records = [(text_id, text, list(ids)) for text_id, text, ids, _ in read_captions(path, skipped)]
    if skipped[0]:
        raise ValueError(skipped[2])
    if image_ids is None:
        image_ids = sorted({i for _, _, ids in records for i in ids})
    index = {iid: j for j, iid in enumerate(image_ids)}
    if len(index) != len(image_ids):
        raise ValueError("image_ids contains duplicates")
    text_to_images = []
    for text_id, _, ids in records:
        missing = [i for i in ids if i not in index]
        if missing:
            raise ValueError(f"text_id {text_id}: image id {missing[0]} is not in the image pool")
        text_to_images.append([index[i] for i in ids])
    return RetrievalSet(
        images=None,
        image_ids=list(image_ids),
        text_ids=[r[0] for r in records],
        texts=[r[1] for r in records],
        text_to_images=text_to_images,
        layout="jsonl",
        source=str(path),
    )
