"""Data sources behind one small protocol: ``data.name`` -> a :class:`Source`.

A source is one module of this package that ends with ``SOURCE = Source(...)``: its config
defaults (``data.<name>.*``), how to open its training records and its eval sets, and
optionally how ``python -m chinese_clip_jax.data.build`` reads it. Adding a source is that
module plus its name in :func:`sources` (one line); ``data.train_iterator``, ``data.eval_sets``,
``data.check_config``, ``default_data_config`` and ``data.build --format`` all read the registry.

Training records are what ``pipeline.build_train_iterator`` takes: a random-access sequence of
``{"image", "text", "where"}`` (or ``{"error", "where"}``), optionally with ``skipped_at_index``
and ``is_process_shard`` attributes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

__all__ = ["Source", "sources", "get", "names", "build_formats"]


@dataclasses.dataclass(frozen=True)
class Source:
    """One data source.

    name: ``data.name`` (and ``data.build --format``) value.
    defaults: the ``data.<name>.*`` keys and their defaults.
    open_train: ``(c, *, image_size, shard) -> records`` for ``c = data.<name>``; ``shard`` is this
        process's grain ShardOptions (a source may index only its own part: ``is_process_shard``).
    eval_sets: ``(c, *, image_size, context_length) -> {set name: set}`` ({} when none configured).
    path_keys: keys of ``c`` holding user paths (comma-separated where the key ends in "shards"),
        scheme-checked before any work.
    check: ``(c) -> None``: the source's own cheap checks before any work (one-line errors).
    build_records: ``(src, split, skipped, options) -> iterator of records`` with ``image_id`` and
        ``text_id``, for ``data.build``; ``skipped`` is a one-item list counting index-time drops.
    build_check: ``(src, split, options) -> options``: checks SRC before anything is written.
    build_options: the ``data.build`` options this source reads (option name -> help).
    """

    name: str
    defaults: Mapping[str, Any]
    open_train: Callable[..., Any]
    eval_sets: Callable[..., dict]
    path_keys: tuple[str, ...] = ()
    check: Callable[[Any], None] | None = None
    build_records: Callable[..., Iterator[dict]] | None = None
    build_check: Callable[..., dict] | None = None
    build_options: Mapping[str, str] = dataclasses.field(default_factory=dict)


_REGISTRY: dict[str, Source] | None = None


def sources() -> dict[str, Source]:
    """name -> Source, in listing order (the modules are imported on the first call)."""
    global _REGISTRY
    if _REGISTRY is None:
        from . import cn_clip, demo, files, tfds_source, webdataset

        _REGISTRY = {m.SOURCE.name: m.SOURCE for m in (demo, cn_clip, webdataset, tfds_source, files)}  # the registry
    return _REGISTRY


def names() -> tuple[str, ...]:
    return tuple(sources())


def get(name: str, *, what: str = "data.name") -> Source:
    """The source called ``name``; a one-line ValueError listing the known ones otherwise."""
    found = sources()
    if name not in found:
        raise ValueError(f"{what} must be one of {tuple(found)}, got {name!r}")
    return found[name]


def build_formats() -> tuple[str, ...]:
    """Sources ``data.build --format`` can read."""
    return tuple(n for n, s in sources().items() if s.build_records is not None)
