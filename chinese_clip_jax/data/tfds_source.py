"""TFDS datasets (ArrayRecord, random access, no TensorFlow) as training and eval sources.

Either a directory written by ``python -m chinese_clip_jax.data.build`` (or any TFDS dataset
directory: ``tfds.builder_from_directory``), or a prepared TFDS dataset by name:

    --config.data.name=tfds --config.data.tfds.builder_dir=OUT --config.data.tfds.split=train
    --config.data.name=tfds --config.data.tfds.name=my_pairs --config.data.tfds.data_dir=~/tensorflow_datasets

Config keys (``data.tfds.*``): ``builder_dir``, or ``name`` (e.g. "my_pairs" or
"my_pairs:1.0.0") with ``data_dir``; ``split`` (training split, any TFDS split string such as
"train[:90%]"); ``eval_split`` (in-training retrieval: the split as ``ccj-eval retrieval --data
tfds-dir:BUILDER_DIR@EVAL_SPLIT`` reads it, ``tfds_sets``, with ``image_key`` / ``text_key``;
"" = none); ``eval_max_samples`` (at most this many of its captions:
``sets.retrieval_eval_set``);
``image_key`` / ``text_key`` (feature names, default "image" / "text"). The image feature is
read as its encoded bytes (``tfds.decode.SkipDecoding``) and decoded in the pipeline's workers
with the processor, so pixels are those of ``ChineseCLIPImageProcessor``; an image stored as a
uint8 array is used as is.
"""

from __future__ import annotations

import difflib

from .source import EvalSplit, Source
from .spec import Spec

__all__ = ["TfdsSource", "import_tfds", "open_builder", "builder_by_name"]


def import_tfds():
    """``tensorflow_datasets``, or an ImportError naming the extra that installs it."""
    try:
        import tensorflow_datasets
    except ImportError as e:
        raise ImportError(
            f"TFDS / ArrayRecord data needs the [tfds] extra: pip install 'chinese-clip-jax[tfds]' ({e})"
        ) from None
    return tensorflow_datasets


def open_builder(c):
    """The ``tfds`` builder ``c`` names (checked before anything is read)."""
    tfds = import_tfds()

    from ..io import as_path

    if c.builder_dir and c.name:
        raise ValueError("data.tfds: set builder_dir or name (+ data_dir), not both")
    if c.builder_dir:
        path = as_path(c.builder_dir, what="data.tfds.builder_dir")
        if not (path / "dataset_info.json").exists():
            raise FileNotFoundError(
                f"data.tfds.builder_dir {c.builder_dir!r}: no dataset_info.json there "
                f"(build one with python -m chinese_clip_jax.data.build)"
            )
        return tfds.builder_from_directory(str(path))
    if c.name:
        return builder_by_name(c.name, _data_dir(c), what="data.tfds.name")
    raise ValueError("data.tfds: set data.tfds.builder_dir (a built directory) or data.tfds.name")


def _data_dir(c) -> str | None:
    from ..io import as_path

    return str(as_path(c.data_dir, what="data.tfds.data_dir")) if c.data_dir else None


def builder_by_name(name: str, data_dir: str | None, *, what: str = "data.tfds.name"):
    """``tfds.builder(name, data_dir=data_dir)``, prepared. One-line errors: a name tfds does not
    know lists the close matches; a registered dataset not prepared under ``data_dir`` names the
    command that prepares it."""
    tfds = import_tfds()

    where = data_dir or "~/tensorflow_datasets"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        base = name.split(":")[0].split("/")[0]
        close = difflib.get_close_matches(base, tfds.list_builders(with_community_datasets=False), n=3, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ValueError(f"{what} {name!r}: no such TFDS dataset{hint}") from None
    if not builder.is_prepared():
        flag = f" --data_dir {data_dir}" if data_dir else ""
        raise FileNotFoundError(
            f"{what} {name!r}: the dataset is registered but not prepared under {where}; prepare it with "
            f"`tfds build {name}{flag}` (or builder.download_and_prepare()), or build your own pairs with "
            f"python -m chinese_clip_jax.data.build"
        )
    return builder


def _check_keys(builder, c) -> bool:
    """Validates image_key / text_key; returns whether the image feature is an encoded Image."""
    tfds = import_tfds()

    feats = builder.info.features
    for key, what in ((c.image_key, "image_key"), (c.text_key, "text_key")):
        if key not in feats:
            raise KeyError(
                f"data.tfds.{what} {key!r} is not a feature of {builder.info.full_name} "
                f"(features: {sorted(feats.keys())})"
            )
    return isinstance(feats[c.image_key], tfds.features.Image)


class TfdsSource:
    """Random-access pairs of one split: ``src[i]`` -> {"image": bytes | uint8 array, "text", "where"}.

    Picklable (grain worker processes reopen the split from ``c``).
    """

    def __init__(self, c, split: str):
        self._c, self.split = c, split
        self.skipped_at_index = 0
        self._open()

    def _open(self):
        tfds = import_tfds()

        builder = open_builder(self._c)
        skip = _check_keys(builder, self._c)
        decoders = {self._c.image_key: tfds.decode.SkipDecoding()} if skip else None
        try:
            self._ds = builder.as_data_source(self.split, decoders=decoders)
        except (KeyError, ValueError) as e:
            raise ValueError(
                f"data.tfds: split {self.split!r} not in {builder.info.full_name} "
                f"(splits: {sorted(builder.info.splits.keys())}): {e}"
            ) from e
        self._name = builder.info.name

    def __getstate__(self):
        return {"_c": self._c, "split": self.split, "skipped_at_index": self.skipped_at_index}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int) -> dict:
        where = f"{self._name}/{self.split}[{index}]"
        try:
            record = self._ds[int(index)]
            text = record[self._c.text_key]
            if isinstance(text, bytes):
                text = text.decode("utf-8")
            image = record[self._c.image_key]
            return {
                "image": image,
                "text": text,
                "where": where,
                **{k: record[k] for k in ("image_id", "text_id") if k in record},
            }
        except Exception as e:  # noqa: BLE001 - reported as a skipped sample
            return {"error": f"{type(e).__name__}: {e}", "where": where}


def _eval_split(c) -> EvalSplit | None:
    """``tfds-dir:BUILDER_DIR@EVAL_SPLIT`` (or ``tfds:NAME@EVAL_SPLIT`` under ``data_dir``), read by
    ``tfds_sets``; at most ``eval_max_samples`` captions."""
    if not c.eval_split:
        return None
    split = str(c.eval_split)
    features = {"text_key": c.text_key, "image_key": c.image_key}
    if c.builder_dir:
        spec = Spec("tfds-dir", str(c.builder_dir), split, f"tfds-dir:{c.builder_dir}@{split}")
        return EvalSplit(spec, _EVAL, int(c.eval_max_samples), options=features)
    if not c.name:
        raise ValueError("data.tfds: set data.tfds.builder_dir (a built directory) or data.tfds.name")
    spec = Spec("tfds", str(c.name), split, f"tfds:{c.name}@{split}")
    return EvalSplit(spec, _EVAL, int(c.eval_max_samples), options={"data_dir": _data_dir(c), **features})


_EVAL = "data.tfds.eval_split"


def _check(c) -> None:
    """dataset_info.json only: the builder, the feature keys, the splits."""
    builder = open_builder(c)
    _check_keys(builder, c)
    for key in ("split", "eval_split"):
        name = str(c[key]).split("[")[0]
        if name and name not in builder.info.splits:
            raise ValueError(
                f"data.tfds.{key} {c[key]!r} is not a split of {builder.info.full_name} "
                f"(splits: {sorted(builder.info.splits.keys())})"
            )


def _open_train(c, *, image_size: int, shard=None) -> TfdsSource:
    del image_size, shard  # the pipeline decodes and takes this process's part
    return TfdsSource(c, c.split)


DEFAULTS = {
    "builder_dir": "",  # a TFDS dataset directory (e.g. written by data.build); local or gs://
    "name": "",  # or a prepared TFDS dataset by name ("my_pairs", "my_pairs:1.0.0") under data_dir
    "data_dir": "",  # TFDS data directory for name ("" = ~/tensorflow_datasets)
    "split": "train",  # training split (any TFDS split string, e.g. "train[:90%]")
    "eval_split": "",  # retrieval eval split ("" = none)
    "eval_max_samples": 1000,  # at most this many eval captions (the first; <= 0: the whole split)
    "image_key": "image",  # image feature name
    "text_key": "text",  # caption feature name
}

SOURCE = Source(
    name="tfds",
    defaults=DEFAULTS,
    open_train=_open_train,
    eval_split=_eval_split,
    path_keys=("builder_dir", "data_dir"),
    check=_check,
)
