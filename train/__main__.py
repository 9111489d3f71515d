"""Thin CLI over ``chinese_clip_jax.training.loop.train``.

    python -m train --config train/configs/demo.py --workdir build/demo [--config.KEY=VALUE ...]

Multi-host: every process runs the same command; ``jax.distributed.initialize`` reads the
cluster environment (TPU pods, SLURM, ...) or ``--config.distributed.coordinator_address=host:port
--config.distributed.num_processes=N --config.distributed.process_id=I``.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file with get_config().",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard events go here.")
flags.mark_flags_as_required(["config", "workdir"])


def _maybe_initialize_distributed(dist) -> None:
    import jax

    if dist.coordinator_address:
        jax.distributed.initialize(coordinator_address=dist.coordinator_address,
                                   num_processes=dist.num_processes, process_id=dist.process_id)
    elif any(k in __import__("os").environ for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID",
                                                     "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE")):
        jax.distributed.initialize()


def main(argv) -> None:
    del argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("chinese_clip_jax").setLevel(logging.INFO)
    logging.getLogger().setLevel(logging.WARNING)  # Orbax's per-save INFO lines (absl's handler)
    config = _CONFIG.value
    from chinese_clip_jax import xla_flags

    xla_flags.apply(config.xla_gpu_flags)  # before any backend starts
    _maybe_initialize_distributed(config.distributed)

    import jax
    from chinese_clip_jax.training.loop import train
    from chinese_clip_jax.training.report import print_report

    result = train(config, _WORKDIR.value)
    if jax.process_index() == 0:
        print_report(result, config, _WORKDIR.value)
    if result.get("stopped_early"):
        sys.exit(0)


if __name__ == "__main__":
    app.run(main)
