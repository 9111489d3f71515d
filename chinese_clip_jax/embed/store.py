"""The output directory of ``ccj-embed``: a manifest, sharded ``.npy`` embeddings, id tables.

For a run of kind ``images`` (or ``texts``) in ``OUT``:

  OUT/images.json            the manifest: the plan (format, kind, input, model, num_records,
                             shard_size, num_shards, dim, dtype, image_size, crop,
                             context_length), written before any work; once every shard is
                             written also ``complete: true``, ``rows`` and ``bad`` (counts)
  OUT/images-00000.npy       shard 0: (rows, dim) float16 or float32, L2-normalized embeddings
                             of the good records of [0, shard_size), in record order
  OUT/images-00000.json      shard 0's table: {"shard", "start", "stop", "rows", "ids": [id of
                             each row], "bad": [{"id", "why"}]}; written after its .npy, so its
                             presence marks the shard as done
  OUT/images-ids.jsonl       when complete: the id of every row of every shard, in row order
                             (one JSON value per line)
  OUT/images-bad.jsonl       when complete: {"id", "why"} of every record skipped
  OUT/images.faiss           with --index: the faiss index over the rows (``index.py``)

Every file is written to a temporary name and renamed, so a killed run leaves whole files and
``*.tmp*`` leftovers only; a rerun keeps the finished shards and redoes the others. Nothing in
the files depends on the time, the host or the number of devices: a killed and resumed run
gives the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np
from etils import epath

from ..io import as_path

__all__ = ["Store", "PLAN_KEYS", "FORMAT", "EmbedError", "load_embeddings", "Embeddings"]

FORMAT = "ccj-embed/1"
PLAN_KEYS = (
    "format",
    "kind",
    "input",
    "model",
    "num_records",
    "shard_size",
    "num_shards",
    "dim",
    "dtype",
    "image_size",
    "crop",
    "context_length",
)
KINDS = ("images", "texts")


class EmbedError(ValueError):
    """A run cannot start or resume as asked; the message names the file and the key."""


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")


class Store:
    """One kind's files under ``out`` (see the module docstring)."""

    def __init__(self, out, kind: str):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.root = as_path(out, what="--out")
        self.kind = kind
        self.manifest_path = self.root / f"{kind}.json"

    def path(self, suffix: str) -> epath.Path:
        return self.root / f"{self.kind}{suffix}"

    def shard_path(self, k: int, ext: str) -> epath.Path:
        return self.root / f"{self.kind}-{k:05d}.{ext}"

    def write_atomic(self, path: epath.Path, data: bytes) -> None:
        """``data`` -> ``path`` through a temporary name (never a half-written file)."""
        tmp = path.parent / f"{path.name}.tmp{os.getpid()}"
        with tmp.open("wb") as f:
            f.write(data)
        tmp.replace(path)

    def read_manifest(self) -> dict | None:
        if not self.manifest_path.exists():
            return None
        try:
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise EmbedError(f"{self.manifest_path}: not a ccj-embed manifest ({e})") from e

    def start(self, plan: dict) -> None:
        """Writes the plan, or checks it against the one already there (a resumed run):
        any difference is an ``EmbedError`` naming the key, before any work."""
        existing = self.read_manifest()
        if existing is not None:
            for key in PLAN_KEYS:
                if existing.get(key) != plan.get(key):
                    raise EmbedError(
                        f"{self.manifest_path} was written for {key}={existing.get(key)!r}, this run has "
                        f"{key}={plan.get(key)!r}: use another --out, or the same arguments to resume"
                    )
            return
        self.root.mkdir(parents=True, exist_ok=True)
        stray = [p for p in self.root.iterdir() if p.name.startswith(f"{self.kind}-") and ".tmp" not in p.name]
        if stray:
            raise EmbedError(f"{self.root} holds {stray[0].name} but no {self.manifest_path.name}: use an empty --out")
        self.write_atomic(self.manifest_path, _dumps({k: plan[k] for k in PLAN_KEYS}))

    def is_done(self, k: int) -> bool:
        return self.shard_path(k, "json").exists() and self.shard_path(k, "npy").exists()

    def write_shard(self, k: int, embeddings: np.ndarray, table: dict) -> None:
        """The shard's .npy, then its table (whose presence marks it done)."""
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(embeddings), allow_pickle=False)
        self.write_atomic(self.shard_path(k, "npy"), buf.getvalue())
        self.write_atomic(self.shard_path(k, "json"), _dumps(dict(table, shard=k, rows=len(embeddings))))

    def read_table(self, k: int) -> dict:
        return json.loads(self.shard_path(k, "json").read_text(encoding="utf-8"))

    def read_shard(self, k: int) -> np.ndarray:
        with self.shard_path(k, "npy").open("rb") as f:
            return np.load(io.BytesIO(f.read()), allow_pickle=False)

    def finish(self, plan: dict) -> dict:
        """All shards written (by any host): the id and bad tables, then the manifest marked
        complete. Returns the manifest."""
        missing = [k for k in range(plan["num_shards"]) if not self.is_done(k)]
        if missing:
            raise EmbedError(f"{self.root}: shards {missing[:5]} of {self.kind} are not written yet")
        ids, bad = io.BytesIO(), io.BytesIO()
        rows = n_bad = 0
        for k in range(plan["num_shards"]):
            table = self.read_table(k)
            for i in table["ids"]:
                ids.write((json.dumps(i, ensure_ascii=False) + "\n").encode("utf-8"))
            for b in table["bad"]:
                bad.write(_dumps(b))
            rows, n_bad = rows + table["rows"], n_bad + len(table["bad"])
        self.write_atomic(self.path("-ids.jsonl"), ids.getvalue())
        self.write_atomic(self.path("-bad.jsonl"), bad.getvalue())
        manifest = dict({k: plan[k] for k in PLAN_KEYS}, complete=True, rows=rows, bad=n_bad)
        self.write_atomic(self.manifest_path, _dumps(manifest))
        for p in self.root.iterdir():  # what killed runs left half-written (every host is done)
            if p.name.startswith(self.kind) and ".tmp" in p.name:
                p.unlink()
        return manifest


class Embeddings:
    """A finished run's rows: ``ids`` (list, row order), ``vectors`` float32 (rows, dim)."""

    def __init__(self, ids: list, vectors: np.ndarray, manifest: dict):
        self.ids, self.vectors, self.manifest = ids, vectors, manifest

    def __len__(self) -> int:
        return len(self.ids)


def load_embeddings(out, kind: str = "images", *, dtype=np.float32) -> Embeddings:
    """Reads every shard of a complete run in ``out`` (all rows in memory, as ``dtype``)."""
    store = Store(out, kind)
    manifest = store.read_manifest()
    if manifest is None:
        raise EmbedError(f"{store.manifest_path}: no such file (no {kind} run in {store.root})")
    if not manifest.get("complete"):
        raise EmbedError(f"{store.manifest_path}: the run is not complete; rerun ccj-embed with the same arguments")
    lines = store.path("-ids.jsonl").read_text(encoding="utf-8").splitlines()
    ids = [json.loads(line) for line in lines]
    parts = [store.read_shard(k).astype(dtype, copy=False) for k in range(manifest["num_shards"])]
    vectors = np.concatenate(parts) if parts else np.zeros((0, manifest["dim"]), dtype)
    if len(vectors) != len(ids):
        raise EmbedError(f"{store.root}: {len(vectors)} embedding rows but {len(ids)} ids")
    return Embeddings(ids, vectors, manifest)
