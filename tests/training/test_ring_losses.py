"""The ring loss (sigmoid and InfoNCE) (``chinese_clip_jax.training.ring_losses``) equal the all-gather losses.

The multi-device part runs ``tests/_ring_losses_check.py`` once in a subprocess with 8
simulated CPU devices: loss and gradients (text, image, logit_scale, logit_bias) of both losses
on meshes (8,1,1), (2,2,2), (1,4,2), with column slices and without, on device blocks of very
different content (duplicated pairs, near-perfect pairs, opposite pairs, random ones) at the
largest logit scale; the loss step's temporaries (XLA's memory analysis) as the global batch
grows; GradCache accumulation; and a 3-step training run with either loss_impl.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _makers import run_script
from _train_run import tiny_train_config
from jax.sharding import AbstractMesh

from chinese_clip_jax import sharding as shd
from chinese_clip_jax.training.loop import train
from chinese_clip_jax.training.losses import sigmoid_contrastive_loss, softmax_contrastive_loss
from chinese_clip_jax.training.ring_losses import contrastive_loss_by_impl, ring_sigmoid_loss, ring_softmax_loss
from chinese_clip_jax.training.validate import ConfigError, validate_config

TOL = 1e-5  # fp32, relative


@pytest.fixture(scope="module")
def ring_run():
    return run_script("_ring_losses_check.py", timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("case", ["(8, 1, 1) {} chunk=2", "(2, 2, 2) {} chunk=0", "(1, 4, 2) {} chunk=2"])
def test_ring_loss_and_grads_equal_the_gather_version(ring_run, kind, case):
    r = ring_run["losses"][case.format(kind)]
    assert r["loss_rel_err"] <= TOL and r["ref_rel_err"] <= TOL, r  # vs gather and vs float64 numpy
    assert max(r["grad_rel_err"].values()) <= TOL, r
    assert r["loss"] > 1.0  # the uneven blocks make a loss far from 0: the check is not vacuous


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["(8, 1, 1)", "(2, 2, 2)"])
def test_ring_program_has_no_all_gather(ring_run, shape):
    c = ring_run["losses"][f"{shape} collectives"]
    assert "all-gather" in c["gather"]
    assert c["ring"] == ["collective-permute"]


@pytest.mark.slow
def test_ring_memory_is_linear_in_the_per_device_batch(ring_run):
    """Global batch 256 -> 2048 on 8 devices: the gather loss's temporaries grow with
    local_B x global_B (64x), the ring's with local_B x (dim + chunk) (8x)."""
    m = ring_run["memory"]
    assert m["gather"][1] / m["gather"][0] > 40, m
    assert m["ring"][1] / m["ring"][0] < 10, m
    assert m["ring"][1] < m["gather"][1] / 10, m


@pytest.mark.slow
def test_ring_with_gradcache_accumulation(ring_run):
    a = ring_run["accum"]
    assert a["loss_rel_err"] <= TOL and a["grad_rel_err"] <= TOL, a
    assert a["scale_grad_rel_err"] <= TOL and a["bias_grad_rel_err"] <= TOL, a


@pytest.mark.slow
def test_training_losses_are_the_same_step_by_step(ring_run):
    t = ring_run["train"]
    assert len(t["ring"]) == len(t["gather"]) == 3
    for ring, gather in zip(t["ring"], t["gather"]):
        assert abs(ring - gather) <= TOL * abs(gather), t
    assert t["ring"][-1] < t["ring"][0]


def _pairs(n=8, d=8, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    t, v = rng.standard_normal((2, n, d))
    norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    return jnp.asarray(norm(t), dtype), jnp.asarray(norm(v), dtype)


def test_one_device_ring_equals_gather_and_keeps_input_dtypes():
    """On a 1-device mesh the ring is one block, sliced in columns of 2: same value and gradients;
    bf16 embeddings give an fp32 loss and bf16 gradients (as the gather version)."""
    mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    t, v = _pairs()
    args = (t, v, jnp.float32(1.7), jnp.float32(-2.0))
    ring = jax.value_and_grad(lambda *a: ring_sigmoid_loss(*a, mesh, chunk=2), argnums=(0, 1, 2, 3))
    gather = jax.value_and_grad(sigmoid_contrastive_loss, argnums=(0, 1, 2, 3))
    (lr, gr), (lg, gg) = jax.jit(ring)(*args), jax.jit(gather)(*args)
    np.testing.assert_allclose(float(lr), float(lg), rtol=TOL)
    for a, b in zip(gr, gg):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=TOL, atol=TOL * float(jnp.max(jnp.abs(b))))
    tb, vb = _pairs(dtype=jnp.bfloat16)
    loss, (gt, gv) = jax.value_and_grad(lambda t, v: ring_softmax_loss(t, v, 2.0, mesh, chunk=4), argnums=(0, 1))(
        tb, vb
    )
    assert loss.dtype == jnp.float32 and gt.dtype == gv.dtype == jnp.bfloat16
    np.testing.assert_allclose(float(loss), float(softmax_contrastive_loss(tb, vb, 2.0)), rtol=TOL)


def test_bad_inputs_get_one_line_errors():
    mesh = AbstractMesh((4, 1, 1), shd.MESH_AXES)  # sizes are checked before anything runs
    t, v = _pairs(n=6)
    with pytest.raises(ValueError, match="global batch 6 is not divisible by data x fsdp = 4"):
        ring_sigmoid_loss(t, v, 1.0, 0.0, mesh)
    t, v = _pairs(n=8)
    with pytest.raises(ValueError, match="chunk 3 must divide the per-device batch 2"):
        ring_softmax_loss(t, v, 1.0, mesh, chunk=3)
    with pytest.raises(ValueError, match="batch, dim"):
        ring_softmax_loss(t, v[:4], 1.0, mesh)
    with pytest.raises(ValueError, match="unknown loss_impl 'chunked'"):
        contrastive_loss_by_impl("softmax", t, v, 1.0, impl="chunked", mesh=mesh)
    with pytest.raises(ValueError, match="needs the training mesh"):
        contrastive_loss_by_impl("softmax", t, v, 1.0, impl="ring")
    with pytest.raises(ValueError, match="logit_bias"):
        contrastive_loss_by_impl("sigmoid", t, v, math.log(10), impl="ring", mesh=mesh)


def test_config_keys_are_validated(tmp_path):
    with pytest.raises(ConfigError, match=r"config.loss_impl = 'chunked': must be one of 'gather', 'ring'"):
        validate_config(tiny_train_config(loss_impl="chunked"))
    with pytest.raises(ConfigError, match=r"config.loss_chunk = -1: must be an int >= 0"):
        validate_config(tiny_train_config(loss_chunk=-1))
    config = tiny_train_config(1, loss_impl="ring", loss_chunk=3)  # 16 rows on 1 device
    with pytest.raises(ValueError, match="config.loss_chunk = 3: must divide the per-device batch 16"):
        train(config, str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
