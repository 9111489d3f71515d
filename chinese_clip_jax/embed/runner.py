"""The bulk embedding loop: a corpus -> shards of L2-normalized embeddings, resumable, per host.

    report = embed_images(model, params, open_images("folder:photos"), "out", model_name="ckpt")
    report = embed_texts(model, params, read_texts("captions.txt"), "out", model_name="ckpt")
    print(report.line())   # records, images/s, where the time went (input / model / write)

Records are cut into shards of ``shard_size`` in corpus order; host p of P embeds shards p, p + P,
... (``jax.process_index`` / ``jax.process_count``) on its own local devices, each batch sharded
over them (``encoding.Encoder``; no collective per batch, so hosts never wait on each other).
Images are read and decoded by the training pipeline's decoder (``data.pipeline.ImageDecoder``,
uint8 up to the device, normalised there by ``encoding.model_pixels``) in grain reader threads
or, with ``workers``, grain worker processes, a batch per grain element, in order. A record that
cannot be read or decoded is skipped and listed with the reason. A shard already written (a
killed run) is kept when its ``.npy`` matches the size and checksum its table recorded; a damaged
one is rebuilt, named in a warning and in the report; the others are redone. When every host is
done (``sync_global_devices``), process 0 writes the id tables and marks the manifest complete
(``store.Store.finish``); a run where no record could be read ends in an ``EmbedError``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time

import numpy as np

from ..data.sets import ImageCorpus, TextCorpus
from ..inference import encoding
from .store import FORMAT, EmbedError, Store

__all__ = ["EmbedOptions", "Report", "embed_images", "embed_texts", "DTYPES"]

logger = logging.getLogger(__name__)
DTYPES = ("float16", "float32")
_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")  # PIL names the BytesIO by address: not in the files


@dataclasses.dataclass(frozen=True)
class EmbedOptions:
    """shard_size: records per output shard. batch_size: records per device step (rounded up to
    a multiple of the local devices). dtype: stored embeddings, "float16" or "float32". crop:
    "center" (transformers' processor) or "squash" (cn_clip's eval resize). workers: grain
    worker processes decoding images (0: ``threads`` reader threads in this process).
    context_length: text tokens (52 as cn_clip). progress: a tqdm bar on process 0."""

    shard_size: int = 10_000
    batch_size: int = 256
    dtype: str = "float16"
    crop: str = "center"
    workers: int = 0
    threads: int = 2
    context_length: int = 52
    progress: bool = True

    def check(self) -> None:
        for key in ("shard_size", "batch_size", "threads", "context_length"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.crop not in ("center", "squash"):
            raise ValueError(f"crop must be 'center' or 'squash', got {self.crop!r}")


@dataclasses.dataclass
class Report:
    """What this host did. Seconds: ``input_s`` waiting for decoded (or tokenized) batches,
    ``model_s`` in the encoder (first-call compilation included), ``write_s`` writing shards."""

    kind: str
    records: int = 0  # records this host read in this run (good and bad)
    rows: int = 0
    bad: int = 0
    shards: int = 0  # shards written in this run
    kept: int = 0  # shards of this host found already written and whole (resume)
    rebuilt: list = dataclasses.field(default_factory=list)  # "shard K: why" of each damaged shard redone
    seconds: float = 0.0
    input_s: float = 0.0
    model_s: float = 0.0
    write_s: float = 0.0
    manifest: dict | None = None  # process 0, once complete

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        unit = self.kind
        return (
            f"{self.records} {unit} ({self.bad} bad) in {self.seconds:.1f} s: {self.rate:.1f} {unit}/s; "
            f"waiting for input {self.input_s:.1f} s, model {self.model_s:.1f} s, writing {self.write_s:.1f} s; "
            f"{self.shards} shards written, {self.kept} kept from an earlier run"
            + (f", {len(self.rebuilt)} rebuilt ({self.rebuilt[0]})" if self.rebuilt else "")
        )


def _plan(kind: str, corpus, model, model_name: str, options: EmbedOptions) -> dict:
    n = len(corpus)
    vision = model.config.vision_config
    return {
        "format": FORMAT,
        "kind": kind,
        "input": corpus.source,
        "model": model_name,
        "num_records": n,
        "shard_size": options.shard_size,
        "num_shards": -(-n // options.shard_size),
        "dim": model.config.projection_dim,
        "dtype": options.dtype,
        "image_size": vision.image_size if kind == "images" else None,
        "crop": options.crop if kind == "images" else None,
        "context_length": options.context_length if kind == "texts" else None,
    }


def _my_shards(store: Store, plan: dict) -> tuple[list[int], int, list[str]]:
    """(this host's shards still to write, how many are already written and whole, "shard K: why"
    of each written but damaged one: to rebuild)."""
    import jax

    mine = range(jax.process_index(), plan["num_shards"], jax.process_count())
    complete = bool((store.read_manifest() or {}).get("complete"))
    todo, damaged = [], []
    for k in mine:
        done, why = store.shard_state(k)
        if not done:
            todo.append(k)
        if not done and why is None and complete:  # a complete run's shard whose files were deleted
            why = f"{store.shard_path(k, 'json').name} is missing"
        if why:
            damaged.append(f"shard {k}: {why}")
    return todo, len(mine) - len(todo), damaged


def _spans(plan: dict, k: int, batch_size: int) -> list[tuple[int, int]]:
    start = k * plan["shard_size"]
    stop = min(plan["num_records"], start + plan["shard_size"])
    return [(s, min(stop, s + batch_size)) for s in range(start, stop, batch_size)]


def _bar(total: int, unit: str, enabled: bool):
    import jax

    if not enabled or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, desc=f"embedding {unit}", dynamic_ncols=True, smoothing=0.1)


def _run(kind, corpus, model, params, out, model_name, options, batches, embed, mesh, encoder) -> Report:
    """The loop shared by both kinds: ``batches(spans)`` yields one prepared batch per span,
    ``embed(encoder, batch)`` -> (embeddings, ids, bad)."""
    import jax

    options.check()
    store = Store(out, kind)
    plan = _plan(kind, corpus, model, model_name, options)
    if plan["num_records"] == 0:
        raise EmbedError(f"{corpus.source}: the corpus has no records; nothing to embed")
    store.start(plan)
    todo, kept, damaged = _my_shards(store, plan)
    report = Report(kind, kept=kept, rebuilt=damaged)
    if todo:
        store.reopen(plan)  # a complete run stops being complete before any shard is rewritten
    if damaged:
        for why in damaged:
            logger.warning("%s: %s: rebuilt", kind, why)
    spans = {k: _spans(plan, k, options.batch_size) for k in todo}
    total = sum(b - a for k in todo for a, b in spans[k])
    start = time.perf_counter()
    if todo:
        if encoder is None:
            encoder = encoding.Encoder(model, params, mesh, batch_size=options.batch_size)
        bar = _bar(total, kind, options.progress)
        it = batches([s for k in todo for s in spans[k]])
        try:
            for k in todo:
                parts, ids, bad = [], [], []
                for a, b in spans[k]:
                    t0 = time.perf_counter()
                    batch = next(it)
                    t1 = time.perf_counter()
                    emb, batch_ids, batch_bad = embed(encoder, batch)
                    report.input_s += t1 - t0
                    report.model_s += time.perf_counter() - t1
                    parts.append(emb)
                    ids += batch_ids
                    bad += batch_bad
                    report.records += b - a
                    if bar is not None:
                        bar.update(b - a)
                t0 = time.perf_counter()
                rows = np.concatenate(parts).astype(options.dtype)
                first, last = spans[k][0][0], spans[k][-1][1]
                store.write_shard(k, rows, {"start": first, "stop": last, "ids": ids, "bad": bad})
                report.write_s += time.perf_counter() - t0
                report.rows += len(rows)
                report.bad += len(bad)
                report.shards += 1
                logger.info("%s: shard %d written (%d rows, %d bad)", kind, k, len(rows), len(bad))
                for why in bad[:3]:
                    logger.warning("%s: skipped %s: %s", kind, why["id"], why["why"])
        finally:
            if bar is not None:
                bar.close()
            close = getattr(it, "close", None)
            if close is not None:
                close()
    report.seconds = time.perf_counter() - start
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"ccj-embed {kind}: every shard written")
    if jax.process_index() == 0:
        report.manifest = store.finish(plan)
    return report


# ------------------------------------------------------------------ images


def _decoded_batches(corpus: ImageCorpus, spans, image_size: int, options: EmbedOptions):
    """One grain element per span: {"pixels": uint8 (good, s, s, 3), "ids", "bad"}, in order."""
    import grain

    ds = grain.MapDataset.source(spans).map(_DecodeSpan(corpus.records, image_size, options.crop))
    per_batch = max(1, 256 // options.batch_size)  # ~256 decoded records buffered per reader/worker
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=options.threads, prefetch_buffer_size=2 * per_batch))
    if options.workers:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain reads its absl flags; outside an absl app use defaults
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=options.workers, per_worker_buffer_size=per_batch))
    return iter(ds)


class _DecodeSpan:
    """grain map: (start, stop) -> that span's records decoded (``ImageDecoder``, uint8); a record
    that cannot be read or decoded becomes {"id", "why"} in "bad" (never raises)."""

    def __init__(self, records, image_size: int, crop: str):
        from ..data.pipeline import ImageDecoder

        self._records = records
        self._decode = ImageDecoder(image_size, crop, uint8=True)

    def __call__(self, span) -> dict:
        start, stop = int(span[0]), int(span[1])
        pixels, ids, bad = [], [], []
        for i in range(start, stop):
            record_id = f"record {i}"
            try:
                record = self._records[i]
                record_id = record.get("id", record_id)
                if record.get("error"):
                    raise ValueError(record["error"])
                pixels.append(self._decode(record["image"]))
                ids.append(record_id)
            except Exception as e:  # noqa: BLE001 - any unreadable record is skipped and listed
                bad.append({"id": record_id, "why": _ADDRESS.sub("the image", f"{type(e).__name__}: {e}")})
        s = self._decode.image_size
        return {"pixels": np.stack(pixels) if pixels else np.zeros((0, s, s, 3), np.uint8), "ids": ids, "bad": bad}


def embed_images(
    model,
    params,
    corpus: ImageCorpus,
    out,
    *,
    model_name: str,
    options: EmbedOptions = EmbedOptions(),
    mesh=None,
    encoder: encoding.Encoder | None = None,
) -> Report:
    """Embeds ``corpus`` into ``out`` (``store`` layout) with ``model`` (a ChineseCLIPModel) and
    ``params``; ``mesh`` defaults to every local device on "data". ``encoder``: an
    ``encoding.Encoder`` of the model to reuse (its compiled functions) across runs, instead of
    one made here from ``params`` and ``mesh``. Returns this host's report."""
    image_size = model.config.vision_config.image_size

    def batches(spans):
        return _decoded_batches(corpus, spans, image_size, options)

    def embed(encoder, batch):
        emb = encoder.encode_images(batch["pixels"], lambda chunk, start: chunk, progress=False)
        return emb, batch["ids"], batch["bad"]

    return _run("images", corpus, model, params, out, model_name, options, batches, embed, mesh, encoder)


# ------------------------------------------------------------------ texts


def embed_texts(
    model,
    params,
    corpus: TextCorpus,
    out,
    *,
    model_name: str,
    options: EmbedOptions = EmbedOptions(),
    mesh=None,
    encoder: encoding.Encoder | None = None,
) -> Report:
    """Embeds the texts of ``corpus`` into ``out``, tokenized as ``ChineseCLIPProcessor`` does
    (``context_length`` tokens, [CLS] ... [SEP], padded). Returns this host's report."""
    from ..processing import ChineseCLIPProcessor

    max_positions = model.config.text_config.max_position_embeddings
    if options.context_length > max_positions:
        raise ValueError(
            f"context_length (--context-length) {options.context_length}: more than the model's {max_positions} "
            f"text positions; give {max_positions} or less"
        )
    processor = ChineseCLIPProcessor(context_length=options.context_length)

    def batches(spans):
        for a, b in spans:
            good = {i: corpus.texts[i] for i in range(a, b) if corpus.texts[i] is not None}
            bad = [{"id": corpus.ids[i], "why": "empty or unreadable text"} for i in range(a, b) if i not in good]
            tokens = processor.tokenize(list(good.values()), options.context_length) if good else None
            yield tokens, [corpus.ids[i] for i in good], bad

    def embed(encoder, batch):
        tokens, ids, bad = batch
        if tokens is None:
            return np.zeros((0, encoder.dim), np.float32), ids, bad
        emb = encoder.encode_text(
            tokens["input_ids"], tokens["attention_mask"], tokens.get("token_type_ids"), progress=False
        )
        return emb, ids, bad

    return _run("texts", corpus, model, params, out, model_name, options, batches, embed, mesh, encoder)
