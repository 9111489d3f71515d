"""The cn_clip dataset layout (Chinese-CLIP's own fine-tuning format), as TSV/JSONL or its LMDB build.

Files under ``root`` for a split (e.g. "train", "valid"):
  ``{split}_imgs.tsv``     one image per line: ``image_id<TAB>base64 of the image file``
  ``{split}_texts.jsonl``  one caption per line: ``{"text_id": 1, "text": "...", "image_ids": [..]}``
  or the LMDB build (cn_clip's build_lmdb_dataset.py): ``{root}/lmdb/{split}/imgs`` (key
  str(image_id) -> base64) and ``{root}/lmdb/{split}/pairs`` (key str(i) -> pickled
  (image_id, text_id, text); b"num_samples").

A training sample is one (caption, image) pair, one per image id a caption lists, as cn_clip.
Index-time problems (a TSV line with no tab, a JSONL line that is not a caption object, a caption
naming an image that is not in the TSV) are logged with file:line, skipped and counted in
``skipped_at_index``; images that fail to decode are skipped later by the pipeline.

Config keys (``data.cn_clip.*``): ``root`` (directory), ``format`` ("tsv" or "lmdb"; LMDB needs
the ``lmdb`` package), ``split`` (training split), ``eval_split`` (retrieval eval; "" = none),
``eval_max_texts`` (at most this many eval captions).
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
from pathlib import Path

from .pipeline import CachingTokenizer, LazyImages, check_image

__all__ = ["TsvImages", "LmdbImages", "PairSource", "open_source", "eval_sets"]

logger = logging.getLogger(__name__)


def _skip(counter: list, where: str, why: str) -> None:
    counter[0] += 1
    if counter[0] <= 10:
        logger.warning("cn_clip: skipping %s: %s", where, why)


class TsvImages:
    """``{split}_imgs.tsv`` indexed by byte offset: ``images[image_id]`` -> (base64 str, "file:line")."""

    def __init__(self, path: str | os.PathLike, skipped: list):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"cn_clip: image file {self.path} does not exist")
        self._index: dict[str, tuple[int, int, int]] = {}  # id -> (offset, length, line number)
        offset = 0
        with open(self.path, "rb") as f:
            for line_no, line in enumerate(f, start=1):
                tab = line.find(b"\t")
                if tab <= 0:
                    if line.strip():
                        _skip(skipped, f"{self.path}:{line_no}", "no 'image_id<TAB>base64' on this line")
                else:
                    key = line[:tab].decode("utf-8", "replace").strip()
                    self._index[key] = (offset, len(line), line_no)
                offset += len(line)
        self._fd = os.open(self.path, os.O_RDONLY)

    def __getstate__(self):  # grain worker processes reopen the file
        return {k: v for k, v in self.__dict__.items() if k != "_fd"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._fd = os.open(self.path, os.O_RDONLY)

    def __contains__(self, image_id) -> bool:
        return str(image_id) in self._index

    def ids(self) -> list[str]:
        """Every image id, in file order."""
        return list(self._index)

    def __getitem__(self, image_id) -> tuple[str, str]:
        offset, length, line_no = self._index[str(image_id)]
        line = os.pread(self._fd, length, offset)
        return line[line.find(b"\t") + 1 :].strip().decode("ascii", "replace"), f"{self.path}:{line_no}"

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


class _TupleOnly(pickle.Unpickler):
    """cn_clip pickles plain (image_id, text_id, text) tuples; refuse anything that needs a class."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from an LMDB pair")


def _lmdb_open(path: Path):
    try:
        import lmdb
    except ImportError as e:
        raise ImportError("cn_clip format 'lmdb' needs the lmdb package: pip install lmdb") from e
    if not path.exists():
        raise FileNotFoundError(f"cn_clip: LMDB database {path} does not exist")
    return lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False)


class LmdbImages:
    """``lmdb/{split}/imgs``: ``images[image_id]`` -> (base64 str, "db:key")."""

    def __init__(self, path: Path):
        self.path = path
        self._env = _lmdb_open(path)

    def __contains__(self, image_id) -> bool:
        with self._env.begin() as txn:
            return txn.get(str(image_id).encode()) is not None

    def ids(self) -> list[str]:
        """Every image id, in key order (cn_clip's count key b"num_images" left out)."""
        with self._env.begin() as txn:
            return [
                bytes(k).decode() for k in txn.cursor().iternext(keys=True, values=False) if bytes(k) != b"num_images"
            ]

    def __getitem__(self, image_id) -> tuple[str, str]:
        with self._env.begin() as txn:
            value = txn.get(str(image_id).encode())
        if value is None:
            raise KeyError(f"image id {image_id} not in {self.path}")
        return bytes(value).decode("ascii", "replace"), f"{self.path}:{image_id}"


def read_texts(path: Path, skipped: list):
    """Yields (text_id, text, image_ids, "file:line") from a ``{split}_texts.jsonl``."""
    if not path.is_file():
        raise FileNotFoundError(f"cn_clip: caption file {path} does not exist")
    with open(path, encoding="utf-8-sig") as f:  # -sig: a UTF-8 BOM (Windows editors) is not a record's text
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                obj = json.loads(line)
                ids = obj["image_ids"]
                if not isinstance(obj["text"], str) or not isinstance(ids, list):
                    raise TypeError("'text' must be a string and 'image_ids' a list")
                obj["text"].encode("utf-8")  # a lone surrogate ("\ud800") is no text: UnicodeEncodeError
                yield obj["text_id"], obj["text"], ids, where
            except (ValueError, KeyError, TypeError) as e:
                _skip(skipped, where, f"not a caption object ({type(e).__name__}: {e})")


def _read_lmdb_pairs(path: Path, skipped: list):
    """Yields (image_id, text_id, text, where) from ``lmdb/{split}/pairs``."""
    env = _lmdb_open(path)
    with env.begin() as txn:
        raw = txn.get(b"num_samples")
        if raw is None:
            raise ValueError(f"cn_clip: {path} has no b'num_samples' key: not a cn_clip pairs database")
        for i in range(int(bytes(raw).decode())):
            where = f"{path}:{i}"
            value = txn.get(str(i).encode())
            try:
                image_id, text_id, text = _TupleOnly(io.BytesIO(bytes(value))).load()
                yield image_id, text_id, text, where
            except Exception as e:  # noqa: BLE001 - a damaged entry is skipped and counted
                _skip(skipped, where, f"unreadable pair ({type(e).__name__}: {e})")
    env.close()


class PairSource:
    """Random-access (caption, image) pairs: ``src[i]`` -> {"image": base64, "text", "where"}."""

    def __init__(self, images, pairs: list[tuple[str, str]], skipped_at_index: int):
        self.images, self._pairs, self.skipped_at_index = images, pairs, skipped_at_index
        if not pairs:
            raise ValueError(f"cn_clip: no usable (caption, image) pairs for {images.path}")

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, index: int) -> dict:
        image_id, text = self._pairs[index]
        try:
            b64, where = self.images[image_id]
        except Exception as e:  # noqa: BLE001 - reported as a skipped sample
            return {"error": f"{type(e).__name__}: {e}", "where": f"pair {index} (image {image_id})"}
        return {"image": b64, "text": text, "where": where}


def _split_dir(root: Path, split: str) -> Path:
    for candidate in (root / "lmdb" / split, root / split):
        if (candidate / "pairs").exists():
            return candidate
    raise FileNotFoundError(
        f"cn_clip: no LMDB build of split {split!r} under {root} (looked for {root / 'lmdb' / split / 'pairs'})"
    )


def _open(c, split: str):
    """(images, pairs as [(image_id, text)], per-caption [(text, [image_ids])], skipped counter)."""
    root, skipped = Path(c.root), [0]
    if not str(c.root):
        raise ValueError("cn_clip: set data.cn_clip.root to the dataset directory")
    if c.format == "tsv":
        images = TsvImages(root / f"{split}_imgs.tsv", skipped)
        captions = [(text, ids) for _, text, ids, _ in read_texts(root / f"{split}_texts.jsonl", skipped)]
    elif c.format == "lmdb":
        directory = _split_dir(root, split)
        images = LmdbImages(directory / "imgs")
        grouped: dict = {}
        for image_id, text_id, text, _ in _read_lmdb_pairs(directory / "pairs", skipped):
            grouped.setdefault((text_id, text), []).append(image_id)
        captions = [(text, ids) for (_, text), ids in grouped.items()]
    else:
        raise ValueError(f"cn_clip: data.cn_clip.format must be 'tsv' or 'lmdb', got {c.format!r}")
    pairs = []
    for text, ids in captions:
        for image_id in ids:
            if c.format == "tsv" and image_id not in images:
                _skip(skipped, f"caption {text!r}", f"image id {image_id} is not in {images.path}")
            else:
                pairs.append((str(image_id), text))
    return images, pairs, captions, skipped


def open_source(c, split: str) -> PairSource:
    """The training source of one split (see the module docstring for ``c``)."""
    images, pairs, _, skipped = _open(c, split)
    if skipped[0]:
        logger.warning("cn_clip: %d records skipped while indexing split %r", skipped[0], split)
    return PairSource(images, pairs, skipped[0])


def eval_sets(c, *, image_size: int, context_length: int = 52) -> dict:
    """{"retrieval": ...} over the first ``eval_max_texts`` captions of ``eval_split``.

    images: a lazy ``LazyImages`` of every image those captions name (decoded batch by batch at
    evaluation; images PIL cannot identify dropped with a warning), input_ids/attention_mask
    int32 (n_texts, L), texts, and text_to_images: indices of each caption's images. Captions
    left with no image are dropped. ``image_size`` is unused (the evaluator decodes).
    """
    del image_size
    if not c.eval_split:
        return {}
    images, _, captions, skipped = _open(c, c.eval_split)
    slot: dict[str, int] = {}
    ids, texts, positives = [], [], []
    for text, image_ids in captions[: c.eval_max_texts]:
        mine = []
        for image_id in map(str, image_ids):
            if image_id not in slot:
                try:
                    check_image(images[image_id][0])
                    ids.append(image_id)
                    slot[image_id] = len(ids) - 1
                except Exception as e:  # noqa: BLE001 - a broken eval image is dropped, not fatal
                    slot[image_id] = -1
                    _skip(skipped, f"eval image {image_id}", f"{type(e).__name__}: {e}")
            if slot[image_id] >= 0:
                mine.append(slot[image_id])
        if mine:
            texts.append(text)
            positives.append(mine)
    if not texts:
        raise ValueError(f"cn_clip: split {c.eval_split!r} under {c.root} gave no usable eval pairs")
    return {
        "retrieval": {
            "images": LazyImages(images, ids, 0),
            **CachingTokenizer(context_length)(texts),
            "texts": texts,
            "text_to_images": positives,
        }
    }
