"""Serving export of a published size (random weights): artefact sizes, export time, and the
load + first-call time of ``load_exported`` in a fresh process (what a server pays at start).

  python bench/export.py [--preset chinese-clip-vit-base-patch16] [--platforms cpu,cuda,tpu] [--batch 8]

Params are drawn with numpy at the preset's shapes (no checkpoint download, no XLA compile).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

LOAD = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from chinese_clip_jax.export import load_exported
t1 = time.perf_counter()
enc = load_exported(sys.argv[1])
t2 = time.perf_counter()
b = int(sys.argv[2])
ids = np.zeros((b, enc.context_length), np.int32); ids[:, 0] = 101; ids[:, 1] = 102
px = np.zeros((b, 3, enc.image_size, enc.image_size), np.float32)
enc.text(ids, (ids > 0).astype(np.int32)).block_until_ready(); t3 = time.perf_counter()
enc.image(px).block_until_ready(); t4 = time.perf_counter()
enc.text(ids, (ids > 0).astype(np.int32)).block_until_ready(); t5 = time.perf_counter()
enc.image(px).block_until_ready(); t6 = time.perf_counter()
heavy = [m for m in ("flax", "optax", "transformers", "torch", "chinese_clip_jax.modeling") if m in sys.modules]
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_text_s": t3 - t2, "first_image_s": t4 - t3,
                  "next_text_s": t5 - t4, "next_image_s": t6 - t5, "heavy_modules": heavy}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="chinese-clip-vit-base-patch16")
    ap.add_argument("--platforms", default="cpu,cuda,tpu")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    import chinese_clip_jax as ccj
    from chinese_clip_jax.conversion.export import save_exported

    cfg = ccj.ChineseCLIPConfig.preset(args.preset)
    r = cfg.vision_config.image_size
    shapes = nn.unbox(
        jax.eval_shape(
            ccj.ChineseCLIPModel(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 3, r, r))
        )["params"]
    )
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "export")
        t = time.perf_counter()
        save_exported(out, cfg, params, platforms=tuple(args.platforms.split(",")))
        export_s = time.perf_counter() - t
        sizes = {f: os.path.getsize(os.path.join(out, f)) for f in sorted(os.listdir(out))}
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        t = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", LOAD, out, str(args.batch)], env=env, capture_output=True, text=True, check=True
        )
        total_s = time.perf_counter() - t
    timing = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{args.preset}, platforms {args.platforms}, backend {jax.default_backend()}, batch {args.batch}")
    print(f"  export (trace + lower + serialize): {export_s:.1f} s")
    for f, n in sizes.items():
        print(f"  {f:28s} {n / 2**20:10.2f} MiB")
    print(
        f"  fresh process: import {timing['import_s']:.2f} s, load {timing['load_s']:.2f} s, first text call "
        f"{timing['first_text_s']:.2f} s, first image call {timing['first_image_s']:.2f} s, then "
        f"{timing['next_text_s'] * 1e3:.0f} / {timing['next_image_s'] * 1e3:.0f} ms; whole process {total_s:.1f} s"
    )
    print(f"  heavy modules imported by the loader: {timing['heavy_modules'] or 'none'}")


if __name__ == "__main__":
    main()
