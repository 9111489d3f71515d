"""What our commands print besides their results: library noise silenced, progress bars tamed.

``quiet_libraries()`` (called first thing by ``ccj-train``, ``ccj-convert``, ``ccj-eval`` and
``data.build``, never on import of the library) silences messages a user of those commands
cannot act on: transformers' advisory warnings (e.g. "PyTorch was not found", printed when the
optional torch is absent) and its own progress bars, TensorFlow's C++ log lines, and absl's
Python logging below ERROR (TFDS and Orbax info/warnings about their internals). Our own
warnings (``chinese_clip_jax.*`` loggers) are untouched.

``progress_bar(**tqdm_kwargs)``: a tqdm bar on stderr. On a terminal it redraws in place; when
stderr is not a terminal (a log file, CI) each refresh is one fixed-width ASCII line at most
every 30 s, so a log never fills with partial redraws.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["quiet_libraries", "progress_bar", "NOT_A_TERMINAL_INTERVAL_S"]

NOT_A_TERMINAL_INTERVAL_S = 30.0


def quiet_libraries() -> None:
    """Silences third-party noise (see the module docstring); idempotent. Environment variables
    the user set are kept."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # read when each warning is made
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is imported
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if not sys.stderr.isatty():  # transformers' bars follow huggingface_hub's switch
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("absl").setLevel(logging.ERROR)
    if "transformers" in sys.modules:  # already imported: its logger reads no environment again
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if not sys.stderr.isatty():
            hf_logging.disable_progress_bar()


def progress_bar(**kwargs):
    """``tqdm(**kwargs)`` on stderr, single-line when stderr is not a terminal (module docstring)."""
    from tqdm import tqdm

    kwargs.setdefault("mininterval", 2.0)
    if not sys.stderr.isatty():
        kwargs.update(
            mininterval=max(kwargs["mininterval"], NOT_A_TERMINAL_INTERVAL_S),
            dynamic_ncols=False,
            ncols=100,
            ascii=True,
        )
    return tqdm(file=sys.stderr, **kwargs)
