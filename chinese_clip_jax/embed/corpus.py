"""What ``ccj-embed`` reads: an image corpus from a spec, or a text corpus from a file.

Image specs (``--images``), records in a fixed order (the row order of the outputs):
  ``folder:PATH`` (or a bare directory): every image file below PATH (suffixes
                 ``IMAGE_SUFFIXES``, any depth), sorted by relative path; id = that path.
  ``list:FILE`` (or a ``.txt`` file): one image path per line (relative ones are relative to
                 FILE's directory); id = the line as written.
  ``cn_clip:ROOT[@SPLIT]``: the cn_clip layout's images of SPLIT (default ``train``):
                 ``{split}_imgs.tsv`` or its LMDB build; id = the image id, in file (TSV) or
                 key (LMDB) order.
  ``webdataset:SHARDS``: tar shards as img2dataset writes them (brace patterns, commas);
                 id = ``shard:key``; a sample needs an image and a caption member.
  ``tfds-dir:PATH[@SPLIT]`` / ``tfds:NAME[@SPLIT]``: a TFDS dataset (a directory with
                 ``dataset_info.json``, or a prepared NAME under ``~/tensorflow_datasets``), read
                 with ``tfds.data_source`` (ArrayRecord, no TensorFlow), split ``train`` by
                 default: one row per record (a pairs dataset repeats an image per caption);
                 id = the ``image_id`` feature when there is one, else the record number.
Paths may be ``gs://...`` where epath serves the scheme.

Text files (``--texts``): ``.jsonl`` with one ``{"text_id": ..., "text": ...}`` per line
(cn_clip's ``{split}_texts.jsonl``; ``id`` is accepted for ``text_id``), else one text per line
with id = the line number (from 0). A record that cannot be read is kept as bad (skipped and
listed in the outputs), never an error for the whole run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

from ..evaluation.sets import IMAGE_SUFFIXES
from ..io import as_path

IMAGE_KINDS = ("folder", "list", "cn_clip", "webdataset", "tfds", "tfds-dir")

__all__ = ["ImageCorpus", "TextCorpus", "open_images", "read_texts", "CorpusError"]


class CorpusError(ValueError):
    """The corpus cannot be opened as asked; the message names the spec or file."""


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


class _Files:
    """Image files by path: ``seq[i]`` -> {"id": ids[i], "image": bytes} (read on access; pickles
    as its paths, for grain worker processes)."""

    def __init__(self, paths: list[str], ids: list[str]):
        self.paths, self.ids = paths, ids

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        try:
            return {"id": self.ids[i], "image": as_path(self.paths[i]).read_bytes()}
        except Exception as e:  # noqa: BLE001 - a missing or unreadable file is a bad record
            return {"id": self.ids[i], "error": f"{type(e).__name__}: {e}"}


class _CnClipImages:
    """A cn_clip split's images by position: {"id": image id, "image": base64 text}."""

    def __init__(self, images, ids: list):
        self.images, self.ids = images, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        try:
            return {"id": self.ids[i], "image": self.images[self.ids[i]][0]}
        except Exception as e:  # noqa: BLE001
            return {"id": self.ids[i], "error": f"{type(e).__name__}: {e}"}


class _TarImages:
    """Webdataset samples: {"id": "shard:key", "image": bytes}."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        record = self.source[i]
        out = {"id": record.get("where", f"record {i}")}
        if record.get("error"):
            out["error"] = record["error"]
        else:
            out["image"] = record["image"]
        return out


def open_images(spec: str) -> ImageCorpus:
    """An image spec (module docstring) -> ``ImageCorpus``; raises ``CorpusError`` (one line)."""
    kind, sep, rest = str(spec).partition(":")
    if not (sep and kind in IMAGE_KINDS):  # a bare path (also gs://...): a folder, or a .txt list
        kind, rest = ("list" if str(spec).endswith(".txt") else "folder"), str(spec)
    if not rest.strip():
        raise CorpusError(f"--images {spec!r}: empty path")
    if kind == "folder":
        return _folder(rest)
    if kind == "list":
        return _list(rest)
    if kind == "cn_clip":
        return _cn_clip(rest)
    if kind.startswith("tfds"):
        return _tfds(kind, rest)
    return _webdataset(rest)


def _folder(path: str) -> ImageCorpus:
    root = as_path(path, what="--images folder")
    if not root.is_dir():
        raise CorpusError(f"--images folder:{path}: no such directory {root}")
    found = sorted(
        ((directory / name).relative_to(root).as_posix(), str(directory / name))
        for directory, _, names in root.walk()  # epath: no recursive glob on remote paths
        for name in names
        if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES
    )
    if not found:
        raise CorpusError(f"--images folder:{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) below {root}")
    return ImageCorpus(_Files([p for _, p in found], [i for i, _ in found]), f"folder:{root}")


def _list(path: str) -> ImageCorpus:
    f = as_path(path, what="--images list")
    if not f.is_file():
        raise CorpusError(f"--images list:{path}: no such file {f}")
    lines = [line.strip() for line in f.read_text(encoding="utf-8").splitlines()]
    ids = [line for line in lines if line]
    if not ids:
        raise CorpusError(f"--images list:{path}: {f} lists no image paths")
    paths = [str(as_path(i)) if (i.startswith("/") or "://" in i) else str(f.parent / i) for i in ids]
    return ImageCorpus(_Files(paths, ids), f"list:{f}")


def _cn_clip(rest: str) -> ImageCorpus:
    from ..data.cn_clip import LmdbImages, TsvImages, find_split
    from ..io import local_copy

    root_text, _, split = rest.rpartition("@") if "@" in rest else (rest, "", "train")
    root = as_path(root_text, what="--images cn_clip")
    try:
        fmt, directory = find_split(root, split, None, choose_with="a layout")
    except (FileNotFoundError, ValueError) as e:
        raise CorpusError(f"--images cn_clip:{rest}: {e}") from e
    if fmt == "tsv":
        images = TsvImages(directory / f"{split}_imgs.tsv", [0])
    else:
        local, keep = local_copy(directory, what=f"cn_clip LMDB split {split!r}")
        images = LmdbImages(local / "imgs", keep=keep, origin=directory / "imgs")
    ids = images.ids()
    if not ids:
        raise CorpusError(f"--images cn_clip:{rest}: split {split!r} under {root} has no images")
    return ImageCorpus(_CnClipImages(images, ids), f"cn_clip:{root}@{split}")


def _webdataset(shards: str) -> ImageCorpus:
    from ..data.webdataset import TarSource

    try:
        source = TarSource(shards)
    except (FileNotFoundError, ValueError) as e:
        raise CorpusError(f"--images webdataset:{shards}: {str(e).splitlines()[0]}") from e
    return ImageCorpus(_TarImages(source), f"webdataset:{shards}")


class _TfdsImages:
    """TFDS records (images left encoded): {"id": image_id or the record number, "image": bytes}."""

    def __init__(self, source, image_key: str, id_key: str | None):
        self.source, self.image_key, self.id_key = source, image_key, id_key

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        from ..evaluation.sets import _text

        if not 0 <= i < len(self.source):  # before the try: iteration stops on IndexError
            raise IndexError(i)
        try:
            record = self.source[i]
            return {"id": _text(record[self.id_key]) if self.id_key else i, "image": bytes(record[self.image_key])}
        except Exception as e:  # noqa: BLE001
            return {"id": i, "error": f"{type(e).__name__}: {e}"}


def _tfds(kind: str, rest: str) -> ImageCorpus:
    import tensorflow_datasets as tfds

    from ..evaluation.sets import DatasetError, _features_by_type, _tfds_builder, _tfds_source

    name, _, split = rest.rpartition("@") if "@" in rest else (rest, "", "train")
    try:
        builder = _tfds_builder(kind, name, None)
        features, images, _ = _features_by_type(builder)
        if len(images) != 1:
            raise DatasetError(f"{builder.data_dir}: need exactly one Image feature, found {images}")
        source = _tfds_source(builder, split, decoders={images[0]: tfds.decode.SkipDecoding()})
    except DatasetError as e:
        raise CorpusError(f"--images {kind}:{rest}: {e}") from e
    id_key = "image_id" if "image_id" in features else None
    return ImageCorpus(_TfdsImages(source, images[0], id_key), f"{kind}:{builder.data_dir}@{split}")


def read_texts(path: str) -> TextCorpus:
    """A text file (module docstring) -> ``TextCorpus``; raises ``CorpusError`` (one line)."""
    f = as_path(path, what="--texts")
    if not f.is_file():
        raise CorpusError(f"--texts {path}: no such file {f}")
    lines = f.read_text(encoding="utf-8").splitlines()
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
        raise CorpusError(f"--texts {path}: {f} holds no texts")
    return TextCorpus(ids, texts, f"texts:{f}")
