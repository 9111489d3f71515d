"""Evaluation during training: embeds the eval sets with the (sharded) params and scores them
with ``chinese_clip_jax.evaluation`` (zero-shot accuracy, retrieval recall).

Every process holds the whole eval set; chunks are placed with the batch sharding and the
embeddings come back replicated, so the same code runs on one device or many hosts.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from .. import sharding as shd
from ..modeling import l2_normalize

__all__ = ["Evaluator"]


def _place(x: np.ndarray, sharding) -> jax.Array:
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


class Evaluator:
    """``Evaluator(model, mesh, param_shardings, eval_sets)(params) -> {metric: float}``.

    Metric names: ``{set}/top1``, ``{set}/top5`` for zero-shot sets ("zeroshot",
    "zeroshot_unseen"), ``{set}/t2i_R@k``, ``{set}/i2t_R@k``, ``{set}/mean_recall`` for
    "retrieval". ``chance()`` gives the same keys at chance level.
    """

    def __init__(self, model, mesh: Mesh, param_shardings: Any, eval_sets: dict, chunk: int = 256):
        self.sets = eval_sets
        self.mesh = mesh
        n_shards = mesh.shape["data"] * mesh.shape["fsdp"]
        self.chunk = max(n_shards, (chunk // n_shards) * n_shards)
        self._sharding = shd.batch_sharding(mesh)
        rep = shd.replicated(mesh)

        def text(params, ids, mask):
            return l2_normalize(model.apply({"params": params}, ids, mask, method="get_text_features"))

        def image(params, pixels):
            return l2_normalize(model.apply({"params": params}, pixels, method="get_image_features"))

        self._text = jax.jit(text, in_shardings=(param_shardings, self._sharding, self._sharding), out_shardings=rep)
        self._image = jax.jit(image, in_shardings=(param_shardings, self._sharding), out_shardings=rep)

    def _batched(self, fn, params, *arrays) -> np.ndarray:
        n = arrays[0].shape[0]
        out = []
        for start in range(0, n, self.chunk):
            parts = [a[start:start + self.chunk] for a in arrays]
            pad = self.chunk - parts[0].shape[0]
            parts = [np.concatenate([p, np.repeat(p[-1:], pad, axis=0)]) if pad else p for p in parts]
            with shd.use_mesh_and_rules(self.mesh):
                emb = fn(params, *[_place(np.ascontiguousarray(p), self._sharding) for p in parts])
            out.append(np.asarray(emb)[: self.chunk - pad])
        return np.concatenate(out)

    def embed_texts(self, params, input_ids, attention_mask) -> np.ndarray:
        return self._batched(self._text, params, np.asarray(input_ids, np.int32), np.asarray(attention_mask, np.int32))

    def embed_images(self, params, pixel_values) -> np.ndarray:
        return self._batched(self._image, params, np.asarray(pixel_values, np.float32))

    def class_embeddings(self, params, class_texts: list[list[str]], encode) -> np.ndarray:
        """Mean of each class's normalized prompt embeddings, renormalized: (classes, D)."""
        flat = [t for texts in class_texts for t in texts]
        tok = encode(flat)
        emb = self.embed_texts(params, tok["input_ids"], tok["attention_mask"])
        out, i = [], 0
        for texts in class_texts:
            m = emb[i:i + len(texts)].mean(axis=0)
            out.append(m / np.linalg.norm(m))
            i += len(texts)
        return np.stack(out)

    def __call__(self, params, encode=None) -> dict[str, float]:
        from .. import evaluation

        metrics = {}
        for name, s in self.sets.items():
            if "class_texts" in s:
                if encode is None:
                    from ..data.pipeline import TextEncoder

                    encode = TextEncoder()
                classes = self.class_embeddings(params, s["class_texts"], encode)
                images = self.embed_images(params, s["pixel_values"])
                acc = evaluation.zero_shot_accuracy(images, classes, np.asarray(s["labels"]), topk=(1, 5))
                metrics.update({f"{name}/{k}": float(v) for k, v in acc.items()})
            elif "text_to_images" in s:
                texts = self.embed_texts(params, s["input_ids"], s["attention_mask"])
                images = self.embed_images(params, s["pixel_values"])
                rec = evaluation.retrieval_metrics(texts, images, s["text_to_images"])
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
                n_img = len(s["pixel_values"])
                pos = np.array([len(p) for p in s["text_to_images"]])
                n_txt = len(s["text_to_images"])
                texts_of = np.bincount(np.concatenate([np.asarray(p, int) for p in s["text_to_images"]]),
                                       minlength=n_img)
                texts_of = texts_of[texts_of > 0]  # images that are some text's positive are the queries
                for k in (1, 5, 10):
                    out[f"{name}/t2i_R@{k}"] = float(np.mean(1 - _none_hit(n_img, pos, k)))
                    out[f"{name}/i2t_R@{k}"] = float(np.mean(1 - _none_hit(n_txt, texts_of, k)))
                out[f"{name}/mean_recall"] = float(np.mean([out[f"{name}/{d}_R@{k}"]
                                                            for d in ("t2i", "i2t") for k in (1, 5, 10)]))
        return out


def _none_hit(n: int, positives: np.ndarray, k: int) -> np.ndarray:
    """P(no positive among k random picks without replacement out of n)."""
    p = np.ones(len(positives))
    for j in range(k):
        p *= np.clip((n - positives - j) / (n - j), 0.0, 1.0)
    return p
