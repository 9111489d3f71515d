"""The grain training pipeline: shard -> shuffle per epoch -> decode -> skip bad -> batch -> tokenize.

A *source* is any random-access sequence whose items are raw records
``{"image": ..., "text": str, "where": str}``; ``image`` is a uint8 (H, W, 3) array, encoded
image bytes (JPEG/PNG/...) or a base64 string of them, and ``where`` names the sample in error
messages (e.g. "train_imgs.tsv:17"); a source that cannot even read a record returns
``{"error": why, "where": ...}`` instead of raising, so the sample is skipped and counted. The pipeline, per process:

  1. takes this process's contiguous shard of the index space (grain ``ShardOptions`` from
     ``jax.process_index()`` / ``jax.process_count()``);
  2. shuffles it with ``seed`` (grain folds the epoch into the seed: each epoch reshuffled,
     deterministically) and repeats forever;
  3. decodes each record to a uint8 (s, s, 3) image (centre crop, squash, or cn_clip's random
     resized crop drawn from an rng grain derives from (seed, chunk position)), ``CHUNK`` consecutive
     records at a time, in grain's reader threads or, with ``worker_count``, in grain worker
     processes; an undecodable record becomes a marker, never an exception;
  4. in :class:`TrainIterator`, skips and counts markers (logged), gathers ``b`` good samples and
     tokenizes their captions with ``ChineseCLIPProcessor`` (context length 52, padded); with
     ``distinct_captions`` a sample whose caption is already in the batch waits for a later one.

With ``labels`` every record must carry a "label" (an int or a string: the source's class or
group id, ``loss_positives="label"``); batches then hold "label" int32 (b,) (``label_id``).

Pixels stay uint8 up to the device (a quarter of float32's bytes through the worker queues and
the host-to-device copy); the train step normalises them (``encoding.model_pixels``) with the
same table as ``normalize_pixels``. ``TrainIterator.get_state()`` is JSON-able: grain's iterator
state, the position inside the current chunk and the skip counters, so ``set_state`` continues
exactly (same batches, same counts).
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
import PIL.Image

from ..processing import (
    DEFAULT_CONTEXT_LENGTH,
    EVAL_TRANSFORMS,
    ChineseCLIPProcessor,
    ImageSettings,
    apply_normalize_table,
    default_normalize_table,
)
from .bad_records import TooManyBadRecords, max_bad_limit, too_many

__all__ = [
    "TrainIterator",
    "build_train_iterator",
    "label_id",
    "ImageDecoder",
    "CachingTokenizer",
    "TRAIN_CROPS",
    "EVAL_CROPS",
]

logger = logging.getLogger(__name__)
_LOG_FIRST = 10  # log every skipped sample up to this many, then every _LOG_EVERY-th
_LOG_EVERY = 100

TRAIN_CROPS = ("center", "random_resized", "squash")  # data.train_crop
EVAL_CROPS = EVAL_TRANSFORMS  # data.eval_crop: processing.eval_transform's names
RANDOM_RESIZED_SCALE = (0.9, 1.0)  # cn_clip's training augmentation (timm, bicubic)
RANDOM_RESIZED_RATIO = (3 / 4, 4 / 3)
# Records decoded per grain element: one message per CHUNK records crosses from the reader
# threads or worker processes (docs/data.md, "Input throughput"). Buffer sizes in the config
# count records and are rounded up to whole chunks.
CHUNK = 32


def _to_pil(image: Any, draft_size: int = 0) -> PIL.Image.Image:
    if isinstance(image, str):
        image = base64.urlsafe_b64decode(image)  # cn_clip's encoding; accepts plain base64 too
    if isinstance(image, (bytes, bytearray, memoryview)):
        image = PIL.Image.open(io.BytesIO(image))
        if draft_size and image.format == "JPEG":  # libjpeg's DCT scaling: decode at 1/2, 1/4, 1/8
            image.draft("RGB", (draft_size, draft_size))
        image.load()
    if isinstance(image, np.ndarray):
        image = PIL.Image.fromarray(image)
    return image


def random_resized_box(
    width: int, height: int, rng: np.random.Generator, scale=RANDOM_RESIZED_SCALE, ratio=RANDOM_RESIZED_RATIO
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of torchvision's RandomResizedCrop window (10 tries, then
    the centre crop with the ratio clamped), drawn from ``rng``."""
    area = width * height
    log_ratio = np.log(ratio)
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = float(np.exp(rng.uniform(*log_ratio)))
        w, h = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


class ImageDecoder:
    """Raw image -> float32 (3, s, s), normalised with the CLIP mean/std (``normalize_pixels``),
    or with ``uint8=True`` the uint8 (s, s, 3) image before that step (the training pipeline's
    output: the device normalises it, ``encoding.model_pixels``, with the same table).

    crop: "center" (resize shortest edge to s, bicubic, centre crop: transformers'
    ChineseCLIPImageProcessor, identical output), "squash" (bicubic resize to s x s: cn_clip's
    eval transform, the processor's ``resize_mode="squash"``) or "random_resized" (cn_clip's
    training crop: RandomResizedCrop with scale (0.9, 1.0), ratio (3/4, 4/3), bicubic; needs
    ``rng``). Arrays already (s, s, 3) uint8 are used as they are under "center".
    ``jpeg_draft``: JPEGs at least twice the output size are decoded at a reduced scale (still
    >= s px a side) before resizing: less CPU per image (docs/data.md), pixels no longer
    identical to transformers' (a training option).
    """

    def __init__(self, image_size: int, crop: str = "center", jpeg_draft: bool = False, uint8: bool = False):
        if crop not in TRAIN_CROPS:
            raise ValueError(f"image crop must be one of {TRAIN_CROPS}, got {crop!r}")
        self.image_size, self.crop, self.jpeg_draft = int(image_size), crop, bool(jpeg_draft)
        self.uint8 = bool(uint8)
        self._processor = ChineseCLIPProcessor(
            image_settings=ImageSettings.at_resolution(self.image_size),
            num_threads=1,
            resize_mode="squash" if crop == "squash" else "center",  # random_resized crops its own
        ).image_processor

    def __call__(self, image: Any, rng: np.random.Generator | None = None) -> np.ndarray:
        pixels, table = self._resized(image, rng)
        return pixels if self.uint8 else apply_normalize_table(pixels, table)

    def _resized(self, image: Any, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
        """-> (uint8 (s, s, 3), the (3, 256) table that normalises it)."""
        s = self.image_size
        if (
            self.crop == "center"
            and isinstance(image, np.ndarray)
            and image.shape == (s, s, 3)
            and image.dtype == np.uint8
        ):
            return image, default_normalize_table()
        image = _to_pil(image, s if self.jpeg_draft else 0)
        if self.crop in ("center", "squash"):
            return self._processor.resized(image), self._processor.table
        if rng is None:
            raise ValueError("random_resized crop needs an rng")
        image = image.convert("RGB")
        box = random_resized_box(image.width, image.height, rng)
        image = image.resize((s, s), resample=PIL.Image.Resampling.BICUBIC, box=box)
        return np.asarray(image), default_normalize_table()


def label_id(label) -> int:
    """A record's label -> an int32 group id, the same on every host: an int in int32's range is
    itself; anything else (a string) a 31-bit BLAKE2b hash of its text."""
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool) and -(2**31) <= label < 2**31:
        return int(label)
    digest = hashlib.blake2b(str(label).encode("utf-8"), digest_size=4).digest()
    return int.from_bytes(digest, "little") >> 1


class _DecodeChunk(grain.transforms.RandomMap):
    """grain map: CHUNK source indices -> one chunk (``_collate``) of their decoded records.

    Reading and decoding a whole chunk in one grain element keeps grain's per-element work
    (shuffle lookup, stats, rng) off each record; random crops draw, record after record, from
    the rng grain derives from (seed, chunk position), so they are resumable."""

    def __init__(
        self, source: Sequence, image_size: int, crop: str = "center", jpeg_draft: bool = False, labels: bool = False
    ):
        self._source = source
        self._image = ImageDecoder(image_size, crop, jpeg_draft, uint8=True)
        self._labels = bool(labels)

    def random_map(self, indices: np.ndarray, rng: np.random.Generator) -> dict:
        return _collate([self._record(int(i), rng) for i in indices])

    def _record(self, index: int, rng: np.random.Generator) -> dict:
        """-> {"pixel_values": uint8 (s, s, 3), "text": str, "bad": ""} (and "label": int with
        ``labels``), or for an undecodable record zeros, "" and "bad": "where: why" (never raises)."""
        where = f"record {index}"
        try:
            record = self._source[index]
            where = record.get("where", where)
            if record.get("error"):
                raise ValueError(record["error"])
            text = record["text"]
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"caption must be a non-empty string, got {text!r}")
            out = {"pixel_values": self._image(record["image"], rng), "text": text, "bad": ""}
            if self._labels:
                if record.get("label") is None:
                    raise ValueError("no label (loss_positives='label' needs one per record)")
                out["label"] = label_id(record["label"])
            return out
        except Exception as e:  # noqa: BLE001 - any undecodable sample is skipped and counted
            s = self._image.image_size
            return {
                "pixel_values": np.zeros((s, s, 3), np.uint8),
                "text": "",
                "bad": f"{where}: {type(e).__name__}: {e}",
                **({"label": 0} if self._labels else {}),
            }


def _collate(records: Sequence[dict]) -> dict:
    """Decoded records (``_DecodeChunk._record``) -> one chunk {"pixel_values": uint8 (n, s, s, 3),
    "text": [n], "bad": [n]}: what crosses from grain's threads or worker processes (one message
    per CHUNK records; "label": int64 (n,) where the records have labels)."""
    chunk = {
        "pixel_values": np.stack([r["pixel_values"] for r in records]),
        "text": [r["text"] for r in records],
        "bad": [r["bad"] for r in records],
    }
    if records and "label" in records[0]:
        chunk["label"] = np.asarray([r["label"] for r in records], np.int64)
    return chunk


class CachingTokenizer:
    """Captions -> {"input_ids", "attention_mask"} int32 (n, L) with the Chinese-CLIP tokenizer.

    Tokenized in the calling thread (tokenizers are not thread-safe), with a bounded cache.
    """

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH, cache_size: int = 100_000):
        self.context_length = int(context_length)
        self._processor = ChineseCLIPProcessor(context_length=self.context_length, num_threads=1)
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._cache_size = cache_size

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        missing = sorted({t for t in texts if t not in self._cache})
        if missing:
            if len(self._cache) + len(missing) > self._cache_size:
                self._cache.clear()
            enc = self._processor.tokenize(missing, self.context_length)
            for i, t in enumerate(missing):
                self._cache[t] = (enc["input_ids"][i], enc["attention_mask"][i])
        ids = np.stack([self._cache[t][0] for t in texts]).astype(np.int32)
        mask = np.stack([self._cache[t][1] for t in texts]).astype(np.int32)
        return {"input_ids": ids, "attention_mask": mask}


class TrainIterator:
    """Infinite iterator of host-local batches; checkpointable.

    ``next(it)`` -> {"input_ids": int32 (b, L), "attention_mask": int32 (b, L),
    "pixel_values": uint8 (b, s, s, 3)} (images resized and cropped; the train step normalises
    them on the device: ``encoding.model_pixels``, or ``normalize_pixels`` on the host).
    ``it.stats`` -> {"skipped": undecodable samples skipped so far, "skipped_at_index": records
    dropped while indexing the source, "samples": good samples yielded}.

    ``samples`` yields chunks (``_collate``); a batch may end inside one, so the state is the
    grain state before that chunk plus how many of its records were used.

    ``distinct_captions``: no batch holds two samples with the same caption text. A sample whose
    caption is already in the batch waits (oldest first) for the next batch that has room for it;
    at most ``batch_size`` samples wait, older ones beyond that are dropped and counted
    (``stats["duplicates_dropped"]``). The waiting samples are named in the state by their chunk's
    grain state and row, and read again on ``set_state``, so a resumed run yields the same batches.
    """

    def __init__(
        self,
        samples: grain.DatasetIterator,
        *,
        batch_size: int,
        encode_text: Callable,
        skipped_at_index: int = 0,
        shard_size: int | None = None,
        name: str = "data",
        max_bad: int | None = None,
        distinct_captions: bool = False,
    ):
        self._samples = samples
        self._distinct = bool(distinct_captions)
        self._deferred: list[tuple[int, int, dict]] = []  # (chunk number, row, chunk) waiting for a batch
        self._chunk_states: dict[int, Any] = {}  # chunk number -> grain state before it (distinct only)
        self._chunk_no = 0  # chunks read so far; the one in use is number _chunk_no
        self._dropped = 0
        self._shard_size = shard_size
        self.batch_size = int(batch_size)
        self._encode_text = encode_text
        self._name = name
        self._skipped = 0
        self._yielded = 0
        self._skipped_at_index = int(skipped_at_index)
        self._bad_in_a_row = 0
        # the bad-record cap (data.bad_records) counts distinct records: epochs repeat them
        self._max_bad = max_bad_limit(max_bad, shard_size or 0)
        self._distinct_bad: set[str] = set()
        self.first_bad = ""  # the first skipped sample this iterator met ("where: why")
        self._chunk: dict | None = None  # the chunk being consumed, its grain state, records used
        self._chunk_state: Any = None
        self._used = 0

    def __iter__(self) -> TrainIterator:
        return self

    def _next_chunk(self) -> None:
        self._chunk_state = self._samples.get_state()
        self._chunk, self._used = next(self._samples), 0
        self._chunk_no += 1
        if self._distinct:
            self._chunk_states[self._chunk_no] = self._chunk_state

    def __next__(self) -> dict[str, np.ndarray]:
        if self._distinct:
            return self._next_distinct()
        runs: list[tuple[dict, int, int]] = []  # (chunk, first row, end row): good rows taken
        texts: list[str] = []
        while len(texts) < self.batch_size:
            if self._chunk is None or self._used == len(self._chunk["bad"]):
                self._next_chunk()
            chunk, bad = self._chunk, self._chunk["bad"]
            stop = min(len(bad), self._used + self.batch_size - len(texts))
            first_bad = next((i for i in range(self._used, stop) if bad[i]), stop)
            if first_bad > self._used:  # good rows used..first_bad
                texts += chunk["text"][self._used : first_bad]
                runs.append((chunk, self._used, first_bad))
                self._bad_in_a_row = 0
            self._used = first_bad
            if first_bad < stop:
                self._skip(bad[first_bad])
                self._used += 1
        self._yielded += len(texts)
        batch = self._encode_text(texts)
        batch["pixel_values"] = np.concatenate([chunk["pixel_values"][lo:hi] for chunk, lo, hi in runs])
        if "label" in runs[0][0]:
            batch["label"] = np.concatenate([chunk["label"][lo:hi] for chunk, lo, hi in runs]).astype(np.int32)
        return batch

    def _next_good(self) -> tuple[int, int, dict]:
        """(chunk number, row, chunk) of the next good record; bad ones are skipped and counted."""
        while True:
            if self._chunk is None or self._used == len(self._chunk["bad"]):
                self._next_chunk()
            row, why = self._used, self._chunk["bad"][self._used]
            self._used += 1
            if not why:
                self._bad_in_a_row = 0
                return self._chunk_no, row, self._chunk
            self._skip(why)

    def _next_distinct(self) -> dict[str, np.ndarray]:
        """A batch of distinct captions: the waiting samples first (oldest first), then new ones."""
        taken, seen, waiting = [], set(), []
        for item in self._deferred:
            text = item[2]["text"][item[1]]
            if len(taken) < self.batch_size and text not in seen:
                taken.append(item)
                seen.add(text)
            else:
                waiting.append(item)
        while len(taken) < self.batch_size:
            item = self._next_good()
            text = item[2]["text"][item[1]]
            if text in seen:
                waiting.append(item)
                if len(waiting) > 16 * self.batch_size:
                    raise RuntimeError(
                        f"{self._name}: data.distinct_captions: {len(waiting)} samples read after {len(taken)} "
                        f"distinct captions; the data has too few distinct captions for a batch of {self.batch_size}"
                    )
            else:
                taken.append(item)
                seen.add(text)
        if len(waiting) > self.batch_size:
            self._dropped += len(waiting) - self.batch_size
            waiting = waiting[-self.batch_size :]
        self._deferred = waiting
        keep = {no for no, _, _ in waiting} | {self._chunk_no}
        self._chunk_states = {no: s for no, s in self._chunk_states.items() if no in keep}
        texts = [chunk["text"][row] for _, row, chunk in taken]
        self._yielded += len(texts)
        batch = self._encode_text(texts)
        batch["pixel_values"] = np.stack([chunk["pixel_values"][row] for _, row, chunk in taken])
        if "label" in taken[0][2]:
            batch["label"] = np.asarray([chunk["label"][row] for _, row, chunk in taken], np.int32)
        return batch

    def _skip(self, why: str) -> None:
        self._skipped += 1
        self.first_bad = self.first_bad or why
        self._bad_in_a_row += 1
        if self._shard_size is not None and self._bad_in_a_row >= max(self._shard_size, 1):
            raise RuntimeError(
                f"{self._name}: a whole epoch ({self._bad_in_a_row} samples) in a row could not be decoded; last: {why}"
            )
        if len(self._distinct_bad) <= self._max_bad:
            self._distinct_bad.add(re.sub(r" at 0x[0-9a-f]+", "", why))  # one record, however it failed
            if len(self._distinct_bad) > self._max_bad:
                first = min(self._distinct_bad)
                raise TooManyBadRecords(
                    f"{self._name}: "
                    + too_many(
                        len(self._distinct_bad), self._shard_size or 0, self._max_bad, first, flag="data.max_bad"
                    )
                )
        if self._skipped <= _LOG_FIRST or self._skipped % _LOG_EVERY == 0:
            logger.warning("%s: skipped undecodable sample %s (%d skipped so far)", self._name, why, self._skipped)

    @property
    def shard_records(self) -> int | None:
        """Records in this process's shard of the source (one epoch of this process)."""
        return self._shard_size

    @property
    def stats(self) -> dict[str, int]:
        stats = {"skipped": self._skipped, "skipped_at_index": self._skipped_at_index, "samples": self._yielded}
        if self._distinct:
            stats["duplicates_dropped"] = self._dropped
        return stats

    def get_state(self) -> dict[str, Any]:
        """JSON-able state: grain's iterator state (before the chunk in use), the records of that
        chunk already used, and the counters."""
        partial = self._chunk is not None and self._used < len(self._chunk["bad"])
        state = {
            "grain": self._chunk_state if partial else self._samples.get_state(),
            "chunk": CHUNK,
            "used": self._used if partial else 0,
            "skipped": self._skipped,
            "samples": self._yielded,
            "bad_in_a_row": self._bad_in_a_row,
        }
        if self._distinct:  # the waiting samples, as (chunk number, row) and their chunks' grain states
            state["distinct"] = {
                "chunk_no": self._chunk_no - (1 if partial else 0),
                "waiting": [[no, row] for no, row, _ in self._deferred],
                "chunk_states": {str(no): self._chunk_states[no] for no in {no for no, _, _ in self._deferred}},
                "dropped": self._dropped,
            }
        return state

    def close(self) -> None:
        """Stops grain's reader threads."""
        self._samples.close()

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a state from ``get_state`` (possibly after a JSON round trip)."""
        missing = {"grain", "skipped", "samples"} - set(state)
        if missing:
            raise ValueError(f"{self._name}: iterator state lacks keys {sorted(missing)}; got {sorted(state)}")
        grain_state, used = state["grain"], int(state.get("used", 0))
        if "chunk" not in state:  # saved before chunks: grain counted records
            if set(grain_state) != {"next_index"}:
                raise ValueError(
                    f"{self._name}: this checkpoint's data state is from a version that decoded record by "
                    f"record in worker processes; resume it once with data.worker_count=0"
                )
            records = int(state["samples"]) + int(state["skipped"])
            grain_state, used = {"next_index": records // CHUNK}, records % CHUNK
        elif int(state["chunk"]) != CHUNK:
            raise ValueError(
                f"{self._name}: data state saved with chunks of {state['chunk']} records, this version uses {CHUNK}"
            )
        distinct = state.get("distinct")
        if self._distinct != (distinct is not None):
            raise ValueError(
                f"{self._name}: data.distinct_captions is {self._distinct} but the checkpoint's data state was "
                f"saved with it {distinct is not None}; resume with the setting it was saved with"
            )
        self._deferred, self._chunk_states, self._dropped = [], {}, 0
        if distinct is not None:  # read the waiting samples' chunks again
            chunks = {}
            for no, s in distinct["chunk_states"].items():
                self._samples.set_state(s)
                chunks[int(no)] = next(self._samples)
                self._chunk_states[int(no)] = s
            self._deferred = [(int(no), int(row), chunks[int(no)]) for no, row in distinct["waiting"]]
            self._dropped = int(distinct["dropped"])
            self._chunk_no = int(distinct["chunk_no"])
        self._samples.set_state(grain_state)
        self._chunk, self._chunk_state, self._used = None, None, 0
        if used:
            self._next_chunk()
            self._used = used
        self._skipped = int(state["skipped"])
        self._yielded = int(state["samples"])
        self._bad_in_a_row = int(state.get("bad_in_a_row", 0))


def shard_range(num_records: int, shard: grain.sharding.ShardOptions) -> tuple[int, int]:
    """[start, end) of this shard: contiguous, sizes differ by at most one, union is everything."""
    per, rem = divmod(num_records, shard.shard_count)
    start = per * shard.shard_index + min(shard.shard_index, rem)
    return start, start + per + (1 if shard.shard_index < rem else 0)


def build_train_iterator(
    source: Sequence,
    *,
    batch_size: int,
    seed: int,
    image_size: int,
    context_length: int,
    shard: grain.sharding.ShardOptions,
    num_threads: int = 2,
    prefetch_buffer_size: int = 256,
    worker_count: int = 0,
    worker_buffer_size: int = 16,
    crop: str = "center",
    jpeg_draft: bool = False,
    name: str = "data",
    max_bad: int | None = None,
    labels: bool = False,
    distinct_captions: bool = False,
) -> TrainIterator:
    """The pipeline above over ``source`` for one process; ``batch_size`` is host-local.

    worker_count > 0 decodes and transforms in that many grain worker processes
    (``mp_prefetch``; each buffers ``worker_buffer_size`` samples); 0 uses ``num_threads``
    reader threads in this process. The batches are the same either way. ``labels``: batches
    carry "label" (see the module docstring); ``distinct_captions``: see ``TrainIterator``.
    """
    if not 0 <= seed < 2**32:
        raise ValueError(f"{name}: seed must be in [0, 2**32), got {seed}")
    if worker_count < 0:
        raise ValueError(f"{name}: data.worker_count must be >= 0, got {worker_count}")
    start, end = shard_range(len(source), shard)
    if end - start < 1:
        raise ValueError(f"{name}: {len(source)} records cannot feed {shard.shard_count} processes")
    # chunks of CHUNK consecutive positions of the shuffled index stream: the record order, and
    # so every batch, is the same for any number of threads or workers (worker i decodes chunks
    # i, i + n, ...)
    ds = grain.MapDataset.range(start, end).shuffle(seed=seed).repeat(None).batch(CHUNK)
    if labels:  # a source without labels fails here, in one line, before any work
        first = source[start]
        if not first.get("error") and first.get("label") is None:
            raise ValueError(
                f"{name}: loss_positives='label' needs a label per record, and this source gives none "
                f"(first record: {first.get('where', start)}); see docs/training.md"
            )
    ds = ds.random_map(_DecodeChunk(source, image_size, crop, jpeg_draft, labels), seed=seed)

    def chunks(records: int) -> int:  # buffer sizes count records; grain buffers whole chunks
        return max(1, -(-records // CHUNK))

    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=chunks(prefetch_buffer_size))
    ds = ds.to_iter_dataset(read)
    if worker_count:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain reads its absl flags; outside an absl app use defaults
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=chunks(worker_buffer_size))
        )
    samples = ds.__iter__()
    return TrainIterator(
        samples,
        batch_size=batch_size,
        encode_text=CachingTokenizer(context_length),
        skipped_at_index=getattr(source, "skipped_at_index", 0),
        shard_size=end - start,
        name=name,
        max_bad=max_bad,
        distinct_captions=distinct_captions,
    )
