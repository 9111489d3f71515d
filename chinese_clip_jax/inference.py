"""High-level inference: jitted, batched, sharded text/image encoding and zero-shot classification.

    clip = ChineseCLIP.from_pretrained("path/to/checkpoint")   # or a hub id, or a cn_clip .pt
    text = clip.encode_text(["一只猫", "一只狗"])                 # (2, D) float32, L2-normalized
    image = clip.encode_image(["cat.jpg", pil_image, uint8_array])
    probs = clip.zero_shot(images, ["猫", "狗"])                 # (N_images, N_labels)

Batches are padded (by repeating the last item) to one of a few fixed sizes, `batch_size` and
its quarters down to one row per device, so any number of inputs reuses at most
`len(clip.bucket_sizes)` compiled functions per tower. With several local devices the batch
axis is sharded over a 1-D mesh of them and the params are replicated.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .modeling import ChineseCLIPModel, l2_normalize
from .processing import ChineseCLIPProcessor, ImageSettings
from .templates import CHINESE_TEMPLATES, fill

PROGRESS_MIN_BATCHES = 4  # a progress bar is shown (progress=None) from this many batches on


def bucket_sizes(batch_size: int, num_devices: int = 1) -> tuple[int, ...]:
    """The padded batch sizes used: batch_size, batch_size/4, ... down to num_devices (ascending).

    batch_size is first rounded up to a multiple of num_devices; every bucket is one too.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    top = -(-batch_size // num_devices) * num_devices
    sizes = {top}
    b = top
    while b > num_devices:
        b = max(num_devices, -(-(b // 4) // num_devices) * num_devices)
        sizes.add(b)
    return tuple(sorted(sizes))


class ChineseCLIP:
    """A model, its params and its processor, ready for batched inference.

    model: a ChineseCLIPModel; params: its (unboxed or boxed) params; processor: a
    ChineseCLIPProcessor whose image size matches the model (default: transformers' settings at
    the model's resolution). devices: the local devices to shard the batch over (default: all
    local devices). text_batch_size / image_batch_size: defaults of encode_text / encode_image.
    """

    def __init__(self, model: ChineseCLIPModel, params: Any, processor: ChineseCLIPProcessor | None = None,
                 *, devices: Sequence[jax.Device] | None = None, text_batch_size: int = 64,
                 image_batch_size: int = 32):
        import flax.linen as nn

        self.model = model
        self.config = model.config
        r = self.config.vision_config.image_size
        if processor is None:
            processor = ChineseCLIPProcessor(image_settings=ImageSettings(
                size={"shortest_edge": r}, crop_size={"height": r, "width": r}))
        if processor.image_size != (r, r):
            raise ValueError(f"the processor makes {processor.image_size} images but the model takes {(r, r)}; "
                             f"pass a processor with crop_size {r}")
        if len(processor.tokenizer) > self.config.text_config.vocab_size:
            raise ValueError(f"tokenizer has {len(processor.tokenizer)} tokens, the model's vocab only "
                             f"{self.config.text_config.vocab_size}")
        self.processor = processor
        self.devices = list(devices) if devices is not None else jax.local_devices()
        self.mesh = Mesh(np.array(self.devices), ("batch",))
        self._batch_sharding = NamedSharding(self.mesh, P("batch"))
        replicated = NamedSharding(self.mesh, P())
        self.params = jax.device_put(nn.unbox(params), replicated)
        self.text_batch_size = text_batch_size
        self.image_batch_size = image_batch_size
        self.trace_counts = {"text": 0, "image": 0}  # how often each tower was traced (= compiled)

        def text_fn(params, input_ids, attention_mask, token_type_ids):
            self.trace_counts["text"] += 1
            feats = model.apply({"params": params}, input_ids, attention_mask, token_type_ids,
                                method="get_text_features")
            return l2_normalize(feats)

        def image_fn(params, pixel_values):
            self.trace_counts["image"] += 1
            return l2_normalize(model.apply({"params": params}, pixel_values, method="get_image_features"))

        b = self._batch_sharding
        self._text_fn = jax.jit(text_fn, in_shardings=(replicated, b, b, b), out_shardings=b)
        self._image_fn = jax.jit(image_fn, in_shardings=(replicated, b), out_shardings=b)

    @classmethod
    def from_pretrained(cls, src: str | os.PathLike, dtype: Any = jnp.float32, *,
                        processor: ChineseCLIPProcessor | None = None, resize_mode: str = "processor",
                        arch: str | None = None, attention_impl: str | None = None, scan_layers: bool = False,
                        **kwargs) -> "ChineseCLIP":
        """Loads anything `ccj.from_pretrained` reads (HF dir, hub id, cn_clip .pt, our Flax dir).

        The processor comes from the checkpoint directory (its vocab and preprocessor_config.json)
        when it has them, else transformers' defaults at the model's resolution. dtype: compute
        dtype (e.g. jnp.bfloat16 on GPU/TPU). resize_mode="squash": cn_clip's eval transform.
        kwargs go to __init__ (devices, text_batch_size, image_batch_size).
        """
        from .conversion import from_pretrained as load

        model, params = load(src, dtype, arch=arch, scan_layers=scan_layers, attention_impl=attention_impl)
        if processor is None:
            processor = _processor_for(src, model.config.vision_config.image_size, resize_mode)
        return cls(model, params, processor, **kwargs)

    @property
    def logit_scale(self) -> float:
        """exp(logit_scale): the temperature-inverse multiplying cosine similarities."""
        return float(jnp.exp(self.params["logit_scale"]))

    def bucket_sizes(self, batch_size: int) -> tuple[int, ...]:
        return bucket_sizes(batch_size, len(self.devices))

    def encode_text(self, texts: str | Sequence[str], batch_size: int | None = None,
                    progress: bool | None = None) -> np.ndarray:
        """texts -> (N, projection_dim) float32, L2-normalized (context length of the processor)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        tokenize = self.processor.tokenize

        def run(chunk, padded_size):
            enc = tokenize(chunk)
            arrays = [_pad_rows(enc[k], padded_size) for k in ("input_ids", "attention_mask", "token_type_ids")]
            return self._text_fn(self.params, *arrays)

        return self._batched(texts, batch_size or self.text_batch_size, run, progress, "texts")

    def encode_image(self, images: Sequence[Any] | Any, batch_size: int | None = None,
                     progress: bool | None = None) -> np.ndarray:
        """Images (PIL images, uint8 arrays, paths) -> (N, projection_dim) float32, L2-normalized.

        images: one image, a sequence or iterable of them, or a uint8 (N, H, W, C) array.
        An unreadable image raises processing.ImageLoadError naming it and the reason.
        """
        if isinstance(images, (str, os.PathLike, PIL.Image.Image)) or (
                isinstance(images, np.ndarray) and images.ndim in (2, 3)):
            images = [images]
        offset = 0

        def run(chunk, padded_size):
            nonlocal offset
            pixels = self.processor.preprocess_images(chunk, start_index=offset)
            offset += len(chunk)
            return self._image_fn(self.params, _pad_rows(pixels, padded_size))

        return self._batched(list(images), batch_size or self.image_batch_size, run, progress, "images")

    def class_embeddings(self, labels: Sequence[str], templates: Sequence[str] | None = None,
                         batch_size: int | None = None) -> np.ndarray:
        """(N_labels, D): each label embedded in every template, averaged, L2-normalized."""
        labels = list(labels)
        templates = list(CHINESE_TEMPLATES if templates is None else templates)
        if not labels or not templates:
            raise ValueError("zero-shot needs at least one label and one template")
        prompts = [fill(t, str(label)) for label in labels for t in templates]
        emb = self.encode_text(prompts, batch_size).reshape(len(labels), len(templates), -1).mean(axis=1)
        return emb / np.linalg.norm(emb, axis=-1, keepdims=True)

    def zero_shot(self, images, labels: Sequence[str], templates: Sequence[str] | None = None,
                  batch_size: int | None = None) -> np.ndarray:
        """(N_images, N_labels) probabilities: softmax over labels of exp(logit_scale) * cosine.

        templates: strings with one "{}" (default: templates.CHINESE_TEMPLATES).
        """
        classes = self.class_embeddings(labels, templates)
        image = self.encode_image(images, batch_size)
        logits = self.logit_scale * (image @ classes.T)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)

    def _batched(self, items: list, batch_size: int, run: Callable, progress: bool | None,
                 unit: str) -> np.ndarray:
        if not items:
            return np.zeros((0, self.config.projection_dim), np.float32)
        sizes = self.bucket_sizes(batch_size)
        step = sizes[-1]
        starts = range(0, len(items), step)
        show = len(starts) >= PROGRESS_MIN_BATCHES if progress is None else progress
        if show:
            from tqdm.auto import tqdm

            starts = tqdm(starts, total=len(starts), unit="batch", desc=f"encoding {len(items)} {unit}")
        outputs = []
        for s in starts:
            chunk = items[s:s + step]
            padded = next(b for b in sizes if b >= len(chunk))
            # dispatch is asynchronous: the host prepares the next batch while the device runs
            outputs.append((run(chunk, padded), len(chunk)))
        return np.concatenate([np.asarray(out)[:n] for out, n in outputs])


def _pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    """Pads axis 0 to `size` by repeating the last row (padding rows are valid inputs)."""
    if len(x) == size:
        return x
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])


def _processor_for(src, resolution: int, resize_mode: str) -> ChineseCLIPProcessor:
    """The checkpoint's own processor when its directory (or hub repo) has the files."""
    from .hub import is_hub_id
    from .image_settings import read_image_settings

    default = ImageSettings.at_resolution(resolution)
    path = os.fspath(src)
    directory = path if os.path.isdir(path) or is_hub_id(path) else None  # a hub id: the small files download
    if directory is None:  # e.g. a cn_clip .pt file: no processor files
        return ChineseCLIPProcessor(image_settings=default, resize_mode=resize_mode)
    kwargs = {}
    if os.path.isdir(directory) and read_image_settings(directory) is None:
        kwargs["image_settings"] = default
    return ChineseCLIPProcessor.from_pretrained(directory, resize_mode=resize_mode, **kwargs)
