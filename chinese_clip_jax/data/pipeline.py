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
     tokenizes their captions with ``ChineseCLIPProcessor`` (context length 52, padded).

Pixels stay uint8 up to the device (a quarter of float32's bytes through the worker queues and
the host-to-device copy); the train step normalises them (``encoding.model_pixels``) with the
same table as ``normalize_pixels``. ``TrainIterator.get_state()`` is JSON-able: grain's iterator
state, the position inside the current chunk and the skip counters, so ``set_state`` continues
exactly (same batches, same counts).
"""

from __future__ import annotations

import base64
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
    "ImageDecoder",
    "CachingTokenizer",
    "LazyImages",
    "check_image",
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


class LazyImages:
    """Eval images read on demand: ``seq[i]`` -> ``source[keys[i]][field]`` (a raw image: base64
    text, encoded bytes or an array), so a split's pixels are never all in memory."""

    def __init__(self, source, keys, field):
        self.source, self.keys, self.field = source, list(keys), field

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int):
        return self.source[self.keys[i]][self.field]


def check_image(image) -> None:
    """Raises if a raw eval image (base64 text or encoded bytes) is not one PIL can identify;
    cheap (no full decode). Arrays pass."""
    if isinstance(image, np.ndarray):
        return
    if isinstance(image, str):
        image = base64.urlsafe_b64decode(image)
    with PIL.Image.open(io.BytesIO(image)) as im:
        im.verify()


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


class _DecodeChunk(grain.transforms.RandomMap):
    """grain map: CHUNK source indices -> one chunk (``_collate``) of their decoded records.

    Reading and decoding a whole chunk in one grain element keeps grain's per-element work
    (shuffle lookup, stats, rng) off each record; random crops draw, record after record, from
    the rng grain derives from (seed, chunk position), so they are resumable."""

    def __init__(self, source: Sequence, image_size: int, crop: str = "center", jpeg_draft: bool = False):
        self._source = source
        self._image = ImageDecoder(image_size, crop, jpeg_draft, uint8=True)

    def random_map(self, indices: np.ndarray, rng: np.random.Generator) -> dict:
        return _collate([self._record(int(i), rng) for i in indices])

    def _record(self, index: int, rng: np.random.Generator) -> dict:
        """-> {"pixel_values": uint8 (s, s, 3), "text": str, "bad": ""}, or for an undecodable
        record zeros, "" and "bad": "where: why" (never raises)."""
        where = f"record {index}"
        try:
            record = self._source[index]
            where = record.get("where", where)
            if record.get("error"):
                raise ValueError(record["error"])
            text = record["text"]
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"caption must be a non-empty string, got {text!r}")
            return {"pixel_values": self._image(record["image"], rng), "text": text, "bad": ""}
        except Exception as e:  # noqa: BLE001 - any undecodable sample is skipped and counted
            s = self._image.image_size
            return {
                "pixel_values": np.zeros((s, s, 3), np.uint8),
                "text": "",
                "bad": f"{where}: {type(e).__name__}: {e}",
            }


def _collate(records: Sequence[dict]) -> dict:
    """Decoded records (``_DecodeChunk._record``) -> one chunk {"pixel_values": uint8 (n, s, s, 3),
    "text": [n], "bad": [n]}: what crosses from grain's threads or worker processes (one message
    per CHUNK records)."""
    return {
        "pixel_values": np.stack([r["pixel_values"] for r in records]),
        "text": [r["text"] for r in records],
        "bad": [r["bad"] for r in records],
    }


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
    ):
        self._samples = samples
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

    def __next__(self) -> dict[str, np.ndarray]:
        runs: list[tuple[np.ndarray, int, int]] = []  # (chunk pixels, first row, end row): good rows taken
        texts: list[str] = []
        while len(texts) < self.batch_size:
            if self._chunk is None or self._used == len(self._chunk["bad"]):
                self._next_chunk()
            chunk, bad = self._chunk, self._chunk["bad"]
            stop = min(len(bad), self._used + self.batch_size - len(texts))
            first_bad = next((i for i in range(self._used, stop) if bad[i]), stop)
            if first_bad > self._used:  # good rows used..first_bad
                texts += chunk["text"][self._used : first_bad]
                runs.append((chunk["pixel_values"], self._used, first_bad))
                self._bad_in_a_row = 0
            self._used = first_bad
            if first_bad < stop:
                self._skip(bad[first_bad])
                self._used += 1
        self._yielded += len(texts)
        batch = self._encode_text(texts)
        batch["pixel_values"] = np.concatenate([pixels[lo:hi] for pixels, lo, hi in runs])
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
        return {"skipped": self._skipped, "skipped_at_index": self._skipped_at_index, "samples": self._yielded}

    def get_state(self) -> dict[str, Any]:
        """JSON-able state: grain's iterator state (before the chunk in use), the records of that
        chunk already used, and the counters."""
        partial = self._chunk is not None and self._used < len(self._chunk["bad"])
        return {
            "grain": self._chunk_state if partial else self._samples.get_state(),
            "chunk": CHUNK,
            "used": self._used if partial else 0,
            "skipped": self._skipped,
            "samples": self._yielded,
            "bad_in_a_row": self._bad_in_a_row,
        }

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
) -> TrainIterator:
    """The pipeline above over ``source`` for one process; ``batch_size`` is host-local.

    worker_count > 0 decodes and transforms in that many grain worker processes
    (``mp_prefetch``; each buffers ``worker_buffer_size`` samples); 0 uses ``num_threads``
    reader threads in this process. The batches are the same either way.
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
    ds = ds.random_map(_DecodeChunk(source, image_size, crop, jpeg_draft), seed=seed)

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
    )
