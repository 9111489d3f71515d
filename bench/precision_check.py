"""fp32 parity with transformers on the device, per ``precision`` option: max |ours - PyTorch| of
image and text features (same random weights, same inputs), PyTorch in fp32 with TF32 off.

    python bench/precision_check.py                    # GPU / TPU (torch on CPU if it has no CUDA)
    python bench/precision_check.py --smoke            # tiny config on CPU (the test's mode)

Rows: ``precision`` None (JAX's default: on GPU/TPU matmuls in TF32 / bf16 passes) and
"highest" (fp32), for 8 images and 8 texts of mixed lengths. The design's parity bound is 1e-4.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from compare_torch import bench_config, make_inputs, save_reference  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--n", type=int, default=8)
    args = p.parse_args(argv)
    import jax
    import numpy as np
    import torch
    import transformers

    import chinese_clip_jax as ccj

    cfg = bench_config(args.smoke)
    inputs = make_inputs(cfg, args.n, args.n, 52)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with tempfile.TemporaryDirectory() as ckpt:
        save_reference(cfg, ckpt)
        ref = transformers.ChineseCLIPModel.from_pretrained(ckpt).eval().to(device)
        t = {k: torch.from_numpy(v).to(device) for k, v in inputs.items()}
        with torch.inference_mode():
            want = {
                "image": ref.get_image_features(pixel_values=t["pixel_values"]).pooler_output.cpu().numpy(),
                "text": ref.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
                .pooler_output.cpu()
                .numpy(),
            }
        del ref
        print(
            f"# {jax.devices()[0].device_kind} ({jax.default_backend()}), torch on {device} fp32 (TF32 off), "
            f"{'tiny config' if args.smoke else 'base-patch16'}, {args.n} images / texts"
        )
        print(f"{'precision':<12}{'image max|d|':>14}{'text max|d|':>13}{'<= 1e-4':>9}")
        for precision in (None, "highest"):
            model, params = ccj.from_pretrained(ckpt, precision=precision)
            img = jax.jit(lambda p, x, model=model: model.apply({"params": p}, x, method="get_image_features"))(
                params, inputs["pixel_values"]
            )
            txt = jax.jit(lambda p, i, m, model=model: model.apply({"params": p}, i, m, method="get_text_features"))(
                params, inputs["input_ids"].astype(np.int32), inputs["attention_mask"].astype(np.int32)
            )
            d_img = float(np.max(np.abs(np.asarray(img) - want["image"])))
            d_txt = float(np.max(np.abs(np.asarray(txt) - want["text"])))
            ok = "yes" if max(d_img, d_txt) <= 1e-4 else "no"
            print(f"{str(precision):<12}{d_img:>14.2e}{d_txt:>13.2e}{ok:>9}", flush=True)


if __name__ == "__main__":
    main()
