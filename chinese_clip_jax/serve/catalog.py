"""What ``ccj-serve`` searches: the finished runs of a ``ccj-embed`` output directory.

    catalog = Catalog("emb")                     # images.json and/or texts.json, complete
    catalog.runs["images"].search(vectors, k)    # [[(id, cosine similarity), ...], ...]
    catalog.changed()                            # None, or which file changed since loading

A run with a faiss index (``ccj-embed --index``) is searched through it, exactly as
``ccj-embed query`` searches; a run without one by brute force over its rows (numpy). The
files are fingerprinted when loaded (the manifest's bytes, the id table's and the index's size
and time); ``changed`` compares them again, so a service never answers from rows that no longer
match the files (see ``app``: such requests get 503 until the service is restarted).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..embed import EmbeddingIndex, EmbedError, load_embeddings
from ..embed.store import KINDS, Store
from ..io import as_path

__all__ = ["Catalog", "Run", "ServeError"]


class ServeError(ValueError):
    """A request or a start-up that cannot be served; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class _ExactIndex:
    """Brute-force inner product over a run's rows (for runs written without ``--index``)."""

    def __init__(self, vectors: np.ndarray):
        self.vectors = np.ascontiguousarray(vectors, np.float32)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = queries @ self.vectors.T
        if k < scores.shape[1]:  # the k best in any order, then sorted: O(n) per query, not O(n log n)
            rows = np.sort(np.argpartition(-scores, k - 1, axis=1)[:, :k], axis=1)
        else:
            rows = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
        order = np.argsort(-np.take_along_axis(scores, rows, axis=1), axis=1, kind="stable")  # ties: row order
        rows = np.take_along_axis(rows, order, axis=1)
        return np.take_along_axis(scores, rows, axis=1), rows


@dataclasses.dataclass
class Run:
    """One kind's rows: ``ids`` (row order), the index searched, and where they came from."""

    kind: str
    manifest: dict
    ids: list
    index_type: str  # the faiss class (IndexFlatIP, IndexHNSWFlat) or "exact"
    _search: object = dataclasses.field(repr=False)
    _row_of: dict = dataclasses.field(repr=False, default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def row(self, key: str) -> int | None:
        """The row of an id given as text (ids may be ints in the files), or None."""
        return self._row_of.get(key)

    def search(self, vectors: np.ndarray, k: int) -> list[list[tuple]]:
        """(q, dim) L2-normalized queries -> per query the top ``k`` (id, cosine similarity)."""
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), np.float32)
        scores, rows = self._search.search(vectors, min(k, len(self.ids)))
        return [[(self.ids[r], float(s)) for r, s in zip(row, sc) if r >= 0] for row, sc in zip(rows, scores)]


def _open_run(root, kind: str) -> Run:
    store = Store(root, kind)
    if store.path(".faiss").exists():
        index = EmbeddingIndex.open(root, kind)  # needs faiss; raises ImportError naming the extra
        ids, manifest, search, index_type = index.ids, index.manifest, index.index, type(index.index).__name__
    else:
        rows = load_embeddings(root, kind)
        ids, manifest, search, index_type = rows.ids, rows.manifest, _ExactIndex(rows.vectors), "exact"
    row_of: dict = {}
    for r, i in enumerate(ids):
        row_of.setdefault(str(i), r)
    return Run(kind, manifest, ids, index_type, search, row_of)


class Catalog:
    """Every complete run in ``root`` (an ``EmbedError`` when there is none)."""

    def __init__(self, root):
        self.root = as_path(root, what="--embeddings")
        if not self.root.is_dir():
            raise EmbedError(f"--embeddings {root}: no such directory")
        found = {}
        for kind in KINDS:
            manifest = Store(self.root, kind).read_manifest()
            if manifest is not None and not manifest.get("complete"):
                raise EmbedError(f"{self.root / (kind + '.json')}: the run is not complete; finish it with ccj-embed")
            if manifest is not None:
                found[kind] = manifest
        if not found:
            raise EmbedError(f"--embeddings {root}: no images.json or texts.json (not a ccj-embed --out directory)")
        self._fingerprint = self._fingerprints(found)
        self.runs = {kind: _open_run(self.root, kind) for kind in found}

    def _fingerprints(self, kinds) -> dict:
        out = {}
        for kind in kinds:
            store = Store(self.root, kind)
            out[store.manifest_path.name] = store.manifest_path.read_bytes() if store.manifest_path.exists() else None
            for p in (store.path("-ids.jsonl"), store.path(".faiss")):
                if p.exists():
                    st = p.stat()
                    out[p.name] = (st.length, st.mtime)
                else:
                    out[p.name] = None
        return out

    def changed(self) -> str | None:
        """The first file of a loaded run that changed (or vanished) since loading, or None."""
        try:
            now = self._fingerprints(self.runs)
        except OSError as e:  # a file replaced while we read it
            return f"{e}"
        for name, before in self._fingerprint.items():
            if now.get(name) != before:
                return name
        return None

    def drop(self, kind: str) -> None:
        """Stops serving a run (e.g. embedded with another model); its files are no longer watched."""
        self.runs.pop(kind, None)
        self._fingerprint = {n: v for n, v in self._fingerprint.items() if not n.startswith(kind)}
