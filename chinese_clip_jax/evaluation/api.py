"""The Python API: ``zero_shot(model, dataset, ...)`` and ``retrieval(model, data, ...)``.

    from chinese_clip_jax import evaluation
    res = evaluation.zero_shot("path/to/checkpoint", "folder:images/", labels="labels.txt")
    res.metrics["top1"], res.counts, res.bad_images, res.to_json()

``model``: a loaded ``ChineseCLIP``, a ``(ChineseCLIPModel, params)`` pair, or anything
``ccj.from_pretrained`` reads. ``dataset`` / ``data``: a ``ClassificationSet`` / ``RetrievalSet``
or a data-set spec (``data.spec``'s grammar, opened by ``data.readers``). Every input is
checked (set, labels, templates, output paths) before the model is loaded. ``resize``: "squash"
(default: cn_clip's evaluation transform, a bicubic resize to the square resolution, as its
published numbers) or "center" (transformers' processor: shortest edge, then centre crop; the
earlier name "crop" is accepted): ``processing.eval_transform``.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data.readers import open_classification, open_retrieval
from ..data.sets import ClassificationSet, RetrievalSet
from ..io import atomic_output, atomic_write
from ..processing import eval_transform
from ..processing.templates import fill
from . import metrics as M
from .prompts import PromptError, read_labels, read_templates
from .results import TASKS, EvaluationResult, versions
from .runner import retrieval_scores, zero_shot_scores

__all__ = ["zero_shot", "retrieval", "RESIZE_MODES", "OutputError", "check_output"]

RESIZE_MODES = ("squash", "center", "crop")  # processing.eval_transform's names; "crop" = "center" (earlier)
DEFAULT_RESIZE = "squash"


class OutputError(ValueError):
    """An output path that cannot be written as asked; the message names it."""


def check_output(path, flag: str, *, overwrite: bool = False, directory: bool = False) -> None:
    """Refuses, before any work, an output that would replace files (unless ``overwrite``), a file
    path that is a directory (or a directory path that is a file), or a missing parent directory."""
    if path is None:
        return
    p = Path(path)
    if directory:
        if p.exists() and not p.is_dir():
            raise OutputError(f"{flag} {path}: exists and is not a directory")
        if p.is_dir() and any(p.iterdir()) and not overwrite:
            raise OutputError(f"{flag} {path}: the directory already holds files; pass --overwrite to replace them")
    else:
        if p.is_dir():
            raise OutputError(f"{flag} {path}: is a directory; give a file name")
        if p.exists() and not overwrite:
            raise OutputError(f"{flag} {path}: already exists; pass --overwrite to replace it")
    parent = p.resolve().parent
    if not parent.is_dir():
        raise OutputError(f"{flag} {path}: directory {parent} does not exist")


def _resize(resize: str | None) -> str:
    return eval_transform(DEFAULT_RESIZE if resize is None else resize, what="resize")


def _model(model, dtype: str):
    """-> (ChineseCLIP, its name for the results)."""
    from ..inference import ChineseCLIP

    if isinstance(model, ChineseCLIP):
        return model, f"ChineseCLIP(projection_dim={model.config.projection_dim})"
    if isinstance(model, tuple) and len(model) == 2:
        return ChineseCLIP(*model), f"ChineseCLIPModel(projection_dim={model[0].config.projection_dim})"
    import jax.numpy as jnp

    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    return ChineseCLIP.from_pretrained(model, {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]), str(model)


def _to_pil(item: Any):
    """An encoded image (bytes) -> PIL image; paths, PIL images and arrays pass unchanged."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        import PIL.Image

        return PIL.Image.open(io.BytesIO(bytes(item)))
    return item


def _preprocess(clip, resize: str):
    """(items, start) -> float32 pixels with the model's own image settings in ``resize`` mode."""
    from ..processing.image import ImagePreprocessor

    pre = ImagePreprocessor(clip.processor.image_processor.settings, resize)
    return lambda chunk, start: pre([_to_pil(x) for x in chunk], start)


def _progress(progress: bool | None) -> bool | None:
    """Progress bars only on a terminal: no carriage-return redraws in logs."""
    if progress is None and not sys.stderr.isatty():
        return False
    return progress


def zero_shot(
    model,
    dataset: ClassificationSet | str,
    *,
    labels: str | Sequence[str] | None = None,
    templates: str | Sequence[str] | None = None,
    resize: str | None = None,
    batch_size: int = 64,
    split: str = "test",
    data_dir: str | None = None,
    per_class: bool = False,
    max_bad: int | None = None,
    encoding: str = "utf-8",
    dtype: str = "float32",
    progress: bool | None = None,
) -> EvaluationResult:
    """Zero-shot classification: top-1/top-5 accuracy and mean per-class recall.

    labels: class names in class order (a list, a file, ``cn_clip:NAME``; default the set's
    names); templates: prompts with one ``{}`` (a list, a file, ``cn_clip:NAME``; default
    ``CHINESE_TEMPLATES``). per_class: add per-class recall, support and the confusion matrix to
    ``details``. max_bad: bad images tolerated (default ``data.bad_records.default_max_bad``).
    """
    resize = _resize(resize)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ds = dataset if isinstance(dataset, ClassificationSet) else open_classification(dataset, split, data_dir)
    names, labels_source = read_labels(labels, encoding) if labels is not None else (ds.class_names, "dataset")
    if len(names) != len(ds.class_names):
        where = labels if isinstance(labels, str) else ds.source
        raise PromptError(f"--labels {where}: {len(names)} labels for the {len(ds.class_names)} classes of {ds.source}")
    templates, templates_source = read_templates(templates, encoding)
    clip, model_name = _model(model, dtype)
    t0 = time.perf_counter()
    scores = zero_shot_scores(
        clip.encoder,
        ds.images,
        ds.labels,
        [[fill(t, n) for t in templates] for n in names],
        tokenize=clip.processor.tokenize,
        preprocess=_preprocess(clip, resize),
        name_of=ds.image_name,
        batch_size=batch_size,
        progress=_progress(progress),
        max_bad=max_bad,
    )
    wall = time.perf_counter() - t0
    details: dict[str, Any] = {}
    if per_class:
        details["per_class"] = [
            {"class": n, "images": int(s), "recall": None if np.isnan(r) else float(r)}
            for n, s, r in zip(names, scores.support, scores.per_class_recall)
        ]
        details["confusion"] = scores.confusion.tolist()
    n = len(ds.labels)
    return EvaluationResult(
        task=TASKS["zeroshot"],
        model=model_name,
        dataset=dataset if isinstance(dataset, str) else ds.source,
        split=split,
        metrics=scores.metrics,
        counts={
            "images": n,
            "scored_images": n - len(scores.bad_images),
            "bad_images": len(scores.bad_images),
            "classes": len(names),
        },
        settings={
            "resize_mode": resize,
            "batch_size": batch_size,
            "dtype": dtype,
            "labels": labels_source,
            "templates": templates_source,
            "num_templates": len(templates),
            "context_length": clip.processor.context_length,
            "devices": len(clip.devices),
        },
        bad_images=scores.bad_images,
        details=details,
        versions=versions(),
        wall_s=round(wall, 3),
    )


def _retrieval_scores(clip, ds: RetrievalSet, resize: str, batch_size: int, progress, max_bad):
    """``runner.retrieval_scores`` of ``ds``'s images and captions with ``clip`` (readable images only)."""
    return retrieval_scores(
        clip.encoder,
        ds.images,
        clip.processor.tokenize(ds.texts),
        ds.text_to_images,
        preprocess=_preprocess(clip, resize),
        name_of=ds.image_name,
        batch_size=batch_size,
        progress=_progress(progress),
        max_bad=max_bad,
    )


def retrieval(
    model,
    data: RetrievalSet | str | os.PathLike,
    *,
    resize: str | None = None,
    batch_size: int = 64,
    split: str = "valid",
    max_bad: int | None = None,
    encoding: str = "utf-8",
    dtype: str = "float32",
    progress: bool | None = None,
    predictions: str | os.PathLike | None = None,
    features_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> EvaluationResult:
    """Text-image retrieval: R@1/5/10 both ways and their mean (cn_clip's definitions).

    predictions: write each scored text's top-10 image ids as cn_clip's prediction JSONL;
    features_dir: write text/image features and ids as .npy (the read images only). Both are
    refused before any work if they would replace files, unless ``overwrite``.
    """
    resize = _resize(resize)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_output(predictions, "--predictions", overwrite=overwrite)
    check_output(features_dir, "--features-dir", overwrite=overwrite, directory=True)
    ds = data if isinstance(data, RetrievalSet) else open_retrieval(data, split, encoding)
    clip, model_name = _model(model, dtype)
    t0 = time.perf_counter()
    scores = _retrieval_scores(clip, ds, resize, batch_size, progress, max_bad)
    wall = time.perf_counter() - t0
    image_ids = [ds.image_ids[j] for j in scores.image_index]
    details: dict[str, Any] = {
        "layout": ds.layout,
        "texts_without_images": [
            {"text_id": ds.text_ids[t], "image_ids": [ds.image_ids[j] for j in ds.text_to_images[t]]}
            for t in scores.texts_without_images
        ],
        "skipped_lines": list(ds.skipped),
    }
    if predictions is not None:
        texts = scores.text_embeds[scores.scored_texts]
        top = M.topk_indices(texts, scores.image_embeds, max(M.RECALL_KS))
        lines = [
            json.dumps({"text_id": ds.text_ids[t], "image_ids": [image_ids[j] for j in row]}, ensure_ascii=False)
            for t, row in zip(scores.scored_texts.tolist(), top.tolist())
        ]
        atomic_write(predictions, "\n".join(lines) + "\n")
        details["predictions"] = os.path.abspath(predictions)
    if features_dir is not None:
        _write_features(
            Path(features_dir),
            {
                "text_features": scores.text_embeds,
                "image_features": scores.image_embeds,
                "text_ids": np.asarray(ds.text_ids),
                "image_ids": np.asarray(image_ids),
            },
        )
        details["features_dir"] = str(Path(features_dir).resolve())
    n_img = len(ds.image_ids)
    return EvaluationResult(
        task=TASKS["retrieval"],
        model=model_name,
        dataset=str(data) if not isinstance(data, RetrievalSet) else ds.source,
        split=split,
        metrics=scores.metrics,
        counts={
            "texts": len(ds.texts),
            "scored_texts": len(scores.scored_texts),
            "texts_without_images": len(scores.texts_without_images),
            "images": n_img,
            "scored_images": n_img - len(scores.bad_images),
            "bad_images": len(scores.bad_images),
        },
        settings={
            "resize_mode": resize,
            "batch_size": batch_size,
            "dtype": dtype,
            "context_length": clip.processor.context_length,
            "devices": len(clip.devices),
        },
        bad_images=scores.bad_images,
        details=details,
        versions=versions(),
        wall_s=round(wall, 3),
    )


def _write_features(directory: Path, arrays: dict[str, np.ndarray]) -> None:
    """Each .npy appears whole or not at all (written to a temporary sibling, then renamed)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        with atomic_output(directory / f"{name}.npy", "wb") as f:
            np.save(f, arr)
