"""Hardening, third round, outside ccj-embed (tests/test_embed_integrity.py): only runnable recipes are
listed and accepted, a config too big for a CPU-only host is refused before anything is allocated,
and a conversion interrupted earlier is named as such with a way out."""

import json
import os
import subprocess
import sys

import pytest
from _train_helpers import random_params, tiny_config

import chinese_clip_jax as ccj
from chinese_clip_jax.training import recipes
from chinese_clip_jax.training.host_memory import HostMemoryError, check_fits, estimate_bytes
from chinese_clip_jax.training.recipes import base
from chinese_clip_jax.training.validate import build_model_config

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RUNNABLE = "demo, finetune, finetune_coco_cn, finetune_flickr30k_cn, finetune_muge, pretrain_stage1, pretrain_stage2"


def _run(module, *args, env=None):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", **(env or {}))
    cmd = [sys.executable, "-m", module, *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


# --------------------------------------------------------------------------- recipes


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
    res = _run("train", "--config", f"recipe:{name}", "--workdir", tmp_path / "w")
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [f"error: {message}"]
    assert not (tmp_path / "w").exists()


def test_help_lists_the_runnable_recipes_only(capsys):
    from chinese_clip_jax.training.cli import print_help

    print_help()
    listed = capsys.readouterr().out.split("recipes (")[1].split("\n\n")[0].splitlines()[1:]
    assert [line.split()[0] for line in listed] == RUNNABLE.split(", ")


# --------------------------------------------------------------------------- host memory


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
    res = _run("train", "--config", "train/configs/base.py", "--workdir", tmp_path / "w", "--config.total_steps=1")
    if res.returncode == 0:
        pytest.skip("this host has the memory the base config needs")
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith("error: this config needs about 30.4 GiB on this CPU-only")
    assert not (tmp_path / "w").exists()


# --------------------------------------------------------------------------- interrupted conversions


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    cfg = tiny_config()
    path = tmp_path_factory.mktemp("src")
    ccj.save_pretrained(str(path), cfg, random_params(cfg))
    return path


def test_interrupted_conversion_is_named_and_cleaned_on_request(hf_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors.tmp").write_bytes(b"\0" * 100)  # what a killed conversion leaves
    res = _run("convert", hf_model, out, "--to", "hf", "--skip-parity")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"error: {out / 'model.safetensors.tmp'}: an earlier run writing into {out} was interrupted (killed before "
        "it finished) and left model.safetensors.tmp unfinished; nothing there is complete: rerun with "
        "--clean-leftovers to delete them and write again, or delete them yourself"
    ]
    assert os.listdir(out) == ["model.safetensors.tmp"]
    res = _run("convert", hf_model, out, "--to", "hf", "--skip-parity", "--clean-leftovers")
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"removed model.safetensors.tmp: left in {out} by an interrupted run" in res.stderr
    assert "model.safetensors" in os.listdir(out) and "model.safetensors.tmp" not in os.listdir(out)


def test_interrupted_flax_conversion_leftovers_and_finished_outputs(hf_model, tmp_path):
    out = tmp_path / "out"
    (out / "params.orbax-checkpoint-tmp-1712").mkdir(parents=True)  # Orbax's, from a killed --to flax
    res = _run("convert", hf_model, out)
    assert res.returncode == 2 and "was interrupted" in res.stderr and "params.orbax-checkpoint-tmp-1712" in res.stderr
    (out / "config.json").write_text("{}")  # a finished output beside it: never overwritten, even when asked
    res = _run("convert", hf_model, out, "--clean-leftovers")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"error: {out / 'config.json'} already exists; convert never overwrites: choose a new or empty output directory"
    ]
    assert sorted(os.listdir(out)) == ["config.json", "params.orbax-checkpoint-tmp-1712"]


# --------------------------------------------------------------------------- the older rounds' weak cases


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
    res = _run("train", f"--config={path}", "--workdir", tmp_path / "w")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"error: {message.format(path=path)}"]
    assert not (tmp_path / "w").exists()


def test_workdir_that_is_a_file_is_one_line(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine\n")
    res = _run("train", "--config", "recipe:demo", "--workdir", target, "--config.total_steps=1")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"error: --workdir {target}: is a file, not a directory; give a new directory or a run's workdir"
    ]
    assert target.read_text() == "mine\n"


def test_convert_into_a_file_is_named_as_a_file(hf_model, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine\n")
    res = _run("convert", hf_model, target)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"error: OUT {target}: is a file, not a directory; choose a new or empty directory"
    ]
    assert target.read_text() == "mine\n"


# --------------------------------------------------------------------------- workdir side files read on resume


def test_torn_model_config_record_is_rewritten_with_a_warning(tmp_path, caplog):
    from chinese_clip_jax.training.workdir import check_model_config

    arch = {"projection_dim": 16, "text_config": {"hidden_size": 32}}
    (tmp_path / "model_config.json").write_text('{"projection_dim": 1')  # cut short
    with caplog.at_level("WARNING"):
        check_model_config(tmp_path, arch, resuming=True)
    assert f"{tmp_path / 'model_config.json'} is damaged (JSONDecodeError: " in caplog.text
    assert "rewritten from this run's model" in caplog.text
    assert json.loads((tmp_path / "model_config.json").read_text()) == arch
    check_model_config(tmp_path, arch, resuming=True)  # whole again: read back, nothing said
    assert caplog.text.count("is damaged") == 1


@pytest.mark.parametrize("content", ['{"epochs": 2, "batch', "[]", '{"epochs": 2}'])
def test_damaged_run_length_record_is_rewritten_with_a_warning(content, tmp_path, caplog):
    import ml_collections
    from etils import epath

    from chinese_clip_jax.training.run_length import _resolve_on_process0

    (tmp_path / "run_length.json").write_text(content)
    config = ml_collections.ConfigDict({"epochs": 2.0, "batch_size": 4})
    with caplog.at_level("WARNING"):
        assert _resolve_on_process0(config, 10, epath.Path(tmp_path), resuming=True) == (3, 5)  # ceil(10/4), ceil(20/4)
    assert f"{tmp_path / 'run_length.json'} is damaged (" in caplog.text
    assert "rewritten from this run's epochs=2, batch_size=4 and 10 train records" in caplog.text
    assert json.loads((tmp_path / "run_length.json").read_text())["total_steps"] == 5


# --------------------------------------------------------------------------- temporaries of interrupted writes


def test_atomic_write_removes_the_temporaries_of_an_interrupted_earlier_write(tmp_path, caplog):
    from chinese_clip_jax import io as ccj_io

    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid whose process has ended: what a killed writer leaves behind in the name
    old, fresh, alive = (tmp_path / f"r.json.tmp{gone.pid}"), tmp_path / "r.json.tmp999999999", tmp_path / "r.json.tmp1"
    for p in (old, fresh, alive):
        p.write_text("{")
    os.utime(old, (0, 0))
    os.utime(alive, (0, 0))  # pid 1 runs: never taken for a leftover
    other = tmp_path / f"s.json.tmp{gone.pid}"
    other.write_text("{")
    os.utime(other, (0, 0))
    with caplog.at_level("WARNING"):
        ccj_io.atomic_write(tmp_path / "r.json", "{}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["r.json", fresh.name, alive.name, other.name])
    assert f"removed {old}: left by an earlier write of {tmp_path / 'r.json'} that was interrupted" in caplog.text


def test_eval_with_a_model_its_tokenizer_does_not_fit_is_one_line(hf_model, tmp_path):
    import numpy as np
    import PIL.Image

    for c in "ab":
        (tmp_path / "cls" / c).mkdir(parents=True)
        PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "cls" / c / "0.png")
    res = _run("chinese_clip_jax.evaluation", "zeroshot", "--model", hf_model, "--data", f"folder:{tmp_path / 'cls'}")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["error: tokenizer has 21128 tokens, the model's vocab only 64"]
