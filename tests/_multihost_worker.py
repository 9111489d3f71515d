"""One process of the two-process test (tests/training/test_multihost.py): jax.distributed on CPU, 2 devices
per process, 3 train steps on a (data=4) mesh. Each process feeds only its half of every global
batch; process 0 prints the losses and the params. With NUM_PROCESSES=1 it runs the same
steps alone on 4 devices (the reference)."""

import os

num_processes = int(os.environ["NUM_PROCESSES"])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 // num_processes}"
import jax  # noqa: E402

if num_processes > 1:
    jax.distributed.initialize(
        coordinator_address=os.environ["COORDINATOR"],
        num_processes=num_processes,
        process_id=int(os.environ["PROCESS_ID"]),
    )
import json  # noqa: E402

import numpy as np  # noqa: E402
from _train_helpers import fake_batches, opt_config, tiny_config  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import chinese_clip_jax as ccj  # noqa: E402
from chinese_clip_jax import sharding as shd  # noqa: E402
from chinese_clip_jax.training import create_train_state, make_optimizer, make_train_step  # noqa: E402


def main():
    assert jax.process_count() == num_processes and jax.device_count() == 4
    model = ccj.ChineseCLIPModel(tiny_config(layers=1))
    tx, schedule = make_optimizer(opt_config(), 10)
    mesh = shd.make_mesh(-1, 1, 1)
    state, shardings = create_train_state(model, tx, mesh, seed=0)
    step = make_train_step(model, tx, schedule, mesh, shardings)
    per_process = 16 // num_processes
    lo = jax.process_index() * per_process
    losses = []
    with shd.use_mesh_and_rules(mesh):
        for b in fake_batches(3, 16):
            local = {k: v[lo : lo + per_process] for k, v in b.items()}  # this process's share only
            state, m = step(state, shd.shard_batch(local, mesh))
            losses.append(float(m["loss"]))
    # params are sharded over processes' devices; gather them to compare
    params = multihost_utils.process_allgather(state.params, tiled=True)
    flat = {jax.tree_util.keystr(p): np.asarray(x).tolist() for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    if jax.process_index() == 0:
        print("RESULT " + json.dumps({"losses": losses, "params": flat}), flush=True)


if __name__ == "__main__":
    main()
