"""cn_clip's LMDB build and gs:// roots, for the training source and ``python -m chinese_clip_jax.data.build``.

The LMDB is written by cn_clip's own ``build_lmdb_dataset.py`` (run as cn_clip ships it) from the
TSV the tests write, so both layouts hold the same pairs: each built into a TFDS directory must
read back equal (texts, ids, encoded image bytes, decoded pixels) to the pairs written. gs:// is
served by the in-memory fsspec filesystem of ``conftest.fake_gcs``.
"""

import base64
import json
import logging
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from _makers import decoded, read_tfds, write_cn_clip_split

from chinese_clip_jax.data import build as build_mod
from chinese_clip_jax.data import cn_clip, default_data_config, train_iterator
from chinese_clip_jax.io import as_path, copy_tree

pytest.importorskip("lmdb")
pytest.importorskip("cn_clip")


@pytest.fixture(scope="module")
def cn_clip_src(tmp_path_factory):
    """SRC with train_imgs.tsv + train_texts.jsonl (6 good pairs, a bad-base64 image, a caption
    naming a missing image, an empty caption) and cn_clip's LMDB build of it in SRC/lmdb/train."""
    src = tmp_path_factory.mktemp("cn_clip")
    good = write_cn_clip_split(src)
    proc = subprocess.run(
        [sys.executable, "-m", "cn_clip.preprocess.build_lmdb_dataset", "--data_dir", str(src), "--splits", "train"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(src / "lmdb" / "train")) == ["imgs", "pairs"]
    return src, good


def _records(out, split="train"):
    """(text, image_id, text_id, encoded image bytes, decoded pixels) of every record, sorted."""
    import tensorflow_datasets as tfds

    builder, decoded = read_tfds(out, split)
    raw = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    by_key = {(r["text"].decode(), r["image_id"].decode()): r["image"] for r in (raw[i] for i in range(len(raw)))}
    rows = []
    for r in decoded:
        text, image_id = r["text"].decode(), r["image_id"].decode()
        rows.append((text, image_id, r["text_id"].decode(), by_key[text, image_id], r["image"].tobytes()))
    return sorted(rows)


def _want(good):
    return sorted((t, iid, tid, img, decoded(img).tobytes()) for t, img, iid, tid in good)


def _build(capsys, *argv):
    rc = build_mod.main([*map(str, argv), "--workers", "1"])
    captured = capsys.readouterr()
    return rc, (json.loads(captured.out.splitlines()[0]) if rc == 0 else None), captured.err


def test_lmdb_build_reads_back_equal_to_the_tsv_build(cn_clip_src, tmp_path, capsys, caplog):
    src, good = cn_clip_src
    # both layouts present: the builder will not guess, and writes nothing
    rc, _, err = _build(capsys, src, tmp_path / "auto", "--format", "cn_clip", "--split", "train")
    assert rc == 2 and "both as TSV" in err and "--cn-clip-format tsv or lmdb" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "auto").exists()

    rc, tsv, _ = _build(
        capsys, src, tmp_path / "tsv", "--format", "cn_clip", "--split", "train", "--cn-clip-format", "tsv"
    )
    assert rc == 0
    rc, lmdb, _ = _build(
        capsys,
        src,
        tmp_path / "lmdb",
        "--format",
        "cn_clip",
        "--split",
        "train",
        "--cn-clip-format",
        "lmdb",
        "--num-shards",
        "2",
    )
    assert rc == 0
    assert tsv["written"] == lmdb["written"] == len(good)
    assert tsv["skipped"] == lmdb["skipped"] == 3  # bad base64, missing image id, empty caption
    assert "lmdb/train/pairs:" in caplog.text  # skipped records named by their LMDB key
    assert _records(tmp_path / "lmdb") == _records(tmp_path / "tsv") == _want(good)
    # SRC = the lmdb directory itself holds only the LMDB build: detected without the flag
    assert cn_clip.find_split(as_path(src / "lmdb"), "train") == ("lmdb", as_path(src / "lmdb" / "train"))


def test_a_src_with_neither_layout_fails_in_one_line_before_writing(cn_clip_src, tmp_path, capsys):
    src, _ = cn_clip_src
    (tmp_path / "empty").mkdir()
    cases = [
        ([tmp_path / "empty"], "no split 'train' under"),
        ([tmp_path / "empty", "--cn-clip-format", "lmdb"], "no LMDB build of split 'train'"),
        ([src, "--split", "valid"], "no split 'valid' under"),
        ([src / "lmdb", "--cn-clip-format", "tsv"], "train_imgs.tsv does not exist"),
    ]
    for args, message in cases:
        rc, _, err = _build(capsys, args[0], tmp_path / "out", "--format", "cn_clip", "--split", "train", *args[1:])
        assert rc == 2 and message in err and err.startswith("error: SRC: ") and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists()
    rc, _, err = _build(
        capsys, src, tmp_path / "out", "--format", "webdataset", "--split", "t", "--cn-clip-format", "tsv"
    )
    assert rc == 2 and "--cn-clip-format applies to --format cn_clip only" in err


def _source_rows(source, root):
    """The training source's samples, its root in error messages written ROOT."""
    rows = []
    for i in range(len(source)):
        rec = source[i]
        rows.append((rec.get("text"), rec.get("image"), rec.get("error", "").replace(str(root), "ROOT")))
    return sorted(rows, key=repr)


def _cn_clip_config(root, fmt):
    c = default_data_config("cn_clip").cn_clip
    c.root, c.format = str(root), fmt
    return c


def test_gs_root_reads_equal_to_local_for_training_and_build(cn_clip_src, tmp_path, fake_gcs, caplog, capsys):
    src, good = cn_clip_src
    copy_tree(as_path(src), as_path("gs://bucket/cn"))
    assert "bucket/cn/lmdb/train/pairs/data.mdb" in fake_gcs.store

    # training source: TSV read by byte offsets over gs://, equal to the local read
    local = cn_clip.open_source(_cn_clip_config(src, "tsv"), "train")
    remote = cn_clip.open_source(_cn_clip_config("gs://bucket/cn", "tsv"), "train")
    assert remote.skipped_at_index == local.skipped_at_index == 1  # the caption naming image 999
    assert (
        _source_rows(remote, "gs://bucket/cn") == _source_rows(local, src) and len(local) == len(good) + 2
    )  # + bad base64, empty caption
    assert str(remote.images.path) == "gs://bucket/cn/train_imgs.tsv"
    in_worker = pickle.loads(pickle.dumps(remote.images))  # grain workers reopen the remote file
    image_3 = next(img for _, img, iid, _ in good if iid == "3")
    assert in_worker["3"] == remote.images["3"] and base64.urlsafe_b64decode(in_worker["3"][0]) == image_3

    # training source: LMDB copied once to a local temp dir (logged), then read there
    with caplog.at_level(logging.INFO, logger="chinese_clip_jax"):
        remote = cn_clip.open_source(_cn_clip_config("gs://bucket/cn", "lmdb"), "train")
    assert "gs://bucket/cn/lmdb/train cannot be read remotely: copying it to" in caplog.text
    copy = remote.images.path.parent
    assert copy.is_dir() and "://" not in str(copy)
    local = cn_clip.open_source(_cn_clip_config(src, "lmdb"), "train")
    assert _source_rows(remote, "gs://bucket/cn") == _source_rows(local, src) and len(local) == len(good) + 3  # + 999
    errors = [remote[i]["error"] for i in range(len(remote)) if "error" in remote[i]]
    assert errors == ["KeyError: 'image id 999 not in gs://bucket/cn/lmdb/train/imgs'"]  # named by its origin
    assert remote.images["3"] == (local.images["3"][0], "gs://bucket/cn/lmdb/train/imgs:3")
    local.images.close()  # py-lmdb opens one environment per path and process
    # grain worker processes reopen the parent's copy: the same batch as the local LMDB, decoded in-process
    batches = []
    for root, workers in ((src, 0), ("gs://bucket/cn", 1)):
        cfg = default_data_config("cn_clip")
        cfg.cn_clip.root, cfg.cn_clip.format, cfg.worker_count = str(root), "lmdb", workers
        cfg.num_threads, cfg.prefetch_buffer_size = 1, 4
        it = train_iterator(cfg, global_batch_size=4, seed=0, image_size=16, process_index=0, process_count=1)
        batches.append(next(it))
        it.close()
    for key in ("input_ids", "pixel_values"):
        np.testing.assert_array_equal(batches[0][key], batches[1][key])
    remote.images.close()
    assert not copy.exists()  # the temp copy goes with the source

    # data.build from gs://, both layouts, equal to the local builds
    for fmt in ("tsv", "lmdb"):
        rc, summary, _ = _build(
            capsys, "gs://bucket/cn", tmp_path / fmt, "--format", "cn_clip", "--split", "train", "--cn-clip-format", fmt
        )
        assert rc == 0 and (summary["written"], summary["skipped"]) == (len(good), 3)
        assert _records(tmp_path / fmt) == _want(good)


def test_remote_byte_ranges_are_exact_requests(tmp_path, fake_gcs, monkeypatch):
    from chinese_clip_jax.io import RangeReader

    data = bytes(range(256)) * 40
    (tmp_path / "blob").write_bytes(data)
    copy_tree(as_path(tmp_path / "blob"), as_path("gs://bucket/blob"))
    requests = []
    cat_file = fake_gcs.cat_file

    def spy(self, path, start=None, end=None, **kw):
        requests.append((path, start, end))
        return cat_file(self, path, start=start, end=end, **kw)

    monkeypatch.setattr(fake_gcs, "cat_file", spy)
    local, remote = RangeReader(tmp_path / "blob"), RangeReader("gs://bucket/blob")
    for offset, size in ((0, 10), (5000, 300), (10230, 50)):  # the last one runs past the end
        assert remote.read(offset, size) == local.read(offset, size) == data[offset : offset + size]
    # one ranged request per read, as gcsfs' cat_file makes (no read-ahead block)
    assert requests == [("bucket/blob", 0, 10), ("bucket/blob", 5000, 5300), ("bucket/blob", 10230, 10280)]
    assert pickle.loads(pickle.dumps(remote)).read(7, 3) == data[7:10]  # a worker reopens it


def test_cn_clip_jsonl_with_a_bom_and_a_surrogate(tmp_path):
    from chinese_clip_jax.data.cn_clip import read_captions

    lines = [
        json.dumps({"text_id": i, "text": t, "image_ids": [i]}, ensure_ascii=False)
        for i, t in enumerate(["一只猫", "一条狗", "红色的花"])
    ]
    lines.append('{"text_id": 3, "text": "bad \\ud800", "image_ids": [3]}')  # JSON escape of a lone surrogate
    path = tmp_path / "train_texts.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode("utf-8") + b"\n")
    skipped = [0]
    records = list(read_captions(path, skipped))
    assert [r[1] for r in records] == ["一只猫", "一条狗", "红色的花"] and skipped == [1]
