"""How long a run trains: ``total_steps`` as given, or ``epochs`` over the train split it opened.

``config.epochs`` > 0 (fine-tuning recipes) replaces ``total_steps`` by

    steps_per_epoch = ceil(train records / batch_size)
    total_steps     = ceil(epochs x train records / batch_size)

where train records is the size of the opened train split (every process's shard summed, after
records dropped while indexing), and ``eval_every`` / ``checkpoint_every`` of -1 become
``steps_per_epoch`` (once per epoch). ``resolve_run_length`` does this once, before the
optimizer (its schedule), the checkpointer and the loop read those keys, logs the result and
records it in ``DIR/run_length.json``. A resumed run (checkpoints in DIR) takes the recorded
numbers, so its schedule stays the one its checkpoints were trained with even if the data
changed (a warning says so); a resume that asks for other ``epochs`` or ``batch_size`` is
refused in one line.
"""

from __future__ import annotations

import json
import logging
import math

import jax
import numpy as np

from ..io import atomic_write, first_line
from .validate import ConfigError

__all__ = ["resolve_run_length", "RUN_LENGTH_FILE"]

logger = logging.getLogger(__name__)

RUN_LENGTH_FILE = "run_length.json"


def _train_records(data_iter) -> int:
    """Records in the whole train split: this process's shard, summed over processes."""
    local = getattr(data_iter, "shard_records", None)
    if local is None:
        raise ConfigError(
            f"config.epochs needs the train split's size, and the data iterator {type(data_iter).__name__} "
            "does not give it (shard_records); set config.epochs=0 and config.total_steps instead"
        )
    if jax.process_count() == 1:
        return int(local)
    from jax.experimental import multihost_utils

    return int(np.sum(multihost_utils.process_allgather(np.int64(local))))


def _resolve_on_process0(config, records: int, workdir, resuming: bool) -> tuple[int, int]:
    """(steps_per_epoch, total_steps): computed and recorded, or (resuming) read back."""
    path = workdir / RUN_LENGTH_FILE
    epochs, batch = float(config.epochs), int(config.batch_size)
    if resuming:
        if not path.exists():
            raise ConfigError(
                f"{workdir} holds checkpoints of a run that did not train by epochs (no {RUN_LENGTH_FILE}): "
                f"resume it with config.epochs=0 and its config.total_steps, or use a new workdir"
            )
        try:
            rec = json.loads(path.read_text())
            rec = {k: rec[k] for k in ("epochs", "batch_size", "train_records", "steps_per_epoch", "total_steps")}
            float(rec["epochs"]), int(rec["batch_size"]), int(rec["total_steps"]), int(rec["steps_per_epoch"])
        except (ValueError, KeyError, TypeError) as e:  # torn or edited: rebuilt from this run's settings
            logger.warning(
                "%s is damaged (%s): rewritten from this run's epochs=%g, batch_size=%d and %d train records",
                path,
                first_line(e),
                epochs,
                batch,
                records,
            )
            resuming = False
    if resuming:
        if (float(rec["epochs"]), int(rec["batch_size"])) != (epochs, batch):
            raise ConfigError(
                f"{path}: this run started with epochs={rec['epochs']:g}, batch_size={rec['batch_size']} "
                f"(total_steps {rec['total_steps']}); resuming with epochs={epochs:g}, batch_size={batch} would "
                "change its schedule: pass the recorded values or use a new workdir"
            )
        if int(rec["train_records"]) != records:
            logger.warning(
                "the train split has %d records now, %d when this run started: keeping its total_steps %d",
                records,
                rec["train_records"],
                rec["total_steps"],
            )
        return int(rec["steps_per_epoch"]), int(rec["total_steps"])
    steps_per_epoch, total = math.ceil(records / batch), math.ceil(epochs * records / batch)
    rec = {
        "epochs": epochs,
        "batch_size": batch,
        "train_records": records,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total,
    }
    atomic_write(path, json.dumps(rec, indent=1))
    return steps_per_epoch, total


def resolve_run_length(config, data_iter, workdir, resuming: bool | None):
    """``config`` itself (``epochs`` unset) or a copy whose ``total_steps`` (and ``eval_every`` /
    ``checkpoint_every`` of -1) come from ``epochs`` over the train split; every process calls
    it, ``resuming`` (checkpoints exist in ``workdir``) matters on process 0 only."""
    if not config.epochs:
        return config
    records = _train_records(data_iter)
    if jax.process_count() == 1:
        steps_per_epoch, total = _resolve_on_process0(config, records, workdir, bool(resuming))
    else:  # process 0 reads / writes the record; the others take its numbers
        from jax.experimental import multihost_utils

        error, values = "", np.zeros(2, np.int64)
        if jax.process_index() == 0:
            try:
                values = np.asarray(_resolve_on_process0(config, records, workdir, bool(resuming)), np.int64)
            except ConfigError as e:
                error = str(e)
        values = multihost_utils.broadcast_one_to_all(values if not error else np.full(2, -1, np.int64))
        if error or values[0] < 0:
            raise ConfigError(error or "process 0 refused the run length (its log says why)")
        steps_per_epoch, total = int(values[0]), int(values[1])
    config = config.copy_and_resolve_references()
    config.total_steps = total
    for key in ("eval_every", "checkpoint_every"):
        if config[key] == -1:
            config[key] = steps_per_epoch
    logger.info(
        "run length: epochs=%g at global batch %d: %d steps per epoch, total_steps %d (train split: %d records)",
        config.epochs,
        config.batch_size,
        steps_per_epoch,
        total,
        records,
    )
    return config
