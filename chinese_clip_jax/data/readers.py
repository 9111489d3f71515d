"""Open a data-set spec (``spec``'s grammar) as what its kind offers (``registry.offers``):

    open_retrieval("cn_clip:ROOT@valid")        -> RetrievalSet     (ccj-eval retrieval, the trainer)
    open_classification("folder:imgs/")         -> ClassificationSet (ccj-eval zeroshot)
    open_images("files:pairs.csv")              -> ImageCorpus      (ccj-embed --images)
    read_texts("captions.txt")                  -> TextCorpus       (ccj-embed --texts)
    training_keys("files:pairs.csv")            -> ("files", {"table": ...})   (ccj-train data.spec)

Every consumer opens a spec here, so the same spec means the same records in the same order
in ``ccj-eval``, ``ccj-embed``, ``data.build`` and the trainer's eval set. Errors are one-line
``DatasetError`` / ``SpecError`` (both ValueErrors) naming the spec, file or directory.

Text corpora (``read_texts``): ``.jsonl`` with one ``{"text_id": ..., "text": ...}`` per line
(cn_clip's ``{split}_texts.jsonl``; ``id`` is accepted for ``text_id``), else one text per line
with id = the line number (from 0). A record that cannot be read is kept as bad (skipped and
listed by the consumer), never an error for the whole run; a file not in ``encoding`` is.
"""

from __future__ import annotations

import json
from typing import Any

from ..io import as_path
from . import registry
from .sets import ClassificationSet, DatasetError, ImageCorpus, RetrievalSet, TextCorpus
from .spec import KINDS, Spec, SpecError, resolve
from .text import TextDecodeError, decoded_lines

__all__ = ["open_retrieval", "open_classification", "open_images", "read_texts", "training_keys", "kinds_offering"]


def kinds_offering(what: str) -> tuple[str, ...]:
    """The spec kinds whose ``Offers`` has ``what`` ("retrieval", "classification", "images", "training")."""
    return tuple(k for k in KINDS if getattr(registry.offers(k), what) is not None)


def _reader(spec_text, what: str, task: str, default_split: str | None, flag: str):
    spec = spec_text if isinstance(spec_text, Spec) else resolve(spec_text, what=flag, default_split=default_split)
    if isinstance(spec_text, Spec) and spec.split is None:
        spec = spec.with_split(default_split)
    reader = getattr(registry.offers(spec.kind), what)
    if reader is None:
        raise SpecError(
            f"{flag} {spec.text or spec}: a {spec.kind} spec offers no {task} "
            f"(kinds that do: {', '.join(kinds_offering(what))})"
        )
    return spec, reader


def open_retrieval(
    spec, split: str | None = "valid", encoding: str = "utf-8", *, what: str = "--data", **options
) -> RetrievalSet:
    """A retrieval split: images, captions and each caption's positives. ``split``: the default
    for a spec without ``@SPLIT``; ``encoding``: of the caption files; ``options``: what a
    trainer source's keys add that the grammar cannot spell (``source.EvalSplit.options``)."""
    spec, reader = _reader(spec, "retrieval", "retrieval split (images + captions)", split, what)
    try:
        return reader(spec, encoding=encoding, **options)
    except TextDecodeError as e:
        raise DatasetError(str(e)) from None


def open_classification(
    spec, split: str | None = "test", data_dir: str | None = None, *, what: str = "--data"
) -> ClassificationSet:
    """A classification set; ``data_dir``: the TFDS data directory of ``tfds:NAME``."""
    spec, reader = _reader(spec, "classification", "classification set (images + class labels)", split, what)
    return reader(spec, data_dir=data_dir)


def open_images(spec, split: str | None = "train", encoding: str = "utf-8", *, what: str = "--images") -> ImageCorpus:
    """An image corpus: records {"id", "image"} (or {"id", "error"}) in a fixed order."""
    spec, reader = _reader(spec, "images", "image corpus", split, what)
    try:
        return reader(spec, encoding=encoding)
    except (TextDecodeError, DatasetError) as e:  # named as ccj-embed names it: "--images SPEC: ..."
        text = str(e)
        raise DatasetError(text if text.startswith(what) else f"{what} {text}") from None


def training_keys(spec, split: str | None = "train", *, what: str = "data.spec") -> tuple[str, dict]:
    """(``data.name``, {``data.<name>`` key: value}) that train on ``spec``'s pairs."""
    spec, reader = _reader(spec, "training", "training pairs (images + captions)", split, what)
    try:
        return reader(spec)
    except (FileNotFoundError, DatasetError) as e:
        raise SpecError(f"{what} {spec.text or spec}: {e}") from None


def read_texts(path, encoding: str = "utf-8", *, what: str = "--texts") -> TextCorpus:
    """A text file (module docstring) -> ``TextCorpus``; raises ``DatasetError`` (one line)."""
    f = as_path(path, what=what)
    if not f.is_file():
        raise DatasetError(f"{what} {path}: no such file {f}")
    try:
        lines = [line for _, line in decoded_lines(f, encoding=encoding, what=what)]
    except TextDecodeError as e:
        raise DatasetError(str(e)) from None
    ids: list[Any] = []
    texts: list[str | None] = []
    if f.suffix == ".jsonl":
        for n, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                text, text_id = obj["text"], obj["text_id"] if "text_id" in obj else obj["id"]
            except (ValueError, KeyError, TypeError):
                ids.append(f"line {n + 1}")  # listed as bad: not a {"text_id", "text"} object
                texts.append(None)
                continue
            ids.append(text_id)
            texts.append(text if isinstance(text, str) and text.strip() else None)
    else:
        ids = list(range(len(lines)))
        texts = [line if line.strip() else None for line in lines]
    if not ids:
        raise DatasetError(f"{what} {path}: {f} holds no texts")
    return TextCorpus(ids, texts, f"texts:{f}")
