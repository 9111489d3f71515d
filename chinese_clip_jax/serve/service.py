"""The search service without HTTP: a catalog of runs, the query encoder, the source images.

    service = Service.load("emb")                  # the model of the runs' manifest
    print("\n".join(service.loaded()))             # what was loaded, for the start-up log
    hits = service.answer("images", vector, k=5, query={...})

``app`` puts it behind HTTP; tests and ``bench/serve_load.py`` use it directly as well.
Runs embedded with another model than the images run's are not served (an image -> texts search
needs both sides from one model); ``--model`` encodes queries with another checkpoint than the
manifests name (a moved directory), said at start-up.
"""

from __future__ import annotations

import dataclasses

from ..embed import CorpusError, EmbedError, read_texts
from .catalog import Catalog, Run, ServeError
from .queries import QueryEncoder
from .sources import SourceImages

__all__ = ["Service", "ServeOptions"]


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """max_batch: queries per device call (the encoder's largest bucket). max_wait_ms: how long
    the first query of a batch waits for others. max_queue: queries waiting before 503.
    max_upload_bytes: the largest image upload (413 above). warm_up: compile every bucket at
    start-up."""

    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 256
    max_upload_bytes: int = 10 * 1024 * 1024
    warm_up: bool = True

    def check(self) -> None:
        for key in ("max_batch", "max_queue", "max_upload_bytes"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")


class Service:
    def __init__(self, catalog: Catalog, clip, model_name: str, options: ServeOptions = ServeOptions()):
        options.check()
        self.catalog, self.model_name, self.options = catalog, model_name, options
        self.notes: list[str] = []
        first = catalog.runs.get("images") or catalog.runs["texts"]
        for kind, run in list(catalog.runs.items()):
            if run is not first and run.manifest.get("model") != first.manifest.get("model"):
                catalog.drop(kind)
                self.notes.append(
                    f"not serving the {kind} run: embedded with {run.manifest.get('model')}, "
                    f"the {first.kind} run with {first.manifest.get('model')}"
                )
        dim = clip.config.projection_dim
        for run in catalog.runs.values():
            if run.manifest.get("dim") != dim:
                raise EmbedError(
                    f"{catalog.root / (run.kind + '.json')}: dim {run.manifest.get('dim')}, "
                    f"but the model {model_name} embeds into {dim}"
                )
        if model_name != first.manifest.get("model"):
            self.notes.append(
                f"queries are encoded with {model_name}; the runs were embedded with {first.manifest.get('model')}"
            )
        self.queries = QueryEncoder(
            clip, max_batch=options.max_batch, max_wait_ms=options.max_wait_ms, max_queue=options.max_queue
        )
        self.sources = SourceImages.open(catalog.runs["images"]) if "images" in catalog.runs else None
        self.texts = self._texts()
        self.warm_up_s = self.queries.warm_up(images=True) if options.warm_up else None

    @classmethod
    def load(cls, embeddings, model=None, options: ServeOptions = ServeOptions()) -> Service:
        """``embeddings``: a ccj-embed --out directory. ``model``: a ``ChineseCLIP``, or anything
        ``ChineseCLIP.from_pretrained`` reads; default the manifest's model. The runs are read
        first, so a wrong directory fails before the model is loaded."""
        from ..inference import ChineseCLIP

        options.check()
        catalog = Catalog(embeddings)
        first = catalog.runs.get("images") or catalog.runs["texts"]
        if model is None or isinstance(model, str):
            name = model or first.manifest.get("model")
            resize = "squash" if first.manifest.get("crop") == "squash" else "processor"
            clip = ChineseCLIP.from_pretrained(name, resize_mode=resize)
        else:
            clip, name = model, getattr(model, "name", None) or first.manifest.get("model")
        return cls(catalog, clip, str(name), options)

    def _texts(self) -> dict:
        run = self.catalog.runs.get("texts")
        if run is None:
            return {}
        source = str(run.manifest.get("input", ""))
        try:
            corpus = read_texts(source.removeprefix("texts:"))
        except (CorpusError, ValueError, OSError) as e:
            self.notes.append(f"text hits carry ids only: {source} cannot be read ({str(e).splitlines()[0]})")
            return {}
        return {str(i): t for i, t in zip(corpus.ids, corpus.texts) if t is not None}

    def close(self) -> None:
        self.queries.close()

    def loaded(self) -> list[str]:
        """What was loaded, one line each (the start-up message)."""
        lines = [
            f"model: {self.model_name} (dim {self.queries.clip.config.projection_dim}, "
            f"context {self.queries.context_length} tokens)"
        ]
        for run in self.catalog.runs.values():
            lines.append(
                f"{run.kind}: {len(run)} rows from {self.catalog.root} ({run.index_type} index; "
                f"input {run.manifest.get('input')})"
            )
        if self.sources is not None:
            lines.append(f"images: {self.sources.describe()}")
        if "texts" in self.catalog.runs:
            lines.append(f"texts: {len(self.texts)} texts to show with the hits")
        lines.append(
            f"queries: batches of up to {self.options.max_batch} (buckets {self.queries.buckets()}), "
            f"{self.options.max_wait_ms:g} ms wait, {self.options.max_queue} queued; uploads up to "
            f"{self.options.max_upload_bytes} bytes"
        )
        if self.warm_up_s is not None:
            lines.append(f"compiled every bucket in {self.warm_up_s:.1f} s: no request waits on a compile")
        return lines + self.notes

    # ---------------------------------------------------------------- requests

    def check_fresh(self) -> None:
        """ServeError 503 when a loaded run's files changed since start-up."""
        changed = self.catalog.changed()
        if changed is not None:
            raise ServeError(
                f"the index files changed since start-up ({changed} in {self.catalog.root}); restart ccj-serve", 503
            )

    def run(self, kind: str) -> Run:
        run = self.catalog.runs.get(kind)
        if run is None:
            what = "image" if kind == "images" else "text"
            raise ServeError(f"no {what} corpus embedded with {self.model_name} in {self.catalog.root}", 404)
        return run

    def check_k(self, kind: str, k: int | None) -> int:
        run = self.run(kind)
        if k is None:
            return min(10, len(run))
        if k < 1:
            raise ServeError(f"k must be >= 1, got {k}")
        if k > len(run):
            raise ServeError(f"k={k} is above the {kind} corpus size {len(run)}")
        return k

    def answer(self, kind: str, vector, k: int, query: dict) -> dict:
        """The JSON answer: the hits, the query as understood, and which model and index."""
        run = self.run(kind)
        hits = []
        for rank, (i, score) in enumerate(run.search(vector, k)[0], 1):
            hit = {"rank": rank, "id": i, "score": score}
            if kind == "images":
                hit["thumbnail"] = f"/thumbnail?id={_quote(i)}"
                hit["image"] = f"/image?id={_quote(i)}"
            else:
                hit["text"] = self.texts.get(str(i))
            hits.append(hit)
        return {
            "query": query,
            "k": k,
            "model": self.model_name,
            "index": {"dir": str(self.catalog.root), "kind": kind, "type": run.index_type, "rows": len(run)},
            "hits": hits,
        }

    def info(self) -> dict:
        return {
            "status": "ok",
            "model": self.model_name,
            "dir": str(self.catalog.root),
            "runs": {k: {"rows": len(r), "index": r.index_type} for k, r in self.catalog.runs.items()},
            "context_length": self.queries.context_length,
            "max_upload_bytes": self.options.max_upload_bytes,
            "source_images": bool(self.sources and self.sources.available),
            "compiles": self.queries.compiles(),
            "batches": {"text": self.queries.texts.calls, "image": self.queries.images.calls},
        }


def _quote(i) -> str:
    from urllib.parse import quote

    return quote(str(i), safe="")
