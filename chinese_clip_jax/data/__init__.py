"""Training and evaluation data via grain, from the sources of ``registry`` (``data.name``).

    it = train_iterator(cfg.data, global_batch_size=256, seed=0, image_size=32)
    batch = next(it)   # {"input_ids", "attention_mask": int32 (b, 52), "pixel_values": uint8 (b, 32, 32, 3)}
    state = it.get_state(); ...; it.set_state(state)      # JSON-able, exact resume
    sets = eval_sets(cfg.data, image_size=32)

``b = global_batch_size // jax.process_count()``; each process reads only its own shard.
``data_cfg`` (see :func:`default_data_config`): ``name`` in {"demo", "cn_clip", "webdataset",
"tfds", "files"}, ``num_threads`` / ``prefetch_buffer_size`` (grain ReadOptions), ``worker_count`` /
``worker_buffer_size`` (grain worker processes decoding images; 0 = threads only),
``train_crop`` ("center", "random_resized", "squash") / ``eval_crop`` ("center", "squash"), and
one sub-config per source, ``data.demo``, ``data.cn_clip``, ``data.webdataset``, ``data.tfds``,
``data.files``, whose keys each module's docstring lists.

``data.spec`` (a data-set spec, docs/data.md: ``files:pairs.csv``, ``cn_clip:ROOT@train``,
``tfds-dir:PATH``, ``webdataset:SHARDS``, ``demo:``) is short for ``data.name`` and that source's
keys (``apply_spec``); ``data.eval_spec`` names the trainer's retrieval eval set as ``ccj-eval
retrieval`` reads it, and so do the sources' own eval keys (``eval_sets``: both through
``readers.open_retrieval``, the same records in the same order).
``data.max_bad``: unreadable records tolerated, in training and in each eval set (``bad_records``).
"""

from __future__ import annotations

import ml_collections

from ..processing import DEFAULT_CONTEXT_LENGTH
from . import registry
from .pipeline import TrainIterator, build_train_iterator

__all__ = [
    "train_iterator",
    "eval_sets",
    "default_data_config",
    "check_config",
    "apply_spec",
    "TrainIterator",
    "SOURCES",
]

SOURCES = registry.names()


def default_data_config(name: str = "demo") -> ml_collections.ConfigDict:
    """Data config with every source's defaults; ``name`` picks the one used."""
    registry.get(name)
    return ml_collections.ConfigDict(
        {
            "name": name,
            "num_threads": 2,  # grain reader threads per process
            "prefetch_buffer_size": 256,  # decoded samples buffered per process (whole chunks of 32)
            "worker_count": 0,  # grain worker processes decoding images (0 = reader threads only)
            "worker_buffer_size": 64,  # decoded samples each worker buffers (whole chunks of 32)
            "train_crop": "center",  # "center" | "random_resized" (cn_clip's augmentation) | "squash"
            "eval_crop": "center",  # "center" (transformers' processor) | "squash" (cn_clip's eval)
            "jpeg_draft": False,  # training: decode big JPEGs at a reduced DCT scale (docs/data.md)
            "spec": "",  # a data-set spec for the training pairs: sets name + that source's keys
            "eval_spec": "",  # a data-set spec for the retrieval eval set ("" = the source's eval keys)
            "max_bad": -1,  # unreadable training samples / eval images tolerated (-1: the default, bad_records)
            "distinct_captions": False,  # training: no two samples with the same caption in one batch
            **{n: dict(source.defaults) for n, source in registry.sources().items()},
        }
    )


def apply_spec(data_cfg) -> None:
    """Expands ``data.spec`` (when set) into ``data.name`` and that source's keys, in place; a
    one-line ValueError naming the spec when it does not parse or offers no training pairs."""
    spec = str(data_cfg.get("spec", "") or "")
    if not spec:
        return
    from .readers import training_keys

    name, keys = training_keys(spec, what="data.spec")
    data_cfg.name = name
    for key, value in keys.items():
        data_cfg[name][key] = value


def check_config(data_cfg) -> None:
    """Cheap checks of ``data_cfg`` before anything is built: the source name, the crops, the
    worker count, the schemes (and backends) of the chosen source's paths and the source's own
    checks (``source.Source.check``). Raises a one-line ValueError (ImportError for a missing
    backend)."""
    from ..io import as_path
    from .pipeline import EVAL_CROPS, TRAIN_CROPS

    apply_spec(data_cfg)
    source = registry.get(data_cfg.name)
    if data_cfg.train_crop not in TRAIN_CROPS:
        raise ValueError(f"data.train_crop must be one of {TRAIN_CROPS}, got {data_cfg.train_crop!r}")
    if data_cfg.eval_crop not in EVAL_CROPS:
        raise ValueError(f"data.eval_crop must be one of {EVAL_CROPS}, got {data_cfg.eval_crop!r}")
    if data_cfg.worker_count < 0:
        raise ValueError(f"data.worker_count must be >= 0, got {data_cfg.worker_count}")
    sub = data_cfg.get(data_cfg.name)
    for key in source.path_keys:
        for part in str(sub[key]).split(",") if key.endswith("shards") else [sub[key]]:
            if part.strip():
                as_path(part.strip(), what=f"data.{data_cfg.name}.{key}")
    if source.check is not None:
        try:
            source.check(sub)
        except (FileNotFoundError, KeyError) as e:  # one line, as the other config errors
            raise ValueError(e.args[0] if e.args else str(e)) from None


def _process_shard(process_index, process_count):
    import grain

    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return grain.sharding.ShardOptions(shard_index=int(process_index), shard_count=int(process_count))


def train_iterator(
    data_cfg,
    *,
    global_batch_size: int,
    seed: int,
    image_size: int,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    process_index: int | None = None,
    process_count: int | None = None,
    labels: bool = False,
) -> TrainIterator:
    """Infinite, deterministic, checkpointable iterator of this process's batches.

    global_batch_size must divide by the process count; process_index/process_count default
    to jax's (pass them explicitly to simulate hosts). ``labels``: batches also hold "label"
    int32 (b,), the source's class or group id (``loss_positives="label"``).
    """
    import grain

    shard = _process_shard(process_index, process_count)
    shard_count = shard.shard_count
    if global_batch_size <= 0 or global_batch_size % shard_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} must be a positive multiple of the process count {shard_count}"
        )
    apply_spec(data_cfg)
    name = data_cfg.name
    source = registry.get(name).open_train(data_cfg.get(name), image_size=image_size, shard=shard)
    if getattr(source, "is_process_shard", False):  # indexed only this process's part already
        shard = grain.sharding.ShardOptions(0, 1)
    return build_train_iterator(
        source,
        batch_size=global_batch_size // shard_count,
        seed=seed,
        image_size=image_size,
        context_length=context_length,
        shard=shard,
        num_threads=data_cfg.num_threads,
        prefetch_buffer_size=data_cfg.prefetch_buffer_size,
        worker_count=data_cfg.worker_count,
        worker_buffer_size=data_cfg.worker_buffer_size,
        crop=data_cfg.train_crop,
        jpeg_draft=data_cfg.jpeg_draft,
        name=f"data[{data_cfg.name}]",
        max_bad=data_cfg.get("max_bad", -1),
        labels=labels,
        distinct_captions=data_cfg.get("distinct_captions", False),
    )


def eval_sets(data_cfg, *, image_size: int, context_length: int = DEFAULT_CONTEXT_LENGTH) -> dict:
    """Named eval sets (the same on every process), images held lazily as ``images`` (a
    random-access sequence of raw images that the evaluator decodes batch by batch).

    "retrieval": the split ``data.eval_spec`` names, else the one the source's own eval keys
    name (``data.cn_clip.eval_split``, ``data.files.eval_table``, ``data.tfds.eval_split``,
    ``data.webdataset.eval_shards``: ``source.EvalSplit``), opened by ``readers.open_retrieval``
    exactly as ``ccj-eval retrieval`` opens that spec (the same records, order and image ids),
    then capped by the source's ``eval_max_texts`` / ``eval_max_samples`` (``data.eval_spec``:
    never capped) in one place, ``sets.retrieval_eval_set``: {"images", "image_ids",
    "image_name", "input_ids", "attention_mask" int32 (t, L), "texts", "text_to_images"}.
    {} when neither is set. demo: ``demo.eval_sets`` ("zeroshot", "zeroshot_unseen",
    "retrieval"), its "retrieval" replaced by ``data.eval_spec``'s when that is set.
    ``image_size``: of the images a source renders itself (the demo); the others are decoded by
    the evaluator.
    """
    from .readers import open_retrieval
    from .sets import retrieval_eval_set
    from .source import EvalSplit
    from .spec import resolve

    apply_spec(data_cfg)
    name = data_cfg.name
    source, sub = registry.get(name), data_cfg.get(name)
    eval_spec = str(data_cfg.get("eval_spec", "") or "")
    sets = {}
    if source.eval_sets is not None and (not eval_spec or name == "demo"):  # the demo's zero-shot sets stay
        sets = source.eval_sets(sub, image_size=image_size, context_length=context_length)
    if eval_spec:
        split = EvalSplit(resolve(eval_spec, what="data.eval_spec", default_split="valid"), "data.eval_spec")
    else:
        split = source.eval_split(sub) if source.eval_split is not None else None
    if split is not None:
        rset = open_retrieval(split.spec, "valid", split.encoding, what=split.what, **split.options)
        sets["retrieval"] = retrieval_eval_set(rset, context_length, split.max_texts)
    return sets
