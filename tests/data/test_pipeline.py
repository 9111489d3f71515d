"""Data pipeline: determinism, per-process sharding, exact resume, skip-and-count, tokens, pixels."""

import json

import grain
import numpy as np
import PIL.Image
import pytest
from _makers import jpeg, png, write_tar

from chinese_clip_jax.data import default_data_config, demo, eval_sets, train_iterator
from chinese_clip_jax.data.pipeline import CachingTokenizer, ImageDecoder, build_train_iterator

S = 32  # image side used throughout


def _demo_cfg(num_train=16):
    cfg = default_data_config("demo")
    cfg.demo.num_train = num_train
    cfg.demo.eval_per_class = 2
    cfg.demo.num_retrieval = 24
    cfg.num_threads = 1
    cfg.prefetch_buffer_size = 8
    return cfg


def _take(it, n):
    return [next(it) for _ in range(n)]


def _iterator(source, batch_size, seed=2, **kw):
    return build_train_iterator(
        source,
        batch_size=batch_size,
        seed=seed,
        image_size=S,
        context_length=52,
        shard=grain.sharding.ShardOptions(0, 1),
        **kw,
    )


def _index_of_rows(batch, source):
    """Maps each batch row back to its source index by its pixels (demo images are distinct)."""
    table = {ImageDecoder(S, uint8=True)(source[i]["image"]).tobytes(): i for i in range(len(source))}
    return [table[row.tobytes()] for row in batch["pixel_values"]]


def _tokens(texts):
    from transformers import BertTokenizer

    from chinese_clip_jax.processing import ASSETS_DIR

    tok = BertTokenizer.from_pretrained(str(ASSETS_DIR))
    return tok(texts, padding="max_length", max_length=52, truncation=True, return_tensors="np")


def test_demo_batches_are_deterministic_and_shaped():
    cfg = _demo_cfg(64)
    a = _take(train_iterator(cfg, global_batch_size=8, seed=3, image_size=S, process_index=0, process_count=1), 3)
    b = _take(train_iterator(cfg, global_batch_size=8, seed=3, image_size=S, process_index=0, process_count=1), 3)
    c = next(train_iterator(cfg, global_batch_size=8, seed=4, image_size=S, process_index=0, process_count=1))
    for x, y in zip(a, b):
        assert x.keys() == {"input_ids", "attention_mask", "pixel_values"}
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert a[0]["input_ids"].shape == (8, 52) and a[0]["input_ids"].dtype == np.int32
    assert a[0]["attention_mask"].dtype == np.int32
    assert a[0]["pixel_values"].shape == (8, S, S, 3) and a[0]["pixel_values"].dtype == np.uint8
    assert not np.array_equal(a[0]["pixel_values"], c["pixel_values"])


def test_epochs_cover_everything_and_are_reshuffled():
    cfg = _demo_cfg(12)
    source = demo.DemoSource(image_size=S, num_train=12, seed=0)
    it = train_iterator(cfg, global_batch_size=4, seed=0, image_size=S, process_index=0, process_count=1)
    epochs = [sum((_index_of_rows(next(it), source) for _ in range(3)), []) for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(12))
    assert epochs[0] != epochs[1]


def test_two_processes_read_disjoint_shards_covering_everything():
    cfg = _demo_cfg(11)  # odd: shards of 6 and 5
    source = demo.DemoSource(image_size=S, num_train=11, seed=0)
    seen = []
    for p, n in ((0, 6), (1, 5)):
        it = train_iterator(cfg, global_batch_size=2, seed=0, image_size=S, process_index=p, process_count=2)
        rows = sum((_index_of_rows(next(it), source) for _ in range(n)), [])
        assert len(set(rows)) == n
        seen.append(set(rows))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(11))


def test_token_ids_equal_the_processor_and_the_reference_tokenizer():
    cfg = _demo_cfg(16)
    source = demo.DemoSource(image_size=S, num_train=16, seed=0)
    batch = next(train_iterator(cfg, global_batch_size=8, seed=1, image_size=S, process_index=0, process_count=1))
    texts = [source[i]["text"] for i in _index_of_rows(batch, source)]
    ref = _tokens(texts)
    np.testing.assert_array_equal(batch["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"], ref["attention_mask"])
    from chinese_clip_jax.processing import ChineseCLIPProcessor

    np.testing.assert_array_equal(batch["input_ids"], ChineseCLIPProcessor().tokenize(texts)["input_ids"])
    # [CLS] + one token per Chinese character + [SEP]
    assert batch["attention_mask"][0].sum() == len(texts[0]) + 2


def test_get_state_set_state_resumes_exactly():
    cfg = _demo_cfg(10)
    it = train_iterator(cfg, global_batch_size=4, seed=7, image_size=S, process_index=0, process_count=1)
    _take(it, 3)  # crosses an epoch boundary (10 samples)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 4)
    resumed = train_iterator(cfg, global_batch_size=4, seed=7, image_size=S, process_index=0, process_count=1)
    resumed.set_state(state)
    for x, y in zip(expected, _take(resumed, 4)):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    with pytest.raises(ValueError, match="lacks keys"):
        resumed.set_state({"next_index": 3})


def test_undecodable_samples_are_skipped_counted_and_survive_resume(caplog):
    rng = np.random.default_rng(0)
    good = [
        {"image": png(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)), "text": f"第{i}张", "where": f"s:{i}"}
        for i in range(6)
    ]
    bad = [
        {"image": b"not an image", "text": "坏", "where": "s:bad1"},
        {"image": png(np.zeros((8, 8, 3), np.uint8)), "text": "", "where": "s:empty-caption"},
    ]
    source = good[:3] + bad[:1] + good[3:] + bad[1:]

    def make():
        return _iterator(source, 3, seed=0, num_threads=1)

    it = make()
    with caplog.at_level("WARNING"):
        _take(it, 2)  # exactly one epoch of good samples: both bad ones were met
    assert it.stats["skipped"] == 2 and it.stats["samples"] == 6
    assert "s:bad1" in caplog.text and "s:empty-caption" in caplog.text
    state = it.get_state()
    later = _take(it, 2)
    again = make()
    again.set_state(state)
    for x, y in zip(later, _take(again, 2)):
        np.testing.assert_array_equal(x["pixel_values"], y["pixel_values"])
    assert again.stats == it.stats


def test_all_bad_source_raises_instead_of_spinning():
    source = [{"image": b"junk", "text": "坏", "where": f"s:{i}"} for i in range(3)]
    it = _iterator(source, 2, seed=0, num_threads=1)
    with pytest.raises(RuntimeError, match="could not be decoded"):
        next(it)


def test_pixel_normalisation_by_hand():
    image = np.zeros((S, S, 3), np.uint8)
    image[0, 0] = (255, 128, 0)
    out = ImageDecoder(S)(image)
    assert out.shape == (3, S, S)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    for c, v in enumerate((255, 128, 0)):
        assert out[c, 0, 0] == pytest.approx((v / 255 - mean[c]) / std[c], abs=1e-6)
        assert out[c, 1, 1] == pytest.approx((0 - mean[c]) / std[c], abs=1e-6)


def test_encoded_images_match_transformers_image_processor():
    from transformers import ChineseCLIPImageProcessor

    rgb = np.random.default_rng(1).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    ref = ChineseCLIPImageProcessor(size={"shortest_edge": S}, crop_size={"height": S, "width": S})
    expected = ref(PIL.Image.fromarray(rgb), return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(ImageDecoder(S)(png(rgb)), expected, atol=1e-5)


def test_text_encoder_matches_reference_including_truncation():
    texts = ["左上角有一个红色的圆形", "长" * 80, "蓝色的星形"]
    out = CachingTokenizer(52)(texts + texts[:1])
    ref = _tokens(texts + texts[:1])
    np.testing.assert_array_equal(out["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(out["attention_mask"], ref["attention_mask"])


def test_unseen_combinations_never_in_training_but_each_part_is():
    colors, shapes = list(demo.COLORS), list(demo.SHAPES)
    assert len(demo.CLASS_NAMES) >= 12
    unseen = {(colors[c], shapes[s]) for c, s in demo.UNSEEN_COMBOS}
    train_parts = {(colors[c], shapes[s]) for c, s in demo.TRAIN_COMBOS}
    assert {c for c, _ in train_parts} == set(colors) and {s for _, s in train_parts} == set(shapes)
    source = demo.DemoSource(image_size=16, num_train=1500, seed=0)
    found = set()
    for i in range(len(source)):
        text = source[i]["text"]
        pairs = {(c, s) for c in colors for s in shapes if c in text and s in text}
        assert len(pairs) == 1, text
        assert not pairs & unseen, text
        found |= pairs
    assert found == train_parts


def test_demo_eval_sets():
    cfg = _demo_cfg()
    sets = eval_sets(cfg, image_size=S)
    assert set(sets) == {"zeroshot", "zeroshot_unseen", "retrieval"}
    n_classes = len(demo.CLASS_NAMES)
    for name, combos in (("zeroshot", demo.TRAIN_COMBOS), ("zeroshot_unseen", demo.UNSEEN_COMBOS)):
        z = sets[name]
        assert len(z["images"]) == 2 * len(combos) and z["images"][0].shape == (S, S, 3)
        assert z["labels"].shape == (2 * len(combos),) and z["labels"].max() < n_classes
        assert len(z["class_names"]) == len(z["class_texts"]) == n_classes
        assert {int(x) for x in z["labels"]} == {demo.class_label(c, s) for c, s in combos}
    unseen_labels = {demo.class_label(c, s) for c, s in demo.UNSEEN_COMBOS}
    assert not unseen_labels & set(sets["zeroshot"]["labels"].tolist())
    # held-out images are fresh: none equals a training image
    train = demo.DemoSource(image_size=S, num_train=200, seed=0)
    train_bytes = {ImageDecoder(S)(train[i]["image"]).tobytes() for i in range(200)}
    zs = sets["zeroshot"]["images"]
    assert not any(ImageDecoder(S)(zs[i]).tobytes() in train_bytes for i in range(len(zs)))
    # the lazy images are those eval_images draws at once
    np.testing.assert_array_equal(
        np.stack([zs[i] for i in range(len(zs))]), demo.eval_images("zeroshot", image_size=S, count=len(zs))[0]
    )
    r = sets["retrieval"]
    assert len(r["images"]) == 24 and r["input_ids"].shape == (24, 52)
    for t, positives in enumerate(r["text_to_images"]):
        assert t in positives
        assert all(0 <= i < 24 for i in positives)


# ---------------------------------------------------------------- file sources


def _epoch_rows(it, n_batches):
    """(input_ids bytes, pixel bytes) of every row in n_batches batches."""
    rows = []
    for _ in range(n_batches):
        b = next(it)
        rows += [(i.tobytes(), p.tobytes()) for i, p in zip(b["input_ids"], b["pixel_values"])]
    return rows


def _expected_rows(pairs):
    ids = CachingTokenizer(52)([t for t, _ in pairs])["input_ids"]
    return sorted((i.tobytes(), ImageDecoder(S, uint8=True)(img).tobytes()) for i, (_, img) in zip(ids, pairs))


@pytest.fixture
def cn_clip_dir(tmp_path):
    """train: 5 good images, 1 bad-base64 line, 1 line without a tab; 6 captions (7 pairs, one missing image)."""
    import base64

    images = {i: jpeg(i, 36, 48) for i in range(5)}
    lines = [f"{i}\t{base64.urlsafe_b64encode(b).decode()}" for i, b in images.items()]
    lines.insert(2, "99\t!!!this is not base64 at all###")
    lines.insert(4, "a line with no tab")
    (tmp_path / "train_imgs.tsv").write_text("\n".join(lines) + "\n")
    captions = [
        (0, "一只猫", [0]),
        (1, "一条狗", [1, 2]),
        (2, "红色的花", [3]),
        (3, "蓝天", [4]),
        (4, "坏图片", [99]),
        (5, "不存在的图片", [1234]),
    ]
    with open(tmp_path / "train_texts.jsonl", "w", encoding="utf-8") as f:
        for tid, text, ids in captions:
            f.write(json.dumps({"text_id": tid, "text": text, "image_ids": ids}, ensure_ascii=False) + "\n")
    (tmp_path / "valid_imgs.tsv").write_text("\n".join(lines[:2]) + "\n")
    (tmp_path / "valid_texts.jsonl").write_text(
        json.dumps({"text_id": 0, "text": "两张图", "image_ids": [0, 1]}, ensure_ascii=False)
        + "\n"
        + json.dumps({"text_id": 1, "text": "第一张", "image_ids": [0]}, ensure_ascii=False)
        + "\n"
    )
    good = [
        ("一只猫", images[0]),
        ("一条狗", images[1]),
        ("一条狗", images[2]),
        ("红色的花", images[3]),
        ("蓝天", images[4]),
    ]
    return tmp_path, captions, images, good


def _cn_clip_cfg(root, fmt="tsv"):
    cfg = default_data_config("cn_clip")
    cfg.cn_clip.root, cfg.cn_clip.format = str(root), fmt
    cfg.num_threads, cfg.prefetch_buffer_size = 1, 4
    return cfg


def test_cn_clip_tsv_skips_bad_base64_and_counts(cn_clip_dir, caplog):
    root, _, _, good = cn_clip_dir
    with caplog.at_level("WARNING"):
        it = train_iterator(
            _cn_clip_cfg(root), global_batch_size=5, seed=0, image_size=S, process_index=0, process_count=1
        )
        rows = _epoch_rows(it, 1)  # the 6 pairs with an image id in the TSV, one of them undecodable
    assert sorted(rows) == _expected_rows(good)
    assert it.stats == {"skipped": 1, "skipped_at_index": 2, "samples": 5}
    assert "train_imgs.tsv:5" in caplog.text  # the line with no tab, named by line
    assert "train_imgs.tsv:3" in caplog.text  # the bad base64 line


def test_cn_clip_eval_retrieval(cn_clip_dir):
    root = cn_clip_dir[0]
    r = eval_sets(_cn_clip_cfg(root), image_size=S)["retrieval"]
    assert r["texts"] == ["两张图", "第一张"]
    assert r["text_to_images"] == [[0, 1], [0]]
    assert len(r["images"]) == 2 and r["input_ids"].shape == (2, 52)
    np.testing.assert_array_equal(ImageDecoder(S)(r["images"][1]), ImageDecoder(S)(cn_clip_dir[2][1]))


def test_cn_clip_lmdb_build_gives_the_same_samples(cn_clip_dir):
    lmdb = pytest.importorskip("lmdb")
    import pickle

    root, captions, _, good = cn_clip_dir
    split = root / "lmdb" / "train"
    split.mkdir(parents=True)
    with lmdb.open(str(split / "pairs"), map_size=1 << 24) as env, env.begin(write=True) as txn:
        k = 0
        for tid, text, ids in captions:
            for image_id in ids:
                txn.put(str(k).encode(), pickle.dumps((image_id, tid, text)))
                k += 1
        txn.put(b"num_samples", str(k).encode())
    with lmdb.open(str(split / "imgs"), map_size=1 << 24) as env, env.begin(write=True) as txn:
        for line in (root / "train_imgs.tsv").read_text().splitlines():
            if "\t" in line:
                image_id, b64 = line.split("\t")
                txn.put(image_id.encode(), b64.encode())
    it = train_iterator(
        _cn_clip_cfg(root, "lmdb"), global_batch_size=5, seed=0, image_size=S, process_index=0, process_count=1
    )
    assert sorted(_epoch_rows(it, 1)) == _expected_rows(good)
    # bad base64 (99) and the missing image (1234) are both skipped when read
    assert it.stats["skipped"] == 2


def test_webdataset_shards_skip_bad_jpeg_and_count(tmp_path, caplog):
    imgs = [jpeg(10 + i, 36, 48) for i in range(4)]
    write_tar(
        tmp_path / "00000.tar",
        [
            ("000000000.jpg", imgs[0]),
            ("000000000.txt", "一只猫".encode()),
            ("000000001.jpg", imgs[1]),
            ("000000001.json", json.dumps({"caption": "一条狗"}).encode()),
            ("000000002.jpg", b"\xff\xd8\xff broken jpeg"),
            ("000000002.txt", "坏的".encode()),
            ("000000003.txt", "没有图片".encode()),
        ],
    )
    write_tar(
        tmp_path / "00001.tar",
        [
            ("a/000000004.jpg", imgs[2]),
            ("a/000000004.txt", "红色的花".encode()),
            ("000000005.png", png(np.full((20, 30, 3), 7, np.uint8))),
            ("000000005.txt", "灰色".encode()),
        ],
    )
    cfg = default_data_config("webdataset")
    cfg.webdataset.shards = str(tmp_path / "{00000..00001}.tar")
    cfg.num_threads, cfg.prefetch_buffer_size = 1, 4
    with caplog.at_level("WARNING"):
        it = train_iterator(cfg, global_batch_size=4, seed=0, image_size=S, process_index=0, process_count=1)
        rows = _epoch_rows(it, 1)
    good = [
        ("一只猫", imgs[0]),
        ("一条狗", imgs[1]),
        ("红色的花", imgs[2]),
        ("灰色", png(np.full((20, 30, 3), 7, np.uint8))),
    ]
    assert sorted(rows) == _expected_rows(good)
    assert it.stats == {"skipped": 1, "skipped_at_index": 1, "samples": 4}
    assert "00000.tar:000000002" in caplog.text and "00000.tar:000000003" in caplog.text
    cfg.webdataset.eval_shards = str(tmp_path / "00001.tar")
    r = eval_sets(cfg, image_size=S)["retrieval"]
    assert r["texts"] == ["红色的花", "灰色"] and r["text_to_images"] == [[0], [1]]


def test_missing_files_are_named(tmp_path):
    cfg = default_data_config("webdataset")
    cfg.webdataset.shards = str(tmp_path / "{00000..00001}.tar")
    with pytest.raises(FileNotFoundError, match="00000.tar"):
        train_iterator(cfg, global_batch_size=2, seed=0, image_size=S, process_index=0, process_count=1)
    cfg = _cn_clip_cfg(tmp_path)
    with pytest.raises(FileNotFoundError, match="train_imgs.tsv"):
        train_iterator(cfg, global_batch_size=2, seed=0, image_size=S, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="process count"):
        train_iterator(_demo_cfg(), global_batch_size=3, seed=0, image_size=S, process_index=0, process_count=2)


def test_default_threaded_reader_is_deterministic_and_resumes():
    cfg = default_data_config("demo")  # 2 reader threads, as in training
    cfg.demo.num_train = 40

    def make():
        return train_iterator(cfg, global_batch_size=16, seed=5, image_size=S, process_index=0, process_count=1)

    it = make()
    first = _take(it, 2)
    state = it.get_state()
    rest = _take(it, 3)
    it.close()
    again = make()
    for x, y in zip(first + rest, _take(again, 5)):
        np.testing.assert_array_equal(x["pixel_values"], y["pixel_values"])
    resumed = make()
    resumed.set_state(state)
    for x, y in zip(rest, _take(resumed, 3)):
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
        np.testing.assert_array_equal(x["pixel_values"], y["pixel_values"])


_WORKER = r"""
import json, sys
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from chinese_clip_jax.data import default_data_config, demo, train_iterator
from chinese_clip_jax.data.pipeline import ImageDecoder
cfg = default_data_config("demo")
cfg.demo.num_train, cfg.num_threads = 10, 1
src = demo.DemoSource(image_size=16, num_train=10, seed=0)
table = {ImageDecoder(16, uint8=True)(src[i]["image"]).tobytes(): i for i in range(10)}
it = train_iterator(cfg, global_batch_size=2, seed=0, image_size=16)  # process index/count from jax
rows = [table[p.tobytes()] for _ in range(5) for p in next(it)["pixel_values"]]
print("ROWS", json.dumps([jax.process_index(), jax.process_count(), rows]))
"""


@pytest.mark.slow
def test_jax_distributed_processes_read_their_own_shards(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), f"localhost:{port}", str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(next(l for l in out.splitlines() if l.startswith("ROWS"))[5:]))
    (i0, n0, rows0), (i1, n1, rows1) = sorted(results)
    assert (i0, i1, n0, n1) == (0, 1, 2, 2)
    assert sorted(rows0) == list(range(5)) and sorted(rows1) == list(range(5, 10))


def _mixed_source(n=45, bad=(3, 31, 32, 40)):
    """n records of distinct 8x8-patterned images; the indices in ``bad`` are undecodable."""
    rng = np.random.default_rng(1)
    return [
        {"image": b"junk", "text": "坏", "where": f"s:{i}"}
        if i in bad
        else {"image": rng.integers(0, 256, (S, S, 3), dtype=np.uint8), "text": f"第{i}张", "where": f"s:{i}"}
        for i in range(n)
    ]


def test_batches_follow_the_shuffled_record_order_across_chunks():
    """Chunking is invisible: batch k holds good records 5k..5k+4 of grain's shuffled, repeated
    index stream (the reference walks that stream one record at a time)."""
    from chinese_clip_jax.data.pipeline import CHUNK

    source = _mixed_source()
    order = grain.MapDataset.range(len(source)).shuffle(seed=2).repeat(None)
    good = [int(order[i]) for i in range(4 * len(source)) if isinstance(source[int(order[i])]["image"], np.ndarray)]
    it = _iterator(source, 5, num_threads=2)
    n_batches = 3 * len(source) // 5  # several epochs and chunks of CHUNK records
    assert n_batches * 5 > 2 * CHUNK
    got = [row.tobytes() for _ in range(n_batches) for row in next(it)["pixel_values"]]
    assert got == [source[i]["image"].tobytes() for i in good[: n_batches * 5]]
    assert it.stats["samples"] == n_batches * 5 and it.stats["skipped"] > 0


def test_resume_from_any_batch_inside_a_chunk_is_exact():
    source = _mixed_source()
    it = _iterator(source, 5, num_threads=1)
    states, batches = [], []
    for _ in range(24):
        states.append(json.loads(json.dumps(it.get_state())))
        batches.append(next(it))
    for k in (0, 1, 6, 7, 13, 19):  # positions inside and at the ends of chunks, across epochs
        again = _iterator(source, 5, num_threads=2)
        again.set_state(states[k])
        for want in batches[k : k + 4]:
            got = next(again)
            np.testing.assert_array_equal(got["pixel_values"], want["pixel_values"])
            np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
        assert again.stats == _replay_stats(source, k + 4)
        again.close()


def _replay_stats(source, n_batches):
    it = _iterator(source, 5, num_threads=1)
    for _ in range(n_batches):
        next(it)
    return it.stats


def test_state_saved_before_chunks_resumes_at_the_same_record():
    """A state written by the record-at-a-time pipeline (grain counted records) continues at the
    record it names: samples + skipped records into the stream."""
    source = _mixed_source()
    it = _iterator(source, 5, num_threads=1)
    for _ in range(9):
        next(it)
    new_state = it.get_state()
    legacy = {"grain": {"next_index": it.stats["samples"] + it.stats["skipped"]}, **it.stats}
    legacy.pop("skipped_at_index")
    a, b = _iterator(source, 5), _iterator(source, 5)
    a.set_state(new_state)
    b.set_state(legacy)
    for _ in range(3):
        np.testing.assert_array_equal(next(a)["pixel_values"], next(b)["pixel_values"])
    with pytest.raises(ValueError, match="worker_count=0"):
        _iterator(source, 5).set_state({**legacy, "grain": {"workers_state": {}}})


def test_uint8_batches_normalised_on_device_equal_the_processor():
    """The train step's device normalisation (encoding.model_pixels) gives exactly the float
    pixels the host decoder (transformers' processor, pinned above) gives."""
    import jax

    from chinese_clip_jax.inference.encoding import model_pixels

    rng = np.random.default_rng(3)
    source = [{"image": png(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)), "text": "图", "where": "p"}] * 3
    batch = next(_iterator(source, 3))
    assert batch["pixel_values"].dtype == np.uint8 and batch["pixel_values"].shape == (3, S, S, 3)
    on_device = np.asarray(jax.jit(model_pixels)(batch["pixel_values"]))
    want = ImageDecoder(S)(source[0]["image"])  # float32 (3, S, S), normalised on the host
    for row in on_device:
        np.testing.assert_array_equal(row, want)
    floats = np.zeros((2, 3, S, S), np.float32)
    assert model_pixels(floats) is floats
