"""The data-source protocol: what one source module declares: ``SOURCE = Source(...)`` (training
pairs and the trainer's eval split, by ``data.name``) and ``OFFERS = (Offers(...), ...)``
(what each spec kind it reads offers: ``data.spec``'s grammar).

``registry`` lists both; each source module (``demo``, ``cn_clip``, ``webdataset``,
``tfds_source``, ``files``, ``folder``) imports only this and its own readers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .spec import Spec

__all__ = ["Source", "Offers", "EvalSplit"]


@dataclasses.dataclass(frozen=True)
class EvalSplit:
    """The trainer's retrieval eval split as a source's own keys name it: the spec that
    ``readers.open_retrieval`` opens (so ``ccj-eval retrieval`` and ``ccj-embed`` read the same
    records in the same order), plus what the spec cannot spell.

    spec: the spec (kind, location, split; ``text`` as messages show it).
    what: the key that named it (``data.cn_clip.eval_split``), for messages.
    max_texts: the source's cap key (``eval_max_texts`` / ``eval_max_samples``): at most this many
        captions, ``sets.retrieval_eval_set``; <= 0: the whole split.
    encoding: of the split's caption files.
    options: reader options the grammar has no spelling for (cn_clip ``layout``, a table's
        ``image_key`` / ``caption_key``, TFDS ``data_dir``, webdataset ``caption_keys``).
    """

    spec: Spec
    what: str
    max_texts: int = 0
    encoding: str = "utf-8"
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Source:
    """One data source.

    name: ``data.name`` (and ``data.build --format``) value.
    defaults: the ``data.<name>.*`` keys and their defaults.
    open_train: ``(c, *, image_size, shard) -> records`` for ``c = data.<name>``; ``shard`` is this
        process's grain ShardOptions (a source may index only its own part: ``is_process_shard``).
    eval_split: ``(c) -> EvalSplit | None``: the retrieval split the source's eval keys name (None
        when none is configured); ``data.eval_sets`` opens it through ``readers.open_retrieval``.
    eval_sets: ``(c, *, image_size, context_length) -> {set name: set}``: eval sets of a source's
        own (the demo's zero-shot sets), beside or instead of ``eval_split``.
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
    eval_sets: Callable[..., dict] | None = None
    eval_split: Callable[[Any], EvalSplit | None] | None = None
    path_keys: tuple[str, ...] = ()
    check: Callable[[Any], None] | None = None
    build_records: Callable[..., Iterator[dict]] | None = None
    build_check: Callable[..., dict] | None = None
    build_options: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Offers:
    """What one spec kind (``spec.KINDS``) offers; each reader takes the resolved ``spec.Spec``
    (its split filled) and returns a ``sets`` type, raising a one-line ``sets.DatasetError``.

    retrieval: ``(spec, *, encoding, **options) -> RetrievalSet`` (images, captions, positives;
        ``options``: those of ``EvalSplit``, each with a default).
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
