"""Mesh construction, the rules table, and sharded training equal to single-device training.

The multi-device part runs ``tests/_mesh_equivalence.py`` once in a subprocess with 8 simulated
CPU devices: 3 AdamW steps (fp32) on meshes (data, fsdp, tensor) = (8,1,1), (2,2,2), (1,4,2)
against one device, and GradCache accumulation on the (2,2,2) mesh.
"""

import jax
import pytest
from _makers import run_script
from jax.sharding import PartitionSpec as P

from chinese_clip_jax import sharding as shd


def test_mesh_shape_fills_and_validates():
    assert shd.mesh_shape(-1, 2, 2, num_devices=8) == (2, 2, 2)
    assert shd.mesh_shape(1, -1, 2, num_devices=8) == (1, 4, 2)
    assert shd.mesh_shape(8, 1, 1, num_devices=8) == (8, 1, 1)
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        shd.mesh_shape(-1, -1, 1, num_devices=8)
    with pytest.raises(ValueError, match="but 8 are available"):
        shd.mesh_shape(2, 2, 1, num_devices=8)
    with pytest.raises(ValueError, match="cannot be split"):
        shd.mesh_shape(-1, 3, 1, num_devices=8)
    with pytest.raises(ValueError, match="mesh.tensor must be"):
        shd.mesh_shape(1, 1, 0, num_devices=1)


def test_fit_spec_replicates_indivisible_dims():
    mesh = jax.sharding.AbstractMesh((2, 2, 3), shd.MESH_AXES)
    assert shd._fit_spec(P("fsdp", "tensor"), (4, 6), mesh) == P("fsdp", "tensor")
    assert shd._fit_spec(P("fsdp", "tensor"), (4, 4), mesh) == P("fsdp", None)  # 4 % 3 != 0
    assert shd._fit_spec(P(("data", "fsdp")), (6,), mesh) == P("data")  # 6 % 4 != 0, 6 % 2 == 0


@pytest.fixture(scope="module")
def mesh_run():
    return run_script("_mesh_equivalence.py", timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["(8, 1, 1)", "(2, 2, 2)", "(1, 4, 2)"])
def test_sharded_training_equals_single_device(mesh_run, shape):
    r = mesh_run["meshes"][shape]
    assert r["init_rel_err"] == 0.0  # sharded init draws the same values on every mesh
    assert r["loss_rel_err"] <= 1e-5, r
    assert r["param_rel_err"] <= 1e-5, r
    assert r["key_bias_abs_err"] <= 1e-3, r  # zero-gradient leaves, see _train_helpers
    assert r["losses"][-1] < r["losses"][0]


@pytest.mark.slow
def test_params_and_moments_are_sharded_by_the_rules(mesh_run):
    s = mesh_run["specs"]
    assert s["word_embeddings"] == str(P("tensor", "fsdp"))  # (vocab, embed)
    assert s["fc1"] == str(P("fsdp", "tensor"))  # (embed, mlp)
    assert s["query"] == str(P("fsdp", "tensor", None))  # (embed, heads, kv)
    assert s["mu_fc1"] == s["fc1"]  # Adam moments shard like their params
    assert s["n_devices_fc1"] == 8


@pytest.mark.slow
def test_gradcache_accumulation_on_a_sharded_mesh(mesh_run):
    a = mesh_run["accum"]
    assert a["loss_rel_err"] <= 1e-5 and a["grad_rel_err"] <= 1e-5, a
    assert a["key_bias_abs_err"] <= 1e-6 * a["grad_norm"], a


@pytest.fixture(scope="module")
def placement():
    return run_script("_sharding_placement.py", timeout=600, XLA_FLAGS="--xla_force_host_platform_device_count=8")


MESH_222 = [(d, f, t) for d in range(2) for f in range(2) for t in range(2)]


def test_shard_batch_places_each_devices_rows(placement):
    # 8 rows over data x fsdp = 4 shards: device (d, f, t) holds rows 2*(2d+f), +1; tensor replicas agree.
    for d, f, t in MESH_222:
        first = 2 * (2 * d + f)
        assert placement["batch_rows"][str((d, f, t))] == [first, first + 1], (d, f, t)


@pytest.mark.parametrize(
    "name, rule",
    [
        ("word_embeddings", (("tensor", 64), ("fsdp", 16))),  # (vocab, embed) -> (tensor, fsdp)
        ("mlp_in", (("fsdp", 16), ("tensor", 32))),  # (embed, mlp) -> (fsdp, tensor)
        ("query", (("fsdp", 16), ("tensor", 4), (None, 4))),  # (embed, heads, kv) -> (fsdp, tensor, -)
        ("layer_norm", ((None, 16),)),  # (norm,) -> replicated
    ],
)
def test_rules_place_each_param_dim_on_its_mesh_axis(placement, name, rule):
    """Each device's slice of a param, read from the array, follows the logical -> mesh table: a dim
    mapped to mesh axis A is cut in two (each axis has size 2) at the device's coordinate along A."""
    axis_index = {"data": 0, "fsdp": 1, "tensor": 2}
    p = placement["params"][name]
    assert p["global"] == [size for _, size in rule]
    for coord in MESH_222:
        expect_shape = [size // 2 if axis else size for axis, size in rule]
        expect_start = [coord[axis_index[axis]] * size // 2 if axis else 0 for axis, size in rule]
        assert p["shape"][str(coord)] == expect_shape, (name, coord)
        assert p["start"][str(coord)] == expect_start, (name, coord)
