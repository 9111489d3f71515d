"""The trainer's command line, a thin layer over ``chinese_clip_jax.training.loop.train``.

    ccj-train --config recipe:demo --workdir build/demo [--config.KEY=VALUE ...]   (installed)
    python -m train --config train/configs/demo.py --workdir build/demo           (from a checkout)

``recipe:NAME`` names a recipe shipped in ``chinese_clip_jax/training/recipes`` (the same files
as a checkout's ``train/configs``); any other ``--config`` is a Python file with ``get_config()``.

Multi-host: every process runs the same command; ``jax.distributed.initialize`` reads the
cluster environment (TPU pods, SLURM, ...) or ``--config.distributed.coordinator_address=host:port
--config.distributed.num_processes=N --config.distributed.process_id=I``.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from chinese_clip_jax.io import first_line

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file with get_config().", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard events go here.")
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile-only", False, "Compile the step for --target (hardware this host may lack), print its memory and exit."
)
_TARGET = flags.DEFINE_string("target", None, "With --compile-only: a TPU topology (v5p:2x2x1) or GPU:N (h100:8).")
_MAX_BATCH = flags.DEFINE_bool("max-batch", False, "With --compile-only: search the largest global batch that fits.")
flags.mark_flags_as_required(["config"])
flags.register_multi_flags_validator(
    ["workdir", "compile-only", "target"],
    lambda f: (f["target"] is not None) if f["compile-only"] else f["workdir"] is not None,
    "--workdir is required (with --compile-only: --target instead)",
)


def _maybe_initialize_distributed(dist) -> None:
    import jax

    if dist.coordinator_address:
        jax.distributed.initialize(
            coordinator_address=dist.coordinator_address, num_processes=dist.num_processes, process_id=dist.process_id
        )
    elif any(
        k in __import__("os").environ
        for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE")
    ):
        jax.distributed.initialize()


def _fail(message: str, status: int = 2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


_HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort")


def _first_sentence(doc: str | None, limit: int = 96) -> str:
    text = " ".join((doc or "").strip().split("\n\n")[0].replace("``", "").split())
    text = text.split(". ")[0].rstrip(".")
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def print_help() -> None:
    """``ccj-train --help``: the recipes and the config keys of the trainer's base config."""
    import importlib

    from chinese_clip_jax import data
    from chinese_clip_jax.data import registry
    from chinese_clip_jax.training import recipes as shipped
    from chinese_clip_jax.training.cli_help import help_text, key_comments
    from chinese_clip_jax.training.recipes import base

    recipes = {}
    for name in shipped.names():  # the runnable ones: not the template, not helper modules
        recipes[name] = _first_sentence(importlib.import_module(f"{shipped.__name__}.{name}").__doc__)
    sources = [(base.get_config, ""), (data.default_data_config, "data.")]
    sources += [(_module_of(s.open_train), f"data.{n}.") for n, s in registry.sources().items()]
    comments = key_comments(*sources)
    comments["data.name"] = f"the source, one of {', '.join(registry.names())}; its keys are data.NAME.*"
    prog = "ccj-train" if os.path.basename(sys.argv[0]) == "ccj-train" else "python -m train"
    sys.stdout.write(help_text(base.get_config(), recipes, comments, prog=prog))


def _module_of(function):
    """The module that defines ``function`` (where a source's DEFAULTS are written)."""
    return sys.modules[function.__module__]


def _parse_flags(argv):
    """absl flag parsing, with an unknown ``--config.KEY`` (or a bad override) reported in one
    line with the close matches instead of a traceback; ``--help`` prints :func:`print_help`."""
    if any(arg in _HELP_FLAGS for arg in argv[1:]):
        print_help()
        sys.exit(0)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(first_line(e, with_type=False))
    except Exception as e:  # noqa: BLE001 - config_flags' override errors (AttributeError, TypeError...)
        from chinese_clip_jax.training.recipes import base
        from chinese_clip_jax.training.validate import known_keys, unknown_key_error

        known = known_keys(base.get_config())
        for arg in argv[1:]:
            if arg.startswith("--config."):
                key = arg[len("--config.") :].split("=", 1)[0]
                if key not in known:
                    _fail(str(unknown_key_error(key, known)))
        _fail(f"cannot apply the config overrides: {first_line(e)}")


def main(argv) -> None:
    del argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("chinese_clip_jax").setLevel(logging.INFO)
    logging.getLogger().setLevel(logging.WARNING)  # Orbax's per-save INFO lines (absl's handler)
    logging.getLogger("absl").setLevel(logging.ERROR)  # library internals (console.quiet_libraries)
    config = _CONFIG.value
    from chinese_clip_jax.training.checkpoint import CheckpointUnreadableError
    from chinese_clip_jax.training.recipes import base
    from chinese_clip_jax.training.validate import validate_config
    from chinese_clip_jax.training.workdir import WorkdirLockedError

    if _COMPILE_ONLY.value:
        sys.exit(_compile_only(config))
    try:
        validate_config(config, reference=base.get_config())  # before anything is built
    except ValueError as e:
        _fail(str(e))
    from chinese_clip_jax.io import as_path

    try:  # a gs:// workdir without gcsfs, or a scheme epath does not serve: before jax starts
        workdir = as_path(_WORKDIR.value, what="--workdir")
    except (ValueError, ImportError) as e:
        _fail(str(e))
    if workdir.exists() and not workdir.is_dir():
        _fail(f"--workdir {_WORKDIR.value}: is a file, not a directory; give a new directory or a run's workdir")
    from chinese_clip_jax.training import xla_flags

    xla_flags.apply(config.xla_gpu_flags)  # before any backend starts
    _maybe_initialize_distributed(config.distributed)

    import jax

    from chinese_clip_jax.training.host_memory import HostMemoryError, check_config
    from chinese_clip_jax.training.loop import train
    from chinese_clip_jax.training.report import print_report

    try:  # a full-size recipe on a CPU-only host: what it needs, before anything is allocated
        check_config(config)
    except HostMemoryError as e:
        _fail(str(e))
    try:
        result = train(config, _WORKDIR.value)
    except (ValueError, FileNotFoundError, ImportError, WorkdirLockedError, CheckpointUnreadableError) as e:
        _fail(first_line(e, with_type=False))  # known-bad input: one line, status 2
    except OSError as e:  # disk full: the loop has removed its temporaries and says so
        _fail(first_line(e, with_type=False), status=1)
    if jax.process_index() == 0:
        print_report(result, config, _WORKDIR.value)
    if result.get("stopped_early"):
        sys.exit(0)


def _check_config_file(spec: str) -> None:
    """``--config FILE[:ARG]``: a readable Python file that defines ``get_config`` (else one line
    naming the file, before absl imports it and fails with a traceback or a module named
    ``config_config``)."""
    import ast

    from chinese_clip_jax.training import recipes

    path = spec
    if not os.path.isfile(path) and ":" in spec:  # FILE:ARG, ml_collections' config argument
        path = spec.rsplit(":", 1)[0]
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "no such file"
        _fail(
            f"--config {spec}: {what}; give a config file (get_config()) or recipe:NAME, one of "
            + ", ".join(recipes.names())
        )
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), filename=path)
    except SyntaxError as e:
        _fail(f"--config {path}:{e.lineno}: not valid Python ({e.msg})")
    except (OSError, ValueError) as e:
        _fail(f"--config {path}: cannot be read ({first_line(e)})")
    defined = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Assign):
            defined |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    if "get_config" not in defined:
        _fail(f"--config {path}: defines no get_config() (a config file returns an ml_collections.ConfigDict from it)")


def _compile_only(config) -> int:
    """``--compile-only``: the config checked as for a run (its data aside: nothing is read), then
    ``training.compile.run``."""
    from chinese_clip_jax.data import default_data_config
    from chinese_clip_jax.training import compile as aot
    from chinese_clip_jax.training.recipes import base
    from chinese_clip_jax.training.validate import validate_config

    checked = config.copy_and_resolve_references()
    with checked.unlocked():
        checked.data, checked.require_init_from = default_data_config("demo"), False
    try:
        validate_config(checked, reference=base.get_config())
    except ValueError as e:
        _fail(str(e))
    from chinese_clip_jax.training import xla_flags

    xla_flags.apply(config.xla_gpu_flags)  # the GPU flags of a real run (read when XLA starts)
    return aot.run(config, _TARGET.value, max_batch=_MAX_BATCH.value)


def _resolve_recipes(argv: list[str]) -> list[str]:
    """``--config recipe:NAME`` (a recipe shipped in the package) -> that file's path; the file
    (either way) is checked before absl loads it (``_check_config_file``)."""
    from chinese_clip_jax.training import recipes

    out = list(argv)
    for i, arg in enumerate(out):
        try:
            if arg.startswith("--config=") and not arg.startswith("--config.="):
                out[i] = "--config=" + recipes.resolve(arg[len("--config=") :])
                _check_config_file(out[i][len("--config=") :])
            elif arg == "--config" and i + 1 < len(out):
                out[i + 1] = recipes.resolve(out[i + 1])
                _check_config_file(out[i + 1])
        except ValueError as e:
            _fail(str(e))
    return out


def run() -> None:
    """Entry point of ``python -m train`` and the ``ccj-train`` script."""
    from chinese_clip_jax.console import quiet_libraries

    quiet_libraries()
    sys.argv = _resolve_recipes(sys.argv)
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
