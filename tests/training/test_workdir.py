"""The workdir (``training.workdir``): its lock (a second run fails at once naming the holder; a stale lock
is taken over) and where it may live."""

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest
from _makers import REPO, one_line_error, run_module
from _train_run import tiny_train_config

from chinese_clip_jax.training.loop import train
from chinese_clip_jax.training.workdir import WorkdirLock, WorkdirLockedError


def test_second_run_fails_at_once_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "lock.json").write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid}))
        with pytest.raises(
            WorkdirLockedError, match=f"in use by the run with pid {holder.pid} on host '{socket.gethostname()}'"
        ):
            train(tiny_train_config(2), str(tmp_path), progress=False)
        assert sorted(os.listdir(tmp_path)) == ["lock.json"]  # nothing built, nothing written
        assert json.loads((tmp_path / "lock.json").read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "lock.json").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    with caplog.at_level(logging.WARNING):
        with WorkdirLock(tmp_path):
            assert json.loads((tmp_path / "lock.json").read_text())["pid"] == os.getpid()
            with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()}"):
                WorkdirLock(tmp_path).acquire()
    assert f"stale lock {tmp_path / 'lock.json'}" in caplog.text and f"pid {dead.pid}" in caplog.text
    assert not (tmp_path / "lock.json").exists()  # released
    (tmp_path / "lock.json").write_text('{"host": "x", "pi')  # torn by a crash while writing it
    with WorkdirLock(tmp_path):
        pass


def test_gs_workdir_without_gcsfs_is_one_line_before_any_work(tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow's gfile serves gs:// here")
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "gcsfs.py").write_text("raise ImportError('No module named gcsfs')\n")  # as if not installed
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(stub), REPO]))
    result = run_module("train", "--config", "train/configs/demo.py", "--workdir", "gs://bucket/run", env=env)
    assert one_line_error(result, only_line=True) == (
        "error: --workdir 'gs://bucket/run': the gs:// backend is not installed; pip install gcsfs"
    )


def test_lock_with_our_own_pid_not_written_by_us_is_stale(tmp_path, caplog):
    """After a container restart the new run can get the dead run's pid: the lock names our pid."""
    import logging

    from chinese_clip_jax.training.workdir import WorkdirLock, WorkdirLockedError

    lock = tmp_path / "lock.json"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time() - 600}))
    with caplog.at_level(logging.WARNING), WorkdirLock(tmp_path) as held:
        assert json.loads(lock.read_text()) == held.me
        with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()}"):  # ours, written by us: held
            WorkdirLock(tmp_path).acquire()
    assert "now this run's own pid" in caplog.text and not lock.exists()


def test_lock_whose_pid_was_reused_by_a_later_process_is_stale(tmp_path, caplog):
    import logging

    from chinese_clip_jax.training.workdir import WorkdirLock, WorkdirLockedError, _process_start_time

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        began = _process_start_time(other.pid)
        if began is None:
            pytest.skip("no /proc: process start times unknown")
        assert abs(began - time.time()) < 60  # the reference: it started just now
        lock = tmp_path / "lock.json"
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid, "started": began + 5}))
        with pytest.raises(WorkdirLockedError, match=f"in use by the run with pid {other.pid}"):
            WorkdirLock(tmp_path).acquire()  # written after that process started: it may be the holder
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid, "started": began - 3600}))
        with caplog.at_level(logging.WARNING), WorkdirLock(tmp_path):
            pass  # written an hour before that process existed: the pid was reused
        assert "reused by a process started after the lock was written" in caplog.text
    finally:
        other.kill()
        other.wait()
