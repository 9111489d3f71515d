"""Run in a subprocess with 8 simulated CPU devices (see tests/training/test_losses_groups.py).

Prints one JSON object: for meshes (8,1,1) with ring column slices of 2 and (2,2,2) without, and
both loss kinds, the relative error of the ring loss with repeated groups (spanning devices) and
of its gradients against the all-gather loss, of the loss against the float64 NumPy reference,
and how far the grouped loss is from the plain one; then GradCache (accum_steps=4) with the ring
against one full batch with the gather, for caption and label positives.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import json  # noqa: E402
from functools import partial  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _ring_losses_check import mesh_for, rel, uneven_embeds  # noqa: E402
from _train_helpers import (  # noqa: E402
    KINDS,
    fake_batches,
    max_rel_err,
    opt_config,
    reference_loss,
    tiny_config,
    with_repeated_captions,
)

import chinese_clip_jax as ccj  # noqa: E402
from chinese_clip_jax import sharding as shd  # noqa: E402
from chinese_clip_jax.training import create_train_state, make_optimizer  # noqa: E402
from chinese_clip_jax.training.losses import SIGLIP_INIT_LOGIT_BIAS  # noqa: E402
from chinese_clip_jax.training.ring_losses import contrastive_loss_by_impl  # noqa: E402
from chinese_clip_jax.training.step import make_grad_fn  # noqa: E402


def group_loss_checks():
    out = {}
    groups = np.random.default_rng(3).integers(0, 9, size=32).astype(np.int32)  # ~3.5 pairs a group
    for shape, chunk in (((8, 1, 1), 2), ((2, 2, 2), 0)):
        mesh = mesh_for(shape)
        t, v = uneven_embeds(shape[0] * shape[1], per_dev=32 // (shape[0] * shape[1]))
        for kind, (scale, bias) in KINDS.items():
            bias = 0.0 if bias is None else bias
            got = {}
            for impl, g in (("gather", groups), ("ring", groups), ("ring", None)):
                f = partial(contrastive_loss_by_impl, kind, impl=impl, mesh=mesh, chunk=chunk)
                with shd.use_mesh_and_rules(mesh):
                    placed = shd.shard_batch({"t": t, "v": v, "g": np.arange(32) if g is None else g}, mesh)
                    fn = jax.jit(
                        jax.value_and_grad(
                            lambda t, v, s, b, g, f=f, grouped=g is not None: f(t, v, s, b, g if grouped else None),
                            argnums=(0, 1, 2, 3),
                        )
                    )
                    got[impl, g is None] = fn(
                        placed["t"], placed["v"], jnp.float32(scale), jnp.float32(bias), placed["g"]
                    )
            (lg, gg), (lr, gr), (lp, _) = got["gather", False], got["ring", False], got["ring", True]
            ref = reference_loss(kind, t, v, scale, bias, groups)
            out[f"{shape} {kind} chunk={chunk}"] = {
                "loss": float(lr),
                "loss_rel_err": abs(float(lr) - float(lg)) / abs(float(lg)),
                "ref_rel_err": abs(float(lr) - ref) / ref,
                "grad_rel_err": {n: rel(a, b) for n, a, b in zip(("text", "image", "scale", "bias"), gr, gg)},
                "vs_pair": abs(float(lr) - float(lp)) / abs(float(lp)),
            }
    return out


def accum_checks():
    mesh = mesh_for((2, 2, 2))
    model = ccj.ChineseCLIPModel(tiny_config(layers=1), logit_bias_init=SIGLIP_INIT_LOGIT_BIAS)
    tx, _ = make_optimizer(opt_config(), total_steps=10)
    state, _ = create_train_state(model, tx, mesh, seed=0, loss="sigmoid")
    batch = shd.shard_batch(with_repeated_captions(fake_batches(1, 16, seed=7)[0]), mesh)
    rng = jax.random.PRNGKey(3)
    out = {}
    with shd.use_mesh_and_rules(mesh):
        for loss in ("softmax", "sigmoid"):
            for positives in ("caption", "label"):
                full = make_grad_fn(model, mesh, loss=loss, positives=positives)
                ring = make_grad_fn(
                    model, mesh, loss=loss, accum_steps=4, loss_impl="ring", loss_chunk=2, positives=positives
                )
                (lf, gf), (lr, gr) = jax.jit(full)(state.params, batch, rng), jax.jit(ring)(state.params, batch, rng)
                out[f"{loss} {positives}"] = {
                    "loss_rel_err": abs(float(lr) - float(lf)) / abs(float(lf)),
                    "grad_rel_err": max_rel_err(gr, gf)[0],
                }
    return out


def main():
    print("RESULT " + json.dumps({"losses": group_loss_checks(), "accum": accum_checks()}))


if __name__ == "__main__":
    main()
