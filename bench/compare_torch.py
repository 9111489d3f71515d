"""Side by side with transformers' PyTorch ChineseCLIPModel: same random weights, same inputs.

    .venv/bin/python bench/compare_torch.py [--repeats 5] [--only image|text|train] [--threads N]
                                            [--unrolled] [--remat dots|full|none]

A random-init ``transformers.ChineseCLIPModel`` of the base-patch16 preset is saved and loaded
with ``ccj.from_pretrained``. Each framework runs in its own worker process (so neither one's
allocator or thread pool disturbs the other's, and each has its own peak-memory figure) and the
parent drives them interleaved: JAX, torch, JAX, torch, ... after one untimed warm-up call each
(JAX's is the jit compile). Programs:

* image: ``get_image_features`` of 16 images at 224 px (fp32);
* text: ``get_text_features`` of 64 texts x 52 tokens, mixed lengths with padding;
* train: one training step on 16 image-text pairs, both towers, symmetric InfoNCE, AdamW
  (b2 0.98, eps 1e-6). JAX: ``make_train_step`` on a 1-device mesh (state donated), with the
  trainer's defaults ``scan_layers=True``, ``remat="dots"`` (``--unrolled``, ``--remat`` change
  them; the model of the feature programs is the same one); torch:
  the model in train mode with ``return_loss=True``, ``backward()``, ``torch.optim.AdamW``.
  Text hidden dropout 0.1 in both; torch's attention-probability dropout is set to 0 since
  ours has none (see modeling/text.py), so both do the same work.

Per program: median seconds of each, median of the per-round ratios (torch s / JAX s: JAX
throughput relative to torch, > 1 = JAX faster), GFLOP/s from ``bench/flops.py`` and that as a
fraction of each framework's own f32 2048x2048 matmul rate, measured in the same rounds. Peak
memory: each worker's peak RSS (VmHWM, reset through /proc/self/clear_refs after the warm-up)
over the timed calls; programs run one at a time (the previous one is dropped), weights included.
``--threads N`` pins the processes to N cores (both frameworks follow the affinity) and sets
torch's intra-op threads.

Each worker is stopped (SIGSTOP) whenever the other one runs and continued (SIGCONT) only for
its own requests, so an idle framework's threads (an OpenMP pool spinning after its parallel
region, XLA's Eigen pool spinning for work) cannot take cores from the timed one
(``--no-freeze-idle`` turns this off). Each program's progress line reports the CPU seconds the
idle worker used while the other was timed (0 when stopped; with ``--no-freeze-idle`` it is
the measure of that interference: 0.00-0.01 s in a 4-round check here, docs/accelerators.md).
``--tiny`` runs a tiny config (the test's smoke mode). Both workers inherit the environment, so
``LD_PRELOAD=.../libjemalloc.so.2`` applies to both (see README).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from chinese_clip_jax.training.recipes.base import get_config as base_config

PRESET = "chinese-clip-vit-base-patch16"
PROGRAMS = ("image", "text", "train")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timed calls per framework and program")
    p.add_argument("--only", choices=PROGRAMS, action="append", help="program(s) to run (default: all)")
    p.add_argument("--threads", type=int, default=0, help="pin to this many cores (0: all available)")
    p.add_argument("--unrolled", action="store_true", help="JAX with unrolled layers (default: scan_layers=True)")
    p.add_argument(
        "--remat",
        choices=("dots", "full", "none"),
        default="dots",
        help="JAX remat policy in the train step (default: dots, as the trainer)",
    )
    p.add_argument("--tiny", action="store_true", help="tiny config and batches (smoke test)")
    p.add_argument(
        "--no-freeze-idle",
        action="store_true",
        help="leave the idle worker running (default: SIGSTOP it while the other one is timed)",
    )
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
    text = ccj.ChineseCLIPTextConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        attention_probs_dropout_prob=0.0,
    )
    vision = ccj.ChineseCLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
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


def jax_train_setup(model, train_inputs: dict, init_params=None):
    """The JAX train program's parts: ``(step, state, batch, mesh)``. ``make_train_step`` on a
    1-device mesh (state donated), AdamW (b2 0.98, eps 1e-6, weight decay 0.2), ``train_inputs``
    (numpy, as ``make_inputs`` gives) placed as int32 ids/mask and f32 pixels; ``init_params``
    None: random init (seed 0). Call ``step`` inside ``sharding.use_mesh_and_rules(mesh)``."""
    import jax

    from chinese_clip_jax import sharding as shd
    from chinese_clip_jax.training import create_train_state, make_optimizer, make_train_step

    mesh = shd.make_mesh(devices=jax.devices()[:1])
    opt = base_config().optimizer  # the trainer's defaults (train/configs/base.py)
    opt.update(lr=1e-5, warmup_steps=10)
    tx, schedule = make_optimizer(opt, total_steps=1000)
    state, shardings = create_train_state(model, tx, mesh, seed=0, init_params=init_params)
    step = make_train_step(model, tx, schedule, mesh, shardings)
    batch = shd.shard_batch(
        {
            k: train_inputs[k].astype("int32") if k != "pixel_values" else train_inputs[k]
            for k in ("input_ids", "attention_mask", "pixel_values")
        },
        mesh,
    )
    return step, state, batch, mesh


class JaxPrograms:
    """Builds one program at a time: ``build(name)`` -> zero-arg callable that runs one call to
    completion and returns its output (features) or None (train); the previous program is dropped."""

    def __init__(self, ckpt: str, cfg, inputs: dict, train_inputs: dict, scan: bool, remat: str):
        import chinese_clip_jax as ccj

        self.model, self.params = ccj.from_pretrained(ckpt, scan_layers=scan, remat=remat)
        self.cfg, self.inputs, self.train_inputs = cfg, inputs, train_inputs

    def build(self, name: str):
        import jax
        import jax.numpy as jnp

        from chinese_clip_jax import sharding as shd

        model, params = self.model, self.params
        if name == "image":
            fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method="get_image_features"))
            pixels = jnp.asarray(self.inputs["pixel_values"])
            return lambda: fn(params, pixels).block_until_ready()
        if name == "text":
            fn = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, method="get_text_features"))
            ids, mask = (jnp.asarray(self.inputs[k], jnp.int32) for k in ("input_ids", "attention_mask"))
            return lambda: fn(params, ids, mask).block_until_ready()
        step, state, batch, mesh = jax_train_setup(model, self.train_inputs, init_params=params)
        self.params = params = None  # train is the last program: the state holds the only copy
        box = [state]

        def train():
            with shd.use_mesh_and_rules(mesh):
                box[0], metrics = step(box[0], batch)
            metrics["loss"].block_until_ready()

        return train

    @staticmethod
    def matmul(n: int):
        import jax
        import jax.numpy as jnp
        import numpy as np

        a = jnp.asarray(np.random.default_rng(0).standard_normal((2, n, n)).astype(np.float32))
        mm = jax.jit(jnp.matmul)
        return lambda: mm(a[0], a[1]).block_until_ready()


class TorchPrograms:
    """transformers' model: eval mode + inference_mode for features; train mode, its own
    ``return_loss=True`` loss, ``backward()`` and ``torch.optim.AdamW`` for the step."""

    def __init__(self, ckpt: str, cfg, inputs: dict, train_inputs: dict, scan: bool, remat: str):
        import torch
        import transformers

        self.model = transformers.ChineseCLIPModel.from_pretrained(ckpt).eval()
        self.inputs = {k: torch.from_numpy(v) for k, v in inputs.items()}
        self.train_inputs = {k: torch.from_numpy(v) for k, v in train_inputs.items()}

    def build(self, name: str):
        import torch

        model, t = self.model, self.inputs
        if name == "image":

            def image():
                with torch.inference_mode():
                    return model.get_image_features(pixel_values=t["pixel_values"]).pooler_output.numpy()

            return image
        if name == "text":

            def text():
                with torch.inference_mode():
                    return model.get_text_features(
                        input_ids=t["input_ids"], attention_mask=t["attention_mask"]
                    ).pooler_output.numpy()

            return text
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
        tb = self.train_inputs

        def train():
            optimizer.zero_grad(set_to_none=True)
            out = model(
                input_ids=tb["input_ids"],
                pixel_values=tb["pixel_values"],
                attention_mask=tb["attention_mask"],
                return_loss=True,
            )
            out.loss.backward()
            optimizer.step()

        return train

    @staticmethod
    def matmul(n: int):
        import numpy as np
        import torch

        a = torch.from_numpy(np.random.default_rng(0).standard_normal((2, n, n)).astype(np.float32))
        return lambda: torch.mm(a[0], a[1])


# ------------------------------------------------------------------ workers: one process per framework


def rss_mib() -> dict:
    """VmHWM (peak RSS since the last reset) and VmRSS of this process, MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


def worker(args) -> None:
    """Serves the parent over stdin/stdout, one JSON line per request:
    ``build NAME`` -> first-call seconds (+ output file); ``run`` -> seconds of one call;
    ``mm`` -> seconds of 3 matmuls; ``memreset`` / ``mem`` -> peak-RSS figures."""
    import numpy as np

    cfg = bench_config(args.tiny)
    sz = shapes(args.tiny)
    inputs = make_inputs(cfg, sz["image"], *sz["text"])
    train_inputs = make_inputs(cfg, sz["train"], sz["train"], sz["text"][1], seed=1)
    if args.threads and args.worker == "torch":
        import torch

        torch.set_num_threads(args.threads)
    progs = (JaxPrograms if args.worker == "jax" else TorchPrograms)(
        args.ckpt, cfg, inputs, train_inputs, not args.unrolled, args.remat
    )
    mm = progs.matmul(256 if args.tiny else 2048)
    fn = None

    def reply(obj):
        sys.stdout.write("@@" + json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"ready": True})
    for line in sys.stdin:
        op, *rest = line.split()
        if op == "build":
            fn = None
            fn = progs.build(rest[0])
            t = time.perf_counter()
            out = fn()
            sec = time.perf_counter() - t
            path = None
            if out is not None:
                path = os.path.join(args.ckpt, f"out_{args.worker}_{rest[0]}.npy")
                np.save(path, np.asarray(out))
            reply({"s": sec, "out": path})
        elif op == "run":
            t = time.perf_counter()
            fn()
            reply({"s": time.perf_counter() - t})
        elif op == "mm":
            t = time.perf_counter()
            for _ in range(3):
                mm()
            reply({"s": time.perf_counter() - t})
        elif op == "memreset":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := current RSS
            reply(rss_mib())
        elif op == "mem":
            reply(rss_mib())
        elif op == "quit":
            return


class Worker:
    """One framework's worker process. With ``freeze_idle`` it is SIGSTOPped between requests, so
    its threads use no CPU while the other worker is timed."""

    def __init__(self, fw: str, args, ckpt: str):
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            fw,
            "--ckpt",
            ckpt,
            "--threads",
            str(args.threads),
        ]
        cmd += ["--tiny"] * args.tiny + ["--unrolled"] * args.unrolled + ["--remat", args.remat]
        self.fw = fw
        self.freeze_idle = not args.no_freeze_idle
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.wait()
        self._pause()

    def cpu_s(self) -> float:
        """User + system CPU seconds this worker has used (/proc/PID/stat)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _pause(self):
        if self.freeze_idle and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def _resume(self):
        if self.freeze_idle and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def ask(self, request: str) -> dict:
        self._resume()
        self.proc.stdin.write(request + "\n")
        self.proc.stdin.flush()
        try:
            return self.wait()
        finally:
            self._pause()

    def wait(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise RuntimeError(f"{self.fw} worker exited with status {self.proc.wait()} (see its stderr above)")

    def close(self):
        self._resume()
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        self.proc.wait()


# ------------------------------------------------------------------ main


def main(argv=None) -> None:
    args = parse_args(argv)
    pin_threads(args.threads)
    if args.worker:
        return worker(args)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import flops
    import numpy as np

    wanted = args.only or list(PROGRAMS)
    cfg = bench_config(args.tiny)
    sz = shapes(args.tiny)
    n_text, seq = sz["text"]
    work = {  # FLOPs per call
        "image": sz["image"] * flops.image_forward_flops(cfg),
        "text": n_text * flops.text_forward_flops(cfg, seq),
        "train": flops.train_step_flops(cfg, sz["train"], seq),
    }
    n_mm = 256 if args.tiny else 2048
    mm_work = 3 * flops.matmul_flops(n_mm)
    load0 = os.getloadavg()
    print(
        f"# {'tiny config' if args.tiny else PRESET}, fp32, cores {len(os.sched_getaffinity(0))}, "
        f"repeats {args.repeats}, JAX {'unrolled' if args.unrolled else 'scan_layers'} remat={args.remat}, "
        f"idle worker {'running' if args.no_freeze_idle else 'stopped'}, "
        f"load {load0[0]:.2f}, allocator {os.environ.get('LD_PRELOAD') or 'glibc'}"
        f"{' ' + os.environ['MALLOC_CONF'] if os.environ.get('MALLOC_CONF') else ''}",
        flush=True,
    )
    rows = {}
    with tempfile.TemporaryDirectory() as ckpt:
        save_reference(cfg, ckpt)
        workers = {fw: Worker(fw, args, ckpt) for fw in ("jax", "torch")}
        try:
            for name in wanted:
                first = {fw: w.ask(f"build {name}") for fw, w in workers.items()}
                check = ""
                if first["jax"]["out"]:  # same weights and inputs: the features must agree
                    diff = np.max(np.abs(np.load(first["jax"]["out"]) - np.load(first["torch"]["out"])))
                    check = f", max |JAX - torch| {diff:.1e}"
                for w in workers.values():
                    w.ask("memreset")
                t = {k: [] for k in ("jax", "torch", "jax_mm", "torch_mm")}
                idle_cpu = {fw: 0.0 for fw in workers}  # CPU s an idle worker used while the other was timed
                other = {"jax": workers["torch"], "torch": workers["jax"]}
                for _ in range(args.repeats):  # JAX, torch, XLA matmul, torch matmul
                    for op, suffix in (("run", ""), ("mm", "_mm")):
                        for fw, w in workers.items():
                            c0 = other[fw].cpu_s()
                            t[fw + suffix].append(w.ask(op)["s"])
                            idle_cpu[other[fw].fw] += other[fw].cpu_s() - c0
                mem = {fw: w.ask("mem") for fw, w in workers.items()}
                rows[name] = (first, t, mem)
                print(
                    f"# {name}: done{check}, load {os.getloadavg()[0]:.2f}; CPU s used by the idle worker while the "
                    f"other was timed: " + ", ".join(f"{fw} {v:.2f}" for fw, v in idle_cpu.items()),
                    flush=True,
                )
        finally:
            for w in workers.values():
                w.close()
    print_table(rows, work, mm_work, n_mm, sz, load0)


def print_table(rows, work, mm_work, n_mm, sz, load0) -> None:
    head = (
        f"{'program':<18}{'JAX s':>8}{'torch s':>9}{'JAX/torch':>11}{'JAX GF/s':>10}{'XLA mm':>8}{'%':>5}"
        f"{'torch GF/s':>11}{'torch mm':>9}{'%':>5}{'JAX 1st s':>10}{'JAX MiB':>9}{'torch MiB':>10}"
    )
    print("\n" + head)
    for name, (first, t, mem) in rows.items():
        med = {k: statistics.median(v) for k, v in t.items()}
        ratio = statistics.median(b / a for a, b in zip(t["jax"], t["torch"]))
        frac = {
            fw: statistics.median(work[name] * m / (p * mm_work) for p, m in zip(t[fw], t[fw + "_mm"]))
            for fw in ("jax", "torch")
        }
        label = {
            "image": f"image x{sz['image']}",
            "text": f"text x{sz['text'][0]}x{sz['text'][1]}",
            "train": f"train step x{sz['train']}",
        }[name]
        print(
            f"{label:<18}{med['jax']:>8.3f}{med['torch']:>9.3f}{ratio:>10.2f}x"
            f"{work[name] / med['jax'] / 1e9:>10.1f}{mm_work / med['jax_mm'] / 1e9:>8.0f}{100 * frac['jax']:>4.0f}%"
            f"{work[name] / med['torch'] / 1e9:>11.1f}{mm_work / med['torch_mm'] / 1e9:>9.0f}"
            f"{100 * frac['torch']:>4.0f}%{first['jax']['s']:>10.1f}"
            f"{mem['jax']['VmHWM']:>9.0f}{mem['torch']['VmHWM']:>10.0f}"
        )
    print(
        f"\nJAX/torch: median over rounds of torch s / JAX s (JAX throughput relative to torch; > 1: JAX faster).\n"
        f"GF/s: bench/flops.py FLOPs / median s. 'XLA mm', 'torch mm': each framework's f32 {n_mm}x{n_mm} matmul "
        "GFLOP/s in the same rounds; %: median over rounds of program rate / that round's matmul rate.\n"
        "MiB: peak RSS of the framework's worker process during the timed calls (VmHWM reset after the warm-up "
        f"call; the loaded weights included).  load {load0[0]:.2f} -> {os.getloadavg()[0]:.2f}"
    )
    print(
        "per-round s:",
        json.dumps(
            {
                n: {fw: [round(x, 3) for x in v] for fw, v in t.items() if "mm" not in fw}
                for n, (_, t, _) in rows.items()
            }
        ),
    )


if __name__ == "__main__":
    main()
