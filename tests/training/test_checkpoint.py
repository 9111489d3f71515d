"""Checkpoints (``training.checkpoint``): corrupt ones named, set aside and resumed from the newest
readable one; a torn metrics line; a rerun with another model; a full disk while writing one."""

import glob
import logging
import os
import shutil

import pytest
from _makers import logged_losses
from _train_run import make_iterator, tiny_train_config

from chinese_clip_jax.training.checkpoint import Checkpointer, CheckpointUnreadableError, abstract_like
from chinese_clip_jax.training.loop import train
from chinese_clip_jax.training.validate import ConfigError

# --------------------------------------------------------------------------- reruns and checkpoints


@pytest.fixture(scope="module")
def finished_run(trained_workdir):
    return trained_workdir


def _copy_run(src, tmp_path):
    dst = str(tmp_path / "run")
    shutil.copytree(src, dst)
    return dst


def _corrupt(step_dir, how):
    if how == "truncated":
        for f in glob.glob(f"{step_dir}/state/**/d/*", recursive=True):
            os.truncate(f, 10)
    elif how == "zeroed":
        for f in glob.glob(f"{step_dir}/state/**/d/*", recursive=True):
            with open(f, "r+b") as fh:
                fh.write(b"\0" * os.path.getsize(f))
    elif how == "no_METADATA":
        os.remove(f"{step_dir}/state/_METADATA")
    elif how == "no_manifests":
        for f in glob.glob(f"{step_dir}/state/**/manifest.ocdbt", recursive=True):
            os.remove(f)
    elif how == "iterator_garbage":
        for f in glob.glob(f"{step_dir}/data/*.json"):
            with open(f, "w") as fh:
                fh.write("{garbage")
    elif how == "empty":
        shutil.rmtree(step_dir)
        os.makedirs(step_dir)


def _restore_target(config):
    from chinese_clip_jax import sharding as shd
    from chinese_clip_jax.modeling import ChineseCLIPModel
    from chinese_clip_jax.training.optim import make_optimizer
    from chinese_clip_jax.training.state import create_train_state
    from chinese_clip_jax.training.validate import build_model_config

    model = ChineseCLIPModel(build_model_config(config.model), scan_layers=True, remat="dots")
    tx, _ = make_optimizer(config.optimizer, config.total_steps)
    state, shardings = create_train_state(model, tx, shd.make_mesh(-1, 1, 1), config.seed)
    return state, abstract_like(state, shardings)


CORRUPTIONS = ["truncated", "zeroed", "no_METADATA", "no_manifests", "iterator_garbage", "empty"]


def test_each_corruption_is_named_and_the_older_checkpoint_restores(finished_run, tmp_path, caplog):
    config = tiny_train_config(8)
    fresh, target = _restore_target(config)
    for how in CORRUPTIONS:
        workdir = _copy_run(finished_run, tmp_path / how)
        ckpt_dir = os.path.join(workdir, "checkpoints")
        kept = sorted(os.listdir(os.path.join(ckpt_dir, "8")))
        _corrupt(os.path.join(ckpt_dir, "8"), how)
        caplog.clear()
        ckpt = Checkpointer(ckpt_dir, 4)
        with caplog.at_level(logging.WARNING):
            _, step = ckpt.restore_latest_readable(target, make_iterator(config), fresh=fresh)
        ckpt.close()
        assert step == 4, how
        assert f"checkpoint {ckpt_dir}/8 is unreadable" in caplog.text, how
        assert "resuming from step 4, the newest readable checkpoint" in caplog.text, how
        assert sorted(os.listdir(ckpt_dir)) == ["4", "8.unreadable"], how  # set aside, not deleted
        if how != "empty":
            assert len(os.listdir(os.path.join(ckpt_dir, "8.unreadable"))) == len(kept), how


def test_rerun_resumes_exactly_from_the_newest_readable_checkpoint(finished_run, tmp_path, caplog):
    workdir = _copy_run(finished_run, tmp_path)
    reference = dict(logged_losses(workdir))
    _corrupt(os.path.join(workdir, "checkpoints", "8"), "zeroed")
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 9, "train/lo')  # a torn last line (crash or full disk while appending)
    config = tiny_train_config(8)
    with caplog.at_level(logging.WARNING):
        result = train(config, workdir, data_iter=make_iterator(config), progress=False)
    assert result["step"] == 8
    assert "resuming from step 4" in caplog.text and "dropped 1 unreadable line" in caplog.text
    resumed = logged_losses(workdir)
    assert [s for s, _ in resumed] == list(range(1, 9))  # each step once, the torn line gone
    assert dict(resumed) == reference  # steps 5-8 redone bitwise
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8", "8.unreadable"]
    assert not os.path.exists(os.path.join(workdir, "lock.json"))


def test_no_readable_checkpoint_stops_naming_each(finished_run, tmp_path):
    workdir = _copy_run(finished_run, tmp_path)
    for step in ("4", "8"):
        _corrupt(os.path.join(workdir, "checkpoints", step), "no_METADATA")
    with pytest.raises(CheckpointUnreadableError, match=r"no readable checkpoint in .*: step 8 \(.*\); step 4"):
        train(tiny_train_config(8), workdir, progress=False)


def test_rerun_with_another_model_size_names_the_mismatch(finished_run, tmp_path):
    workdir = _copy_run(finished_run, tmp_path)
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    config = tiny_train_config(8)
    config.model.text.hidden_size = 32
    with pytest.raises(
        ConfigError,
        match=r"holds checkpoints of another model: text_config.hidden_size is 16 "
        r"there, 32 now",
    ):
        train(config, workdir, progress=False)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_disk_full_removes_temporaries_and_says_so(tmp_path, monkeypatch):
    """The disk fills while the first checkpoint is written: injected (the save leaves what a cut
    Orbax write leaves, a tmp directory with a partial file, then fails with ENOSPC wrapped as Orbax
    wraps it) rather than raced against a file-size limit, so the outcome never depends on load."""
    import errno

    def full_disk(self, step, state, data_iter=None, force=False):
        partial = self.directory / f"{step}.orbax-checkpoint-tmp-1234" / "params"
        partial.mkdir(parents=True)
        (partial / "0.0").write_bytes(b"\0" * 1000)
        (tmp_path / "metrics.jsonl.tmp").write_text("{")
        raise ValueError("tensorstore write failed") from OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Checkpointer, "save", full_disk)
    with pytest.raises(OSError) as e:
        train(tiny_train_config(8), str(tmp_path), progress=False)
    assert str(e.value).startswith(f"disk full (or file-size limit) while writing in {tmp_path}: ")
    assert "temporary checkpoint files were removed" in str(e.value)
    left = [p for p in glob.glob(f"{tmp_path}/**/*", recursive=True) if "tmp" in os.path.basename(p)]
    assert left == [] and not os.path.exists(tmp_path / "lock.json")
