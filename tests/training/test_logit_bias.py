"""``logit_bias`` is a param of the model when the loss is sigmoid (as big_vision's ``b``, open_clip's
``logit_bias``): the train state, the evaluator, the HF export and the Flax conversion take it
without filters, and a checkpoint written before (bias appended to the params by the trainer)
still restores."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _train_helpers import fake_batches, opt_config, tiny_config
from _train_run import make_iterator, tiny_train_config
from safetensors.numpy import load_file

import chinese_clip_jax as ccj
from chinese_clip_jax import sharding as shd
from chinese_clip_jax.conversion.write import save_flax
from chinese_clip_jax.training import create_train_state, make_optimizer
from chinese_clip_jax.training.checkpoint import Checkpointer, abstract_like
from chinese_clip_jax.training.loop import train
from chinese_clip_jax.training.losses import SIGLIP_INIT_LOGIT_BIAS, SIGLIP_INIT_LOGIT_SCALE


def _init(model, batch):
    return jax.jit(model.init)(jax.random.key(0), batch["input_ids"], batch["pixel_values"])["params"]


def test_the_bias_is_a_param_only_with_its_init_and_shifts_the_logits():
    cfg = tiny_config(layers=1)
    b = fake_batches(1, 3)[0]
    plain = _init(ccj.ChineseCLIPModel(cfg), b)
    model = ccj.ChineseCLIPModel(cfg, logit_bias_init=-3.5)
    params = _init(model, b)
    assert "logit_bias" not in plain and set(params) == set(plain) | {"logit_bias"}
    assert float(params["logit_bias"].value) == -3.5 and params["logit_bias"].names == ()
    params = {**params, "logit_bias": -3.5}
    out = jax.jit(lambda p: model.apply({"params": p}, b["input_ids"], b["pixel_values"], b["attention_mask"]))(
        nn_unbox_tree(params)
    )
    cos = np.asarray(out.text_embeds, np.float64) @ np.asarray(out.image_embeds, np.float64).T
    scale = math.exp(float(params["logit_scale"].value))
    np.testing.assert_allclose(np.asarray(out.logits_per_text), scale * cos - 3.5, rtol=1e-5, atol=1e-5)


def test_sigmoid_state_needs_a_bias_model_and_fills_a_missing_bias():
    cfg = tiny_config(layers=1)
    mesh = shd.make_mesh(-1, 1, 1)
    tx, _ = make_optimizer(opt_config(), 10)
    with pytest.raises(ValueError, match="sigmoid loss needs a model with a logit_bias"):
        create_train_state(ccj.ChineseCLIPModel(cfg), tx, mesh, 0, loss="sigmoid")
    model = ccj.ChineseCLIPModel(cfg, logit_bias_init=SIGLIP_INIT_LOGIT_BIAS)
    state, _ = create_train_state(model, tx, mesh, 0, loss="sigmoid")
    assert float(state.params["logit_bias"]) == SIGLIP_INIT_LOGIT_BIAS
    assert float(state.params["logit_scale"]) == pytest.approx(SIGLIP_INIT_LOGIT_SCALE)
    hf_like = {k: v for k, v in state.params.items() if k != "logit_bias"}  # a HF checkpoint has no bias
    state, _ = create_train_state(model, tx, mesh, 0, loss="sigmoid", init_params=hf_like)
    assert float(state.params["logit_bias"]) == SIGLIP_INIT_LOGIT_BIAS


def test_a_checkpoint_with_the_bias_appended_by_the_old_trainer_restores(tmp_path):
    """Before, the trainer appended ``params["logit_bias"]`` (replicated) to the model's params;
    the model's own param sits at the same path, so those checkpoints restore unchanged."""
    cfg = tiny_config(layers=1)
    mesh = shd.make_mesh(-1, 1, 1)
    tx, _ = make_optimizer(opt_config(), 10)
    old, _ = create_train_state(ccj.ChineseCLIPModel(cfg), tx, mesh, 0)
    old_params = {**old.params, "logit_bias": jnp.float32(-7.25)}  # what the old create_train_state did
    old = old.replace(params=old_params, opt_state=tx.init(old_params))
    ckpt = Checkpointer(tmp_path / "ckpt", every=1, async_save=False)
    ckpt.save(1, old)
    ckpt.wait()
    model = ccj.ChineseCLIPModel(cfg, logit_bias_init=SIGLIP_INIT_LOGIT_BIAS)
    new, shardings = create_train_state(model, tx, mesh, 1, loss="sigmoid")
    restored = ckpt.restore(abstract_like(new, shardings), step=1)
    ckpt.close()
    assert float(restored.params["logit_bias"]) == -7.25
    for a, b in zip(jax.tree.leaves(old.params), jax.tree.leaves(restored.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_conversion_drops_the_bias_from_the_hf_layout_and_keeps_it_in_flax(tmp_path):
    cfg = tiny_config(layers=1)
    b = fake_batches(1, 2)[0]
    params = {
        **jax.tree.map(np.asarray, nn_unbox_tree(_init(ccj.ChineseCLIPModel(cfg), b))),
        "logit_bias": np.float32(-2.0),
    }
    plain = {k: v for k, v in params.items() if k != "logit_bias"}
    ccj.save_pretrained(tmp_path / "hf_bias", cfg, params)
    ccj.save_pretrained(tmp_path / "hf_plain", cfg, plain)
    with_bias = load_file(str(tmp_path / "hf_bias" / "model.safetensors"))
    assert sorted(with_bias) == sorted(load_file(str(tmp_path / "hf_plain" / "model.safetensors")))
    assert "logit_bias" not in with_bias
    model, _ = ccj.from_pretrained(tmp_path / "hf_bias")
    assert model.logit_bias_init is None
    save_flax(tmp_path / "flax", cfg, params)
    model, loaded = ccj.from_pretrained(tmp_path / "flax")
    assert model.logit_bias_init == -2.0 and float(loaded["logit_bias"]) == -2.0
    out = model.apply({"params": loaded}, b["input_ids"], b["pixel_values"], b["attention_mask"])
    assert np.isfinite(np.asarray(out.logits_per_text)).all()


def nn_unbox_tree(tree):
    from flax import linen as nn

    return nn.unbox(tree)


def test_sigmoid_training_runs_and_exports_without_filters(tmp_path):
    config = tiny_train_config(2, loss="sigmoid", export_hf=True, checkpoint_every=2)
    result = train(config, str(tmp_path), data_iter=make_iterator(config), progress=False)
    assert result["step"] == 2
    model, params = ccj.from_pretrained(result["export_dir"])
    assert "logit_bias" not in params and model.logit_bias_init is None
