"""``cn_clip:ROOT[@SPLIT]``: a split of cn_clip's layout (``cn_clip``) as a retrieval set, an
image corpus and training pairs.

Retrieval: the candidates are every image of the split in file (TSV) or key (LMDB) order, as
cn_clip's feature extraction reads them; the queries its captions in file order (LMDB: grouped
back from the pairs in key order); ids as the files spell them. Image corpus: the same images
in the same order, id = the image id. ROOT may be the layout's root or its ``lmdb`` folder,
local or ``gs://`` (a remote LMDB split is copied once: LMDB opens local files only).
"""

from __future__ import annotations

import base64

from ..io import as_path
from .cn_clip import LmdbImages, TsvImages, find_split, open_split, read_captions
from .sets import DatasetError, ImageCorpus, LazyList, RetrievalSet, retrieval_set
from .source import Offers
from .text import TextDecodeError

__all__ = ["OFFERS"]


def _b64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text)  # cn_clip's encoding; plain base64 decodes the same


def _find(spec, layout: str | None = None):
    root = as_path(spec.location, what=str(spec))
    try:
        return root, *find_split(root, spec.split, layout, choose_with="a layout")
    except (FileNotFoundError, ValueError) as e:
        raise DatasetError(f"{spec}: {str(e).removeprefix('cn_clip: ')}") from None


def _retrieval(spec, *, encoding: str = "utf-8", layout: str | None = None) -> RetrievalSet:
    """``layout``: "tsv" or "lmdb" where ROOT holds the split both ways (the trainer's
    ``data.cn_clip.format``); None: the one ROOT holds."""
    root, fmt, directory = _find(spec, layout)
    split = spec.split
    if fmt == "tsv":
        counter: list = [0, None]  # the count data.cn_clip readers keep, and the reasons
        try:
            captions = [c[:3] for c in read_captions(directory / f"{split}_texts.jsonl", counter, encoding=encoding)]
        except TextDecodeError as e:
            raise DatasetError(str(e).removeprefix("cn_clip: ")) from None
        skipped = counter[2:]
        lines = [0]
        images = TsvImages(directory / f"{split}_imgs.tsv", lines)
        if lines[0]:
            skipped.append(f"{directory / f'{split}_imgs.tsv'}: {lines[0]} lines without 'image_id<TAB>base64'")
        ids = images.ids()
        return retrieval_set(
            LazyList(len(ids), lambda i: _b64(images[ids[i]][0])),
            ids,
            captions,
            "cn_clip-tsv",
            str(root),
            where=lambda i: images[ids[i]][1],
            skipped=skipped,
        )
    _, images, captions = open_split(root, split, "lmdb", [0], choose_with="a layout")
    ids = images.ids()
    return retrieval_set(
        LazyList(len(ids), lambda i: _b64(images[ids[i]][0])),
        ids,
        [c[:3] for c in captions],
        "cn_clip-lmdb",
        str(directory),
        where=lambda i: f"{directory / 'imgs'} key {ids[i]}",
    )


class _Images:
    """A cn_clip split's images by position: {"id": image id, "image": base64 text}."""

    def __init__(self, images, ids: list):
        self.images, self.ids = images, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self.ids):
            raise IndexError(i)
        try:
            return {"id": self.ids[i], "image": self.images[self.ids[i]][0]}
        except Exception as e:  # noqa: BLE001
            return {"id": self.ids[i], "error": f"{type(e).__name__}: {e}"}


def _images(spec, *, encoding: str = "utf-8") -> ImageCorpus:
    del encoding
    from ..io import local_copy

    root, fmt, directory = _find(spec)
    if fmt == "tsv":
        images = TsvImages(directory / f"{spec.split}_imgs.tsv", [0])
    else:
        local, keep = local_copy(directory, what=f"cn_clip LMDB split {spec.split!r}")
        images = LmdbImages(local / "imgs", keep=keep, origin=directory / "imgs")
    ids = images.ids()
    if not ids:
        raise DatasetError(f"{spec}: split {spec.split!r} under {root} has no images")
    return ImageCorpus(_Images(images, ids), f"cn_clip:{root}@{spec.split}")


def _training(spec) -> tuple[str, dict]:
    _, fmt, _ = _find(spec)
    return "cn_clip", {"root": spec.location, "format": fmt, "split": spec.split}


OFFERS = (Offers("cn_clip", retrieval=_retrieval, images=_images, training=_training),)
