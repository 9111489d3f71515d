"""ccj-train's command line: only runnable recipes are listed and accepted, a config too big for a
CPU-only host is refused before anything is allocated, and a bad config file or workdir is one line."""

import os

import pytest
from _makers import run_module, script_env

from chinese_clip_jax.training import recipes
from chinese_clip_jax.training.host_memory import HostMemoryError, check_fits, estimate_bytes
from chinese_clip_jax.training.recipes import base
from chinese_clip_jax.training.validate import build_model_config

RUNNABLE = "demo, finetune, finetune_coco_cn, finetune_flickr30k_cn, finetune_muge, pretrain_stage1, pretrain_stage2"


def test_only_runnable_recipes_are_listed():
    assert ", ".join(recipes.names()) == RUNNABLE
    assert recipes.resolve("recipe:demo").endswith(os.path.join("recipes", "demo.py"))
    assert recipes.resolve("recipe:finetune_muge:x").endswith("finetune_muge.py:x")


@pytest.mark.parametrize(
    "name, message",
    [
        (
            "base",
            "recipe:base is the template every recipe starts from (each key with its default), not a runnable "
            f"recipe: choose one of {RUNNABLE}, or a config file of your own that starts from it",
        ),
        (
            "finetune_recipes",
            f"recipe:finetune_recipes is a helper module of the recipes (no get_config()): choose one of {RUNNABLE}",
        ),
        ("nope", f"unknown recipe 'nope': the package ships {RUNNABLE}"),
    ],
)
def test_template_and_helper_modules_are_refused_naming_the_runnable_ones(name, message, tmp_path):
    with pytest.raises(ValueError) as e:
        recipes.resolve(f"recipe:{name}")
    assert str(e.value) == message
    res = run_module("train", "--config", f"recipe:{name}", "--workdir", tmp_path / "w", env=script_env())
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [f"error: {message}"]
    assert not (tmp_path / "w").exists()


def test_help_lists_the_runnable_recipes_only(capsys):
    from chinese_clip_jax.training.cli import print_help

    print_help()
    listed = capsys.readouterr().out.split("recipes (")[1].split("\n\n")[0].splitlines()[1:]
    assert [line.split()[0] for line in listed] == RUNNABLE.split(", ")


def test_full_size_config_is_refused_before_allocating_on_a_small_host():
    config = base.get_config()  # ViT-B/16 + RoBERTa-base, batch 256
    model_config = build_model_config(config.model)
    est = estimate_bytes(config, model_config, "dots", "float32")
    # 188M params x 16 bytes (params, grads, two moments): hand-counted from the architecture
    assert 2.7 * 2**30 < est["params"] < 2.9 * 2**30
    options = type("Options", (), {"remat": "dots", "dtype": "float32"})()
    with pytest.raises(HostMemoryError) as e:
        check_fits(config, model_config, options, available=16 * 2**30)
    assert str(e.value).startswith("this config needs about 30.4 GiB on this CPU-only host (params and optimizer ")
    assert "and 16.0 GiB is available: lower --config.batch_size" in str(e.value)
    assert str(e.value).endswith("CCJ_SKIP_MEMORY_CHECK=1 starts anyway")
    config.batch_size, config.model.remat = 8, "full"
    assert check_fits(config, model_config, options, available=16 * 2**30)["total"] < 16 * 2**30


def test_base_config_file_on_this_host_says_what_it_needs(tmp_path):
    """The template run as a file on this CPU host: refused in one line when the estimate exceeds
    the memory available here (the 24 GiB this suite runs on), before the workdir is made."""
    res = run_module(
        "train",
        "--config",
        "train/configs/base.py",
        "--workdir",
        tmp_path / "w",
        "--config.total_steps=1",
        env=script_env(),
    )
    if res.returncode == 0:
        pytest.skip("this host has the memory the base config needs")
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith("error: this config needs about 30.4 GiB on this CPU-only")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "--config {path}: no such file; give a config file (get_config()) or recipe:NAME, one of " + RUNNABLE),
        ("def get_config(:\n", "--config {path}:1: not valid Python (invalid syntax)"),
        (
            "x = 1\n",
            "--config {path}: defines no get_config() (a config file returns an ml_collections.ConfigDict from it)",
        ),
    ],
)
def test_config_file_missing_broken_or_without_get_config_is_one_line(content, message, tmp_path):
    path = tmp_path / "my_config.py"
    if content is not None:
        path.write_text(content)
    res = run_module("train", f"--config={path}", "--workdir", tmp_path / "w", env=script_env())
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"error: {message.format(path=path)}"]
    assert not (tmp_path / "w").exists()


def test_workdir_that_is_a_file_is_one_line(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine\n")
    res = run_module(
        "train", "--config", "recipe:demo", "--workdir", target, "--config.total_steps=1", env=script_env()
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"error: --workdir {target}: is a file, not a directory; give a new directory or a run's workdir"
    ]
    assert target.read_text() == "mine\n"
