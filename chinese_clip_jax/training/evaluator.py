"""Evaluation during training: streams the eval sets through ``encoding.Encoder`` with the
(sharded) params and scores them with ``chinese_clip_jax.evaluation.metrics`` (zero-shot accuracy,
retrieval recall).

An eval set holds its images as ``images``: a random-access sequence of raw images (uint8
arrays, encoded bytes, base64 strings: what ``data.pipeline.ImageDecoder`` reads), decoded one
batch at a time with the set's resize mode, so the split's pixels are never in memory at once
(``pixel_values``, already preprocessed float32 (N, 3, s, s), is accepted too). Every process
holds the same set; batches are placed with the batch sharding and the embeddings come back to
every process, so the same code runs on one device or many hosts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from jax.sharding import Mesh

from ..evaluation import metrics as M
from ..inference.encoding import Encoder

__all__ = ["Evaluator"]


class Evaluator:
    """``Evaluator(model, mesh, param_shardings, eval_sets)(params) -> {metric: float}``.

    Metric names: ``{set}/top1``, ``{set}/top5`` for zero-shot sets ("zeroshot",
    "zeroshot_unseen"), ``{set}/t2i_R@k``, ``{set}/i2t_R@k``, ``{set}/mean_recall`` for
    "retrieval". ``chance()`` gives the same keys at chance level. resize_mode: "crop"
    (shortest edge + center crop, as training) or "squash" (cn_clip's evaluation transform).
    ``predictions[set]``: each zero-shot set's top-1 class per image at the last call.
    """

    def __init__(
        self,
        model,
        mesh: Mesh,
        param_shardings: Any,
        eval_sets: dict,
        chunk: int = 256,
        resize_mode: str = "crop",
        progress: bool = False,
    ):
        from ..data.pipeline import ImageDecoder

        if resize_mode not in ("crop", "squash"):
            raise ValueError(f"eval resize_mode must be 'crop' or 'squash', got {resize_mode!r}")
        self.sets = eval_sets
        self.mesh = mesh
        self.progress = progress
        self.encoder = Encoder(model, None, mesh, param_shardings=param_shardings, batch_size=chunk)
        self.predictions: dict[str, np.ndarray] = {}  # zero-shot set -> top-1 class per image, last call
        size = model.config.vision_config.image_size
        self._decode = ImageDecoder(size, crop="squash" if resize_mode == "squash" else "center")

    def _preprocess(self, chunk, start):
        return np.stack([self._decode(x) for x in chunk])

    def embed_images(self, params, s: dict) -> np.ndarray:
        if "pixel_values" in s:
            return self.encoder.encode_pixels(s["pixel_values"], params=params, progress=self.progress)
        return self.encoder.encode_images(s["images"], self._preprocess, params=params, progress=self.progress)

    def embed_texts(self, params, input_ids, attention_mask) -> np.ndarray:
        return self.encoder.encode_text(input_ids, attention_mask, params=params, progress=self.progress)

    def class_embeddings(self, params, class_texts: list[list[str]], encode) -> np.ndarray:
        """Mean of each class's normalized prompt embeddings, renormalized: (classes, D)."""
        return self.encoder.class_embeddings(class_texts, encode, params=params, progress=False)

    def _encode_fn(self, encode):
        if encode is None:
            from ..data.pipeline import CachingTokenizer

            encode = CachingTokenizer()
        return encode

    def zero_shot_scores(self, params, name: str, encode=None) -> np.ndarray:
        """(images, classes) cosine similarities of zero-shot set ``name``."""
        s = self.sets[name]
        classes = self.class_embeddings(params, s["class_texts"], self._encode_fn(encode))
        return self.embed_images(params, s) @ classes.T

    def __call__(self, params, encode=None) -> dict[str, float]:
        metrics = {}
        for name, s in self.sets.items():
            if "class_texts" in s:
                encode = self._encode_fn(encode)
                classes = self.class_embeddings(params, s["class_texts"], encode)
                images = self.embed_images(params, s)
                acc = M.zero_shot_accuracy(images, classes, np.asarray(s["labels"]), topk=(1, 5))
                self.predictions[name] = M.topk_indices(images, classes, 1)[:, 0]
                metrics.update({f"{name}/{k}": float(v) for k, v in acc.items()})
            elif "text_to_images" in s:
                texts = self.embed_texts(params, s["input_ids"], s["attention_mask"])
                images = self.embed_images(params, s)
                rec = M.retrieval_metrics(texts, images, s["text_to_images"])
                metrics.update({f"{name}/{k}": float(v) for k, v in rec.items()})
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
