"""Accelerator benchmark: training-step samples/s and MFU, inference throughput, compile times and
peak device memory, for base-patch16 and large-patch14 in bf16, per attention implementation,
beside the PyTorch peer (transformers' ChineseCLIPModel, ``bench/torch_peer.py``).

    python bench/device.py                   # one GPU / TPU host, with the peer when torch has CUDA; < 8 min
    python bench/device.py --smoke --peer torch   # tiny config on CPU, torch peer on CPU (run by the tests)
    python bench/device.py --sizes base-patch16 --programs train --layouts scan,unrolled --rng-impls threefry,rbg

Random weights (``create_train_state``), params fp32, compute bf16. One row per combination of
``--impls`` (attention), ``--layouts`` (scan: ``nn.scan`` over stacked layers, one compiled body;
unrolled), ``--rng-impls`` (dropout bits) and ``--remat``; each defaults to ``auto``, the value the
trainer resolves on this platform (``chinese_clip_jax.training.defaults``: on a GPU cuDNN
attention, unrolled, rbg, no remat), so the default row times the step ``ccj-train`` runs and
``python -m bench.lower`` lowers; per size and combination:

* train: ``make_train_step`` (both towers, symmetric InfoNCE, AdamW, donated state) on a mesh
  over all local devices (data parallel), ``--train-batch`` pairs per device, 52-token texts;
* image / text: jitted ``get_image_features`` / ``get_text_features``, ``--infer-batch`` per device.

Reported: compile seconds (``lower().compile()``), steady-state samples/s (median of
``--repeats`` timings of ``--steps`` calls each), MFU = model FLOPs/s / peak FLOP/s (FLOPs from
``bench/flops.py``: 2 x matmul params x tokens + attention, x3 for a training step; peak bf16
FLOP/s per device from ``PEAK_TFLOPS`` by ``device_kind``, or ``--peak-tflops``), and the
device's ``peak_bytes_in_use`` after the program (``memory_stats()``; a process-wide high-water
mark, so it never decreases across rows). A combination that fails to compile or run (e.g.
cudnn on CPU, or a shape cuDNN rejects) is skipped with its error's first line. Rows that would
start after ``--budget-s`` seconds (of our own part, the peer's not counted) are skipped, so the
script ends within its time budget.

``--peer torch`` (default ``auto``: on when torch with CUDA is importable) first runs
``bench/torch_peer.py`` in a subprocess (before this process touches the device, so each
framework has the whole device memory; its own ``--peer-budget-s``), then prints, per program,
ours / peer-eager and ours / peer-compile throughput ratios. ``--xla-flags SET`` applies a set
of ``chinese_clip_jax.training.xla_flags`` before the backend starts. ``--json F`` writes all rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import flops  # noqa: E402

import chinese_clip_jax as ccj  # noqa: E402
from chinese_clip_jax import sharding as shd  # noqa: E402
from chinese_clip_jax.modeling.layers import REMAT_POLICIES  # noqa: E402
from chinese_clip_jax.training import create_train_state, make_optimizer, make_train_step  # noqa: E402
from chinese_clip_jax.training.defaults import current_platform, platform_defaults  # noqa: E402
from chinese_clip_jax.training.recipes.base import get_config as base_config  # noqa: E402
from chinese_clip_jax.training.step import RNG_IMPLS  # noqa: E402

# Dense bf16 peak TFLOP/s per device (no sparsity), matched by substring of device_kind (first match).
PEAK_TFLOPS = (
    ("H100 SXM", 989.0),
    ("H100 80GB HBM3", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("TPU v6", 918.0),
    ("TPU v5p", 459.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v4", 275.0),
    ("TPU v3", 123.0),
)
SIZES = {"base-patch16": "chinese-clip-vit-base-patch16", "large-patch14": "chinese-clip-vit-large-patch14"}
SEQ = 52
LAYOUTS = ("scan", "unrolled")
PROGRAMS = ("train", "image", "text")
REMATS = ("none", *REMAT_POLICIES)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="base-patch16,large-patch14", help=f"comma list of {', '.join(SIZES)}")
    p.add_argument("--impls", default="auto", help="attention implementations (comma list; auto: the trainer's)")
    p.add_argument("--layouts", default="auto", help="layer loops (comma list of auto, scan, unrolled)")
    p.add_argument("--rng-impls", default="auto", help="dropout RNG implementations (comma list; auto: the trainer's)")
    p.add_argument("--programs", default="train,image,text", help="comma list of train, image, text")
    p.add_argument("--train-batch", type=int, default=0, help="pairs per device (0: 256 base, 64 large)")
    p.add_argument("--infer-batch", type=int, default=0, help="images/texts per device (0: 512 base, 256 large)")
    p.add_argument("--steps", type=int, default=5, help="calls per timing")
    p.add_argument("--repeats", type=int, default=3, help="timings per program (median reported)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="peak bf16 TFLOP/s per device (0: from table)")
    p.add_argument(
        "--remat",
        default="auto",
        help="remat policies of the train step (comma list of auto, none, dots, full; auto: the trainer's)",
    )
    p.add_argument("--budget-s", type=float, default=420.0, help="start no new row after this many seconds")
    p.add_argument(
        "--peer",
        choices=("auto", "torch", "none"),
        default="auto",
        help="PyTorch peer: auto = when torch with CUDA is importable",
    )
    p.add_argument("--peer-budget-s", type=float, default=240.0, help="the peer's own --budget-s")
    p.add_argument("--xla-flags", default="none", help="a chinese_clip_jax.training.xla_flags set (none, tuned)")
    p.add_argument("--json", default="", help="also write all rows (ours and the peer's) to this file")
    p.add_argument("--smoke", action="store_true", help="tiny config, tiny batches, one step (CPU smoke test)")
    args = p.parse_args(argv)
    for flag, value, allowed in (
        ("--layouts", args.layouts, ("auto", *LAYOUTS)),
        ("--rng-impls", args.rng_impls, ("auto", *RNG_IMPLS)),
        ("--programs", args.programs, PROGRAMS),
        ("--remat", args.remat, ("auto", *REMATS)),
    ):
        bad = [v for v in value.split(",") if v not in allowed]
        if bad:
            p.error(f"{flag}: unknown {bad}; allowed: {', '.join(allowed)}")
    return args


def peak_flops(device, override_tflops: float) -> tuple[float | None, str]:
    """(peak FLOP/s per device or None, where it came from)."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device.device_kind.lower():
            return tflops * 1e12, f"table ({key})"
    return None, f"unknown device kind {device.device_kind!r}: pass --peak-tflops"


def smoke_config() -> ccj.ChineseCLIPConfig:
    text = ccj.ChineseCLIPTextConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    vision = ccj.ChineseCLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    return ccj.ChineseCLIPConfig.from_text_vision_configs(text, vision, projection_dim=16)


def batch_sizes(cfg, train_batch: int = 0, infer_batch: int = 0) -> tuple[int, int]:
    """(train pairs, inference samples) per device: the flags', else 256 / 512 base, 64 / 256 large."""
    large = cfg.vision_config.hidden_size > 768
    return train_batch or (64 if large else 256), infer_batch or (256 if large else 512)


def host_batch(cfg, n: int, seed: int = 0) -> dict:
    """Random pairs: input_ids/attention_mask int32 (n, 52), pixel_values f32 (n, 3, R, R)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, SEQ + 1, n)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int32)
    ids = (rng.integers(106, cfg.text_config.vocab_size, (n, SEQ)) * mask).astype(np.int32)
    r = cfg.vision_config.image_size
    return dict(input_ids=ids, attention_mask=mask, pixel_values=rng.standard_normal((n, 3, r, r)).astype(np.float32))


def timed(fn, steps: int, repeats: int) -> float:
    """Median seconds per call of ``fn`` (which blocks on its result), ``steps`` calls per timing."""
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        out.append((time.perf_counter() - t) / steps)
    return statistics.median(out)


def peak_mem_gib(device) -> float | None:
    stats = device.memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


def run_size(name: str, cfg, combo: dict, args, mesh, peak: float | None) -> list[dict]:
    """Rows (dicts) of the wanted programs of one size and one combination of run options
    (``combo``: impl, layout, rng_impl, remat)."""
    n_dev = mesh.devices.size
    dev = mesh.devices.flat[0]
    tb, ib = (n * n_dev for n in batch_sizes(cfg, args.train_batch, args.infer_batch))
    programs = args.programs.split(",")
    model = ccj.ChineseCLIPModel(
        cfg,
        dtype=jnp.bfloat16,
        attention_impl=combo["impl"],
        scan_layers=combo["layout"] == "scan",
        remat=combo["remat"],
    )
    rows = []
    params = None
    if "train" in programs:
        opt = base_config().optimizer  # the trainer's defaults (train/configs/base.py)
        opt.update(lr=1e-4, warmup_steps=10)
        tx, schedule = make_optimizer(opt, total_steps=1000)
        state, shardings = create_train_state(model, tx, mesh, seed=0)
        step = make_train_step(model, tx, schedule, mesh, shardings, rng_impl=combo["rng_impl"])
        batch = shd.shard_batch(host_batch(cfg, tb), mesh)
        with shd.use_mesh_and_rules(mesh):
            t = time.perf_counter()
            compiled = step.lower(state, batch).compile()
            compile_s = time.perf_counter() - t
            box = [state]

            def train():
                box[0], metrics = compiled(box[0], batch)
                metrics["loss"].block_until_ready()

            train()
            sec = timed(train, args.steps, args.repeats)
        rows.append(
            dict(
                program=f"train x{tb}",
                compile_s=compile_s,
                sec=sec,
                rate=tb / sec,
                flops=flops.train_step_flops(cfg, tb, SEQ),
                mem=peak_mem_gib(dev),
            )
        )
        params = box[0].params
        del box, state, batch, compiled
    infer_programs = [p for p in programs if p != "train"]
    if infer_programs:
        if params is None:
            params = shd.sharded_init(
                model,
                mesh,
                jax.random.PRNGKey(0),
                jnp.zeros((1, SEQ), jnp.int32),
                jnp.zeros((1, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)),
            )[0]
        infer = shd.shard_batch(host_batch(cfg, ib, seed=1), mesh)
        programs_fn = {
            "image": (
                lambda p, b: model.apply({"params": p}, b["pixel_values"], method="get_image_features"),
                flops.image_forward_flops(cfg),
            ),
            "text": (
                lambda p, b: model.apply(
                    {"params": p}, b["input_ids"], b["attention_mask"], method="get_text_features"
                ),
                flops.text_forward_flops(cfg, SEQ),
            ),
        }
        with shd.use_mesh_and_rules(mesh):
            for prog in infer_programs:
                fn, per_sample = programs_fn[prog]
                t = time.perf_counter()
                compiled_fn = jax.jit(fn).lower(params, infer).compile()
                compile_s = time.perf_counter() - t
                call = lambda compiled_fn=compiled_fn: compiled_fn(params, infer).block_until_ready()  # noqa: E731
                call()
                sec = timed(call, args.steps, args.repeats)
                rows.append(
                    dict(
                        program=f"{prog} x{ib}",
                        compile_s=compile_s,
                        sec=sec,
                        rate=ib / sec,
                        flops=per_sample * ib,
                        mem=peak_mem_gib(dev),
                    )
                )
    for r in rows:
        r.update(
            size=name,
            **{**combo, "impl": combo["impl"] or "default"},
            mfu=r["flops"] / r["sec"] / (peak * n_dev) if peak else None,
        )
    return rows


def run_peer(args) -> tuple[list[dict], str | None]:
    """Runs bench/torch_peer.py in a subprocess; (rows, None) or ([], why it was skipped)."""
    if args.peer == "none":
        return [], None
    out = (
        args.json + ".peer.json"
        if args.json
        else os.path.join(os.environ.get("TMPDIR", "/tmp"), f"ccj_peer_{os.getpid()}.json")
    )
    cmd = [
        sys.executable,
        os.path.join(HERE, "torch_peer.py"),
        "--json",
        out,
        "--sizes",
        args.sizes,
        "--budget-s",
        str(args.peer_budget_s),
        "--steps",
        str(args.steps),
        "--repeats",
        str(args.repeats),
        "--train-batch",
        str(args.train_batch),
        "--infer-batch",
        str(args.infer_batch),
    ]
    cmd += ["--smoke"] * args.smoke
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.peer_budget_s + 300)
    except subprocess.TimeoutExpired:
        return [], f"peer: killed after {args.peer_budget_s + 300:.0f} s"
    if res.returncode == 3 and args.peer == "auto":
        return [], "peer: skipped (" + (res.stderr.strip().splitlines() or ["no torch with CUDA"])[-1] + ")"
    if res.returncode != 0:
        return [], f"peer: failed (status {res.returncode}): " + " | ".join(res.stderr.strip().splitlines()[-3:])
    with open(out) as f:
        rows = json.load(f)
    if not args.json:
        os.remove(out)
    return rows, None


def fmt_row(r: dict) -> str:
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
    mem = f"{r['mem']:.1f}" if r.get("mem") is not None else "n/a"
    return (
        f"{r['compile_s']:>10.1f}{1e3 * r['sec']:>10.1f}{r['rate']:>11.1f}{r['flops'] / r['sec'] / 1e12:>9.1f}"
        f"{mfu:>7}{mem:>10}"
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    from chinese_clip_jax.training import xla_flags

    added = xla_flags.apply(args.xla_flags)  # before the backend starts (the peer runs first: it inherits them)
    if args.smoke:
        args.train_batch, args.infer_batch, args.steps, args.repeats = 2, 2, 1, 1
        sizes = {"smoke": smoke_config()}
        if args.peer == "auto":
            args.peer = "none"
    else:
        unknown = [s for s in args.sizes.split(",") if s not in SIZES]
        if unknown:
            raise SystemExit(f"unknown --sizes {unknown}; known: {', '.join(SIZES)}")
        sizes = {s: ccj.ChineseCLIPConfig.preset(SIZES[s]) for s in args.sizes.split(",")}
    peer_rows, peer_note = run_peer(args)  # first: this process has not touched the device yet
    start = time.perf_counter()  # --budget-s is ours alone
    # "auto": what the trainer runs on this platform (chinese_clip_jax.training.defaults), so the
    # default row times the step `ccj-train` runs (and `python -m bench.lower` lowers)
    auto = platform_defaults(current_platform())
    auto_value = {
        "impls": auto["attention_impl"],
        "layouts": "scan" if auto["scan_layers"] else "unrolled",
        "rng_impls": auto["rng_impl"],
        "remat": auto["remat"],
    }

    def choices(flag):
        return [auto_value[flag] if v == "auto" else v for v in getattr(args, flag).split(",")]

    impls = [None if i in ("", "default", "none", None) else i for i in choices("impls")]
    combos = [
        dict(impl=i, layout=lay, rng_impl=r, remat=m)
        for i in impls
        for lay in choices("layouts")
        for r in choices("rng_impls")
        for m in choices("remat")
    ]
    devices = jax.local_devices()
    mesh = shd.make_mesh(devices=devices)
    peak, peak_src = peak_flops(devices[0], args.peak_tflops)
    print(
        f"# {len(devices)} x {devices[0].device_kind} ({jax.default_backend()}, jax {jax.__version__}), bf16 "
        f"compute, fp32 params; peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s/device from {peak_src}; "
        f"XLA flags {args.xla_flags}{' ' + ' '.join(added) if added else ''}",
        flush=True,
    )
    print(
        f"{'size':<14}{'attention':<10}{'layers':<9}{'rng':<11}{'remat':<6}{'program':<14}{'compile s':>10}"
        f"{'ms/call':>10}{'samples/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>10}",
        flush=True,
    )
    notes = [peer_note] if peer_note else []
    ours = []
    for name, cfg in sizes.items():
        for combo in combos:
            label = f"{name}/{combo['impl']}/{combo['layout']}/{combo['rng_impl']}/{combo['remat']}"
            if time.perf_counter() - start > args.budget_s:
                notes.append(f"{label}: skipped, past --budget-s {args.budget_s:.0f}")
                continue
            try:
                rows = run_size(name, cfg, combo, args, mesh, peak)
            except Exception as e:  # an implementation this device/shape does not support
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                notes.append(f"{label}: skipped ({type(e).__name__}: {first})")
                continue
            for r in rows:
                print(
                    f"{r['size']:<14}{r['impl']:<10}{r['layout']:<9}{r['rng_impl']:<11}{r['remat']:<6}"
                    f"{r['program']:<14}" + fmt_row(r),
                    flush=True,
                )
            ours += rows
    if peer_rows:
        print_peer(peer_rows, ours, peak)
    for n in notes:
        print("# " + n)
    print(
        f"# total {time.perf_counter() - start:.0f} s; samples/s: pairs (train), images or 52-token texts; "
        "peak GiB: device peak_bytes_in_use so far (process high-water mark; the peer's: "
        "torch.cuda.max_memory_allocated per program)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ours": ours, "peer": peer_rows, "notes": notes}, f, indent=1)


def print_peer(peer_rows: list[dict], ours: list[dict], peak: float | None) -> None:
    """The peer's rows, then ours / peer (eager and compile) per program and our row."""
    print("\n# PyTorch peer (transformers ChineseCLIPModel, bf16 autocast, SDPA, fused AdamW)")
    print(
        f"{'size':<14}{'mode':<10}{'program':<14}{'first s':>10}{'ms/call':>10}{'samples/s':>11}{'TFLOP/s':>9}"
        f"{'MFU':>7}{'peak GiB':>10}"
    )
    for r in peer_rows:
        if "skipped" in r:
            print(f"{r['size']:<14}{r['mode']:<10}{r['program']:<14}  skipped: {r['skipped']}")
            continue
        r["mfu"] = r["flops"] / r["sec"] / peak if peak else None
        print(f"{r['size']:<14}{r['mode']:<10}{r['program']:<14}" + fmt_row(r))
    peer = {(r["size"], r["program"], r["mode"]): r for r in peer_rows if "skipped" not in r}
    print(
        f"\n{'size':<14}{'attention':<10}{'layers':<9}{'rng':<11}{'remat':<6}{'program':<14}"
        f"{'ours/eager':>11}{'ours/compile':>13}"
    )
    for r in ours:
        ratio = {
            m: (
                f"{r['rate'] / peer[(r['size'], r['program'], m)]['rate']:.2f}x"
                if (r["size"], r["program"], m) in peer
                else "-"
            )
            for m in ("eager", "compile")
        }
        print(
            f"{r['size']:<14}{r['impl']:<10}{r['layout']:<9}{r['rng_impl']:<11}{r['remat']:<6}{r['program']:<14}"
            f"{ratio['eager']:>11}{ratio['compile']:>13}"
        )


if __name__ == "__main__":
    main()
