"""webdataset tar shards as written by img2dataset: ``00000.tar`` holding ``KEY.jpg`` + ``KEY.txt``/``KEY.json``.

Members sharing a key (the basename up to its first dot, as webdataset does) form one sample:
the image (jpg/jpeg/png/webp/bmp) and the caption, taken from the first of ``caption_keys``
present (``txt``: the file's text; ``json``: its "caption" field). Shards are read uncompressed
with random access (an index of member offsets is built once), so grain can shuffle globally.
A key with no image or no caption, or a truncated tar, is logged, skipped and counted in
``skipped_at_index``; an undecodable image or caption is skipped later by the pipeline.

Config keys (``data.webdataset.*``): ``shards`` (comma-separated paths, globs, brace ranges and
alternations, e.g. "/data/{00000..00099}.tar" or "gs://b/{laion,wukong}/{000..009}.tar"),
``eval_shards`` (same, for retrieval eval during training, read as ``ccj-eval retrieval --data
webdataset:EVAL_SHARDS`` reads them; "" = none), ``caption_keys`` (e.g. "txt,json"),
``eval_max_samples`` (at most this many eval captions: ``sets.retrieval_eval_set``).

As a ``webdataset:SHARDS`` spec: training pairs, an image corpus (id "SHARD:KEY") and a
retrieval split (``_retrieval``: each sample's image a candidate, the distinct captions queries).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import posixpath
import re
import tarfile

import numpy as np

from ..io import RangeReader
from .sets import DatasetError, ImageCorpus, LazyList, RetrievalSet, retrieval_set
from .source import EvalSplit, Offers, Source
from .spec import Spec
from .text import TextDecodeError, decode_bytes

__all__ = ["expand_shards", "TarSource", "INDEX_DTYPE"]

logger = logging.getLogger(__name__)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
# One packed row per sample: 29 bytes of index (the tar header holds the key; read on demand).
INDEX_DTYPE = np.dtype(
    [
        ("shard", "<u4"),
        ("image_offset", "<u8"),
        ("image_size", "<u4"),
        ("caption_offset", "<u8"),
        ("caption_size", "<u4"),
        ("kind", "u1"),
    ]
)


def _split_top_level(spec: str, sep: str = ",") -> list[str]:
    """Splits on ``sep`` outside braces: "a,{b,c}" -> ["a", "{b,c}"]."""
    parts, depth, cur = [], 0, []
    for ch in spec:
        depth += (ch == "{") - (ch == "}")
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def expand_braces(pattern: str) -> list[str]:
    """Shell-style braces, in order: ranges "{000..002}" (zero-padded as written) and
    alternations "{a,b}", nested and combined: "s{1..2}{x,y}" -> s1x s1y s2x s2y."""
    depth, open_at = 0, None
    for i, ch in enumerate(pattern):
        if ch == "{":
            if depth == 0:
                open_at = i
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                head, body, tail = pattern[:open_at], pattern[open_at + 1 : i], pattern[i + 1 :]
                m = re.fullmatch(r"(\d+)\.\.(\d+)", body)
                if m:
                    width = len(m.group(1))
                    options = [str(k).zfill(width) for k in range(int(m.group(1)), int(m.group(2)) + 1)]
                elif "," in body:
                    options = [o for alt in _split_top_level(body) for o in expand_braces(alt)]
                else:
                    continue  # a literal {word}
                return [x for o in options for x in expand_braces(head + o + tail)]
    return [pattern]


def expand_shards(spec: str) -> list[str]:
    """ "a.tar,dir/*.tar,s/{000..002}.tar,{x,y}.tar" -> existing shard paths, in order
    (globs sorted per pattern; local or any epath scheme; errors name the missing one)."""
    from ..io import as_path, is_local

    paths = []
    for pattern in _split_top_level(str(spec)):
        for expanded in expand_braces(pattern):
            base = as_path(expanded, what="data.webdataset.shards")
            if glob.has_magic(expanded):
                if is_local(expanded):
                    matches = sorted(glob.glob(os.fspath(base)))
                else:
                    anchor = next(i for i, part in enumerate(base.parts) if glob.has_magic(part))
                    root = type(base)(*base.parts[:anchor])
                    matches = sorted(str(m) for m in root.glob("/".join(base.parts[anchor:])))
            else:
                matches = [expanded if not is_local(expanded) else os.fspath(base)]
            if not matches or not all(as_path(m).is_file() for m in matches):
                raise FileNotFoundError(f"webdataset: shard {expanded!r} (from {pattern!r}) does not exist")
            paths.extend(matches)
    if not paths:
        raise ValueError(f"webdataset: no shards in {spec!r}; set data.webdataset.shards")
    return paths


def _split_key(name: str) -> tuple[str, str]:
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(directory, stem), ext.lower()


class TarSource:
    """Random-access samples of tar shards: ``src[i]`` -> {"image": bytes, "text", "where"}.

    With ``shard`` (grain ShardOptions) and at least as many tar files as processes, this
    process indexes only its own files (file i goes to process i % count) and
    ``is_process_shard`` is True; otherwise every file is indexed and the pipeline splits the
    samples. The index is one packed ``INDEX_DTYPE`` row (29 bytes) per sample.
    """

    def __init__(
        self,
        shards: str,
        caption_keys: str = "txt,json",
        shard=None,
        progress: bool = True,
        encoding: str = "utf-8",
        retry: str | None = None,
    ):
        self.encoding, self._retry = encoding, retry  # of the caption members; retry: the option naming it
        paths = expand_shards(shards)
        self.is_process_shard = shard is not None and shard.shard_count > 1 and len(paths) >= shard.shard_count
        if self.is_process_shard:
            paths = paths[shard.shard_index :: shard.shard_count]
        self.paths = paths
        self.caption_keys = [k.strip().lower() for k in str(caption_keys).split(",") if k.strip()]
        self.skipped_at_index = 0
        parts = []
        bar = None
        if progress and len(paths) > 1:
            from ..console import progress_bar

            bar = progress_bar(total=len(paths), desc="index webdataset", unit="shard", leave=False)
        for shard_no, path in enumerate(paths):
            rows = []
            for key, members in self._index_tar(path).items():
                image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
                kind = next((k for k in self.caption_keys if k in members), None)
                if image is None or kind is None:
                    self._skip(f"{path}:{key}", f"no {'image' if image is None else 'caption'} member")
                    continue
                rows.append((shard_no, *image, *members[kind], self.caption_keys.index(kind)))
            parts.append(np.array(rows, INDEX_DTYPE))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        self._rows = np.concatenate(parts) if parts else np.zeros(0, INDEX_DTYPE)
        if not len(self._rows):
            raise ValueError(f"webdataset: no (image, caption) samples in {self.paths[:3]}...")
        self._readers = [RangeReader(p) for p in self.paths]  # opened on first read, reopened in workers

    @property
    def index_bytes(self) -> int:
        """Bytes of index held for this process's samples."""
        return self._rows.nbytes

    def _skip(self, where: str, why: str) -> None:
        self.skipped_at_index += 1
        if self.skipped_at_index <= 10:
            logger.warning("webdataset: skipping %s: %s", where, why)

    def _index_tar(self, path: str) -> dict[str, dict[str, tuple[int, int]]]:
        from ..io import as_path

        members: dict[str, dict[str, tuple[int, int]]] = {}
        try:
            with as_path(path).open("rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for info in tar:
                    if info.isfile():
                        key, ext = _split_key(info.name)
                        members.setdefault(key, {})[ext] = (info.offset_data, info.size)
        except tarfile.ReadError as e:
            if not members:
                raise ValueError(f"webdataset: {path} is not an uncompressed tar file ({e})") from e
            self._skip(path, f"tar is damaged after {len(members)} keys ({e}); using those")
        return members

    def __len__(self) -> int:
        return len(self._rows)

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        data = self._readers[shard].read(offset, size)
        if len(data) != size:
            raise OSError(f"short read ({len(data)} of {size} bytes)")
        return data

    @staticmethod
    def _key_of(header: bytes, offset: int) -> str:
        try:
            return _split_key(tarfile.TarInfo.frombuf(header, tarfile.ENCODING, "surrogateescape").name)[0]
        except tarfile.HeaderError:  # not a plain ustar header: the offset names the sample instead
            return f"@{offset}"

    def key(self, index: int) -> str:
        """The sample's webdataset key, read from its image member's tar header."""
        row = self._rows[index]
        offset = int(row["image_offset"])
        return self._key_of(self._read(int(row["shard"]), offset - tarfile.BLOCKSIZE, tarfile.BLOCKSIZE), offset)

    def __getitem__(self, index: int) -> dict:
        row = self._rows[index]
        shard, offset, size = int(row["shard"]), int(row["image_offset"]), int(row["image_size"])
        where = f"{self.paths[shard]}@{offset}"
        try:  # the image's tar header (its key, for messages) and data in one read
            block = self._read(shard, offset - tarfile.BLOCKSIZE, size + tarfile.BLOCKSIZE)
            where = f"{self.paths[shard]}:{self._key_of(block[: tarfile.BLOCKSIZE], offset)}"
            image = block[tarfile.BLOCKSIZE :]
            try:
                text = self.caption(index, where)
            except TextDecodeError as e:
                return {"error": str(e), "where": where}
        except Exception as e:  # noqa: BLE001 - reported as a skipped sample
            return {"error": f"{type(e).__name__}: {e}", "where": where}
        return {"image": image, "text": text, "where": where}

    def name(self, index: int) -> str:
        """ "SHARD:KEY": how records name sample ``index`` (its image member's tar header)."""
        return f"{self.paths[int(self._rows[index]['shard'])]}:{self.key(index)}"

    def caption(self, index: int, where: str | None = None) -> str:
        """Sample ``index``'s caption alone (its image is not read); raises when it cannot be read
        (``TextDecodeError`` naming ``where``, the sample, for bytes not in ``encoding``)."""
        row = self._rows[index]
        data = self._read(int(row["shard"]), int(row["caption_offset"]), int(row["caption_size"]))
        kind = self.caption_keys[int(row["kind"])]
        where = where or self.name(index)
        raw = decode_bytes(data, where=f"{where}.{kind}", encoding=self.encoding, retry=self._retry)
        return json.loads(raw).get("caption") if kind == "json" else raw.strip()


def _eval_split(c) -> EvalSplit | None:
    """``webdataset:EVAL_SHARDS`` with the source's caption keys; at most ``eval_max_samples`` captions."""
    if not c.eval_shards:
        return None
    spec = Spec("webdataset", str(c.eval_shards), None, f"webdataset:{c.eval_shards}")
    options = {"caption_keys": c.caption_keys}
    return EvalSplit(spec, "data.webdataset.eval_shards", int(c.eval_max_samples), options=options)


def _open_train(c, *, image_size: int, shard=None) -> TarSource:
    del image_size  # the pipeline decodes
    return TarSource(c.shards, c.caption_keys, shard=shard)


def _build_records(src, split: str, skipped: list, options: dict):
    del split  # the shards given are the split
    source = TarSource(src, encoding=options.get("encoding", "utf-8"), retry="--encoding")
    skipped[0] += source.skipped_at_index
    for i in range(len(source)):
        record = source[i]
        key = source.key(i)
        yield {**record, "image_id": key, "text_id": key}


DEFAULTS = {
    "shards": "",  # tar shards: comma-separated paths, globs, braces ("/data/{00000..00099}.tar"); local or gs://
    "eval_shards": "",  # the same, for retrieval eval ("" = none)
    "caption_keys": "txt,json",  # caption member, first present: txt (its text) or json (its "caption")
    "eval_max_samples": 1000,  # at most this many eval captions (the first; <= 0: all of the shards)
}

SOURCE = Source(
    name="webdataset",
    defaults=DEFAULTS,
    open_train=_open_train,
    eval_split=_eval_split,
    path_keys=("shards", "eval_shards"),
    build_records=_build_records,
)


class _Images:
    """Webdataset samples as an image corpus: {"id": "shard:key", "image": bytes} (or "error")."""

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


def _tar_source(spec, encoding: str, caption_keys: str = "txt,json") -> TarSource:
    try:
        return TarSource(spec.location, caption_keys, encoding=encoding, retry="--encoding")
    except (FileNotFoundError, ValueError) as e:
        raise DatasetError(f"{spec}: {str(e).splitlines()[0]}") from e


def _images(spec, *, encoding: str = "utf-8") -> ImageCorpus:
    return ImageCorpus(_Images(_tar_source(spec, encoding)), f"webdataset:{spec.location}")


def _image(source: TarSource, i: int) -> bytes:
    record = source[i]
    if record.get("error"):
        raise OSError(record["error"])
    return record["image"]


def _retrieval(spec, *, encoding: str = "utf-8", caption_keys: str = "txt,json") -> RetrievalSet:
    """The shards as a retrieval set: every sample's image is a candidate, in shard and member
    order, with id "SHARD:KEY" (``ccj-embed``'s record id); the queries are the distinct captions
    in first-seen order, each with every image that has exactly that caption as its positives. A
    caption that cannot be read is listed in ``skipped`` (its image stays a candidate).
    ``caption_keys``: the trainer's ``data.webdataset.caption_keys``."""
    source = _tar_source(spec, encoding, caption_keys)
    ids, by_text, skipped = [], {}, []
    for i in range(len(source)):  # ids and captions; images stay unread
        name = source.name(i)
        ids.append(name)
        try:
            text = source.caption(i, name)
        except Exception as e:  # noqa: BLE001 - one unreadable caption is listed, not fatal
            skipped.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        if isinstance(text, str) and text.strip():
            by_text.setdefault(text, []).append(name)
        else:
            skipped.append(f"{name}: empty caption")
    if source.skipped_at_index:
        skipped.append(f"{spec.location}: {source.skipped_at_index} keys without an image or a caption")
    captions = [(t, text, names) for t, (text, names) in enumerate(by_text.items())]
    return retrieval_set(
        LazyList(len(ids), lambda i: _image(source, i)),
        ids,
        captions,
        "webdataset",
        f"webdataset:{spec.location}",
        where=lambda i: ids[i],
        skipped=skipped,
    )


OFFERS = (
    Offers(
        "webdataset",
        retrieval=_retrieval,
        images=_images,
        training=lambda spec: ("webdataset", {"shards": spec.location}),
    ),
)
