"""Data sources behind one small protocol: ``data.name`` -> a :class:`Source`.

A source is one module of this package that ends with ``SOURCE = Source(...)``
(``data.source.Source``, the protocol): its config
defaults (``data.<name>.*``), how to open its training records, the spec its eval keys name
(``source.EvalSplit``, opened by ``readers`` as every command opens a spec), and
optionally how ``python -m chinese_clip_jax.data.build`` reads it. Adding a source is that
module plus its name in :func:`sources` (one line); ``data.train_iterator``, ``data.eval_sets``,
``data.check_config``, ``default_data_config`` and ``data.build --format`` all read the registry.

Spec kinds (``spec.KINDS``) map to what they offer (``offers(kind)``, a ``source.Offers``: a
retrieval split, a classification set, an image corpus, training pairs), declared by the same
modules as ``OFFERS`` (``folder`` for ``folder:`` and ``list:``, ``cn_clip_sets``, ``tfds_sets``,
``files``, ``webdataset``, ``demo``); ``readers`` opens a spec through it.

Training records are what ``pipeline.build_train_iterator`` takes: a random-access sequence of
``{"image", "text", "where"}`` (or ``{"error", "where"}``), optionally with ``skipped_at_index``
and ``is_process_shard`` attributes.
"""

from __future__ import annotations

from .source import Offers, Source

__all__ = ["sources", "get", "names", "build_formats", "offers"]


_REGISTRY: dict[str, Source] | None = None
_OFFERS: dict[str, Offers] | None = None


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


def offers(kind: str) -> Offers:
    """What spec kind ``kind`` offers (``source.Offers``), from the modules that read it."""
    global _OFFERS
    if _OFFERS is None:
        from . import cn_clip_sets, demo, files, folder, tfds_sets, webdataset

        modules = (folder, files, cn_clip_sets, tfds_sets, webdataset, demo)
        _OFFERS = {o.kind: o for m in modules for o in m.OFFERS}  # the spec kinds
    return _OFFERS.get(kind) or Offers(kind)
