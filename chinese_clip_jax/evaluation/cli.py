"""Zero-shot classification and text-image retrieval benchmarks from the command line.

    python -m chinese_clip_jax.evaluation.cli zeroshot --model SRC --dataset folder:PATH [--split test]
        [--labels FILE|cn_clip:NAME] [--templates FILE|cn_clip:NAME] [--resize-mode {crop,squash}]
        [--batch-size N] [--output results.json]
    python -m chinese_clip_jax.evaluation.cli retrieval --model SRC --data DIR [--split valid]
        [--resize-mode {squash,crop}] [--batch-size N] [--output results.json]
        [--predictions FILE] [--features-dir DIR]

SRC: anything ``ccj.from_pretrained`` reads. Datasets: see ``chinese_clip_jax.evaluation.sets``.
Images are read, decoded, embedded and dropped batch by batch (host memory bounded whatever the
split size), on every local device. The results are printed and written as JSON; the metrics
are those of ``chinese_clip_jax.evaluation.metrics`` (fractions in [0, 1]). A bad input (a missing file,
a label count that does not match the classes, a template without ``{}``) is a one-line error
naming the file, exit status 2, raised before the model is loaded.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics
from .sets import DatasetError, open_classification, open_retrieval

__all__ = ["main", "run_zeroshot", "run_retrieval", "read_labels", "read_templates", "UsageError"]

CN_CLIP_PREFIX = "cn_clip:"
RESIZE_MODES = {"crop": "processor", "squash": "squash"}  # our name -> the processor's


class UsageError(ValueError):
    """Bad command-line input; the message names the file or flag."""


# ------------------------------------------------------------------ labels and templates


def _cn_clip_sets() -> tuple[dict[str, list[str]], dict[str, list]]:
    """(label sets, template sets) that the installed cn_clip package ships, read at run time."""
    import importlib

    labels, templates = {}, {}
    try:
        cvinw = importlib.import_module("cn_clip.eval.cvinw_zeroshot_templates")
        imagenet = importlib.import_module("cn_clip.eval.imagenet_zeroshot_templates")
    except ImportError as e:
        raise UsageError(f"cn_clip sets need the cn_clip package (pip install --no-deps cn-clip): {e}") from e
    for name, value in vars(cvinw).items():
        if name.endswith("_templates") and isinstance(value, list):
            templates[name[: -len("_templates")]] = value
    templates["imagenet"] = list(imagenet.openai_imagenet_template)
    labels["imagenet"] = list(imagenet.imagenet_classnames)
    return labels, templates


def _lines(path: str, flag: str) -> list[tuple[int, str]]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{flag} {path}: no such file (or give {CN_CLIP_PREFIX}NAME for a set cn_clip ships)")
    with open(p, encoding="utf-8") as f:
        out = [(n, line.rstrip("\r\n").strip()) for n, line in enumerate(f, 1)]
    out = [(n, s) for n, s in out if s]
    if not out:
        raise UsageError(f"{flag} {path}: the file has no non-empty line")
    return out


def read_labels(spec: str) -> tuple[list[str], str]:
    """--labels: a file (one class name per line, in class order) or cn_clip:NAME -> (names, source)."""
    if spec.startswith(CN_CLIP_PREFIX):
        sets, _ = _cn_clip_sets()
        name = spec[len(CN_CLIP_PREFIX) :]
        if name not in sets:
            raise UsageError(f"--labels {spec}: cn_clip has no label set {name!r} (has: {', '.join(sorted(sets))})")
        return list(sets[name]), spec
    return [s for _, s in _lines(spec, "--labels")], os.path.abspath(spec)


def read_templates(spec: str | None) -> tuple[list[str], str]:
    """--templates: a file (one template per line, each with one ``{}``) or cn_clip:NAME."""
    from .templates import CHINESE_TEMPLATES

    if spec is None:
        return list(CHINESE_TEMPLATES), "chinese_clip_jax.processing.templates.CHINESE_TEMPLATES"
    if spec.startswith(CN_CLIP_PREFIX):
        _, sets = _cn_clip_sets()
        name = spec[len(CN_CLIP_PREFIX) :]
        if name not in sets:
            raise UsageError(
                f"--templates {spec}: cn_clip has no template set {name!r} (has: {', '.join(sorted(sets))})"
            )
        return [t("{}") if callable(t) else str(t) for t in sets[name]], spec
    out = []
    for n, line in _lines(spec, "--templates"):
        if line.count("{}") != 1:
            raise UsageError(f"--templates {spec}:{n}: a template needs exactly one '{{}}', got {line!r}")
        out.append(line)
    return out, os.path.abspath(spec)


# ------------------------------------------------------------------ running


def _load_model(src: str, resize_mode: str, dtype: str, batch_size: int):
    import jax.numpy as jnp

    from ..inference import ChineseCLIP

    return ChineseCLIP.from_pretrained(
        src,
        {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype],
        resize_mode=RESIZE_MODES[resize_mode],
        text_batch_size=batch_size,
        image_batch_size=batch_size,
    )


def _to_pil(item: Any):
    """An encoded image (bytes) -> PIL image; paths and arrays go to the processor as they are."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        import PIL.Image

        return PIL.Image.open(io.BytesIO(bytes(item)))
    return item


def _encode_images(clip, images: Sequence[Any], batch_size: int) -> np.ndarray:
    def preprocess(chunk, start):
        return clip.processor.preprocess_images([_to_pil(x) for x in chunk], start)

    return clip.encoder.encode_images(images, preprocess, batch_size=batch_size, progress=True)


def run_zeroshot(args) -> dict:
    ds = open_classification(args.dataset, args.split, args.data_dir)
    names, labels_source = read_labels(args.labels) if args.labels else (ds.class_names, "dataset")
    if len(names) != len(ds.class_names):
        where = args.labels if args.labels else args.dataset
        raise UsageError(f"--labels {where}: {len(names)} labels for the {len(ds.class_names)} classes of {ds.source}")
    templates, templates_source = read_templates(args.templates)
    _check_output(args.output)
    clip = _load_model(args.model, args.resize_mode, args.dtype, args.batch_size)
    t0 = time.perf_counter()
    classes = clip.class_embeddings(names, templates)
    image_embeds = _encode_images(clip, ds.images, args.batch_size)
    acc = metrics.zero_shot_accuracy(image_embeds, classes, ds.labels, topk=(1, 5))
    wall = time.perf_counter() - t0
    return {
        "task": "zeroshot",
        **acc,
        "num_images": int(len(ds.labels)),
        "num_classes": len(names),
        "model": args.model,
        "dataset": args.dataset,
        "split": args.split,
        "settings": {
            "resize_mode": args.resize_mode,
            "batch_size": args.batch_size,
            "dtype": args.dtype,
            "labels": labels_source,
            "templates": templates_source,
            "num_templates": len(templates),
            "devices": len(clip.devices),
        },
        "wall_s": round(wall, 3),
        "images_per_s": round(len(ds.labels) / wall, 2),
    }


def run_retrieval(args) -> dict:
    ds = open_retrieval(args.data, args.split)
    _check_output(args.output)
    _check_output(args.predictions)
    clip = _load_model(args.model, args.resize_mode, args.dtype, args.batch_size)
    t0 = time.perf_counter()
    text_embeds = clip.encode_text(ds.texts, progress=True)
    image_embeds = _encode_images(clip, ds.images, args.batch_size)
    rec = metrics.retrieval_metrics(text_embeds, image_embeds, ds.text_to_images)
    wall = time.perf_counter() - t0
    out = {
        "task": "retrieval",
        **rec,
        "num_texts": len(ds.texts),
        "num_images": len(ds.image_ids),
        "model": args.model,
        "data": args.data,
        "split": args.split,
        "layout": ds.layout,
        "settings": {
            "resize_mode": args.resize_mode,
            "batch_size": args.batch_size,
            "dtype": args.dtype,
            "devices": len(clip.devices),
        },
        "wall_s": round(wall, 3),
    }
    if args.predictions:
        top = metrics.topk_indices(text_embeds, image_embeds, max(metrics.RECALL_KS))
        lines = [
            json.dumps({"text_id": tid, "image_ids": [ds.image_ids[j] for j in row]}, ensure_ascii=False)
            for tid, row in zip(ds.text_ids, top.tolist())
        ]
        _write_atomic(args.predictions, "\n".join(lines) + "\n")
        out["predictions"] = os.path.abspath(args.predictions)
    if args.features_dir:
        d = Path(args.features_dir)
        d.mkdir(parents=True, exist_ok=True)
        for name, arr in (
            ("text_features", text_embeds),
            ("image_features", image_embeds),
            ("text_ids", np.asarray(ds.text_ids)),
            ("image_ids", np.asarray(ds.image_ids)),
        ):
            np.save(d / f"{name}.npy", arr)
        out["features_dir"] = str(d.resolve())
    return out


def _check_output(path: str | None) -> None:
    if path and not Path(path).resolve().parent.is_dir():
        raise UsageError(f"cannot write {path}: directory {Path(path).resolve().parent} does not exist")


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------ command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m chinese_clip_jax.evaluation.cli", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="task", required=True)

    def common(sp, default_split, default_resize):
        sp.add_argument("--model", required=True, help="anything ccj.from_pretrained reads")
        sp.add_argument("--split", default=default_split)
        sp.add_argument(
            "--resize-mode",
            choices=sorted(RESIZE_MODES),
            default=default_resize,
            help="crop: shortest edge + center crop (transformers); squash: cn_clip's eval resize",
        )
        sp.add_argument("--batch-size", type=int, default=64, help="rows per device step (rounded to devices)")
        sp.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
        sp.add_argument("--output", help="write the results JSON here (also printed)")

    z = sub.add_parser("zeroshot", help="zero-shot classification accuracy")
    common(z, "test", "crop")
    z.add_argument("--dataset", required=True, help="folder:PATH, tfds:NAME or tfds-dir:PATH")
    z.add_argument("--data-dir", help="TFDS data directory for tfds:NAME")
    z.add_argument("--labels", help="class names, one per line in class order, or cn_clip:NAME")
    z.add_argument("--templates", help="prompt templates, one per line with one {}, or cn_clip:NAME")
    r = sub.add_parser("retrieval", help="text-image retrieval recall (cn_clip's protocol)")
    common(r, "valid", "squash")
    r.add_argument(
        "--data",
        required=True,
        help="cn_clip layout directory (TSV+JSONL or LMDB), a TFDS dir, or a .csv/.tsv/.jsonl table (image, caption)",
    )
    r.add_argument("--predictions", help="write top-10 images per text as cn_clip's prediction JSONL")
    r.add_argument("--features-dir", help="write text/image features and ids as .npy")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; returns the exit status (0 ok, 2 bad input)."""
    args = _parser().parse_args(argv)
    from ..console import quiet_libraries

    quiet_libraries()
    if args.batch_size < 1:
        print(f"error: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return 2
    from ..conversion import CheckpointError
    from ..processing import ImageLoadError

    try:
        result = run_zeroshot(args) if args.task == "zeroshot" else run_retrieval(args)
    except (UsageError, DatasetError, CheckpointError, ImageLoadError, FileNotFoundError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    if args.output:
        _write_atomic(args.output, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
