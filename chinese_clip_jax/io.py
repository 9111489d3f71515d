"""Storage: user-given paths, hub names, atomic writes and storage failures, for local and gs:// alike.

Paths (workdir, init_from, data, conversion in/out) become ``etils.epath.Path`` objects through
``as_path``: ``as_path("gs://bucket/run1")`` goes through epath's fsspec (or TensorFlow gfile)
backend, exactly as Orbax does; local paths become absolute ``epath.Path`` objects. A scheme epath
does not serve (``http://``, ``ftp://``, a typo) or one whose backend package is missing fails
here, before any work, naming the scheme and what to install:

    as_path("gs://b/x", what="workdir")   # -> epath.Path, or ImportError "... pip install gcsfs"
    as_path("ftp://h/x", what="workdir")  # ValueError "workdir 'ftp://h/x': unsupported scheme ..."

What cannot be read remotely (an LMDB database, a checkpoint a library opens by local path) is
copied once into a temp dir: ``copy_tree`` (any scheme to any scheme), or ``local_copy``, which
keeps the copy alive with the object that reads it. What is read by byte ranges (a TSV of
images, tar shards) stays where it is: ``RangeReader``.

Writes: ``atomic_output(path)`` / ``atomic_write(path, data)`` write a temporary sibling and
rename it over ``path`` only when the whole content is written, so a reader never sees a
half-written file and a failed write leaves what was there before (every writer of the library
goes through them). A write killed outright leaves its ``NAME.tmpPID``: the next successful write
of the same path removes it, saying so (``stale_temporaries``: local, process gone, untouched).

Hub names: ``is_hub_id("OFA-Sys/chinese-clip-vit-base-patch16")`` is True; a path that exists,
starts with ``.``, ``/`` or ``~``, has more or fewer than one ``/``, or whose first part is a
local directory is a local path. ``resolve_local_or_hub(src)`` returns a local path, downloading
hub ids (the one download function); a local path that does not exist raises "no such local path".

Failures: ``first_line(e)`` is the one-line form of an exception every command prints;
``decode_failure(where, data, e, encoding, retry)`` the one line for text in another encoding
than expected (naming the place, the byte, a GBK guess and the option to retry with);
``is_disk_full(e)``: ENOSPC / EFBIG / EDQUOT anywhere in an exception chain (Orbax and
tensorstore wrap them in ValueErrors). ``quiet_orbax_failures()``: while an Orbax save or restore
that may fail runs, its own logging of the failure (absl ERROR lines with tracebacks, asyncio
"Task exception was never retrieved", late callbacks onto a closed event loop, the failed read
coroutines of a damaged checkpoint collected later) is held back, so the caller's one-line error
is what the user sees.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import importlib.util
import logging
import os
import re
import sys
import tempfile
import threading
import time

from etils import epath

__all__ = [
    "SCHEMES",
    "RangeReader",
    "as_path",
    "atomic_output",
    "atomic_write",
    "copy_tree",
    "decode_failure",
    "first_line",
    "hub_snapshot",
    "is_disk_full",
    "is_hub_id",
    "is_local",
    "local_copy",
    "staged_input",
    "staged_output",
    "quiet_orbax_failures",
    "resolve_local_or_hub",
    "scheme_of",
    "silence_orbax_after_failure",
    "stale_temporaries",
]

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


@contextlib.contextmanager
def staged_input(path, *, what: str = "path"):
    """``with staged_input(src) as local:`` a local path to read ``src`` (a file or directory)
    from: ``src`` itself when local, else a temporary copy (``local_copy``) removed on exit."""
    local, holder = local_copy(path if isinstance(path, epath.Path) else as_path(path, what=what), what=what)
    try:
        yield local
    finally:
        if holder is not None:
            holder.cleanup()


@contextlib.contextmanager
def staged_output(path, *, what: str = "path"):
    """``with staged_output(out) as local:`` a local directory to write ``out``'s files into:
    ``out`` itself when local, else a temporary directory copied to ``out`` once the block ends
    without an exception (nothing is copied after a failure)."""
    target = path if isinstance(path, epath.Path) else as_path(path, what=what)
    if is_local(target):
        yield target
        return
    with tempfile.TemporaryDirectory(prefix="ccj-stage-") as tmp:
        local = epath.Path(tmp) / target.name
        yield local
        copy_tree(local, target)


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


# ---- atomic writes ----


STALE_AFTER_S = 60.0  # a temporary untouched this long whose process is gone is a leftover


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # someone else's process, or not a pid at all
        return True
    return True


def stale_temporaries(path) -> list[str]:
    """The temporaries of ``path`` that interrupted ``atomic_output`` writes left (a SIGKILL, a
    power cut: no ``except`` ran): local siblings ``NAME.tmpPID`` whose process no longer runs and
    that have not changed for ``STALE_AFTER_S`` seconds (provably not a write in progress here).
    Remote paths: none (another host's write cannot be told from a leftover)."""
    target = os.fspath(path)
    if not is_local(target):
        return []
    directory, name = os.path.split(target)
    pattern = re.compile(re.escape(name) + r"\.tmp(\d+)$")
    try:
        names = os.listdir(directory or ".")
    except OSError:
        return []
    now, stale = time.time(), []
    for other in names:
        m = pattern.match(other)
        if not m or int(m.group(1)) == os.getpid() or _pid_running(int(m.group(1))):
            continue
        full = os.path.join(directory, other)
        with contextlib.suppress(OSError):
            if now - os.stat(full).st_mtime >= STALE_AFTER_S:
                stale.append(full)
    return sorted(stale)


@contextlib.contextmanager
def atomic_output(path, mode: str = "wb", *, encoding: str | None = None, clean_stale: bool = True):
    """A file object for a temporary sibling of ``path`` that replaces ``path`` only once the
    ``with`` block has finished without an exception; on any failure the temporary is removed and
    ``path`` keeps what it held. ``path``: str, os.PathLike or epath.Path (local or gs://).

    The temporary is ``NAME.tmpPID``. Once the write has succeeded, the temporaries of ``path``
    that an interrupted earlier write left (``stale_temporaries``) are removed, with a warning
    naming each; ``clean_stale=False`` skips that directory listing (a writer of many files in one
    directory that clears its leftovers itself)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_output: mode must be 'w' or 'wb', not {mode!r}")
    target = path if isinstance(path, epath.Path) else as_path(path)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    local = is_local(target)  # local files by the os module: no epath backend (nor its TF probe)
    try:
        opened = open(os.fspath(tmp), mode, encoding=encoding if mode == "w" else None) if local else None
        with opened or tmp.open(mode, encoding=encoding if mode == "w" else None) as f:
            yield f
        if local:
            os.replace(os.fspath(tmp), os.fspath(target))
        else:
            tmp.replace(target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(os.fspath(tmp)) if local else tmp.unlink(missing_ok=True)
        raise
    if clean_stale:
        for leftover in stale_temporaries(target):
            with contextlib.suppress(OSError):
                os.remove(leftover)
                logger.warning("removed %s: left by an earlier write of %s that was interrupted", leftover, target)


def atomic_write(path, data: bytes | str, *, clean_stale: bool = True) -> None:
    """Writes ``data`` (bytes, or text as UTF-8) to ``path`` atomically (see ``atomic_output``)."""
    if isinstance(data, str):
        with atomic_output(path, "w", encoding="utf-8", clean_stale=clean_stale) as f:
            f.write(data)
    else:
        with atomic_output(path, "wb", clean_stale=clean_stale) as f:
            f.write(data)


# ---- hub names ----

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(src: str | os.PathLike) -> bool:
    """Whether ``src`` names a hub repo ("owner/name") rather than a local path."""
    if not isinstance(src, str):
        return False
    if os.path.exists(src) or not _HUB_ID.match(src):
        return False
    return not os.path.isdir(src.split("/")[0])  # "build/hf" with ./build present: a local path


def hub_snapshot(repo_id: str, allow_patterns: list[str] | None = None) -> str:
    """Downloads (or reuses the cached) files of a hub repo; returns the local snapshot directory."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, allow_patterns=allow_patterns)
    except Exception as e:  # offline, no such repo or file: say which and why
        raise OSError(
            f"could not download {repo_id!r} from the hub ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "Offline? Download it elsewhere and pass the local directory."
        ) from None


def resolve_local_or_hub(src: str | os.PathLike, allow_patterns: list[str] | None = None) -> str:
    """A local path (which must exist) or a hub id (downloaded) -> a local path."""
    src = os.fspath(src)
    if os.path.exists(src):
        return src
    if is_hub_id(src):
        return hub_snapshot(src, allow_patterns)
    raise FileNotFoundError(f"no such local path: {src} (a hub id has the form 'owner/name')")


# ---- storage failures ----

_DISK_FULL_TEXT = ("No space left", "File too large", "Disk quota", "os_error_code='27'", "os_error_code='28'")


def first_line(e: BaseException, limit: int = 300, *, with_type: bool = True) -> str:
    """``Type: first line of the message`` (the line at most ``limit`` characters); with
    ``with_type=False`` the first line alone (the type's name when the message is empty), as the
    command lines print it after ``error:``."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else ""
    if not with_type:
        return line or type(e).__name__
    return f"{type(e).__name__}: {line[:limit]}"


def decode_failure(where: str, data: bytes, error: UnicodeDecodeError, encoding: str, retry: str | None) -> str:
    """One line for text that is not in ``encoding``: where (``file:line``, ``shard:key``), the first
    bad byte, and, when the bytes read as GBK (GB18030, what Chinese Windows tools write), that
    guess; ``retry`` is the option that names the encoding (e.g. ``--encoding``), None where there is
    none (then: convert the file to UTF-8)."""
    bad = data[error.start : error.start + 1]
    try:
        data.decode("gb18030")
        guess = "gbk"
    except UnicodeDecodeError:
        guess = None
    text = f"{where}: not valid {encoding} text (byte 0x{bad.hex()} at offset {error.start})"
    if retry:
        return text + (
            f"; it reads as GBK: rerun with {retry} gbk" if guess else f"; rerun with {retry} <its encoding>"
        )
    source = "GBK" if guess else "<its encoding>"
    return text + f"; convert the file to UTF-8 (e.g. iconv -f {source} -t UTF-8)"


def is_disk_full(e: BaseException | None) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return True
        if any(t in str(e) for t in _DISK_FULL_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


_LATE_NOISE = ("Event loop is closed", "sys.meta_path is None")


def _orbax_coroutine(obj) -> bool:
    """An Orbax / TensorStore coroutine, whose failure (already reported by the caller) Python
    would print as "Exception ignored in: <coroutine ...>" when it is garbage collected."""
    code = getattr(obj, "cr_code", None)
    return code is not None and any(part in code.co_filename for part in ("orbax", "tensorstore"))


def _closed_loop_filter(previous):
    def hook(u):
        late = isinstance(u.exc_value, (RuntimeError, ImportError)) and any(t in str(u.exc_value) for t in _LATE_NOISE)
        if not (late or _orbax_coroutine(u.object)):
            previous(u)

    hook._ccj_filter = True
    return hook


def silence_orbax_after_failure() -> None:
    """After a failed save the run is over: Orbax's background threads and the coroutines left at
    interpreter exit would print tracebacks after the one-line error. Held back from here on."""
    for name in ("asyncio", "absl"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    if not getattr(sys.unraisablehook, "_ccj_filter", False):
        sys.unraisablehook = _closed_loop_filter(sys.unraisablehook)


@contextlib.contextmanager
def quiet_orbax_failures():
    loggers = [logging.getLogger(name) for name in ("asyncio", "absl")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.CRITICAL)
    if not getattr(sys.unraisablehook, "_ccj_filter", False):  # stays: the late callbacks come later
        sys.unraisablehook = _closed_loop_filter(sys.unraisablehook)
    try:
        yield
    finally:
        gc.collect()
        for log, level in zip(loggers, levels):
            log.setLevel(level)
