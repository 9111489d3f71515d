"""Conversion time and peak memory for the huge size (ViT-H/14 + RoBERTa-wwm-large, ~958 M params).

  python bench/convert_huge.py [--workdir build/bench-convert] [--to flax]

Builds a random-init transformers ChineseCLIPModel of the huge preset, saves it (model.safetensors,
~3.8 GB), then runs ``python -m convert`` on it in a fresh process, which prints its own wall time and
peak RSS. Needs ~4 GB of disk per copy in --workdir.
"""

import argparse
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=os.path.join(REPO, "build", "bench-convert"))
    parser.add_argument("--preset", default="chinese-clip-vit-huge-patch14")
    parser.add_argument("--to", choices=("flax", "hf"), default="flax")
    args = parser.parse_args()
    src = os.path.join(args.workdir, "hf")
    out = os.path.join(args.workdir, f"out-{args.to}")
    if not os.path.isfile(os.path.join(src, "model.safetensors")):
        import torch
        import transformers

        import chinese_clip_jax as ccj

        cfg = ccj.ChineseCLIPConfig.preset(args.preset)
        start = time.perf_counter()
        torch.manual_seed(0)
        model = transformers.ChineseCLIPModel(transformers.ChineseCLIPConfig.from_dict(cfg.to_dict()))
        model.save_pretrained(src)
        size = os.path.getsize(os.path.join(src, "model.safetensors")) / 2**30
        print(f"built and saved a random {args.preset} ({size:.2f} GiB) in {time.perf_counter() - start:.0f} s")
        del model
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "convert", src, out, "--to", args.to]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


if __name__ == "__main__":
    main()
