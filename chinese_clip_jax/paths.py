"""User-given paths (workdir, init_from, data, conversion in/out) as ``etils.epath.Path``.

``as_path("gs://bucket/run1")`` goes through epath's fsspec (or TensorFlow gfile) backend,
exactly as Orbax does; local paths become absolute ``epath.Path`` objects. A scheme epath does
not serve (``http://``, ``ftp://``, a typo) or one whose backend package is missing fails here,
before any work, naming the scheme and what to install:

    as_path("gs://b/x", what="workdir")   # -> epath.Path, or ImportError "... pip install gcsfs"
    as_path("ftp://h/x", what="workdir")  # ValueError "workdir 'ftp://h/x': unsupported scheme ..."
"""

from __future__ import annotations

import importlib.util
import os
import re

from etils import epath

__all__ = ["as_path", "scheme_of", "is_local", "copy_tree", "SCHEMES"]

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
