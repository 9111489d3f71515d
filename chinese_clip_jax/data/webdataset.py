"""webdataset tar shards as written by img2dataset: ``00000.tar`` holding ``KEY.jpg`` + ``KEY.txt``/``KEY.json``.

Members sharing a key (the basename up to its first dot, as webdataset does) form one sample:
the image (jpg/jpeg/png/webp/bmp) and the caption, taken from the first of ``caption_keys``
present (``txt``: the file's text; ``json``: its "caption" field). Shards are read uncompressed
with random access (an index of member offsets is built once), so grain can shuffle globally.
A key with no image or no caption, or a truncated tar, is logged, skipped and counted in
``skipped_at_index``; an undecodable image or caption is skipped later by the pipeline.

Config keys (``data.webdataset.*``): ``shards`` (comma-separated paths, globs or brace ranges,
e.g. "/data/{00000..00099}.tar"), ``eval_shards`` (same, for retrieval eval; "" = none),
``caption_keys`` (e.g. "txt,json"), ``eval_max_samples``.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import tarfile
import threading

import numpy as np
import PIL.Image

from .pipeline import TextEncoder

__all__ = ["expand_shards", "TarSource", "eval_sets"]

logger = logging.getLogger(__name__)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")


def expand_shards(spec: str) -> list[str]:
    """"a.tar,dir/*.tar,s/{000..002}.tar" -> sorted-per-pattern existing paths (errors name the missing)."""
    paths = []
    for pattern in (p.strip() for p in str(spec).split(",") if p.strip()):
        for expanded in _expand_braces(pattern):
            matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
            if not matches or not all(os.path.isfile(m) for m in matches):
                raise FileNotFoundError(f"webdataset: shard {expanded!r} (from {pattern!r}) does not exist")
            paths.extend(matches)
    if not paths:
        raise ValueError(f"webdataset: no shards in {spec!r}; set data.webdataset.shards")
    return paths


def _expand_braces(pattern: str) -> list[str]:
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
    out = []
    for i in range(lo, hi + 1):
        out.extend(_expand_braces(pattern[:m.start()] + str(i).zfill(width) + pattern[m.end():]))
    return out


def _split_key(name: str) -> tuple[str, str]:
    directory, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(directory, stem), ext.lower()


class TarSource:
    """Random-access samples of tar shards: ``src[i]`` -> {"image": bytes, "text", "where"}."""

    def __init__(self, shards: str, caption_keys: str = "txt,json"):
        self.paths = expand_shards(shards)
        self.caption_keys = [k.strip().lower() for k in str(caption_keys).split(",") if k.strip()]
        self.skipped_at_index = 0
        # one row per sample: (shard, image offset, image size, caption offset, caption size, caption kind)
        rows, self._names = [], []
        for shard, path in enumerate(self.paths):
            for key, members in self._index_tar(path).items():
                image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
                kind = next((k for k in self.caption_keys if k in members), None)
                if image is None or kind is None:
                    self._skip(f"{path}:{key}", f"no {'image' if image is None else 'caption'} member")
                    continue
                rows.append((shard, *image, *members[kind], self.caption_keys.index(kind)))
                self._names.append(f"{path}:{key}")
        if not rows:
            raise ValueError(f"webdataset: no (image, caption) samples in {self.paths[:3]}...")
        self._rows = np.asarray(rows, np.int64)
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def _skip(self, where: str, why: str) -> None:
        self.skipped_at_index += 1
        if self.skipped_at_index <= 10:
            logger.warning("webdataset: skipping %s: %s", where, why)

    def _index_tar(self, path: str) -> dict[str, dict[str, tuple[int, int]]]:
        members: dict[str, dict[str, tuple[int, int]]] = {}
        try:
            with tarfile.open(path, mode="r:") as tar:
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
        fd = self._fds.get(shard)
        if fd is None:
            with self._lock:
                if shard not in self._fds:
                    self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
                fd = self._fds[shard]
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"short read ({len(data)} of {size} bytes)")
        return data

    def __getitem__(self, index: int) -> dict:
        shard, img_off, img_size, cap_off, cap_size, kind = (int(x) for x in self._rows[index])
        where = self._names[index]
        try:
            image = self._read(shard, img_off, img_size)
            raw = self._read(shard, cap_off, cap_size).decode("utf-8")
            text = json.loads(raw).get("caption") if self.caption_keys[kind] == "json" else raw.strip()
        except Exception as e:  # noqa: BLE001 - reported as a skipped sample
            return {"error": f"{type(e).__name__}: {e}", "where": where}
        return {"image": image, "text": text, "where": where}

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)


class _Images:
    """Lazy eval images: ``seq[i]`` -> the encoded image bytes of record ``indices[i]``."""

    def __init__(self, source, indices):
        self.source, self.indices = source, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.source[self.indices[i]]["image"]


def eval_sets(c, *, image_size: int, context_length: int = 52) -> dict:
    """{"retrieval": ...} over the first ``eval_max_samples`` good samples of ``eval_shards``.

    text_to_images: each caption's positives are all images with exactly that caption.
    """
    if not c.eval_shards:
        return {}
    del image_size  # the evaluator decodes, batch by batch
    source = TarSource(c.eval_shards, c.caption_keys)
    indices, texts = [], []
    for i in range(len(source)):
        if len(texts) >= c.eval_max_samples:
            break
        record = source[i]
        try:
            if record.get("error") or not record["text"]:
                raise ValueError(record.get("error") or "empty caption")
            with PIL.Image.open(io.BytesIO(record["image"])) as im:
                im.verify()
            indices.append(i)
            texts.append(record["text"])
        except Exception as e:  # noqa: BLE001 - a broken eval sample is dropped, not fatal
            logger.warning("webdataset: dropping eval sample %s: %s", record["where"], e)
    if not texts:
        raise ValueError(f"webdataset: no usable eval samples in {c.eval_shards!r}")
    by_text: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        by_text.setdefault(t, []).append(i)
    images = _Images(source, indices)
    return {"retrieval": {"images": images, **TextEncoder(context_length)(texts),
                          "texts": texts, "text_to_images": [by_text[t] for t in texts]}}
