"""jit compile time of each published size's forward pass, with and without scan_layers.

  python bench/compile_time.py [--sizes base-patch16,huge-patch14] [--batch 8]

Lowers and compiles ``model.__call__`` (both towers + logits) on abstract inputs, so no params are
materialised; prints one row per size and mode. Compile time only: nothing is executed.
"""

import argparse
import time

import jax
import jax.numpy as jnp

import chinese_clip_jax as ccj
from chinese_clip_jax.modeling.config import PRESETS


def compile_seconds(cfg, scan_layers, batch, dtype):
    model = ccj.ChineseCLIPModel(cfg, dtype=dtype, scan_layers=scan_layers)
    r = cfg.vision_config.image_size
    ids = jax.ShapeDtypeStruct((batch, 52), jnp.int32)
    pixels = jax.ShapeDtypeStruct((batch, 3, r, r), jnp.float32)
    params = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 52), jnp.int32), jnp.zeros((1, 3, r, r)))
    )["params"]

    def forward(params, ids, pixels):
        return model.apply({"params": params}, ids, pixels, attention_mask=jnp.ones_like(ids)).logits_per_image

    start = time.perf_counter()
    lowered = jax.jit(forward).lower(params, ids, pixels)
    lowered_at = time.perf_counter()
    lowered.compile()
    return lowered_at - start, time.perf_counter() - lowered_at


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    vits = [n for n, c in PRESETS.items() if not c.is_resnet]  # the layer layouts compared are the ViTs'
    parser.add_argument("--sizes", default=",".join(vits), help="comma list of preset names (suffix ok)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    names = [n if n in PRESETS else "chinese-clip-vit-" + n for n in args.sizes.split(",")]
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, batch {args.batch}, {args.dtype}")
    print(f"{'size':40s} {'scan_layers':>11s} {'trace+lower s':>14s} {'compile s':>10s} {'total s':>8s}")
    for name in names:
        cfg = ccj.ChineseCLIPConfig.preset(name)
        for scan in (False, True):
            lower_s, compile_s = compile_seconds(cfg, scan, args.batch, jnp.dtype(args.dtype))
            print(
                f"{name:40s} {str(scan):>11s} {lower_s:14.1f} {compile_s:10.1f} {lower_s + compile_s:8.1f}", flush=True
            )


if __name__ == "__main__":
    main()
