"""ccj-eval with a model whose vocabulary is smaller than the tokenizer's: one line, exit 2."""

import pytest
from _makers import run_module, script_env
from _train_helpers import random_params, tiny_config

import chinese_clip_jax as ccj


@pytest.fixture(scope="module")
def vocab64_model(tmp_path_factory):
    cfg = tiny_config()
    path = tmp_path_factory.mktemp("src")
    ccj.save_pretrained(str(path), cfg, random_params(cfg))
    return path


def test_eval_with_a_model_its_tokenizer_does_not_fit_is_one_line(vocab64_model, tmp_path):
    import numpy as np
    import PIL.Image

    for c in "ab":
        (tmp_path / "cls" / c).mkdir(parents=True)
        PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "cls" / c / "0.png")
    res = run_module(
        "chinese_clip_jax.evaluation",
        "zeroshot",
        "--model",
        vocab64_model,
        "--data",
        f"folder:{tmp_path / 'cls'}",
        env=script_env(),
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["error: tokenizer has 21128 tokens, the model's vocab only 64"]
