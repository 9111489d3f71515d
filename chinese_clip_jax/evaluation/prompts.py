"""Label sets and prompt templates for zero-shot classification: text files and cn_clip's sets.

``read_labels(spec)`` / ``read_templates(spec)`` take a text file (one entry per line; blank lines
skipped) or ``cn_clip:NAME``, a set that the installed ``cn_clip`` package ships (read from it
at run time, nothing copied here): labels ``cn_clip:imagenet``; templates ``cn_clip:imagenet``
and every ``*_templates`` list of ``cn_clip/eval/cvinw_zeroshot_templates.py`` by its prefix.
Our own default templates are ``chinese_clip_jax.processing.templates.CHINESE_TEMPLATES``.
Files are read with ``encoding`` (default UTF-8; a UTF-8 BOM is dropped); a line that does not
decode is an error naming the file, the line and the encoding.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence

from ..data.text import TextDecodeError, decoded_lines
from ..processing.templates import CHINESE_TEMPLATES

__all__ = ["PromptError", "CN_CLIP_PREFIX", "read_labels", "read_templates", "cn_clip_sets", "read_lines"]

CN_CLIP_PREFIX = "cn_clip:"
DEFAULT_TEMPLATES_SOURCE = "chinese_clip_jax.processing.templates.CHINESE_TEMPLATES"


class PromptError(ValueError):
    """A label or template set cannot be used; the message names the file (and line)."""


def cn_clip_sets() -> tuple[dict[str, list[str]], dict[str, list]]:
    """(label sets, template sets) that the installed cn_clip package ships, read at run time."""
    try:
        cvinw = importlib.import_module("cn_clip.eval.cvinw_zeroshot_templates")
        imagenet = importlib.import_module("cn_clip.eval.imagenet_zeroshot_templates")
    except ImportError as e:
        raise PromptError(f"cn_clip sets need the cn_clip package (pip install --no-deps cn-clip): {e}") from e
    templates = {name[: -len("_templates")]: v for name, v in vars(cvinw).items() if name.endswith("_templates")}
    templates = {k: v for k, v in templates.items() if isinstance(v, list)}
    templates["imagenet"] = list(imagenet.openai_imagenet_template)
    return {"imagenet": list(imagenet.imagenet_classnames)}, templates


def read_lines(path: str | os.PathLike, flag: str, encoding: str = "utf-8") -> list[tuple[int, str]]:
    """(line number, stripped text) of the non-blank lines of a text file (decoded as every text
    file is: ``data.text``); errors name the file and the line."""
    if not os.path.isfile(path):
        raise PromptError(f"{flag} {path}: no such file (or give {CN_CLIP_PREFIX}NAME for a set cn_clip ships)")
    try:
        out = [(n, line.strip()) for n, line in decoded_lines(path, encoding=encoding, what=flag) if line.strip()]
    except TextDecodeError as e:
        raise PromptError(str(e)) from None
    if not out:
        raise PromptError(f"{flag} {path}: the file has no non-empty line")
    return out


def _cn_clip_set(spec: str, kind: str, sets: dict) -> list:
    name = spec[len(CN_CLIP_PREFIX) :]
    if name not in sets:
        raise PromptError(f"--{kind} {spec}: cn_clip has no {kind[:-1]} set {name!r} (has: {', '.join(sorted(sets))})")
    return list(sets[name])


def read_labels(spec: str | Sequence[str], encoding: str = "utf-8") -> tuple[list[str], str]:
    """Class names in class order -> (names, source): a file (one per line), ``cn_clip:NAME`` or a
    list. Duplicate names in a file or list are an error naming them and their lines (two classes
    with one text cannot be told apart); cn_clip's sets are used as shipped."""
    if not isinstance(spec, str):
        names, where, source = [str(s) for s in spec], list(range(1, len(spec) + 1)), "list"
    elif spec.startswith(CN_CLIP_PREFIX):
        names = _cn_clip_set(spec, "labels", cn_clip_sets()[0])
        where, source = list(range(1, len(names) + 1)), spec
    else:
        lines = read_lines(spec, "--labels", encoding)
        names, where, source = [s for _, s in lines], [n for n, _ in lines], os.path.abspath(spec)
    if not names:
        raise PromptError(f"--labels {source}: no class names")
    if source.startswith(CN_CLIP_PREFIX):  # cn_clip's own sets are the reference protocol, as shipped
        return names, source  # (its imagenet names 836 and 837 are both 太阳镜, as in its published runs)
    first: dict[str, int] = {}
    dups = []
    for name, n in zip(names, where):
        if name in first:
            dups.append(f"{name!r} (lines {first[name]} and {n})")
        else:
            first[name] = n
    if dups:
        shown = ", ".join(dups[:5]) + (f" and {len(dups) - 5} more" if len(dups) > 5 else "")
        raise PromptError(f"--labels {source}: duplicate class names {shown}")
    return names, source


def read_templates(spec: str | Sequence[str] | None, encoding: str = "utf-8") -> tuple[list[str], str]:
    """Prompt templates -> (templates, source): None (our CHINESE_TEMPLATES), a file (one per line,
    each with exactly one ``{}``), ``cn_clip:NAME`` or a list."""
    if spec is None:
        return list(CHINESE_TEMPLATES), DEFAULT_TEMPLATES_SOURCE
    if isinstance(spec, str) and spec.startswith(CN_CLIP_PREFIX):
        sets = _cn_clip_set(spec, "templates", cn_clip_sets()[1])
        return [t("{}") if callable(t) else str(t) for t in sets], spec
    if isinstance(spec, str):
        lines, source = read_lines(spec, "--templates", encoding), os.path.abspath(spec)
    else:
        lines, source = list(enumerate(map(str, spec), 1)), "list"
    out = []
    for n, line in lines:
        if line.count("{}") != 1:
            raise PromptError(f"--templates {source}:{n}: a template needs exactly one '{{}}', got {line!r}")
        out.append(line)
    if not out:
        raise PromptError("--templates: no templates")
    return out, source
