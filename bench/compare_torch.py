"""Side by side with transformers' PyTorch ChineseCLIPModel: same random weights, same inputs.

    .venv/bin/python bench/compare_torch.py [--repeats 5] [--only image|text|train] [--threads N]

A random-init ``transformers.ChineseCLIPModel`` of the base-patch16 preset is saved and loaded
with ``ccj.from_pretrained``; both run, interleaved (JAX, torch, JAX, torch, ...) in this one
process, after one untimed warm-up call each (JAX's is the jit compile):

* image: ``get_image_features`` of 16 images at 224 px (fp32);
* text: ``get_text_features`` of 64 texts x 52 tokens, mixed lengths with padding;
* train: one training step on 16 image-text pairs, both towers, symmetric InfoNCE, AdamW
  (b2 0.98, eps 1e-6). JAX: ``make_train_step`` on a 1-device mesh (state donated); torch:
  the model in train mode with ``return_loss=True``, ``backward()``, ``torch.optim.AdamW``.
  Text hidden dropout 0.1 in both; torch's attention-probability dropout is set to 0 since
  ours has none (see modeling/text.py), so both do the same work.

Per program: median seconds of each, median of the per-pair ratios (torch time / JAX time: JAX
throughput relative to torch, > 1 = JAX faster), GFLOP/s from ``bench/flops.py`` and that as a
fraction of each framework's own f32 2048x2048 matmul rate, measured (interleaved) in the same
run. Peak memory is measured in separate processes, one per framework and program (``--memory``,
on by default): the peak RSS (VmHWM) while running the timed calls after the warm-up, reset with
/proc/self/clear_refs just before them, and the process's whole-life peak (compile included).
``--threads N`` pins this process to N cores (both frameworks follow the affinity) and sets
torch's intra-op threads. ``--tiny`` runs a tiny config (the test's smoke mode).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

PRESET = "chinese-clip-vit-base-patch16"
PROGRAMS = ("image", "text", "train")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timed calls per framework and program")
    p.add_argument("--only", choices=PROGRAMS, action="append", help="program(s) to run (default: all)")
    p.add_argument("--threads", type=int, default=0, help="pin to this many cores (0: all available)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory subprocesses")
    p.add_argument("--scan", action="store_true", help="JAX with scan_layers=True (default: unrolled)")
    p.add_argument("--tiny", action="store_true", help="tiny config and batches (smoke test)")
    p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def pin_threads(n: int) -> None:
    """Restrict this process to ``n`` cores before jax/torch start their thread pools."""
    if n > 0:
        cpus = sorted(os.sched_getaffinity(0))
        if n > len(cpus):
            raise SystemExit(f"--threads {n}: only {len(cpus)} cores available")
        os.sched_setaffinity(0, cpus[:n])


# ------------------------------------------------------------------ config, inputs, checkpoint

def bench_config(tiny: bool):
    import chinese_clip_jax as ccj

    if not tiny:
        cfg = ccj.ChineseCLIPConfig.preset(PRESET)
        # Our text attention has no probability dropout; the reference gets none either (same work).
        return cfg.replace(text_config=cfg.text_config.replace(attention_probs_dropout_prob=0.0))
    text = ccj.ChineseCLIPTextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64,
                                     attention_probs_dropout_prob=0.0)
    vision = ccj.ChineseCLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=32, patch_size=8)
    return ccj.ChineseCLIPConfig.from_text_vision_configs(text, vision, projection_dim=16)


def shapes(tiny: bool) -> dict:
    """Batch sizes: images, (texts, seq) for inference; pairs for the train step."""
    return dict(image=2, text=(4, 52), train=2) if tiny else dict(image=16, text=(64, 52), train=16)


def make_inputs(cfg, n_images: int, n_texts: int, seq: int, seed: int = 0) -> dict:
    """numpy inputs: pixel_values (n_images, 3, R, R) f32; input_ids/attention_mask (n_texts, seq) int64,
    lengths spread over [4, seq] (padding included, as a batch of real captions)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    r = cfg.vision_config.image_size
    lengths = rng.integers(4, seq + 1, n_texts)
    lengths[0] = seq
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(106, cfg.text_config.vocab_size, (n_texts, seq)) * mask
    ids[:, 0] = 101
    ids[np.arange(n_texts), lengths - 1] = 102
    pixels = rng.standard_normal((n_images, 3, r, r)).astype(np.float32)
    return dict(pixel_values=pixels, input_ids=ids, attention_mask=mask)


def save_reference(cfg, path: str) -> None:
    """A random-init transformers model of ``cfg`` saved in the HF layout under ``path``."""
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.ChineseCLIPModel(transformers.ChineseCLIPConfig.from_dict(cfg.to_dict())).save_pretrained(path)


# ------------------------------------------------------------------ the programs, per framework

def jax_programs(ckpt: str, cfg, inputs: dict, train_inputs: dict, scan: bool, wanted) -> dict:
    """name -> zero-arg callable running one call to completion (state carried between calls)."""
    import jax
    import jax.numpy as jnp
    import ml_collections

    import chinese_clip_jax as ccj
    from chinese_clip_jax import sharding as shd
    from chinese_clip_jax.training import create_train_state, make_optimizer, make_train_step

    model, params = ccj.from_pretrained(ckpt, scan_layers=scan)
    progs = {}
    if "image" in wanted:
        image_fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method="get_image_features"))
        pixels = jnp.asarray(inputs["pixel_values"])
        progs["image"] = lambda: image_fn(params, pixels).block_until_ready()
    if "text" in wanted:
        text_fn = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, method="get_text_features"))
        ids, mask = (jnp.asarray(inputs[k], jnp.int32) for k in ("input_ids", "attention_mask"))
        progs["text"] = lambda: text_fn(params, ids, mask).block_until_ready()
    if "train" in wanted:
        mesh = shd.make_mesh(devices=jax.devices()[:1])
        opt = ml_collections.ConfigDict(dict(lr=1e-5, warmup_steps=10, weight_decay=0.2, b1=0.9, b2=0.98, eps=1e-6))
        tx, schedule = make_optimizer(opt, total_steps=1000)
        state, shardings = create_train_state(model, tx, mesh, seed=0, init_params=params)
        step = make_train_step(model, tx, schedule, mesh, shardings)
        batch = shd.shard_batch({k: train_inputs[k].astype("int32") if k != "pixel_values" else train_inputs[k]
                                 for k in ("input_ids", "attention_mask", "pixel_values")}, mesh)
        box = [state]

        def train():
            with shd.use_mesh_and_rules(mesh):
                box[0], metrics = step(box[0], batch)
            metrics["loss"].block_until_ready()

        progs["train"] = train
    return progs


def torch_programs(ckpt: str, inputs: dict, train_inputs: dict, wanted) -> dict:
    import torch
    import transformers

    model = transformers.ChineseCLIPModel.from_pretrained(ckpt).eval()
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    progs = {}
    if "image" in wanted:
        def image():
            with torch.inference_mode():
                return model.get_image_features(pixel_values=t["pixel_values"]).pooler_output
        progs["image"] = image
    if "text" in wanted:
        def text():
            with torch.inference_mode():
                return model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).pooler_output
        progs["text"] = text
    if "train" in wanted:
        train_model = transformers.ChineseCLIPModel.from_pretrained(ckpt).train()
        optimizer = torch.optim.AdamW(train_model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
        tb = {k: torch.from_numpy(v) for k, v in train_inputs.items()}

        def train():
            optimizer.zero_grad(set_to_none=True)
            out = train_model(input_ids=tb["input_ids"], pixel_values=tb["pixel_values"],
                              attention_mask=tb["attention_mask"], return_loss=True)
            out.loss.backward()
            optimizer.step()

        progs["train"] = train
    return progs


# ------------------------------------------------------------------ timing and memory

def matmul_programs(n: int) -> dict:
    """f32 (n, n) @ (n, n) in each framework: the reference rate the programs are measured against."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    a = np.random.default_rng(0).standard_normal((2, n, n)).astype(np.float32)
    ja, jb = jnp.asarray(a[0]), jnp.asarray(a[1])
    ta, tb = torch.from_numpy(a[0]), torch.from_numpy(a[1])
    mm = jax.jit(jnp.matmul)
    return {"jax": lambda: mm(ja, jb).block_until_ready(), "torch": lambda: torch.mm(ta, tb)}


def interleave(fns: dict, repeats: int, inner: int = 1) -> tuple[dict, dict]:
    """Warm-up once each, then ``repeats`` rounds calling each in turn; each timing is the mean
    of ``inner`` back-to-back calls. Returns ({name: (first-call s, its output)}, {name: [s]})."""
    first = {}
    for name, fn in fns.items():
        t = time.perf_counter()
        out = fn()
        first[name] = (time.perf_counter() - t, out)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - t) / inner)
    return first, times


def rss_peak_mib() -> dict:
    """VmHWM (peak RSS since the last reset) and VmRSS of this process, MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


def memory_worker(args) -> None:
    """Run one framework's programs like the timed loop; print peak-RSS figures as JSON."""
    import numpy as np

    cfg = bench_config(args.tiny)
    sz = shapes(args.tiny)
    inputs = make_inputs(cfg, sz["image"], *sz["text"])
    train_inputs = make_inputs(cfg, sz["train"], sz["train"], sz["text"][1], seed=1)
    result = {}
    for name in args.only or PROGRAMS:
        if args.worker == "jax":
            fn = jax_programs(args.ckpt, cfg, inputs, train_inputs, args.scan, [name])[name]
        else:
            fn = torch_programs(args.ckpt, inputs, train_inputs, [name])[name]
        fn()  # warm-up / compile
        before = rss_peak_mib()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        for _ in range(max(2, min(args.repeats, 3))):
            fn()
        after = rss_peak_mib()
        result[name] = dict(steady_peak=after["VmHWM"], rss_before=before["VmRSS"], life_peak=before["VmHWM"])
        del fn
        np.zeros(0)
    print(json.dumps(result))


def measure_memory(args, ckpt: str, programs) -> dict:
    """framework -> program -> figures, each framework in fresh processes (one per program)."""
    out = {}
    for fw in ("jax", "torch"):
        out[fw] = {}
        for name in programs:
            cmd = [sys.executable, __file__, "--worker", fw, "--ckpt", ckpt, "--only", name,
                   "--repeats", str(args.repeats), "--threads", str(args.threads)]
            cmd += ["--tiny"] * args.tiny + ["--scan"] * args.scan
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                raise RuntimeError(f"memory worker {fw}/{name} failed:\n{res.stderr[-3000:]}")
            out[fw].update(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


# ------------------------------------------------------------------ main

def main(argv=None) -> None:
    args = parse_args(argv)
    pin_threads(args.threads)
    if args.worker:
        return memory_worker(args)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import numpy as np
    import torch

    import flops

    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = args.only or list(PROGRAMS)
    cfg = bench_config(args.tiny)
    sz = shapes(args.tiny)
    inputs = make_inputs(cfg, sz["image"], *sz["text"])
    train_inputs = make_inputs(cfg, sz["train"], sz["train"], sz["text"][1], seed=1)
    n_text, seq = sz["text"]
    work = {  # FLOPs per call
        "image": sz["image"] * flops.image_forward_flops(cfg),
        "text": n_text * flops.text_forward_flops(cfg, seq),
        "train": flops.train_step_flops(cfg, sz["train"], seq),
    }
    samples = {"image": sz["image"], "text": n_text, "train": sz["train"]}
    load0 = os.getloadavg()
    print(f"# {'tiny config' if args.tiny else PRESET}, fp32, cores {len(os.sched_getaffinity(0))}, "
          f"torch threads {torch.get_num_threads()}, repeats {args.repeats}, load {load0[0]:.2f}", flush=True)

    with tempfile.TemporaryDirectory() as ckpt:
        save_reference(cfg, ckpt)
        jp = jax_programs(ckpt, cfg, inputs, train_inputs, args.scan, wanted)
        tp = torch_programs(ckpt, inputs, train_inputs, wanted)
        n_mm = 256 if args.tiny else 2048
        mmp = matmul_programs(n_mm)
        rows = {}
        for name in wanted:  # each round: JAX program, torch program, XLA matmul, torch matmul
            first, t = interleave({"jax": jp[name], "torch": tp[name], "jax_mm": lambda: [mmp["jax"]() for _ in range(3)],
                                   "torch_mm": lambda: [mmp["torch"]() for _ in range(3)]}, args.repeats)
            rows[name] = (first, t)
            check = ""
            if name != "train":  # same weights and inputs: the features must agree
                diff = np.max(np.abs(np.asarray(first["jax"][1]) - first["torch"][1].numpy()))
                check = f", max |JAX - torch| {diff:.1e}"
            print(f"# {name}: done{check}, load {os.getloadavg()[0]:.2f}", flush=True)
        del jp, tp
        mem = measure_memory(args, ckpt, wanted) if args.memory else None

    mm_work = 3 * flops.matmul_flops(n_mm)
    head = (f"{'program':<18}{'JAX s':>8}{'torch s':>9}{'JAX/torch':>11}{'JAX GF/s':>10}{'XLA mm':>8}{'%':>5}"
            f"{'torch GF/s':>11}{'torch mm':>9}{'%':>5}{'JAX 1st s':>10}")
    if mem:
        head += f"{'JAX MiB':>9}{'torch MiB':>10}"
    print("\n" + head)
    for name, (first, t) in rows.items():
        med = {k: statistics.median(v) for k, v in t.items()}
        ratio = statistics.median(b / a for a, b in zip(t["jax"], t["torch"]))
        frac = {fw: statistics.median(m / p * mm_work / work[name] for p, m in zip(t[fw], t[fw + "_mm"]))
                for fw in ("jax", "torch")}
        label = {"image": f"image x{samples['image']}", "text": f"text x{n_text}x{seq}",
                 "train": f"train step x{samples['train']}"}[name]
        line = (f"{label:<18}{med['jax']:>8.3f}{med['torch']:>9.3f}{ratio:>10.2f}x"
                f"{work[name] / med['jax'] / 1e9:>10.1f}{mm_work / med['jax_mm'] / 1e9:>8.0f}{100 * frac['jax']:>4.0f}%"
                f"{work[name] / med['torch'] / 1e9:>11.1f}{mm_work / med['torch_mm'] / 1e9:>9.0f}"
                f"{100 * frac['torch']:>4.0f}%{first['jax'][0]:>10.1f}")
        if mem:
            line += f"{mem['jax'][name]['steady_peak']:>9.0f}{mem['torch'][name]['steady_peak']:>10.0f}"
        print(line)
    print(f"\nGF/s from bench/flops.py; 'XLA mm' / 'torch mm': each framework's f32 {n_mm}x{n_mm} matmul GFLOP/s "
          "measured in the same rounds; %: median over rounds of the program's rate / that round's matmul rate.")
    print(f"\nJAX/torch: median of per-pair (torch s / JAX s) ratios = JAX throughput relative to torch. "
          f"load {load0[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    if mem:
        print("MiB: peak RSS during the timed calls (after warm-up), one fresh process per framework and program. "
              "Whole-process peak incl. load/compile:",
              ", ".join(f"{fw} {n} {v[n]['life_peak']:.0f}" for fw, v in mem.items() for n in v))
    print("per-round s:", json.dumps({n: {fw: [round(x, 3) for x in v] for fw, v in t.items() if "mm" not in fw}
                                     for n, (_, t) in rows.items()}))


if __name__ == "__main__":
    main()
