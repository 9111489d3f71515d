"""A calibration file on another held-out set: ECE of ``ChineseCLIP.match`` with it vs the model's own sigmoid.

    .venv/bin/python bench/calibration_check.py --model SRC --calibration FILE --data TABLE \
        [--negatives 1] [--seed 1] [--bins 15]

``--data``: a files table (.csv/.tsv/.jsonl; every distinct caption's images are its matches),
not the set the file was fitted on. Pairs as ``ccj-eval calibrate`` draws them
(``evaluation.calibration.sample_pairs``, ``--seed``); images as the table gives them.
"""

from __future__ import annotations

import argparse
import os

import numpy as np


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--calibration", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--negatives", type=int, default=1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--bins", type=int, default=15)
    args = p.parse_args(argv)

    import chinese_clip_jax as ccj
    from chinese_clip_jax.data.readers import open_retrieval
    from chinese_clip_jax.evaluation.calibration import expected_calibration_error, sample_pairs
    from chinese_clip_jax.inference.calibration import match_probability

    ds = open_retrieval(args.data)
    clip = ccj.ChineseCLIP.from_pretrained(args.model, calibration=args.calibration)
    t, i, y = sample_pairs(ds.text_to_images, len(ds.images), args.negatives, args.seed)
    import io

    import PIL.Image

    images = [PIL.Image.open(io.BytesIO(ds.images[j])) for j in i]  # a table's images come as bytes
    p_after = clip.match(images, [ds.texts[k] for k in t])
    img, txt = clip.encode_image(images), clip.encode_text([ds.texts[k] for k in t])
    own_bias = float(clip.params["logit_bias"]) if "logit_bias" in clip.params else 0.0
    p_before = match_probability(np.sum(img * txt, axis=-1), clip.logit_scale, own_bias)
    print(
        f"# {args.model} on {args.data}: {int(y.sum())} matched, {int((1 - y).sum())} mismatched pairs, "
        f"load {os.getloadavg()[0]:.2f}"
    )
    print(f"ECE before (own sigmoid) {expected_calibration_error(p_before, y, args.bins):.4f}")
    print(f"ECE after (calibration)  {expected_calibration_error(p_after, y, args.bins):.4f}")


if __name__ == "__main__":
    main()
