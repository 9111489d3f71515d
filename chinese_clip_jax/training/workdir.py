"""What a run keeps in its workdir besides checkpoints and metrics: the lock and the model config.

* ``WorkdirLock``: ``DIR/lock.json`` (host, pid, start time) written by process 0 through
  ``etils.epath`` (so ``gs://`` workdirs lock too). A second run on the same workdir fails at
  once naming the holder; a lock whose holder is gone (same host, and the pid no longer running,
  reused by a process started after the lock was written, or our own pid in a lock this process
  did not write: a restarted container hands out the old pids again) is taken over with a
  warning. A lock held by another host is never taken over automatically: the message says which
  file to delete once that run is known to be dead.
* ``check_model_config``: ``DIR/model_config.json`` records the architecture the checkpoints hold;
  a rerun with another one fails naming the keys that differ, before any restore.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

from etils import epath

from ..io import atomic_write, first_line

__all__ = ["WorkdirLock", "WorkdirLockedError", "check_model_config", "LOCK_FILE", "MODEL_CONFIG_FILE"]

logger = logging.getLogger(__name__)

LOCK_FILE = "lock.json"
MODEL_CONFIG_FILE = "model_config.json"


class WorkdirLockedError(RuntimeError):
    """Another live run holds the workdir; the message names it (host, pid)."""


_HELD: dict[str, dict] = {}  # lock path -> the record this process wrote there (the locks it holds)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), from /proc; None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # after "pid (comm)": state is field 3
        with open("/proc/stat", "rb") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith(b"btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time in clock ticks
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _stale_reason(holder: dict, path: str, me: dict) -> str | None:
    """Why the lock ``holder`` (read from ``path``) is stale, or None while its run may be alive.

    Stale: a torn file; on this host, a pid that no longer runs, our own pid in a lock this process
    did not write (a restarted container reuses pids, so the new run can be given the old run's
    pid), or a pid whose process started after the lock was written (the pid was reused).
    """
    if not holder:
        return "unreadable lock file"
    if holder["host"] != me["host"]:
        return None
    pid = int(holder["pid"])
    if pid == me["pid"]:
        return None if _HELD.get(path) == holder else f"pid {pid} on {holder['host']}, now this run's own pid"
    if not _pid_alive(pid):
        return f"pid {pid} on {holder['host']}"
    started, began = holder.get("started"), _process_start_time(pid)
    if isinstance(started, (int, float)) and began is not None and began > started + 1.0:
        return f"pid {pid} on {holder['host']}, now reused by a process started after the lock was written"
    return None


class WorkdirLock:
    """``with WorkdirLock(workdir):`` holds ``workdir/lock.json`` for the body's duration."""

    def __init__(self, workdir: str | os.PathLike):
        self.path = epath.Path(workdir) / LOCK_FILE
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self._held = False

    def _read(self) -> dict | None:
        try:
            d = json.loads(self.path.read_text())
            return d if isinstance(d, dict) and "pid" in d and "host" in d else {}
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            return {}  # torn or unreadable: a run died while writing it

    def _create(self) -> bool:
        """Creates the lock file only if absent (O_EXCL locally; write-then-read-back elsewhere)."""
        text = json.dumps(self.me)
        if self.path.parts and str(self.path).startswith("/"):
            try:
                fd = os.open(str(self.path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return True
        if self.path.exists():
            return False
        self.path.write_text(text)
        return self._read() == self.me

    def acquire(self) -> WorkdirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self._held = True
                _HELD[str(self.path)] = self.me
                return self
            holder = self._read()
            if holder is None:
                continue  # released meanwhile: try again
            stale = _stale_reason(holder, str(self.path), self.me)
            if stale is None:
                raise WorkdirLockedError(
                    f"workdir {self.path.parent} is in use by the run with pid {holder['pid']} on host "
                    f"{holder['host']!r} (lock {self.path}); wait for it, stop it, or use another --workdir"
                    + ("" if holder["host"] == self.me["host"] else "; if that run is dead, delete the lock file")
                )
            logger.warning("taking over the stale lock %s of a run that is gone (%s)", self.path, stale)
            self.path.unlink(missing_ok=True)
        raise WorkdirLockedError(f"could not take the lock {self.path}: another run keeps taking it")

    def release(self) -> None:
        if self._held:
            if self._read() == self.me:
                self.path.unlink(missing_ok=True)
            if _HELD.get(str(self.path)) == self.me:
                del _HELD[str(self.path)]
            self._held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def check_model_config(workdir: str | os.PathLike, model_config_dict: dict, resuming: bool) -> None:
    """Records the run's architecture in ``workdir/model_config.json`` or, when it is already
    there and checkpoints exist, raises ValueError naming the keys that differ."""
    path = epath.Path(workdir) / MODEL_CONFIG_FILE
    if resuming and path.exists():
        try:
            saved = json.loads(path.read_text())
            why = None if isinstance(saved, dict) else f"a JSON {type(saved).__name__}, not an object"
        except ValueError as e:
            saved, why = None, first_line(e)
        if why:  # torn or edited: rewritten; Orbax checks the shapes at restore
            logger.warning("%s is damaged (%s): rewritten from this run's model", path, why)
        if isinstance(saved, dict) and saved != model_config_dict:
            from .validate import ConfigError

            diffs = _differences(saved, model_config_dict)
            raise ConfigError(
                f"workdir {epath.Path(workdir)} holds checkpoints of another model: "
                + ", ".join(f"{k} is {a!r} there, {b!r} now" for k, a, b in diffs[:4])
                + ("" if len(diffs) <= 4 else f" (+{len(diffs) - 4} more)")
                + "; use a new --workdir, or the same model settings to resume"
            )
        if isinstance(saved, dict):
            return
    atomic_write(path, json.dumps(model_config_dict, indent=1, sort_keys=True))


def _differences(a, b, prefix: str = "") -> list[tuple[str, object, object]]:
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out.extend(_differences(x, y, f"{prefix}{k}."))
        elif x != y:
            out.append((f"{prefix}{k}", x, y))
    return out
