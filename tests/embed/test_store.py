"""ccj-embed's files are never half-trusted: a damaged shard is rebuilt on a rerun (and the run
says so), load_embeddings and the index name the damaged file, an index built from other
embeddings is refused, a corpus with no readable record is an error with nothing marked complete,
and a bad --out (a file, another tool's manifest) is one line before any work."""

import json

import numpy as np
import PIL.Image
import pytest
from _makers import copy_files, file_digests, run_embed
from _train_helpers import random_params, tiny_config

import chinese_clip_jax as ccj
from chinese_clip_jax import embed

N = 7  # images; shards of 2: four shards, the last of one record


@pytest.fixture(scope="module")
def integrity_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    cfg = tiny_config(vocab_size=21128, max_positions=64, image_size=32, patch_size=8)
    ccj.save_pretrained(str(root / "model"), cfg, random_params(cfg))
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for i in range(N):
        PIL.Image.fromarray(rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
    (root / "broken").mkdir()
    for i in range(3):
        (root / "broken" / f"{i}.jpg").write_bytes(b"not a jpeg")
    return root


def _args(integrity_corpus, images="images"):
    return [
        "--model",
        integrity_corpus / "model",
        "--images",
        integrity_corpus / images,
        "--shard-size",
        2,
        "--batch-size",
        2,
    ]


def _embed_in_process(integrity_corpus, out):
    model, params = ccj.from_pretrained(str(integrity_corpus / "model"))
    opts = embed.EmbedOptions(shard_size=2, batch_size=2, dtype="float32", progress=False)
    return embed.embed_images(
        model, params, embed.open_images(str(integrity_corpus / "images")), out, model_name="tiny", options=opts
    )


@pytest.fixture(scope="module")
def whole_run(integrity_corpus, tmp_path_factory):
    """An uninterrupted CLI run with its index."""
    out = tmp_path_factory.mktemp("whole_run")
    res = run_embed(*_args(integrity_corpus), "--out", out, "--no-progress", *(["--index"] if _has_faiss() else []))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def _has_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def test_truncated_shard_of_a_complete_run_is_rebuilt_and_named(integrity_corpus, whole_run, tmp_path):
    out = copy_files(whole_run, tmp_path / "out")
    npy = out / "images-00001.npy"
    size = npy.stat().st_size
    npy.write_bytes(npy.read_bytes()[:80])  # a copy cut short
    with pytest.raises(embed.EmbedError) as e:
        embed.load_embeddings(out)
    assert str(e.value) == (
        f"{out}: images-00001.npy is 80 bytes, {size} recorded in images.json: the file is damaged; rerun "
        "ccj-embed with the same arguments to rebuild it"
    )
    rerun = run_embed(*_args(integrity_corpus), "--out", out, "--no-progress")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"shard 1: images-00001.npy is 80 bytes, {size} recorded: rebuilt" in rerun.stderr
    assert f"3 kept from an earlier run, 1 rebuilt (shard 1: images-00001.npy is 80 bytes, {size} recorded)" in (
        rerun.stderr
    )
    assert file_digests(out) == file_digests(whole_run)  # the bytes of the uninterrupted run (its index still matches)


def test_same_size_corruption_is_caught_by_the_checksum(integrity_corpus, tmp_path):
    out = tmp_path / "out"
    _embed_in_process(integrity_corpus, out)
    npy = out / "images-00002.npy"
    data = bytearray(npy.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit: same size
    npy.write_bytes(bytes(data))
    with pytest.raises(embed.EmbedError, match=r"images-00002.npy: checksum mismatch .* in images.json"):
        embed.load_embeddings(out)
    report = _embed_in_process(integrity_corpus, out)
    assert report.kept == 3 and report.shards == 1 and report.rebuilt[0].startswith("shard 2: images-00002.npy")
    assert len(embed.load_embeddings(out)) == N


def test_damaged_table_or_id_file_is_named(integrity_corpus, tmp_path):
    out = tmp_path / "out"
    _embed_in_process(integrity_corpus, out)
    (out / "images-ids.jsonl").write_text('"0.png"\n', encoding="utf-8")
    with pytest.raises(embed.EmbedError, match=r"images-ids.jsonl is 8 bytes, \d+ recorded in images.json"):
        embed.load_embeddings(out)
    (out / "images-00003.json").write_text('{"shard": 3, "ids": ["6.p', encoding="utf-8")  # a torn table
    report = _embed_in_process(integrity_corpus, out)
    assert report.rebuilt == [
        "shard 3: images-00003.json is not a whole shard table (JSONDecodeError: Unterminated string starting at: "
        "line 1 column 22 (char 21))"
    ]
    assert len(embed.load_embeddings(out)) == N  # the id table is written again by the finished run


def test_index_from_other_embeddings_or_damaged_is_refused(integrity_corpus, whole_run, tmp_path):
    pytest.importorskip("faiss")
    other = tmp_path / "other"
    _embed_in_process(integrity_corpus, other)  # float32 rows: another run's files
    out = copy_files(whole_run, tmp_path / "out")
    for name in ("images.faiss", "images.faiss.json"):
        embed.build_index(other)
        (out / name).write_bytes((other / name).read_bytes())
    with pytest.raises(embed.EmbedError) as e:
        embed.EmbeddingIndex.open(out)
    assert str(e.value) == (
        f"{out / 'images.faiss'} was built from other embeddings than images.json lists now (shards rebuilt or "
        "rewritten since); rebuild it with ccj-embed ... --index (the same arguments) or embed.build_index(OUT)"
    )
    embed.build_index(out)
    assert len(embed.EmbeddingIndex.open(out).ids) == N
    index = out / "images.faiss"
    index.write_bytes(index.read_bytes()[:-4])
    with pytest.raises(embed.EmbedError, match=r"images.faiss is \d+ bytes, \d+ recorded in images.faiss.json: the"):
        embed.EmbeddingIndex.open(out)
    (out / "images.faiss.json").unlink()
    with pytest.raises(embed.EmbedError, match=r"images.faiss: its record images.faiss.json is missing or unreadable"):
        embed.EmbeddingIndex.open(out)


def test_corpus_with_no_readable_image_is_an_error_with_nothing_complete(integrity_corpus, tmp_path):
    out = tmp_path / "out"
    res = run_embed(
        *_args(integrity_corpus, "broken"), "--out", out, "--no-progress", *(["--index"] if _has_faiss() else [])
    )
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert lines == [
        f"error: {out}: none of the 3 images records could be read (the first: 0.jpg: UnidentifiedImageError: "
        "cannot identify image file the image); nothing marked complete; every reason is in images-bad.jsonl"
    ]
    assert res.stderr.strip().splitlines()[-1] == lines[0]
    assert not json.loads((out / "images.json").read_text()).get("complete")
    assert not (out / "images.faiss").exists() and not (out / "images-ids.jsonl").exists()
    assert len((out / "images-bad.jsonl").read_text().splitlines()) == 3
    with pytest.raises(embed.EmbedError, match="the run is not complete"):
        embed.load_embeddings(out)


def test_query_of_an_empty_index_returns_no_hits():
    faiss = pytest.importorskip("faiss")
    index = embed.EmbeddingIndex(faiss.IndexFlatIP(4), [], {})
    assert index.search(np.ones((2, 4), np.float32), k=3) == [[], []]
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        index.search(np.ones((1, 4), np.float32), k=0)


def test_out_that_is_a_file_is_one_line(integrity_corpus, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine\n")
    res = run_embed(*_args(integrity_corpus), "--out", target)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"error: --out {target}: is a file, not a directory; give a new or empty directory"
    ]
    assert target.read_text() == "mine\n"


def test_foreign_manifest_is_named_as_foreign(integrity_corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "images.json").write_text('{"images": ["a.png", "b.png"]}\n')  # another tool's images.json
    res = run_embed(*_args(integrity_corpus), "--out", out)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f'error: {out / "images.json"}: not a ccj-embed manifest (no "format": "ccj-embed/1"); it belongs to '
        "another tool or version: use another --out"
    ]
    (out / "images.json").write_text("[1, 2]\n")
    res = run_embed(*_args(integrity_corpus), "--out", out)
    assert (
        res.stderr.strip()
        .splitlines()[0]
        .endswith(
            'not a ccj-embed manifest (no "format": "ccj-embed/1"); it '
            "belongs to another tool or version: use another --out"
        )
    )
    assert (out / "images.json").read_text() == "[1, 2]\n"


def test_context_length_beyond_the_model_names_the_option(integrity_corpus, tmp_path):
    (tmp_path / "t.txt").write_text("一只猫\n", encoding="utf-8")
    model, params = ccj.from_pretrained(str(integrity_corpus / "model"))
    opts = embed.EmbedOptions(context_length=100, progress=False)
    with pytest.raises(ValueError) as e:
        embed.embed_texts(
            model, params, embed.read_texts(str(tmp_path / "t.txt")), tmp_path / "o", model_name="t", options=opts
        )
    assert (
        str(e.value)
        == "context_length (--context-length) 100: more than the model's 64 text positions; give 64 or less"
    )
    assert not (tmp_path / "o").exists()


def test_deleted_shard_of_a_complete_run_is_rebuilt_and_the_run_reopened(integrity_corpus, tmp_path):
    out = tmp_path / "out"
    _embed_in_process(integrity_corpus, out)
    before = file_digests(out)
    (out / "images-00000.json").unlink()
    (out / "images-00000.npy").unlink()
    report = _embed_in_process(integrity_corpus, out)
    assert report.rebuilt == ["shard 0: images-00000.json is missing"] and report.shards == 1 and report.kept == 3
    assert file_digests(out) == before


def test_over_max_bad_exits_1_and_leaves_the_run_not_complete(integrity_corpus, tmp_path):
    mixed = copy_files(integrity_corpus / "images", tmp_path / "mixed")
    (mixed / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    args = ["--model", integrity_corpus / "model", "--images", mixed, "--shard-size", 2, "--batch-size", 2]
    res = run_embed(*args, "--out", out, "--no-progress", "--max-bad", 0)
    assert res.returncode == 1, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: more than 0 of {N + 1} records could not be read")
    assert not json.loads((out / "images.json").read_text()).get("complete")
    with pytest.raises(embed.EmbedError, match="not complete"):
        embed.load_embeddings(out)
    again = run_embed(*args, "--out", out, "--no-progress", "--max-bad", 1)  # a larger cap: no re-embedding
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 kept from an earlier run" in again.stderr
    assert len(embed.load_embeddings(out)) == N
