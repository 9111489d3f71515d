"""What a data-set spec opens as, besides training pairs: the set types every reader returns.

``ClassificationSet`` (zero-shot: images and class labels), ``RetrievalSet`` (images, captions
and each caption's positives), ``ImageCorpus`` / ``TextCorpus`` (records to embed, in a fixed
order). ``readers`` opens a spec as one of them; each source module builds its own.

Images stay where they are: ``images[i]`` reads one encoded image (bytes, base64 text or a
path) on access, so a set of any size costs only its ids and captions in memory. A record that
cannot be read is not an error here: the consumer skips, counts and names it
(``bad_records``), by ``image_name(i)`` (the path, or the image id and where it is stored).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "DatasetError",
    "LazyList",
    "ClassificationSet",
    "RetrievalSet",
    "ImageCorpus",
    "TextCorpus",
    "retrieval_set",
    "retrieval_eval_set",
    "int_id",
    "as_text",
]

logger = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset cannot be read as asked; the message (one line) names the spec, file or directory."""


class LazyList:
    """``seq[i]`` -> ``read(i)``; ``len(seq) == n``."""

    def __init__(self, n: int, read: Callable[[int], Any]):
        self._n, self._read = n, read

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int):
        if not 0 <= i < self._n:
            raise IndexError(i)
        return self._read(i)


@dataclasses.dataclass
class ClassificationSet:
    """images[i] (lazy: paths, encoded bytes or uint8 arrays) has class labels[i], an index into
    class_names. image_names[i] names it in reports (default: "image i")."""

    images: Sequence[Any]
    labels: np.ndarray  # int (N,)
    class_names: list[str]
    source: str
    image_names: Sequence[str] | None = None

    def image_name(self, i: int) -> str:
        return str(self.image_names[i]) if self.image_names is not None else f"image {i}"


@dataclasses.dataclass
class RetrievalSet:
    """Candidates images[j] (lazy: encoded images, candidate order; None for annotations only,
    as ``evaluation.metrics.load_retrieval_jsonl`` reads them) with ids image_ids[j]; queries
    texts[t] (ids text_ids[t]) whose positives are text_to_images[t] (indices into images).
    ``where(j)``: where image j is stored (e.g. "valid_imgs.tsv:12"), for reports.
    ``skipped``: lines of the set's files that could not be read (reported, not scored)."""

    images: Sequence[Any] | None
    image_ids: list
    text_ids: list
    texts: list[str]
    text_to_images: list[list[int]]
    layout: str
    source: str
    where: Callable[[int], str] | None = None
    skipped: list[str] = dataclasses.field(default_factory=list)

    def image_name(self, j: int) -> str:
        place = ""
        if self.where is not None:
            try:
                place = f" ({self.where(j)})"
            except Exception:  # noqa: BLE001 - a report must not fail on the place of a bad image
                place = ""
        return f"image {self.image_ids[j]}{place}"


@dataclasses.dataclass
class ImageCorpus:
    """``records[i]`` -> {"id": ..., "image": encoded bytes / base64 text} or {"id", "error"}."""

    records: Sequence[dict]
    source: str  # the spec, paths made absolute (recorded in the manifest)

    def __len__(self) -> int:
        return len(self.records)


@dataclasses.dataclass
class TextCorpus:
    ids: list
    texts: list[str | None]  # None: an unreadable line (listed as bad)
    source: str

    def __len__(self) -> int:
        return len(self.ids)


def int_id(x):
    """An id as the files spell it: digits become an int, anything else stays a string."""
    s = str(x)
    return int(s) if s.lstrip("-").isdigit() else s


def as_text(x) -> str:
    """A TFDS text / id feature (bytes, numpy bytes or scalar) as str."""
    if isinstance(x, (bytes, np.bytes_)):
        return bytes(x).decode("utf-8")
    if isinstance(x, np.ndarray):
        x = x.item()
        return x.decode("utf-8") if isinstance(x, bytes) else str(x)
    return str(x)


def retrieval_set(images, ids: list, captions, layout: str, source: str, **kw) -> RetrievalSet:
    """A RetrievalSet from candidate ``images`` (ids ``ids``, in candidate order) and ``captions``
    [(text_id, text, image_ids)] in caption order; image ids a caption names that are not among
    the candidates are ignored (with a warning)."""
    if not ids:
        raise DatasetError(f"{source}: the split has no images")
    if not captions:
        raise DatasetError(f"{source}: the split has no captions")
    slot = {str(i): j for j, i in enumerate(ids)}
    text_to_images, missing = [], 0
    for _, _, image_ids in captions:
        found = [slot[str(i)] for i in image_ids if str(i) in slot]
        missing += len(image_ids) - len(found)
        text_to_images.append(sorted(set(found)))
    if missing:
        logger.warning("%s: %d caption image ids are not among the split's images (ignored)", source, missing)
    return RetrievalSet(
        images,
        [int_id(i) for i in ids],
        [int_id(c[0]) for c in captions],
        [c[1] for c in captions],
        text_to_images,
        layout,
        source,
        **kw,
    )


def retrieval_eval_set(rset: RetrievalSet, context_length: int, max_texts: int = 0) -> dict:
    """A RetrievalSet as the trainer's eval set: {"images" (lazy candidates), "image_ids",
    "image_name" (names image k in reports), "input_ids", "attention_mask" int32 (t, L), "texts",
    "text_to_images"}; captions with no candidate image are left out (they cannot be scored).

    ``max_texts`` (the trainer's one cap, ``eval_max_texts`` / ``eval_max_samples``): > 0 and fewer
    than the set's captions keeps the first ``max_texts`` captions, in the set's order, and as
    candidates the images those captions name, in the set's order (a sub-sequence of
    ``rset.image_ids``). Otherwise (<= 0, or the set is that small) the set is used whole: the
    same candidates, in the same order, as ``ccj-eval retrieval`` scores."""
    from .pipeline import CachingTokenizer

    kept = [t for t, positives in enumerate(rset.text_to_images) if positives]
    if not kept:
        raise DatasetError(f"{rset.source}: no caption has an image among the split's candidates")
    positives = [rset.text_to_images[t] for t in kept]
    images, image_ids, image_name = rset.images, list(rset.image_ids), rset.image_name
    if 0 < int(max_texts) < len(kept):
        kept, positives = kept[: int(max_texts)], positives[: int(max_texts)]
        chosen = sorted({j for p in positives for j in p})
        slot = {j: k for k, j in enumerate(chosen)}
        positives = [[slot[j] for j in p] for p in positives]
        images = LazyList(len(chosen), lambda k: rset.images[chosen[k]])
        image_ids = [rset.image_ids[j] for j in chosen]

        def image_name(k: int) -> str:
            return rset.image_name(chosen[k])

    texts = [rset.texts[t] for t in kept]
    return {
        "images": images,
        "image_ids": image_ids,
        "image_name": image_name,
        **CachingTokenizer(context_length)(texts),
        "texts": texts,
        "text_to_images": positives,
    }
