"""Convert a Chinese-CLIP checkpoint between PyTorch layouts and Flax.

  python -m convert SRC OUT [--arch NAME] [--to flax|hf] [--dtype float32|bfloat16] [--scan-layers]

SRC: a HF checkpoint dir, a hub id (online), a cn_clip .pt file, or a dir written by this command.
--to flax (default) writes an Orbax checkpoint (OUT/params) + config.json + vocab.txt;
--to hf writes config.json + model.safetensors + vocab.txt that transformers loads.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _remove_outputs(out: str, to: str, out_existed: bool) -> None:
    """After a failed write: removes what this run created (nothing there was the user's, checked first)."""
    import shutil

    from chinese_clip_jax import conversion

    for name in conversion.output_names(to):
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)
    if os.path.isdir(out):
        for name in os.listdir(out):  # Orbax temp dirs of an interrupted save
            if ".orbax-checkpoint-tmp" in name:
                shutil.rmtree(os.path.join(out, name), ignore_errors=True)
        if not out_existed and not os.listdir(out):
            os.rmdir(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="HF dir, hub id, cn_clip .pt file, or a dir written by this command")
    parser.add_argument("out", help="output directory (must not already hold a checkpoint)")
    parser.add_argument("--arch", help="cn_clip architecture, e.g. ViT-B-16@RoBERTa-wwm-ext-base-chinese "
                        "(inferred from shapes when omitted)")
    parser.add_argument("--to", choices=("flax", "hf"), default="flax")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="storage dtype of the written params (models compute from fp32 params)")
    parser.add_argument("--scan-layers", action="store_true",
                        help="--to flax: store stacked layers (for scan_layers=True models)")
    args = parser.parse_args(argv)

    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # convert in host memory, whatever accelerators exist
    from chinese_clip_jax import conversion
    from chinese_clip_jax.conversion import mapping

    start = time.perf_counter()
    # Never overwrite: every name this conversion may write is checked before any work.
    existing = [n for n in conversion.output_names(args.to) if os.path.lexists(os.path.join(args.out, n))]
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        existing = [""]
    if existing:
        print(f"error: {os.path.join(args.out, existing[0])} already exists; convert never overwrites: choose a "
              "new or empty output directory", file=sys.stderr)
        return 2
    out_existed = os.path.isdir(args.out)
    try:
        if os.path.isdir(args.src):  # its image settings are copied: a bad file fails before any work
            from chinese_clip_jax.image_settings import read_image_settings

            read_image_settings(args.src)
        cfg, params, kind, directory = conversion.load_params(args.src, arch=args.arch)
        params = mapping.stack_layers(params) if args.scan_layers else mapping.unstack_layers(params)
        save = conversion.save_pretrained if args.to == "hf" else conversion.save_flax
        save(args.out, cfg, params, dtype=args.dtype, processor_from=directory)
    except (OSError, ValueError) as e:  # CheckpointError is a ValueError: clear message, no traceback
        _remove_outputs(args.out, args.to, out_existed)
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    n_params = sum(x.size for x in mapping.flatten(params).values())
    print(
        f"converted {kind} checkpoint {args.src} -> {args.to} {args.out}\n"
        f"  parameters: {n_params:,} ({n_params / 1e6:.1f} M), stored as {args.dtype}\n"
        f"  time: {time.perf_counter() - start:.1f} s, peak memory (RSS): {_peak_rss_gib():.2f} GiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
