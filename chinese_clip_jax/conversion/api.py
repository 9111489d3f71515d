"""Loading any published Chinese-CLIP checkpoint into Flax params, and writing them back.

``from_pretrained(src)`` accepts: a HF checkpoint directory (``model.safetensors``, a sharded index,
or ``pytorch_model.bin``), a hub id (downloaded with huggingface_hub when online), an original
cn_clip ``.pt`` file (architecture from ``arch=`` or inferred from its shapes), or a directory
written by ``python -m convert`` (Orbax params + ``config.json``).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ChineseCLIPConfig, parse_dtype
from ..hub import resolve_local_or_hub
from ..modeling import ChineseCLIPModel
from ..modeling.layers import resolve_scan_layers
from . import mapping
from .sources import HF_WEIGHT_FILES, CheckpointError, TensorSource, find_hf_weights, open_tensors

FLAX_PARAMS_DIR = "params"  # Orbax checkpoint inside a directory written by `python -m convert`
FLAX_META = "flax_checkpoint.json"
ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")


def expected_shapes(cfg: ChineseCLIPConfig) -> dict[str, tuple[int, ...]]:
    """Flax path (unscanned) -> param shape, from the model definition itself."""
    model = ChineseCLIPModel(cfg)
    v = cfg.vision_config
    shapes = jax.eval_shape(
        model.init,
        jax.random.key(0),
        jnp.zeros((1, 2), jnp.int32),
        jnp.zeros((1, v.num_channels, v.image_size, v.image_size), jnp.float32),
    )
    from flax import linen as nn

    return {k: tuple(x.shape) for k, x in mapping.flatten(nn.unbox(shapes["params"])).items()}


def hf_to_flax(source: TensorSource, cfg: ChineseCLIPConfig, rename: dict | None = None) -> dict:
    """HF-named tensors -> unscanned Flax params (fp32 jax arrays). Checks names and shapes first.

    Tensors are read, transformed and placed one at a time, so peak memory stays near the size of
    the params (run under ``JAX_PLATFORMS=cpu`` to keep them in host memory).

    ``rename`` maps HF names to a list of ``(source_name, op, part)`` for sources in another layout
    (cn_clip); by default each HF name is read as is.
    """
    rows = mapping.table(cfg)
    expected = expected_shapes(cfg)
    available = set(source.names())
    if rename is None:
        rename = {n: [(n, "copy", None)] for n in available}
    wanted = {r.hf for r in rows}
    missing = sorted(n for n in wanted if n not in rename)
    unexpected = sorted(n for n in rename if n not in wanted and not mapping.IGNORED_HF_KEYS.match(n))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                f"missing keys ({len(missing)}): {', '.join(missing[:30])}" + (" ..." if len(missing) > 30 else "")
            )
        if unexpected:
            parts.append(
                f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:30])}"
                + (" ..." if len(unexpected) > 30 else "")
            )
        raise CheckpointError(f"{source.path} does not match the configured architecture: " + "; ".join(parts))
    not_float = sorted({src for n in wanted for src, _, _ in rename[n] if not source.is_float(src)})
    if not_float:
        raise CheckpointError(
            f"{source.path}: weights must be floating point; {len(not_float)} tensors are not "
            f"(e.g. {not_float[0]!r}): an integer or bool checkpoint is not a model"
        )

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
        want = expected[row.flax]
        want_hf = tuple(jax.eval_shape(row.transform.to_hf, jax.ShapeDtypeStruct(want, jnp.float32)).shape)
        if tuple(x.shape) != want_hf:
            raise CheckpointError(
                f"{source.path}: tensor {row.hf!r} has shape {tuple(x.shape)}, the configured architecture "
                f"expects {want_hf}"
            )
        mapping.set_path(params, row.flax, jnp.asarray(row.transform.to_flax(x, row.num_heads)))
        del x
    return params


def check_params(params: dict, cfg: ChineseCLIPConfig) -> dict:
    """Checks names and shapes of Flax params (scanned or not) against ``cfg``; returns them flat
    and unscanned (views, no copies). Raises CheckpointError naming what differs."""
    flat = mapping.flatten(mapping.unstack_layers(params))
    expected = expected_shapes(cfg)
    expected.update({k: shape for k, shape in mapping.FLAX_ONLY.items() if k in flat})  # optional params
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    wrong = [
        f"{k} {tuple(flat[k].shape)} (expected {expected[k]})"
        for k in sorted(set(flat) & set(expected))
        if tuple(flat[k].shape) != expected[k]
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            "params do not match the config: "
            + "; ".join(
                f"{what} {', '.join(names[:20])}"
                for what, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                if names
            )
        )
    return flat


def iter_hf_tensors(flat: dict, cfg: ChineseCLIPConfig):
    """Yields ``(hf_name, fp32 numpy tensor)`` one at a time from ``check_params``' flat params."""
    for r in mapping.table(cfg):
        yield r.hf, np.asarray(r.transform.to_hf(np.asarray(flat[r.flax], np.float32)))


def flax_to_hf(params: dict, cfg: ChineseCLIPConfig) -> dict[str, np.ndarray]:
    """Flax params (scanned or not) -> HF-named numpy fp32 tensors (all in memory)."""
    return {name: np.array(x, order="C") for name, x in iter_hf_tensors(check_params(params, cfg), cfg)}


# --------------------------------------------------------------------------- locating sources

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


# Tokenizer and image-settings files carried over from the source checkpoint (transformers 4 and 5 names).
PROCESSOR_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",
)


def output_names(to: str) -> tuple[str, ...]:
    """Every name ``save_pretrained`` (``to="hf"``) or ``save_flax`` (``"flax"``) may create in its
    directory: ``python -m convert`` checks them all before any work, and never overwrites."""
    own = ("model.safetensors", "model.safetensors.tmp") if to == "hf" else (FLAX_PARAMS_DIR, FLAX_META)
    return own + ("config.json",) + PROCESSOR_FILES


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
    (``ModelOptions``); ``precision="highest"`` gives fp32 parity with PyTorch on GPU/TPU, whose
    default matmul precision is lower (docs/accelerators.md). A checkpoint holding a
    ``logit_bias`` (a SigLIP-trained `python -m convert --to flax` directory) gives a model with one.
    ``image_size``: a ViT's resolution to run at (e.g. 336 for a 224 checkpoint); its position
    embeddings are resized once, as cn_clip's ``resize_pos_embed`` (``modeling.position.at_resolution``).
    """
    cfg, params, _, _ = load_params(src, arch)
    if image_size:
        from ..modeling.position import at_resolution

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


# --------------------------------------------------------------------------- writers


def write_safetensors(path: str, tensors, dtype: str = "float32") -> None:
    """Streams ``(name, array)`` pairs into one safetensors file, converting one tensor at a time.

    Two passes over ``tensors`` (a callable returning a fresh iterator): shapes for the header,
    then the data. The file appears under ``path`` only once complete.
    """
    np_dtype = parse_dtype(dtype)
    tag = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[np.dtype(np_dtype).name]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, x in tensors():
        nbytes = int(np.prod(x.shape)) * np.dtype(np_dtype).itemsize
        header[name] = {"dtype": tag, "shape": list(x.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for _, x in tensors():
                f.write(np.ascontiguousarray(x.astype(np_dtype, copy=False)).reshape(-1).view(np.uint8).data)
        os.replace(tmp, path)  # never leave a half-written model.safetensors behind
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise OSError(f"writing {path} failed ({e.strerror or e}); its temporary file was removed") from None
        raise


def save_pretrained(
    path: str | os.PathLike,
    cfg: ChineseCLIPConfig,
    params: dict,
    dtype: str = "float32",
    processor_from: str | None = None,
) -> str:
    """Writes the HF layout (``config.json`` + ``model.safetensors`` + ``vocab.txt``) that
    ``transformers.ChineseCLIPModel.from_pretrained`` loads with no missing or unexpected keys."""
    path = os.fspath(path)
    if cfg.is_resnet:
        raise ValueError(
            "transformers has no ResNet (RN50) Chinese-CLIP: write this model as Flax (--to flax) "
            "or as a cn_clip .pt (--to pt), not in the HF layout"
        )
    flat = check_params(_unboxed(params), cfg)  # validate before touching the directory
    os.makedirs(path, exist_ok=True)
    write_safetensors(os.path.join(path, "model.safetensors"), lambda: iter_hf_tensors(flat, cfg), dtype)
    cfg.save(path)
    copy_processor_files(path, cfg, processor_from)
    return path


def copy_processor_files(path: str, cfg: ChineseCLIPConfig, source_dir: str | None) -> None:
    """Carries the checkpoint's own tokenizer/preprocessing files over (transformers 4's vocab.txt
    and preprocessor_config.json, transformers 5's tokenizer.json and processor_config.json). Where
    it has none: the bundled vocab, and transformers' default preprocessing at the model's image size."""
    for name in PROCESSOR_FILES:
        src = os.path.join(source_dir, name) if source_dir else None
        if src and os.path.isfile(src) and os.path.abspath(src) != os.path.abspath(os.path.join(path, name)):
            shutil.copyfile(src, os.path.join(path, name))
    if not any(os.path.exists(os.path.join(path, n)) for n in ("vocab.txt", "tokenizer.json")):
        shutil.copyfile(os.path.join(ASSETS, "vocab.txt"), os.path.join(path, "vocab.txt"))
    from ..image_settings import ImageSettings, read_image_settings

    if read_image_settings(path) is None:
        settings = ImageSettings.at_resolution(cfg.vision_config.image_size)
        with open(os.path.join(path, "preprocessor_config.json"), "w", encoding="utf-8") as f:
            json.dump(settings.to_dict(), f, indent=2)


def _unboxed(params: dict) -> dict:
    from flax import linen as nn

    return nn.unbox(params)


def save_flax(
    path: str | os.PathLike,
    cfg: ChineseCLIPConfig,
    params: dict,
    dtype: str = "float32",
    processor_from: str | None = None,
) -> str:
    """Writes an Orbax checkpoint of the params (``path/params``) plus ``config.json`` and ``vocab.txt``."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    params = _unboxed(params)
    check_params(params, cfg)
    target = os.path.join(path, FLAX_PARAMS_DIR)
    if os.path.exists(target):
        raise FileExistsError(f"{target} already exists; choose an empty output directory")
    np_dtype = parse_dtype(dtype)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, np_dtype), params)  # no copy if already so
    os.makedirs(path, exist_ok=True)
    # At most ~1 GB in flight and no OCDBT write buffer: peak memory stays near the size of the params.
    from ..failures import first_line, is_disk_full, quiet_orbax_failures

    try:
        with (
            quiet_orbax_failures(),
            ocp.Checkpointer(ocp.StandardCheckpointHandler(save_concurrent_gb=1, use_ocdbt=False)) as ckpt,
        ):
            ckpt.save(target, ocp.args.StandardSave(params))
    except BaseException as e:  # full disk, interrupted: no half-written params/ or Orbax temp dir left
        for name in os.listdir(path):
            if name == FLAX_PARAMS_DIR or name.startswith(FLAX_PARAMS_DIR + ".orbax-checkpoint-tmp"):
                shutil.rmtree(os.path.join(path, name), ignore_errors=True)
        if is_disk_full(e):
            raise OSError(
                f"writing {target} failed: disk full or file-size limit ({first_line(e, 160)}); "
                "its temporary files were removed"
            ) from None
        raise
    cfg.save(path)
    with open(os.path.join(path, FLAX_META), "w") as f:
        json.dump({"format": "chinese_clip_jax", "scan_layers": mapping.is_scanned(params), "dtype": dtype}, f)
    copy_processor_files(path, cfg, processor_from)
    return path


def load_flax_params(path: str) -> dict:
    import orbax.checkpoint as ocp

    target = os.path.join(os.path.abspath(path), FLAX_PARAMS_DIR)
    try:
        with ocp.StandardCheckpointer() as ckpt:
            params = ckpt.restore(target)
    except Exception as e:
        raise CheckpointError(f"cannot restore the Orbax params in {target}: {type(e).__name__}: {e}") from None
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
