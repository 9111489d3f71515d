"""Run in a subprocess with 8 simulated CPU devices (see tests/training/test_ring_losses.py).

Prints one JSON object: for each mesh, loss kind and chunk, the relative error of the ring
loss and of its gradients (text, image, logit_scale, logit_bias) against the all-gather
version and of the loss against a float64 numpy reference; the collectives of both programs;
the loss step's temporaries (InfoNCE) as the global batch grows 8x; GradCache accumulation
(accum_steps=4) with the ring against the gather; and the per-step losses of a 3-step
training run with either implementation.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import json  # noqa: E402
import math  # noqa: E402
from functools import partial  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _train_helpers import fake_batches, max_rel_err, mesh_for, opt_config, tiny_config  # noqa: E402

import chinese_clip_jax as ccj  # noqa: E402
from chinese_clip_jax import sharding as shd  # noqa: E402
from chinese_clip_jax.training import create_train_state, make_optimizer, make_train_step  # noqa: E402
from chinese_clip_jax.training.losses import MAX_LOGIT_SCALE, SIGLIP_INIT_LOGIT_BIAS  # noqa: E402
from chinese_clip_jax.training.ring_losses import contrastive_loss_by_impl  # noqa: E402
from chinese_clip_jax.training.step import make_grad_fn  # noqa: E402

MESHES = [((8, 1, 1), 2), ((2, 2, 2), 0), ((1, 4, 2), 2)]  # (mesh, ring chunk)
KINDS = {"softmax": (MAX_LOGIT_SCALE, 0.0), "sigmoid": (math.log(10.0), SIGLIP_INIT_LOGIT_BIAS)}  # (scale, bias)


def uneven_embeds(n_dev, per_dev=4, d=16, seed=0):
    """(B, d) text/image pairs whose device blocks differ: duplicates (ties), near-perfect pairs
    (large positive logits), opposite pairs (large negative ones) and random ones."""
    rng = np.random.default_rng(seed)
    t, v = rng.standard_normal((2, n_dev * per_dev, d))
    for dev in range(n_dev):
        rows = slice(dev * per_dev, (dev + 1) * per_dev)
        kind = dev % 4
        if kind == 0:  # every row of the block the same pair
            t[rows], v[rows] = t[rows][:1], v[rows][:1]
        elif kind == 1:  # images almost equal to their texts
            v[rows] = t[rows] + 0.01 * rng.standard_normal((per_dev, d))
        elif kind == 2:  # images opposite to their texts
            v[rows] = -t[rows]
    norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    return norm(t).astype(np.float32), norm(v).astype(np.float32)


def reference(kind, t, v, s, b):
    logits = math.exp(s) * t.astype(np.float64) @ v.astype(np.float64).T
    if kind == "softmax":
        lse = lambda x, ax: np.log(np.exp(x - x.max(ax, keepdims=True)).sum(ax)) + x.max(ax)  # noqa: E731
        diag = np.diag(logits)
        return 0.5 * (np.mean(lse(logits, 1) - diag) + np.mean(lse(logits, 0) - diag))
    z = 2 * np.eye(len(t)) - 1
    return np.sum(np.logaddexp(0.0, -z * (logits + b))) / len(t)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def run_losses(impl, mesh, chunk, t, v):
    """{kind: (loss, grads)} of both kinds in one compiled program, and its HLO text."""

    def grads(t, v, scales, biases):
        def loss(kind, *args):
            return contrastive_loss_by_impl(kind, *args, impl=impl, mesh=mesh, chunk=chunk)

        return {
            k: jax.value_and_grad(partial(loss, k), argnums=(0, 1, 2, 3))(t, v, scales[k], biases[k]) for k in KINDS
        }

    with shd.use_mesh_and_rules(mesh):
        placed = shd.shard_batch({"t": t, "v": v}, mesh)
        args = (placed["t"], placed["v"], {k: jnp.float32(sb[0]) for k, sb in KINDS.items()})
        args += ({k: jnp.float32(sb[1]) for k, sb in KINDS.items()},)
        compiled = jax.jit(grads).lower(*args).compile()
        return compiled(*args), compiled.as_text()


def loss_checks():
    out = {}
    for shape, chunk in MESHES:
        mesh = mesh_for(shape)
        n = shape[0] * shape[1]
        t, v = uneven_embeds(n, per_dev=8 if n == 2 else 4)
        got_g, hlo_g = run_losses("gather", mesh, chunk, t, v)
        got_r, hlo_r = run_losses("ring", mesh, chunk, t, v)
        for kind, (s, bias) in KINDS.items():
            (lg, gg), (lr, gr) = got_g[kind], got_r[kind]
            ref = reference(kind, t, v, s, bias)
            out[f"{shape} {kind} chunk={chunk}"] = {
                "loss": float(lr),
                "loss_rel_err": abs(float(lr) - float(lg)) / abs(float(lg)),
                "ref_rel_err": float(abs(float(lr) - ref) / ref),
                "grad_rel_err": {name: rel(a, b) for name, a, b in zip(("text", "image", "scale", "bias"), gr, gg)},
            }
        out[f"{shape} collectives"] = {
            impl: [c for c in ("all-gather", "collective-permute") if c in hlo]
            for impl, hlo in (("gather", hlo_g), ("ring", hlo_r))
        }
    return out


def memory_check():
    """Loss-step temporaries per device (XLA's memory analysis), 8 devices, dim 32, ring chunk 8,
    global batch 256 -> 2048: {impl: [MiB, MiB]}."""
    mesh = mesh_for((8, 1, 1))
    out = {}
    for impl in ("gather", "ring"):
        out[impl] = []
        for batch in (256, 2048):
            emb = jax.ShapeDtypeStruct((batch, 32), jnp.float32, sharding=shd.batch_sharding(mesh))
            scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=shd.replicated(mesh))

            def loss(t, v, s, b, impl=impl):
                return contrastive_loss_by_impl("softmax", t, v, s, b, impl=impl, mesh=mesh, chunk=8)

            with shd.use_mesh_and_rules(mesh):
                compiled = (
                    jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(emb, emb, scalar, scalar).compile()
                )
            out[impl].append(compiled.memory_analysis().temp_size_in_bytes / 2**20)
    return out


def accum_check():
    """GradCache (accum_steps=4) on a (2, 2, 2) mesh, sigmoid loss (learnable scale and bias):
    the ring's gradients against the gather's."""
    mesh = mesh_for((2, 2, 2))
    tx, _ = make_optimizer(opt_config(), total_steps=10)
    model = ccj.ChineseCLIPModel(tiny_config(layers=1), logit_bias_init=SIGLIP_INIT_LOGIT_BIAS)
    state, _ = create_train_state(model, tx, mesh, seed=0, loss="sigmoid")
    batch = shd.shard_batch(fake_batches(1, 32, seed=7)[0], mesh)
    rng = jax.random.PRNGKey(3)
    out = {}
    with shd.use_mesh_and_rules(mesh):
        for impl in ("gather", "ring"):
            grad_fn = make_grad_fn(model, mesh, loss="sigmoid", accum_steps=4, loss_impl=impl, loss_chunk=2)
            out[impl] = jax.jit(grad_fn)(state.params, batch, rng)
    (lg, gg), (lr, gr) = out["gather"], out["ring"]
    return {
        "loss_rel_err": abs(float(lr) - float(lg)) / abs(float(lg)),
        "grad_rel_err": max_rel_err(gr, gg)[0],
        "scale_grad_rel_err": rel(gr["logit_scale"], gg["logit_scale"]),
        "bias_grad_rel_err": rel(gr["logit_bias"], gg["logit_bias"]),
    }


def training_check():
    """3 AdamW steps on a (4, 1, 2) mesh with each loss_impl: the losses step by step."""
    mesh = mesh_for((4, 1, 2))
    model = ccj.ChineseCLIPModel(tiny_config(layers=1))
    tx, schedule = make_optimizer(opt_config(), total_steps=10)
    batches = fake_batches(3, 16)
    out = {}
    for impl in ("gather", "ring"):
        state, shardings = create_train_state(model, tx, mesh, seed=0)
        step = make_train_step(model, tx, schedule, mesh, shardings, loss_impl=impl)
        losses = []
        with shd.use_mesh_and_rules(mesh):
            for b in batches:
                state, m = step(state, shd.shard_batch(b, mesh))
                losses.append(float(m["loss"]))
        out[impl] = losses
    return out


def main():
    checks = {"losses": loss_checks(), "memory": memory_check(), "accum": accum_check(), "train": training_check()}
    print("RESULT " + json.dumps(checks))


if __name__ == "__main__":
    main()
