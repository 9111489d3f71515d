"""Params -> L2-normalized embeddings: the one place inference, evaluation and in-training eval embed.

    enc = Encoder(model, params, mesh)            # mesh: sharding.make_mesh(...); params placed on it
    text = enc.encode_text(input_ids, attention_mask)          # (N, D) float32 numpy
    image = enc.encode_images(items, preprocess)               # streamed: decoded batch by batch
    classes = enc.class_embeddings(labels, templates, tokenize)  # prompt ensemble, (C, D)

``text_embeddings`` / ``image_embeddings`` are the pure functions (the train step calls them
with dropout); ``text_fn`` / ``image_fn`` jit them for a model, as pure functions of
``(params, inputs)`` to drop into your own JAX code; ``pad_to_bucket`` pads a batch to a fixed
size (and says how many rows are real); ``cast_params`` halves the params' memory.
``Encoder`` jits them with the batch axis sharded over the mesh's ("data", "fsdp") axes and
the params as the mesh's rules shard them (replicated on a data-only mesh).
Every process passes the same full host batch; embeddings come back to every process.

Batches are padded (by repeating the last row) to one of a few fixed sizes, ``batch_size`` and
its quarters down to one row per batch shard, so any number of inputs reuses at most
``len(bucket_sizes(...))`` compiled functions per tower. Images are never all in memory: each
batch is loaded, preprocessed, embedded and dropped, and the host prepares batch i+1 while
the devices run batch i.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import sharding as shd
from ..modeling import l2_normalize
from ..processing.image import default_normalize_table

__all__ = [
    "text_embeddings",
    "image_embeddings",
    "text_fn",
    "image_fn",
    "model_pixels",
    "cast_params",
    "bucket_sizes",
    "pad_to_bucket",
    "ensemble",
    "Encoder",
    "PROGRESS_MIN_BATCHES",
]

PROGRESS_MIN_BATCHES = 4  # a progress bar is shown (progress=None) from this many batches on


def text_embeddings(
    model, params, input_ids, attention_mask, token_type_ids=None, *, deterministic=True, rng=None
) -> jax.Array:
    """(N, L) token ids -> (N, D) float32 L2-normalized text embeddings (pure; jit it yourself)."""
    feats = model.apply(
        {"params": params},
        input_ids,
        attention_mask,
        token_type_ids,
        deterministic=deterministic,
        rngs=None if rng is None else {"dropout": rng},
        method="get_text_features",
    )
    return l2_normalize(feats)


def model_pixels(pixel_values, table=None) -> jax.Array:
    """uint8 images, (N, H, W, 3) (the training pipeline's batches) or (N, 3, H, W) -> float32
    (N, 3, H, W) model input, rescaled and normalized on the device through a (3, 256) lookup
    table: ``table`` (e.g. ``ImagePreprocessor(settings).table`` for a checkpoint's own mean/std)
    or by default ``normalize_pixels``' (transformers' default settings; bit-equal to the host).
    A trailing axis of 3 means NHWC. Float pixel values pass through unchanged; other integer
    dtypes are refused."""
    if not hasattr(pixel_values, "dtype"):
        pixel_values = np.asarray(pixel_values)
    if jnp.issubdtype(pixel_values.dtype, jnp.floating):
        return pixel_values
    pixel_values = jnp.asarray(pixel_values)
    if pixel_values.dtype != jnp.uint8:
        raise TypeError(f"integer pixels must be uint8 (0..255), got {pixel_values.dtype.name}")
    if pixel_values.ndim != 4 or 3 not in (pixel_values.shape[1], pixel_values.shape[-1]):
        raise ValueError(f"uint8 images must be (N, H, W, 3) or (N, 3, H, W), got {pixel_values.shape}")
    channel_axis = 3 if pixel_values.shape[-1] == 3 else 1
    table = jnp.asarray(default_normalize_table() if table is None else table, jnp.float32)
    if table.shape != (3, 256):
        raise ValueError(f"table must be (3, 256) (channel, grey level), got {table.shape}")
    channels = [jnp.take(pixel_values, c, axis=channel_axis) for c in range(3)]
    return jnp.stack([table[c][x] for c, x in enumerate(channels)], axis=1)


def image_embeddings(model, params, pixel_values, *, deterministic=True, rng=None) -> jax.Array:
    """(N, 3, H, W) float pixel values, or uint8 images (``model_pixels``) -> (N, D) float32
    L2-normalized image embeddings (pure). rng: the dropout key when ``deterministic=False``."""
    pixel_values = model_pixels(pixel_values)
    feats = model.apply(
        {"params": params},
        pixel_values,
        deterministic=deterministic,
        rngs=None if rng is None else {"dropout": rng},
        method="get_image_features",
    )
    return l2_normalize(feats)


def text_fn(model) -> Callable[..., jax.Array]:
    """``jax.jit`` of ``text_embeddings`` for ``model``: ``fn(params, input_ids, attention_mask,
    token_type_ids=None) -> (N, D)`` float32, L2-normalized. Pure in params: pass sharded params
    (``sharding.shard_params``) and sharded inputs and it runs sharded; each new input shape
    compiles once (``pad_to_bucket`` keeps the shapes few)."""

    def fn(params, input_ids, attention_mask, token_type_ids=None):
        return text_embeddings(model, params, input_ids, attention_mask, token_type_ids)

    return jax.jit(fn)


def image_fn(model) -> Callable[..., jax.Array]:
    """``jax.jit`` of ``image_embeddings`` for ``model``: ``fn(params, pixel_values) -> (N, D)``
    float32, L2-normalized; pixel_values float NCHW, or uint8 NHWC/NCHW (``model_pixels``)."""

    def fn(params, pixel_values):
        return image_embeddings(model, params, pixel_values)

    return jax.jit(fn)


def cast_params(params, dtype=jnp.bfloat16):
    """Every floating param of two or more dimensions (kernels, embeddings) cast to ``dtype``;
    scalars (``logit_scale``, ``logit_bias``) and vectors (biases, LayerNorm) stay as they are.
    For inference memory: bf16 halves it; the model's LayerNorm statistics, softmax and logits
    still run in fp32. Training keeps fp32 params (the optimizer updates them)."""

    def cast(x):
        x = jnp.asarray(x) if not hasattr(x, "dtype") else x
        if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim >= 2:
            return x.astype(dtype)
        return x

    import flax.linen as nn

    return jax.tree.map(cast, nn.unbox(params))


def bucket_sizes(batch_size: int, num_shards: int = 1) -> tuple[int, ...]:
    """The padded batch sizes used: batch_size, batch_size/4, ... down to num_shards (ascending).

    batch_size is first rounded up to a multiple of num_shards; every bucket is one too.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    top = -(-batch_size // num_shards) * num_shards
    sizes = {top}
    b = top
    while b > num_shards:
        b = max(num_shards, -(-(b // 4) // num_shards) * num_shards)
        sizes.add(b)
    return tuple(sorted(sizes))


def ensemble(prompt_embeds: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """Prompt ensembling: consecutive groups of ``counts[c]`` normalized prompt embeddings ->
    their mean, renormalized, one row per class (C, D)."""
    out, i = [], 0
    for n in counts:
        if n < 1:
            raise ValueError("every class needs at least one prompt")
        m = np.asarray(prompt_embeds[i : i + n], np.float64).mean(axis=0)
        out.append(m / np.linalg.norm(m))
        i += n
    return np.stack(out).astype(np.float32)


def pad_to_bucket(batch, buckets: Sequence[int]):
    """Pads a batch to the smallest of ``buckets`` that holds it, by repeating its last row
    (padding rows are valid inputs, so no NaN can come from them); returns ``(padded, n)``, n
    the number of real rows: keep ``out[:n]``. ``batch``: an array or a pytree (dict, tuple) of
    arrays sharing their leading axis. ``buckets``: e.g. ``bucket_sizes(64, num_devices)``: a
    jitted function then compiles at most ``len(buckets)`` times, whatever the batch sizes."""
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError("pad_to_bucket needs at least one array")
    sizes = {len(x) for x in leaves}
    if len(sizes) > 1:
        raise ValueError(f"the arrays of the batch have different leading sizes {sorted(sizes)}")
    (n,) = sizes
    if n == 0:
        raise ValueError("cannot pad an empty batch (no row to repeat)")
    fits = [b for b in sorted(buckets) if b >= n]
    if not fits:
        raise ValueError(f"a batch of {n} rows is larger than the largest bucket {max(buckets)}; split it first")
    return jax.tree.map(lambda x: _pad_rows(np.asarray(x), fits[0]), batch), n


def _pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    """Pads axis 0 to `size` by repeating the last row (padding rows are valid inputs)."""
    if len(x) == size:
        return x
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])


def _place(x: np.ndarray, sharding) -> jax.Array:
    """A full host array (the same on every process) -> a global array with ``sharding``."""
    x = np.ascontiguousarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


class Encoder:
    """Jitted, batch-sharded text and image embedders of one model on one mesh.

    model: a ChineseCLIPModel. params: its params (boxed or not); they are placed with
    ``param_shardings`` (default: the mesh's rules table, i.e. replicated on a data-only mesh) unless already
    placed so. mesh: a ``sharding.make_mesh``
    mesh (default: every local device on "data"). batch_size: default rows per call.
    """

    def __init__(self, model, params=None, mesh=None, *, param_shardings=None, batch_size: int = 64):
        import flax.linen as nn

        self.model = model
        self.mesh = mesh if mesh is not None else shd.make_mesh(devices=jax.local_devices())
        self.num_shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self.batch_size = batch_size
        self.dim = model.config.projection_dim
        self._batch = shd.batch_sharding(self.mesh)
        rep = shd.replicated(self.mesh)
        if param_shardings is None:
            param_shardings = jax.tree.map(lambda _: rep, nn.unbox(params))
        self.param_shardings = param_shardings
        self.params = None if params is None else jax.device_put(nn.unbox(params), param_shardings)
        self.trace_counts = {"text": 0, "image": 0}  # how often each tower was traced (= compiled)

        def text_fn(params, input_ids, attention_mask, token_type_ids):
            self.trace_counts["text"] += 1
            return text_embeddings(model, params, input_ids, attention_mask, token_type_ids)

        def image_fn(params, pixel_values):
            self.trace_counts["image"] += 1
            return image_embeddings(model, params, pixel_values)

        b = self._batch
        self._text_fn = jax.jit(text_fn, in_shardings=(param_shardings, b, b, b), out_shardings=rep)
        self._image_fn = jax.jit(image_fn, in_shardings=(param_shardings, b), out_shardings=rep)

    def bucket_sizes(self, batch_size: int | None = None) -> tuple[int, ...]:
        return bucket_sizes(batch_size or self.batch_size, self.num_shards)

    def _params(self, params):
        return self.params if params is None else params

    def encode_text(
        self,
        input_ids,
        attention_mask,
        token_type_ids=None,
        *,
        params=None,
        batch_size: int | None = None,
        progress: bool | None = None,
        desc: str = "texts",
    ) -> np.ndarray:
        """Token arrays (N, L) -> (N, D) float32 numpy, L2-normalized."""
        input_ids = np.asarray(input_ids, np.int32)
        attention_mask = np.asarray(attention_mask, np.int32)
        token_type_ids = np.zeros_like(input_ids) if token_type_ids is None else np.asarray(token_type_ids, np.int32)
        p = self._params(params)

        def run(start, stop, size):
            arrays = [
                _place(_pad_rows(a[start:stop], size), self._batch) for a in (input_ids, attention_mask, token_type_ids)
            ]
            with shd.use_mesh_and_rules(self.mesh):
                return self._text_fn(p, *arrays)

        return self._batched(len(input_ids), batch_size, run, progress, desc)

    def encode_pixels(
        self, pixel_values, *, params=None, batch_size: int | None = None, progress: bool | None = None
    ) -> np.ndarray:
        """Preprocessed pixel values (N, 3, H, W) -> (N, D) float32 numpy, L2-normalized."""
        pixel_values = np.asarray(pixel_values, np.float32)
        return self.encode_images(
            pixel_values,
            lambda chunk, start: np.asarray(chunk),
            params=params,
            batch_size=batch_size,
            progress=progress,
        )

    def encode_images(
        self,
        items: Sequence[Any],
        preprocess: Callable[[Sequence[Any], int], np.ndarray],
        *,
        params=None,
        batch_size: int | None = None,
        progress: bool | None = None,
        desc: str = "images",
    ) -> np.ndarray:
        """Streams ``items`` (any random-access sequence: paths, PIL images, encoded bytes, ...).

        ``preprocess(items[s:e], s)`` -> float32 (e - s, 3, H, W), or uint8 (e - s, H, W, 3)
        images that the device normalises (``model_pixels``), is called one batch at a time, so
        only a batch of pixels is ever in host memory. Returns (N, D) float32 numpy.
        """
        p = self._params(params)

        def run(start, stop, size):
            chunk = (
                items[start:stop]
                if isinstance(items, (list, tuple, np.ndarray))
                else [items[i] for i in range(start, stop)]
            )
            pixels = np.asarray(preprocess(chunk, start))
            if pixels.dtype != np.uint8:  # uint8 images stay uint8 up to the device (model_pixels)
                pixels = pixels.astype(np.float32, copy=False)
            with shd.use_mesh_and_rules(self.mesh):
                return self._image_fn(p, _place(_pad_rows(pixels, size), self._batch))

        return self._batched(len(items), batch_size, run, progress, desc)

    def class_embeddings(
        self,
        class_prompts: Sequence[Sequence[str]],
        tokenize: Callable[[list[str]], dict],
        *,
        params=None,
        batch_size: int | None = None,
        progress: bool | None = None,
    ) -> np.ndarray:
        """Prompt-ensemble class embeddings: every prompt of class c embedded, averaged,
        renormalized -> (C, D). ``tokenize(texts)`` -> {"input_ids", "attention_mask", ...}."""
        flat = [t for prompts in class_prompts for t in prompts]
        if not flat:
            raise ValueError("zero-shot needs at least one class and one prompt per class")
        tok = tokenize(flat)
        emb = self.encode_text(
            tok["input_ids"],
            tok["attention_mask"],
            tok.get("token_type_ids"),
            params=params,
            batch_size=batch_size,
            progress=progress,
            desc="prompts",
        )
        return ensemble(emb, [len(p) for p in class_prompts])

    def _batched(self, n: int, batch_size: int | None, run: Callable, progress: bool | None, unit: str) -> np.ndarray:
        if n == 0:
            return np.zeros((0, self.dim), np.float32)
        sizes = self.bucket_sizes(batch_size)
        step = sizes[-1]
        starts: Iterable[int] = range(0, n, step)
        show = len(starts) >= PROGRESS_MIN_BATCHES if progress is None else progress
        bar = None
        if show and jax.process_index() == 0:
            from ..console import progress_bar

            bar = progress_bar(total=n, unit=unit.split()[-1], desc=f"encoding {n} {unit}", dynamic_ncols=True)
        out = np.empty((n, self.dim), np.float32)
        pending = None  # (device array, start, stop): read after the next batch is dispatched
        try:
            for s in starts:
                e = min(n, s + step)
                padded = next(b for b in sizes if b >= e - s)
                current = (run(s, e, padded), s, e)
                if pending is not None:
                    self._collect(out, pending, bar)
                pending = current
            self._collect(out, pending, bar)
        finally:
            if bar is not None:
                bar.close()
        return out

    @staticmethod
    def _collect(out, pending, bar):
        emb, s, e = pending
        out[s:e] = np.asarray(emb)[: e - s]
        if bar is not None:
            bar.update(e - s)
