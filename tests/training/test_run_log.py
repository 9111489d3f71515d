"""metrics.jsonl and TensorBoard events on a gs:// workdir (the in-memory fsspec ``fake_gcs``):
a tiny ``train()`` leaves event files whose scalars equal metrics.jsonl, copied during the run
(at checkpoints) as well as at the end, and a resumed log keeps each step once. The event files
are read back by parsing the TFRecord framing here (length, masked CRC-32C of both, computed
bit by bit below, not with tensorboardX's code) and the Event protos."""

import json
import struct

import pytest
from _train_run import HookedIterator, tiny_train_config

from chinese_clip_jax.data import train_iterator
from chinese_clip_jax.io import as_path
from chinese_clip_jax.training import loop
from chinese_clip_jax.training.checkpoint import Checkpointer
from chinese_clip_jax.training.run_log import RunLog


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _events(blob: bytes) -> list:
    """Every Event in one event file; asserts the framing and both checksums of each record."""
    from tensorboardX.proto.event_pb2 import Event

    out, pos = [], 0
    while pos < len(blob):
        header = blob[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", blob[pos + 8 : pos + 12])[0] == _masked(header)
        data = blob[pos + 12 : pos + 12 + length]
        assert len(data) == length
        assert struct.unpack("<I", blob[pos + 12 + length : pos + 16 + length])[0] == _masked(data)
        out.append(Event.FromString(data))
        pos += 16 + length
    return out


def _read_run(store, prefix="bucket/run"):
    """(metrics.jsonl rows, {(tag, step): value} of all scalar events, START steps, event file count)."""
    rows = [json.loads(line) for line in bytes(store[f"{prefix}/metrics.jsonl"].getvalue()).decode().splitlines()]
    files = sorted(k for k in store if k.startswith(f"{prefix}/tensorboard/events.out.tfevents."))
    scalars, starts = {}, []
    for key in files:
        for e in _events(bytes(store[key].getvalue())):
            if e.HasField("session_log"):
                starts.append(e.step)
            for v in e.summary.value:
                if v.HasField("simple_value"):
                    scalars[(v.tag, e.step)] = v.simple_value
    return rows, scalars, starts, len(files)


def _assert_match(rows, scalars):
    expected = {(k, r["step"]): v for r in rows for k, v in r.items() if k != "step"}
    assert set(expected) <= set(scalars)
    for key, value in expected.items():
        assert scalars[key] == pytest.approx(value, rel=1e-6), key  # float32 in the event


@pytest.mark.slow
def test_gs_workdir_gets_metrics_and_tensorboard_events(fake_gcs, tmp_path, monkeypatch):
    # Orbax writes arrays through tensorstore's own gs:// driver (real GCS), so the checkpoints
    # alone go to a local directory; everything else goes to the fake gs://bucket/run.
    monkeypatch.setattr(loop, "Checkpointer", lambda _dir, *a, **k: Checkpointer(tmp_path / "ckpt", *a, **k))
    store = fake_gcs.store
    seen_mid_run = []

    def hook(index, batch):
        if index == 3:  # fetching step 3's batch: step 2's checkpoint is saved and the logs copied
            seen_mid_run.append(_read_run(store))
        return batch

    config = tiny_train_config(4, checkpoint_every=2)
    data = HookedIterator(
        train_iterator(config.data, global_batch_size=16, seed=config.seed, image_size=16, context_length=16), hook
    )
    result = loop.train(config, "gs://bucket/run", data_iter=data, progress=False)
    assert result["step"] == 4
    assert not list((tmp_path).glob("gs:*")) and not any(k.startswith("gs:") for k in store)
    rows, scalars, starts, n_files = _read_run(store)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and n_files == 1 and starts == []
    assert {"train/loss", "train/lr", "train/grad_norm"} <= {tag for tag, _ in scalars}
    _assert_match(rows, scalars)
    mid_rows, mid_scalars, _, _ = seen_mid_run[0]
    assert [r["step"] for r in mid_rows] == [1, 2]  # copied at the step-2 checkpoint, mid-run
    _assert_match(mid_rows, mid_scalars)

    # a run that logged past its last checkpoint (step 4) and died mid-line: the resumed run's
    # log (train() makes it with the checkpoint's step) drops those lines and tells TensorBoard
    # to hide the earlier file's events from step 5 on
    metrics = as_path("gs://bucket/run/metrics.jsonl")
    metrics.write_bytes(metrics.read_bytes() + b'{"step": 5, "train/loss": 9.0}\n{"step": 6, "tra')
    log = RunLog(as_path("gs://bucket/run"), 4, sync_every_s=3600)
    log.write(5, {"train/loss": 1.5})
    log.write(6, {"train/loss": 1.25})
    assert [r["step"] for r in _read_run(store)[0]] == [1, 2, 3, 4]  # the copy is not due yet
    log.close()  # ... and made at the end
    rows, scalars, starts, n_files = _read_run(store)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and n_files == 2 and starts == [5]
    _assert_match(rows, scalars)
    assert scalars[("train/loss", 6)] == 1.25


def test_local_workdir_is_written_in_place(tmp_path):
    log = RunLog(as_path(tmp_path), 0)
    log.write(1, {"train/loss": 2.5})
    log.write(2, {"train/loss": 1.25, "eval/r1": 0.5})
    # readable before close: every event is on disk once write returns (no writer thread)
    (events_file,) = (tmp_path / "tensorboard").iterdir()
    seen = {(v.tag, e.step): v.simple_value for e in _events(events_file.read_bytes()) for v in e.summary.value}
    assert seen == {("train/loss", 1): 2.5, ("train/loss", 2): 1.25, ("eval/r1", 2): 0.5}
    log.close()
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
