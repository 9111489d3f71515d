"""Workdir side files read on resume (model_config.json, run_length.json): a torn one is rewritten
with a warning naming it."""

import json

import pytest


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
