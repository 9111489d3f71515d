"""Where a train step's device time goes: a ``jax.profiler`` trace of a few steps and the costliest
device ops / fusions, each with its share of the step and a category.

    python bench/profile_step.py [--size base-patch16] [--batch 256] [--steps 5] [--logdir DIR]
    python bench/profile_step.py --smoke          # tiny config on CPU (the test's mode)
    tensorboard --logdir DIR                      # the kept trace (Profile tab; needs tensorboard-plugin-profile)

The step is ``bench/device.py``'s (bf16 compute, fp32 params, AdamW, donated state) with the
run options given (``--impl``, ``--layout``, ``--rng-impl``, ``--remat``). The trace is the one
``jax.profiler.trace(..., create_perfetto_trace=True)`` writes: ``plugins/profile/<run>/`` holds
``<host>.xplane.pb`` (TensorBoard / xprof) and ``perfetto_trace.json.gz``, a Chrome-trace JSON
this script reads itself (no xprof needed). Device ops are the events of the "XLA Ops" lines of
``/device:*`` processes (GPU, TPU; else those processes' stream lines); on the CPU backend, the
XLA thunks run on the client's thread pools (``tf_XLA*`` threads), which stand in for them.

Printed: the ``--top`` ops by total time over the profiled steps, with calls per step, ms per
step, share of the measured step time (wall clock, ``--steps`` steps) and a category: matmul,
attention, elementwise, reduction, random bits, copy/transpose, collective (``categorize``),
then the total per category.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

from chinese_clip_jax.training.recipes.base import get_config as base_config

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

CATEGORIES = ("matmul", "attention", "elementwise", "reduction", "random bits", "copy/transpose", "collective")
# First match wins; tested against the op name and its HLO text (the event's long_name / hlo_op args).
_RULES = (
    ("collective", r"all-reduce|all-gather|reduce-scatter|all-to-all|collective|nccl|send|recv"),
    ("attention", r"fmha|flash|attention|cudnn\$|__cudnn"),
    ("random bits", r"rng|threefry|philox|random|bit.generator"),
    ("matmul", r"\bdot\b|dot[._(]|gemm|cublas|matmul|convolution|conv[._(]|ynn"),
    ("reduction", r"reduce|argmax|argmin|softmax|norm"),
    (
        "elementwise",
        r"^(loop_|wrapped_)?(convert|multiply|add|subtract|divide|select|exponential|tanh|log|maximum|"
        r"minimum|negate|compare|erf|rsqrt|sqrt|power|and|or|xor)",
    ),
    ("copy/transpose", r"copy|transpose|bitcast|slice|concatenate|gather|scatter|pad|broadcast|memcpy|memset"),
)
# CPU-side bookkeeping events on the XLA threads that are not ops.
_NOT_OPS = re.compile(r"^(ThreadpoolListener|ThunkExecutor|end: |Thread|Eigen|PjRt|TfrtCpu|\$)")


def categorize(name: str, hlo: str = "") -> str:
    text = f"{name} {hlo}".lower()
    for category, pattern in _RULES:
        if re.search(pattern, text):
            return category
    return "elementwise"


def find_trace(logdir: str) -> str:
    found = sorted(
        glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*perfetto_trace.json.gz"))
        + glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.trace.json.gz"))
    )
    if not found:
        raise FileNotFoundError(f"no *.trace.json.gz under {logdir}/plugins/profile")
    return found[-1]


def device_ops(trace_path: str) -> list[dict]:
    """Complete events ("ph": "X") of device ops: name, dur (us), hlo (text if the trace has it)."""
    with gzip.open(trace_path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs = {
        e["pid"]: e.get("args", {}).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    threads = {
        (e["pid"], e.get("tid")): e.get("args", {}).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    device_pids = {pid for pid, name in procs.items() if name.startswith("/device:")}
    op_lines = {k for k, name in threads.items() if k[0] in device_pids and name == "XLA Ops"}
    if not op_lines:  # no "XLA Ops" line: the device's stream lines (kernels), not its summary lines
        op_lines = {
            k
            for k, name in threads.items()
            if k[0] in device_pids
            and not re.match(r"(Steps|XLA Modules|XLA TraceMe|Framework|Source|TensorFlow|Launch Stats)", name)
        }
    if op_lines:

        def is_op(e):
            return (e["pid"], e.get("tid")) in op_lines
    else:  # CPU backend: XLA's thunks on the client's thread pools
        cpu_lines = {k for k, name in threads.items() if name.startswith("tf_XLA")}

        def is_op(e):
            return (e["pid"], e.get("tid")) in cpu_lines and not _NOT_OPS.match(e["name"])

    by_line = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and is_op(e):
            by_line[(e["pid"], e.get("tid"))].append(e)
    out = []
    for line in by_line.values():  # self time: a container (a while loop's thunk) minus the ops inside it
        line.sort(key=lambda e: (float(e["ts"]), -float(e.get("dur", 0.0))))
        stack: list[tuple[float, dict]] = []
        for e in line:
            start, dur = float(e["ts"]), float(e.get("dur", 0.0))
            while stack and stack[-1][0] <= start:
                stack.pop()
            args = e.get("args", {})
            hlo = " ".join(str(args.get(k, "")) for k in ("long_name", "hlo_op", "hlo_category", "tf_op"))
            op = dict(name=e["name"], dur=dur, hlo=hlo)
            if stack:
                stack[-1][1]["dur"] -= dur
            out.append(op)
            stack.append((start + dur, op))
    return out


def summarize(ops: list[dict], steps: int, step_s: float, top: int) -> str:
    by_name = collections.defaultdict(lambda: [0.0, 0, ""])
    for op in ops:
        entry = by_name[op["name"]]
        entry[0] += op["dur"]
        entry[1] += 1
        entry[2] = entry[2] or op["hlo"]
    step_us = step_s * 1e6
    total = sum(v[0] for v in by_name.values()) / steps
    lines = [
        f"# {len(by_name)} distinct device ops, {total / 1e3:.2f} ms of op time per step, step "
        f"{step_s * 1e3:.2f} ms (wall clock): ops busy {100 * total / step_us:.0f}% of the step",
        f"{'#':>3} {'op':<48}{'category':<16}{'calls/step':>11}{'ms/step':>9}{'% step':>8}",
    ]
    per_cat = collections.Counter()
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])
    for name, (dur, _, hlo) in ranked:
        per_cat[categorize(name, hlo)] += dur / steps
    for i, (name, (dur, calls, hlo)) in enumerate(ranked[:top], 1):
        cat = categorize(name, hlo)
        lines.append(
            f"{i:>3} {name[:47]:<48}{cat:<16}{calls / steps:>11.1f}{dur / steps / 1e3:>9.3f}"
            f"{100 * dur / steps / step_us:>7.1f}%"
        )
    lines.append(f"\n{'category':<16}{'ms/step':>9}{'% step':>8}")
    for cat in CATEGORIES:
        lines.append(f"{cat:<16}{per_cat[cat] / 1e3:>9.3f}{100 * per_cat[cat] / step_us:>7.1f}%")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="base-patch16", help="base-patch16 or large-patch14")
    p.add_argument("--batch", type=int, default=0, help="pairs per device (0: device.py's default)")
    p.add_argument("--steps", type=int, default=5, help="profiled steps (after one warm-up)")
    p.add_argument("--impl", default="", help="attention implementation ('' = JAX's default, xla, cudnn)")
    p.add_argument("--layout", choices=("scan", "unrolled"), default="scan")
    p.add_argument("--rng-impl", default="threefry")
    p.add_argument("--remat", default="none")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--logdir", default="", help="trace directory, kept (default: a new temporary one)")
    p.add_argument("--xla-flags", default="none", help="a chinese_clip_jax.training.xla_flags set")
    p.add_argument("--smoke", action="store_true", help="tiny config, batch 2, 2 steps (CPU)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from chinese_clip_jax.training import xla_flags

    xla_flags.apply(args.xla_flags)
    import jax
    import jax.numpy as jnp
    from device import SIZES, batch_sizes, host_batch, smoke_config

    import chinese_clip_jax as ccj
    from chinese_clip_jax import sharding as shd
    from chinese_clip_jax.training import create_train_state, make_optimizer, make_train_step

    if args.smoke:
        cfg, args.steps = smoke_config(), min(args.steps, 2)
        batch_n = args.batch or 2
    else:
        if args.size not in SIZES:
            raise SystemExit(f"unknown --size {args.size!r}; known: {', '.join(SIZES)}")
        cfg = ccj.ChineseCLIPConfig.preset(SIZES[args.size])
        batch_n = batch_sizes(cfg, args.batch)[0]
    logdir = os.path.abspath(args.logdir or tempfile.mkdtemp(prefix="ccj_profile_"))
    mesh = shd.make_mesh(devices=jax.local_devices())
    n = batch_n * mesh.devices.size
    model = ccj.ChineseCLIPModel(
        cfg, dtype=jnp.bfloat16, attention_impl=args.impl or None, scan_layers=args.layout == "scan", remat=args.remat
    )
    opt = base_config().optimizer  # the trainer's defaults (train/configs/base.py)
    opt.update(lr=1e-4, warmup_steps=10)
    tx, schedule = make_optimizer(opt, total_steps=1000)
    state, shardings = create_train_state(model, tx, mesh, seed=0)
    step = make_train_step(model, tx, schedule, mesh, shardings, rng_impl=args.rng_impl)
    batch = shd.shard_batch(host_batch(cfg, n), mesh)
    with shd.use_mesh_and_rules(mesh):
        state, m = step(state, batch)  # compile + warm-up
        m["loss"].block_until_ready()
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            t = time.perf_counter()
            for i in range(args.steps):
                with jax.profiler.StepTraceAnnotation("train", step_num=i):
                    state, m = step(state, batch)
                    m["loss"].block_until_ready()
            step_s = (time.perf_counter() - t) / args.steps
    trace = find_trace(logdir)
    ops = device_ops(trace)
    print(
        f"# {args.size if not args.smoke else 'smoke'} train x{n} on {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}), attention {args.impl or 'default'}, {args.layout}, rng {args.rng_impl}, "
        f"remat {args.remat}, {args.steps} steps"
    )
    if not ops:
        raise SystemExit(f"no device op events found in {trace}")
    print(summarize(ops, args.steps, step_s, args.top))
    print(f"# trace kept in {logdir} (tensorboard --logdir {logdir}; perfetto: {trace})")


if __name__ == "__main__":
    main()
