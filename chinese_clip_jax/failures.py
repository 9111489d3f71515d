"""Turning failures of the storage stack into one-line errors.

``is_disk_full(e)``: ENOSPC / EFBIG / EDQUOT anywhere in an exception chain (Orbax and
tensorstore wrap them in ValueErrors). ``quiet_orbax_failures()``: while an Orbax save or restore
that may fail runs, its own logging of the failure (absl ERROR lines with tracebacks, asyncio
"Task exception was never retrieved", late callbacks onto a closed event loop) is held back, so
the caller's one-line error is what the user sees.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import sys

__all__ = ["is_disk_full", "quiet_orbax_failures", "silence_orbax_after_failure", "first_line"]

_DISK_FULL_TEXT = ("No space left", "File too large", "Disk quota", "os_error_code='27'", "os_error_code='28'")


def first_line(e: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` (at most ``limit`` characters)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:limit] if text else ''}"


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


def _closed_loop_filter(previous):
    def hook(u):
        if not (
            isinstance(u.exc_value, (RuntimeError, ImportError)) and any(t in str(u.exc_value) for t in _LATE_NOISE)
        ):
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
