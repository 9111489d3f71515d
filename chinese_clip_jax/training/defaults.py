"""Per-platform run defaults: the one place the trainer, ``bench/lower.py`` and ``bench/device.py``
decide how a train step runs when the config leaves it to the platform.

Five choices, each a config key whose value ``"auto"`` (the default in ``train/configs/base.py``;
``model.attention_impl`` also takes "") means "the platform's":

========  ==========  ==========================  ===============  ==========  ===========
platform  ``dtype``   ``model.attention_impl``    ``scan_layers``  ``rng_impl``  ``remat``
========  ==========  ==========================  ===============  ==========  ===========
cpu       float32     None (head-major XLA)       True (scanned)   threefry    "dots"
cuda      bfloat16    "cudnn" ("xla" for fp32)    False (unrolled) rbg         "none"
rocm      bfloat16    "xla"                       False (unrolled) rbg         "none"
tpu       bfloat16    "xla"                       True (scanned)   rbg         "dots"
========  ==========  ==========================  ===============  ==========  ===========

``dtype`` is the compute dtype (params stay fp32); cuDNN's fused attention takes fp16/bf16 only,
so an explicit ``dtype="float32"`` on cuda gets XLA attention.

Why each (the evidence is in docs/accelerators.md): cuDNN's fused attention keeps no (seq x seq)
scores for the backward pass and lowers in both towers (odd image lengths padded,
``modeling.layers.padded_attention``); unrolled layers were 33% faster than ``nn.scan`` on an
H100 and lower with no while loop; rbg draws dropout bits with one ``rng_bit_generator`` per
mask instead of a threefry hash per bit; without (seq x seq) residuals "none" fits base at batch
256 on an 80 GB GPU and recomputes nothing, and where remat is on, its policies keep the dropout
masks (``modeling.layers.REMAT_POLICIES``), so no random bit is drawn twice. CPU keeps the
configuration its benchmarks chose (docs/performance.md). An explicit value in the config
always wins over the table.
"""

from __future__ import annotations

import dataclasses
import json

import jax

__all__ = ["PLATFORMS", "FIELDS", "RunOptions", "platform_defaults", "resolve_run_options", "current_platform"]

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
AUTO = ("auto", "")

FIELDS = ("dtype", "attention_impl", "scan_layers", "rng_impl", "remat")
_TABLE = {
    #        dtype, attention_impl, scan_layers, rng_impl, remat
    "cpu": ("float32", None, True, "threefry", "dots"),
    "cuda": ("bfloat16", "cudnn", False, "rbg", "none"),
    "rocm": ("bfloat16", "xla", False, "rbg", "none"),
    "tpu": ("bfloat16", "xla", True, "rbg", "dots"),
}
_WHY = {
    "cpu": "the CPU benchmarks' choice (docs/performance.md)",
    "cuda": "fused cuDNN attention, unrolled layers, RngBitGenerator dropout, no remat (docs/accelerators.md)",
    "rocm": "as cuda, with XLA attention (cuDNN is NVIDIA's)",
    "tpu": "XLA attention (splash: more temporaries, speed unmeasured), scanned layers, RngBitGenerator dropout",
}


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How the train step runs: the model options and the dropout bit generator, resolved.

    ``source`` says, per field, "config" (the user's value) or "auto" (this module's table)."""

    platform: str
    dtype: str
    attention_impl: str | None
    scan_layers: bool
    rng_impl: str
    remat: str
    source: dict

    def model_options(self) -> dict:
        """Keyword arguments of ``ChineseCLIPModel`` (``attention_impl``, ``scan_layers``, ``remat``)."""
        return dict(attention_impl=self.attention_impl, scan_layers=self.scan_layers, remat=self.remat)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line per choice, as printed at start-up."""
        lines = [f"run options for {self.platform} ({_WHY[self.platform]}):"]
        for key in FIELDS:
            value = getattr(self, key)
            shown = "xla-head-major (CPU)" if key == "attention_impl" and value is None else value
            lines.append(f"  {key} = {shown!r} ({'set in the config' if self.source[key] == 'config' else 'auto'})")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=1, sort_keys=True)


def current_platform() -> str:
    """The platform of the default backend: "cpu", "cuda", "rocm" or "tpu"."""
    backend = jax.default_backend()
    if backend == "gpu":
        version = jax.devices()[0].client.platform_version.lower()
        return "rocm" if "rocm" in version else "cuda"
    return backend


def platform_defaults(platform: str) -> dict:
    """The table's row for ``platform``: dtype, attention_impl, scan_layers, rng_impl, remat."""
    if platform not in _TABLE:
        raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
    return dict(zip(FIELDS, _TABLE[platform]))


def _is_auto(value) -> bool:
    return value is None or (isinstance(value, str) and value.lower() in AUTO)


def resolve_run_options(config, platform: str | None = None) -> RunOptions:
    """The run options of a trainer ``config`` (``dtype``, ``model.attention_impl``, ``model.scan_layers``,
    ``model.remat``, ``rng_impl``) on ``platform`` (None: the default backend's, ``current_platform``).

    "auto" (and "" for attention) takes the platform's default; other values are the user's and
    pass through ("true"/"false" strings of a command line become bools; remat True/False become
    "full"/"none")."""
    platform = current_platform() if platform is None else platform
    table = platform_defaults(platform)
    given = {
        "dtype": config.dtype,
        "attention_impl": config.model.attention_impl,
        "scan_layers": config.model.scan_layers,
        "rng_impl": config.rng_impl,
        "remat": config.model.remat,
    }
    out, source = {}, {}
    for key, value in given.items():
        auto = _is_auto(value) and not (key == "remat" and value == "")  # remat "" means off
        out[key] = table[key] if auto else value
        source[key] = "auto" if auto else "config"
    if out["attention_impl"] == "cudnn" and source["attention_impl"] == "auto" and out["dtype"] == "float32":
        out["attention_impl"] = "xla"  # cuDNN's fused attention takes fp16 / bf16 only
    if isinstance(out["scan_layers"], str):
        out["scan_layers"] = out["scan_layers"].lower() == "true"
    remat = out["remat"]
    if isinstance(remat, str) and remat.lower() in ("true", "false", "none"):
        remat = remat.lower() == "true"
    if remat is True:
        remat = "full"
    if remat in (False, None, ""):
        remat = "none"
    out["remat"] = remat
    return RunOptions(platform=platform, source=source, **out)
