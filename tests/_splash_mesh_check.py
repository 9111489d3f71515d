"""Run in a subprocess with 8 simulated CPU devices (tests/modeling/test_splash.py).

The trainer's gradient function (``make_grad_fn``: contrastive loss, scanned layers, remat "dots")
with ``attention_impl="splash"`` against ``"xla"`` on the same sharded params and batch, per mesh.
Prints one ``RESULT {json}``.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import json  # noqa: E402

import jax  # noqa: E402
from _train_helpers import fake_batches, max_rel_err, mesh_for, opt_config, tiny_config  # noqa: E402

import chinese_clip_jax as ccj  # noqa: E402
from chinese_clip_jax import sharding as shd  # noqa: E402
from chinese_clip_jax.training import create_train_state, make_optimizer  # noqa: E402
from chinese_clip_jax.training.step import make_grad_fn  # noqa: E402

# (data, fsdp, tensor): heads (2) over tensor 2; then tensor 4, which does not divide 2 heads
MESHES = [(2, 2, 2), (2, 1, 4)]


def scanned_model(cfg, impl):
    return ccj.ChineseCLIPModel(cfg, attention_impl=impl, scan_layers=True, remat="dots")


def main():
    cfg = tiny_config(heads=2, layers=1)
    tx, _ = make_optimizer(opt_config(), total_steps=10)
    host_batch = fake_batches(1, 8, seed=3, seq=6)[0]
    out = {"devices": jax.device_count(), "cases": []}
    for shape in MESHES:
        mesh = mesh_for(shape)
        state, _ = create_train_state(scanned_model(cfg, "xla"), tx, mesh, seed=0)
        batch = shd.shard_batch(host_batch, mesh)
        rng = jax.random.key(1)
        with shd.use_mesh_and_rules(mesh):
            lx, gx = jax.jit(make_grad_fn(scanned_model(cfg, "xla"), mesh))(state.params, batch, rng)
            ls, gs = jax.jit(make_grad_fn(scanned_model(cfg, "splash"), mesh))(state.params, batch, rng)
        rel, key_bias = max_rel_err(gs, gx)
        out["cases"].append(
            {"mesh": shape, "rel": rel, "key_bias": key_bias, "loss": abs(float(ls) - float(lx)) / abs(float(lx))}
        )
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
