"""``tfds:NAME[@SPLIT]`` and ``tfds-dir:PATH[@SPLIT]``: TFDS datasets as classification sets,
retrieval sets, image corpora and training pairs, read with ``tfds.data_source`` (ArrayRecord,
no TensorFlow); images stay encoded (``SkipDecoding``) until a consumer decodes them.

NAME: ``NAME``, ``NAME/CONFIG`` or ``NAME:VERSION``, prepared under the TFDS data directory
(``data_dir``, default ``~/tensorflow_datasets``). PATH: a directory holding ``dataset_info.json``
(``data.build`` writes one), or holding one a level or two down.
Classification: exactly one Image and one ClassLabel feature (found by type); label names from
the ClassLabel. Retrieval: one Image feature and ``text``, optionally ``image_id``, ``text_id``
(one record per pair): candidates are the distinct image ids in first-record order, queries the
distinct text ids in first-record order (``_retrieval``: without the ids). Image corpus: one
row per record (a pairs dataset repeats an image per caption); id = the ``image_id`` feature
when there is one, else the record number.
"""

from __future__ import annotations

import numpy as np

from ..io import as_path, first_line
from .sets import ClassificationSet, DatasetError, ImageCorpus, LazyList, RetrievalSet, as_text, retrieval_set
from .source import Offers
from .tfds_source import builder_by_name, import_tfds

__all__ = ["OFFERS", "find_tfds_dir"]


def find_tfds_dir(root, split: str | None = None):
    """``root`` itself, ``root/split`` or the first directory one or two levels below ``root``
    that holds ``dataset_info.json``; None if none does."""
    for candidate in (root, root / split) if split else (root,):
        if (candidate / "dataset_info.json").is_file():
            return candidate
    for child in sorted((c for c in root.iterdir() if c.is_dir()), key=str):
        if (child / "dataset_info.json").is_file():
            return child
        for grandchild in sorted((g for g in child.iterdir() if g.is_dir()), key=str):
            if (grandchild / "dataset_info.json").is_file():
                return grandchild
    return None


def _builder(spec, data_dir: str | None = None):
    try:
        tfds = import_tfds()
    except ImportError as e:
        raise DatasetError(f"{spec}: {e}") from None
    if spec.kind == "tfds-dir":
        root = as_path(spec.location, what=str(spec))
        found = find_tfds_dir(root, spec.split) if root.is_dir() else None
        if found is None:
            raise DatasetError(f"{spec}: {root} is not a TFDS dataset directory (no dataset_info.json)")
        return tfds.builder_from_directory(str(found))
    try:  # a wrong name lists the close matches; an unprepared one names the command that prepares it
        return builder_by_name(spec.location, data_dir, what=f"tfds:NAME ({spec})")
    except (ValueError, FileNotFoundError) as e:
        raise DatasetError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - tfds raises many kinds; the first line says why
        where = data_dir or "~/tensorflow_datasets"
        raise DatasetError(f"{spec} under {where}: {first_line(e, with_type=False)}") from e


def _split_source(builder, split: str, decoders=None):
    splits = builder.info.splits
    if split.split("[")[0] not in splits:
        raise DatasetError(f"{builder.data_dir} has no split {split!r} (splits: {', '.join(sorted(splits))})")
    try:
        return builder.as_data_source(split=split, decoders=decoders)
    except Exception as e:  # noqa: BLE001
        raise DatasetError(f"cannot read split {split!r} of {builder.data_dir}: {type(e).__name__}: {e}") from e


def _features_by_type(builder):
    tfds = import_tfds()
    features = builder.info.features
    images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
    return features, images, labels


def _classification(spec, *, data_dir: str | None = None) -> ClassificationSet:
    tfds = import_tfds()
    builder = _builder(spec, data_dir)
    features, images, labels = _features_by_type(builder)
    if len(images) != 1 or len(labels) != 1:
        raise DatasetError(
            f"{builder.data_dir}: need exactly one Image and one ClassLabel feature, "
            f"found images {images}, labels {labels}"
        )
    image_key, label_key = images[0], labels[0]
    source = _split_source(builder, spec.split, decoders={image_key: tfds.decode.SkipDecoding()})
    n = len(source)
    label_values = np.asarray([int(source[i][label_key]) for i in range(n)], np.int64)  # one pass
    return ClassificationSet(
        LazyList(n, lambda i: source[i][image_key]),
        label_values,
        list(features[label_key].names),
        spec.text or str(spec),
        image_names=LazyList(n, lambda i: f"{spec} record {i}"),
    )


def _retrieval(
    spec, *, encoding: str = "utf-8", data_dir: str | None = None, text_key: str = "text", image_key: str | None = None
) -> RetrievalSet:
    """``data_dir``: the TFDS data directory of ``tfds:NAME``; ``text_key`` / ``image_key``: the
    caption and image features (default ``text`` and the one Image feature): the trainer's
    ``data.tfds`` keys. Without an ``image_id`` feature each record's image is a candidate of
    its own (id: the record number, as the image corpus numbers it); without ``text_id`` a
    caption's positives are every image paired with the same text."""
    del encoding  # TFDS text features are UTF-8 by definition
    tfds = import_tfds()
    builder = _builder(spec, data_dir)
    features, images, _ = _features_by_type(builder)
    if image_key is not None and image_key in images:
        images = [image_key]
    if len(images) != 1 or text_key not in features:
        raise DatasetError(
            f"{builder.data_dir}: a TFDS retrieval set needs one Image feature and a {text_key!r} text feature "
            f"(optional: 'image_id', 'text_id'); has {sorted(features)}"
        )
    image_key = images[0]
    source = _split_source(builder, spec.split, decoders={image_key: tfds.decode.SkipDecoding()})
    record_of_image: dict[str, int] = {}
    captions: dict[str, tuple[str, list]] = {}
    for r in range(len(source)):  # one pass over ids and captions; images stay encoded, unread
        rec = source[r]
        text = as_text(rec[text_key])
        iid = as_text(rec["image_id"]) if "image_id" in features else str(r)
        tid = as_text(rec["text_id"]) if "text_id" in features else text
        record_of_image.setdefault(iid, r)
        captions.setdefault(tid, (text, []))[1].append(iid)
    ids = list(record_of_image)
    records = [record_of_image[i] for i in ids]
    directory = builder.data_dir
    return retrieval_set(
        LazyList(len(ids), lambda i: source[records[i]][image_key]),
        ids,
        [(tid, text, iids) for tid, (text, iids) in captions.items()],
        "tfds",
        str(directory),
        where=lambda i: f"{directory} split {spec.split} record {records[i]}",
    )


class _Images:
    """TFDS records (images left encoded): {"id": image_id or the record number, "image": bytes}."""

    def __init__(self, source, image_key: str, id_key: str | None):
        self.source, self.image_key, self.id_key = source, image_key, id_key

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self.source):  # before the try: iteration stops on IndexError
            raise IndexError(i)
        try:
            record = self.source[i]
            return {"id": as_text(record[self.id_key]) if self.id_key else i, "image": bytes(record[self.image_key])}
        except Exception as e:  # noqa: BLE001
            return {"id": i, "error": f"{type(e).__name__}: {e}"}


def _images(spec, *, encoding: str = "utf-8") -> ImageCorpus:
    del encoding
    tfds = import_tfds()
    builder = _builder(spec)
    features, images, _ = _features_by_type(builder)
    if len(images) != 1:
        raise DatasetError(f"{builder.data_dir}: need exactly one Image feature, found {images}")
    source = _split_source(builder, spec.split, decoders={images[0]: tfds.decode.SkipDecoding()})
    id_key = "image_id" if "image_id" in features else None
    return ImageCorpus(_Images(source, images[0], id_key), f"{spec.kind}:{builder.data_dir}@{spec.split}")


def _training(spec) -> tuple[str, dict]:
    if spec.kind == "tfds-dir":
        return "tfds", {"builder_dir": spec.location, "name": "", "split": spec.split}
    return "tfds", {"name": spec.location, "builder_dir": "", "split": spec.split}


OFFERS = (
    Offers("tfds", retrieval=_retrieval, classification=_classification, images=_images, training=_training),
    Offers("tfds-dir", retrieval=_retrieval, classification=_classification, images=_images, training=_training),
)
