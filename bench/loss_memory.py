"""Memory and speed of the contrastive loss step, all-gather vs ring (``loss_impl``), on CPU devices.

    .venv/bin/python bench/loss_memory.py                       # the tables of docs/performance.md
    .venv/bin/python bench/loss_memory.py --devices 16 --local 8 --dim 8 --chunk 4 --budget-mib 0.05 --no-speed  # small

The "loss step" is ``jax.jit(jax.value_and_grad(loss))`` over (text, image, logit_scale,
logit_bias) with the embeddings sharded over the batch devices, as in the trainer after the
towers (``ring_losses.contrastive_loss_by_impl``, fp32, ``--dim`` wide). Simulated CPU
devices (``--xla_force_host_platform_device_count``, set here); one process, meshes over the
first n of them. Reported, per device, from XLA's ``compiled.memory_analysis()`` (a property
of the compiled program, not of a run):

* weak scaling: ``--local`` rows per device on 8, 16, ... ``--devices`` devices (the global
  batch grows with the device count): ``temp MiB``, the temporaries of the loss step;
* fixed devices: 8 devices, the global batch growing 8x from ``--local`` x 8;
* the largest global batch whose loss-step temporaries fit ``--budget-mib`` per device on 8
  devices (binary search over multiples of 8 x the ring's chunk, compiling each probe);
* ``--speed``: median wall time and process CPU time of the loss step (forward + backward) on
  8 devices, the four programs taking turns in every repeat, with the machine's load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

KINDS = ("softmax", "sigmoid")
IMPLS = ("gather", "ring")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=64, help="simulated CPU devices (weak-scaling sweep up to this)")
    p.add_argument("--local", type=int, default=256, help="rows per device in the weak-scaling sweep")
    p.add_argument("--dim", type=int, default=512, help="embedding width (projection_dim)")
    p.add_argument("--chunk", type=int, default=128, help="the ring's column slice (config.loss_chunk)")
    p.add_argument("--budget-mib", type=float, default=1024.0, help="per-device budget for the largest-batch search")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True, help="the memory tables")
    p.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True, help="time the loss step")
    p.add_argument("--speed-batches", default="1024,2048,4096", help="global batches timed on 8 devices")
    p.add_argument("--repeats", type=int, default=5, help="timed loss steps per point (median)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
    )
    import jax
    import jax.numpy as jnp

    from chinese_clip_jax import sharding as shd
    from chinese_clip_jax.training.ring_losses import contrastive_loss_by_impl

    def mesh_of(n):
        return shd.make_mesh(n, 1, 1, devices=jax.devices()[:n])

    def step_fn(kind, impl, mesh, chunk):
        def loss(t, v, s, b):
            return contrastive_loss_by_impl(kind, t, v, s, b, impl=impl, mesh=mesh, chunk=chunk)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))

    def chunk_for(local):
        return min(args.chunk, local)

    def temp_mib(kind, impl, n, batch) -> float:
        mesh = mesh_of(n)
        emb = jax.ShapeDtypeStruct((batch, args.dim), jnp.float32, sharding=shd.batch_sharding(mesh))
        scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=shd.replicated(mesh))
        with shd.use_mesh_and_rules(mesh):
            fn = step_fn(kind, impl, mesh, chunk_for(batch // n))
            mem = fn.lower(emb, emb, scalar, scalar).compile().memory_analysis()
        return mem.temp_size_in_bytes / 2**20

    env = (
        f"jax {jax.__version__}, {os.cpu_count()} CPU cores ({sys.platform}), dim {args.dim}, "
        f"chunk {args.chunk}, fp32; temp MiB per device"
    )
    print(f"# {env}")

    if args.memory:
        print(f"\n## weak scaling: {args.local} rows per device")
        print("devices  global_batch  " + "  ".join(f"{k}:{i}" for k in KINDS for i in IMPLS))
        n = 8
        while n <= args.devices:
            row = [temp_mib(k, i, n, n * args.local) for k in KINDS for i in IMPLS]
            print(f"{n:7d}  {n * args.local:12d}  " + "  ".join(f"{x:.2f}" for x in row), flush=True)
            n *= 2

        print("\n## 8 devices, growing global batch")
        print("global_batch  per_device  " + "  ".join(f"{k}:{i}" for k in KINDS for i in IMPLS))
        for factor in (1, 2, 4, 8):
            batch = 8 * args.local * factor
            row = [temp_mib(k, i, 8, batch) for k in KINDS for i in IMPLS]
            print(f"{batch:12d}  {batch // 8:10d}  " + "  ".join(f"{x:.2f}" for x in row), flush=True)

        print(
            f"\n## largest global batch within {args.budget_mib:g} MiB of loss-step temporaries per device, 8 devices"
        )
        step = 8 * args.chunk
        for kind in KINDS:
            for impl in IMPLS:
                lo, hi = 0, step
                while temp_mib(kind, impl, 8, hi) <= args.budget_mib:  # double, then bisect
                    lo, hi = hi, hi * 2
                    if hi > 2**24:
                        break
                while hi - lo > step:
                    mid = (lo + hi) // 2 // step * step
                    lo, hi = (mid, hi) if temp_mib(kind, impl, 8, mid) <= args.budget_mib else (lo, mid)
                print(f"{kind}:{impl}  {lo}", flush=True)

    if args.speed:
        speed(args, step_fn, chunk_for, mesh_of(8))


def speed(args, step_fn, chunk_for, mesh) -> None:
    """Median wall time per loss step; the four programs take turns in every repeat (a busy
    machine slows them alike)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from chinese_clip_jax import sharding as shd

    print(f"\n## speed, 8 devices: loss step (forward + backward), median of {args.repeats}: wall ms / process CPU ms")
    print("global_batch  " + "  ".join(f"{k}:{i}" for k in KINDS for i in IMPLS) + "  load")
    for batch in (int(b) for b in args.speed_batches.split(",")):
        rng = np.random.default_rng(0)
        t, v = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in rng.standard_normal((2, batch, args.dim)))
        with shd.use_mesh_and_rules(mesh):
            placed = shd.shard_batch({"t": t.astype(np.float32), "v": v.astype(np.float32)}, mesh)
            inputs = (placed["t"], placed["v"], jnp.float32(2.6), jnp.float32(-10.0))
            fns = [step_fn(k, i, mesh, chunk_for(batch // 8)) for k in KINDS for i in IMPLS]
            for fn in fns:  # compile and warm up
                jax.block_until_ready(fn(*inputs))
            times, cpu = [[] for _ in fns], [[] for _ in fns]
            for _ in range(args.repeats):
                for fn, ts, cs in zip(fns, times, cpu):
                    t0, c0 = time.perf_counter(), time.process_time()
                    jax.block_until_ready(fn(*inputs))
                    ts.append(time.perf_counter() - t0)
                    cs.append(time.process_time() - c0)
        row = "  ".join(
            f"{1e3 * statistics.median(ts):.0f}/{1e3 * statistics.median(cs):.0f}" for ts, cs in zip(times, cpu)
        )
        print(f"{batch:12d}  {row}  {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
