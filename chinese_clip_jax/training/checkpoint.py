"""Checkpoints: Orbax ``CheckpointManager`` holding the train state and the data iterator state.

Layout under ``DIR/checkpoints/<step>/``: ``state/`` (params, optimizer state, step, rng;
every process writes its own shards, Orbax coordinates) and ``data/process_<i>-of-<n>.json``
(each process's iterator ``get_state()``, JSON). A checkpoint becomes visible only once
complete, so a run killed mid-save resumes from the previous one.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from ..io import first_line, quiet_orbax_failures
from .state import TrainState

__all__ = [
    "Checkpointer",
    "CheckpointUnreadableError",
    "DataIteratorHandler",
    "DataIteratorSave",
    "DataIteratorRestore",
]

logger = logging.getLogger(__name__)


class CheckpointUnreadableError(RuntimeError):
    """Checkpoints exist but none restores; the message lists each with its reason."""


def _to_json(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return {"__bytes_b64__": base64.b64encode(obj).decode("ascii")}
    if isinstance(obj, dict):
        return {k: _to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    return obj


def _from_json(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__bytes_b64__"}:
            return base64.b64decode(obj["__bytes_b64__"])
        return {k: _from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json(v) for v in obj]
    return obj


class DataIteratorHandler:
    """Orbax handler for any iterator with ``get_state()`` / ``set_state(state)``: one JSON file
    per process, so each host restores its own shard's position."""

    def _file(self, directory: epath.Path) -> epath.Path:
        return epath.Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory: epath.Path, args: DataIteratorSave):
        self._file(directory).write_text(json.dumps(_to_json(args.item.get_state())))

    def restore(self, directory: epath.Path, args: DataIteratorRestore):
        path = self._file(directory)
        if not path.exists():
            raise FileNotFoundError(
                f"no data-iterator state {path}: was this checkpoint written with another process count?"
            )
        args.item.set_state(_from_json(json.loads(path.read_text())))
        return args.item

    def structure(self, directory):
        return None

    def metadata(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass

    @classmethod
    def typestr(cls):
        return f"{cls.__module__}.{cls.__qualname__}"


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
    item: Any


class Checkpointer:
    """Saves every ``every`` steps (and when forced), keeps the last ``max_to_keep``.

    ``directory`` is shared by all processes; every process calls every method.
    """

    def __init__(self, directory: str | os.PathLike, every: int, max_to_keep: int = 3, async_save: bool = True):
        if every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {every}")
        from ..io import as_path

        self.directory = as_path(directory, what="checkpoint directory")  # local or gs://...
        self.every = int(every)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, step: int, state: TrainState, data_iter: Any | None = None, force: bool = False) -> bool:
        """Saves ``state`` (after ``step`` updates) and the iterator position; returns whether it did."""
        if not (force or self.should_save(step)) or step in self._manager.all_steps():
            return False
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = DataIteratorSave(data_iter)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, abstract_state: TrainState, data_iter: Any | None = None, step: int | None = None) -> TrainState:
        """Restores into the shapes, dtypes and shardings of ``abstract_state`` (ShapeDtypeStructs);
        ``data_iter`` is repositioned in place."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = DataIteratorRestore(data_iter)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def restore_latest_readable(
        self, abstract_state: TrainState, data_iter: Any | None, fresh: TrainState
    ) -> tuple[TrainState, int]:
        """``(state, step)`` from the newest checkpoint that restores; ``(fresh, 0)`` where there is none.

        An unreadable checkpoint (truncated or zeroed arrays, missing metadata, garbage iterator
        state, an empty step directory) is named in a warning and moved aside to
        ``<step>.unreadable`` (kept, not deleted), and the next older one is tried; if checkpoints
        exist but none restores, a ``CheckpointUnreadableError`` lists them all.
        """
        root = epath.Path(self.directory)
        listed = set(self._manager.all_steps())
        on_disk = {int(p.name) for p in root.iterdir() if p.name.isdigit()} if root.exists() else set()
        bad = []
        for step in sorted(listed | on_disk, reverse=True):
            try:
                if step not in listed:
                    raise FileNotFoundError("incomplete: Orbax does not list it")
                with quiet_orbax_failures():
                    state = self.restore(abstract_state, data_iter, step=step)
            except Exception as e:  # noqa: BLE001 - any failure means: not this checkpoint
                reason = first_line(e, 200)
                logger.warning("checkpoint %s is unreadable (%s); trying an older one", root / str(step), reason)
                bad.append((step, reason))
                continue
            if bad:
                self._set_aside([s for s, _ in bad])
                logger.warning(
                    "resuming from step %d, the newest readable checkpoint in %s (unreadable: %s)",
                    step,
                    root,
                    ", ".join(f"{s}" for s, _ in bad),
                )
            return state, step
        if bad:
            raise CheckpointUnreadableError(
                f"no readable checkpoint in {root}: "
                + "; ".join(f"step {s} ({r})" for s, r in bad)
                + ". Move them away to start afresh."
            )
        return fresh, 0

    def _set_aside(self, steps: list[int]) -> None:
        """Renames unreadable step directories to ``<step>.unreadable[-k]`` (process 0), so they are
        kept for inspection but never listed or overwritten."""
        if jax.process_index() == 0:
            root = epath.Path(self.directory)
            for step in steps:
                target = root / f"{step}.unreadable"
                k = 0
                while target.exists():
                    k += 1
                    target = root / f"{step}.unreadable-{k}"
                (root / str(step)).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("checkpoint_set_aside")
        self._manager.reload()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(state: TrainState, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs (with shardings) of ``state``, the restore target."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
