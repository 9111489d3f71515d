"""Lower the trainer's train step for a platform, on any host, and summarise the program.

    python -m bench.lower --config train/configs/base.py --platform cuda --batch-size 256 --out step.mlir
    python -m bench.lower --config train/configs/base.py --platform tpu --batch-size 64 --mesh fsdp=8 --out tpu.mlir
    python -m bench.lower --config train/configs/demo.py --platform cpu --batch-size 128 --out demo.mlir
    python -m bench.lower --config train/configs/base.py --platform cuda --batch-size 8 --set model.remat=dots

Writes the StableHLO text of exactly the step ``ccj-train CONFIG`` runs on that platform: the
same model (``model.*``; random weights), the same run options (``training.defaults``: dtype,
attention, scan/unroll, remat, dropout RNG, resolved for ``--platform``, not for this host), the
same optimizer, loss (and its implementation), accumulation and freezing: the step is built by
``training.step.train_step_for``, as the trainer builds it. No device of that platform is
needed: ``jax.jit(...).trace(...).lower(lowering_platforms=...)``. Nothing is
allocated (the state is abstract), so base and large lower on a laptop in seconds.

Printed summary (``summarize``): fused-attention calls (cuDNN ``__cudnn$fmha*`` forward and
backward; Pallas ``tpu_custom_call``), RNG ops producing at least ``batch x context_length``
values ("full-size": dropout masks, not key derivations) by kind (threefry hash or
``rng_bit_generator``), while loops, explicit collectives by dtype (StableHLO carries the mesh as
shardings: XLA's partitioner adds the FSDP/data collectives at compile time, so ``--compile``,
CPU only, compiles the step for this host's devices and counts the collectives of the HLO
right after SPMD partitioning, by dtype), and for an unrolled step XLA's cost-analysis FLOPs
against ``bench/flops.py``.
Counts follow calls (a function called 12 times counts 12 times); inside a while loop they are
per iteration.

cuDNN attention is lowered with a stand-in cuDNN version (``--cudnn-version``, default 9.10) when
this host has none: jax asks the installed cuDNN for its version before building the call.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import sys
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

PLATFORMS = ("cuda", "tpu", "cpu")
MESH_AXES = ("data", "fsdp", "tensor")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="a trainer config file (get_config()), e.g. train/configs/base.py")
    p.add_argument("--platform", required=True, choices=PLATFORMS)
    p.add_argument("--batch-size", type=int, required=True, help="GLOBAL batch (replaces config.batch_size)")
    p.add_argument("--mesh", default="", help="e.g. data=8 or fsdp=8 (axes not named: 1); default: the config's")
    p.add_argument("--out", default="", help="write the StableHLO text here")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--compile", action="store_true", help="cpu only: also compile and count partitioned collectives")
    p.add_argument("--cudnn-version", type=int, default=91000, help="stand-in cuDNN version when none is installed")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    args.mesh_sizes = parse_mesh(args.mesh, p.error)
    if args.compile and args.platform != "cpu":
        p.error("--compile compiles for this host: use it with --platform cpu")
    return args


def parse_mesh(text: str, error=None) -> dict | None:
    """ "data=8" / "fsdp=8" / "data=2,fsdp=4" -> {"data": 2, "fsdp": 4, "tensor": 1}; "" -> None."""
    if not text:
        return None
    sizes = dict.fromkeys(MESH_AXES, 1)
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in MESH_AXES or not value.isdigit() or int(value) < 1:
            msg = f"--mesh: bad entry {part!r}; expected AXIS=N with AXIS one of {', '.join(MESH_AXES)}"
            if error:
                error(msg)
            raise ValueError(msg)
        sizes[key] = int(value)
    return sizes


def load_config(path: str, overrides=()):
    """``get_config()`` of a config file, with ``KEY=VALUE`` overrides (values parsed as Python
    literals where they are, else strings)."""
    import ast

    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)  # config files import train.configs.base
    if not os.path.isfile(path):
        raise SystemExit(f"--config: no such file {path!r}")
    spec = importlib.util.spec_from_file_location("_lowered_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--set: expected KEY=VALUE, got {item!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise SystemExit(f"--set: unknown config key {key!r}")
        if isinstance(node[leaf], str) and not isinstance(value, str):
            value = str(value).lower() if isinstance(value, bool) else raw  # e.g. scan_layers "auto" -> "true"
        node[leaf] = value
    return config


@contextlib.contextmanager
def cudnn_stand_in(version: int):
    """jax checks the installed cuDNN's version before it builds a fused-attention call; on a host
    without cuDNN (lowering for cuda from a CPU), answer ``version`` for the duration."""
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


def build(config, platform: str, batch_size: int, mesh_sizes: dict | None = None):
    """(jitted step, abstract state, abstract batch, mesh, run options, model config) of the train
    step ``ccj-train`` builds from ``config`` on ``platform`` (chinese_clip_jax.training.loop)."""
    import jax
    import jax.numpy as jnp

    from chinese_clip_jax.inference import sharding as shd
    from chinese_clip_jax.modeling import ChineseCLIPModel
    from chinese_clip_jax.modeling.config import parse_dtype
    from chinese_clip_jax.training.defaults import resolve_run_options
    from chinese_clip_jax.training.loop import build_model_config
    from chinese_clip_jax.training.losses import SIGLIP_INIT_LOGIT_BIAS
    from chinese_clip_jax.training.optim import make_optimizer
    from chinese_clip_jax.training.state import abstract_train_state
    from chinese_clip_jax.training.step import train_step_for
    from chinese_clip_jax.training.validate import validate_config

    validate_config(config)
    options = resolve_run_options(config, platform)
    model_config = build_model_config(config.model)
    model = ChineseCLIPModel(
        model_config,
        dtype=parse_dtype(options.dtype),
        **options.model_options(),
        logit_bias_init=SIGLIP_INIT_LOGIT_BIAS if config.loss == "sigmoid" else None,
    )
    m = mesh_sizes or {k: config.mesh[k] for k in MESH_AXES}
    mesh = shd.make_mesh(m["data"], m["fsdp"], m["tensor"])
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % (shards * config.accum_steps):
        raise SystemExit(
            f"--batch-size {batch_size} must be divisible by data x fsdp ({shards}) x "
            f"accum_steps ({config.accum_steps})"
        )
    freeze = config.freeze or None
    tx, schedule = make_optimizer(config.optimizer, config.total_steps, freeze)
    state = abstract_train_state(model, tx, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    step = train_step_for(config, options, model, tx, schedule, mesh, shardings, freeze=freeze)
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


def lower(config, platform: str, batch_size: int, mesh_sizes=None, cudnn_version: int = 91000):
    """(jax ``Lowered``, run options, model config, mesh) of the trainer's step for ``platform``."""
    from chinese_clip_jax.inference import sharding as shd

    stand_in = cudnn_stand_in(cudnn_version) if platform == "cuda" else contextlib.nullcontext()
    with stand_in:  # model.init traces the attention too
        step, state, batch, mesh, options, model_config = build(config, platform, batch_size, mesh_sizes)
        with shd.use_mesh_and_rules(mesh):
            lowered = step.trace(state, batch).lower(lowering_platforms=(platform,))
    return lowered, options, model_config, mesh


# ---- the summary -------------------------------------------------------------------------------

_FUNC = re.compile(r"^\s*func\.func (?:public |private )?@([\w$.]+)\(")
_CALL = re.compile(r"\bcall @([\w$.]+)\(")
_TENSOR = re.compile(r"tensor<([0-9x]*)x?([a-z][a-z0-9]*)>")
_COLLECTIVES = ("all_gather", "all_reduce", "reduce_scatter", "all_to_all", "collective_permute")


def _functions(text: str) -> dict[str, list[str]]:
    funcs, name = {}, None
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            name = m.group(1)
            funcs[name] = []
        if name is not None:
            funcs[name].append(line)
    return funcs


def _elements(type_text: str) -> int:
    dims = [int(d) for d in type_text.split("x") if d]
    n = 1
    for d in dims:
        n *= d
    return n


def _result_tensors(line: str) -> list[tuple[int, str]]:
    """(elements, dtype) of the results of an op line (the types after the last ``->``)."""
    tail = line.rsplit("->", 1)[-1]
    return [(_elements(shape), dtype) for shape, dtype in _TENSOR.findall(tail)]


def _line_features(line: str, full_size: int) -> Counter:
    c = Counter()
    m = re.search(r"custom_call @([\w$.]+)", line)
    if m:
        name = m.group(1)
        if name.startswith("__cudnn$fmha"):
            kind = "cudnn_attention_backward" if "Backward" in name else "cudnn_attention_forward"
            c[kind] += 1
            q = re.search(r" : \(tensor<(\d+)x(\d+)x", line)  # operand 0, q: (batch, seq, heads, head_dim)
            if q:
                c[f"{kind}@{q.group(2)}"] += 1
        elif name == "tpu_custom_call":
            c["pallas_tpu_kernel"] += 1
    if "stablehlo.while" in line:
        c["while_loops"] += 1
    if "stablehlo.rng_bit_generator" in line and any(n >= full_size for n, _ in _result_tensors(line)[1:]):
        c["full_size_rng_bit_generator"] += 1
    call = _CALL.search(line)
    if call and call.group(1).startswith("threefry2x32") and any(n >= full_size for n, _ in _result_tensors(line)):
        c["full_size_threefry"] += 1
    for op in _COLLECTIVES:
        if f"stablehlo.{op}" in line or f'"stablehlo.{op}"' in line:
            dtypes = {d for _, d in _result_tensors(line)} or {"?"}
            for d in dtypes:
                c[f"{op}:{d}"] += 1
    return c


def summarize(text: str, full_size: int) -> Counter:
    """Counts in StableHLO ``text`` (see the module docstring), following calls from ``main``.

    full_size: the least number of values an RNG op must produce to count as a full-size draw."""
    funcs = _functions(text)
    memo: dict[str, Counter] = {}

    def count(name: str, stack=()) -> Counter:
        if name in memo:
            return memo[name]
        total = Counter()
        for line in funcs.get(name, ())[1:]:
            total += _line_features(line, full_size)
            call = _CALL.search(line)
            if call and call.group(1) in funcs and call.group(1) not in stack:
                total += count(call.group(1), (*stack, name))
        memo[name] = total
        return total

    return count("main")


_HLO_COLLECTIVE = re.compile(
    r"=\s*\(?([a-z0-9]+)\[[^=]*?\s(all-gather|all-reduce|reduce-scatter|all-to-all)(?:-start)?\("
)


def hlo_collectives(hlo_text: str) -> Counter:
    """Collectives by dtype in compiled (partitioned) HLO text: ``all-gather:bf16`` -> count."""
    c = Counter()
    for line in hlo_text.splitlines():
        m = re.search(
            r"=\s*\(?([a-z0-9]+)\[[^=]*?\s(all-gather|all-reduce|reduce-scatter|all-to-all)(?:-start)?\(", line
        )
        if m:
            c[f"{m.group(2)}:{m.group(1)}"] += 1
    return c


_DUMP_ENV = "CCJ_LOWER_DUMP_DIR"


def partitioned_hlo(dump_dir: str) -> str:
    """The train step's HLO right after XLA's SPMD partitioner (dumped there by ``main`` with
    ``--compile``): the collectives as partitioned, before the CPU backend's float normalization
    widens bf16 collectives to f32 (XLA:CPU has no bf16 collectives; GPU and TPU keep them)."""
    import glob

    files = sorted(glob.glob(os.path.join(dump_dir, "*jit_step_fn*after_spmd-partitioning*.txt")))
    if not files:
        raise SystemExit(f"no partitioned HLO dump of the step in {dump_dir!r} (run through main with --compile)")
    with open(files[-1]) as f:
        return f.read()


def cost_flops(lowered) -> float | None:
    """XLA's cost-analysis FLOPs of the lowered module (None where the lowering has none)."""
    try:
        cost = lowered.cost_analysis()
    except Exception:  # noqa: BLE001 - not every platform's lowering offers it
        return None
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    return float(cost["flops"]) if cost and "flops" in cost else None


def formula_flops(model_config, batch: int, seq: int) -> float:
    sys.path.insert(0, HERE)
    import flops

    return flops.train_step_flops(model_config, batch, seq)


def report(args) -> dict:
    config = load_config(args.config, args.set)
    config.batch_size = args.batch_size
    lowered, options, model_config, mesh = lower(
        config, args.platform, args.batch_size, args.mesh_sizes, args.cudnn_version
    )
    text = lowered.as_text()
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.out)
    full_size = args.batch_size * config.context_length
    counts = summarize(text, full_size)
    result = {"options": options.as_dict(), "counts": dict(counts), "mesh": dict(mesh.shape)}
    formula = formula_flops(model_config, args.batch_size, config.context_length)
    result["formula_flops"] = formula
    result["cost_flops"] = cost_flops(lowered) if not options.scan_layers else None
    if args.compile:
        lowered.compile()
        result["partitioned_collectives"] = dict(hlo_collectives(partitioned_hlo(os.environ.get(_DUMP_ENV, ""))))
    return result


def print_report(args, result: dict) -> None:
    o = result["options"]
    c = Counter(result["counts"])
    print(f"# {args.config} on {args.platform}, global batch {args.batch_size}, mesh {result['mesh']}")
    print("# run options: " + ", ".join(f"{k}={o[k]!r} ({o['source'][k]})" for k in o["source"]))
    by_len = sorted({int(k.split("@")[1]) for k in c if k.startswith("cudnn_attention_") and "@" in k})
    per_len = "; ".join(
        f"seq {n}: {c[f'cudnn_attention_forward@{n}']} + {c[f'cudnn_attention_backward@{n}']}" for n in by_len
    )
    print(
        f"fused attention: cudnn forward {c['cudnn_attention_forward']}, backward {c['cudnn_attention_backward']}"
        + (f" ({per_len})" if per_len else "")
    )
    print(f"pallas tpu kernels: {c['pallas_tpu_kernel']}")
    print(
        f"full-size RNG ops (>= {args.batch_size} x context_length values): threefry {c['full_size_threefry']}, "
        f"rng_bit_generator {c['full_size_rng_bit_generator']}"
    )
    print(f"while loops: {c['while_loops']}")
    coll = {k: v for k, v in c.items() if ":" in k}
    print("collectives in the lowering: " + (", ".join(f"{k} {v}" for k, v in sorted(coll.items())) or "none"))
    if "partitioned_collectives" in result:
        cc = result["partitioned_collectives"]
        print(
            "collectives after SPMD partitioning: " + (", ".join(f"{k} {v}" for k, v in sorted(cc.items())) or "none")
        )
    f, x = result["formula_flops"], result["cost_flops"]
    if x is None:
        print(f"FLOPs: formula {f / 1e12:.3f} T (cost analysis: only for an unrolled step)")
    else:
        print(f"FLOPs: cost analysis {x / 1e12:.3f} T, formula {f / 1e12:.3f} T, ratio {x / f:.3f}")
    if args.out:
        print(f"wrote {args.out}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    need = 1
    for v in (args.mesh_sizes or {}).values():
        need *= v
    if need > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        # a mesh of simulated devices on this host (before jax starts its backend)
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={need}"
        ).strip()
    if args.compile:  # the partitioned HLO, dumped once by XLA (read by ``partitioned_hlo``)
        import tempfile

        dump = tempfile.mkdtemp(prefix="ccj-lower-")
        os.environ[_DUMP_ENV] = dump
        flags = os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump} --xla_dump_hlo_pass_re=spmd-partitioning"
        os.environ["XLA_FLAGS"] = flags.strip()
    try:
        result = report(args)
    finally:
        if args.compile:
            import shutil

            shutil.rmtree(os.environ[_DUMP_ENV], ignore_errors=True)
    print_report(args, result)
    return result


if __name__ == "__main__":
    main()
