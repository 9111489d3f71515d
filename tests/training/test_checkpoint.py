"""Checkpoints (``training.checkpoint``): corrupt ones named, set aside and resumed from the newest
readable one; a torn metrics line; a rerun with another model; a full disk while writing one."""

import glob
import logging
import os
import shutil
import subprocess
import sys

import pytest
from _makers import REPO, logged_losses
from _makers import TESTS as HERE
from _train_run import make_iterator, tiny_train_config

from chinese_clip_jax.training.checkpoint import Checkpointer, CheckpointUnreadableError, abstract_like
from chinese_clip_jax.training.loop import train
from chinese_clip_jax.training.validate import ConfigError

# --------------------------------------------------------------------------- reruns and checkpoints


@pytest.fixture(scope="module")
def finished_run(trained_workdir):
    return trained_workdir


def _copy(src, tmp_path):
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
    from chinese_clip_jax.inference import sharding as shd
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
        workdir = _copy(finished_run, tmp_path / how)
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
    workdir = _copy(finished_run, tmp_path)
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
    workdir = _copy(finished_run, tmp_path)
    for step in ("4", "8"):
        _corrupt(os.path.join(workdir, "checkpoints", step), "no_METADATA")
    with pytest.raises(CheckpointUnreadableError, match=r"no readable checkpoint in .*: step 8 \(.*\); step 4"):
        train(tiny_train_config(8), workdir, progress=False)


def test_rerun_with_another_model_size_names_the_mismatch(finished_run, tmp_path):
    workdir = _copy(finished_run, tmp_path)
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


@pytest.mark.slow
def test_disk_full_removes_temporaries_and_says_so(tmp_path):
    code = (  # the child limits itself (no preexec_fn: forking this jax process to run Python can deadlock)
        "import resource, signal\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (500_000, 500_000))\n"  # < one checkpoint's largest file
        "from _train_run import tiny_train_config\n"
        "from chinese_clip_jax.training.loop import train\n"
        f"train(tiny_train_config(8), {str(tmp_path)!r}, progress=False)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=f"{HERE}:{REPO}"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("OSError: disk full (or file-size limit) while writing in ") and "removed" in last
    left = [p for p in glob.glob(f"{tmp_path}/**/*", recursive=True) if "tmp" in os.path.basename(p)]
    assert left == [] and not os.path.exists(tmp_path / "lock.json")
    assert "sys.meta_path is None" not in result.stderr
