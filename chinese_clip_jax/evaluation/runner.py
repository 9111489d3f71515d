"""The one evaluation runner: embed a set through an ``inference.Encoder``, skipping and reporting
bad images, and score it. ``ccj-eval``, ``evaluation.zero_shot`` / ``evaluation.retrieval`` and
the trainer's ``Evaluator`` all call ``zero_shot_scores`` / ``retrieval_scores``.

Bad images: an image that cannot be read or decoded (a file gone since the listing, a zero-byte or
truncated file, bad base64) is skipped and listed as a ``BadImage`` (its index, name and the
first line of the reason). More than ``max_bad`` of them stops the run with ``TooManyBadImages``
naming the first few (``data.bad_records``: default 1% of the images, at least 5). Zero-shot:
the accuracy is over the images that were read. Retrieval: a skipped image is no candidate; a
text whose positives were all skipped is left out of the scores and listed, not counted a miss.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..data.bad_records import TooManyBadRecords, max_bad_limit, too_many
from ..io import first_line
from . import metrics as M

__all__ = [
    "BadImage",
    "TooManyBadImages",
    "embed_images",
    "ZeroShotScores",
    "zero_shot_scores",
    "RetrievalScores",
    "retrieval_scores",
]


@dataclasses.dataclass(frozen=True)
class BadImage:
    index: int  # position in the set
    image: str  # the set's name for it: a path, or an image id and where it is stored
    reason: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class TooManyBadImages(TooManyBadRecords):
    """More images failed to read than allowed (``data.bad_records``); the message names the first few."""


def _why(e: BaseException) -> str:
    """One line: ``first_line`` (type and message), binascii's bare ``Error`` module-qualified."""
    text = first_line(e)
    return f"{type(e).__module__}.{text}" if type(e).__name__ == "Error" else text


class _Unreadable:
    def __init__(self, reason: str):
        self.reason = reason


class _Guarded:
    """items[i], or an ``_Unreadable`` saying why reading it failed (e.g. bad base64)."""

    def __init__(self, items: Sequence[Any]):
        self._items = items

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int):
        try:
            return self._items[i]
        except IndexError:
            raise
        except Exception as e:  # noqa: BLE001 - reported with the image's name
            return _Unreadable(_why(e))


def embed_images(
    encoder,
    images: Sequence[Any],
    preprocess: Callable[[Sequence[Any], int], np.ndarray],
    *,
    name_of: Callable[[int], str] | None = None,
    params=None,
    batch_size: int | None = None,
    progress: bool | None = None,
    max_bad: int | None = None,
    max_bad_flag: str = "--max-bad",
) -> tuple[np.ndarray, list[BadImage]]:
    """-> ((N, D) float32 embeddings, bad images). A bad image's row is meaningless (it was
    embedded from a blank image to keep the batch); the caller drops the rows listed in ``bad``.
    ``max_bad_flag``: the setting the cap's error names (the trainer's ``data.max_bad``).

    ``preprocess(items, start)`` -> float32 (len(items), 3, H, W); a batch that fails is redone
    one image at a time to find the bad ones.
    """
    n = len(images)
    name_of = name_of or (lambda i: f"image {i}")
    limit = max_bad_limit(max_bad, n)
    bad: list[BadImage] = []
    size = encoder.model.config.vision_config.image_size

    def add_bad(i: int, reason: str) -> None:
        bad.append(BadImage(i, name_of(i), reason))
        if len(bad) > limit:
            shown = "; ".join(f"{b.image}: {b.reason}" for b in bad[:3])
            raise TooManyBadImages(too_many(len(bad), n, limit, shown, what="images", flag=max_bad_flag))

    def guarded(chunk, start):
        if not any(isinstance(x, _Unreadable) for x in chunk):
            try:
                return preprocess(chunk, start)
            except Exception:  # noqa: BLE001 - redone one by one below, each failure reported
                pass

        def one(j: int):
            x = chunk[j]
            if isinstance(x, _Unreadable):
                return None, x.reason
            try:
                return np.asarray(preprocess([x], start + j), np.float32)[0], None
            except Exception as e:  # noqa: BLE001
                return None, _why(e)

        with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # PIL frees the GIL
            results = list(pool.map(one, range(len(chunk))))
        rows: list[np.ndarray | None] = []
        for j, (row, reason) in enumerate(results):
            rows.append(row)
            if reason is not None:
                add_bad(start + j, reason)
        shape = next((r.shape for r in rows if r is not None), (3, size, size))
        return np.stack([np.zeros(shape, np.float32) if r is None else r for r in rows])

    embeds = encoder.encode_images(_Guarded(images), guarded, params=params, batch_size=batch_size, progress=progress)
    return embeds, bad


@dataclasses.dataclass
class ZeroShotScores:
    metrics: dict[str, float]  # top1, top5, mean_per_class_recall (fractions, over the read images)
    bad_images: list[BadImage]
    predictions: np.ndarray  # (N,) top-1 class per image of the set; -1 for a bad image
    per_class_recall: np.ndarray  # (C,) NaN for a class without read images
    support: np.ndarray  # (C,) read images per class
    confusion: np.ndarray  # (C, C) [true, predicted] counts over the read images


def _embed_readable(encoder, images, preprocess, name_of, params, batch_size, progress, max_bad, max_bad_flag):
    """``embed_images`` plus the mask of the images that were read (False where one was skipped)."""
    embeds, bad = embed_images(
        encoder,
        images,
        preprocess,
        name_of=name_of,
        params=params,
        batch_size=batch_size,
        progress=progress,
        max_bad=max_bad,
        max_bad_flag=max_bad_flag,
    )
    ok = np.ones(len(images), bool)
    ok[[b.index for b in bad]] = False
    return embeds, bad, ok


def zero_shot_scores(
    encoder,
    images: Sequence[Any],
    labels,
    class_prompts: Sequence[Sequence[str]],
    *,
    tokenize: Callable[[list[str]], dict],
    preprocess: Callable[[Sequence[Any], int], np.ndarray],
    name_of: Callable[[int], str] | None = None,
    params=None,
    batch_size: int | None = None,
    progress: bool | None = None,
    max_bad: int | None = None,
    max_bad_flag: str = "--max-bad",
    topk: Sequence[int] = (1, 5),
) -> ZeroShotScores:
    """Prompt-ensemble class embeddings of ``class_prompts`` (prompts per class, ``tokenize``d),
    the set's image embeddings, and their scores."""
    labels = np.asarray(labels, np.int64)
    if len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    classes = encoder.class_embeddings(class_prompts, tokenize, params=params, batch_size=batch_size, progress=False)
    cap = (max_bad, max_bad_flag)
    embeds, bad, ok = _embed_readable(encoder, images, preprocess, name_of, params, batch_size, progress, *cap)
    if not ok.any():
        raise TooManyBadImages(
            f"none of the {len(labels)} images could be read; first: {bad[0].image}: {bad[0].reason}"
        )
    acc = M.zero_shot_accuracy(embeds[ok], classes, labels[ok], topk=topk)
    top1 = M.topk_indices(embeds[ok], classes, 1)[:, 0]
    c = len(classes)
    predictions = np.full(len(labels), -1, np.int64)
    predictions[ok] = top1
    acc["mean_per_class_recall"] = M.mean_per_class_recall(top1, labels[ok], c)
    return ZeroShotScores(
        metrics=acc,
        bad_images=bad,
        predictions=predictions,
        per_class_recall=M.per_class_recall(top1, labels[ok], c),
        support=np.bincount(labels[ok], minlength=c),
        confusion=M.confusion_matrix(top1, labels[ok], c),
    )


@dataclasses.dataclass
class RetrievalScores:
    metrics: dict[str, float]  # t2i_R@k, i2t_R@k, mean_recall
    bad_images: list[BadImage]
    texts_without_images: list[int]  # texts whose positives were all bad images (not scored)
    text_embeds: np.ndarray  # (T, D) every text of the set
    image_embeds: np.ndarray  # (M', D) the read images only
    image_index: np.ndarray  # (M',) their indices in the set
    scored_texts: np.ndarray  # indices of the texts scored
    text_to_images: list[list[int]]  # positives of the scored texts, indices into image_embeds


def retrieval_scores(
    encoder,
    images: Sequence[Any],
    text_tokens: dict,
    text_to_images: Sequence[Sequence[int]],
    *,
    preprocess: Callable[[Sequence[Any], int], np.ndarray],
    name_of: Callable[[int], str] | None = None,
    params=None,
    batch_size: int | None = None,
    progress: bool | None = None,
    max_bad: int | None = None,
    max_bad_flag: str = "--max-bad",
) -> RetrievalScores:
    """``text_tokens``: {"input_ids", "attention_mask"[, "token_type_ids"]} (T, L) of the texts."""
    texts = encoder.encode_text(
        text_tokens["input_ids"],
        text_tokens["attention_mask"],
        text_tokens.get("token_type_ids"),
        params=params,
        batch_size=batch_size,
        progress=progress,
    )
    if len(text_to_images) != len(texts):
        raise ValueError(f"text_to_images has {len(text_to_images)} entries for {len(texts)} texts")
    cap = (max_bad, max_bad_flag)
    embeds, bad, ok = _embed_readable(encoder, images, preprocess, name_of, params, batch_size, progress, *cap)
    new_index = np.cumsum(ok) - 1  # set index -> index among the read images
    scored, positives, orphaned = [], [], []
    for t, pos in enumerate(text_to_images):
        kept = [int(new_index[j]) for j in pos if ok[j]]
        if pos and not kept:
            orphaned.append(t)  # its only images were skipped: reported, not a miss
            continue
        scored.append(t)
        positives.append(kept)
    if not scored or not ok.any():
        raise TooManyBadImages("no text has a readable image: nothing to score")
    image_index = np.flatnonzero(ok)
    rec = M.retrieval_metrics(texts[scored], embeds[ok], positives)
    return RetrievalScores(
        metrics=rec,
        bad_images=bad,
        texts_without_images=orphaned,
        text_embeds=texts,
        image_embeds=embeds[ok],
        image_index=image_index,
        scored_texts=np.asarray(scored, np.int64),
        text_to_images=positives,
    )
