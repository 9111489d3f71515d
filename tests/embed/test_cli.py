"""ccj-embed: a folder of 500 images and a text file -> sharded embeddings equal to the model's own
normalized ``get_*_features`` of the processor's inputs; bad records skipped and listed; a kill -9
and a rerun give the bytes of an uninterrupted run; a faiss query returns the exact top-k of a
held-out caption; bad arguments are one-line errors that leave the files alone."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
from _makers import embed_env, file_digests, png, run_embed
from _train_helpers import random_params, tiny_config

import chinese_clip_jax as ccj
from chinese_clip_jax import embed
from chinese_clip_jax.modeling import l2_normalize

N_IMAGES = 500
CAPTIONS = ["一只猫在沙发上", "红色的汽车", "", "海边的日落", "两只狗在草地上奔跑", "一碗热腾腾的面条"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A saved tiny model (32 px ViT, the bundled tokenizer's vocabulary), a folder of 500 PNGs of
    assorted sizes in two sub-folders plus one broken file, and a caption file with a blank line."""
    root = tmp_path_factory.mktemp("embed")
    cfg = tiny_config(vocab_size=21128, max_positions=64, image_size=32, patch_size=8)
    ccj.save_pretrained(str(root / "model"), cfg, random_params(cfg))
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        d = root / "images" / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        h, w = rng.integers(20, 64, 2)
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        PIL.Image.fromarray(small).resize((int(w), int(h)), PIL.Image.Resampling.BILINEAR).save(d / f"{i:04d}.png")
    (root / "images" / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "captions.txt").write_text("\n".join(CAPTIONS) + "\n", encoding="utf-8")
    return root


def _reference_images(model, params, paths):
    """The model's own normalized get_image_features of ChineseCLIPProcessor's pixel values."""
    proc = ccj.ChineseCLIPProcessor(image_settings=ccj.processing.ImageSettings.at_resolution(32))
    pixels = proc(images=[PIL.Image.open(p) for p in paths], return_tensors="np")["pixel_values"]
    feats = model.apply({"params": params}, pixels, method="get_image_features")
    return np.asarray(l2_normalize(feats))


def _reference_texts(model, params, texts):
    tok = ccj.ChineseCLIPProcessor().tokenize(texts, 52)
    feats = model.apply(
        {"params": params}, tok["input_ids"], tok["attention_mask"], tok["token_type_ids"], method="get_text_features"
    )
    return np.asarray(l2_normalize(feats))


@pytest.fixture(scope="module")
def image_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    model, params = ccj.from_pretrained(str(corpus / "model"))
    opts = embed.EmbedOptions(shard_size=128, batch_size=64, dtype="float32", progress=False)
    report = embed.embed_images(
        model, params, embed.open_images(f"folder:{corpus / 'images'}"), out, model_name="tiny", options=opts
    )
    return out, report, model, params


def test_500_image_folder_equals_get_image_features(corpus, image_run):
    out, report, model, params = image_run
    rows = embed.load_embeddings(out, "images")
    assert report.records == N_IMAGES + 1 and report.bad == 1 and report.shards == 4
    names = sorted(f"{'a' if i % 2 else 'b'}/{i:04d}.png" for i in range(N_IMAGES))
    assert rows.ids == names  # sorted relative paths, the broken file left out
    bad = [json.loads(line) for line in (out / "images-bad.jsonl").read_text().splitlines()]
    assert [b["id"] for b in bad] == ["a/broken.jpg"] and "UnidentifiedImageError" in bad[0]["why"]
    want = _reference_images(model, params, [corpus / "images" / n for n in names])
    np.testing.assert_allclose(rows.vectors, want, atol=2e-6)
    manifest = json.loads((out / "images.json").read_text())
    assert manifest["complete"] and manifest["rows"] == N_IMAGES and manifest["num_shards"] == 4


def test_float16_shards_and_texts_equal_get_text_features(corpus, tmp_path):
    model, params = ccj.from_pretrained(str(corpus / "model"))
    opts = embed.EmbedOptions(shard_size=4, batch_size=2, progress=False)  # float16 by default
    report = embed.embed_texts(
        model, params, embed.read_texts(str(corpus / "captions.txt")), tmp_path, model_name="tiny", options=opts
    )
    assert report.rows == 5 and report.bad == 1
    assert np.load(tmp_path / "texts-00000.npy").dtype == np.float16
    rows = embed.load_embeddings(tmp_path, "texts")
    assert rows.ids == [0, 1, 3, 4, 5]  # line numbers; line 2 is blank
    want = _reference_texts(model, params, [c for c in CAPTIONS if c])
    np.testing.assert_allclose(rows.vectors, want, atol=2e-3)  # float16 storage


def test_index_query_returns_exact_neighbours_of_held_out_caption(corpus, image_run):
    pytest.importorskip("faiss")
    out, _, model, params = image_run
    embed.build_index(out, "images")
    held_out = "一只在窗台上晒太阳的橘猫"  # not in any file of the run
    clip = ccj.ChineseCLIP(model, params)
    hits = embed.query(out, texts=[held_out], k=5, model=clip)[0]
    rows = embed.load_embeddings(out, "images")
    scores = rows.vectors @ _reference_texts(model, params, [held_out])[0]
    top = np.argsort(-scores)[:5]
    assert [h[0] for h in hits] == [rows.ids[i] for i in top]
    np.testing.assert_allclose([h[1] for h in hits], scores[top], atol=1e-5)
    # an image query finds itself first
    first = corpus / "images" / rows.ids[7]
    assert embed.query(out, images=[str(first)], k=1, model=clip)[0][0][0] == rows.ids[7]


def _cli_args(corpus):
    args = ["--model", corpus / "model", "--images", corpus / "images", "--shard-size", 50, "--batch-size", 25]
    return args + ["--no-progress"]


@pytest.fixture(scope="module")
def whole(corpus, tmp_path_factory):
    """An uninterrupted CLI run (2 devices): 11 shards of 50 records."""
    out = tmp_path_factory.mktemp("whole")
    res = run_embed(*_cli_args(corpus), "--out", out, devices=2)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_files_of_an_uninterrupted_run(corpus, whole, tmp_path):
    args = _cli_args(corpus)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "chinese_clip_jax.embed", *map(str, args), "--out", str(out)]
    proc = subprocess.Popen(cmd, env=embed_env(2), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not (out / "images-00000.json").exists():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-3000:]
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not json.loads((out / "images.json").read_text()).get("complete")  # killed part-way
    written = len(list(out.glob("images-*.json")))
    assert 1 <= written < 11

    rerun = run_embed(*args, "--out", out, devices=2)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{written} kept from an earlier run" in rerun.stderr
    assert file_digests(out) == file_digests(whole)

    other = run_embed(*args, "--out", out, "--dtype", "float32")  # another plan into the same --out
    assert other.returncode == 2
    assert other.stderr.strip().splitlines() == [
        f"error: {out / 'images.json'} was written for dtype='float16', this run has dtype='float32': "
        "use another --out, or the same arguments to resume"
    ]
    assert file_digests(out) == file_digests(whole)


def test_missing_folder_is_a_one_line_error(corpus, tmp_path):
    missing = run_embed("--model", corpus / "model", "--images", f"folder:{tmp_path / 'nope'}", "--out", tmp_path / "o")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"error: --images folder:{tmp_path / 'nope'}: no such directory {tmp_path / 'nope'}"
    ]
    assert not (tmp_path / "o").exists()


def test_query_command_prints_top_k(corpus, image_run):
    pytest.importorskip("faiss")
    out = image_run[0]
    embed.build_index(out, "images")
    res = run_embed("query", out, "--text", "红色的汽车", "-k", "3", "--model", corpus / "model")
    assert res.returncode == 0, res.stderr[-3000:]
    line = json.loads(res.stdout.strip().splitlines()[-1])
    rows = embed.load_embeddings(out, "images")
    model, params = image_run[2], image_run[3]
    top = np.argsort(-(rows.vectors @ _reference_texts(model, params, ["红色的汽车"])[0]))[:3]
    assert line["query"] == "红色的汽车" and [h["id"] for h in line["hits"]] == [rows.ids[i] for i in top]


@pytest.mark.slow
def test_two_hosts_each_embed_their_shards_into_the_same_files(corpus, whole, tmp_path):
    """Two processes joined by jax.distributed (1 device each): host p writes shards p, p + 2, ...;
    the files equal the single-process run's (on 2 devices)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "two"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "chinese_clip_jax.embed", *map(str, _cli_args(corpus)), "--out", str(out)]
            + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
            env=embed_env(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "251 images" in outs[0][1] and "250 images" in outs[1][1]  # shards 0, 2, ..., 10 / 1, 3, ..., 9
    assert file_digests(out) == file_digests(whole)


def _pixels(data) -> np.ndarray:
    import base64
    import io

    data = base64.urlsafe_b64decode(data) if isinstance(data, str) else data
    return np.asarray(PIL.Image.open(io.BytesIO(data)).convert("RGB"))


def test_image_specs_list_cn_clip_and_webdataset(tmp_path):
    """Each spec gives its records in order with their ids and the bytes of the source image;
    an unreadable record is a record with an error (skipped by the runner), not an exception."""
    import base64
    import io
    import tarfile

    images = [png(i, 9, 7) for i in range(3)]
    for i, data in enumerate(images):
        (tmp_path / f"{i}.png").write_bytes(data)
    (tmp_path / "list.txt").write_text(f"2.png\n\n{tmp_path / '0.png'}\nmissing.png\n")
    listed = embed.open_images(str(tmp_path / "list.txt"))
    assert [r["id"] for r in listed.records] == ["2.png", str(tmp_path / "0.png"), "missing.png"]
    np.testing.assert_array_equal(_pixels(listed.records[0]["image"]), _pixels(images[2]))
    assert "FileNotFoundError" in listed.records[2]["error"]

    tsv = [f"{100 + i}\t{base64.urlsafe_b64encode(d).decode()}" for i, d in enumerate(images)]
    (tmp_path / "valid_imgs.tsv").write_text("\n".join(tsv) + "\n")
    (tmp_path / "valid_texts.jsonl").write_text('{"text_id": 1, "text": "猫", "image_ids": [100]}\n')
    cn = embed.open_images(f"cn_clip:{tmp_path}@valid")
    assert [r["id"] for r in cn.records] == ["100", "101", "102"] and cn.source == f"cn_clip:{tmp_path}@valid"
    np.testing.assert_array_equal(_pixels(cn.records[1]["image"]), _pixels(images[1]))

    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        for key, data in (("k0", images[0]), ("k1", images[1])):
            for name, blob in ((f"{key}.png", data), (f"{key}.txt", f"图{key}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    wds = embed.open_images(f"webdataset:{tmp_path / 'shard-0.tar'}")
    assert [r["id"] for r in wds.records] == [f"{tmp_path / 'shard-0.tar'}:k0", f"{tmp_path / 'shard-0.tar'}:k1"]
    np.testing.assert_array_equal(_pixels(wds.records[1]["image"]), _pixels(images[1]))

    with pytest.raises(embed.CorpusError, match="no split 'test'"):
        embed.open_images(f"cn_clip:{tmp_path}@test")

    pytest.importorskip("tensorflow_datasets")
    from chinese_clip_jax.data import build as build_mod

    build_mod.build(
        str(tmp_path / "shard-0.tar"), str(tmp_path / "tfds"), fmt="webdataset", split="train", progress=False
    )
    ds = embed.open_images(f"tfds-dir:{tmp_path / 'tfds'}")
    assert [r["id"] for r in ds.records] == ["k0", "k1"]
    np.testing.assert_array_equal(_pixels(ds.records[1]["image"]), _pixels(images[1]))
