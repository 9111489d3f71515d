"""The source images of an images run, by id, for showing results: the file, or a thumbnail.

    sources = SourceImages.open(run)          # run: catalog.Run of kind "images"
    data, mime = sources.original("a/0001.png")
    jpeg = sources.thumbnail("a/0001.png")    # at most THUMBNAIL_PX on a side, cached

Only ids of the run's id table are served, through the corpus the run was embedded from (its
manifest's ``input``, reopened with ``embed.open_images``): an id is looked up, never turned
into a path, so nothing outside the corpus can be reached through it. Corpora whose records are
not addressable by id (webdataset shards, TFDS) serve no source images (404 saying so).
"""

from __future__ import annotations

import base64
import functools
import io

import PIL.Image
import PIL.ImageOps

from ..embed import CorpusError, open_images
from .catalog import Run, ServeError

__all__ = ["SourceImages", "THUMBNAIL_PX"]

THUMBNAIL_PX = 256
THUMBNAIL_CACHE = 1024  # thumbnails kept in memory (about 10 KB each)


class SourceImages:
    def __init__(self, run: Run, records=None, record_of: dict | None = None, why: str = ""):
        self.run, self.records, self.record_of, self.why = run, records, record_of or {}, why
        self.thumbnail = functools.lru_cache(maxsize=THUMBNAIL_CACHE)(self._thumbnail)

    @classmethod
    def open(cls, run: Run) -> SourceImages:
        source = run.manifest.get("input", "")
        try:
            corpus = open_images(source)
        except (CorpusError, ValueError, ImportError, OSError) as e:
            return cls(run, why=f"the corpus {source} cannot be opened: {str(e).splitlines()[0]}")
        record_ids = getattr(corpus.records, "ids", None)  # folder, list and cn_clip records carry their ids
        if record_ids is None:
            return cls(run, why=f"the records of {source.partition(':')[0]} corpora are not addressable by id")
        served = {str(i) for i in run.ids}
        record_of = {}
        for n, i in enumerate(record_ids):
            if str(i) in served:
                record_of.setdefault(str(i), n)
        return cls(run, corpus.records, record_of)

    @property
    def available(self) -> bool:
        return self.records is not None

    def describe(self) -> str:
        return f"{len(self.record_of)} source images" if self.available else f"no source images ({self.why})"

    def _bytes(self, key: str) -> bytes:
        if self.run.row(key) is None:
            raise ServeError(f"unknown image id {key!r}: not in {self.run.kind}-ids.jsonl", 404)
        if not self.available:
            raise ServeError(f"image {key!r}: no source images to serve: {self.why}", 404)
        n = self.record_of.get(key)
        record = self.records[n] if n is not None else {"error": "not in the corpus any more"}
        if record.get("error"):
            raise ServeError(f"image {key!r}: its source cannot be read: {record['error']}", 404)
        data = record["image"]
        return base64.urlsafe_b64decode(data) if isinstance(data, str) else bytes(data)

    def original(self, key: str) -> tuple[bytes, str]:
        """(the file's bytes, its MIME type) of a served id; ServeError 404 otherwise."""
        data = self._bytes(key)
        try:
            with PIL.Image.open(io.BytesIO(data)) as img:
                mime = PIL.Image.MIME.get(img.format or "", "application/octet-stream")
        except (OSError, PIL.Image.DecompressionBombError) as e:
            raise ServeError(f"image {key!r}: its source is not a readable image ({type(e).__name__})", 404) from e
        return data, mime

    def _thumbnail(self, key: str) -> bytes:
        data = self._bytes(key)
        try:
            with PIL.Image.open(io.BytesIO(data)) as img:
                img.draft("RGB", (THUMBNAIL_PX, THUMBNAIL_PX))  # JPEG: decode at a reduced scale
                small = PIL.ImageOps.exif_transpose(img).convert("RGB")
                small.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        except (OSError, PIL.Image.DecompressionBombError) as e:
            raise ServeError(f"image {key!r}: its source is not a readable image ({type(e).__name__})", 404) from e
        out = io.BytesIO()
        small.save(out, "JPEG", quality=85)
        return out.getvalue()
