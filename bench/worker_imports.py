"""What a data-loader worker pays to get preprocessing ready: wall time and peak memory (max RSS)
of a fresh Python process that imports the module and preprocesses one text / one image.

    PYTHONPATH=$PWD .venv/bin/python bench/worker_imports.py

Rows: the image path alone (``image_processing``: numpy + PIL), the processor
(``ChineseCLIPProcessor()``: tokenizer + images), and, for comparison, the same processor with
transformers' ``AutoTokenizer`` imported first (what constructing it cost before the tokenizer
was built without it: that import loads torch). A benchmark script, not a test: times depend on
the machine and its load; the memory figures hardly do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

SETUP = {
    "image path (ImagePreprocessor)": "from chinese_clip_jax.processing.image import ImagePreprocessor\n"
    "ImagePreprocessor(num_threads=1)([np.zeros((48, 64, 3), np.uint8)])",
    "ChineseCLIPProcessor()": "from chinese_clip_jax.processing import ChineseCLIPProcessor\n"
    "ChineseCLIPProcessor(num_threads=1)(text=['一只猫'], images=[np.zeros((48, 64, 3), np.uint8)])",
    "ChineseCLIPProcessor() after importing AutoTokenizer": "from transformers import AutoTokenizer\n"
    "from chinese_clip_jax.processing import ChineseCLIPProcessor\n"
    "ChineseCLIPProcessor(num_threads=1)(text=['一只猫'], images=[np.zeros((48, 64, 3), np.uint8)])",
}

CHILD = """
import json, resource, sys, time
t = time.perf_counter()
import numpy as np
{code}
print(json.dumps({{"s": time.perf_counter() - t, "mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "torch": "torch" in sys.modules, "jax": "jax" in sys.modules}}))
"""


def measure(code: str, repeats: int = 3) -> dict:
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-c", CHILD.format(code=code)], env=os.environ, capture_output=True, text=True, check=True
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = min(runs, key=lambda r: r["s"])
    return {**best, "mib": max(r["mib"] for r in runs)}


def main():
    print("| worker setup | seconds (best of 3) | max RSS MiB | torch imported | jax imported |")
    print("|---|---|---|---|---|")
    for name, code in SETUP.items():
        r = measure(code)
        print(f"| {name} | {r['s']:.2f} | {r['mib']:.0f} | {r['torch']} | {r['jax']} |")


if __name__ == "__main__":
    main()
