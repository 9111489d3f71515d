"""Loading any published Chinese-CLIP checkpoint into Flax params: source detection and reading.

``from_pretrained(src)`` accepts: a HF checkpoint directory (``model.safetensors``, a sharded index,
or ``pytorch_model.bin``), a hub id (downloaded with huggingface_hub when online), an original
cn_clip ``.pt`` file (architecture from ``arch=`` or inferred from its shapes), or a directory
written by ``python -m convert`` (Orbax params + ``config.json``). Checking lives in ``check``,
writing in ``write``.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..io import resolve_local_or_hub
from ..modeling import ChineseCLIPModel
from ..modeling.config import ChineseCLIPConfig
from ..modeling.layers import resolve_scan_layers
from . import mapping
from .check import check_params, check_source_names, expected_hf_shapes
from .sources import HF_WEIGHT_FILES, CheckpointError, TensorSource, find_hf_weights, open_tensors
from .write import FLAX_PARAMS_DIR

HUB_FILES = [
    "config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model.bin*",
    "vocab.txt",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer*",
    "special_tokens_map.json",
]


def _is_cn_clip(names) -> bool:
    return any(n.startswith("visual.") for n in names) and any(n.startswith("bert.") for n in names)


class Loaded(NamedTuple):
    config: ChineseCLIPConfig
    params: dict  # Flax params as fp32 jax arrays, unscanned (or as stored, for "flax")
    kind: str  # "flax", "hf" or "cn_clip"
    directory: str | None  # the checkpoint's directory (its vocab / preprocessor_config.json live there)


def hf_to_flax(source: TensorSource, cfg: ChineseCLIPConfig, rename: dict | None = None) -> dict:
    """HF-named tensors -> unscanned Flax params (fp32 jax arrays). Checks names and shapes first.

    Tensors are read, transformed and placed one at a time, so peak memory stays near the size of
    the params (run under ``JAX_PLATFORMS=cpu`` to keep them in host memory).

    ``rename`` maps HF names to a list of ``(source_name, op, part)`` for sources in another layout
    (cn_clip); by default each HF name is read as is.
    """
    rows = mapping.table(cfg)
    expected = expected_hf_shapes(cfg)  # HF shapes of every row, traced once per config
    if rename is None:
        rename = {n: [(n, "copy", None)] for n in set(source.names())}
    check_source_names(source, rows, rename)

    cache: dict[str, np.ndarray] = {}  # one fused cn_clip in_proj tensor, reused for q, k, v

    def read(hf_name: str) -> np.ndarray:
        ((src_name, op, part),) = rename[hf_name]
        if op == "split":
            if src_name not in cache:
                cache.clear()
                cache[src_name] = source.get(src_name)
            return np.split(cache[src_name], 3, axis=0)[part]
        x = source.get(src_name)
        return x.T if op == "transpose" else x

    params: dict = {}
    for row in rows:
        x = read(row.hf)
        want_hf = expected[row.hf]
        if tuple(x.shape) != want_hf:
            raise CheckpointError(
                f"{source.path}: tensor {row.hf!r} has shape {tuple(x.shape)}, the configured architecture "
                f"expects {want_hf}"
            )
        mapping.set_path(params, row.flax, jnp.asarray(row.transform.to_flax(x, row.num_heads)))
        del x
    return params


def load_params(src: str | os.PathLike, arch: str | None = None) -> Loaded:
    """Any supported source -> ``Loaded(config, params, kind, directory)``."""
    src = resolve_local_or_hub(src, HUB_FILES)
    if os.path.isdir(src):
        if os.path.isdir(os.path.join(src, FLAX_PARAMS_DIR)):
            cfg, params = ChineseCLIPConfig.from_pretrained(src), load_flax_params(src)
            try:
                check_params(params, cfg)
            except CheckpointError as e:
                raise CheckpointError(f"{src}: config.json and {FLAX_PARAMS_DIR}/ disagree: {e}") from None
            return Loaded(cfg, params, "flax", src)
        weights = find_hf_weights(src)
        if weights is None:
            raise CheckpointError(
                f"{src} holds no checkpoint: looked for {', '.join(HF_WEIGHT_FILES)} and a '{FLAX_PARAMS_DIR}/' "
                "Orbax directory"
            )
        cfg = ChineseCLIPConfig.from_pretrained(src)
        return Loaded(cfg, hf_to_flax(open_tensors(weights), cfg), "hf", src)
    source = open_tensors(src)
    if _is_cn_clip(source.names()):
        shapes = {n: source.shape(n) for n in source.names()}
        cfg = mapping.parse_cn_clip_arch(arch) if arch else mapping.infer_cn_clip_config(shapes)
        rename: dict[str, list] = {}
        for cn_name, targets in mapping.cn_clip_to_hf_names(source.names()).items():
            for hf_name, op, part in targets:
                rename[hf_name] = [(cn_name, op, part)]
        return Loaded(cfg, hf_to_flax(source, cfg, rename), "cn_clip", None)
    config_path = os.path.join(os.path.dirname(os.path.abspath(src)), "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{src} uses HF names but no config.json was found beside it ({config_path})")
    cfg = ChineseCLIPConfig.from_json_file(config_path)
    return Loaded(cfg, hf_to_flax(source, cfg), "hf", os.path.dirname(config_path))


def from_pretrained(
    src: str | os.PathLike,
    dtype: Any = jnp.float32,
    *,
    arch: str | None = None,
    scan_layers: bool | str = False,
    attention_impl: str | None = None,
    remat: bool | str = False,
    image_size: int | None = None,
    precision: str | None = None,
) -> tuple[ChineseCLIPModel, dict]:
    """Loads a checkpoint -> ``(model, params)``; params are fp32 jax arrays, ``dtype`` is compute.

    ``scan_layers``, ``attention_impl``, ``remat``, ``precision``: the model's run options
    (``ConfiguredModule``); ``precision="highest"`` gives fp32 parity with PyTorch on GPU/TPU, whose
    default matmul precision is lower (docs/accelerators.md). A checkpoint holding a
    ``logit_bias`` (a SigLIP-trained `python -m convert --to flax` directory) gives a model with one.
    ``image_size``: a ViT's resolution to run at (e.g. 336 for a 224 checkpoint); its position
    embeddings are resized once, as cn_clip's ``resize_pos_embed`` (``modeling.position.at_resolution``).
    """
    check_image_size(image_size)  # before any loading
    cfg, params, _, _ = load_params(src, arch)
    if image_size is not None:
        from ..modeling.position import at_resolution

        v = cfg.vision_config
        if not cfg.is_resnet and image_size % v.patch_size:
            low = max(v.patch_size, image_size // v.patch_size * v.patch_size)
            raise ValueError(
                f"image_size={image_size} is not a multiple of patch_size {v.patch_size} (the model's; "
                f"e.g. {low} or {low + v.patch_size})"
            )
        params, cfg = at_resolution(params, cfg, image_size)
    scan_layers = resolve_scan_layers(scan_layers)
    params = mapping.stack_layers(params) if scan_layers else mapping.unstack_layers(params)
    bias = float(params["logit_bias"]) if "logit_bias" in params else None
    model = ChineseCLIPModel(
        cfg,
        dtype=dtype,
        attention_impl=attention_impl,
        scan_layers=scan_layers,
        remat=remat,
        precision=precision,
        logit_bias_init=bias,
    )
    return model, params


def check_image_size(image_size) -> None:
    """``image_size`` of ``from_pretrained``: None (the checkpoint's) or an int >= 1 (pixels);
    anything else raises a ValueError naming the value. (Whether the model supports that size,
    a multiple of its patch size, is checked once the checkpoint's config is known.)"""
    if image_size is None:
        return
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(
            f"image_size must be an int >= 1 (pixels) or None for the checkpoint's own size, got {image_size!r}"
        )


def load_flax_params(path: str) -> dict:
    """The Orbax params of a ``python -m convert`` directory. A damaged one (a truncated or zeroed
    array file, missing metadata) raises one CheckpointError naming the file TensorStore could not
    read, Orbax's own tracebacks held back."""
    import orbax.checkpoint as ocp

    from ..io import quiet_orbax_failures

    target = os.path.join(os.path.abspath(path), FLAX_PARAMS_DIR)
    try:
        with quiet_orbax_failures(), ocp.StandardCheckpointer() as ckpt:
            params = ckpt.restore(target)
    except Exception as e:
        raise CheckpointError(
            f"cannot restore the Orbax params in {target}: {_restore_failure(e, target)}; the directory is damaged: "
            "convert the original checkpoint again (python -m convert SRC NEW_OUT)"
        ) from None
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)


def _restore_failure(e: BaseException, target: str) -> str:
    """The useful line of an Orbax restore failure: TensorStore's reason, which names the file
    (``Error reading local file ".../0.0": Truncated Zstd-compressed stream``), rather than Orbax's
    wrapper whose first line names only an array index; for a JSON error, the metadata file that
    does not parse."""
    import json
    import re

    if isinstance(e, ValueError) and type(e).__name__ == "JSONDecodeError":
        for root, _, files in os.walk(target):
            for name in sorted(files):
                if name.startswith("_") or name.endswith((".json", ".zarray")) or root.endswith("array_metadatas"):
                    path = os.path.join(root, name)
                    try:
                        with open(path, "rb") as f:
                            json.loads(f.read())
                    except (ValueError, OSError) as bad:
                        return f"{path} is not valid JSON ({type(bad).__name__}: {bad})"

    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for x in reversed(chain):  # the innermost error that names a file
        text = str(x).strip().splitlines()[0] if str(x).strip() else ""
        if '"/' in text or "'/" in text or "file" in text.lower():
            return text[:400]
    paths = re.findall(r"'path': '([^']+)'", str(chain[0]))
    head = str(chain[0]).strip().splitlines()[0][:200] if str(chain[0]).strip() else type(chain[0]).__name__
    return f"{head} ({paths[0]})" if paths else head
