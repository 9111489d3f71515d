"""Hardening of the newer surfaces: image_size, saved image settings of another size, damaged Flax
and export directories, data.build's caption encodings and OUT, ccj-train's gs:// workdir, the
workdir lock after a container restart. Each bad input ends in one line naming the value or file
(exit 2 for the commands), before any work where that can be known, with nothing written or lost."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import transformers
from _train_helpers import tiny_config

import chinese_clip_jax as ccj
from chinese_clip_jax.conversion import CheckpointError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=REPO)
CFG = dict(vocab_size=21128, hidden=32, layers=1, max_positions=64, image_size=32, patch_size=8, projection_dim=16)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    import torch

    cfg = tiny_config(**CFG)
    torch.manual_seed(0)
    model = transformers.ChineseCLIPModel(transformers.ChineseCLIPConfig.from_dict(cfg.to_dict())).eval()
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    return path


def _run(*argv, env=ENV):
    return subprocess.run(
        [sys.executable, *map(str, argv)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


def _snapshot(path):
    return {
        os.path.relpath(os.path.join(r, f), path): open(os.path.join(r, f), "rb").read()
        for r, _, fs in os.walk(path)
        for f in fs
    }


# --------------------------------------------------------------------------- image_size


@pytest.mark.parametrize("value", [0, -32, 32.0, True, "64"])
def test_bad_image_size_is_refused_before_loading(hf_dir, value):
    for load in (ccj.from_pretrained, ccj.ChineseCLIP.from_pretrained):
        with pytest.raises(ValueError, match=rf"image_size must be an int >= 1 \(pixels\).*got {value!r}"):
            load(hf_dir, image_size=value)
        with pytest.raises(ValueError, match="image_size must be an int"):  # checked before the path is read
            load(hf_dir / "no-such-dir", image_size=value)


def test_image_size_not_a_multiple_of_the_patch_names_both(hf_dir):
    for load in (ccj.from_pretrained, ccj.ChineseCLIP.from_pretrained):
        with pytest.raises(ValueError, match=r"image_size=36 is not a multiple of patch_size 8 .*e\.g\. 32 or 40"):
            load(hf_dir, image_size=36)
    model, _ = ccj.from_pretrained(hf_dir, image_size=40)  # a multiple: accepted, at that size
    assert model.config.vision_config.image_size == 40


# --------------------------------------------------------------------------- saved image settings of another size


def test_saved_crop_of_another_size_is_refused_as_transformers_refuses_it(hf_dir, tmp_path):
    import torch

    d = tmp_path / "ckpt"
    shutil.copytree(hf_dir, d)
    settings = {"size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64}}
    settings.update(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.4], do_resize=True, do_center_crop=True)
    (d / "preprocessor_config.json").write_text(json.dumps(settings))
    # the reference: transformers' processor from this directory makes 64 px images, its model refuses them
    reference = transformers.ChineseCLIPImageProcessor.from_pretrained(d)
    image = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    pixels = reference(images=[image], return_tensors="np")["pixel_values"]
    assert pixels.shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="doesn't match model"), torch.no_grad():
        transformers.ChineseCLIPModel.from_pretrained(d).get_image_features(pixel_values=torch.tensor(pixels))
    with pytest.raises(ValueError) as e:
        ccj.ChineseCLIP.from_pretrained(d)
    message = str(e.value)
    assert message.startswith(f"{d / 'preprocessor_config.json'}: the processor makes 64x64 images but the model")
    assert "takes 32x32" in message and "pass image_size=64" in message and "\n" not in message
    # asked for: the model runs at 64 px and the file's settings are used as they are, pixels as transformers'
    clip = ccj.ChineseCLIP.from_pretrained(d, image_size=64)
    np.testing.assert_allclose(clip.processor(images=[image])["pixel_values"], pixels, atol=1e-5, rtol=0)
    assert clip.encode_image([image]).shape == (1, 16)
    # another size asked for: the file's normalization at that size
    clip = ccj.ChineseCLIP.from_pretrained(d, image_size=48)
    s = clip.processor.image_processor.settings
    assert clip.processor.image_size == (48, 48) and s.image_mean == (0.5, 0.4, 0.3) and s.image_std == (0.2, 0.3, 0.4)


# --------------------------------------------------------------------------- damaged Flax and export directories


@pytest.fixture(scope="module")
def flax_dir(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("flax") / "ckpt"
    cfg, params, _, _ = ccj.conversion.load_params(hf_dir)
    ccj.conversion.save_flax(out, cfg, params)
    return out


def test_truncated_largest_flax_params_file_is_one_line_naming_it(flax_dir, tmp_path):
    d = tmp_path / "damaged"
    shutil.copytree(flax_dir, d)
    files = [os.path.join(r, f) for r, _, fs in os.walk(d / "params") for f in fs]
    largest = max(files, key=os.path.getsize)
    os.truncate(largest, os.path.getsize(largest) // 2)
    result = _run("-m", "convert", d, tmp_path / "out", "--to", "hf")
    line = one_line_error(result)  # no "Event loop is closed", no "Exception ignored in <coroutine>"
    assert f'Error reading local file "{largest}"' in line and "Truncated" in line, line
    assert "python -m convert SRC NEW_OUT" in line
    assert not (tmp_path / "out").exists()


def test_truncated_orbax_metadata_is_named(flax_dir, tmp_path):
    d = tmp_path / "damaged"
    shutil.copytree(flax_dir, d)
    meta = d / "params" / "_METADATA"
    os.truncate(meta, 100)
    with pytest.raises(CheckpointError, match=f"{meta} is not valid JSON"):
        ccj.from_pretrained(d)


@pytest.fixture(scope="module")
def export_dir(flax_dir, tmp_path_factory):
    from chinese_clip_jax.conversion.export import save_exported

    cfg, params, _, _ = ccj.conversion.load_params(flax_dir)
    return save_exported(tmp_path_factory.mktemp("export") / "e", cfg, params, platforms=("cpu",))


@pytest.mark.parametrize(
    "name,reason",
    [
        ("text_features.jaxexport", "not a readable jax.export artefact"),
        ("image_features.jaxexport", "not a readable jax.export artefact"),
        ("params.safetensors", "not a readable safetensors file"),
        ("export.json", "not valid JSON"),
    ],
)
def test_truncated_export_file_is_named_with_the_command_that_rewrites_it(export_dir, tmp_path, name, reason):
    from chinese_clip_jax.export import load_exported

    d = tmp_path / "e"
    shutil.copytree(export_dir, d)
    os.truncate(d / name, os.path.getsize(d / name) // 2)
    with pytest.raises(ValueError) as e:
        load_exported(d)
    message = str(e.value)
    assert message.startswith(f"{d / name}: {reason}") and "\n" not in message, message
    assert message.endswith("write it again with `python -m convert SRC NEW_OUT --export`")


def test_export_params_of_another_shape_are_named(export_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    from chinese_clip_jax.export import load_exported

    d = tmp_path / "e"
    shutil.copytree(export_dir, d)
    ids = np.full((2, 52), 100, np.int32)
    want = np.asarray(load_exported(d).text(ids))  # the intact export loads and runs
    assert want.shape == (2, 16) and np.isfinite(want).all()
    params = load_file(d / "params.safetensors")
    params["logit_scale"] = np.zeros(3, np.float32)
    save_file(params, d / "params.safetensors")
    with pytest.raises(
        ValueError, match=r"params.safetensors does not hold the params .*'logit_scale' has shape \(3,\)"
    ):
        load_exported(d)


# --------------------------------------------------------------------------- data.build: encodings and OUT


def _jpeg(seed: int) -> bytes:
    import io

    import PIL.Image

    buf = io.BytesIO()
    rgb = (np.random.default_rng(seed).random((20, 24, 3)) * 255).astype(np.uint8)
    PIL.Image.fromarray(rgb).save(buf, format="JPEG")
    return buf.getvalue()


CAPTIONS = ["一只猫在沙发上", "两只狗", "红色的汽车"]


def _cn_clip_gbk(root):
    import base64

    root.mkdir()
    (root / "train_imgs.tsv").write_text(
        "".join(f"{i}\t{base64.urlsafe_b64encode(_jpeg(i)).decode()}\n" for i in range(len(CAPTIONS)))
    )
    lines = [
        json.dumps({"text_id": i, "text": t, "image_ids": [i]}, ensure_ascii=False) for i, t in enumerate(CAPTIONS)
    ]
    (root / "train_texts.jsonl").write_bytes(("\n".join(lines) + "\n").encode("gbk"))


def _texts(out):
    import tensorflow_datasets as tfds

    ds = tfds.builder_from_directory(str(out)).as_data_source("train")
    return sorted(ds[i]["text"].decode() for i in range(len(ds)))


def test_gbk_cn_clip_captions_are_named_then_read_with_encoding(tmp_path, capsys):
    pytest.importorskip("tensorflow_datasets")
    from chinese_clip_jax.data import build

    src, out = tmp_path / "src", tmp_path / "out"
    _cn_clip_gbk(src)
    assert build.main([str(src), str(out), "--format", "cn_clip", "--split", "train", "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    # GBK 一只猫 (d2bb d6bb c3a8) happen to be valid UTF-8 pairs; 在 (d4da) at offset 30 is the first that is not
    assert err == (
        f"error: cn_clip: {src / 'train_texts.jsonl'}:1: not valid utf-8 text (byte 0xd4 at offset 30); "
        "it reads as GBK: rerun with --encoding gbk"
    ), err
    assert not out.exists()  # stopped before any work
    assert build.main([str(src), str(out), "--format", "cn_clip", "--split", "train", "--encoding", "gbk"]) == 0
    assert _texts(out) == sorted(CAPTIONS)
    assert (
        build.main([str(src), str(tmp_path / "o2"), "--format", "cn_clip", "--split", "x", "--encoding", "klingon"])
        == 2
    )
    assert "--encoding 'klingon': unknown text encoding" in capsys.readouterr().err


def test_gbk_webdataset_captions_are_named_then_read_with_encoding(tmp_path, capsys):
    pytest.importorskip("tensorflow_datasets")
    import io

    from chinese_clip_jax.data import build

    shard, out = tmp_path / "00000.tar", tmp_path / "out"
    with tarfile.open(shard, "w") as tar:
        for i, text in enumerate(CAPTIONS):
            for name, data in ((f"{i:03d}.jpg", _jpeg(i)), (f"{i:03d}.txt", text.encode("gbk"))):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert build.main([str(shard), str(out), "--format", "webdataset", "--split", "train", "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: SRC") and f"{shard}:000.txt: not valid utf-8 text" in err, err
    assert "rerun with --encoding gbk" in err and not out.exists()
    assert build.main([str(shard), str(out), "--format", "webdataset", "--split", "train", "--encoding", "gbk"]) == 0
    assert _texts(out) == sorted(CAPTIONS)


def test_build_into_another_tfds_dataset_is_refused_before_any_work(tmp_path, capsys):
    tfds = pytest.importorskip("tensorflow_datasets")
    from tensorflow_datasets.core import dataset_info, file_adapters, naming
    from tensorflow_datasets.core import splits as splits_lib

    from chinese_clip_jax.data import build

    src, out = tmp_path / "src", tmp_path / "mnist"
    _cn_clip_gbk(src)
    out.mkdir()
    features = tfds.features.FeaturesDict(
        {"image": tfds.features.Image(shape=(28, 28, 1)), "label": tfds.features.ClassLabel(num_classes=10)}
    )
    identity = dataset_info.DatasetIdentity(name="mnist", version="3.0.1", data_dir=str(out), module_name="")
    info = dataset_info.DatasetInfo(builder=identity, features=features)
    template = naming.ShardedFileTemplate(
        data_dir=out, dataset_name="mnist", split="train", filetype_suffix="array_record"
    )
    info.set_splits(
        splits_lib.SplitDict(
            [splits_lib.SplitInfo(name="train", shard_lengths=[5], num_bytes=10, filename_template=template)]
        )
    )
    info.set_file_format(file_adapters.FileFormat.ARRAY_RECORD)
    info.write_to_directory(out)
    before = _snapshot(out)
    argv = [str(src), str(out), "--format", "cn_clip", "--split", "valid", "--encoding", "gbk", "--workers", "1"]
    assert build.main(argv) == 2  # split "valid" is new: the old code wrote its shard, then an AssertionError
    assert capsys.readouterr().err.strip() == (
        f"error: OUT: {out} holds another TFDS dataset ('mnist' 3.0.1, splits ['train'], features "
        "['image', 'label']), not one built by this command; choose another OUT"
    )
    assert _snapshot(out) == before
    (tmp_path / "afile").write_text("mine")
    assert build.main([str(src), str(tmp_path / "afile"), "--format", "cn_clip", "--split", "train"]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "mine"


# --------------------------------------------------------------------------- ccj-train's workdir


def test_gs_workdir_without_gcsfs_is_one_line_before_any_work(tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow's gfile serves gs:// here")
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "gcsfs.py").write_text("raise ImportError('No module named gcsfs')\n")  # as if not installed
    env = dict(ENV, PYTHONPATH=os.pathsep.join([str(stub), REPO]))
    result = _run("-m", "train", "--config", "train/configs/demo.py", "--workdir", "gs://bucket/run", env=env)
    assert one_line_error(result) == (
        "error: --workdir 'gs://bucket/run': the gs:// backend is not installed; pip install gcsfs"
    )


def test_lock_with_our_own_pid_not_written_by_us_is_stale(tmp_path, caplog):
    """After a container restart the new run can get the dead run's pid: the lock names our pid."""
    import logging

    from chinese_clip_jax.training.workdir import WorkdirLock, WorkdirLockedError

    lock = tmp_path / "lock.json"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time() - 600}))
    with caplog.at_level(logging.WARNING), WorkdirLock(tmp_path) as held:
        assert json.loads(lock.read_text()) == held.me
        with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()}"):  # ours, written by us: held
            WorkdirLock(tmp_path).acquire()
    assert "now this run's own pid" in caplog.text and not lock.exists()


def test_lock_whose_pid_was_reused_by_a_later_process_is_stale(tmp_path, caplog):
    import logging

    from chinese_clip_jax.training.workdir import WorkdirLock, WorkdirLockedError, _process_start_time

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        began = _process_start_time(other.pid)
        if began is None:
            pytest.skip("no /proc: process start times unknown")
        assert abs(began - time.time()) < 60  # the reference: it started just now
        lock = tmp_path / "lock.json"
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid, "started": began + 5}))
        with pytest.raises(WorkdirLockedError, match=f"in use by the run with pid {other.pid}"):
            WorkdirLock(tmp_path).acquire()  # written after that process started: it may be the holder
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid, "started": began - 3600}))
        with caplog.at_level(logging.WARNING), WorkdirLock(tmp_path):
            pass  # written an hour before that process existed: the pid was reused
        assert "reused by a process started after the lock was written" in caplog.text
    finally:
        other.kill()
        other.wait()
