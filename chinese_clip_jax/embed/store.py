"""The output directory of ``ccj-embed``: a manifest, sharded ``.npy`` embeddings, id tables.

For a run of kind ``images`` (or ``texts``) in ``OUT``:

  OUT/images.json            the manifest: the plan (format, kind, input, model, num_records,
                             shard_size, num_shards, dim, dtype, image_size, crop,
                             context_length), written before any work; once every shard is
                             written also ``complete: true``, ``rows``, ``bad`` (counts) and
                             ``files``: {name: {"bytes", "blake2b"}} of every file below
  OUT/images-00000.npy       shard 0: (rows, dim) float16 or float32, L2-normalized embeddings
                             of the good records of [0, shard_size), in record order
  OUT/images-00000.json      shard 0's table: {"shard", "start", "stop", "rows", "ids": [id of
                             each row], "bad": [{"id", "why"}], "npy": {"bytes", "blake2b"} of
                             its .npy}; written after its .npy, so a table whose .npy matches
                             its size and checksum marks the shard as done
  OUT/images-ids.jsonl       when complete: the id of every row of every shard, in row order
                             (one JSON value per line)
  OUT/images-bad.jsonl       when complete: {"id", "why"} of every record skipped
  OUT/images.faiss           with --index: the faiss index over the rows (``index.py``), and
  OUT/images.faiss.json      its record: the index file's size and checksum, and the checksum
                             of the manifest's ``files`` it was built from

Every file is written to a temporary name and renamed (``io.atomic_write``), so a killed run
leaves whole files and ``*.tmp*`` leftovers only. Nothing is trusted for being there: a rerun
checks each shard's ``.npy`` against the size and checksum its table recorded, keeps the whole
ones and rebuilds the others, saying so ("shard 3: images-00003.npy is 80 bytes, its table
records 4224: rebuilt"); ``load_embeddings`` and the index check every file against the
manifest and name the one that does not match. Nothing in the files depends on the time, the
host or the number of devices: a killed and resumed run gives the same bytes as an
uninterrupted one.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import numpy as np
from etils import epath

from ..io import as_path, atomic_write

__all__ = ["Store", "PLAN_KEYS", "FORMAT", "EmbedError", "load_embeddings", "Embeddings", "file_record"]

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


def file_record(data: bytes) -> dict:
    """{"bytes", "blake2b"} of a file's content: what the manifest and the tables record."""
    return {"bytes": len(data), "blake2b": hashlib.blake2b(data, digest_size=16).hexdigest()}


def mismatch(name: str, data: bytes, record: dict) -> str | None:
    """Why ``data`` (the content of ``name``) is not the file ``record`` describes; None when it is."""
    if len(data) != record.get("bytes"):
        return f"{name} is {len(data)} bytes, {record.get('bytes')} recorded"
    if file_record(data)["blake2b"] != record.get("blake2b"):
        return f"{name}: checksum mismatch (blake2b {file_record(data)['blake2b']}, {record.get('blake2b')} recorded)"
    return None


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

    def write_atomic(self, path: epath.Path, data: bytes) -> dict:
        """``data`` -> ``path`` through a temporary name (never a half-written file); returns
        its ``file_record``."""
        atomic_write(path, data, clean_stale=False)  # ``finish`` clears the leftovers of the whole run
        return file_record(data)

    def check_root(self) -> None:
        """``out`` must be a directory or not exist yet (a file there is a one-line error)."""
        if self.root.exists() and not self.root.is_dir():
            raise EmbedError(f"--out {self.root}: is a file, not a directory; give a new or empty directory")

    def read_manifest(self) -> dict | None:
        """The manifest, None when there is none; one of another tool or version is an
        ``EmbedError`` that says so."""
        self.check_root()
        if not self.manifest_path.exists():
            return None
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise EmbedError(f"{self.manifest_path}: not a ccj-embed manifest ({type(e).__name__}: {e})") from e
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        if fmt != FORMAT:
            found = f"format {fmt!r}" if fmt else f'no "format": "{FORMAT}"'
            raise EmbedError(
                f"{self.manifest_path}: not a ccj-embed manifest ({found}); it belongs to another tool or "
                "version: use another --out"
            )
        return manifest

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

    def reopen(self, plan: dict) -> None:
        """A complete run whose shards must be rebuilt: the manifest goes back to the plan alone
        (not complete) before any shard is rewritten, so a run killed now is never complete."""
        manifest = self.read_manifest()
        if manifest is not None and manifest.get("complete"):
            self.write_atomic(self.manifest_path, _dumps({k: plan[k] for k in PLAN_KEYS}))

    def shard_state(self, k: int) -> tuple[bool, str | None]:
        """(done, why not): (True, None) for a whole shard; (False, None) for one not written yet;
        (False, reason) for one whose files are there but not whole (to rebuild, saying why)."""
        table_path, npy_path = self.shard_path(k, "json"), self.shard_path(k, "npy")
        if not table_path.exists():
            return False, None
        try:
            table = json.loads(table_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            return False, f"{table_path.name} is not a whole shard table ({type(e).__name__}: {e})"
        record = table.get("npy") if isinstance(table, dict) else None
        if not isinstance(record, dict):
            return False, f"{table_path.name} records no size and checksum of its .npy (an older version's)"
        if not npy_path.exists():
            return False, f"{npy_path.name} is missing"
        why = mismatch(npy_path.name, npy_path.read_bytes(), record)
        return why is None, why

    def is_done(self, k: int) -> bool:
        return self.shard_state(k)[0]

    def write_shard(self, k: int, embeddings: np.ndarray, table: dict) -> None:
        """The shard's .npy, then its table with the .npy's size and checksum (its presence, with
        a matching .npy, marks the shard done)."""
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(embeddings), allow_pickle=False)
        record = self.write_atomic(self.shard_path(k, "npy"), buf.getvalue())
        self.write_atomic(self.shard_path(k, "json"), _dumps(dict(table, shard=k, rows=len(embeddings), npy=record)))

    def read_table(self, k: int) -> dict:
        path = self.shard_path(k, "json")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, FileNotFoundError) as e:
            raise EmbedError(f"{path}: not a readable shard table ({type(e).__name__}: {e})") from e

    def read_verified(self, path: epath.Path, record: dict | None, manifest_name: str) -> bytes:
        """The bytes of ``path``, checked against ``record`` (when the manifest has one): a
        missing or damaged file is an ``EmbedError`` naming it."""
        if not path.exists():
            raise EmbedError(f"{path}: no such file ({manifest_name} lists it); rerun ccj-embed with the same args")
        data = path.read_bytes()
        why = mismatch(path.name, data, record) if record is not None else None
        if why:
            raise EmbedError(
                f"{self.root}: {why} in {manifest_name}: the file is damaged; rerun ccj-embed with the same "
                "arguments to rebuild it"
            )
        return data

    def read_shard(self, k: int, manifest: dict | None = None) -> np.ndarray:
        """Shard ``k``'s rows, checked against ``manifest["files"]`` when given (a complete run)."""
        path = self.shard_path(k, "npy")
        record = (manifest or {}).get("files", {}).get(path.name)
        data = self.read_verified(path, record, self.manifest_path.name)
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise EmbedError(f"{path}: not a readable .npy file ({type(e).__name__}: {e})") from e

    def finish(self, plan: dict) -> dict:
        """All shards written (by any host): the id and bad tables, then the manifest marked
        complete, with the size and checksum of every file. Returns the manifest. A run where no
        record could be read is an ``EmbedError`` (nothing is marked complete)."""
        missing = [k for k in range(plan["num_shards"]) if not self.shard_path(k, "json").exists()]
        if missing:
            raise EmbedError(f"{self.root}: shards {missing[:5]} of {self.kind} are not written yet")
        ids, bad = io.BytesIO(), io.BytesIO()
        rows = n_bad = 0
        files = {}
        first_bad = None
        for k in range(plan["num_shards"]):
            table_path, npy_path = self.shard_path(k, "json"), self.shard_path(k, "npy")
            table_bytes = table_path.read_bytes()
            table = self.read_table(k)
            record = table.get("npy")
            if record is None or not npy_path.exists() or npy_path.stat().length != record.get("bytes"):
                raise EmbedError(f"{self.root}: shard {k} ({npy_path.name}) is not whole; rerun the same command")
            files[npy_path.name], files[table_path.name] = record, file_record(table_bytes)
            for i in table["ids"]:
                ids.write((json.dumps(i, ensure_ascii=False) + "\n").encode("utf-8"))
            for b in table["bad"]:
                bad.write(_dumps(b))
                first_bad = first_bad or b
            rows, n_bad = rows + table["rows"], n_bad + len(table["bad"])
        files[self.path("-bad.jsonl").name] = self.write_atomic(self.path("-bad.jsonl"), bad.getvalue())
        if rows == 0:
            why = f" (the first: {first_bad['id']}: {first_bad['why']})" if first_bad else ""
            raise EmbedError(
                f"{self.root}: none of the {plan['num_records']} {self.kind} records could be read{why}; "
                f"nothing marked complete; every reason is in {self.path('-bad.jsonl').name}"
            )
        files[self.path("-ids.jsonl").name] = self.write_atomic(self.path("-ids.jsonl"), ids.getvalue())
        manifest = dict({k: plan[k] for k in PLAN_KEYS}, complete=True, rows=rows, bad=n_bad, files=files)
        self.write_atomic(self.manifest_path, _dumps(manifest))
        for p in self.root.iterdir():  # what killed runs left half-written (every host is done)
            if p.name.startswith(self.kind) and ".tmp" in p.name:
                p.unlink()
        return manifest

    def complete_manifest(self) -> dict:
        """The manifest of a complete run (else an ``EmbedError`` saying what is missing)."""
        manifest = self.read_manifest()
        if manifest is None:
            raise EmbedError(f"{self.manifest_path}: no such file (no {self.kind} run in {self.root})")
        if not manifest.get("complete"):
            raise EmbedError(f"{self.manifest_path}: the run is not complete; rerun ccj-embed with the same arguments")
        return manifest

    def read_ids(self, manifest: dict) -> list:
        path = self.path("-ids.jsonl")
        data = self.read_verified(path, manifest.get("files", {}).get(path.name), self.manifest_path.name)
        try:
            return [json.loads(line) for line in data.decode("utf-8").splitlines()]
        except (ValueError, UnicodeDecodeError) as e:
            raise EmbedError(f"{path}: not a readable id table ({type(e).__name__}: {e})") from e


class Embeddings:
    """A finished run's rows: ``ids`` (list, row order), ``vectors`` float32 (rows, dim)."""

    def __init__(self, ids: list, vectors: np.ndarray, manifest: dict):
        self.ids, self.vectors, self.manifest = ids, vectors, manifest

    def __len__(self) -> int:
        return len(self.ids)


def load_embeddings(out, kind: str = "images", *, dtype=np.float32) -> Embeddings:
    """Reads every shard of a complete run in ``out`` (all rows in memory, as ``dtype``), each file
    checked against the size and checksum the manifest records (a damaged one is named)."""
    store = Store(out, kind)
    manifest = store.complete_manifest()
    ids = store.read_ids(manifest)
    parts = [store.read_shard(k, manifest).astype(dtype, copy=False) for k in range(manifest["num_shards"])]
    vectors = np.concatenate(parts) if parts else np.zeros((0, manifest["dim"]), dtype)
    if len(vectors) != len(ids):
        raise EmbedError(f"{store.root}: {len(vectors)} embedding rows but {len(ids)} ids")
    return Embeddings(ids, vectors, manifest)
