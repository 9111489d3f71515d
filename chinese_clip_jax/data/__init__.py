"""Training and evaluation data: the demo set, the cn_clip layout and webdataset shards, via grain.

    it = train_iterator(cfg.data, global_batch_size=256, seed=0, image_size=32)
    batch = next(it)   # {"input_ids", "attention_mask": int32 (b, 52), "pixel_values": float32 (b, 3, 32, 32)}
    state = it.get_state(); ...; it.set_state(state)      # JSON-able, exact resume
    sets = eval_sets(cfg.data, image_size=32)

``b = global_batch_size // jax.process_count()``; each process reads only its own shard.
``data_cfg`` (see :func:`default_data_config`): ``name`` in {"demo", "cn_clip", "webdataset"},
``num_threads`` / ``prefetch_buffer_size`` (grain ReadOptions), and one sub-config per source,
``data.demo``, ``data.cn_clip``, ``data.webdataset``, whose keys each module's docstring lists.
"""

from __future__ import annotations

import ml_collections

from . import demo
from .pipeline import TrainIterator, build_train_iterator

__all__ = ["train_iterator", "eval_sets", "default_data_config", "TrainIterator", "SOURCES"]

SOURCES = ("demo", "cn_clip", "webdataset")


def default_data_config(name: str = "demo") -> ml_collections.ConfigDict:
    """Data config with every source's defaults; ``name`` picks the one used."""
    if name not in SOURCES:
        raise ValueError(f"data.name must be one of {SOURCES}, got {name!r}")
    return ml_collections.ConfigDict({
        "name": name,
        "num_threads": 2,             # grain reader threads per process
        "prefetch_buffer_size": 256,  # decoded samples buffered per process
        "demo": {"demo_seed": 0, "num_train": 100_000, "eval_per_class": 20, "num_retrieval": 200},
        "cn_clip": {"root": "", "format": "tsv", "split": "train", "eval_split": "valid",
                    "eval_max_texts": 1000},
        "webdataset": {"shards": "", "eval_shards": "", "caption_keys": "txt,json", "eval_max_samples": 1000},
    })


def _process_shard(process_index, process_count):
    import grain

    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return grain.sharding.ShardOptions(shard_index=int(process_index), shard_count=int(process_count))


def _train_source(data_cfg, image_size: int):
    name = data_cfg.name
    if name == "demo":
        c = data_cfg.demo
        return demo.DemoSource(image_size=image_size, num_train=c.num_train, seed=c.demo_seed)
    if name == "cn_clip":
        from . import cn_clip

        return cn_clip.open_source(data_cfg.cn_clip, split=data_cfg.cn_clip.split)
    if name == "webdataset":
        from . import webdataset

        return webdataset.TarSource(data_cfg.webdataset.shards, data_cfg.webdataset.caption_keys)
    raise ValueError(f"data.name must be one of {SOURCES}, got {name!r}")


def train_iterator(data_cfg, *, global_batch_size: int, seed: int, image_size: int,
                   context_length: int = 52, process_index: int | None = None,
                   process_count: int | None = None) -> TrainIterator:
    """Infinite, deterministic, checkpointable iterator of this process's batches.

    global_batch_size must divide by the process count; process_index/process_count default
    to jax's (pass them explicitly to simulate hosts).
    """
    shard = _process_shard(process_index, process_count)
    if global_batch_size <= 0 or global_batch_size % shard.shard_count:
        raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of the "
                         f"process count {shard.shard_count}")
    source = _train_source(data_cfg, image_size)
    return build_train_iterator(
        source, batch_size=global_batch_size // shard.shard_count, seed=seed, image_size=image_size,
        context_length=context_length, shard=shard, num_threads=data_cfg.num_threads,
        prefetch_buffer_size=data_cfg.prefetch_buffer_size, name=f"data[{data_cfg.name}]")


def eval_sets(data_cfg, *, image_size: int, context_length: int = 52) -> dict:
    """Named eval sets (the same on every process), images held lazily as ``images`` (a
    random-access sequence of raw images that the evaluator decodes batch by batch).

    demo: see ``demo.eval_sets`` ("zeroshot", "zeroshot_unseen", "retrieval").
    cn_clip / webdataset: "retrieval" only, from the eval split / eval shards ({} if none given):
    {"images", "input_ids", "attention_mask" int32 (t, L), "texts", "text_to_images"}.
    """
    name = data_cfg.name
    if name == "demo":
        return demo.eval_sets(data_cfg.demo, image_size=image_size, context_length=context_length)
    if name == "cn_clip":
        from . import cn_clip

        return cn_clip.eval_sets(data_cfg.cn_clip, image_size=image_size, context_length=context_length)
    if name == "webdataset":
        from . import webdataset

        return webdataset.eval_sets(data_cfg.webdataset, image_size=image_size, context_length=context_length)
    raise ValueError(f"data.name must be one of {SOURCES}, got {name!r}")
