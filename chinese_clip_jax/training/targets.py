"""Compile targets: TPU topologies and NVIDIA GPUs this host may lack, as compile-only devices.

``TARGET`` (``ccj-train --compile-only --target``): a TPU topology as libtpu names it,
``v5p:2x2x1``, ``v5e:16x16``, ``v6e:8x8``, ``v4:2x2x2`` (``,slices=N`` for N slices over the
data-centre network: the ``data`` mesh axis then spans them), or ``KIND:N``, N NVIDIA GPUs of a
kind whose description ships in ``chinese_clip_jax/assets/gpu_targets`` (``h100``, ``h200``,
``a100-80g``, ``a100-40g``: XLA's published ``GpuTargetConfigProto`` specs, trimmed to the fields
jaxlib 0.10.2 parses). TPU needs ``libtpu`` (extra ``[tpu-compile]``), GPU the CUDA plugin
(extra ``[cuda-compile]``); a missing one is an ``ImportError`` naming the extra.

Memory a program may use per device: TPU, what the compiler itself reports as available HBM
(read from its refusal of a 1 TiB program); GPU, the description's memory x jax's allocator
fraction (``XLA_PYTHON_CLIENT_MEM_FRACTION``, default 0.75).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
from importlib import resources

__all__ = [
    "GiB",
    "TPU_HBM_GIB",
    "GPU_MEM_FRACTION",
    "Target",
    "gpu_target_names",
    "gpu_target_config",
    "parse_target",
    "open_target",
    "local_target",
    "hbm_refusal",
]

GiB = 1024**3
# Nominal HBM per chip (the vendor's figure, for the printout; fit uses what the compiler reports).
TPU_HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
GPU_MEM_FRACTION = 0.75  # jax's default share of a GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION)
_GPU_ASSETS = "gpu_targets"
_TPU_TARGET = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})(?:,slices=(\d+))?$")
_GPU_TARGET = re.compile(r"^([a-z0-9-]+):(\d+)$")
_TEMPS = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)")
_USED = re.compile(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm")


def _gpu_assets():
    return resources.files("chinese_clip_jax").joinpath("assets").joinpath(_GPU_ASSETS)


def gpu_target_names() -> list[str]:
    """The GPU kinds whose target description ships with the package."""
    files = _gpu_assets().iterdir()
    return sorted(f.name[: -len(".txtpb")] for f in files if f.name.endswith(".txtpb"))


def gpu_target_config(kind: str) -> str:
    """The ``GpuTargetConfigProto`` text of GPU ``kind`` (``gpu_target_names``)."""
    if kind not in gpu_target_names():
        raise ValueError(f"unknown GPU kind {kind!r}: known {', '.join(gpu_target_names())}")
    return _gpu_assets().joinpath(f"{kind}.txtpb").read_text()


def _gpu_memory_bytes(text: str) -> int:
    return int(re.search(r"device_memory_size:\s*(\d+)", text).group(1))


@dataclasses.dataclass
class Target:
    """A compile target: its platform, compile-only devices and the memory XLA may use per device."""

    name: str
    platform: str  # "tpu" | "cuda"
    devices: list
    usable_bytes: int  # per device: what the program may use
    chip_note: str  # e.g. "TPU v5p, 95 GiB HBM per chip; XLA reports 95.74 GiB available per device"
    compiler_options: dict = dataclasses.field(default_factory=dict)
    device_bytes: int = 0  # per device, all of it (GPU: beyond jax's allocator fraction); 0: usable_bytes


def parse_target(text: str) -> tuple[str, str, str, int]:
    """``"v5p:2x2x1"`` -> ("tpu", "v5p", "2x2x1", slices); ``"h100:8"`` -> ("cuda", "h100", "", 8)."""
    m = _TPU_TARGET.match(text)
    if m:
        return "tpu", m.group(1), m.group(2), int(m.group(3) or 1)
    m = _GPU_TARGET.match(text)
    if m and m.group(1) in gpu_target_names() and int(m.group(2)) >= 1:
        return "cuda", m.group(1), "", int(m.group(2))
    raise ValueError(
        f"--target {text!r}: expected a TPU topology (v4|v5e|v5p|v6e:AxB[xC][,slices=N], e.g. v5p:2x2x1) or "
        f"GPU:N with GPU one of {', '.join(gpu_target_names())} (e.g. h100:8)"
    )


@contextlib.contextmanager
def _quiet_stderr():
    """libtpu prints Cloud-TPU metadata warnings (no TPU VM here) straight to fd 2 when it loads."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _tpu_available_bytes(device) -> int:
    """The HBM the TPU compiler lets one program use on ``device``: read from its own refusal of a
    program that cannot fit (a 1 TiB temporary)."""
    import jax
    import jax.numpy as jnp

    sharding = jax.sharding.SingleDeviceSharding(device)
    x = jax.ShapeDtypeStruct((256, 1024, 1024, 1024), jnp.float32, sharding=sharding)
    try:
        jax.jit(lambda a: (a * 2).sum(0), out_shardings=sharding).lower(x).compile()
    except Exception as e:  # noqa: BLE001 - the compiler's RESOURCE_EXHAUSTED
        refusal = hbm_refusal(str(e))
        if refusal:
            return refusal[1]
        raise
    raise RuntimeError("the TPU compiler accepted a 1 TiB program: cannot tell its HBM")


def _to_bytes(value: str, unit: str) -> float:
    return float(value) * 1024 ** "BKMGT".index(unit)


def open_target(text: str) -> Target:
    """The compile-only devices of ``text`` (``parse_target``), loading libtpu or the CUDA plugin;
    a missing one is an ``ImportError`` naming the extra to install."""
    import jax
    from jax._src import xla_bridge
    from jax.experimental import topologies

    platform, kind, topology, n = parse_target(text)
    if not xla_bridge.backends_are_initialized() and not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")  # this host's own backend: no TPU / GPU start-up
    if platform == "tpu":
        try:
            import libtpu  # noqa: F401
        except ImportError:
            raise ImportError("compiling for TPU needs libtpu: pip install 'chinese-clip-jax[tpu-compile]'") from None
        # no chip is opened: several compiling processes may share libtpu (its lockfile guards chips)
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        extra = {"num_slices": n} if n > 1 else {}
        with _quiet_stderr():
            devices = topologies.get_topology_desc(topology_name=f"{kind}:{topology}", platform="tpu", **extra).devices
        usable = _tpu_available_bytes(devices[0])
        chip = devices[0].device_kind
        note = (
            f"{chip} ({kind}), {TPU_HBM_GIB[kind]} GiB HBM per chip; the compiler allows "
            f"{usable / GiB:.2f} GiB per device ({len(devices)} devices)"
        )
        return Target(text, "tpu", list(devices), usable, note)
    try:
        import jax_plugins.xla_cuda12  # noqa: F401
    except ImportError:
        raise ImportError(
            "compiling for NVIDIA GPUs needs the CUDA plugin: pip install 'chinese-clip-jax[cuda-compile]'"
        ) from None
    description = gpu_target_config(kind)
    devices = topologies.get_topology_desc(
        platform="cuda", topology_name=kind, topology=f"1x1x{n}", target_config=description
    ).devices
    hbm = _gpu_memory_bytes(description)
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEM_FRACTION))
    note = (
        f"{devices[0].device_kind}, {hbm / GiB:.2f} GiB; jax's allocator may use {fraction:g} of it "
        f"(XLA_PYTHON_CLIENT_MEM_FRACTION) = {hbm * fraction / GiB:.2f} GiB per device ({n} devices)"
    )
    return Target(text, "cuda", list(devices), int(hbm * fraction), note, device_bytes=hbm)


def local_target() -> Target | None:
    """This host's accelerators as a ``Target`` (all devices of the run; usable bytes per device
    from the device's own ``memory_stats()["bytes_limit"]``, the least over devices), for the
    trainer's ``accum_steps="auto"``; None on CPU or where the devices do not report a limit."""
    import jax

    devices = jax.devices()
    platform = devices[0].platform
    if platform == "cpu":
        return None
    limits = [(d.memory_stats() or {}).get("bytes_limit") for d in jax.local_devices()]
    if not all(limits):
        return None
    if platform == "gpu":
        platform = "rocm" if "rocm" in str(getattr(devices[0].client, "platform_version", "")).lower() else "cuda"
    usable = min(int(x) for x in limits)
    kind = devices[0].device_kind
    note = f"{kind}, {usable / GiB:.2f} GiB usable per device (memory_stats) ({len(devices)} devices)"
    return Target(f"{len(devices)} x {kind}", platform, list(devices), usable, note)


def hbm_refusal(message: str) -> tuple[int, int, bool] | None:
    """(bytes needed, bytes available, whether "needed" counts the temporaries alone) from the TPU
    compiler's out-of-memory message; None for any other error."""
    if "RESOURCE_EXHAUSTED" not in message:
        return None
    m = _TEMPS.search(message) or _USED.search(message)
    if not m:
        return None
    need, have = _to_bytes(m.group(1), m.group(2)), _to_bytes(m.group(3), m.group(4))
    return int(need), int(have), m.re is _TEMPS
