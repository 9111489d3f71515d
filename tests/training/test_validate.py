"""The trainer's config checks (``training.validate``): each bad value is one line naming the key and what it must be,
given before anything is built, by the library and by ``ccj-train`` (exit 2)."""

import os
import subprocess
import sys

import pytest
from _makers import REPO

from chinese_clip_jax.training.recipes import base, demo
from chinese_clip_jax.training.validate import ConfigError, validate_config


def _set(config, dotted, value):
    *parents, leaf = dotted.split(".")
    for p in parents:
        config = config[p]
    config[leaf] = value


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("log_every", 0, "config.log_every = 0: must be an int >= 1"),
        ("accum_steps", 0, "config.accum_steps = 0: must be an int >= 1 or 'auto'"),
        ("accum_steps", "automatic", "config.accum_steps = 'automatic': must be an int >= 1 or 'auto'"),
        ("keep_checkpoints", 0, "config.keep_checkpoints = 0: must be an int >= 1"),
        ("optimizer.warmup_steps", -10, "config.optimizer.warmup_steps = -10: must be an int >= 0"),
        ("model.vision.num_attention_heads", 0, "config.model.vision.num_attention_heads must be an int >= 1, got 0"),
        ("data.name", "tfdss", "config.data.name = 'tfdss': must be one of 'demo', 'cn_clip'"),
        ("dtype", "fp16", "config.dtype = 'fp16': must be one of 'auto', 'float32', 'bfloat16', 'float16'"),
        ("optimizer.learning_rate", 1e-3, "unknown config key 'optimizer.learning_rate'; did you mean 'optimizer.lr'"),
        ("foo", 1, "unknown config key 'foo'"),
        (
            "model.attention_impl",
            "flash",
            "config.model.attention_impl = 'flash': must be one of 'auto', '', None, 'xla', 'cudnn', 'splash'",
        ),
    ],
)
def test_bad_training_values_are_one_line_errors(key, value, message):
    config = demo.get_config()
    _set(config, key, value)
    with pytest.raises(ConfigError) as info:
        validate_config(config, reference=base.get_config())
    assert message in str(info.value) and "\n" not in str(info.value)
    assert validate_config(demo.get_config(), reference=base.get_config()) is None


def test_splash_attention_is_a_valid_choice():
    config = demo.get_config()
    config.model.attention_impl = "splash"
    assert validate_config(config, reference=base.get_config()) is None


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
