"""Data-set specs: the one grammar every command and API that reads data takes, parsed here only.

    KIND:LOCATION[@SPLIT]

    folder:PATH             an image folder: one sub-folder per class (classification), or any
                            images below PATH (an image corpus)
    list:FILE               a text file of image paths, one per line (relative to FILE's folder)
    files:TABLE             a .csv / .tsv / .jsonl table of image paths and captions (``data.files``)
    cn_clip:ROOT[@SPLIT]    cn_clip's layout under ROOT: ``{split}_imgs.tsv`` + ``{split}_texts.jsonl``
                            or its LMDB build (``lmdb/{split}/{imgs,pairs}``)
    tfds:NAME[@SPLIT]       a prepared TFDS dataset by name (under ``~/tensorflow_datasets`` or
                            the command's TFDS data directory)
    tfds-dir:PATH[@SPLIT]   a TFDS dataset directory (``dataset_info.json``; ``data.build`` writes one)
    webdataset:SHARDS       tar shards as img2dataset writes them (commas, braces, globs)
    demo:[@SPLIT]           the embedded demo set

Short forms (what users already type): a path ending in ``.csv``, ``.tsv`` or ``.jsonl`` is
``files:``, one ending in ``.txt`` is ``list:``, and a bare directory is read by what it holds:
cn_clip's layout (``*_imgs.tsv``, ``*_texts.jsonl``, ``lmdb/`` or ``SPLIT/pairs``) is ``cn_clip:``, a TFDS
directory (``dataset_info.json`` in it, or one or two levels down) is ``tfds-dir:``, anything
else ``folder:``. A spec without ``@SPLIT`` takes the split the command defaults to (its
``--split``: ``valid`` for retrieval, ``test`` for zero-shot, ``train`` for embedding and
training). LOCATION may be ``gs://...`` wherever epath serves the scheme.

``parse(text)`` checks the grammar only (no file is opened; one-line ``SpecError`` naming the
spec); ``resolve(text)`` also expands a short form, which may look at the directory.
What a kind offers (training pairs, a retrieval split, a classification set, an image corpus)
is the registry's ``offers(kind)``.
"""

from __future__ import annotations

import dataclasses

from ..io import as_path

__all__ = ["KINDS", "Spec", "SpecError", "parse", "resolve", "TABLE_SUFFIXES"]

KINDS = ("folder", "list", "files", "cn_clip", "tfds", "tfds-dir", "webdataset", "demo")
SPLIT_KINDS = ("cn_clip", "tfds", "tfds-dir", "demo")  # kinds with named splits (``@SPLIT``)
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl")


class SpecError(ValueError):
    """A data-set spec that does not parse or names nothing readable; one line naming the spec."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """A parsed spec: ``kind`` (one of ``KINDS``), ``location`` (a path, a TFDS name, shards; "" for
    demo), ``split`` (None: the command's default), ``text`` (the spec as given)."""

    kind: str
    location: str
    split: str | None = None
    text: str = ""

    def with_split(self, default: str | None) -> Spec:
        """This spec with ``split`` filled from ``default`` where it has none."""
        return self if self.split is not None or default is None else dataclasses.replace(self, split=default)

    def __str__(self) -> str:
        return f"{self.kind}:{self.location}" + (f"@{self.split}" if self.split is not None else "")


def parse(text, *, what: str = "data spec") -> Spec:
    """``KIND:LOCATION[@SPLIT]`` -> Spec, grammar only: a text with no known ``KIND:`` is a short
    form (``Spec(kind="", location=text)``; ``resolve`` decides it). One-line SpecError otherwise."""
    raw = str(text)
    if not raw.strip():
        raise SpecError(f"{what}: empty spec (expected KIND:LOCATION[@SPLIT], KIND one of {', '.join(KINDS)})")
    kind, sep, rest = raw.partition(":")
    if not sep or kind not in KINDS or rest.startswith("//"):  # a bare path, also gs://...
        if sep and not rest.startswith("//") and len(kind) > 1 and kind.replace("-", "_").isidentifier():
            raise SpecError(f"{what} {raw!r}: unknown kind {kind!r} (kinds: {', '.join(KINDS)})")
        return Spec("", raw, None, raw)
    location, split = rest, None
    if kind in SPLIT_KINDS and "@" in rest:
        location, _, split = rest.rpartition("@")
        if not split.strip() or "/" in split:
            raise SpecError(f"{what} {raw!r}: empty or bad split after '@' (expected {kind}:LOCATION@SPLIT)")
    if kind == "demo":
        if location.strip():
            raise SpecError(f"{what} {raw!r}: demo takes no location (demo: or demo:@SPLIT)")
        return Spec(kind, "", split, raw)
    if not location.strip():
        raise SpecError(f"{what} {raw!r}: empty location (expected {kind}:LOCATION)")
    if kind == "files" and not location.lower().endswith(TABLE_SUFFIXES):
        raise SpecError(f"{what} {raw!r}: a files table must end in {', '.join(TABLE_SUFFIXES)}")
    return Spec(kind, location, split, raw)


def resolve(text, *, what: str = "data spec", default_split: str | None = None) -> Spec:
    """``parse`` and expand a short form (module docstring); ``default_split`` fills a missing
    ``@SPLIT`` of a kind with splits."""
    spec = parse(text, what=what)
    if not spec.kind:
        spec = _short_form(spec, what)
    return spec.with_split(default_split) if spec.kind in SPLIT_KINDS else spec


def _short_form(spec: Spec, what: str) -> Spec:
    location = spec.location
    lower = location.lower()
    if lower.endswith(TABLE_SUFFIXES):
        return Spec("files", location, None, spec.text)
    if lower.endswith(".txt"):
        return Spec("list", location, None, spec.text)
    path = as_path(location, what=what)
    if not path.is_dir():
        raise SpecError(
            f"{what} {location!r}: no such directory, and not KIND:LOCATION (kinds: {', '.join(KINDS)}; "
            f"a table ends in {', '.join(TABLE_SUFFIXES)}, an image list in .txt)"
        )
    names = [p.name for p in path.iterdir()]
    # ROOT may be cn_clip's lmdb/ folder itself (a few split folders; an image folder is not probed)
    lmdb_splits = len(names) <= 16 and any((path / n / "pairs").exists() for n in names)
    if any(n.endswith(("_imgs.tsv", "_texts.jsonl")) for n in names) or "lmdb" in names or lmdb_splits:
        return Spec("cn_clip", location, None, spec.text)
    if "dataset_info.json" in names or _tfds_below(path):
        return Spec("tfds-dir", location, None, spec.text)
    return Spec("folder", location, None, spec.text)


def _tfds_below(path) -> bool:
    """A TFDS directory one or two levels below ``path`` (``NAME/VERSION/dataset_info.json``)."""
    for child in (c for c in path.iterdir() if c.is_dir()):
        if (child / "dataset_info.json").exists():
            return True
        if any((g / "dataset_info.json").exists() for g in child.iterdir() if g.is_dir()):
            return True
    return False
