"""Run in a subprocess with 8 simulated CPU devices (tests/training/test_loop.py, tests/test_sharding.py).

Prints one JSON object: per mesh the 3-step losses and the max relative param error against
the single-device run, sharding specs, sharded-init equality, and the GradCache check.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from _train_helpers import fake_batches, max_rel_err, mesh_for, opt_config, tiny_config  # noqa: E402

import chinese_clip_jax as ccj  # noqa: E402
from chinese_clip_jax import sharding as shd  # noqa: E402
from chinese_clip_jax.training import create_train_state, make_optimizer, make_train_step  # noqa: E402
from chinese_clip_jax.training.step import make_grad_fn  # noqa: E402

MESHES = [(1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 4, 2)]


def main():
    cfg = tiny_config(layers=1)
    model = ccj.ChineseCLIPModel(cfg)
    tx, schedule = make_optimizer(opt_config(), total_steps=10)
    batches = fake_batches(3, 16)
    out = {"meshes": {}}
    ref_params = ref_init = None
    for shape in MESHES:
        mesh = mesh_for(shape)
        state, shardings = create_train_state(model, tx, mesh, seed=0)
        init = jax.tree.map(np.asarray, state.params)
        step = make_train_step(model, tx, schedule, mesh, shardings)
        losses = []
        with shd.use_mesh_and_rules(mesh):
            for b in batches:
                state, m = step(state, shd.shard_batch(b, mesh))
                losses.append(float(m["loss"]))
        params = jax.tree.map(np.asarray, state.params)
        if ref_params is None:
            ref_params, ref_init, ref_losses = params, init, losses
        out["meshes"][str(shape)] = {
            "losses": losses,
            "loss_rel_err": max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)),
            "param_rel_err": max_rel_err(params, ref_params)[0],
            "key_bias_abs_err": max_rel_err(params, ref_params)[1],
            "init_rel_err": max_rel_err(init, ref_init)[0],
        }
        if shape == (2, 2, 2):
            p = state.params
            out["specs"] = {
                "word_embeddings": str(p["text_model"]["embeddings"]["word_embeddings"]["embedding"].sharding.spec),
                "fc1": str(p["text_model"]["encoder"]["layer_0"]["mlp"]["fc1"]["kernel"].sharding.spec),
                "query": str(p["vision_model"]["encoder"]["layer_0"]["attention"]["query"]["kernel"].sharding.spec),
                "mu_fc1": str(
                    state.opt_state.inner_states["trainable"]
                    .inner_state[0][0]
                    .mu["text_model"]["encoder"]["layer_0"]["mlp"]["fc1"]["kernel"]
                    .sharding.spec
                ),
                "n_devices_fc1": len(p["text_model"]["encoder"]["layer_0"]["mlp"]["fc1"]["kernel"].sharding.device_set),
            }
            # GradCache: accum_steps=4 against the full batch, on this sharded mesh
            full = make_grad_fn(model, mesh, accum_steps=1)
            accum = make_grad_fn(model, mesh, accum_steps=4)
            gb = shd.shard_batch(fake_batches(1, 16, seed=7)[0], mesh)
            rng = jax.random.PRNGKey(3)
            with shd.use_mesh_and_rules(mesh):
                lf, gf = jax.jit(full)(state.params, gb, rng)
                la, ga = jax.jit(accum)(state.params, gb, rng)
            out["accum"] = {
                "loss_rel_err": abs(float(la) - float(lf)) / abs(float(lf)),
                "grad_rel_err": max_rel_err(ga, gf)[0],
                "key_bias_abs_err": max_rel_err(ga, gf)[1],
                "grad_norm": float(np.sqrt(sum(np.sum(np.square(np.asarray(g))) for g in jax.tree.leaves(gf)))),
            }
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
