"""A nearest-neighbour index over a finished ``ccj-embed`` run, with faiss (the ``index`` extra).

    build_index("out", "images")                     # OUT/images.faiss over every row
    index = EmbeddingIndex.open("out", "images")
    hits = index.search(query_vectors, k=5)          # [[(id, cosine similarity), ...], ...]
    hits = query("out", texts=["一只猫"], k=5)        # embeds the queries with the run's model

Rows are L2-normalized, so inner product is cosine similarity. ``kind="flat"`` is faiss's exact
``IndexFlatIP``; ``"hnsw"`` its graph index ``IndexHNSWFlat`` (approximate; for tens of millions
of rows). The index file holds faiss's serialization; row i is ``images-ids.jsonl`` line i.
Beside it, ``images.faiss.json`` records the index file's size and checksum and the checksum of
the run's file list it was built from: an index whose file is damaged, or that was built before
the run's shards changed (a rebuilt shard), is refused at open with a line that says how to
rebuild it. A run with no rows has no index (``ccj-embed`` stops before: nothing to search).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence

import numpy as np

from .store import EmbedError, Store, _dumps, load_embeddings, mismatch

__all__ = ["build_index", "EmbeddingIndex", "query", "exact_search", "INDEX_KINDS"]

INDEX_KINDS = ("flat", "hnsw")
HNSW_LINKS = 32  # faiss's M: graph links per node
logger = logging.getLogger(__name__)
REBUILD = "rebuild it with ccj-embed ... --index (the same arguments) or embed.build_index(OUT)"


def _rows_fingerprint(manifest: dict) -> str:
    """The checksum of a complete run's file list (every shard, table and id file)."""
    return hashlib.blake2b(_dumps(manifest.get("files", {})), digest_size=16).hexdigest()


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise ImportError("the index needs faiss: pip install 'chinese-clip-jax[index]' (faiss-cpu)") from e
    return faiss


def build_index(out, kind: str = "images", *, index_kind: str = "flat") -> str:
    """Builds ``OUT/{kind}.faiss`` from a complete run, shard by shard; returns its path."""
    if index_kind not in INDEX_KINDS:
        raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {index_kind!r}")
    faiss = _faiss()
    store = Store(out, kind)
    manifest = store.read_manifest()
    if manifest is None or not manifest.get("complete"):
        raise EmbedError(f"{store.manifest_path}: no complete {kind} run to index")
    if not manifest.get("rows"):
        raise EmbedError(f"{store.manifest_path}: the run has no rows: nothing to index")
    dim = manifest["dim"]
    if index_kind == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        index = faiss.IndexHNSWFlat(dim, HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
    for k in range(manifest["num_shards"]):
        rows = store.read_shard(k, manifest)
        if len(rows):
            index.add(np.ascontiguousarray(rows, np.float32))
    if index.ntotal != manifest["rows"]:
        raise EmbedError(f"{store.root}: indexed {index.ntotal} rows, the manifest says {manifest['rows']}")
    path = store.path(".faiss")
    record = store.write_atomic(path, faiss.serialize_index(index).tobytes())
    meta = {"index": record, "index_kind": index_kind, "rows": manifest["rows"]}
    meta["built_from"] = _rows_fingerprint(manifest)
    store.write_atomic(store.path(".faiss.json"), _dumps(meta))  # last: an index without it is refused
    return str(path)


class EmbeddingIndex:
    """A loaded index and the ids of its rows."""

    def __init__(self, index, ids: list, manifest: dict):
        self.index, self.ids, self.manifest = index, ids, manifest

    @classmethod
    def open(cls, out, kind: str = "images") -> EmbeddingIndex:
        faiss = _faiss()
        store = Store(out, kind)
        path, meta_path = store.path(".faiss"), store.path(".faiss.json")
        if not path.exists():
            raise EmbedError(f"{path}: no such index (build it with ccj-embed ... --index)")
        manifest = store.complete_manifest()
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            record, built_from = meta["index"], meta["built_from"]
        except (FileNotFoundError, ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise EmbedError(
                f"{path}: its record {meta_path.name} is missing or unreadable ({type(e).__name__}: {e}): the "
                f"index was interrupted or written by an older version; {REBUILD}"
            ) from None
        if built_from != _rows_fingerprint(manifest):
            raise EmbedError(
                f"{path} was built from other embeddings than {store.manifest_path.name} lists now (shards "
                f"rebuilt or rewritten since); {REBUILD}"
            )
        data = path.read_bytes()
        why = mismatch(path.name, data, record)
        if why:
            raise EmbedError(f"{store.root}: {why} in {meta_path.name}: the index is damaged; {REBUILD}")
        index = faiss.deserialize_index(np.frombuffer(data, np.uint8))
        ids = store.read_ids(manifest)
        if index.ntotal != len(ids):
            raise EmbedError(f"{path}: {index.ntotal} rows but {len(ids)} ids in {store.path('-ids.jsonl').name}")
        return cls(index, ids, manifest)

    def search(self, vectors, k: int = 10) -> list[list[tuple]]:
        """(q, dim) L2-normalized queries -> per query the top ``k`` (id, cosine similarity), best first."""
        vectors = np.ascontiguousarray(np.atleast_2d(np.asarray(vectors, np.float32)))
        if vectors.shape[1] != self.index.d:
            raise ValueError(f"queries have dimension {vectors.shape[1]}, the index {self.index.d}")
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self.index.ntotal == 0:
            logger.warning("the index holds no rows: every query has no hits")
            return [[] for _ in vectors]
        scores, rows = self.index.search(vectors, min(int(k), self.index.ntotal))
        return [[(self.ids[r], float(s)) for r, s in zip(row, score) if r >= 0] for row, score in zip(rows, scores)]


def query(
    out,
    *,
    texts: Sequence[str] | None = None,
    images: Sequence | None = None,
    kind: str = "images",
    k: int = 10,
    model=None,
) -> list[list[tuple]]:
    """Top-``k`` ids of the ``kind`` run in ``out`` for each text and image query (texts first).

    model: a ``ChineseCLIP``, or anything ``ChineseCLIP.from_pretrained`` reads; default the run's
    own model (the manifest's ``model``). Images: paths, PIL images or uint8 arrays, resized as
    the run's images were (its ``crop``)."""
    from ..inference import ChineseCLIP

    index = EmbeddingIndex.open(out, kind)
    if not texts and not images:
        raise ValueError("query needs at least one text or image")
    if model is None or isinstance(model, str):
        src = model or index.manifest.get("model")
        resize = "squash" if index.manifest.get("crop") == "squash" else "processor"
        model = ChineseCLIP.from_pretrained(src, resize_mode=resize)
    vectors = []
    if texts:
        vectors.append(model.encode_text(list(texts)))
    if images:
        vectors.append(model.encode_image(list(images)))
    return index.search(np.concatenate(vectors), k)


def exact_search(out, vectors, kind: str = "images", k: int = 10) -> list[list[tuple]]:
    """The same search by brute force over the stored rows (numpy; no faiss needed)."""
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    emb = load_embeddings(out, kind)
    scores = np.atleast_2d(np.asarray(vectors, np.float32)) @ emb.vectors.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[(emb.ids[r], float(s[r])) for r in row] for row, s in zip(top, scores)]
