"""The shapes conversion checks against: traced once per config (not one ``jax.eval_shape`` per tensor),
and equal to the model's own params (Flax) and to transformers' PyTorch model (HF names)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from _train_helpers import CONVERSION_SIZES as SIZES
from _train_helpers import tiny_config

import chinese_clip_jax as ccj
from chinese_clip_jax.conversion import check, flax_to_hf, hf_to_flax, mapping
from chinese_clip_jax.conversion.sources import TensorSource


def conversion_config(**overrides):
    """the conversion tests' model sizes (2 text layers, 3 vision layers: 95 conversion rows)."""
    return tiny_config(**{**SIZES, **overrides})


class InMemory(TensorSource):
    def __init__(self, tensors):
        super().__init__("<memory>")
        self.tensors = tensors

    def names(self):
        return list(self.tensors)

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def get(self, name):
        return self.tensors[name]

    def is_float(self, name):
        return np.issubdtype(self.tensors[name].dtype, np.floating)


def model_params(cfg):
    v = cfg.vision_config
    px = jnp.zeros((1, v.num_channels, v.image_size, v.image_size), jnp.float32)
    variables = ccj.ChineseCLIPModel(cfg).init(jax.random.key(1), jnp.zeros((1, 2), jnp.int32), px)
    return nn.unbox(variables["params"])


@pytest.fixture
def eval_shape_calls(monkeypatch):
    check._flax_shapes.cache_clear()
    check._hf_shapes.cache_clear()
    calls = []
    real = jax.eval_shape

    def counting(fn, *args, **kwargs):
        calls.append(getattr(fn, "__qualname__", repr(fn)))
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(jax, "eval_shape", counting)
    yield calls
    check._flax_shapes.cache_clear()
    check._hf_shapes.cache_clear()


def test_a_conversion_traces_shapes_once_per_config(eval_shape_calls):
    cfg = conversion_config()
    params = model_params(cfg)  # real init: before counting starts
    eval_shape_calls.clear()
    tensors = flax_to_hf(params, cfg)  # checks the params: the model's shapes, traced once
    assert len(eval_shape_calls) == 1, eval_shape_calls
    back = hf_to_flax(InMemory(tensors), cfg)  # + the HF shapes of all 95 rows, in one trace
    assert len(eval_shape_calls) == 2, eval_shape_calls
    assert len(mapping.table(cfg)) == 95
    hf_to_flax(InMemory(tensors), cfg)  # the same config again: nothing traced
    flax_to_hf(back, cfg)
    assert len(eval_shape_calls) == 2, eval_shape_calls
    want, got = mapping.flatten(params), mapping.flatten(back)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
    other = conversion_config(image_size=48)  # another config is traced afresh (and cached apart)
    hf_to_flax(InMemory(flax_to_hf(model_params(other), other)), other)
    assert len(eval_shape_calls) == 4, eval_shape_calls


def test_expected_shapes_are_the_models():
    cfg = conversion_config()
    want = {k: tuple(x.shape) for k, x in mapping.flatten(model_params(cfg)).items()}
    assert check.expected_shapes(cfg) == want
    hf = check.expected_hf_shapes(cfg)
    assert set(hf) == {r.hf for r in mapping.table(cfg)}
    check.expected_shapes(cfg)["text_model"] = ()  # a fresh dict each call: the cache is not changed
    assert check.expected_shapes(cfg) == want


def test_expected_hf_shapes_are_transformers_state_dict():
    cfg = conversion_config()
    torch.manual_seed(0)
    ref = transformers.ChineseCLIPModel(transformers.ChineseCLIPConfig.from_dict(cfg.to_dict()))
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not mapping.IGNORED_HF_KEYS.match(k)}
    assert check.expected_hf_shapes(cfg) == want
