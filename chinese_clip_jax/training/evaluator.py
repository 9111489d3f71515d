"""Evaluation during training: the eval sets go through ``chinese_clip_jax.evaluation.runner``
(the runner ``ccj-eval`` and ``evaluation.zero_shot`` / ``retrieval`` use), embedded by an
``encoding.Encoder`` with the (sharded) params.

Unreadable images follow the one policy of ``data.bad_records``, as in training, ``ccj-eval`` and
``ccj-embed``: skipped, counted (``{set}/bad_images`` in the metrics the trainer logs, when any),
named (each in the log, once; the first in the warning) and capped by ``max_bad`` (the run's
``data.max_bad``; -1 / None: 1% of the set's images, at least 5): one more stops the run with
``TooManyBadImages``, one line naming the first ones. A set that skipped anything says so once
per run in one warning line on stderr (``bad_records.skipped_line``).

An eval set holds its images as ``images``: a random-access sequence of raw images (uint8
arrays, encoded bytes, base64 strings: what ``data.pipeline.ImageDecoder`` reads), decoded one
batch at a time with the set's resize mode, so the split's pixels are never in memory at once
(``pixel_values``, already preprocessed float32 (N, 3, s, s), is accepted too). Every process
holds the same set; batches are placed with the batch sharding and the embeddings come back to
every process, so the same code runs on one device or many hosts.
"""

from __future__ import annotations

import logging
import sys
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
    image that could not be read). ``bad_images[set]``: the images skipped at the last call
    (``runner.BadImage``: index, name, reason), named by the set's ``image_name`` (a callable,
    e.g. ``data.sets.retrieval_eval_set``'s) or ``image_names`` (a sequence) when it has one.
    max_bad: unreadable images tolerated per set (module docstring).
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
        max_bad: int | None = None,
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
        self.max_bad = None if max_bad is None or int(max_bad) < 0 else int(max_bad)
        self._warned: set[str] = set()  # sets whose skipped images were already reported
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

    def _cap(self, s: dict) -> dict:
        """The runner's bad-image arguments for set ``s``: its names, the cap and the setting."""
        names = s.get("image_name")
        if names is None and s.get("image_names") is not None:
            names = s["image_names"].__getitem__
        return {"name_of": names, "max_bad": self.max_bad, "max_bad_flag": "data.max_bad"}

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
            **self._cap(s),
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
            **self._cap(s),
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
            bad = scores.bad_images
            self.bad_images[name] = bad
            if bad:
                metrics[f"{name}/bad_images"] = float(len(bad))
                self._report_once(name, bad, len(self._images(s)[0]))
        return metrics

    def _report_once(self, name: str, bad: list, n: int) -> None:
        """The first time set ``name`` skips images: each named in the log, one line on stderr."""
        if name in self._warned:
            return
        self._warned.add(name)
        import jax

        from ..data.bad_records import skipped_line

        for b in bad:
            logger.warning("eval set %s: skipped %s: %s", name, b.image, b.reason)
        if jax.process_index() == 0:
            first = f"{bad[0].image}: {bad[0].reason}"
            line = skipped_line(len(bad), n, first, what=f"images of eval set {name}", listed="the log")
            print(line, file=sys.stderr, flush=True)

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
