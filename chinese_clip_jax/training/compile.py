"""Compile the trainer's exact step ahead of time for hardware this host lacks: per-device memory,
fused kernels, collectives and whether it fits (``ccj-train --compile-only --target TARGET``).

    ccj-train --config recipe:pretrain_stage2 --compile-only --target v5p:2x2x1
    ccj-train --config recipe:demo --compile-only --target h100:1 [--max-batch]

``TARGET``: a TPU topology (``v5p:2x2x1``) or ``KIND:N`` NVIDIA GPUs (``h100:8``), see
``training.targets``. The step is the one ``ccj-train`` runs there
(``training.step.train_step_for``; the run options of ``training.defaults`` resolved for that
platform; the config's mesh and batch) over the target's compile-only devices; nothing is
allocated.

Per device: params + optimizer state and batch (from the shardings), temporaries (XLA's
``memory_analysis``), the peak estimate (arguments + outputs not donated + temporaries +
code), the memory the program may use (``training.targets``) and the headroom. Kernels and
collectives are counted in the optimised HLO (inside a while loop: once per iteration, not per
trip). Caveats: GPU autotuning is skipped without a device (kernel choices and temporaries may
differ from a real run's); TPU on-chip memory (VMEM) is not counted.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import re
import sys
import time
from collections import Counter

from .targets import GiB, Target, hbm_refusal, open_target

__all__ = [
    "CompileReport",
    "build_step",
    "per_device_bytes",
    "cudnn_stand_in",
    "compile_step",
    "search_max_batch",
    "AUTO",
    "fewest_accum_steps",
    "hlo_counts",
    "format_report",
    "does_not_fit_line",
    "run",
]


AUTO = "auto"  # config.accum_steps: the fewest micro-batches whose step fits (fewest_accum_steps)


# ---- the step -----------------------------------------------------------------------------------


@contextlib.contextmanager
def cudnn_stand_in(version: int = 91000):
    """jax checks the installed cuDNN's version before it builds a fused-attention call; on a host
    without cuDNN (compiling for cuda from a CPU), answer ``version`` for the duration."""
    from jax._src.cudnn import fused_attention_stablehlo as fused

    try:
        fused.check_cudnn_version()
        yield
        return
    except RuntimeError:
        pass
    real = fused.check_cudnn_version
    fused.check_cudnn_version = lambda: version
    try:
        yield
    finally:
        fused.check_cudnn_version = real


def build_step(config, platform: str, devices=None, mesh_sizes: dict | None = None, model_config=None):
    """(jitted step, abstract state, abstract batch, mesh, run options, model config) of the train
    step ``ccj-train`` builds from ``config`` (its ``batch_size``, mesh, model, optimizer, loss,
    accumulation, freezing) on ``platform``, over ``devices`` (default: this host's). ``mesh_sizes``
    ({"data", "fsdp", "tensor"}) replaces ``config.mesh``; ``model_config`` (a
    ``ChineseCLIPConfig``, e.g. ``init_from``'s) replaces the architecture of ``config.model``."""
    import jax
    import jax.numpy as jnp

    from .. import sharding as shd
    from ..modeling import ChineseCLIPModel
    from ..modeling.config import parse_dtype
    from .defaults import resolve_run_options
    from .losses import SIGLIP_INIT_LOGIT_BIAS
    from .optim import make_optimizer
    from .state import abstract_train_state
    from .step import train_step_for
    from .validate import build_model_config, lora_settings, unfreeze_settings

    if config.accum_steps == AUTO:
        raise ValueError(
            "accum_steps='auto' is chosen by compiling for a target (fewest_accum_steps, ccj-train "
            "--compile-only --target T, or the trainer on its devices): give a number to build the step"
        )
    options = resolve_run_options(config, platform)
    model_config = model_config or build_model_config(config.model)
    model = ChineseCLIPModel(
        model_config,
        dtype=parse_dtype(options.dtype),
        **options.model_options(),
        logit_bias_init=SIGLIP_INIT_LOGIT_BIAS if config.loss == "sigmoid" else None,
    )
    m = mesh_sizes or dict(config.mesh)
    mesh = shd.make_mesh(m["data"], m["fsdp"], m["tensor"], devices=devices)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch_size = config.batch_size
    if batch_size % (shards * config.accum_steps):
        raise ValueError(
            f"batch_size {batch_size} must be divisible by data x fsdp ({shards}) x accum_steps ({config.accum_steps})"
        )
    freeze = config.freeze or None
    unfreeze = unfreeze_settings(config)
    tx, schedule = make_optimizer(config.optimizer, config.total_steps, freeze, unfreeze)
    state = abstract_train_state(model, tx, mesh, lora=lora_settings(config))
    shardings = jax.tree.map(lambda x: x.sharding, state)
    step = train_step_for(config, options, model, tx, schedule, mesh, shardings, freeze=freeze, unfreeze=unfreeze)
    v = model_config.vision_config
    bs = shd.batch_sharding(mesh)
    batch = {  # what the data pipeline gives: uint8 NHWC images, int32 token ids
        "input_ids": jax.ShapeDtypeStruct((batch_size, config.context_length), jnp.int32, sharding=bs),
        "attention_mask": jax.ShapeDtypeStruct((batch_size, config.context_length), jnp.int32, sharding=bs),
        "pixel_values": jax.ShapeDtypeStruct((batch_size, v.image_size, v.image_size, 3), jnp.uint8, sharding=bs),
    }
    if config.loss_positives == "label":  # the source's class ids (training.step.batch_keys)
        batch["label"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=bs)
    return step, state, batch, mesh, options, model_config


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of sharded arrays (or ``ShapeDtypeStruct`` s)."""
    import jax

    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += math.prod(shard) * x.dtype.itemsize
    return total


# ---- compiling and reading the program ----------------------------------------------------------

_HLO_OP = re.compile(r"=\s*\(?([a-z][a-z0-9]*)\[.*?\s([a-z][a-z-]*)\(")
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def hlo_counts(hlo_text: str) -> Counter:
    """Counts in optimised (or partitioned) HLO text: fused-attention calls (``cudnn_attention_forward``
    / ``_backward``, also per sequence length as ``cudnn_attention_forward@200``; ``pallas_tpu_kernel``),
    ``while_loops`` and collectives by kind and dtype (``all-gather:bf16``; an async ``-start``
    counts once, its ``-done`` not)."""
    c = Counter()
    for line in hlo_text.splitlines():
        target = re.search(r'custom_call_target="([^"]+)"', line)
        if target:
            name = target.group(1)
            if name.startswith("__cudnn$fmha"):
                kind = "cudnn_attention_backward" if "Backward" in name else "cudnn_attention_forward"
                c[kind] += 1
                shape = re.search(r"=\s*\(\w+\[\d+,\d+,(\d+),\d+\]", line)  # (batch, heads, seq, head_dim)
                if shape:
                    c[f"{kind}@{shape.group(1)}"] += 1
            elif name == "tpu_custom_call":
                c["pallas_tpu_kernel"] += 1
        m = _HLO_OP.search(line)
        if not m:
            continue
        dtype, op = m.groups()
        if op == "while":
            c["while_loops"] += 1
        op = op.removesuffix("-start")
        if op in _COLLECTIVES:
            c[f"{op}:{dtype}"] += 1
    return c


@dataclasses.dataclass
class CompileReport:
    """One compile of the step for a target: per-device bytes, counts, time, fit."""

    target: str
    chip_note: str
    batch_size: int
    mesh: dict
    options: dict
    state_bytes: int  # params + optimizer state (+ step, rng) per device
    batch_bytes: int
    argument_bytes: int  # what XLA counts for the inputs (state + batch), per device
    temp_bytes: int | None  # None: the compiler refused (out of memory)
    output_bytes: int  # outputs not aliased to (donated) inputs
    code_bytes: int
    peak_bytes: int  # estimate (or, refused, the compiler's figure of what it needed)
    usable_bytes: int
    compile_s: float
    counts: dict
    refused: str = ""  # the compiler's first line when it refused
    device_bytes: int = 0  # all the device's memory, where more than usable_bytes (GPU)
    accum_steps: int = 1

    @property
    def fits(self) -> bool:
        return not self.refused and self.peak_bytes <= self.usable_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.usable_bytes - self.peak_bytes


def compile_step(config, target: Target, *, mesh_sizes=None, model_config=None) -> CompileReport:
    """Compiles ``config``'s train step for ``target``; a TPU program that cannot fit HBM comes back
    with ``refused`` set (not raised). ``model_config``: as ``build_step``."""
    from .. import sharding as shd

    stand_in = cudnn_stand_in() if target.platform == "cuda" else contextlib.nullcontext()
    with stand_in:
        step, state, batch, mesh, options, _ = build_step(
            config, target.platform, target.devices, mesh_sizes, model_config=model_config
        )
        with shd.use_mesh_and_rules(mesh):
            lowered = step.trace(state, batch).lower(lowering_platforms=(target.platform,))
    state_bytes, batch_bytes = per_device_bytes(state), per_device_bytes(batch)
    common = dict(
        target=target.name,
        chip_note=target.chip_note,
        batch_size=config.batch_size,
        accum_steps=config.accum_steps,
        mesh=dict(mesh.shape),
        options=options.as_dict(),
        state_bytes=state_bytes,
        batch_bytes=batch_bytes,
        usable_bytes=target.usable_bytes,
        device_bytes=target.device_bytes,
    )
    t0 = time.perf_counter()
    try:
        compiled = lowered.compile(target.compiler_options or None)
    except Exception as e:  # noqa: BLE001 - XLA raises a bare runtime error
        refusal = hbm_refusal(str(e))
        if not refusal:
            raise
        need, _, temporaries_only = refusal
        if temporaries_only:  # the arguments come on top
            need += state_bytes + batch_bytes
        line = str(e).strip().splitlines()[0]
        return CompileReport(
            **common, argument_bytes=state_bytes + batch_bytes, temp_bytes=None, output_bytes=0, code_bytes=0,
            peak_bytes=int(need), compile_s=time.perf_counter() - t0, counts={}, refused=line,
        )  # fmt: skip
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    out = mem.output_size_in_bytes - mem.alias_size_in_bytes
    code = mem.generated_code_size_in_bytes
    peak = mem.argument_size_in_bytes + out + mem.temp_size_in_bytes + code
    return CompileReport(
        **common,
        argument_bytes=mem.argument_size_in_bytes,
        temp_bytes=mem.temp_size_in_bytes,
        output_bytes=out,
        code_bytes=code,
        peak_bytes=peak,
        compile_s=compile_s,
        counts=dict(hlo_counts(compiled.as_text())),
    )


def _with(config, **values: int):
    """A copy of ``config`` with these top-level keys set to ints (``accum_steps`` "auto" too)."""
    c = copy.deepcopy(config)
    with c.ignore_type():
        for key, value in values.items():
            c[key] = int(value)
    return c


AUTO_MARGIN = 0.05  # of the usable memory that accum_steps "auto" leaves free


def fewest_accum_steps(
    config, target: Target, *, margin: float = AUTO_MARGIN, max_compiles: int = 5, model_config=None, log=print
):
    """``accum_steps="auto"``: the fewest micro-batches K whose step fits ``target`` (K divides
    the per-device batch; the gradient is the full-batch one whatever K, ``training.step``).

    Compiles K = 1; where it does not fit, predicts the smallest K that does from a line through
    the measured peaks (bytes that stay + bytes per micro-batch row; from K = 1 alone, the
    activations per row and one more copy of the trainable params for the accumulated gradient)
    and compiles it, then narrows the bracket between the largest K that did not fit and the
    smallest that did (each time at the smallest K the line says fits, else at the divisor just
    below the fitting one, to confirm it), within ``max_compiles``. Returns (K or None when
    nothing fits, the report of K (else of the largest K compiled), all reports by K). K is the
    smallest that fits when the next smaller divisor was compiled and did not; ``log`` says
    when it was not. "Fits" here leaves ``margin`` of the usable memory free (default 5%: the
    allocator's fragmentation and what an estimate misses), since a run is about to rely on it."""
    from .. import sharding as shd

    limit = int(target.usable_bytes * (1 - margin))

    def ok(r):
        return not r.refused and r.peak_bytes <= limit

    m = config.mesh
    mesh = shd.make_mesh(m["data"], m["fsdp"], m["tensor"], devices=target.devices)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.batch_size % shards:
        raise ValueError(f"batch_size {config.batch_size} must be divisible by data x fsdp ({shards})")
    rows = config.batch_size // shards  # per device
    divisors = [k for k in range(1, rows + 1) if rows % k == 0]
    reports: dict[int, CompileReport] = {}

    def compile_k(k):
        reports[k] = compile_step(_with(config, accum_steps=k), target, model_config=model_config)
        r = reports[k]
        state = "fits" if ok(r) else f"does not fit with {margin:.0%} left free" if r.fits else "does not fit"
        log(
            f"accum_steps {k} ({rows // k} rows per device per micro-batch): peak {_gib(r.peak_bytes)} of "
            f"{_gib(r.usable_bytes)} per device, {state}"
        )
        return r

    def predicted(k):  # peak at K: a line in micro-batch rows through the compiled K > 1, else from K = 1
        x = rows // k
        pts = sorted((rows // j, r.peak_bytes) for j, r in reports.items() if j > 1)
        if len(pts) >= 2:
            (x0, y0), (x1, y1) = sorted(pts, key=lambda p: abs(p[0] - x))[:2]
            return y0 + (y1 - y0) / (x1 - x0) * (x - x0)
        one = reports[1]
        stays = one.state_bytes + one.batch_bytes + one.code_bytes
        per_row = max(one.peak_bytes - stays, 0) / rows
        if pts:  # through the one GradCache point, with K = 1's bytes per row
            x0, y0 = pts[0]
            return y0 + per_row * (x - x0)
        grads = one.state_bytes // 3  # params + 2 Adam moments: the accumulator is one more params
        return stays + grads + per_row * x

    first = compile_k(1)
    if ok(first):
        return 1, first, reports
    while len(reports) < max_compiles:
        fits = sorted(k for k, r in reports.items() if ok(r))
        misses = sorted(k for k, r in reports.items() if not ok(r))
        lo = max(misses)  # the largest K known not to fit
        hi = min(fits) if fits else None  # the smallest K known to fit
        cands = [k for k in divisors if k > lo and (hi is None or k < hi)]
        if not cands:
            break
        want = [k for k in cands if predicted(k) <= limit]
        # the smallest K the line says fits; none: the largest candidate (hi's neighbour below it,
        # compiled to confirm hi is the smallest; without hi, whether anything fits at all)
        compile_k(want[0] if want else cands[-1])
    fits = sorted(k for k, r in reports.items() if ok(r))
    if not fits:
        return None, reports[max(reports)], reports
    best = fits[0]
    below = [k for k in divisors if k < best]
    if below and below[-1] not in reports:
        log(f"accum_steps {best} fits; {below[-1]} was not compiled (the line through the peaks says it does not fit)")
    return best, reports[best], reports


def search_max_batch(config, target: Target, *, quantum: int = 0, max_compiles: int = 8, log=print):
    """The largest global batch that fits ``target`` (a multiple of data x fsdp x accum_steps x
    ``quantum``, default 8 rows per device): compiles at the config's batch, then where a line
    through the measured peaks (fixed bytes + bytes per row) says the limit is, bisecting
    between the largest fit and the smallest miss. Returns (best report or None, all reports)."""
    first = compile_step(config, target)
    shards = first.mesh["data"] * first.mesh["fsdp"]
    step = shards * config.accum_steps * (quantum or 8)
    reports = {config.batch_size: first}
    log(_short(first))

    def known(fit):
        return sorted(b for b, r in reports.items() if r.fits == fit)

    while len(reports) < max_compiles:
        fits, misses = known(True), known(False)
        lo, hi = (fits[-1] if fits else 0), (misses[0] if misses else None)
        if hi is not None and hi - lo <= step:
            break
        # peak = fixed + slope x batch, through the points nearest the limit (one point: through
        # the bytes that do not grow with the batch)
        near = [b for b in (lo, hi) if b in reports] or sorted(reports)[-2:]
        if len(near) < 2:
            near = sorted(reports)[-2:]
        if len(near) == 2:
            (b0, b1), (p0, p1) = near, (reports[near[0]].peak_bytes, reports[near[1]].peak_bytes)
            slope = max(p1 - p0, 1) / (b1 - b0)
            fixed = p1 - slope * b1
        else:
            r = reports[near[0]]
            fixed = r.state_bytes + r.code_bytes
            slope = max(r.peak_bytes - fixed, 1) / near[0]
        guess = int((target.usable_bytes - fixed) / slope) // step * step
        top = hi - step if hi is not None else max(guess, 2 * lo)
        guess = min(max(guess, lo + step), top)
        if guess in reports:
            guess = (lo + (hi if hi is not None else 2 * lo)) // 2 // step * step
        if guess <= lo or guess in reports:
            break
        reports[guess] = compile_step(_with(config, batch_size=guess), target)
        log(_short(reports[guess]))
    fits = known(True)
    return (reports[fits[-1]] if fits else None), [reports[b] for b in sorted(reports)]


# ---- the printout -------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def _short(r: CompileReport) -> str:
    state = "fits" if r.fits else "does not fit"
    return f"batch {r.batch_size}: peak {_gib(r.peak_bytes)} of {_gib(r.usable_bytes)} per device, {state}"


def does_not_fit_line(r: CompileReport, margin: float = 0.0) -> str:
    """The one line printed when the step does not fit (with ``margin`` of the usable memory left
    free: ``fewest_accum_steps``), with the knobs that would help."""
    limit = int(r.usable_bytes * (1 - margin))
    over = r.peak_bytes - limit
    knobs = []
    if r.mesh.get("fsdp", 1) == 1:
        knobs.append("--config.mesh.fsdp=N (shard params and optimizer state)")
    if r.accum_steps * _shards(r) < r.batch_size:  # a micro-batch of more than one row per device
        knobs.append("--config.accum_steps=K or auto (K micro-batches, same gradient)")
    if r.options.get("remat") in ("none", None):
        knobs.append("--config.model.remat=dots")
    elif r.options.get("remat") == "dots":
        knobs.append("--config.model.remat=full")
    knobs.append("a smaller --config.batch_size")
    if r.peak_bytes <= 0.95 * r.device_bytes:  # GPU: within the device, beyond jax's allocator share
        knobs.append(
            f"or XLA_PYTHON_CLIENT_MEM_FRACTION={math.ceil(100 * r.peak_bytes / r.device_bytes) / 100 + 0.02:.2f}"
        )
    return (
        f"does not fit {r.target} at batch {r.batch_size}"
        + (f" in {r.accum_steps} micro-batches" if r.accum_steps > 1 else "")
        + f": needs {_gib(r.peak_bytes)} per device of {_gib(r.usable_bytes)}"
        + (f" ({_gib(limit)} with {margin:.0%} left free)" if margin else "")
        + f", over by {over / GiB:.2f} GiB; try "
        + ", ".join(knobs)
    )


def format_report(r: CompileReport) -> str:
    """The per-device figures, kernels, collectives and compile time, one item per line."""
    o = r.options
    c = Counter(r.counts)
    lines = [
        f"target {r.target}: {r.chip_note}",
        f"global batch {r.batch_size}"
        + (f" in {r.accum_steps} micro-batches of {r.batch_size // r.accum_steps}" if r.accum_steps > 1 else "")
        + f", mesh {r.mesh}; run options: "
        + ", ".join(f"{k}={o[k]!r}" for k in ("dtype", "attention_impl", "scan_layers", "rng_impl", "remat")),
        "per device:",
        f"  params + optimizer state  {_gib(r.state_bytes)}",
        f"  batch                     {_gib(r.batch_bytes)}",
    ]
    if r.temp_bytes is None:
        lines.append(f"  refused by the compiler: {r.refused}")
    else:
        lines += [
            f"  temporaries               {_gib(r.temp_bytes)}",
            f"  outputs (not donated)     {_gib(r.output_bytes)}",
            f"  generated code            {_gib(r.code_bytes)}",
        ]
    lines += [
        f"  peak estimate             {_gib(r.peak_bytes)}",
        f"  usable memory             {_gib(r.usable_bytes)}",
        f"  headroom                  {_gib(r.headroom_bytes)}",
    ]
    if r.temp_bytes is not None:
        seqs = sorted({int(k.split("@")[1]) for k in c if k.startswith("cudnn_attention_") and "@" in k})
        per_seq = "; ".join(
            f"seq {n}: {c[f'cudnn_attention_forward@{n}']} + {c[f'cudnn_attention_backward@{n}']}" for n in seqs
        )
        lines.append(
            f"fused attention: cudnn forward {c['cudnn_attention_forward']}, backward "
            f"{c['cudnn_attention_backward']}" + (f" ({per_seq})" if per_seq else "") + "; "
            f"pallas tpu kernels {c['pallas_tpu_kernel']}; "
            f"while loops {c['while_loops']} (counts inside a loop are per iteration)"
        )
        coll = sorted((k, v) for k, v in c.items() if ":" in k)
        lines.append("collectives: " + (", ".join(f"{k} {v}" for k, v in coll) or "none"))
    lines.append(f"compile time {r.compile_s:.1f} s")
    return "\n".join(lines)


def _compile_config(config):
    """``config`` as compiled without a run: the architecture from ``model.*`` (from ``init_from``'s
    config.json where it is a local checkpoint directory; nothing is downloaded), no data read."""
    c = copy.deepcopy(config)
    with c.unlocked():
        from ..io import as_path, is_local

        if c.init_from and is_local(c.init_from) and (as_path(c.init_from) / "config.json").exists():
            from ..modeling.config import ChineseCLIPConfig

            try:
                arch = ChineseCLIPConfig.from_pretrained(c.init_from)
                c.model.preset = ""
                c.model.text.update({k: getattr(arch.text_config, k) for k in c.model.text})
                c.model.vision.update({k: getattr(arch.vision_config, k) for k in c.model.vision})
                c.model.projection_dim = arch.projection_dim
            except Exception:  # noqa: BLE001 - an unreadable config.json: the config's sizes
                pass
        c.init_from = ""
        c.require_init_from = False
    return c


def run(config, target_text: str, *, max_batch: bool = False, out=print) -> int:
    """``ccj-train --compile-only``: compile, print, return the exit status (0 fits, 1 not, 2 bad input)."""
    try:
        target = open_target(target_text)
    except (ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = _compile_config(config)
    try:
        if config.accum_steps == AUTO and max_batch:
            out("accum_steps 'auto': the search runs at accum_steps 1 (give a number to search at another)")
            config = _with(config, accum_steps=1)
        if config.accum_steps == AUTO:
            k, report, tried = fewest_accum_steps(config, target, log=out)
            if k is None:
                out(does_not_fit_line(report, margin=AUTO_MARGIN))
                return 1
            out(f"accum_steps 'auto' -> {k}: the fewest micro-batches that fit ({len(tried)} compiles)")
            out(format_report(report))
            return 0
        if max_batch:
            best, tried = search_max_batch(config, target, log=out)
            if best is None:
                out(does_not_fit_line(tried[0]))
                return 1
            out(format_report(best))
            out(f"largest global batch that fits: {best.batch_size} ({best.batch_size // _shards(best)} per device)")
            return 0
        report = compile_step(config, target)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not report.fits:
        out(does_not_fit_line(report))
        return 1
    out(format_report(report))
    return 0


def _shards(r: CompileReport) -> int:
    return r.mesh["data"] * r.mesh["fsdp"]
