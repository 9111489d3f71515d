"""``python -m chinese_clip_jax.data.build``: captions in another encoding are named, then read with
``--encoding``; an OUT that is a file or another TFDS data set is refused before any work, with
nothing written or lost."""

import json
import os
import tarfile

import pytest
from _makers import jpeg


def _snapshot(path):
    return {
        os.path.relpath(os.path.join(r, f), path): open(os.path.join(r, f), "rb").read()
        for r, _, fs in os.walk(path)
        for f in fs
    }


# --------------------------------------------------------------------------- data.build: encodings and OUT


CAPTIONS = ["一只猫在沙发上", "两只狗", "红色的汽车"]


def _cn_clip_gbk(root):
    import base64

    root.mkdir()
    (root / "train_imgs.tsv").write_text(
        "".join(
            f"{i}\t{base64.urlsafe_b64encode(jpeg(i, 20, 24, quality=75)).decode()}\n" for i in range(len(CAPTIONS))
        )
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
            for name, data in ((f"{i:03d}.jpg", jpeg(i, 20, 24, quality=75)), (f"{i:03d}.txt", text.encode("gbk"))):
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
