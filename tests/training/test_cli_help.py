"""Command lines that explain themselves: ``ccj-train --help``, the model card of ``ccj-convert --to hf``,
TFDS names that are wrong or not prepared, and the library noise our commands silence."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from _makers import REPO
from _train_helpers import tiny_config

ENV = dict(os.environ, PYTHONPATH=REPO)


def test_train_help_lists_recipes_keys_defaults_meanings_and_examples():
    proc = subprocess.run(
        [sys.executable, "-m", "train", "--help"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    from chinese_clip_jax.training.recipes import base

    c = base.get_config()
    lines = out.splitlines()
    by_key = {line.split()[0]: line for line in lines if line.startswith("  ") and " = " in line}
    # keys and defaults come from the config itself; meanings from the comments beside them
    assert (
        by_key["batch_size"].split(" = ")[1] == f"{c.batch_size!r}  # GLOBAL batch (all processes, all micro-batches)"
    )
    assert "the source, one of demo, cn_clip, webdataset, tfds, files" in by_key["data.name"]
    assert by_key["data.files.table"].split(" = ")[1].startswith("''  # .csv/.tsv/.jsonl of image paths")
    assert by_key["optimizer.lr"].split(" = ")[1] == repr(c.optimizer.lr)
    assert len(by_key) > 60 and all(len(line) < 200 for line in lines)
    recipes = {f[:-3] for f in os.listdir(os.path.join(REPO, "train", "configs"))} - {
        "__init__",
        "base",
        "finetune_recipes",
    }
    for name in recipes:
        assert any(line.startswith(f"  {name} ") for line in lines), name
    assert "examples:" in out and "--config.data.files.table=pairs.csv" in out and "--helpfull" in out


def test_key_comments_follow_the_config_source():
    from chinese_clip_jax.training.cli_help import help_text, key_comments

    def get_config():
        import ml_collections

        c = ml_collections.ConfigDict()
        c.steps = 3  # how many
        # the rate
        # of learning
        c.opt = ml_collections.ConfigDict({"lr": 0.1, "b": 2})  # the optimizer
        c.opt.extra = {"deep": 1}  # nested
        return c

    comments = key_comments((get_config, ""))
    assert comments == {
        "steps": "how many",
        "opt.lr": "the optimizer",
        "opt.b": "the optimizer",
        "opt.extra.deep": "nested",
    }
    page = help_text(get_config(), {"r1": "one"}, comments, prog="x")
    assert re.search(r"^  steps +  = 3  # how many$", page, re.M) and "  r1  one" in page


@pytest.fixture(scope="module")
def hf_dir_with_card(tmp_path_factory, save_hf_model):
    cfg = tiny_config(vocab_size=200, hidden=16, heads=2, max_positions=24, image_size=16, patch_size=8)
    path = tmp_path_factory.mktemp("hf")
    save_hf_model(cfg, path)
    (path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# the source card\n")
    return cfg, path


def test_convert_to_hf_writes_a_model_card_with_the_measured_parity(hf_dir_with_card, tmp_path):
    cfg, src = hf_dir_with_card
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "convert", str(src), str(out), "--to", "hf"],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    card = (out / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\nlicense: apache-2.0\n")  # the source's own licence
    assert f"`{src}`" in card and f"ccj-convert {src} {out} --to hf" in card
    assert f"patch {cfg.vision_config.patch_size}, {cfg.vision_config.image_size} px" in card
    text_diff = float(card.split("text features ")[1].split(",")[0])
    assert text_diff < 1e-4  # measured: a real comparison, a small figure


def test_measured_parity_sees_a_changed_weight_and_a_users_card_is_kept(hf_dir_with_card, tmp_path):
    from chinese_clip_jax.conversion import card, load_params

    cfg, src = hf_dir_with_card
    loaded = load_params(str(src))
    good = card.measure_parity(str(src), loaded.config, loaded.params)
    import jax

    params = jax.tree_util.tree_map(np.asarray, loaded.params)  # a copy with one weight moved
    params["text_projection"]["kernel"] = params["text_projection"]["kernel"] * 1.5
    bad = card.measure_parity(str(src), loaded.config, params)
    assert good["text_max_abs_diff"] < 1e-4 and bad["text_max_abs_diff"] > 1e-2
    assert bad["image_max_abs_diff"] == pytest.approx(good["image_max_abs_diff"])
    (tmp_path / "README.md").write_text("mine")
    assert card.write_model_card(str(tmp_path), "theirs") is False
    assert (tmp_path / "README.md").read_text() == "mine"


def test_tfds_wrong_name_lists_close_matches_and_unprepared_names_the_command(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from chinese_clip_jax.data import check_config, default_data_config

    c = default_data_config("tfds")
    c.tfds.name, c.tfds.data_dir = "mnistt", str(tmp_path)
    with pytest.raises(ValueError, match=r"data.tfds.name 'mnistt': no such TFDS dataset; close matches: mnist"):
        check_config(c)
    c.tfds.name = "mnist"
    with pytest.raises(ValueError) as e:
        check_config(c)
    assert f"registered but not prepared under {tmp_path}" in str(e.value)
    assert f"`tfds build mnist --data_dir {tmp_path}`" in str(e.value)
    assert "\n" not in str(e.value)


_NOISE = """
import sys
if sys.argv[1] == "quiet":
    from chinese_clip_jax.console import quiet_libraries

    quiet_libraries()
from transformers.utils import logging as hf_logging
from absl import logging as absl_logging

hf_logging.get_logger("transformers").warning_advice("PyTorch was not found. Models won't be available")
absl_logging.warning("Variant folder /x has no dataset_info.json")
import logging

logging.getLogger("chinese_clip_jax.data").warning("our own warning stays")
from chinese_clip_jax.console import progress_bar

bar = progress_bar(total=1000, desc="build")
for _ in range(1000):
    bar.update(1)
bar.close()
"""


def test_our_commands_silence_library_noise_and_keep_bars_single_line():
    env = {k: v for k, v in ENV.items() if not k.startswith(("TRANSFORMERS_", "TF_CPP", "HF_HUB"))}
    runs = {
        mode: subprocess.run(
            [sys.executable, "-c", _NOISE, mode], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
        )
        for mode in ("loud", "quiet")
    }
    assert all(r.returncode == 0 for r in runs.values()), runs["quiet"].stderr
    loud, quiet = runs["loud"].stderr, runs["quiet"].stderr
    assert "PyTorch was not found" in loud and "Variant folder" in loud  # what users saw before
    assert "PyTorch was not found" not in quiet and "Variant folder" not in quiet
    assert "our own warning stays" in quiet
    # stderr is a pipe here, not a terminal: fixed-width ASCII lines, no redraw storm
    pieces = [p for p in quiet.replace("\r", "\n").splitlines() if p.startswith("build")]
    assert pieces and all(len(p) <= 100 and p.isascii() for p in pieces) and len(pieces) <= 3
    assert "1000/1000" in pieces[-1]


def test_ccj_eval_tfds_name_errors_say_the_same(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from chinese_clip_jax.data.readers import open_classification
    from chinese_clip_jax.data.sets import DatasetError

    with pytest.raises(DatasetError, match=r"'mnist': the dataset is registered but not prepared .*`tfds build mnist"):
        open_classification("tfds:mnist", "test", data_dir=str(tmp_path))
    with pytest.raises(DatasetError, match=r"no such TFDS dataset; close matches: mnist"):
        open_classification("tfds:mnistt", "test", data_dir=str(tmp_path))
