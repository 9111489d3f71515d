"""TFDS/ArrayRecord build and source, webdataset at scale, crops and workers, epath routes.

Tiny datasets written here: cn_clip TSV and webdataset shards built into TFDS directories and
read back equal (through tfds' own reader), 4 simulated processes covering an epoch once,
corrupt records skipped and counted, gs:// served by an in-memory fsspec filesystem.
"""

import io
import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
from _makers import REPO, decoded, jpeg, losses_by_step, read_tfds, write_cn_clip_split, write_tar

from chinese_clip_jax.data import build as build_mod
from chinese_clip_jax.data import default_data_config, eval_sets, train_iterator
from chinese_clip_jax.data.pipeline import ImageDecoder, random_resized_box

S = 24


def _write_webdataset(root, n_shards=4, per_shard=3, corrupt=True):
    """n_shards tars named a0.tar, b1.tar, ... with per_shard samples each (+ one broken JPEG in
    shard 0). Returns ({key: (text, jpeg)}, spec with a brace alternation)."""
    good, names = {}, []
    for s in range(n_shards):
        members = []
        for k in range(per_shard):
            key = f"{s:03d}{k:03d}"
            img, text = jpeg(100 + s * per_shard + k), f"样本{key}"
            members += [(f"{key}.jpg", img), (f"{key}.txt", text.encode())]
            good[key] = (text, img)
        if corrupt and s == 0:
            members += [("bad.jpg", b"\xff\xd8\xff not a jpeg"), ("bad.txt", "坏的".encode())]
        name = f"{'abcd'[s % 4]}{s}.tar"
        write_tar(root / name, members)
        names.append(name[:-4])
    return good, str(root / ("{" + ",".join(names) + "}.tar"))


def test_cn_clip_tsv_builds_a_tfds_dir_read_back_equal(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    good = write_cn_clip_split(src)
    assert (
        build_mod.main(
            [str(src), str(out), "--format", "cn_clip", "--split", "train", "--num-shards", "2", "--workers", "1"]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert summary["written"] == len(good) and summary["skipped"] == 3  # bad base64, missing id, empty caption
    assert {"dataset_info.json", "features.json"} <= set(os.listdir(out))
    assert sorted(f for f in os.listdir(out) if ".array_record-" in f) == [
        "ccj-train.array_record-00000-of-00002",
        "ccj-train.array_record-00001-of-00002",
    ]
    builder, records = read_tfds(out)
    assert builder.info.splits["train"].num_examples == len(good)
    got = sorted(
        (r["text"].decode(), r["image_id"].decode(), r["text_id"].decode(), r["image"].tobytes()) for r in records
    )  # tfds decodes the image feature on read
    want = sorted((t, iid, tid, decoded(img).tobytes()) for t, img, iid, tid in good)
    assert got == want
    # a second split goes into the same directory; an existing one is refused, nothing overwritten
    before = (out / "dataset_info.json").read_text()
    assert build_mod.main([str(src), str(out), "--format", "cn_clip", "--split", "train"]) == 2
    assert "already holds split 'train'" in capsys.readouterr().err
    assert (out / "dataset_info.json").read_text() == before
    (src / "valid_imgs.tsv").write_text((src / "train_imgs.tsv").read_text())
    (src / "valid_texts.jsonl").write_text((src / "train_texts.jsonl").read_text())
    assert build_mod.main([str(src), str(out), "--format", "cn_clip", "--split", "valid", "--workers", "1"]) == 0
    builder, _ = read_tfds(out, "valid")
    assert set(builder.info.splits.keys()) == {"train", "valid"}


def test_webdataset_builds_a_tfds_dir_read_back_equal(tmp_path):
    good, spec = _write_webdataset(tmp_path, n_shards=2)
    out = tmp_path / "out"
    summary = build_mod.build(spec, str(out), fmt="webdataset", split="train", progress=False)
    assert summary["written"] == len(good) and summary["skipped"] == 1  # the broken JPEG
    _, records = read_tfds(out)
    got = sorted((r["image_id"].decode(), r["text"].decode(), r["image"].tobytes()) for r in records)
    assert got == sorted((k, t, decoded(img).tobytes()) for k, (t, img) in good.items())


def test_bad_build_arguments_exit_2_before_writing(tmp_path, capsys):
    assert (
        build_mod.main([str(tmp_path / "nope"), str(tmp_path / "out"), "--format", "cn_clip", "--split", "train"]) == 2
    )
    assert "no split 'train' under" in capsys.readouterr().err
    assert build_mod.main([str(tmp_path), "ftp://host/out", "--format", "cn_clip", "--split", "train"]) == 2
    assert "unsupported scheme ftp://" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    good, spec = _write_webdataset(root, n_shards=3, per_shard=4, corrupt=False)
    build_mod.build(spec, str(root / "out"), fmt="webdataset", split="train", num_shards=2, progress=False)
    build_mod.build(spec.replace(",c2", ""), str(root / "out"), fmt="webdataset", split="valid", progress=False)
    return root / "out", good


def _tfds_cfg(out, **kw):
    cfg = default_data_config("tfds")
    cfg.tfds.builder_dir = str(out)
    cfg.num_threads, cfg.prefetch_buffer_size = 1, 4
    cfg.update(kw)
    return cfg


def test_four_processes_see_every_sample_once_per_epoch(tfds_dir):
    out, good = tfds_dir
    expected = sorted(ImageDecoder(S, uint8=True)(img).tobytes() for _, img in good.values())  # 12 samples
    seen = []
    for p in range(4):
        it = train_iterator(
            _tfds_cfg(out), global_batch_size=12, seed=3, image_size=S, process_index=p, process_count=4
        )
        seen += [row.tobytes() for row in next(it)["pixel_values"]]  # 3 per process = its epoch
        it.close()
    assert sorted(seen) == expected


def test_tfds_source_resumes_exactly_and_workers_give_the_same_batches(tfds_dir):
    out, _ = tfds_dir
    cfg = _tfds_cfg(out, train_crop="random_resized")
    a = train_iterator(cfg, global_batch_size=4, seed=1, image_size=S, process_index=0, process_count=1)
    first = [next(a) for _ in range(2)]
    state = json.loads(json.dumps(a.get_state()))
    rest = [next(a) for _ in range(3)]
    b = train_iterator(cfg, global_batch_size=4, seed=1, image_size=S, process_index=0, process_count=1)
    b.set_state(state)
    for x, y in zip(rest, [next(b) for _ in range(3)]):
        np.testing.assert_array_equal(x["pixel_values"], y["pixel_values"])
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
    w = train_iterator(
        _tfds_cfg(out, train_crop="random_resized", worker_count=2),
        global_batch_size=4,
        seed=1,
        image_size=S,
        process_index=0,
        process_count=1,
    )
    for x in first + rest:  # decoding in grain worker processes changes nothing
        np.testing.assert_array_equal(x["pixel_values"], next(w)["pixel_values"])
    w.close()


def test_tfds_eval_split_and_bad_keys(tfds_dir):
    out, good = tfds_dir
    sets = eval_sets(_with_eval(out), image_size=S)
    r = sets["retrieval"]
    assert len(r["texts"]) == len(r["images"]) == 8  # shards a0 and b1; images held lazily
    assert r["text_to_images"] == [[i] for i in range(8)]
    key = {t: k for k, (t, _) in good.items()}[r["texts"][0]]
    np.testing.assert_array_equal(ImageDecoder(S)(r["images"][0]), ImageDecoder(S)(good[key][1]))
    cfg = _tfds_cfg(out)
    cfg.tfds.text_key = "caption"
    with pytest.raises(KeyError, match="text_key 'caption' is not a feature"):
        train_iterator(cfg, global_batch_size=2, seed=0, image_size=S, process_index=0, process_count=1)


def test_tfds_eval_split_without_ids_uses_the_sources_feature_keys(tmp_path):
    """data.tfds.eval_split of a dataset with other feature names and no image_id / text_id: the
    trainer's keys reach the shared reader; each record's image is a candidate (id = the record
    number, as ccj-embed numbers it), a caption's positives are the images with that text."""
    import tensorflow_datasets as tfds

    from chinese_clip_jax.data.readers import open_images

    rows = [("猫", jpeg(1)), ("狗", jpeg(2)), ("猫", jpeg(3))]

    class NoIdPairs(tfds.core.GeneratorBasedBuilder):
        __module__ = "tiny_builders"  # one part: tfds looks no code file up for it
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {"jpeg": tfds.features.Image(shape=(None, None, 3)), "caption": tfds.features.Text()}
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {"valid": self._generate_examples()}

        def _generate_examples(self):
            for n, (text, image) in enumerate(rows):
                yield n, {"jpeg": io.BytesIO(image), "caption": text}

    builder = NoIdPairs(data_dir=str(tmp_path / "tfds"), file_format="array_record")
    builder.download_and_prepare()
    cfg = _tfds_cfg(builder.data_dir)
    cfg.tfds.update(eval_split="valid", image_key="jpeg", text_key="caption")
    r = eval_sets(cfg, image_size=S)["retrieval"]
    assert r["image_ids"] == [0, 1, 2] and r["texts"] == ["猫", "狗"] and r["text_to_images"] == [[0, 2], [1]]
    embedded = open_images(f"tfds-dir:{builder.data_dir}@valid").records
    assert [embedded[i]["id"] for i in range(len(embedded))] == r["image_ids"]
    np.testing.assert_array_equal(ImageDecoder(S)(r["images"][1]), ImageDecoder(S)(rows[1][1]))


def _with_eval(out):
    cfg = _tfds_cfg(out)
    cfg.tfds.eval_split = "valid"
    return cfg


# ---------------------------------------------------------------- webdataset at scale


def test_webdataset_processes_index_only_their_shards_compactly(tmp_path):
    from chinese_clip_jax.data.webdataset import INDEX_DTYPE, TarSource, expand_braces

    assert expand_braces("s{01..02}{x,y}/{a,b{c,d}}") == [
        "s01x/a",
        "s01x/bc",
        "s01x/bd",
        "s01y/a",
        "s01y/bc",
        "s01y/bd",
        "s02x/a",
        "s02x/bc",
        "s02x/bd",
        "s02y/a",
        "s02y/bc",
        "s02y/bd",
    ]
    good, spec = _write_webdataset(tmp_path, n_shards=4, per_shard=3, corrupt=False)
    import grain

    keys = []
    for p in range(2):
        src = TarSource(spec, shard=grain.sharding.ShardOptions(p, 2), progress=False)
        assert src.is_process_shard and [os.path.basename(x) for x in src.paths] == (
            ["a0.tar", "c2.tar"] if p == 0 else ["b1.tar", "d3.tar"]
        )
        assert src.index_bytes == len(src) * INDEX_DTYPE.itemsize and INDEX_DTYPE.itemsize <= 32
        keys += [src.key(i) for i in range(len(src))]
        rec = src[0]
        assert (rec["text"], rec["image"]) == good[src.key(0)]
    assert sorted(keys) == sorted(good)


# ---------------------------------------------------------------- crops and pixels


def test_random_resized_crop_is_cn_clips_window_and_deterministic():
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, right, bottom = random_resized_box(400, 300, rng)
        w, h = right - left, bottom - top
        assert 0 <= left and right <= 400 and 0 <= top and bottom <= 300
        assert 0.9 * 120000 * 0.97 <= w * h <= 120000  # scale (0.9, 1.0), up to rounding
    img = jpeg(5, 60, 80)
    dec = ImageDecoder(S, "random_resized")
    a = dec(img, np.random.default_rng(7))
    np.testing.assert_array_equal(a, dec(img, np.random.default_rng(7)))
    box = random_resized_box(80, 60, np.random.default_rng(7))
    ref = PIL.Image.open(io.BytesIO(img)).convert("RGB").resize((S, S), PIL.Image.Resampling.BICUBIC, box=box)
    from chinese_clip_jax.processing import normalize_pixels

    np.testing.assert_array_equal(a, normalize_pixels(np.asarray(ref)))
    big = jpeg(6, 200, 200)  # jpeg_draft decodes at 1/4 scale (50 px >= S) and stays close
    exact, fast = (ImageDecoder(S, "squash", jpeg_draft=d)(big) for d in (False, True))
    assert fast.shape == exact.shape == (3, S, S) and 0 < np.abs(fast - exact).mean() < 0.2
    squash = ImageDecoder(S, "squash")(img)
    ref = PIL.Image.open(io.BytesIO(img)).convert("RGB").resize((S, S), PIL.Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(squash, normalize_pixels(np.asarray(ref)))


def test_normalize_pixels_is_bit_equal_to_transformers():
    from transformers import ChineseCLIPImageProcessor

    from chinese_clip_jax.processing import normalize_pixels

    images = np.random.default_rng(0).integers(0, 256, (2, 17, 23, 3), dtype=np.uint8)
    ref = ChineseCLIPImageProcessor(do_resize=False, do_center_crop=False)(list(images), return_tensors="np")[
        "pixel_values"
    ]
    out = normalize_pixels(images)
    assert out.dtype == np.float32 and out.shape == (2, 3, 17, 23)
    np.testing.assert_array_equal(out, ref)


# ---------------------------------------------------------------- epath routes


def test_gs_paths_follow_the_epath_route(tmp_path, fake_gcs):
    from chinese_clip_jax.data.webdataset import TarSource
    from chinese_clip_jax.io import as_path, copy_tree

    good, _ = _write_webdataset(tmp_path, n_shards=2, per_shard=2, corrupt=False)
    for name in ("a0.tar", "b1.tar"):
        copy_tree(as_path(tmp_path / name), as_path(f"gs://bucket/wds/{name}"))
    assert set(fake_gcs.store) >= {"bucket/wds/a0.tar", "bucket/wds/b1.tar"}
    src = TarSource("gs://bucket/wds/{a0,b1}.tar", progress=False)  # indexed and read through epath
    assert sorted((src[i]["text"], src[i]["image"]) for i in range(len(src))) == sorted(good.values())
    assert TarSource("gs://bucket/wds/*.tar", progress=False).paths == [
        "gs://bucket/wds/a0.tar",
        "gs://bucket/wds/b1.tar",
    ]
    # the builder writes a TFDS directory to gs://, readable once copied back
    summary = build_mod.build(
        "gs://bucket/wds/{a0,b1}.tar", "gs://bucket/ds", fmt="webdataset", split="train", progress=False
    )
    assert summary["written"] == 4 and fake_gcs.store.get("bucket/ds/dataset_info.json") is not None
    # a second split joins the first in the same gs:// OUT (io.staged_output copies into it)
    build_mod.build("gs://bucket/wds/a0.tar", "gs://bucket/ds", fmt="webdataset", split="valid", progress=False)
    local = copy_tree(as_path("gs://bucket/ds"), as_path(tmp_path / "ds"))
    _, records = read_tfds(local)
    assert sorted(r["text"].decode() for r in records) == sorted(t for t, _ in good.values())
    _, records = read_tfds(local, "valid")
    assert sorted(r["text"].decode() for r in records) == sorted(t for k, (t, _) in good.items() if k < "001")
    # a build that fails copies nothing to gs://: no half-written OUT
    write_tar(tmp_path / "bad.tar", [("x.jpg", b"\xff\xd8\xff not a jpeg"), ("x.txt", "坏的".encode())])
    copy_tree(as_path(tmp_path / "bad.tar"), as_path("gs://bucket/wds/bad.tar"))
    with pytest.raises(ValueError, match="no usable"):
        build_mod.build(
            "gs://bucket/wds/bad.tar", "gs://bucket/failed", fmt="webdataset", split="train", progress=False
        )
    assert not [k for k in fake_gcs.store if k.startswith("bucket/failed")]


def test_unknown_scheme_or_missing_backend_fails_before_any_work(tmp_path, monkeypatch):
    from _train_run import tiny_train_config

    from chinese_clip_jax.training.loop import train

    monkeypatch.chdir(tmp_path)
    import chinese_clip_jax.training.loop as loop

    monkeypatch.setattr(loop, "create_train_state", lambda *a, **k: pytest.fail("built the train state"))
    with pytest.raises(ValueError, match=r"workdir 'ftp://host/run': unsupported scheme ftp://"):
        train(tiny_train_config(), "ftp://host/run")
    with pytest.raises(ImportError, match="gs:// backend is not installed; pip install gcsfs"):
        train(tiny_train_config(), "gs://bucket/run")  # no gcsfs here: named before anything
    cfg = tiny_train_config(**{"data.name": "tfds"})
    cfg.data.tfds.builder_dir = str(tmp_path / "no-such-dir")
    with pytest.raises(ValueError, match="no dataset_info.json there"):  # ConfigError: one line, before work
        train(cfg, str(tmp_path / "run"))
    cfg = tiny_train_config(**{"data.name": "webdataset"})
    cfg.data.webdataset.shards = "http://host/{0..3}.tar"
    with pytest.raises(ValueError, match=r"data.webdataset.shards 'http://host/\{0..3\}.tar': unsupported"):
        train(cfg, str(tmp_path / "run"))
    assert os.listdir(tmp_path) == []  # no ./gs: or ./ftp: folder, no workdir, nothing built
    proc = subprocess.run(
        [sys.executable, "-m", "convert", "s3x://b/model.pt", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2 and "SRC 's3x://b/model.pt': unsupported scheme s3x://" in proc.stderr


# ---------------------------------------------------------------- kill -9 on the TFDS source


@pytest.mark.slow
def test_cli_run_on_tfds_resumes_exactly_after_kill9(tfds_dir, tmp_path):
    out, _ = tfds_dir
    script = os.path.join(REPO, "tests", "_train_run.py")
    env = dict(os.environ, PYTHONPATH=REPO)
    tfds_args = ["--tfds-dir", str(out)]
    ref = str(tmp_path / "ref")
    subprocess.run([sys.executable, script, ref, "6", *tfds_args], check=True, env=env, timeout=600)
    work = str(tmp_path / "killed")
    proc = subprocess.run(
        [sys.executable, script, work, "6", *tfds_args, "--kill9-after-checkpoint", "4", "--at-batch", "6"],
        env=env,
        timeout=600,
    )
    assert proc.returncode == -9
    assert max(losses_by_step(work)) == 5
    subprocess.run([sys.executable, script, work, "6", *tfds_args], check=True, env=env, timeout=600)
    reference, resumed = losses_by_step(ref), losses_by_step(work)
    assert sorted(resumed) == list(range(1, 7))
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-6), step
