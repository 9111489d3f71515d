"""A run's ``metrics.jsonl`` and TensorBoard events, in a workdir on any ``etils.epath`` scheme.

``RunLog(workdir, resume_step)`` (process 0 writes, other processes do nothing):

* ``write(step, metrics)`` appends ``{"step": step, **metrics}`` to ``DIR/metrics.jsonl`` and one
  scalar event per metric to an event file in ``DIR/tensorboard``; ``image(tag, hwc, step)``
  adds an image event. Events are written synchronously (tensorboardX's ``EventsWriter``, the
  record writer under its ``SummaryWriter``, without the background thread whose queue
  ``flush()`` does not drain), so what a sync copies holds every event written so far.
* A local workdir is written in place. Any other scheme (``gs://``, ``s3://``, ...) cannot be:
  tensorboardX sends ``gs://`` to google-cloud-storage and ``s3://`` to boto3 (bypassing
  epath's backend and credentials) and makes a local ``./az:`` folder for other schemes, and
  object stores cannot append. So both files are written in a local staging directory and
  copied whole through epath into ``DIR`` by ``sync()``: the loop calls it at every eval and
  checkpoint, ``write`` calls it at most every ``sync_every_s`` seconds, ``close`` at the end.
  Each copy replaces the object in one upload, so a reader sees the previous or the new
  file, never a torn one.
* Resuming from ``resume_step``: lines of later steps (and a half-written last line) are dropped
  from ``metrics.jsonl``, and the new event file starts with a ``SessionLog.START`` at
  ``resume_step + 1``, which tells TensorBoard to hide the earlier files' events of the steps
  the run redoes (tensorboardX's ``purge_step``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time

import jax
import numpy as np

from ..io import atomic_write, is_local

__all__ = ["RunLog", "METRICS_FILE", "TENSORBOARD_DIR"]

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class RunLog:
    """metrics.jsonl + TensorBoard for ``workdir`` (an ``epath.Path``), on process 0 only."""

    def __init__(self, workdir, resume_step: int, *, sync_every_s: float = 60.0):
        self.active = jax.process_index() == 0
        self.remote = not is_local(workdir)
        self.workdir = workdir
        self.sync_every_s = float(sync_every_s)
        self._staging = None
        self._events = None
        self._last_sync = time.monotonic()
        self._synced: dict[str, int] = {}  # staged file name -> size last copied
        if not self.active:
            return
        from etils import epath

        if self.remote:
            self._staging = tempfile.mkdtemp(prefix="ccj-runlog-")
            local = epath.Path(self._staging)
        else:
            local = workdir
        self.path = local / METRICS_FILE  # the copy this process appends to (the workdir's, when local)
        existing = workdir / METRICS_FILE
        if existing.exists():
            lines = existing.read_bytes().decode("utf-8", errors="replace").splitlines(keepends=True)
            kept = _kept_lines(lines, resume_step, existing)
            if self.remote or kept != lines:
                self._write_kept(kept)
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        tb_dir = local / TENSORBOARD_DIR
        tb_dir.mkdir(parents=True, exist_ok=True)
        if self.remote:
            (workdir / TENSORBOARD_DIR).mkdir(parents=True, exist_ok=True)
        self._events = EventsWriter(str(tb_dir / "events"))
        if resume_step:
            self._add(Event(step=resume_step + 1, session_log=SessionLog(status=SessionLog.START)))
        self._events.flush()
        if self.remote:
            self.sync()

    def _write_kept(self, lines: list[str]) -> None:
        """Replaces the local metrics file with ``lines`` (temporary file, then rename)."""
        atomic_write(self.path, "".join(lines))

    def _add(self, event) -> None:
        if not event.wall_time:
            event.wall_time = time.time()
        self._events.write_event(event)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for k, v in metrics.items():
            self._add(Event(step=int(step), summary=scalar(k, float(v))))
        self._events.flush()
        if self.remote and time.monotonic() - self._last_sync >= self.sync_every_s:
            self.sync()

    def image(self, tag: str, image, step: int) -> None:
        """An RGB uint8 (H, W, 3) image to TensorBoard."""
        if not self.active:
            return
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import image as image_summary

        self._add(Event(step=int(step), summary=image_summary(tag, np.asarray(image), dataformats="HWC")))
        self._events.flush()
        self.sync()

    def rows(self) -> list[dict]:
        """The records of metrics.jsonl so far (this run's and the kept earlier ones)."""
        if not self.active or not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def sync(self) -> None:
        """Copies the staged files whole into a non-local workdir (nothing to do for a local one)."""
        if not (self.active and self.remote):
            return
        from etils import epath

        local = epath.Path(self._staging)
        files = [(local / METRICS_FILE, self.workdir / METRICS_FILE)]
        files += [(p, self.workdir / TENSORBOARD_DIR / p.name) for p in (local / TENSORBOARD_DIR).iterdir()]
        for src, dst in files:
            if src.is_file() and self._synced.get(str(src)) != os.path.getsize(src):
                data = src.read_bytes()
                dst.write_bytes(data)  # one whole-object upload: readers see the old or the new file
                self._synced[str(src)] = len(data)
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if self._events is None:
            return
        self._events.close()
        self._events = None
        try:
            self.sync()
        finally:
            if self._staging is not None:
                shutil.rmtree(self._staging, ignore_errors=True)


def _kept_lines(lines: list[str], resume_step: int, where) -> list[str]:
    """Lines of steps <= ``resume_step``; half-written lines (a crash, a full disk) dropped with a warning."""
    keep, torn = [], 0
    for line in lines:
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            torn += line.strip() != ""
            continue
        if step <= resume_step:
            keep.append(line if line.endswith("\n") else line + "\n")
    if torn:
        logger.warning("%s: dropped %d unreadable line(s) (a run stopped while writing them)", where, torn)
    return keep
