"""Evaluation during training: the eval sets go through ``chinese_clip_jax.evaluation.runner``
(the runner ``ccj-eval`` and ``evaluation.zero_shot`` / ``retrieval`` use), embedded by an
``encoding.Encoder`` with the (sharded) params; bad images are skipped and logged, never fatal.

An eval set holds its images as ``images``: a random-access sequence of raw images (uint8
arrays, encoded bytes, base64 strings: what ``data.pipeline.ImageDecoder`` reads), decoded one
batch at a time with the set's resize mode, so the split's pixels are never in memory at once
(``pixel_values``, already preprocessed float32 (N, 3, s, s), is accepted too). Every process
holds the same set; batches are placed with the batch sharding and the embeddings come back to
every process, so the same code runs on one device or many hosts.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from jax.sharding import Mesh

from ..evaluation import runner
from ..inference.encoding import Encoder
from ..processing import DEFAULT_CONTEXT_LENGTH, eval_transform

logger = logging.getLogger(__name__)

__all__ = ["Evaluator"]


class Evaluator:
    """``Evaluator(model, mesh, param_shardings, eval_sets)(params) -> {metric: float}``.

    Metric names: ``{set}/top1``, ``{set}/top5`` for zero-shot sets ("zeroshot",
    "zeroshot_unseen"), ``{set}/t2i_R@k``, ``{set}/i2t_R@k``, ``{set}/mean_recall`` for
    "retrieval". ``chance()`` gives the same keys at chance level. resize_mode: "center"
    (shortest edge + centre crop, as training; "crop" is accepted) or "squash" (cn_clip's
    evaluation transform): ``processing.eval_transform``.
    context_length: the tokenizer length of zero-shot prompts (the run's ``context_length``).
    ``predictions[set]``: each zero-shot set's top-1 class per image at the last call (-1: an
    image that could not be read). ``bad_images[set]``: the images skipped at the last call.
    """

    def __init__(
        self,
        model,
        mesh: Mesh,
        param_shardings: Any,
        eval_sets: dict,
        chunk: int = 256,
        resize_mode: str = "center",
        progress: bool = False,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
    ):
        from ..data.pipeline import ImageDecoder

        resize_mode = eval_transform(resize_mode, what="eval resize_mode")
        self.sets = eval_sets
        self.mesh = mesh
        self.progress = progress
        self.encoder = Encoder(model, None, mesh, param_shardings=param_shardings, batch_size=chunk)
        self.context_length = int(context_length)
        self.predictions: dict[str, np.ndarray] = {}  # zero-shot set -> top-1 class per image, last call
        self.bad_images: dict[str, list] = {}
        size = model.config.vision_config.image_size
        self._decode = ImageDecoder(size, crop=resize_mode)

    def _preprocess(self, chunk, start):
        return np.stack([self._decode(x) for x in chunk])

    def _images(self, s: dict):
        """(items, preprocess) of a set: raw images decoded here, or ready pixel_values."""
        if "pixel_values" in s:
            return s["pixel_values"], lambda chunk, start: np.asarray(chunk, np.float32)
        return s["images"], self._preprocess

    def _encode_fn(self, encode):
        if encode is None:
            from ..data.pipeline import CachingTokenizer

            encode = CachingTokenizer(self.context_length)
        return encode

    def _no_limit(self, s: dict) -> int:
        return len(self._images(s)[0])  # in training a bad eval image is logged, never fatal

    def zero_shot(self, params, name: str, encode=None) -> runner.ZeroShotScores:
        """The runner's scores of zero-shot set ``name``."""
        s = self.sets[name]
        images, preprocess = self._images(s)
        return runner.zero_shot_scores(
            self.encoder,
            images,
            np.asarray(s["labels"]),
            s["class_texts"],
            tokenize=self._encode_fn(encode),
            preprocess=preprocess,
            params=params,
            progress=self.progress,
            max_bad=self._no_limit(s),
        )

    def retrieval(self, params, name: str) -> runner.RetrievalScores:
        """The runner's scores of retrieval set ``name``."""
        s = self.sets[name]
        images, preprocess = self._images(s)
        return runner.retrieval_scores(
            self.encoder,
            images,
            {"input_ids": s["input_ids"], "attention_mask": s["attention_mask"]},
            s["text_to_images"],
            preprocess=preprocess,
            params=params,
            progress=self.progress,
            max_bad=self._no_limit(s),
        )

    def __call__(self, params, encode=None) -> dict[str, float]:
        metrics = {}
        for name, s in self.sets.items():
            if "class_texts" in s:
                scores = self.zero_shot(params, name, encode)
                self.predictions[name] = scores.predictions
                keep = ("top1", "top5")  # the logged names (run log, report, figures)
                metrics.update({f"{name}/{k}": float(scores.metrics[k]) for k in keep})
            elif "text_to_images" in s:
                scores = self.retrieval(params, name)
                metrics.update({f"{name}/{k}": float(v) for k, v in scores.metrics.items()})
            else:
                continue
            self.bad_images[name] = scores.bad_images
            if scores.bad_images:
                b = scores.bad_images[0]
                logger.warning(
                    "eval set %s: %d images skipped (first: %s: %s)", name, len(scores.bad_images), b.image, b.reason
                )
        return metrics

    def chance(self) -> dict[str, float]:
        """Expected metrics of a random ranking: zero-shot 1/classes and 5/classes; retrieval
        R@k = P(some positive among k random candidates), averaged over the queries."""
        out = {}
        for name, s in self.sets.items():
            if "class_texts" in s:
                c = len(s["class_texts"])
                out[f"{name}/top1"], out[f"{name}/top5"] = 1 / c, min(1.0, 5 / c)
            elif "text_to_images" in s:
                n_img = len(s["images"] if "images" in s else s["pixel_values"])
                pos = np.array([len(p) for p in s["text_to_images"]])
                n_txt = len(s["text_to_images"])
                texts_of = np.bincount(
                    np.concatenate([np.asarray(p, int) for p in s["text_to_images"]]), minlength=n_img
                )
                texts_of = texts_of[texts_of > 0]  # images that are some text's positive are the queries
                for k in (1, 5, 10):
                    out[f"{name}/t2i_R@{k}"] = float(np.mean(1 - _none_hit(n_img, pos, k)))
                    out[f"{name}/i2t_R@{k}"] = float(np.mean(1 - _none_hit(n_txt, texts_of, k)))
                out[f"{name}/mean_recall"] = float(
                    np.mean([out[f"{name}/{d}_R@{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10)])
                )
        return out


def _none_hit(n: int, positives: np.ndarray, k: int) -> np.ndarray:
    """P(no positive among k random picks without replacement out of n)."""
    p = np.ones(len(positives))
    for j in range(min(k, n)):  # k >= n picks everything: p is already 0 (every query has a positive)
        p *= np.clip((n - positives - j) / (n - j), 0.0, 1.0)
    return p
