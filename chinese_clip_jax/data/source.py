"""The data-source protocol: what one source module declares: ``SOURCE = Source(...)`` (training
pairs and the trainer's own eval sets, by ``data.name``) and ``OFFERS = (Offers(...), ...)``
(what each spec kind it reads offers: ``data.spec``'s grammar).

``registry`` lists both; each source module (``demo``, ``cn_clip``, ``webdataset``,
``tfds_source``, ``files``, ``folder``) imports only this and its own readers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

__all__ = ["Source", "Offers"]


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


@dataclasses.dataclass(frozen=True)
class Offers:
    """What one spec kind (``spec.KINDS``) offers; each reader takes the resolved ``spec.Spec``
    (its split filled) and returns a ``sets`` type, raising a one-line ``sets.DatasetError``.

    retrieval: ``(spec, *, encoding) -> RetrievalSet`` (images, captions, positives).
    classification: ``(spec, *, data_dir) -> ClassificationSet``.
    images: ``(spec, *, encoding) -> ImageCorpus`` (records to embed, in a fixed order).
    training: ``(spec) -> (data.name, {data.<name> key: value})``: the spec as ``ccj-train``'s
        ``data.spec`` (training pairs) or ``data.eval_spec``.
    """

    kind: str
    retrieval: Callable[..., Any] | None = None
    classification: Callable[..., Any] | None = None
    images: Callable[..., Any] | None = None
    training: Callable[..., tuple[str, dict]] | None = None
