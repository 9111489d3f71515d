"""Your own image files and a table of captions (``.csv``, ``.tsv`` or ``.jsonl``), as a source.

    image,caption                      {"image": "imgs/1.jpg", "caption": "一只猫"}
    imgs/1.jpg,一只猫                  {"image": "imgs/2.jpg", "caption": ["狗", "一只狗在跑"]}
    imgs/1.jpg,猫在睡觉

One row per image with its caption; several captions per image as one row each or as a list
(a JSON list in JSONL, or a cell holding a JSON list ``["a", "b"]`` in CSV/TSV). An image is a
path, absolute or relative to the table's folder, local or ``gs://`` (any ``etils.epath``
scheme, as the table itself). A training sample is one (image, caption) pair.

Checked before any work (one-line errors naming the table, the row and the column): the columns
exist, every row has an image and a caption, and a sample of the image paths (the first rows and
rows spread over the table) exist. Later, an image that is missing or cannot be decoded is
skipped and counted by the pipeline, as with every source.

Config keys (``data.files.*``): ``table`` (the training table), ``image_key`` / ``caption_key``
(column names, default "image" / "caption"), ``label_key`` (an optional column, default "label":
a class or group id per row that ``loss_positives="label"`` makes positives of each other; rows
with an empty cell are skipped under that setting), ``eval_table`` (a table for retrieval eval during
training, read as ``ccj-eval retrieval --data files:EVAL_TABLE`` reads it; "" = none),
``eval_max_samples`` (at most this many of its captions: ``sets.retrieval_eval_set``).
``python -m chinese_clip_jax.data.build TABLE OUT --format files`` converts a table to
TFDS/ArrayRecord; ``ccj-eval retrieval --data TABLE`` scores a model on one (``readers.open_retrieval``).
"""

from __future__ import annotations

import csv
import io
import json
import os

from ..io import as_path, is_local
from .folder import FileImages
from .sets import DatasetError, ImageCorpus, LazyList, RetrievalSet
from .source import EvalSplit, Offers, Source
from .spec import Spec
from .text import read_text

__all__ = ["TABLE_SUFFIXES", "Table", "read_table", "read_image", "retrieval_lists", "FilesSource"]

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl")
SAMPLE_ROWS = 16  # image paths checked before work: the first 8 rows and 8 spread over the table


class Table:
    """A parsed table: ``rows`` [(image path, [captions], row number)] with image paths resolved
    (absolute, or the table's folder joined with a relative one); row numbers count from 1 as a
    spreadsheet shows them (the CSV/TSV header is row 1, a JSONL file's first line is row 1)."""

    def __init__(
        self, path: str, rows: list[tuple[str, list[str], int]], image_key: str, caption_key: str, labels=None
    ):
        self.path, self.rows, self.image_key, self.caption_key = path, rows, image_key, caption_key
        self.labels = labels or {}  # row number -> the label column's value, where the table has one

    def where(self, row: int, key: str | None = None) -> str:
        return f"{self.path} row {row}" + (f", column {key!r}" if key else "")


def _resolve(table_path, image: str) -> str:
    if not is_local(image) or os.path.isabs(image):
        return image
    return os.fspath(as_path(table_path).parent / image)


def _captions(value, where: str) -> list[str]:
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass  # a caption that starts with "["
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise ValueError(f"{where}: a caption must be a non-empty string or a list of them, got {value!r}")
    return [v.strip() for v in values]


def _rows(path, text: str, suffix: str, image_key: str, caption_key: str):
    """Yields (row number, {column: value}) from the table's text; checks the columns first."""
    if suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} row {n}: not a JSON object ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path} row {n}: not a JSON object, got {type(row).__name__}")
            for key in (image_key, caption_key):
                if key not in row:
                    raise KeyError(f"{path} row {n}: no column {key!r} (columns: {sorted(row)})")
            yield n, row
        return
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
    columns = reader.fieldnames or []
    for key in (image_key, caption_key):
        if key not in columns:
            raise KeyError(f"{path}: no column {key!r} (columns: {columns})")
    for n, row in enumerate(reader, 2):
        yield n, row


def read_table(
    path,
    *,
    image_key: str = "image",
    caption_key: str = "caption",
    what: str = "table",
    encoding: str = "utf-8",
    retry: str | None = "--encoding",
    label_key: str = "label",
) -> Table:
    """Reads and checks a table (see the module docstring); one-line errors name the row and column.

    Raises ValueError (bad suffix, bad row, text not in ``encoding``: ``data.text``, naming the
    line and byte; ``retry`` is the option that sets the encoding), KeyError (a missing column) or
    FileNotFoundError (the table, or a sampled image, does not exist)."""
    text_path = str(path)
    suffix = os.path.splitext(text_path)[1].lower()
    if suffix not in TABLE_SUFFIXES:
        raise ValueError(f"{what} {text_path!r}: must end in {', '.join(TABLE_SUFFIXES)}")
    p = as_path(text_path, what=what)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {text_path!r} does not exist")
    shown = os.fspath(p) if is_local(text_path) else text_path
    text = read_text(p, encoding=encoding, retry=retry)
    rows, labels = [], {}
    for n, row in _rows(shown, text, suffix, image_key, caption_key):
        if row.get(label_key) not in (None, ""):
            labels[n] = row[label_key]
        image = row[image_key]
        if not isinstance(image, str) or not image.strip():
            raise ValueError(f"{shown} row {n}, column {image_key!r}: empty image path, got {image!r}")
        captions = _captions(row[caption_key], f"{shown} row {n}, column {caption_key!r}")
        rows.append((_resolve(p, image.strip()), captions, n))
    if not rows:
        raise ValueError(f"{what} {shown}: no rows")
    table = Table(shown, rows, image_key, caption_key, labels)
    half = SAMPLE_ROWS // 2
    sample = sorted(set(range(min(half, len(rows)))) | {i * len(rows) // half for i in range(half)})
    for i in sample:
        image, _, n = rows[i]
        if not as_path(image, what=table.where(n, image_key)).is_file():
            raise FileNotFoundError(f"{table.where(n, image_key)}: image {image!r} does not exist")
    return table


def read_image(path: str) -> bytes:
    if is_local(path):
        with open(path, "rb") as f:
            return f.read()
    return as_path(path).read_bytes()


class FilesSource:
    """Random-access (image, caption) pairs of a table: ``src[i]`` -> {"image": bytes, "text",
    "where": "TABLE row N"}, or {"error", "where"} when the file cannot be read (skipped and
    counted by the pipeline). Holds paths and captions only; picklable for grain workers."""

    def __init__(self, table: Table):
        self.table_path = table.path
        self._pairs = [(image, caption, n) for image, captions, n in table.rows for caption in captions]
        self._labels = table.labels
        self.skipped_at_index = 0

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, index: int) -> dict:
        image, text, n = self._pairs[index]
        where = f"{self.table_path} row {n}"
        try:
            record = {"image": read_image(image), "text": text, "where": where}
        except Exception as e:  # noqa: BLE001 - reported as a skipped sample
            return {"error": f"{type(e).__name__}: {e}", "where": where}
        if n in self._labels:
            record["label"] = self._labels[n]
        return record

    def pair(self, index: int) -> tuple[str, str, int]:
        """(image path, caption, table row) of sample ``index``."""
        return self._pairs[index]


def retrieval_lists(table: Table):
    """(image paths in first-seen order, captions in first-seen order, each caption's image indices)."""
    image_slot: dict[str, int] = {}
    text_slot: dict[str, int] = {}
    positives: list[list[int]] = []
    for image, captions, _ in table.rows:
        for caption in captions:
            i = image_slot.setdefault(image, len(image_slot))
            t = text_slot.setdefault(caption, len(text_slot))
            if t == len(positives):
                positives.append([])
            if i not in positives[t]:
                positives[t].append(i)
    return list(image_slot), list(text_slot), positives


def _eval_split(c) -> EvalSplit | None:
    """``files:EVAL_TABLE`` with the source's columns and encoding; at most ``eval_max_samples`` captions."""
    if not c.eval_table:
        return None
    spec = Spec("files", str(c.eval_table), None, f"files:{c.eval_table}")
    columns = {"image_key": c.image_key, "caption_key": c.caption_key}
    return EvalSplit(spec, "data.files.eval_table", int(c.eval_max_samples), c.encoding, columns)


def _open_train(c, *, image_size: int, shard=None) -> FilesSource:
    del image_size, shard  # the pipeline decodes and takes this process's part
    return FilesSource(_table(c.table, c, "data.files.table"))


def _table(path, c, what: str) -> Table:
    if not str(path).strip():
        raise ValueError(f"{what}: set it to a .csv, .tsv or .jsonl table of image paths and captions")
    try:
        return read_table(
            path,
            image_key=c.image_key,
            caption_key=c.caption_key,
            what=what,
            encoding=c.encoding,
            retry="--config.data.files.encoding",
            label_key=c.label_key,
        )
    except (KeyError, FileNotFoundError, ValueError) as e:  # one line naming the key, as the other config errors
        message = e.args[0] if e.args else str(e)
        raise ValueError(message if message.startswith(what) else f"{what}: {message}") from None


def _check(c) -> None:
    _table(c.table, c, "data.files.table")
    if c.eval_table:
        _table(c.eval_table, c, "data.files.eval_table")


def _build_check(src, split: str, options: dict) -> dict:
    del split
    options = {"image_key": "image", "caption_key": "caption", **options}
    read_table(
        src,
        image_key=options["image_key"],
        caption_key=options["caption_key"],
        what="table",
        encoding=options.get("encoding", "utf-8"),
    )
    return options


def _build_records(src, split: str, skipped: list, options: dict):
    del split, skipped  # the table is the split; a missing image is skipped by data.build's check
    table = read_table(
        src,
        image_key=options["image_key"],
        caption_key=options["caption_key"],
        what="table",
        encoding=options.get("encoding", "utf-8"),
    )
    image_ids: dict[str, str] = {}
    root = os.path.dirname(table.path) if is_local(table.path) else str(as_path(table.path).parent)
    for image, captions, n in table.rows:
        image_id = image_ids.setdefault(image, _relative(image, root))
        for k, caption in enumerate(captions):
            where = f"{table.path} row {n}"
            text_id = f"{n}" if len(captions) == 1 else f"{n}.{k}"
            try:
                record = {"image": read_image(image), "text": caption, "where": where}
            except Exception as e:  # noqa: BLE001 - skipped and counted by data.build
                record = {"error": f"{type(e).__name__}: {e}", "where": where}
            yield {**record, "image_id": image_id, "text_id": text_id}


def _relative(image: str, root: str) -> str:
    prefix = root.rstrip("/") + "/"
    return image[len(prefix) :] if image.startswith(prefix) else image


DEFAULTS = {
    "table": "",  # .csv/.tsv/.jsonl of image paths (relative to the table, or absolute; local or gs://) + captions
    "image_key": "image",  # the table's image column
    "caption_key": "caption",  # the table's caption column (one caption, or a list of them)
    "label_key": "label",  # an optional column of class / group ids (loss_positives="label")
    "eval_table": "",  # a table for retrieval eval during training ("" = none)
    "eval_max_samples": 1000,  # at most this many eval captions (the first; <= 0: the whole table)
    "encoding": "utf-8",  # the tables' text encoding (UTF-8 with or without a BOM; e.g. "gbk")
}

SOURCE = Source(
    name="files",
    defaults=DEFAULTS,
    open_train=_open_train,
    eval_split=_eval_split,
    path_keys=("table", "eval_table"),
    check=_check,
    build_records=_build_records,
    build_check=_build_check,
    build_options={"image_key": "the table's image column", "caption_key": "the table's caption column"},
)


def _spec_table(spec, encoding: str, image_key: str = "image", caption_key: str = "caption") -> Table:
    try:
        columns = {"image_key": image_key, "caption_key": caption_key}
        return read_table(spec.location, what=str(spec), encoding=encoding, **columns)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise DatasetError(e.args[0] if e.args else str(e)) from None


def _retrieval(
    spec, *, encoding: str = "utf-8", image_key: str = "image", caption_key: str = "caption"
) -> RetrievalSet:
    """The table as a retrieval set: the candidate images are its distinct images in first-seen
    order, the queries its distinct captions; a caption's positives are every image it is paired
    with. Image ids are the paths as resolved, text ids the caption's position. ``image_key`` /
    ``caption_key``: the columns (the trainer's ``data.files`` keys)."""
    table = _spec_table(spec, encoding, image_key, caption_key)
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


def _images(spec, *, encoding: str = "utf-8") -> ImageCorpus:
    images, _, _ = retrieval_lists(_spec_table(spec, encoding))
    return ImageCorpus(FileImages(images, images), f"files:{spec.location}")


def _training(spec) -> tuple[str, dict]:
    return "files", {"table": spec.location}


OFFERS = (Offers("files", retrieval=_retrieval, images=_images, training=_training),)
