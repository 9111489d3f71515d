"""The PyTorch peer of bench/device.py: transformers' ChineseCLIPModel on the same device, the same
batches (``device.host_batch``) and the same FLOP counts (``flops.py``), in its own process so
that neither framework's allocator holds the other's memory.

    python bench/torch_peer.py --sizes base-patch16,large-patch14 --json peer.json     # CUDA
    python bench/torch_peer.py --smoke --json peer.json                                  # CPU, tiny

Setup (the usual fast PyTorch recipe): fp32 params, ``torch.autocast(bfloat16)`` (off on CPU),
``attn_implementation="sdpa"``, text attention-probability dropout 0 (ours has none; hidden
dropout 0.1 stays in both), ``torch.optim.AdamW(fused=True)`` (b2 0.98, eps 1e-6, weight decay
0.2), the model's own ``return_loss=True`` symmetric InfoNCE. Programs per size:

* train ``eager`` and train ``compile`` (``torch.compile`` of the model; its first call, the
  compile, is reported as ``compile_s``; ``--smoke`` uses the "eager" dynamo backend, no codegen);
* image / text features (eval mode, ``inference_mode``), eager.

All sizes' eager programs run first and the compiled train steps last, so a tight
``--budget-s`` drops the long torch.compile warm-ups first.

Exit status 3 (and one line on stderr) when torch, transformers or (unless ``--smoke``) CUDA is
missing: ``device.py --peer auto`` then notes the peer as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import flops  # noqa: E402
from device import SEQ, SIZES, batch_sizes, host_batch, smoke_config, timed  # noqa: E402

NO_PEER = 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="base-patch16,large-patch14")
    p.add_argument("--train-batch", type=int, default=0, help="pairs (0: 256 base, 64 large)")
    p.add_argument("--infer-batch", type=int, default=0, help="images/texts (0: 512 base, 256 large)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", default="eager,compile", help="train-step modes: eager, compile")
    p.add_argument("--budget-s", type=float, default=240.0, help="start no new program after this many seconds")
    p.add_argument("--smoke", action="store_true", help="tiny config on CPU (fp32, no autocast)")
    p.add_argument("--json", required=True, help="write the rows here")
    return p.parse_args(argv)


class Peer:
    """transformers' model of one config on ``device``; ``program(name)`` -> (callable, batch size)."""

    def __init__(self, cfg, device: str, smoke: bool):
        import torch
        import transformers

        d = cfg.to_dict()
        d["text_config"]["attention_probs_dropout_prob"] = 0.0
        hf_cfg = transformers.ChineseCLIPConfig.from_dict(d)
        hf_cfg._attn_implementation = "sdpa"
        hf_cfg.text_config._attn_implementation = "sdpa"
        hf_cfg.vision_config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        self.torch, self.device, self.smoke = torch, device, smoke
        self.model = transformers.ChineseCLIPModel(hf_cfg).to(device)
        self.cfg = cfg

    def _autocast(self):
        return self.torch.autocast("cuda", dtype=self.torch.bfloat16, enabled=self.device == "cuda")

    def _tensors(self, batch: dict) -> dict:
        t = self.torch
        return {
            k: t.from_numpy(v).to(self.device, dtype=t.long if k != "pixel_values" else t.float32)
            for k, v in batch.items()
        }

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def train(self, batch: dict, mode: str):
        t = self.torch
        self.model.train()
        fwd = self.model
        if mode == "compile":
            fwd = t.compile(self.model, backend="eager" if self.smoke else "inductor")
        opt = t.optim.AdamW(
            self.model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2, fused=self.device == "cuda"
        )
        b = self._tensors(batch)

        def step():
            with self._autocast():
                out = fwd(
                    input_ids=b["input_ids"],
                    pixel_values=b["pixel_values"],
                    attention_mask=b["attention_mask"],
                    return_loss=True,
                )
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            self.sync()

        return step

    def features(self, batch: dict, tower: str):
        t = self.torch
        self.model.eval()
        b = self._tensors(batch)

        def call():
            with t.inference_mode(), self._autocast():
                if tower == "image":
                    self.model.get_image_features(pixel_values=b["pixel_values"])
                else:
                    self.model.get_text_features(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            self.sync()

        return call

    def peak_gib(self):
        if self.device != "cuda":
            return None
        return self.torch.cuda.max_memory_allocated() / 2**30

    def reset_peak(self):
        if self.device == "cuda":
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()


def run(args) -> list[dict]:
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"no torch peer: {e}", file=sys.stderr)
        raise SystemExit(NO_PEER) from None
    if not args.smoke and not torch.cuda.is_available():
        print("no torch peer: torch has no CUDA device", file=sys.stderr)
        raise SystemExit(NO_PEER)
    import chinese_clip_jax as ccj

    device = "cpu" if args.smoke else "cuda"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # only fp32 matmuls outside autocast; as PyTorch users run
        torch.backends.cudnn.allow_tf32 = True
    start = time.perf_counter()
    if args.smoke:
        args.steps, args.repeats = 1, 1
        sizes = {"smoke": smoke_config()}
    else:
        sizes = {s: ccj.ChineseCLIPConfig.preset(SIZES[s]) for s in args.sizes.split(",")}
    rows = []
    peers, programs = {}, []
    for name, cfg in sizes.items():
        tb, ib = batch_sizes(cfg, args.train_batch if not args.smoke else 2, args.infer_batch if not args.smoke else 2)
        train_batch, infer_batch = host_batch(cfg, tb), host_batch(cfg, ib, seed=1)
        for mode in args.modes.split(","):
            programs.append(
                (
                    name,
                    f"train x{tb}",
                    mode,
                    lambda m=mode, n=name, b=train_batch: peers[n].train(b, m),
                    tb,
                    flops.train_step_flops(cfg, tb, SEQ),
                )
            )
        programs += [
            (
                name,
                f"image x{ib}",
                "eager",
                lambda n=name, b=infer_batch: peers[n].features(b, "image"),
                ib,
                ib * flops.image_forward_flops(cfg),
            ),
            (
                name,
                f"text x{ib}",
                "eager",
                lambda n=name, b=infer_batch: peers[n].features(b, "text"),
                ib,
                ib * flops.text_forward_flops(cfg, SEQ),
            ),
        ]
    # every eager program first, torch.compile (long first calls) last: a tight budget drops compiles first
    programs.sort(key=lambda prog: prog[2] == "compile")
    for name, program, mode, build, n, work in programs:
        if time.perf_counter() - start > args.budget_s:
            rows.append(dict(size=name, program=program, mode=mode, skipped=f"past --budget-s {args.budget_s:.0f}"))
            continue
        try:
            if name not in peers:
                peers.clear()  # one model on the device at a time
                if device == "cuda":
                    torch.cuda.empty_cache()
                peers[name] = Peer(sizes[name], device, args.smoke)
            peers[name].reset_peak()
            fn = build()
            t = time.perf_counter()
            fn()  # warm-up; torch.compile compiles here
            first = time.perf_counter() - t
            sec = timed(fn, args.steps, args.repeats)
            rows.append(
                dict(
                    size=name,
                    program=program,
                    mode=mode,
                    compile_s=first,
                    sec=sec,
                    rate=n / sec,
                    flops=work,
                    mem=peers[name].peak_gib(),
                )
            )
        except Exception as e:  # e.g. out of memory: note it, keep going
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            rows.append(dict(size=name, program=program, mode=mode, skipped=f"{type(e).__name__}: {first_line}"))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = run(args)
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rows, f)
    os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
