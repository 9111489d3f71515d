"""The cn_clip dataset layout (Chinese-CLIP's own fine-tuning format), as TSV/JSONL or its LMDB build.

Files under ``root`` for a split (e.g. "train", "valid"):
  ``{split}_imgs.tsv``     one image per line: ``image_id<TAB>base64 of the image file``
  ``{split}_texts.jsonl``  one caption per line: ``{"text_id": 1, "text": "...", "image_ids": [..]}``
  or the LMDB build (cn_clip's build_lmdb_dataset.py): ``{root}/lmdb/{split}/imgs`` (key
  str(image_id) -> base64) and ``{root}/lmdb/{split}/pairs`` (key str(i) -> pickled
  (image_id, text_id, text); b"num_samples"); ``root`` may also be that ``lmdb`` directory.
``find_split`` says which layout holds a split (or picks the one present); ``open_split`` opens
it. The training source and ``python -m chinese_clip_jax.data.build`` both read through these.

``root`` is local or remote (gs://, any ``etils.epath`` scheme, via ``paths.as_path``): a remote
TSV is indexed by streaming it once, then each image read by its byte range
(``paths.RangeReader``: one ranged request per image with gcsfs); a remote LMDB split (LMDB opens
local files only) is copied once into a temp dir (``paths.local_copy``), with a log line, and
read there.

A training sample is one (caption, image) pair, one per image id a caption lists, as cn_clip.
Index-time problems (a TSV line with no tab, a JSONL line that is not a caption object, a caption
naming an image that is not in the TSV) are logged with file:line, skipped and counted in
``skipped_at_index``; images that fail to decode are skipped later by the pipeline.

Config keys (``data.cn_clip.*``): ``root`` (directory, local or gs://), ``format`` ("tsv" or
"lmdb"; LMDB needs the ``lmdb`` package), ``split`` (training split), ``eval_split`` (retrieval
eval during training: the split ``cn_clip:ROOT@EVAL_SPLIT`` names, in ``format``'s layout, read
by ``cn_clip_sets``; "" = none), ``eval_max_texts`` (at most this many of its captions:
``sets.retrieval_eval_set``).
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import threading

from etils import epath

from ..io import RangeReader, as_path, local_copy
from .source import EvalSplit, Source
from .spec import Spec
from .text import decoded_lines

__all__ = ["TsvImages", "LmdbImages", "PairSource", "find_split", "open_split", "open_source", "FORMATS"]

logger = logging.getLogger(__name__)
FORMATS = ("tsv", "lmdb")


def _skip(counter: list, where: str, why: str) -> None:
    """Counts a skipped record in ``counter[0]`` (and, when the list is longer, keeps its reason)."""
    counter[0] += 1
    if len(counter) > 1:
        counter.append(f"{where}: {why}")
    if counter[0] <= 10:
        logger.warning("cn_clip: skipping %s: %s", where, why)


class TsvImages:
    """``{split}_imgs.tsv`` (local or remote) indexed by byte offset: ``images[image_id]`` ->
    (base64 str, "file:line")."""

    def __init__(self, path, skipped: list):
        self.path = as_path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"cn_clip: image file {self.path} does not exist")
        self._index: dict[str, tuple[int, int, int]] = {}  # id -> (offset, length, line number)
        offset = 0
        with self.path.open("rb") as f:
            for line_no, line in enumerate(f, start=1):
                tab = line.find(b"\t")
                if tab <= 0:
                    if line.strip():
                        _skip(skipped, f"{self.path}:{line_no}", "no 'image_id<TAB>base64' on this line")
                else:
                    key = line[:tab].decode("utf-8", "replace").strip()
                    self._index[key] = (offset, len(line), line_no)
                offset += len(line)
        self._reader = RangeReader(self.path)  # pickles without its file: grain workers reopen

    def __contains__(self, image_id) -> bool:
        return str(image_id) in self._index

    def ids(self) -> list[str]:
        """Every image id, in file order."""
        return list(self._index)

    def __getitem__(self, image_id) -> tuple[str, str]:
        entry = self._index.get(str(image_id))
        if entry is None:
            raise KeyError(f"image id {image_id} not in {self.path}")
        offset, length, line_no = entry
        line = self._reader.read(offset, length)
        return line[line.find(b"\t") + 1 :].strip().decode("ascii", "replace"), f"{self.path}:{line_no}"

    def close(self) -> None:
        self._reader.close()


class _TupleOnly(pickle.Unpickler):
    """cn_clip pickles plain (image_id, text_id, text) tuples; refuse anything that needs a class."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from an LMDB pair")


def _lmdb_open(path: epath.Path):
    try:
        import lmdb
    except ImportError as e:
        raise ImportError("cn_clip format 'lmdb' needs the lmdb package: pip install lmdb") from e
    if not path.exists():
        raise FileNotFoundError(f"cn_clip: LMDB database {path} does not exist")
    return lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False)


class LmdbImages:
    """``lmdb/{split}/imgs`` (a local directory): ``images[image_id]`` -> (base64 str, "db:key").

    ``keep``: the temp dir holding a copy of a remote database (``paths.local_copy``), kept as
    long as this object and removed by ``close``; ``origin``: the database messages name (the
    remote one a copy came from). Pickles as its path: grain workers reopen it.
    """

    def __init__(self, path: epath.Path, keep=None, origin=None):
        self.path, self._keep, self.origin = path, keep, str(origin or path)
        self._env, self._lock = _lmdb_open(path), threading.Lock()

    def __getstate__(self):
        return {"path": self.path, "origin": self.origin}

    def __setstate__(self, state):  # opened on first read (lmdb refuses a second open per process)
        self.path, self._keep, self.origin = state["path"], None, state["origin"]
        self._env, self._lock = None, threading.Lock()

    def _begin(self):
        if self._env is None:
            with self._lock:
                if self._env is None:
                    self._env = _lmdb_open(self.path)
        return self._env.begin()

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
        if self._keep is not None:
            self._keep.cleanup()

    def __contains__(self, image_id) -> bool:
        with self._begin() as txn:
            return txn.get(str(image_id).encode()) is not None

    def ids(self) -> list[str]:
        """Every image id, in key order (cn_clip's count key b"num_images" left out)."""
        with self._begin() as txn:
            return [
                bytes(k).decode() for k in txn.cursor().iternext(keys=True, values=False) if bytes(k) != b"num_images"
            ]

    def __getitem__(self, image_id) -> tuple[str, str]:
        with self._begin() as txn:
            value = txn.get(str(image_id).encode())
        if value is None:
            raise KeyError(f"image id {image_id} not in {self.origin}")
        return bytes(value).decode("ascii", "replace"), f"{self.origin}:{image_id}"


def read_captions(path, skipped: list, *, encoding: str = "utf-8", retry: str | None = "--encoding"):
    """Yields (text_id, text, image_ids, "file:line") from a ``{split}_texts.jsonl`` (local or
    remote): the one reader of cn_clip's captions (training, evaluation, embedding, data.build).

    ``encoding``: the file's text encoding (``data.text``: UTF-8 with or without a BOM by default).
    A line that is not in it raises a one-line ``TextDecodeError`` naming the file, the line and the
    byte (``retry``: the option naming the encoding); a line that is not a caption object is
    skipped and counted in ``skipped`` (``_skip``).
    """
    path = as_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cn_clip: caption file {path} does not exist")
    for line_no, line in decoded_lines(path, encoding=encoding, what="cn_clip:", retry=retry):
        where = f"{path}:{line_no}"
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            ids = obj["image_ids"]
            if not isinstance(obj["text"], str) or not isinstance(ids, list):
                raise TypeError("'text' must be a string and 'image_ids' a list")
            obj["text"].encode("utf-8")  # a lone surrogate ("\ud800") is no text: UnicodeEncodeError
            yield obj["text_id"], obj["text"], ids, where
        except (ValueError, KeyError, TypeError) as e:
            _skip(skipped, where, f"not a caption object ({type(e).__name__}: {e})")


def _read_lmdb_pairs(path: epath.Path, skipped: list, origin=None):
    """Yields (image_id, text_id, text, where) from ``lmdb/{split}/pairs`` (``origin``: the
    database ``where`` names, if ``path`` is a copy)."""
    env = _lmdb_open(path)
    with env.begin() as txn:
        raw = txn.get(b"num_samples")
        if raw is None:
            raise ValueError(f"cn_clip: {path} has no b'num_samples' key: not a cn_clip pairs database")
        for i in range(int(bytes(raw).decode())):
            where = f"{origin or path}:{i}"
            value = txn.get(str(i).encode())
            try:
                image_id, text_id, text = _TupleOnly(io.BytesIO(bytes(value))).load()
                yield image_id, text_id, text, where
            except Exception as e:  # noqa: BLE001 - a damaged entry is skipped and counted
                _skip(skipped, where, f"unreadable pair ({type(e).__name__}: {e})")
    env.close()


class PairSource:
    """Random-access (caption, image) pairs: ``src[i]`` -> {"image": base64, "text", "where",
    "label": the caption's text_id (``loss_positives="label"``: the images of one caption)}."""

    def __init__(self, images, pairs: list[tuple[str, str, int]], skipped_at_index: int):
        self.images, self._pairs, self.skipped_at_index = images, pairs, skipped_at_index
        if not pairs:
            raise ValueError(f"cn_clip: no usable (caption, image) pairs for {images.path}")

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, index: int) -> dict:
        image_id, text, text_id = self._pairs[index]
        try:
            b64, where = self.images[image_id]
        except Exception as e:  # noqa: BLE001 - reported as a skipped sample
            return {"error": f"{type(e).__name__}: {e}", "where": f"pair {index} (image {image_id})"}
        return {"image": b64, "text": text, "where": where, "label": text_id}


def find_split(root: epath.Path, split: str, fmt: str | None = None, *, choose_with: str = "data.cn_clip.format"):
    """("tsv", root) or ("lmdb", the split's LMDB directory) for ``split`` under ``root``.

    ``fmt`` "tsv" / "lmdb" takes that layout; None takes the one present. Raises (one line)
    FileNotFoundError when the layout asked for, or any, is missing, and ValueError for a bad
    ``fmt`` or, with None, when ``root`` holds both (``choose_with`` names the setting to pass).
    """
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"cn_clip: {choose_with} must be one of {FORMATS}, got {fmt!r}")
    tsv = [root / f"{split}_imgs.tsv", root / f"{split}_texts.jsonl"]
    lmdb_dir = next((d for d in (root / "lmdb" / split, root / split) if (d / "pairs").exists()), None)
    if fmt is None:
        has_tsv = any(p.exists() for p in tsv)
        if has_tsv and lmdb_dir is not None:
            raise ValueError(
                f"cn_clip: {root} holds split {split!r} both as TSV ({tsv[0].name}) and as LMDB ({lmdb_dir}): "
                f"choose one with {choose_with} tsv or lmdb"
            )
        if not has_tsv and lmdb_dir is None:
            raise FileNotFoundError(
                f"cn_clip: no split {split!r} under {root}: neither {tsv[0].name} + {tsv[1].name} (TSV) "
                f"nor lmdb/{split}/pairs + imgs (LMDB)"
            )
        fmt = "tsv" if has_tsv else "lmdb"
    if fmt == "tsv":
        for p in tsv:
            if not p.is_file():
                raise FileNotFoundError(f"cn_clip: {p} does not exist (split {split!r}, TSV layout)")
        return "tsv", root
    if lmdb_dir is None:
        raise FileNotFoundError(
            f"cn_clip: no LMDB build of split {split!r} under {root} (looked for {root / 'lmdb' / split / 'pairs'})"
        )
    if not (lmdb_dir / "imgs").exists():
        raise FileNotFoundError(f"cn_clip: {lmdb_dir / 'imgs'} does not exist (LMDB split {split!r})")
    return "lmdb", lmdb_dir


def open_split(
    root,
    split: str,
    fmt: str | None,
    skipped: list,
    *,
    choose_with: str = "data.cn_clip.format",
    encoding: str = "utf-8",
    retry: str | None = None,
):
    """(format, images, captions) of ``split`` under ``root`` (local or remote; ``fmt`` as in
    ``find_split``). images: ``TsvImages`` or ``LmdbImages`` (a remote LMDB split is copied to a
    temp dir first; ``images.close()`` removes it); captions: [(text_id, text, image_ids, where)],
    the LMDB pairs grouped back into captions in file order. Index-time problems go to ``skipped``.
    ``encoding`` / ``retry``: of the JSONL captions, as ``read_captions``.
    """
    fmt, directory = find_split(as_path(root), split, fmt, choose_with=choose_with)
    if fmt == "tsv":
        captions = list(read_captions(directory / f"{split}_texts.jsonl", skipped, encoding=encoding, retry=retry))
        return fmt, TsvImages(directory / f"{split}_imgs.tsv", skipped), captions
    local, keep = local_copy(directory, what=f"cn_clip LMDB split {split!r}")
    images = LmdbImages(local / "imgs", keep=keep, origin=directory / "imgs")
    grouped: dict = {}
    for image_id, text_id, text, where in _read_lmdb_pairs(local / "pairs", skipped, origin=directory / "pairs"):
        grouped.setdefault((text_id, text), ([], where))[0].append(image_id)
    return fmt, images, [(text_id, text, ids, where) for (text_id, text), (ids, where) in grouped.items()]


def _open(c, split: str):
    """(images, pairs as [(image_id, text, text_id)], skipped counter)."""
    if not str(c.root):
        raise ValueError("cn_clip: set data.cn_clip.root to the dataset directory")
    skipped = [0]
    root = as_path(c.root, what="data.cn_clip.root")
    fmt, images, captions = open_split(root, split, c.format, skipped)
    pairs = []
    for text_id, text, ids, _ in captions:
        for image_id in ids:
            if fmt == "tsv" and image_id not in images:
                _skip(skipped, f"caption {text!r}", f"image id {image_id} is not in {images.path}")
            else:
                pairs.append((str(image_id), text, text_id))
    return images, pairs, skipped


def open_source(c, split: str) -> PairSource:
    """The training source of one split (see the module docstring for ``c``)."""
    images, pairs, skipped = _open(c, split)
    if skipped[0]:
        logger.warning("cn_clip: %d records skipped while indexing split %r", skipped[0], split)
    return PairSource(images, pairs, skipped[0])


def _eval_split(c) -> EvalSplit | None:
    """``cn_clip:ROOT@EVAL_SPLIT`` in the layout ``format`` names; at most ``eval_max_texts`` captions."""
    if not c.eval_split:
        return None
    if not str(c.root):
        raise ValueError("cn_clip: set data.cn_clip.root to the dataset directory")
    spec = Spec("cn_clip", str(c.root), str(c.eval_split), f"cn_clip:{c.root}@{c.eval_split}")
    return EvalSplit(spec, "data.cn_clip.eval_split", int(c.eval_max_texts), options={"layout": c.format})


def _open_train(c, *, image_size: int, shard=None) -> PairSource:
    del image_size, shard  # the pipeline decodes and takes this process's part
    return open_source(c, split=c.split)


def _build_check(src, split: str, options: dict) -> dict:
    """The layout of ``split`` under SRC (``options["cn_clip_format"]``: "tsv", "lmdb" or None)."""
    fmt, _ = find_split(as_path(src, what="SRC"), split, options.get("cn_clip_format"), choose_with="--cn-clip-format")
    return {**options, "cn_clip_format": fmt}


def _build_records(src, split: str, skipped: list, options: dict):
    """Opens the split now (captions in another encoding fail here, before any work) and returns
    its records."""
    _, images, captions = open_split(
        as_path(src),
        split,
        options.get("cn_clip_format"),
        skipped,
        choose_with="--cn-clip-format",
        encoding=options.get("encoding", "utf-8"),
        retry="--encoding",
    )
    return _records(images, captions)


def _records(images, captions):
    try:
        for text_id, text, image_ids, where in captions:
            for image_id in map(str, image_ids):
                try:
                    b64, img_where = images[image_id]
                except KeyError as e:  # "image id 7 not in SRC/..."
                    yield {"error": e.args[0], "where": where}
                    continue
                yield {
                    "image": b64,
                    "text": text,
                    "image_id": image_id,
                    "text_id": str(text_id),
                    "where": f"{where} / {img_where}",
                }
    finally:
        images.close()  # and a remote LMDB split's local copy


DEFAULTS = {
    "root": "",  # the dataset directory ({split}_imgs.tsv + {split}_texts.jsonl, or lmdb/{split}); local or gs://
    "format": "tsv",  # "tsv" | "lmdb" (cn_clip's LMDB build; needs the lmdb package)
    "split": "train",  # training split
    "eval_split": "valid",  # retrieval eval split ("" = none)
    "eval_max_texts": 1000,  # at most this many eval captions (the first; <= 0: the whole split)
}

SOURCE = Source(
    name="cn_clip",
    defaults=DEFAULTS,
    open_train=_open_train,
    eval_split=_eval_split,
    path_keys=("root",),
    build_records=_build_records,
    build_check=_build_check,
    build_options={"cn_clip_format": "cn_clip layout: tsv or lmdb (default: the one SRC holds)"},
)
