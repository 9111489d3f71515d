"""Training recipes: ``ml_collections`` config files (``get_config()``), shipped with the package.

``ccj-train --config recipe:NAME`` (or ``--config PATH/TO/FILE.py``) reads one; in a checkout
``train/configs/NAME.py`` is the same file. ``base`` holds every key with its default.
"""

from __future__ import annotations

import os

PREFIX = "recipe:"
_HERE = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
    """The recipes shipped with the package (``base`` included)."""
    return sorted(f[:-3] for f in os.listdir(_HERE) if f.endswith(".py") and not f.startswith("_"))


def resolve(spec: str) -> str:
    """``recipe:NAME`` (optionally ``recipe:NAME:ARG``, ml_collections' config argument) -> the
    recipe file's path (with ``:ARG``); any other spec is returned as it is (a file path)."""
    if not spec.startswith(PREFIX):
        return spec
    name, sep, arg = spec[len(PREFIX) :].partition(":")
    if name not in names():
        raise ValueError(f"unknown recipe {name!r}: the package ships {', '.join(names())}")
    return os.path.join(_HERE, f"{name}.py") + sep + arg
