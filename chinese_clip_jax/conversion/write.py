"""Writing Flax params out: the HF layout (``save_pretrained``), our Orbax directory (``save_flax``),
their tokenizer/preprocessing files, and the HF-named tensors (``iter_hf_tensors``, ``flax_to_hf``).

Every writer checks the params against the config (``check.check_params``) before touching the
directory, and never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..io import atomic_output
from ..modeling.config import ChineseCLIPConfig, parse_dtype
from . import mapping
from .check import check_params

FLAX_PARAMS_DIR = "params"  # Orbax checkpoint inside a directory written by `python -m convert`
FLAX_META = "flax_checkpoint.json"
ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")


def iter_hf_tensors(flat: dict, cfg: ChineseCLIPConfig):
    """Yields ``(hf_name, fp32 numpy tensor)`` one at a time from ``check_params``' flat params."""
    for r in mapping.table(cfg):
        yield r.hf, np.asarray(r.transform.to_hf(np.asarray(flat[r.flax], np.float32)))


def flax_to_hf(params: dict, cfg: ChineseCLIPConfig) -> dict[str, np.ndarray]:
    """Flax params (scanned or not) -> HF-named numpy fp32 tensors (all in memory)."""
    return {name: np.array(x, order="C") for name, x in iter_hf_tensors(check_params(params, cfg), cfg)}


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


def is_leftover(name: str) -> bool:
    """Whether ``name`` in an output directory is the unfinished temporary of an interrupted write:
    ``NAME.tmp`` (``write_safetensors``), ``NAME.tmpPID`` (``io.atomic_output``) or an Orbax
    ``*.orbax-checkpoint-tmp*`` directory. A run that finishes or fails renames or removes its own;
    one killed (SIGKILL, power loss) leaves them."""
    return re.search(r"\.tmp\d*$", name) is not None or ".orbax-checkpoint-tmp" in name


def leftovers_message(out: str, leftovers: list[str], flag: str) -> str:
    """The one line for an output directory holding only what an interrupted run left."""
    names = ", ".join(leftovers[:3]) + (f" and {len(leftovers) - 3} more" if len(leftovers) > 3 else "")
    return (
        f"{os.path.join(out, leftovers[0])}: an earlier run writing into {out} was interrupted (killed before "
        f"it finished) and left {names} unfinished; nothing there is complete: rerun with {flag} to delete "
        "them and write again, or delete them yourself"
    )


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
    try:
        with atomic_output(path) as f:  # never leave a half-written model.safetensors behind
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for _, x in tensors():
                f.write(np.ascontiguousarray(x.astype(np_dtype, copy=False)).reshape(-1).view(np.uint8).data)
    except BaseException as e:
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
    from ..processing.image_settings import ImageSettings, read_image_settings

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
    from ..io import first_line, is_disk_full, quiet_orbax_failures

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
