"""Convert a Chinese-CLIP checkpoint between PyTorch layouts and Flax.

  python -m convert SRC OUT [--arch NAME] [--to flax|hf|pt] [--dtype float32|bfloat16] [--scan-layers]

SRC: a HF checkpoint dir, a hub id (online), a cn_clip .pt file, or a dir written by this command.
--to flax (default) writes an Orbax checkpoint (OUT/params) + config.json + vocab.txt;
--to hf writes config.json + model.safetensors + vocab.txt that transformers loads (ViT models;
a ResNet (RN50) model has no HF layout and is refused);
--to pt writes OUT/cn_clip.pt in cn_clip's own checkpoint layout (cn_clip and this tool read it).
--export writes the serving export instead (chinese_clip_jax.export): OUT/text_features.jaxexport,
OUT/image_features.jaxexport, OUT/params.safetensors and the processor files, for --platforms.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time


PT_NAME = "cn_clip.pt"  # the file --to pt writes inside OUT


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="HF dir, hub id, cn_clip .pt file, or a dir written by this command")
    parser.add_argument("out", help="output directory (must not already hold a checkpoint)")
    parser.add_argument("--arch", help="cn_clip architecture, e.g. ViT-B-16@RoBERTa-wwm-ext-base-chinese "
                        "(inferred from shapes when omitted)")
    parser.add_argument("--to", choices=("flax", "hf", "pt"), default="flax")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="storage dtype of the written params (models compute from fp32 params)")
    parser.add_argument("--scan-layers", action="store_true",
                        help="--to flax: store stacked layers (for scan_layers=True models)")
    parser.add_argument("--export", action="store_true",
                        help="write the jax.export serving artefacts (load with chinese_clip_jax.export.load_exported)")
    parser.add_argument("--platforms", default="cpu,cuda,tpu",
                        help="--export: comma list of platforms the artefacts run on (default cpu,cuda,tpu)")
    parser.add_argument("--context-length", type=int, default=52, help="--export: fixed text length (default 52)")
    args = parser.parse_args(argv)
    platforms = tuple(p.strip() for p in args.platforms.split(",") if p.strip())
    bad = [p for p in platforms if p not in ("cpu", "cuda", "tpu", "rocm")]
    if args.export and (bad or not platforms):
        parser.error(f"--platforms: unknown platform(s) {', '.join(bad) or '(none given)'}; choose from cpu, cuda, "
                     "tpu, rocm")

    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # convert in host memory, whatever accelerators exist
    from chinese_clip_jax import conversion
    from chinese_clip_jax.conversion import mapping

    start = time.perf_counter()
    try:
        cfg, params, kind, directory = conversion.load_params(args.src, arch=args.arch)
        params = mapping.stack_layers(params) if args.scan_layers else mapping.unstack_layers(params)
        if args.export:
            from chinese_clip_jax.export import save_exported

            save_exported(args.out, cfg, params, platforms=platforms, context_length=args.context_length,
                          processor_from=directory)
        elif args.to == "hf":
            if os.path.exists(os.path.join(args.out, "model.safetensors")):
                raise FileExistsError(f"{args.out}/model.safetensors already exists; choose an empty directory")
            conversion.save_pretrained(args.out, cfg, params, dtype=args.dtype, processor_from=directory)
        elif args.to == "pt":
            if args.dtype != "float32":
                raise ValueError("--to pt writes float32 tensors (as cn_clip's checkpoints); drop --dtype")
            conversion.save_cn_clip(os.path.join(args.out, PT_NAME), cfg, params)
        else:
            conversion.save_flax(args.out, cfg, params, dtype=args.dtype, processor_from=directory)
    except (OSError, ValueError) as e:  # CheckpointError is a ValueError: clear message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_params = sum(x.size for x in mapping.flatten(params).values())
    target = f"export ({','.join(platforms)})" if args.export else args.to
    print(
        f"converted {kind} checkpoint {args.src} -> {target} {args.out}\n"
        f"  parameters: {n_params:,} ({n_params / 1e6:.1f} M), stored as {args.dtype}\n"
        f"  time: {time.perf_counter() - start:.1f} s, peak memory (RSS): {_peak_rss_gib():.2f} GiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
