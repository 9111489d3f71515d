"""Readers for PyTorch-side checkpoint files, one tensor at a time (memory-mapped where possible).

``open_tensors(path)`` gives a ``TensorSource``: ``names()``, ``shape(name)`` and ``get(name)`` (a
float32 numpy array). Supported: a single ``*.safetensors``, a sharded ``*.safetensors.index.json``,
``pytorch_model.bin`` (and its sharded index), and cn_clip ``.pt`` files (``{"state_dict": ...}``,
optional ``module.`` prefix). Torch pickles are read with ``torch.load(weights_only=True)``: a pickle
that would run code is refused, never run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the architecture; the message says why."""


class TensorSource:
    def __init__(self, path: str):
        self.path = path

    def names(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def is_float(self, name: str) -> bool:
        """Whether the stored tensor has a floating-point dtype (weights must)."""
        raise NotImplementedError


class SafetensorsSource(TensorSource):
    """One or several safetensors files. Each ``get`` opens the file, copies one tensor out and
    closes it again, so no memory map of the whole checkpoint stays resident."""

    def __init__(self, path: str, files: Iterable[str]):
        super().__init__(path)
        self._where: dict[str, str] = {}
        self._meta: dict[str, tuple[str, tuple[int, ...]]] = {}
        for file in files:
            if not os.path.isfile(file):
                raise CheckpointError(f"shard listed in {path} does not exist: {file}")
            try:
                with self._open(file) as handle:
                    for k in handle.keys():
                        sl = handle.get_slice(k)
                        self._where[k] = file
                        self._meta[k] = (sl.get_dtype(), tuple(sl.get_shape()))
            except Exception as e:
                raise CheckpointError(f"{file} is truncated or not a safetensors file ({e})") from None

    @staticmethod
    def _open(file: str, framework: str = "numpy"):
        from safetensors import safe_open

        return safe_open(file, framework=framework)

    def names(self):
        return list(self._where)

    def shape(self, name):
        return self._meta[name][1]

    def is_float(self, name):
        return self._meta[name][0].startswith(("F", "BF"))

    def get(self, name):
        file = self._where[name]
        # numpy has no bf16/fp8: those are read through jax and upcast
        framework = "flax" if self._meta[name][0] in ("BF16", "F8_E4M3", "F8_E5M2") else "numpy"
        try:
            with self._open(file, framework) as handle:
                return np.asarray(handle.get_tensor(name), dtype=np.float32)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {file}: {e}") from None


class TorchSource(TensorSource):
    """A torch pickle (``.bin``/``.pt``), loaded with ``weights_only=True`` and ``mmap``."""

    def __init__(self, path: str, files: Iterable[str] | None = None):
        super().__init__(path)
        self._tensors = {}
        for file in files or [path]:
            self._tensors.update(_torch_state_dict(file))

    def names(self):
        return list(self._tensors)

    def shape(self, name):
        return tuple(self._tensors[name].shape)

    def get(self, name):
        return self._tensors[name].detach().float().numpy()

    def is_float(self, name):
        return self._tensors[name].is_floating_point()


def _torch_state_dict(file: str) -> dict:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"reading {file} needs torch (pip install 'chinese-clip-jax[torch]'), or convert it to safetensors"
        ) from None
    if not os.path.isfile(file):
        raise FileNotFoundError(f"checkpoint file not found: {file}")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=_is_zip(file))
    except Exception as e:
        text = str(e)
        if "weights_only" in text or "Unsupported global" in text or "Unpickler" in text:
            raise CheckpointError(
                f"refusing to load {file}: its pickle would import or run code, which weights_only "
                "loading forbids. Convert it to safetensors in an environment you trust."
            ) from None
        raise CheckpointError(
            f"{file} is truncated or not a torch checkpoint ({type(e).__name__}: {text[:200]})"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{file} does not hold a state dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _is_zip(file: str) -> bool:
    with open(file, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


HF_WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


def _index_files(index_path: str) -> list[str]:
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{index_path} is not a valid sharded-checkpoint index ({e})") from None
    root = os.path.dirname(os.path.abspath(index_path))
    real_root = os.path.realpath(root)
    files = []
    for f in dict.fromkeys(weight_map.values()):
        path = os.path.join(root, f)
        if not isinstance(f, str) or os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
            raise CheckpointError(f"{index_path} names shard {f!r} outside its directory; refusing to read it")
        files.append(path)
    return files


def open_tensors(path: str) -> TensorSource:
    """A weights file (or an index of shards) -> TensorSource."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors.index.json"):
        return SafetensorsSource(path, _index_files(path))
    if path.endswith(".safetensors"):
        return SafetensorsSource(path, [path])
    if path.endswith(".bin.index.json"):
        return TorchSource(path, _index_files(path))
    return TorchSource(path)


def find_hf_weights(directory: str) -> str | None:
    for name in HF_WEIGHT_FILES:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return candidate
    return None
