"""Queries -> embeddings: texts tokenized, uploads decoded, both micro-batched onto the device.

    queries = QueryEncoder(clip, max_batch=16, max_wait_ms=5)
    text = queries.text_query("海边的日落")                 # tokens, truncated or not
    vector = await asyncio.wrap_future(queries.texts.submit(text))
    pixels = queries.image_query(upload_bytes)             # ServeError 400 when not an image
    vector = await asyncio.wrap_future(queries.images.submit(pixels))

Embedding goes through the model's ``encoding.Encoder`` (jitted; batches padded to its buckets,
``bucket_sizes(max_batch)``), so a burst of any size reuses the functions compiled at start-up
(``warm_up``); ``compiles()`` counts the traces so far. A text and an image are tokenized and
resized exactly as ``ChineseCLIP.encode_text`` / ``encode_image`` (and so ``ccj-embed query``)
do, so the service returns the ids and scores of ``ccj-embed query``.
"""

from __future__ import annotations

import dataclasses
import io
import time

import numpy as np
import PIL.Image
import PIL.ImageOps

from .batcher import MicroBatcher
from .catalog import ServeError

__all__ = ["QueryEncoder", "TextQuery", "MAX_QUERY_CHARS", "MAX_IMAGE_PIXELS"]

MAX_QUERY_CHARS = 100_000  # longer queries are refused before tokenizing (they are cut to 52 tokens anyway)
MAX_IMAGE_PIXELS = 50_000_000  # an upload's width x height (a small PNG can claim a huge canvas)


@dataclasses.dataclass(frozen=True)
class TextQuery:
    text: str
    tokens: int  # the query's tokens with [CLS] and [SEP], before truncation
    truncated: bool
    arrays: tuple  # (input_ids, attention_mask, token_type_ids), each (context_length,) int32


class QueryEncoder:
    """clip: a ``ChineseCLIP`` (model, params on the devices, its processor)."""

    def __init__(self, clip, *, max_batch: int = 16, max_wait_ms: float = 5.0, max_queue: int = 256):
        self.clip = clip
        self.processor = clip.processor
        self.context_length = self.processor.context_length
        self.max_batch = max_batch
        self._empty_tokens = len(self.processor.tokenize([""], truncation=False)["input_ids"][0])  # [CLS] [SEP]
        self.texts = MicroBatcher(
            self._encode_texts, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, name="text queries"
        )
        self.images = MicroBatcher(
            self._encode_images, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, name="image queries"
        )

    def close(self) -> None:
        self.texts.close()
        self.images.close()

    def compiles(self) -> dict:
        """{"text": n, "image": m}: how often each tower was traced (= compiled) so far."""
        return dict(self.clip.encoder.trace_counts)

    def buckets(self) -> tuple[int, ...]:
        return self.clip.encoder.bucket_sizes(self.max_batch)

    # ---------------------------------------------------------------- texts

    def text_query(self, text: str) -> TextQuery:
        """Tokenized as ``ChineseCLIP.encode_text`` does; ServeError 400 for an empty query."""
        if not text or not text.strip():
            raise ServeError("q is empty: give a text to search for")
        if len(text) > MAX_QUERY_CHARS:
            raise ServeError(f"q is {len(text)} characters, above the limit of {MAX_QUERY_CHARS}")
        try:
            full = self.processor.tokenize([text], truncation=False)
            tok = self.processor.tokenize([text])
        except ValueError as e:  # e.g. a lone surrogate
            raise ServeError(f"q cannot be tokenized: {str(e).splitlines()[0]}") from e
        n = len(full["input_ids"][0])
        if n <= self._empty_tokens:  # e.g. only control characters, which the tokenizer drops
            raise ServeError(f"q is empty once tokenized ({text[:20]!r}): give a text to search for")
        arrays = tuple(np.asarray(tok[key][0], np.int32) for key in ("input_ids", "attention_mask", "token_type_ids"))
        return TextQuery(text, n, n > self.context_length, arrays)

    def _encode_texts(self, queries: list[TextQuery]) -> list[np.ndarray]:
        ids, mask, types = (np.stack([q.arrays[i] for q in queries]) for i in range(3))
        out = self.clip.encoder.encode_text(ids, mask, types, batch_size=self.max_batch, progress=False)
        return list(out)

    # ---------------------------------------------------------------- images

    def image_query(self, data: bytes) -> np.ndarray:
        """An uploaded file -> (3, H, W) float32 pixels, resized as ``ChineseCLIP.encode_image``
        resizes a file (EXIF rotation, RGB, the processor's resize); ServeError 400 naming the
        problem for an empty, truncated or non-image upload."""
        if not data:
            raise ServeError("the upload is empty (0 bytes): send the image file as the request body")
        try:
            img = PIL.Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise ServeError(f"the image is {w}x{h} pixels, above the limit of {MAX_IMAGE_PIXELS} pixels", 413)
            img.load()
            img = PIL.ImageOps.exif_transpose(img)
        except ServeError:
            raise
        except PIL.UnidentifiedImageError:
            raise ServeError(f"the upload ({len(data)} bytes) is not an image PIL can read") from None
        except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as e:
            raise ServeError(f"the image cannot be decoded ({len(data)} bytes): {type(e).__name__}: {e}") from None
        if self.processor.image_processor.resize_mode != "squash":
            img = img.convert("RGB")  # as for a file: alpha dropped, not composited
        try:
            return self.processor.preprocess_images([img])[0]
        except ValueError as e:
            raise ServeError(f"the image cannot be used: {str(e).splitlines()[0]}") from None

    def _encode_images(self, pixels: list[np.ndarray]) -> list[np.ndarray]:
        out = self.clip.encoder.encode_pixels(np.stack(pixels), batch_size=self.max_batch, progress=False)
        return list(out)

    # ---------------------------------------------------------------- start-up

    def warm_up(self, images: bool = True) -> float:
        """Compiles every bucket of the towers in use (so no request ever waits on a compile);
        returns the seconds it took."""
        t0 = time.perf_counter()
        q = self.text_query("热身")
        r = self.clip.config.vision_config.image_size
        blank = np.zeros((3, r, r), np.float32)
        for b in self.buckets():
            self._encode_texts([q] * b)
            if images:
                self._encode_images([blank] * b)
        return time.perf_counter() - t0
