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
  3. decodes each record in grain's reader threads to float32 pixel values (3, s, s) normalised
     with the CLIP mean/std; an undecodable record becomes a marker, never an exception;
  4. in :class:`TrainIterator`, skips and counts markers (logged), stacks ``b`` good samples and
     tokenizes their captions with ``ChineseCLIPProcessor`` (context length 52, padded).

``TrainIterator.get_state()`` is JSON-able: grain's iterator state plus the skip counters, so
``set_state`` continues exactly (same batches, same counts).
"""

from __future__ import annotations

import base64
import io
import logging
from typing import Any, Callable, Sequence

import grain
import numpy as np
import PIL.Image

from chinese_clip_jax.processing import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ChineseCLIPProcessor,
    ImageSettings,
)

__all__ = ["TrainIterator", "build_train_iterator", "normalize_pixels", "ImageDecoder", "TextEncoder"]

logger = logging.getLogger(__name__)
_LOG_FIRST = 10  # log every skipped sample up to this many, then every _LOG_EVERY-th
_LOG_EVERY = 100

_MEAN = np.asarray(OPENAI_CLIP_MEAN, np.float32)
_STD = np.asarray(OPENAI_CLIP_STD, np.float32)


def normalize_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W): (x / 255 - mean) / std, CLIP mean/std."""
    x = images.astype(np.float32) / np.float32(255.0)
    x = (x - _MEAN) / _STD
    return np.moveaxis(x, -1, -3)


class ImageDecoder:
    """Raw image -> float32 (3, s, s): resize shortest edge to s (bicubic), center crop, normalise.

    Arrays already of size (s, s, 3) are only normalised; everything else goes through the
    processor's PIL path (identical to transformers' ChineseCLIPImageProcessor).
    """

    def __init__(self, image_size: int):
        self.image_size = int(image_size)
        self._processor = ChineseCLIPProcessor(image_settings=ImageSettings.at_resolution(self.image_size),
                                               num_threads=1).image_processor

    def __call__(self, image: Any) -> np.ndarray:
        s = self.image_size
        if isinstance(image, np.ndarray) and image.shape == (s, s, 3) and image.dtype == np.uint8:
            return normalize_pixels(image)
        if isinstance(image, str):
            image = base64.urlsafe_b64decode(image)  # cn_clip's encoding; accepts plain base64 too
        if isinstance(image, (bytes, bytearray, memoryview)):
            image = PIL.Image.open(io.BytesIO(image))
            image.load()
        return self._processor(image)[0]


class _Decode:
    """grain map: raw record -> {"pixel_values", "text"} or {"bad": "where: why"} (never raises)."""

    def __init__(self, image_size: int):
        self._image = ImageDecoder(image_size)

    def __call__(self, record: dict) -> dict:
        where = record.get("where", "?") if isinstance(record, dict) else "?"
        try:
            if record.get("error"):
                raise ValueError(record["error"])
            text = record["text"]
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"caption must be a non-empty string, got {text!r}")
            return {"pixel_values": self._image(record["image"]), "text": text}
        except Exception as e:  # noqa: BLE001 - any undecodable sample is skipped and counted
            return {"bad": f"{where}: {type(e).__name__}: {e}"}


class TextEncoder:
    """Captions -> {"input_ids", "attention_mask"} int32 (n, L) with the Chinese-CLIP tokenizer.

    Tokenized in the calling thread (tokenizers are not thread-safe), with a bounded cache.
    """

    def __init__(self, context_length: int = 52, cache_size: int = 100_000):
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
    "pixel_values": float32 (b, 3, s, s)}. ``it.stats`` -> {"skipped": undecodable samples
    skipped so far, "skipped_at_index": records dropped while indexing the source,
    "samples": good samples yielded}.
    """

    def __init__(self, samples: grain.DatasetIterator, *, batch_size: int, encode_text: Callable,
                 skipped_at_index: int = 0, shard_size: int | None = None, name: str = "data"):
        self._samples = samples
        self._shard_size = shard_size
        self.batch_size = int(batch_size)
        self._encode_text = encode_text
        self._name = name
        self._skipped = 0
        self._yielded = 0
        self._skipped_at_index = int(skipped_at_index)

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        pixels, texts = [], []
        bad_in_a_row = 0
        while len(texts) < self.batch_size:
            sample = next(self._samples)
            if "bad" in sample:
                self._skipped += 1
                bad_in_a_row += 1
                if self._shard_size is not None and bad_in_a_row >= max(self._shard_size, 1):
                    raise RuntimeError(f"{self._name}: a whole epoch ({bad_in_a_row} samples) in a row "
                                       f"could not be decoded; last: {sample['bad']}")
                if self._skipped <= _LOG_FIRST or self._skipped % _LOG_EVERY == 0:
                    logger.warning("%s: skipped undecodable sample %s (%d skipped so far)",
                                   self._name, sample["bad"], self._skipped)
                continue
            pixels.append(sample["pixel_values"])
            texts.append(sample["text"])
        self._yielded += len(texts)
        batch = self._encode_text(texts)
        batch["pixel_values"] = np.stack(pixels).astype(np.float32, copy=False)
        return batch

    @property
    def stats(self) -> dict[str, int]:
        return {"skipped": self._skipped, "skipped_at_index": self._skipped_at_index,
                "samples": self._yielded}

    def get_state(self) -> dict[str, Any]:
        """JSON-able state: grain's iterator state plus the counters."""
        return {"grain": self._samples.get_state(), "skipped": self._skipped, "samples": self._yielded}

    def close(self) -> None:
        """Stops grain's reader threads."""
        self._samples.close()

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a state from ``get_state`` (possibly after a JSON round trip)."""
        missing = {"grain", "skipped", "samples"} - set(state)
        if missing:
            raise ValueError(f"{self._name}: iterator state lacks keys {sorted(missing)}; got {sorted(state)}")
        self._samples.set_state(state["grain"])
        self._skipped = int(state["skipped"])
        self._yielded = int(state["samples"])


def shard_range(num_records: int, shard: grain.sharding.ShardOptions) -> tuple[int, int]:
    """[start, end) of this shard: contiguous, sizes differ by at most one, union is everything."""
    per, rem = divmod(num_records, shard.shard_count)
    start = per * shard.shard_index + min(shard.shard_index, rem)
    return start, start + per + (1 if shard.shard_index < rem else 0)


def build_train_iterator(source: Sequence, *, batch_size: int, seed: int, image_size: int,
                         context_length: int, shard: grain.sharding.ShardOptions,
                         num_threads: int = 2, prefetch_buffer_size: int = 256,
                         name: str = "data") -> TrainIterator:
    """The pipeline above over ``source`` for one process; ``batch_size`` is host-local."""
    if not 0 <= seed < 2**32:
        raise ValueError(f"{name}: seed must be in [0, 2**32), got {seed}")
    start, end = shard_range(len(source), shard)
    if end - start < 1:
        raise ValueError(f"{name}: {len(source)} records cannot feed {shard.shard_count} processes")
    ds = grain.MapDataset.source(source)[start:end]
    ds = ds.shuffle(seed=seed).repeat(None).map(_Decode(image_size))
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
    samples = ds.to_iter_dataset(read).__iter__()
    return TrainIterator(samples, batch_size=batch_size, encode_text=TextEncoder(context_length),
                         skipped_at_index=getattr(source, "skipped_at_index", 0),
                         shard_size=end - start, name=name)
