"""Evaluation datasets read lazily: zero-shot classification sets and retrieval splits.

Classification (``open_classification(spec, split, data_dir)``), spec:
  ``folder:PATH``    one sub-folder per class, classes in sorted folder order, images in any
                     depth below it (jpg/jpeg/png/bmp/gif/webp/tif/tiff); ``PATH/SPLIT`` is used
                     when that directory exists, else ``PATH``.
  ``tfds:NAME``      a prepared TFDS dataset (``NAME``, ``NAME/CONFIG`` or ``NAME:VERSION``) under
                     ``data_dir`` (default ``~/tensorflow_datasets``).
  ``tfds-dir:PATH``  a TFDS dataset directory (with ``dataset_info.json``).
  TFDS sets are read with ``tfds.data_source`` (ArrayRecord, no TensorFlow); the image feature
  and the class-label feature are found by type; label names come from the ClassLabel feature.

Retrieval (``open_retrieval(spec, split)``; the ONE place a spec string becomes a RetrievalSet):
  cn_clip's layout: ``{split}_imgs.tsv`` + ``{split}_texts.jsonl``, or its LMDB build
  (``lmdb/{split}/imgs`` + ``lmdb/{split}/pairs``); the candidate images are every image of
  the split in file (TSV) or key (LMDB) order, as cn_clip's feature extraction reads them.
  A TFDS directory (``dataset_info.json``, or ``{split}``/``*/`` holding one) whose features
  include an image, ``text``, ``image_id`` and ``text_id`` (one record per pair).
  A table of image paths and captions (a path ending in .csv, .tsv or .jsonl, columns "image"
  and "caption"; ``data.files``): the table is the split.

Images stay on disk: ``images[i]`` reads one encoded image (bytes or a path),
so a split of any size costs only its ids and captions in memory. Reading or decoding an image
can fail (a file gone since the listing, a truncated or zero-byte file, bad base64 on a TSV
line): the runner skips and reports it, by ``image_name(i)`` (the path, or the image id and its
TSV line). Caption files are read with ``encoding`` (default UTF-8); a line that does not decode
is an error naming the file, the line and the encoding.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io import first_line

__all__ = [
    "DatasetError",
    "ClassificationSet",
    "RetrievalSet",
    "open_classification",
    "open_retrieval",
    "read_captions",
    "IMAGE_SUFFIXES",
]

logger = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DatasetError(ValueError):
    """A dataset cannot be read as asked; the message names the file or directory."""


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
    as ``metrics.load_retrieval_jsonl`` reads them) with ids image_ids[j]; queries
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


# ------------------------------------------------------------------ classification


def open_classification(spec: str, split: str = "test", data_dir: str | None = None) -> ClassificationSet:
    kind, _, rest = spec.partition(":")
    if not rest or kind not in ("folder", "tfds", "tfds-dir"):
        raise DatasetError(f"--dataset must be folder:PATH, tfds:NAME or tfds-dir:PATH, got {spec!r}")
    if kind == "folder":
        return _folder(Path(rest), split)
    builder = _tfds_builder(kind, rest, data_dir)
    return _tfds_classification(builder, split, spec)


def _folder(root: Path, split: str) -> ClassificationSet:
    if not root.is_dir():
        raise DatasetError(f"no such directory {root} (folder:PATH needs one sub-folder per class)")
    if (root / split).is_dir():
        root = root / split
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{root} has no class sub-folders")
    paths, labels = [], []
    for c, name in enumerate(classes):
        # every listed image name, even one whose file is gone (a dangling link): the runner
        # reports it as a bad image instead of the set silently shrinking
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
        paths += [str(p) for p in files]
        labels += [c] * len(files)
    if not paths:
        raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under the class folders of {root}")
    return ClassificationSet(paths, np.asarray(labels, np.int64), classes, f"folder:{root}", image_names=paths)


def _tfds_builder(kind: str, name: str, data_dir: str | None):
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DatasetError("TFDS datasets need tensorflow-datasets: pip install tensorflow-datasets") from e
    if kind == "tfds-dir":
        if not (Path(name) / "dataset_info.json").is_file():
            raise DatasetError(f"{name} is not a TFDS dataset directory (no dataset_info.json)")
        return tfds.builder_from_directory(name)
    from ..data.tfds_source import builder_by_name

    try:  # a wrong name lists the close matches; an unprepared one names the command that prepares it
        return builder_by_name(name, data_dir, what="--dataset tfds:NAME")
    except (ValueError, FileNotFoundError) as e:
        raise DatasetError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - tfds raises many kinds; the first line says why
        first = first_line(e, with_type=False)
        raise DatasetError(f"tfds:{name} under {data_dir or '~/tensorflow_datasets'}: {first}") from e


def _tfds_source(builder, split: str, decoders=None):
    splits = builder.info.splits
    if split not in splits:
        raise DatasetError(f"{builder.data_dir} has no split {split!r} (splits: {', '.join(sorted(splits))})")
    try:
        return builder.as_data_source(split=split, decoders=decoders)
    except Exception as e:  # noqa: BLE001
        raise DatasetError(f"cannot read split {split!r} of {builder.data_dir}: {type(e).__name__}: {e}") from e


def _features_by_type(builder):
    import tensorflow_datasets as tfds

    features = builder.info.features
    images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
    return features, images, labels


def _tfds_classification(builder, split: str, spec: str) -> ClassificationSet:
    import tensorflow_datasets as tfds

    features, images, labels = _features_by_type(builder)
    if len(images) != 1 or len(labels) != 1:
        raise DatasetError(
            f"{builder.data_dir}: need exactly one Image and one ClassLabel feature, "
            f"found images {images}, labels {labels}"
        )
    image_key, label_key = images[0], labels[0]
    # images stay encoded until the evaluator decodes them; the labels are read in one pass
    source = _tfds_source(builder, split, decoders={image_key: tfds.decode.SkipDecoding()})
    n = len(source)
    label_values = np.asarray([int(source[i][label_key]) for i in range(n)], np.int64)
    return ClassificationSet(
        LazyList(n, lambda i: source[i][image_key]),
        label_values,
        list(features[label_key].names),
        spec,
        image_names=LazyList(n, lambda i: f"{spec} split {split} record {i}"),
    )


# ------------------------------------------------------------------ retrieval


def _files_table(path, *, image_key: str = "image", caption_key: str = "caption") -> RetrievalSet:
    """A ``data.files`` table as a retrieval set: the candidate images are the table's distinct
    images in first-seen order, the queries its distinct captions; a caption's positives are every
    image it is paired with. Image ids are the paths as resolved, text ids the caption's position."""
    from ..data.files import read_image, read_table, retrieval_lists

    try:
        table = read_table(path, image_key=image_key, caption_key=caption_key, what="--data")
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise DatasetError(e.args[0] if e.args else str(e)) from None
    images, texts, positives = retrieval_lists(table)
    return RetrievalSet(
        LazyList(len(images), lambda i: read_image(images[i])),
        images,
        list(range(len(texts))),
        texts,
        positives,
        "files",
        table.path,
        where=lambda j: images[j],
    )


def open_retrieval(spec: str | os.PathLike, split: str = "valid", encoding: str = "utf-8") -> RetrievalSet:
    """Detects the layout of ``spec`` (a directory or a files table; see the module docstring)
    and opens ``split``.

    encoding: of the caption file (``{split}_texts.jsonl``)."""
    from ..data.files import TABLE_SUFFIXES

    if str(spec).lower().endswith(TABLE_SUFFIXES):  # a files table: it is the split
        return _files_table(spec)
    root = Path(spec)
    if not root.is_dir():
        raise DatasetError(f"no such directory {root}")
    tfds_dir = _find_tfds_dir(root, split)
    if tfds_dir is not None:
        return _tfds_retrieval(tfds_dir, split)
    if (root / f"{split}_texts.jsonl").exists() or (root / f"{split}_imgs.tsv").exists():
        return _cn_clip_tsv(root, split, encoding)
    for candidate in (root / "lmdb" / split, root / split):
        if (candidate / "pairs").exists() or (candidate / "imgs").exists():
            return _cn_clip_lmdb(candidate, split)
    raise DatasetError(
        f"{root}: no split {split!r}: expected {root / f'{split}_texts.jsonl'} and "
        f"{root / f'{split}_imgs.tsv'}, {root / 'lmdb' / split}/{{imgs,pairs}}, or a TFDS directory"
    )


def _find_tfds_dir(root: Path, split: str) -> Path | None:
    for candidate in (root, root / split):
        if (candidate / "dataset_info.json").is_file():
            return candidate
    found = sorted(root.glob("*/dataset_info.json")) + sorted(root.glob("*/*/dataset_info.json"))
    return found[0].parent if found else None


def _b64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text)  # cn_clip's encoding; plain base64 decodes the same


def _int_id(x):
    s = str(x)
    return int(s) if s.lstrip("-").isdigit() else s


def read_captions(path: Path, encoding: str = "utf-8") -> tuple[list[tuple[Any, str, list]], list[str]]:
    """``{split}_texts.jsonl`` -> ([(text_id, text, image_ids)], ["file:line: why" of skipped lines]).

    A line that is not a caption object is skipped and reported; a line that does not decode in
    ``encoding`` is an error naming the file, the line and the encoding."""
    if not path.is_file():
        raise DatasetError(f"missing split file {path}")
    captions, skipped = [], []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError as e:
                raise DatasetError(
                    f"{path}:{n}: not {encoding} text (byte {raw[e.start : e.start + 1]!r} at column {e.start + 1}); "
                    "give the file's encoding with --encoding, e.g. --encoding gbk"
                ) from None
            except LookupError:
                raise DatasetError(f"--encoding {encoding}: unknown text encoding") from None
            if n == 1:
                line = line.removeprefix("\ufeff")  # a BOM (Windows editors) is no part of a record
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                ids = obj["image_ids"]
                if not isinstance(obj["text"], str) or not isinstance(ids, list):
                    raise TypeError("'text' must be a string and 'image_ids' a list")
                captions.append((obj["text_id"], obj["text"], ids))
            except (ValueError, KeyError, TypeError) as e:
                skipped.append(f"{path}:{n}: not a caption object ({type(e).__name__}: {e})")
    if skipped:
        logger.warning("%s: %d unreadable caption lines skipped (first: %s)", path, len(skipped), skipped[0])
    return captions, skipped


def _cn_clip_tsv(root: Path, split: str, encoding: str) -> RetrievalSet:
    from ..data.cn_clip import TsvImages

    for f in (root / f"{split}_imgs.tsv", root / f"{split}_texts.jsonl"):
        if not f.is_file():
            raise DatasetError(f"missing split file {f}")
    captions, skipped = read_captions(root / f"{split}_texts.jsonl", encoding)
    counter = [0]  # the count data.cn_clip readers keep
    images = TsvImages(root / f"{split}_imgs.tsv", counter)
    if counter[0]:
        skipped.append(f"{root / f'{split}_imgs.tsv'}: {counter[0]} lines without 'image_id<TAB>base64'")
    ids = images.ids()
    return _retrieval_set(
        LazyList(len(ids), lambda i: _b64(images[ids[i]][0])),
        ids,
        captions,
        "cn_clip-tsv",
        str(root),
        where=lambda i: images[ids[i]][1],
        skipped=skipped,
    )


def _cn_clip_lmdb(directory: Path, split: str) -> RetrievalSet:
    from ..data.cn_clip import LmdbImages, _read_lmdb_pairs

    for f in (directory / "imgs", directory / "pairs"):
        if not f.exists():
            raise DatasetError(f"missing split database {f}")
    images = LmdbImages(directory / "imgs")
    ids = images.ids()
    grouped: dict = {}
    for image_id, text_id, text, _ in _read_lmdb_pairs(directory / "pairs", [0]):
        grouped.setdefault((text_id, text), []).append(image_id)
    captions = [(text_id, text, image_ids) for (text_id, text), image_ids in grouped.items()]
    return _retrieval_set(
        LazyList(len(ids), lambda i: _b64(images[ids[i]][0])),
        ids,
        captions,
        "cn_clip-lmdb",
        str(directory),
        where=lambda i: f"{directory / 'imgs'} key {ids[i]}",
    )


def _retrieval_set(images, ids: list[str], captions, layout: str, source: str, **kw) -> RetrievalSet:
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
        [_int_id(i) for i in ids],
        [_int_id(c[0]) for c in captions],
        [c[1] for c in captions],
        text_to_images,
        layout,
        source,
        **kw,
    )


def _tfds_retrieval(directory: Path, split: str) -> RetrievalSet:
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(directory))
    features, images, _ = _features_by_type(builder)
    needed = {"text", "image_id", "text_id"}
    if len(images) != 1 or not needed <= set(features):
        raise DatasetError(
            f"{directory}: a TFDS retrieval set needs one Image feature and {sorted(needed)}; has {sorted(features)}"
        )
    image_key = images[0]
    source = _tfds_source(builder, split, decoders={image_key: tfds.decode.SkipDecoding()})
    record_of_image: dict[str, int] = {}
    captions: dict[str, tuple[str, list]] = {}
    for r in range(len(source)):  # one pass over ids and captions; images stay encoded, unread
        rec = source[r]
        iid, tid = _text(rec["image_id"]), _text(rec["text_id"])
        record_of_image.setdefault(iid, r)
        captions.setdefault(tid, (_text(rec["text"]), []))[1].append(iid)
    ids = list(record_of_image)
    records = [record_of_image[i] for i in ids]
    return _retrieval_set(
        LazyList(len(ids), lambda i: source[records[i]][image_key]),
        ids,
        [(tid, text, iids) for tid, (text, iids) in captions.items()],
        "tfds",
        str(directory),
        where=lambda i: f"{directory} split {split} record {records[i]}",
    )


def _text(x) -> str:
    if isinstance(x, (bytes, np.bytes_)):
        return bytes(x).decode("utf-8")
    if isinstance(x, np.ndarray):
        x = x.item()
        return x.decode("utf-8") if isinstance(x, bytes) else str(x)
    return str(x)
