"""The data-source protocol: what one source module declares (``SOURCE = Source(...)``).

``registry`` lists the sources; each source module (``demo``, ``cn_clip``, ``webdataset``,
``tfds_source``, ``files``) imports only this.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

__all__ = ["Source"]


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
