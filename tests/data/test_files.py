"""The ``files`` source: a CSV/TSV/JSONL table of image paths and captions, for training (exact
resume after a kill, per-process shards, bad images skipped and counted), data.build and ccj-eval.

References: the pairs written here by hand, tfds' own reader for the build, and the cn_clip
layout of the same pairs (itself pinned to transformers in test_evaluate_cli) for retrieval.
"""

import base64
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
from _makers import REPO, write_csv, write_images

from chinese_clip_jax.data import check_config, default_data_config, train_iterator
from chinese_clip_jax.data import files as files_mod


def _csv_table(root, n=12):
    """n images, image 0 with a second caption on its own row, image 1 with a JSON list of two,
    one undecodable image; returns (table path, [(relative image, caption)] of the good pairs)."""
    names = write_images(root, n)
    rows = [(name, f"第{i}张图片") for i, name in enumerate(names)]
    rows.insert(1, (names[0], "又是第0张"))
    rows[2] = (names[1], json.dumps(["第1张图片", "第一张的另一个说法"], ensure_ascii=False))
    rows.append(("imgs/bad.png", "坏图片"))
    write_csv(root / "pairs.csv", rows)
    good = [(name, c) for name, cap in rows[:-1] for c in (json.loads(cap) if cap.startswith("[") else [cap])]
    return root / "pairs.csv", good


def _files_config(table, **files):
    c = default_data_config("files")
    c.files.table = str(table)
    c.files.update(files)
    c.num_threads = 1
    c.prefetch_buffer_size = 8
    return c


def _batches(it, n):
    return [next(it) for _ in range(n)]


def test_a_table_reads_every_pair_with_its_row_and_resumes_exactly(tmp_path):
    table, good = _csv_table(tmp_path)
    source = files_mod.FilesSource(files_mod.read_table(table))
    assert len(source) == len(good) + 1  # + the undecodable one, skipped later
    got = [(source.pair(i)[0], source.pair(i)[1]) for i in range(len(good))]
    assert got == [(str(tmp_path / name), c) for name, c in good]
    rec = source[0]
    assert rec["image"] == (tmp_path / good[0][0]).read_bytes() and rec["where"] == f"{table} row 2"
    assert pickle.loads(pickle.dumps(source))[3] == source[3]  # grain workers get a copy

    cfg = _files_config(table)
    it = train_iterator(
        cfg, global_batch_size=4, seed=3, image_size=16, context_length=16, process_count=1, process_index=0
    )
    first = _batches(it, 2)
    state = json.loads(json.dumps(it.get_state()))
    rest = _batches(it, 6)  # 32 samples: more than an epoch, so the bad image was met and skipped
    assert it.stats["skipped"] >= 1 and it.stats["samples"] == 32
    again = train_iterator(
        cfg, global_batch_size=4, seed=3, image_size=16, context_length=16, process_count=1, process_index=0
    )
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(first, _batches(again, 2), strict=True) for k in a)
    again.set_state(state)
    for a, b in zip(rest, _batches(again, 6), strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert again.stats == it.stats
    # the first epoch (15 records, one bad) yields each good pair once
    from chinese_clip_jax.data.pipeline import CachingTokenizer

    epoch = np.concatenate([b["input_ids"] for b in first + rest])[: len(good)]
    want = CachingTokenizer(16)([c for _, c in good])["input_ids"]
    assert sorted(map(bytes, epoch)) == sorted(map(bytes, want))


def test_two_processes_read_disjoint_halves_covering_the_table(tmp_path):
    names = write_images(tmp_path, 8, bad=False)
    write_csv(tmp_path / "t.tsv", [(n, f"图{i}") for i, n in enumerate(names)], delimiter="\t")
    cfg = _files_config(tmp_path / "t.tsv")
    seen = []
    for p in range(2):
        it = train_iterator(
            cfg, global_batch_size=8, seed=0, image_size=16, context_length=16, process_index=p, process_count=2
        )
        batch = next(it)  # 4 per process = one epoch of its half
        seen.append({bytes(row) for row in batch["input_ids"]})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 8


def test_bad_tables_fail_in_one_line_naming_the_row_and_column(tmp_path):
    names = write_images(tmp_path, 3, bad=False)
    write_csv(tmp_path / "cols.csv", [(n, "x") for n in names], header=("path", "text"))
    with pytest.raises(ValueError, match=r"cols.csv: no column 'image' \(columns: \['path', 'text'\]\)"):
        check_config(_files_config(tmp_path / "cols.csv"))
    check_config(_files_config(tmp_path / "cols.csv", image_key="path", caption_key="text"))  # configurable names

    write_csv(tmp_path / "missing.csv", [(names[0], "a"), ("imgs/nope.png", "b")])
    with pytest.raises(ValueError, match=r"missing.csv row 3, column 'image': image '.*imgs/nope.png' does not exist"):
        check_config(_files_config(tmp_path / "missing.csv"))

    (tmp_path / "t.jsonl").write_text(
        json.dumps({"image": names[0], "caption": "好"}) + "\n" + json.dumps({"image": names[1], "caption": ""}) + "\n"
    )
    with pytest.raises(ValueError, match=r"t.jsonl row 2, column 'caption': a caption must be a non-empty string"):
        check_config(_files_config(tmp_path / "t.jsonl"))
    (tmp_path / "t.jsonl").write_text(json.dumps({"img": names[0], "caption": "好"}) + "\n")
    with pytest.raises(ValueError, match=r"t.jsonl row 1: no column 'image'"):
        check_config(_files_config(tmp_path / "t.jsonl"))
    with pytest.raises(ValueError, match=r"data.files.table 'x.parquet': must end in .csv, .tsv, .jsonl"):
        check_config(_files_config("x.parquet"))
    with pytest.raises(ValueError, match=r"data.files.table: set it"):
        check_config(_files_config(""))


def test_gs_table_with_relative_and_absolute_images_reads_equal_to_local(tmp_path, fake_gcs):
    from chinese_clip_jax.io import as_path

    names = write_images(tmp_path, 4, bad=False)
    rows = [{"image": n, "caption": [f"图{i}", f"第{i}"]} for i, n in enumerate(names[:3])]
    rows.append({"image": str(tmp_path / names[3]), "caption": "本地的绝对路径"})  # absolute, local
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (tmp_path / "t.jsonl").write_text(text, encoding="utf-8")
    for n in names:
        as_path(f"gs://bucket/set/{n}").parent.mkdir(parents=True, exist_ok=True)
        as_path(f"gs://bucket/set/{n}").write_bytes((tmp_path / n).read_bytes())
    as_path("gs://bucket/set/t.jsonl").write_text(text)
    local = files_mod.FilesSource(files_mod.read_table(tmp_path / "t.jsonl"))
    remote = files_mod.FilesSource(files_mod.read_table("gs://bucket/set/t.jsonl"))
    assert len(local) == len(remote) == 7
    assert remote.pair(0)[0] == "gs://bucket/set/imgs/0.png" and remote.pair(6)[0] == str(tmp_path / names[3])
    assert [local[i]["image"] for i in range(7)] == [remote[i]["image"] for i in range(7)]
    assert [local[i]["text"] for i in range(7)] == [remote[i]["text"] for i in range(7)]
    assert remote[0]["where"] == "gs://bucket/set/t.jsonl row 1"


def test_data_build_format_files_reads_back_equal(tmp_path, capsys):
    pytest.importorskip("tensorflow_datasets")
    import tensorflow_datasets as tfds

    from chinese_clip_jax.data import build as build_mod

    table, good = _csv_table(tmp_path)
    out = tmp_path / "out"
    assert build_mod.main([str(table), str(out), "--format", "files", "--split", "train", "--workers", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert summary["written"] == len(good) and summary["skipped"] == 1  # bad.png
    ds = tfds.builder_from_directory(str(out)).as_data_source("train")
    got = sorted((r["image_id"].decode(), r["text"].decode(), r["image"].tobytes()) for r in ds)
    decoded = {n: np.asarray(PIL.Image.open(tmp_path / n).convert("RGB")).tobytes() for n, _ in good}
    assert got == sorted((n, c, decoded[n]) for n, c in good)
    # columns are checked before anything is written
    assert (
        build_mod.main([str(table), str(tmp_path / "o2"), "--format", "files", "--split", "x", "--caption-key", "t"])
        == 2
    )
    assert "no column 't'" in capsys.readouterr().err and not (tmp_path / "o2").exists()


@pytest.mark.slow
def test_cli_run_on_a_csv_trains_3_steps_and_resumes_exactly_after_kill9(tmp_path):
    table, _ = _csv_table(tmp_path / "data")
    script = os.path.join(REPO, "tests", "_train_run.py")
    env = dict(os.environ, PYTHONPATH=REPO)
    args = ["--files-table", str(table), "--checkpoint-every", "2"]
    ref = str(tmp_path / "ref")
    subprocess.run([sys.executable, script, ref, "3", *args], check=True, env=env, timeout=600)
    work = str(tmp_path / "killed")
    proc = subprocess.run(
        [sys.executable, script, work, "3", *args, "--kill9-after-checkpoint", "2", "--at-batch", "3"],
        env=env,
        timeout=600,
    )
    assert proc.returncode == -9
    subprocess.run([sys.executable, script, work, "3", *args], check=True, env=env, timeout=600)

    def losses(workdir):
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}

    reference, resumed = losses(ref), losses(work)
    assert sorted(resumed) == [1, 2, 3]
    for step in (1, 2, 3):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-6), step


def test_ccj_eval_retrieval_scores_a_jsonl_table_as_its_cn_clip_layout(tmp_path, capsys, save_hf_model):
    from _train_helpers import tiny_config

    from chinese_clip_jax.evaluation import cli as evaluate

    model = tmp_path / "model"
    save_hf_model(
        tiny_config(vocab_size=21128, hidden=32, heads=2, max_positions=64, image_size=32, patch_size=16), model
    )
    names = write_images(tmp_path, 5, bad=False)
    captions = [("红色的猫", [0, 1]), ("一只狗", [2]), ("蓝天", [3, 4]), ("草地", [1])]
    rows = {}
    for text, ids in captions:
        for i in ids:
            rows.setdefault(i, []).append(text)
    (tmp_path / "t.jsonl").write_text(
        "".join(json.dumps({"image": names[i], "caption": rows[i]}, ensure_ascii=False) + "\n" for i in sorted(rows)),
        encoding="utf-8",
    )
    cn = tmp_path / "cn"  # the same pairs in cn_clip's layout
    cn.mkdir()
    (cn / "valid_imgs.tsv").write_text(
        "".join(f"{i}\t{base64.urlsafe_b64encode((tmp_path / n).read_bytes()).decode()}\n" for i, n in enumerate(names))
    )
    (cn / "valid_texts.jsonl").write_text(
        "".join(
            json.dumps({"text_id": t, "text": text, "image_ids": ids}, ensure_ascii=False) + "\n"
            for t, (text, ids) in enumerate(captions)
        ),
        encoding="utf-8",
    )
    results = {}
    for name, data in (("files", tmp_path / "t.jsonl"), ("cn", cn)):
        out = tmp_path / f"{name}.json"
        argv = ["retrieval", "--model", str(model), "--data", str(data), "--batch-size", "4", "--output", str(out)]
        assert evaluate.main(argv) == 0, capsys.readouterr().err
        results[name] = json.loads(out.read_text(encoding="utf-8"))
    files_res, cn_res = results["files"], results["cn"]
    assert files_res["details"]["layout"] == "files"
    assert (files_res["counts"]["texts"], files_res["counts"]["images"]) == (4, 5), files_res["counts"]
    metrics = [k for k in cn_res["metrics"] if "R@" in k or k == "mean_recall"]
    assert metrics and {k: files_res["metrics"][k] for k in metrics} == {k: cn_res["metrics"][k] for k in metrics}


def test_a_new_source_is_one_registry_entry(monkeypatch):
    from chinese_clip_jax.data import eval_sets, registry
    from chinese_clip_jax.data.source import Source

    records = [{"image": np.full((16, 16, 3), i, np.uint8), "text": f"图{i}", "where": f"mine[{i}]"} for i in range(8)]
    mine = Source(
        name="mine",
        defaults={"count": 8},
        open_train=lambda c, *, image_size, shard: records[: c.count],
        eval_sets=lambda c, **kw: {"n": c.count},
    )
    monkeypatch.setattr(registry, "_REGISTRY", {**registry.sources(), "mine": mine})
    c = default_data_config("mine")
    assert c.mine.count == 8 and c.files.image_key == "image"  # every source's defaults
    check_config(c)
    it = train_iterator(
        c, global_batch_size=8, seed=0, image_size=16, context_length=8, process_index=0, process_count=1
    )
    assert sorted(next(it)["pixel_values"][:, 0, 0, 0].tolist()) == list(range(8))  # one epoch, each record once
    assert eval_sets(c, image_size=16) == {"n": 8}
    assert "mine" not in registry.build_formats() and "files" in registry.build_formats()
    with pytest.raises(ValueError, match=r"data.name must be one of \('demo', .*'mine'\), got 'nope'"):
        registry.get("nope")
