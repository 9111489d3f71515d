"""Trainer hardening (issue 13): config values validated before anything is built, the workdir lock,
a rerun with another model, corrupt checkpoints (named, set aside, resumed from the newest readable
one), a torn metrics line, a full disk, and bitwise-repeatable demo runs."""

import glob
import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import pytest
from _train_run import make_iterator, tiny_train_config

from chinese_clip_jax.training.checkpoint import Checkpointer, CheckpointUnreadableError, abstract_like
from chinese_clip_jax.training.loop import train
from chinese_clip_jax.training.recipes import base, demo
from chinese_clip_jax.training.validate import ConfigError, validate_config
from chinese_clip_jax.training.workdir import WorkdirLock, WorkdirLockedError

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _set(config, dotted, value):
    *parents, leaf = dotted.split(".")
    for p in parents:
        config = config[p]
    config[leaf] = value


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("log_every", 0, "config.log_every = 0: must be an int >= 1"),
        ("accum_steps", 0, "config.accum_steps = 0: must be an int >= 1"),
        ("keep_checkpoints", 0, "config.keep_checkpoints = 0: must be an int >= 1"),
        ("optimizer.warmup_steps", -10, "config.optimizer.warmup_steps = -10: must be an int >= 0"),
        ("model.vision.num_attention_heads", 0, "config.model.vision.num_attention_heads must be an int >= 1, got 0"),
        ("data.name", "tfdss", "config.data.name = 'tfdss': must be one of 'demo', 'cn_clip'"),
        ("dtype", "fp16", "config.dtype = 'fp16': must be one of 'auto', 'float32', 'bfloat16', 'float16'"),
        ("optimizer.learning_rate", 1e-3, "unknown config key 'optimizer.learning_rate'; did you mean 'optimizer.lr'"),
        ("foo", 1, "unknown config key 'foo'"),
    ],
)
def test_bad_training_values_are_one_line_errors(key, value, message):
    config = demo.get_config()
    _set(config, key, value)
    with pytest.raises(ConfigError) as info:
        validate_config(config, reference=base.get_config())
    assert message in str(info.value) and "\n" not in str(info.value)
    assert validate_config(demo.get_config(), reference=base.get_config()) is None


def test_cn_clip_format_choice_is_checked():
    config = demo.get_config()
    config.data.name, config.data.cn_clip.root, config.data.cn_clip.format = "cn_clip", "/data", "parquet"
    with pytest.raises(ConfigError, match="config.data.cn_clip.format = 'parquet': must be one of 'tsv', 'lmdb'"):
        validate_config(config)


def test_cli_unknown_key_exits_2_before_anything_is_built(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    for arg, want in (
        ("--config.optimizer.learning_rate=1e-3", "did you mean 'optimizer.lr'"),
        ("--config.log_every=0", "config.log_every = 0: must be an int >= 1"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "train", "--config", "train/configs/demo.py", "--workdir", str(tmp_path / "w"), arg],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], lines
        assert not (tmp_path / "w").exists()


# --------------------------------------------------------------------------- the workdir lock


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


# --------------------------------------------------------------------------- reruns and checkpoints


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    config = tiny_train_config(8)
    assert train(config, workdir, data_iter=make_iterator(config), progress=False)["step"] == 8
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]
    return workdir


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
    reference = dict(_losses(workdir))
    _corrupt(os.path.join(workdir, "checkpoints", "8"), "zeroed")
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 9, "train/lo')  # a torn last line (crash or full disk while appending)
    config = tiny_train_config(8)
    with caplog.at_level(logging.WARNING):
        result = train(config, workdir, data_iter=make_iterator(config), progress=False)
    assert result["step"] == 8
    assert "resuming from step 4" in caplog.text and "dropped 1 unreadable line" in caplog.text
    resumed = _losses(workdir)
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


# --------------------------------------------------------------------------- reproducibility


def test_two_demo_runs_give_bitwise_equal_losses(tmp_path):
    runs = []
    for name in ("a", "b"):
        config = demo.get_config()
        config.total_steps, config.log_every, config.eval_every, config.export_hf = 30, 1, 0, False
        train(config, str(tmp_path / name), progress=False)
        runs.append(_losses(tmp_path / name))
    assert [s for s, _ in runs[0]] == list(range(1, 31))
    assert runs[0] == runs[1]  # exact float equality, step by step
