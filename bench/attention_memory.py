"""Per-device temporaries of attention alone, XLA against Pallas splash, compiled for a TPU target.

    PYTHONPATH=$PWD:SITE python bench/attention_memory.py --target v5e:2x2   # the table of docs/accelerators.md

A stack of ``--layers`` scanned attention blocks (``x + Attention(x)``, bf16, base widths: 12
heads of 64, remat "dots", as the TPU defaults run the towers) is differentiated and compiled
for ``--target`` (a TPU topology: needs libtpu, the ``[tpu-compile]`` extra), batch
``--batch`` over the (data) mesh of its chips, at the text length (52, key-padded) and the
ViT-B/16 image length (197). Printed per row: XLA's ``memory_analysis()`` temporaries per device,
for XLA attention and for splash with q, k, v head_dim-minor and seq-minor (the shipped layout).
A compiled-program figure, not a run: no TPU is needed and nothing is timed.
"""

from __future__ import annotations

import argparse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default="v5e:2x2", help="a TPU topology (ccj-train --compile-only --target)")
    p.add_argument("--batch", type=int, default=512, help="global batch")
    p.add_argument("--layers", type=int, default=4, help="scanned attention blocks")
    return p.parse_args(argv)


def temp_mib(target, seq: int, masked: bool, batch: int, layers: int, impl: str) -> float:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from chinese_clip_jax import sharding as shd
    from chinese_clip_jax.modeling.layers import Dense, LayerStack
    from chinese_clip_jax.modeling.splash import splash_attention

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, mask):
            q, k, v = (Dense((12, 64), ("embed",), ("heads", "kv"), dtype=jnp.bfloat16)(x) for _ in range(3))
            if impl == "xla":
                y = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
            else:
                y = splash_attention(q, k, v, mask, seq_minor=impl == "splash seq-minor")
            return x + Dense(768, ("heads", "kv"), ("embed",), dtype=jnp.bfloat16)(y), None

    mesh = shd.make_mesh(-1, 1, 1, devices=target.devices)
    stack = LayerStack(Block, {}, layers, scan=True, remat="dots")
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(shd.BATCH_AXES))
    x = jax.ShapeDtypeStruct((batch, seq, 768), jnp.bfloat16, sharding=rows)
    mask = jax.ShapeDtypeStruct((batch, 1, 1, seq), jnp.bool_, sharding=rows) if masked else None
    example_mask = jnp.ones((1, 1, 1, seq), jnp.bool_) if masked else None
    params = jax.eval_shape(lambda: stack.init(jax.random.key(0), jnp.zeros((1, seq, 768), jnp.bfloat16), example_mask))

    def loss(p, x, m):
        return stack.apply(p, x, m).astype(jnp.float32).sum()

    with shd.use_mesh_and_rules(mesh):
        compiled = jax.jit(jax.grad(loss)).lower(params, x, mask).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def main(argv=None):
    args = parse_args(argv)
    from chinese_clip_jax.training.targets import open_target

    target = open_target(args.target)
    impls = ("xla", "splash head_dim-minor", "splash seq-minor")
    print(f"{args.target}, global batch {args.batch}, {args.layers} scanned blocks, remat dots; temp MiB/device")
    print("| tokens | " + " | ".join(impls) + " |")
    print("|---|" + "---|" * len(impls))
    for seq, masked, name in ((52, True, "text 52 (key-padded)"), (197, False, "image 197")):
        figures = [temp_mib(target, seq, masked, args.batch, args.layers, impl) for impl in impls]
        print(f"| {name} | " + " | ".join(f"{f:.0f}" for f in figures) + " |", flush=True)


if __name__ == "__main__":
    main()
