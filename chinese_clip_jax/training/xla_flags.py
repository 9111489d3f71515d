"""XLA GPU flags: the one place this project sets them (the trainer's ``xla_gpu_flags`` config key,
``bench/device.py --xla-flags``, ``bench/device_run.sh``).

XLA reads ``XLA_FLAGS`` once, when the first backend starts, so ``apply`` must run before any
computation (it warns if a backend is already up). A flag the user already put in ``XLA_FLAGS``
is never overridden. An XLA build that does not know a flag aborts at start-up ("Unknown flags
in XLA_FLAGS"): every set here is meant to be measured by ``bench/device_run.sh`` on the jax
build of the device before it becomes a default. Flags named ``xla_gpu_*`` are parsed but unused
by the CPU and TPU backends.

Sets (``GPU_FLAG_SETS``):

* ``none``: XLA's defaults (the default until a device run shows a set that is faster);
* ``tuned``: the single-GPU training flags of JAX's GPU performance guide: the latency-hiding
  scheduler, cuBLAS instead of Triton for plain GEMMs, double-buffered while loops (the
  ``nn.scan`` layer loop: lets layer i+1's parameter slice overlap layer i's compute).
"""

from __future__ import annotations

import os
import warnings

__all__ = ["GPU_FLAG_SETS", "apply"]

GPU_FLAG_SETS: dict[str, tuple[str, ...]] = {
    "none": (),
    "tuned": (
        "--xla_gpu_enable_latency_hiding_scheduler=true",
        "--xla_gpu_enable_triton_gemm=false",
        "--xla_gpu_enable_while_loop_double_buffering=true",
    ),
}


def apply(name: str = "none") -> list[str]:
    """Appends the flags of set ``name`` to ``XLA_FLAGS`` (those the user has not set); returns them."""
    if name not in GPU_FLAG_SETS:
        raise ValueError(f"unknown XLA GPU flag set {name!r}; known: {', '.join(GPU_FLAG_SETS)}")
    current = os.environ.get("XLA_FLAGS", "").split()
    have = {f.split("=")[0] for f in current}
    added = [f for f in GPU_FLAG_SETS[name] if f.split("=")[0] not in have]
    if not added:
        return []
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        warnings.warn(
            f"XLA GPU flags {added} set after the backend started: they take effect in a new process", stacklevel=2
        )
    os.environ["XLA_FLAGS"] = " ".join(current + added)
    return added
