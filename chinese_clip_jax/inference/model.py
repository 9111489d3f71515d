"""High-level inference: jitted, batched, sharded text/image encoding and zero-shot classification.

    clip = ChineseCLIP.from_pretrained("path/to/checkpoint")   # or a hub id, or a cn_clip .pt
    text = clip.encode_text(["一只猫", "一只狗"])                 # (2, D) float32, L2-normalized
    image = clip.encode_image(["cat.jpg", pil_image, uint8_array])
    probs = clip.zero_shot(images, ["猫", "狗"])                 # (N_images, N_labels)
    clip = ChineseCLIP.from_pretrained(src, calibration="calibration.json")  # ccj-eval calibrate
    p = clip.match(images, texts)                               # (N,) P(image i matches text i)

Embedding goes through ``encoding.Encoder`` (jitted, bucketed padding, the batch axis sharded
over a ``sharding.make_mesh`` mesh of the given local devices, params replicated).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image

from .. import sharding as shd
from ..modeling import ChineseCLIPModel
from ..processing import ChineseCLIPProcessor, ImageSettings
from ..processing.templates import CHINESE_TEMPLATES, fill
from . import encoding
from .calibration import Calibration, read_calibration


class ChineseCLIP:
    """A model, its params and its processor, ready for batched inference.

    model: a ChineseCLIPModel; params: its (unboxed or boxed) params; processor: a
    ChineseCLIPProcessor whose image size matches the model (default: transformers' settings at
    the model's resolution). devices: the local devices to shard the batch over (default: all
    local devices). text_batch_size / image_batch_size: defaults of encode_text / encode_image.
    calibration: a ``ccj-eval calibrate`` file (or a ``calibration.Calibration``) for ``match``.

    Batches are padded to ``bucket_sizes(batch_size)`` rows (as ``encoding.pad_to_bucket`` pads), so each
    tower compiles at most once per bucket; ``trace_counts`` ({"text": n, "image": m}) counts
    the traces (= compilations) so far. ``model`` and ``params`` are the Flax module and its
    params on the devices: jit your own functions of them (docs/jax.md).
    """

    def __init__(
        self,
        model: ChineseCLIPModel,
        params: Any,
        processor: ChineseCLIPProcessor | None = None,
        *,
        devices: Sequence[jax.Device] | None = None,
        text_batch_size: int = 64,
        image_batch_size: int = 32,
        calibration: str | os.PathLike | Calibration | None = None,
    ):
        if calibration is not None and not isinstance(calibration, Calibration):
            calibration = read_calibration(calibration)  # a bad file fails before the model is placed
        self.calibration = calibration
        self.model = model
        self.config = model.config
        r = self.config.vision_config.image_size
        if processor is None:
            processor = ChineseCLIPProcessor(image_settings=ImageSettings.at_resolution(r))
        if processor.image_size != (r, r):
            raise ValueError(
                f"the processor makes {processor.image_size} images but the model takes {(r, r)}; "
                f"pass a processor with crop_size {r}"
            )
        if len(processor.tokenizer) > self.config.text_config.vocab_size:
            raise ValueError(
                f"tokenizer has {len(processor.tokenizer)} tokens, the model's vocab only "
                f"{self.config.text_config.vocab_size}"
            )
        self.processor = processor
        self.devices = list(devices) if devices is not None else jax.local_devices()
        self.mesh = shd.make_mesh(devices=self.devices)
        self.encoder = encoding.Encoder(model, params, self.mesh)
        self.params = self.encoder.params
        self.text_batch_size = text_batch_size
        self.image_batch_size = image_batch_size
        self.trace_counts = self.encoder.trace_counts  # how often each tower was traced (= compiled)
        self._text_fn = self.encoder._text_fn
        self._image_fn = self.encoder._image_fn

    @classmethod
    def from_pretrained(
        cls,
        src: str | os.PathLike,
        dtype: Any = jnp.float32,
        *,
        processor: ChineseCLIPProcessor | None = None,
        resize_mode: str = "center",
        arch: str | None = None,
        attention_impl: str | None = None,
        scan_layers: bool = False,
        image_size: int | None = None,
        precision: str | None = None,
        **kwargs,
    ) -> ChineseCLIP:
        """Loads anything `ccj.from_pretrained` reads (HF dir, hub id, cn_clip .pt, our Flax dir).

        The processor comes from the checkpoint directory (its vocab and preprocessor_config.json)
        when it has them, else transformers' defaults at the model's resolution. dtype: compute
        dtype (e.g. jnp.bfloat16 on GPU/TPU). precision="highest": fp32 matmuls, for 1e-4 parity
        with PyTorch fp32 on GPU/TPU. resize_mode="squash": cn_clip's eval transform.
        image_size: run a ViT at another resolution (position embeddings resized once; the
        processor then makes images of that size). kwargs go to __init__ (devices,
        text_batch_size, image_batch_size, calibration: a ``ccj-eval calibrate`` file for
        ``match``, read before the weights load).
        """
        if kwargs.get("calibration") is not None and not isinstance(kwargs["calibration"], Calibration):
            kwargs["calibration"] = read_calibration(kwargs["calibration"])
        from ..conversion import from_pretrained as load
        from ..conversion.load import check_image_size
        from ..modeling.config import ChineseCLIPConfig

        check_image_size(image_size)
        if processor is None and os.path.isfile(os.path.join(os.fspath(src), "config.json")):
            # a local checkpoint directory: its processor is checked against the model before the weights load
            r = image_size or ChineseCLIPConfig.from_pretrained(src).vision_config.image_size
            processor = _processor_for(src, r, resize_mode, asked_size=image_size is not None)
        model, params = load(
            src,
            dtype,
            arch=arch,
            scan_layers=scan_layers,
            attention_impl=attention_impl,
            image_size=image_size,
            precision=precision,
        )
        if processor is None:
            r = model.config.vision_config.image_size
            processor = _processor_for(src, r, resize_mode, asked_size=image_size is not None)
        return cls(model, params, processor, **kwargs)

    @property
    def logit_scale(self) -> float:
        """exp(logit_scale): the temperature-inverse multiplying cosine similarities."""
        return float(jnp.exp(self.params["logit_scale"]))

    def bucket_sizes(self, batch_size: int) -> tuple[int, ...]:
        return self.encoder.bucket_sizes(batch_size)

    def encode_text(
        self, texts: str | Sequence[str], batch_size: int | None = None, progress: bool | None = None
    ) -> np.ndarray:
        """texts -> (N, projection_dim) float32, L2-normalized (context length of the processor)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return np.zeros((0, self.config.projection_dim), np.float32)
        enc = self.processor.tokenize(texts)
        return self.encoder.encode_text(
            enc["input_ids"],
            enc["attention_mask"],
            enc["token_type_ids"],
            batch_size=batch_size or self.text_batch_size,
            progress=progress,
        )

    def encode_image(
        self, images: Sequence[Any] | Any, batch_size: int | None = None, progress: bool | None = None
    ) -> np.ndarray:
        """Images (PIL images, uint8 arrays, paths) -> (N, projection_dim) float32, L2-normalized.

        images: one image, a sequence of them, or a uint8 (N, H, W, C) array; decoded batch by
        batch. An unreadable image raises processing.ImageLoadError naming it and the reason.
        """
        if isinstance(images, (str, os.PathLike, PIL.Image.Image)) or (
            isinstance(images, np.ndarray) and images.ndim in (2, 3)
        ):
            images = [images]
        if not isinstance(images, (list, tuple, np.ndarray)):
            images = list(images)
        return self.encoder.encode_images(
            images, self.processor.preprocess_images, batch_size=batch_size or self.image_batch_size, progress=progress
        )

    def class_embeddings(
        self, labels: Sequence[str], templates: Sequence[str] | None = None, batch_size: int | None = None
    ) -> np.ndarray:
        """(N_labels, D): each label embedded in every template, averaged, L2-normalized."""
        labels = list(labels)
        templates = list(CHINESE_TEMPLATES if templates is None else templates)
        if not labels or not templates:
            raise ValueError("zero-shot needs at least one label and one template")
        prompts = [[fill(t, str(label)) for t in templates] for label in labels]
        return self.encoder.class_embeddings(
            prompts, self.processor.tokenize, batch_size=batch_size or self.text_batch_size
        )

    def zero_shot(
        self, images, labels: Sequence[str], templates: Sequence[str] | None = None, batch_size: int | None = None
    ) -> np.ndarray:
        """(N_images, N_labels) probabilities: softmax over labels of exp(logit_scale) * cosine.

        templates: strings with one "{}" (default: templates.CHINESE_TEMPLATES).
        """
        classes = self.class_embeddings(labels, templates)
        image = self.encode_image(images, batch_size)
        logits = self.logit_scale * (image @ classes.T)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)

    def match_calibration(self) -> Calibration:
        """The ``scale`` / ``bias`` that ``match`` uses: the calibration file's, else a
        sigmoid-trained model's own ``exp(logit_scale)`` and ``logit_bias``. A softmax-trained
        model without a file has no per-pair probability: ValueError naming the fix."""
        if self.calibration is not None:
            return self.calibration
        if "logit_bias" in self.params:
            return Calibration(self.logit_scale, float(self.params["logit_bias"]), source="the model's logit_bias")
        raise ValueError(
            "this model has no logit_bias (trained with the softmax loss, or loaded from the HF layout, "
            "which drops it): its scores are not per-pair probabilities. Fit a calibration with "
            "`ccj-eval calibrate --model SRC --data SPEC --output FILE` and pass calibration=FILE"
        )

    def match(self, images, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """(N,) float32: the probability that images[i] matches texts[i], for each i.

        ``sigmoid(scale * cosine + bias)`` with ``match_calibration()``'s numbers (docs/inference.md:
        what the probability means and when it transfers)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        cal = self.match_calibration()
        image = self.encode_image(images, batch_size)
        if len(image) != len(texts):
            raise ValueError(f"match pairs images[i] with texts[i]: got {len(image)} images and {len(texts)} texts")
        text = self.encode_text(texts)
        return cal.probability(np.sum(image * text, axis=-1))


def _processor_for(src, resolution: int, resize_mode: str, asked_size: bool = False) -> ChineseCLIPProcessor:
    """The checkpoint's own processor when its directory (or hub repo) has the files.

    Saved image settings that make images of another size than the model takes are refused, as
    transformers' model refuses them (unless ``interpolate_pos_encoding``): naming the file and
    both sizes. With ``asked_size`` (the caller passed ``image_size``) they follow the model: the
    file's settings (normalization, resampling) with resize and crop at ``resolution``.
    """
    from ..io import is_hub_id
    from ..processing.image_settings import image_settings_file, read_image_settings

    default = ImageSettings.at_resolution(resolution)
    path = os.fspath(src)
    directory = path if os.path.isdir(path) or is_hub_id(path) else None  # a hub id: the small files download
    if directory is None:  # e.g. a cn_clip .pt file: no processor files
        return ChineseCLIPProcessor(image_settings=default, resize_mode=resize_mode)
    kwargs = {}
    if os.path.isdir(directory) and read_image_settings(directory) is None:
        kwargs["image_settings"] = default
    processor = ChineseCLIPProcessor.from_pretrained(directory, resize_mode=resize_mode, **kwargs)
    if processor.image_size == (resolution, resolution):
        return processor
    settings = processor.image_processor.settings
    if asked_size:
        square = {"height": resolution, "width": resolution}
        size = square if "height" in settings.size else {"shortest_edge": resolution}
        settings = dataclasses.replace(settings, size=size, crop_size=square)
        return ChineseCLIPProcessor(processor.tokenizer, settings, resize_mode=resize_mode)
    name = (image_settings_file(directory) if os.path.isdir(directory) else None) or f"{src} (its image settings)"
    h, w = processor.image_size
    hint = f"pass image_size={h} to run the model at {h} px (position embeddings interpolated), or " if h == w else ""
    raise ValueError(
        f"{name}: the processor makes {h}x{w} images but the model takes {resolution}x{resolution} "
        f"(config.json image_size); {hint}pass processor= one of crop size {resolution}"
    )
