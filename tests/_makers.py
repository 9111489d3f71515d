"""The test suite's makers: paths, tiny images and data files, metrics read back, subprocess runners.

The single home of these helpers (``tests/test_suite_layout.py`` fails when two test files define
the same top-level helper). Tiny models, optimizer settings and batches are in
``_train_helpers.py`` (the subprocess scripts import those too); fixtures that share one built
thing across tests (a saved model, a trained workdir) are in ``conftest.py``. Test modules import
this one by its plain name: pytest puts ``tests/`` on ``sys.path`` (``pythonpath`` in
pyproject.toml), and the scripts run as ``python tests/_x.py`` have it as ``sys.path[0]``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
import types

import numpy as np

TESTS = os.path.dirname(os.path.abspath(__file__))  # tests/, where the subprocess scripts are
REPO = os.path.dirname(TESTS)  # the checkout: train/, convert/, bench/, docs/


# -- images ----------------------------------------------------------------------------------------


def random_rgb(seed, h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8 noise from ``seed`` (an int, or a ``np.random.Generator`` that it advances)."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def encode_image(rgb: np.ndarray, fmt: str, **save_kw) -> bytes:
    import PIL.Image

    buf = io.BytesIO()
    PIL.Image.fromarray(rgb).save(buf, format=fmt, **save_kw)
    return buf.getvalue()


def png(seed, h: int = 20, w: int = 24) -> bytes:
    """A PNG of ``random_rgb(seed, h, w)``, or of ``seed`` itself when it is an (h, w, 3) array."""
    rgb = seed if isinstance(seed, np.ndarray) else random_rgb(seed, h, w)
    return encode_image(rgb, "PNG")


def jpeg(seed, h: int = 30, w: int = 40, quality: int = 90) -> bytes:
    """A JPEG (``quality``) of ``random_rgb(seed, h, w)``."""
    return encode_image(random_rgb(seed, h, w), "JPEG", quality=quality)


def decoded(data: bytes) -> np.ndarray:
    """Encoded image bytes -> (h, w, 3) uint8 RGB, as PIL decodes them."""
    import PIL.Image

    return np.asarray(PIL.Image.open(io.BytesIO(data)).convert("RGB"))


def normalize(x) -> np.ndarray:
    """Rows scaled to unit L2 norm, in float64 (the reference for normalized features)."""
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# -- data files ------------------------------------------------------------------------------------


def write_tar(path, members) -> None:
    """A plain tar (webdataset shard) of ``[(name, bytes), ...]`` in that order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def read_tfds(out, split: str = "train"):
    """A prepared TFDS directory -> (its builder, the split's records in order)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(out))
    ds = builder.as_data_source(split)
    return builder, [ds[i] for i in range(len(ds))]


def write_cn_clip_split(root, n_good: int = 6):
    """A cn_clip ``train`` split (``train_imgs.tsv`` + ``train_texts.jsonl``) under ``root``:
    n_good pairs (one caption lists 2 images), 1 bad-base64 image, 1 caption naming a missing image,
    1 empty caption. Returns [(text, image bytes, image_id, text_id)] of the good pairs."""
    import base64

    images = {i: jpeg(i) for i in range(n_good - 1)}
    lines = [f"{i}\t{base64.urlsafe_b64encode(b).decode()}" for i, b in images.items()]
    lines.append("77\t!!!not base64###")
    (root / "train_imgs.tsv").write_text("\n".join(lines) + "\n")
    caps = [(10 + i, f"第{i}张图", [i]) for i in range(n_good - 2)] + [(20, "两张图", [n_good - 2, 0])]
    caps += [(30, "坏图", [77]), (31, "不存在", [999]), (32, "  ", [1])]
    with open(root / "train_texts.jsonl", "w", encoding="utf-8") as f:
        for tid, text, ids in caps:
            f.write(json.dumps({"text_id": tid, "text": text, "image_ids": ids}, ensure_ascii=False) + "\n")
    return [(t, images[i], str(i), str(tid)) for tid, t, ids in caps[: n_good - 1] for i in ids]


# -- a run's outputs -------------------------------------------------------------------------------


def logged_losses(workdir) -> list[tuple[int, float]]:
    """``[(step, train/loss), ...]`` in the order metrics.jsonl holds them (a step logged twice shows twice)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]


def losses_by_step(workdir) -> dict[int, float]:
    """``{step: train/loss}`` from the workdir's metrics.jsonl (later lines win: a resumed run re-logs)."""
    by_step = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "train/loss" in rec:
                by_step[rec["step"]] = rec["train/loss"]
    return by_step


# -- subprocesses ----------------------------------------------------------------------------------


def script_env(*paths: str, **extra) -> dict:
    """os.environ with the checkout (and ``paths`` before it) on PYTHONPATH, plus ``extra``."""
    env = dict(os.environ, **{k: str(v) for k, v in extra.items()})
    env["PYTHONPATH"] = os.pathsep.join([*paths, REPO, *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def run_script(name: str, timeout: int, **env) -> dict:
    """Runs tests/NAME in a subprocess (repo on PYTHONPATH, ``env`` added) -> its last ``RESULT {json}``."""
    proc = subprocess.run(
        [sys.executable, os.path.join(TESTS, name)],
        capture_output=True,
        text=True,
        env=script_env(**env),
        timeout=timeout,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


def run_module(module: str, *args, limit_bytes: int | None = None, env: dict | None = None):
    """``python -m module args`` in the checkout; with limit_bytes, under a file-size limit the child
    sets itself (writes past it fail with EFBIG), not a preexec_fn: forking this multithreaded (jax)
    process to run Python before exec can deadlock."""
    if limit_bytes:
        launch = (
            "import resource, runpy, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, {limit_bytes}))\n"
            f"sys.argv = [{module!r}] + sys.argv[1:]\n"
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
        )
        argv = [sys.executable, "-c", launch, *map(str, args)]
    else:
        argv = [sys.executable, "-m", module, *map(str, args)]
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def run_convert(*args):
    """``python -m convert args`` in the checkout."""
    return run_module("convert", *args)


def one_line_error(result, *, only_line: bool = False) -> str:
    """The ``error: ...`` line of a command that exited 2 with no traceback; ``only_line``: and
    nothing else on stderr."""
    assert result.returncode == 2, result.stderr[-2000:]
    if only_line:
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    else:
        lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


# -- small data sets and output folders ------------------------------------------------------------


def write_images(root, n: int, bad: bool = True) -> list[str]:
    """imgs/0.png ... imgs/{n-1}.png (+ imgs/bad.png, not an image); returns the relative paths."""
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        (root / "imgs" / f"{i}.png").write_bytes(png(i))
        names.append(f"imgs/{i}.png")
    if bad:
        (root / "imgs" / "bad.png").write_bytes(b"not an image")
    return names


def write_csv(path, rows, header=("image", "caption"), delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)


def file_digests(d) -> dict:
    """{file name: sha256} of the files directly in ``d``."""
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def copy_files(src, dst):
    """A copy of the files directly in ``src`` into a new folder ``dst``; returns ``dst``."""
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def free_port() -> int:
    """A free TCP port on the loopback address."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def embed_env(devices: int = 1) -> dict:
    """The environment of a ``ccj-embed`` subprocess: the checkout, the CPU, ``devices`` devices."""
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def run_embed(*args, devices: int = 1, **kw):
    """``python -m chinese_clip_jax.embed args`` on ``devices`` CPU devices."""
    cmd = [sys.executable, "-m", "chinese_clip_jax.embed", *map(str, args)]
    return subprocess.run(cmd, env=embed_env(devices), capture_output=True, text=True, timeout=300, **kw)


# -- reference code --------------------------------------------------------------------------------


def import_cn_clip_model():
    """cn_clip's own model code; its clip/utils.py imports torchvision, which we stub."""
    if "torchvision" not in sys.modules:
        tv = types.ModuleType("torchvision")
        tv.transforms = types.ModuleType("torchvision.transforms")
        for name in (
            "Compose",
            "ToTensor",
            "Normalize",
            "Resize",
            "InterpolationMode",
            "CenterCrop",
            "RandomResizedCrop",
        ):
            setattr(tv.transforms, name, object)
        sys.modules["torchvision"] = tv
        sys.modules["torchvision.transforms"] = tv.transforms
    from cn_clip.clip import model as cn_model

    return cn_model
