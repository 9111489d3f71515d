"""Image folders and image lists: ``folder:PATH`` and ``list:FILE`` specs.

``folder:PATH`` as a classification set: one sub-folder per class, classes in sorted folder
order, images at any depth below each (``PATH/SPLIT`` when that directory exists, else PATH);
every listed image name is kept, even one whose file is gone: the consumer reports it as a bad
record instead of the set silently shrinking.
``folder:PATH`` as an image corpus: every image file below PATH, sorted by relative path;
id = that path. ``list:FILE``: one image path per line (relative ones are relative to FILE's
folder), decoded as every text file (``text``); id = the line as written.
Image files: ``IMAGE_SUFFIXES`` (case-insensitive). Paths may be ``gs://...``.
"""

from __future__ import annotations

import os

import numpy as np

from ..io import as_path
from .sets import ClassificationSet, DatasetError, ImageCorpus
from .source import Offers
from .text import TextDecodeError, decoded_lines

__all__ = ["IMAGE_SUFFIXES", "FileImages", "OFFERS"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class FileImages:
    """Image files by path: ``seq[i]`` -> {"id": ids[i], "image": bytes} (read on access; pickles
    as its paths, for grain worker processes), or {"id", "error"} when it cannot be read."""

    def __init__(self, paths: list[str], ids: list):
        self.paths, self.ids = paths, ids

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self.paths):
            raise IndexError(i)
        try:
            return {"id": self.ids[i], "image": as_path(self.paths[i]).read_bytes()}
        except Exception as e:  # noqa: BLE001 - a missing or unreadable file is a bad record
            return {"id": self.ids[i], "error": f"{type(e).__name__}: {e}"}


def _image_files(root) -> list[tuple[str, str]]:
    """(path relative to root, full path) of every image file below ``root``, sorted."""
    return sorted(
        ((directory / name).relative_to(root).as_posix(), str(directory / name))
        for directory, _, names in root.walk()  # epath: no recursive glob on remote paths
        for name in names
        if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES
    )


def _classification(spec, *, data_dir=None) -> ClassificationSet:
    del data_dir
    root = as_path(spec.location, what=str(spec))
    if not root.is_dir():
        raise DatasetError(f"{spec}: no such directory {root} (folder:PATH needs one sub-folder per class)")
    if spec.split and (root / spec.split).is_dir():
        root = root / spec.split
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{spec}: {root} has no class sub-folders")
    paths, labels = [], []
    for c, name in enumerate(classes):
        files = [full for _, full in _image_files(root / name)]
        paths += files
        labels += [c] * len(files)
    if not paths:
        raise DatasetError(f"{spec}: no images ({', '.join(IMAGE_SUFFIXES)}) under the class folders of {root}")
    return ClassificationSet(paths, np.asarray(labels, np.int64), classes, f"folder:{root}", image_names=paths)


def _folder_images(spec, *, encoding: str = "utf-8") -> ImageCorpus:
    del encoding
    root = as_path(spec.location, what=str(spec))
    if not root.is_dir():
        raise DatasetError(f"{spec}: no such directory {root}")
    found = _image_files(root)
    if not found:
        raise DatasetError(f"{spec}: no image files ({', '.join(IMAGE_SUFFIXES)}) below {root}")
    return ImageCorpus(FileImages([p for _, p in found], [i for i, _ in found]), f"folder:{root}")


def _list_images(spec, *, encoding: str = "utf-8") -> ImageCorpus:
    f = as_path(spec.location, what=str(spec))
    if not f.is_file():
        raise DatasetError(f"{spec}: no such file {f}")
    try:
        ids = [line.strip() for _, line in decoded_lines(f, encoding=encoding) if line.strip()]
    except TextDecodeError as e:
        raise DatasetError(f"{spec}: {e}") from None
    if not ids:
        raise DatasetError(f"{spec}: {f} lists no image paths")
    paths = [str(as_path(i)) if (i.startswith("/") or "://" in i) else str(f.parent / i) for i in ids]
    return ImageCorpus(FileImages(paths, ids), f"list:{f}")


OFFERS = (
    Offers("folder", classification=_classification, images=_folder_images),
    Offers("list", images=_list_images),
)
