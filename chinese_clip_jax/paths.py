"""User-given paths (workdir, init_from, data, conversion in/out) as ``etils.epath.Path``.

``as_path("gs://bucket/run1")`` goes through epath's fsspec (or TensorFlow gfile) backend,
exactly as Orbax does; local paths become absolute ``epath.Path`` objects. A scheme epath does
not serve (``http://``, ``ftp://``, a typo) or one whose backend package is missing fails here,
before any work, naming the scheme and what to install:

    as_path("gs://b/x", what="workdir")   # -> epath.Path, or ImportError "... pip install gcsfs"
    as_path("ftp://h/x", what="workdir")  # ValueError "workdir 'ftp://h/x': unsupported scheme ..."

What cannot be read remotely (an LMDB database, a checkpoint a library opens by local path) is
copied once into a temp dir: ``copy_tree`` (any scheme to any scheme), or ``local_copy``, which
keeps the copy alive with the object that reads it. What is read by byte ranges (a TSV of
images, tar shards) stays where it is: ``RangeReader``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import tempfile
import threading
import time

from etils import epath

__all__ = ["as_path", "scheme_of", "is_local", "copy_tree", "local_copy", "RangeReader", "SCHEMES"]

logger = logging.getLogger(__name__)

# scheme -> (fsspec implementation module, pip package); epath serves exactly these URI schemes.
SCHEMES = {
    "gs": ("gcsfs", "gcsfs"),
    "s3": ("s3fs", "s3fs"),
    "az": ("adlfs", "adlfs"),
    "hf": ("huggingface_hub", "huggingface_hub"),
}
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def scheme_of(path) -> str | None:
    """ "gs://b/x" -> "gs"; a local path -> None."""
    m = _URI.match(os.fspath(path) if not isinstance(path, str) else path)
    return m.group(1).lower() if m else None


def is_local(path) -> bool:
    return scheme_of(str(path)) is None


def _backend_installed(scheme: str) -> bool:
    import fsspec

    try:  # a registered implementation (gcsfs, s3fs, or one a test registers) serves the scheme
        fsspec.get_filesystem_class(scheme)
        return True
    except (ImportError, ValueError):
        pass
    return importlib.util.find_spec("tensorflow") is not None and scheme in ("gs", "s3")


def as_path(path, *, what: str = "path") -> epath.Path:
    """``path`` (str, os.PathLike or epath.Path) -> ``epath.Path``; local ones made absolute.

    Raises ValueError for an empty path or a scheme epath does not serve, ImportError when the
    scheme's backend is not installed; both name ``what`` and the path.
    """
    text = os.fspath(path) if not isinstance(path, str) else path
    if not str(text).strip():
        raise ValueError(f"{what}: empty path")
    scheme = scheme_of(text)
    if scheme is None:
        return epath.Path(os.path.abspath(os.path.expanduser(text)))
    if scheme not in SCHEMES:
        supported = ", ".join(f"{s}://" for s in SCHEMES)
        raise ValueError(f"{what} {text!r}: unsupported scheme {scheme}:// (supported: local paths, {supported})")
    if not _backend_installed(scheme):
        raise ImportError(
            f"{what} {text!r}: the {scheme}:// backend is not installed; pip install {SCHEMES[scheme][1]}"
        )
    return epath.Path(text)


def copy_tree(src: epath.Path, dst: epath.Path) -> epath.Path:
    """Copies the file or directory ``src`` to ``dst`` (any epath schemes on either side,
    streamed in 16 MiB chunks); returns ``dst``."""
    import shutil

    if src.is_dir():
        dst.mkdir(parents=True, exist_ok=True)
        for child in src.iterdir():
            copy_tree(child, dst / child.name)
        return dst
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or directory")
    with src.open("rb") as f_in, dst.open("wb") as f_out:
        shutil.copyfileobj(f_in, f_out, 16 << 20)
    return dst


def local_copy(path: epath.Path, *, what: str = "path") -> tuple[epath.Path, tempfile.TemporaryDirectory | None]:
    """(``path``, None) when ``path`` is local; else (a copy of the file or directory in a fresh
    temp dir, the ``TemporaryDirectory`` holding it), logged. The copy lives until that holder
    is cleaned up or garbage collected: keep it beside whatever reads the copy."""
    if is_local(path):
        return path, None
    holder = tempfile.TemporaryDirectory(prefix="ccj-copy-")
    local = epath.Path(holder.name) / path.name
    logger.info("%s %s cannot be read remotely: copying it to %s (once)", what, path, local)
    start = time.perf_counter()
    copy_tree(path, local)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(local) for f in files)  # our temp dir
    size = size or os.path.getsize(local)  # a single file
    logger.info("%s: copied %.1f MiB in %.1f s", what, size / 2**20, time.perf_counter() - start)
    return local, holder


class RangeReader:
    """Byte ranges of one local or remote file: ``reader.read(offset, size)`` -> bytes.

    Opened on the first read. A local file is read with ``os.pread``; a remote one through the
    file object epath opens: an fsspec file (gcsfs, s3fs, ...) by its filesystem's
    ``cat_file(path, start, end)``, one exact ranged request per read (a plain seek/read on a
    GCSFile would also fetch its 5 MiB read-ahead block), any other by seek/read under a lock.
    Threads read concurrently except in that last case. Pickles without the open file, so grain
    worker processes reopen their own.
    """

    def __init__(self, path):
        self.path = str(path)
        self._file, self._lock = None, threading.Lock()

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def _open(self):
        if is_local(self.path):
            return os.open(self.path, os.O_RDONLY)
        f = as_path(self.path).open("rb")
        fs, key = getattr(f, "fs", None), getattr(f, "path", None)
        if fs is not None and key and hasattr(fs, "cat_file"):
            f.close()
            return fs, key
        return f

    def read(self, offset: int, size: int) -> bytes:
        if self._file is None:
            with self._lock:
                if self._file is None:
                    self._file = self._open()
        f = self._file
        if isinstance(f, int):
            return os.pread(f, size, offset)
        if isinstance(f, tuple):
            fs, key = f
            return fs.cat_file(key, start=offset, end=offset + size)
        with self._lock:
            f.seek(offset)
            return f.read(size)

    def close(self) -> None:
        f, self._file = getattr(self, "_file", None), None
        if isinstance(f, int):
            os.close(f)
        elif f is not None and not isinstance(f, tuple):
            f.close()

    def __del__(self):
        self.close()
