"""Training recipes: ``ml_collections`` config files (``get_config()``), shipped with the package.

``ccj-train --config recipe:NAME`` (or ``--config PATH/TO/FILE.py``) reads one; in a checkout
``train/configs/NAME.py`` is the same file. ``base`` holds every key with its default: it is the
template the recipes start from, not a recipe to run (nor are helper modules without a
``get_config``, such as ``finetune_recipes``); ``names()`` lists the runnable ones.
"""

from __future__ import annotations

import os
import re

PREFIX = "recipe:"
TEMPLATES = ("base",)  # every key with its default: recipes start from it; never run as it is
_HERE = os.path.dirname(os.path.abspath(__file__))
_GET_CONFIG = re.compile(r"^def get_config\(", re.MULTILINE)


def _modules() -> list[str]:
    return sorted(f[:-3] for f in os.listdir(_HERE) if f.endswith(".py") and not f.startswith("_"))


def _defines_get_config(name: str) -> bool:
    with open(os.path.join(_HERE, f"{name}.py"), encoding="utf-8") as f:
        return bool(_GET_CONFIG.search(f.read()))


def names() -> list[str]:
    """The runnable recipes shipped with the package: modules with a ``get_config()``, ``base``
    (the template) left out."""
    return [n for n in _modules() if n not in TEMPLATES and _defines_get_config(n)]


def resolve(spec: str) -> str:
    """``recipe:NAME`` (optionally ``recipe:NAME:ARG``, ml_collections' config argument) -> the
    recipe file's path (with ``:ARG``); any other spec is returned as it is (a file path). The
    template and helper modules are refused, naming the runnable recipes."""
    if not spec.startswith(PREFIX):
        return spec
    name, sep, arg = spec[len(PREFIX) :].partition(":")
    runnable = ", ".join(names())
    if name in names():
        return os.path.join(_HERE, f"{name}.py") + sep + arg
    if name in TEMPLATES:
        raise ValueError(
            f"recipe:{name} is the template every recipe starts from (each key with its default), not a runnable "
            f"recipe: choose one of {runnable}, or a config file of your own that starts from it"
        )
    if name in _modules():
        raise ValueError(f"recipe:{name} is a helper module of the recipes (no get_config()): choose one of {runnable}")
    raise ValueError(f"unknown recipe {name!r}: the package ships {runnable}")
