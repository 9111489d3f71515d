"""One data-set spec grammar (``data.spec``), one reader per kind (``data.readers``), one text
decoding path (``data.text``) and one bad-record policy (``data.bad_records``).

The done-criterion: the same spec string gives the same image ids, in the same order, to
``ccj-eval retrieval`` (``open_retrieval``), ``ccj-embed`` (``open_images``) and a trainer eval
set, named by ``data.eval_spec`` or by the source's own eval keys (``data.cn_clip.eval_split``,
``data.files.eval_table``, ``data.tfds.eval_split``, ``data.webdataset.eval_shards``); the
reference is the order the files were written in by this test.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import PIL.Image
import pytest
from _makers import write_tar

from chinese_clip_jax.data import default_data_config, eval_sets, train_iterator
from chinese_clip_jax.data.readers import open_classification, open_images, open_retrieval, read_texts
from chinese_clip_jax.data.sets import DatasetError
from chinese_clip_jax.data.spec import Spec, SpecError, parse, resolve
from chinese_clip_jax.data.text import TextDecodeError, decoded_lines

CAPTIONS = ["一只猫", "一条狗", "红色的花", "蓝天"]


def _image_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def one_set(tmp_path):
    """The same four images and captions in three layouts: a cn_clip split, a files table and an
    image folder (one class per image). -> (root, expected image ids per layout)."""
    images = [_image_bytes(i) for i in range(4)]
    cn = tmp_path / "cn"
    cn.mkdir()
    ids = [30, 10, 20, 40]  # file order, not sorted order: readers must keep it
    (cn / "valid_imgs.tsv").write_text(
        "".join(f"{i}\t{base64.b64encode(b).decode()}\n" for i, b in zip(ids, images, strict=True))
    )
    (cn / "valid_texts.jsonl").write_text(
        "".join(
            json.dumps({"text_id": t, "text": c, "image_ids": [i]}, ensure_ascii=False) + "\n"
            for t, (c, i) in enumerate(zip(CAPTIONS, ids, strict=True))
        ),
        encoding="utf-8",
    )
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    names = ["d.png", "b.png", "c.png", "a.png"]  # table order differs from sorted order
    for name, b in zip(names, images, strict=True):
        (imgs / name).write_bytes(b)
    table = tmp_path / "pairs.csv"
    table.write_text("image,caption\n" + "".join(f"imgs/{n},{c}\n" for n, c in zip(names, CAPTIONS, strict=True)))
    return tmp_path, {
        "cn_clip": [str(i) for i in ids],
        "files": [str(imgs / n) for n in names],
    }


def _ids_everywhere(spec: str) -> tuple[list, list, list]:
    """(ccj-eval retrieval's image ids, ccj-embed's record ids, the trainer eval set's image ids)."""
    evaluated = [str(i) for i in open_retrieval(spec, "valid").image_ids]
    embedded = [str(r["id"]) for r in open_images(spec, "valid").records]
    cfg = default_data_config("demo")
    cfg.eval_spec = spec
    trained = [str(i) for i in eval_sets(cfg, image_size=8)["retrieval"]["image_ids"]]
    return evaluated, embedded, trained


def _trained_by_keys(name: str, **keys) -> dict:
    """The trainer's eval set named by ``data.<name>``'s own eval keys (no ``data.eval_spec``)."""
    cfg = default_data_config(name)
    for key, value in keys.items():
        cfg[name][key] = value
    return eval_sets(cfg, image_size=8)["retrieval"]


def _ids(s: dict) -> list[str]:
    return [str(i) for i in s["image_ids"]]


def test_a_cn_clip_split_gives_the_same_ids_everywhere(one_set):
    root, expected = one_set
    for spec in (f"cn_clip:{root / 'cn'}@valid", f"cn_clip:{root / 'cn'}", str(root / "cn")):
        evaluated, embedded, trained = _ids_everywhere(spec)
        assert evaluated == embedded == trained == expected["cn_clip"], spec
    by_keys = _trained_by_keys("cn_clip", root=str(root / "cn"), eval_split="valid")
    assert _ids(by_keys) == expected["cn_clip"] and by_keys["texts"] == CAPTIONS


def test_a_cn_clip_root_with_both_layouts_gives_each_layouts_ids(one_set):
    """cn_clip's own dataset folder holds the TSV files and their LMDB build side by side:
    data.cn_clip.format picks the layout, and the ids are those ccj-eval reads from it (LMDB: key
    order; ``cn_clip:ROOT/lmdb`` spells that layout)."""
    lmdb = pytest.importorskip("lmdb")
    import pickle

    root, expected = one_set
    cn = root / "cn"
    split = cn / "lmdb" / "valid"
    split.mkdir(parents=True)
    lines = (cn / "valid_imgs.tsv").read_text().splitlines()
    with lmdb.open(str(split / "imgs"), map_size=1 << 24) as env, env.begin(write=True) as txn:
        for line in lines:
            image_id, b64 = line.split("\t")
            txn.put(image_id.encode(), b64.encode())
    with lmdb.open(str(split / "pairs"), map_size=1 << 24) as env, env.begin(write=True) as txn:
        for k, (text, image_id) in enumerate(zip(CAPTIONS, expected["cn_clip"], strict=True)):
            txn.put(str(k).encode(), pickle.dumps((int(image_id), k, text)))
        txn.put(b"num_samples", str(len(CAPTIONS)).encode())
    key_order = sorted(expected["cn_clip"])  # LMDB iterates its keys sorted
    evaluated = [str(i) for i in open_retrieval(f"cn_clip:{cn / 'lmdb'}@valid").image_ids]
    assert evaluated == key_order
    for fmt, ids in (("lmdb", key_order), ("tsv", expected["cn_clip"])):
        assert _ids(_trained_by_keys("cn_clip", root=str(cn), eval_split="valid", format=fmt)) == ids, fmt


def test_a_files_table_gives_the_same_ids_everywhere(one_set):
    root, expected = one_set
    for spec in (f"files:{root / 'pairs.csv'}", str(root / "pairs.csv")):
        evaluated, embedded, trained = _ids_everywhere(spec)
        assert evaluated == embedded == trained == expected["files"], spec
    by_keys = _trained_by_keys("files", table=str(root / "pairs.csv"), eval_table=str(root / "pairs.csv"))
    assert _ids(by_keys) == expected["files"] and by_keys["texts"] == CAPTIONS


def test_webdataset_shards_give_the_same_ids_everywhere(tmp_path):
    members = []
    for k, caption in zip(["k3", "k1", "k2"], ["一只猫", "一条狗", "一只猫"], strict=True):
        members += [(f"{k}.png", _image_bytes(len(members))), (f"{k}.txt", caption.encode())]
    write_tar(tmp_path / "00000.tar", members)
    spec = f"webdataset:{tmp_path / '00000.tar'}"
    expected = [f"{tmp_path / '00000.tar'}:{k}" for k in ("k3", "k1", "k2")]  # member order
    evaluated, embedded, trained = _ids_everywhere(spec)
    assert evaluated == embedded == trained == expected
    by_keys = _trained_by_keys("webdataset", eval_shards=str(tmp_path / "00000.tar"))
    assert _ids(by_keys) == expected
    assert by_keys["texts"] == ["一只猫", "一条狗"] and by_keys["text_to_images"] == [[0, 2], [1]]


def test_the_eval_cap_keeps_the_first_captions_and_the_images_they_name(tmp_path):
    """``eval_max_texts`` / ``eval_max_samples``: one meaning for every source (the first N
    captions of the split as ccj-eval reads it; as candidates the images they name, in the
    split's order); a cap the split does not reach changes nothing. Hand-written positives."""
    cn = tmp_path / "cn"
    cn.mkdir()
    (cn / "valid_imgs.tsv").write_text(
        "".join(f"{i}\t{base64.b64encode(_image_bytes(i)).decode()}\n" for i in (5, 6, 7))
    )
    captions = [("c0", [7]), ("c1", [5, 7]), ("c2", [6])]
    (cn / "valid_texts.jsonl").write_text(
        "".join(json.dumps({"text_id": t, "text": c, "image_ids": i}) + "\n" for t, (c, i) in enumerate(captions))
    )
    capped = _trained_by_keys("cn_clip", root=str(cn), eval_split="valid", eval_max_texts=2)
    assert _ids(capped) == ["5", "7"] and capped["texts"] == ["c0", "c1"]
    assert capped["text_to_images"] == [[1], [0, 1]] and len(capped["images"]) == 2
    assert capped["images"][0] == _image_bytes(5) and capped["image_name"](1).startswith("image 7 (")
    for cap in (3, 0):
        whole = _trained_by_keys("cn_clip", root=str(cn), eval_split="valid", eval_max_texts=cap)
        assert _ids(whole) == ["5", "6", "7"] and whole["text_to_images"] == [[2], [0, 2], [1]]
    table = tmp_path / "t.jsonl"  # the same cap through data.files.eval_max_samples
    table.write_text(
        "".join(json.dumps({"image": f"cn/{i}.png", "caption": c}) + "\n" for c, ids in captions for i in ids)
    )
    for i in (5, 6, 7):
        (cn / f"{i}.png").write_bytes(_image_bytes(i))
    capped = _trained_by_keys("files", table=str(table), eval_table=str(table), eval_max_samples=2)
    assert [i.rsplit("/", 1)[1] for i in _ids(capped)] == ["7.png", "5.png"]  # the table's image order
    assert capped["text_to_images"] == [[0], [1, 0]]


def test_a_tfds_directory_gives_the_same_ids_everywhere(one_set, capsys):
    pytest.importorskip("tensorflow_datasets")
    from chinese_clip_jax.data import build

    root, _ = one_set
    out = root / "tfds"
    # data.build takes the spec too: files:TABLE gives the format, --split names the split written
    assert build.main([f"files:{root / 'pairs.csv'}", str(out), "--split", "valid", "--workers", "1"]) == 0
    capsys.readouterr()
    expected = ["imgs/d.png", "imgs/b.png", "imgs/c.png", "imgs/a.png"]
    for spec in (f"tfds-dir:{out}@valid", f"tfds-dir:{out}", str(out)):
        evaluated, embedded, trained = _ids_everywhere(spec)
        # data.build writes the table's pairs in row order; image ids are the table's relative paths
        assert evaluated == embedded == trained == expected, spec
    by_keys = _trained_by_keys("tfds", builder_dir=str(out), eval_split="valid")
    assert _ids(by_keys) == expected and by_keys["texts"] == CAPTIONS


def test_data_build_takes_a_cn_clip_spec_and_keeps_its_records(one_set, capsys):
    tfds = pytest.importorskip("tensorflow_datasets")
    from chinese_clip_jax.data import build

    root, expected = one_set
    out = root / "built"
    assert build.main([f"cn_clip:{root / 'cn'}@valid", str(out), "--workers", "1"]) == 0
    capsys.readouterr()
    ds = tfds.builder_from_directory(str(out)).as_data_source("valid")
    assert [ds[i]["image_id"].decode() for i in range(len(ds))] == expected["cn_clip"]
    assert build.main([f"folder:{root / 'imgs'}", str(root / "o2")]) == 2
    assert "a folder spec cannot be built" in capsys.readouterr().err


def test_an_image_folder_gives_the_same_images_to_zero_shot_and_embedding(tmp_path):
    for cls, names in (("cat", ["2.png", "1.png"]), ("dog", ["3.png"])):
        (tmp_path / "f" / cls).mkdir(parents=True)
        for k, n in enumerate(names):
            (tmp_path / "f" / cls / n).write_bytes(_image_bytes(k))
    spec = f"folder:{tmp_path / 'f'}"
    classified = open_classification(spec)
    embedded = open_images(spec).records
    assert classified.class_names == ["cat", "dog"] and list(classified.labels) == [0, 0, 1]
    rel = ["cat/1.png", "cat/2.png", "dog/3.png"]
    assert list(classified.images) == [str(tmp_path / "f" / r) for r in rel]
    assert [embedded[i]["id"] for i in range(len(embedded))] == rel
    assert open_images(str(tmp_path / "f")).source == spec  # the bare directory is the same spec


@pytest.mark.parametrize(
    ("text", "kind", "location", "split"),
    [
        ("folder:/x/imgs", "folder", "/x/imgs", None),
        ("list:/x/l.txt", "list", "/x/l.txt", None),
        ("files:/x/p.jsonl", "files", "/x/p.jsonl", None),
        ("cn_clip:/data/muge@valid", "cn_clip", "/data/muge", "valid"),
        ("cn_clip:gs://b/muge@train", "cn_clip", "gs://b/muge", "train"),
        ("tfds:my_pairs:1.0.0@train[:90%]", "tfds", "my_pairs:1.0.0", "train[:90%]"),
        ("tfds-dir:/x/out", "tfds-dir", "/x/out", None),
        ("webdataset:/s/{00000..00009}.tar", "webdataset", "/s/{00000..00009}.tar", None),
        ("demo:", "demo", "", None),
        ("demo:@retrieval", "demo", "", "retrieval"),
    ],
)
def test_the_grammar(text, kind, location, split):
    assert parse(text) == Spec(kind, location, split, text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty spec"),
        ("folder:", "'folder:': empty location"),
        ("cn_clip:/x@", "'cn_clip:/x@': empty or bad split"),
        ("demo:/x", "'demo:/x': demo takes no location"),
        ("files:/x/pairs.xlsx", "'files:/x/pairs.xlsx': a files table must end in .csv, .tsv, .jsonl"),
        ("lmdb:/x", "'lmdb:/x': unknown kind 'lmdb' (kinds: folder, list, files"),
    ],
)
def test_bad_specs_are_one_line_errors_naming_the_spec(text, message):
    with pytest.raises(SpecError) as e:
        parse(text, what="--data")
    assert message in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith("--data")


def test_short_forms_and_what_a_kind_offers(tmp_path):
    (tmp_path / "x.txt").write_text("a.png\n")
    assert resolve(str(tmp_path / "pairs.tsv")).kind == "files"
    assert resolve(str(tmp_path / "x.txt")).kind == "list"
    assert resolve(str(tmp_path)).kind == "folder"
    assert resolve(f"cn_clip:{tmp_path}", default_split="valid").split == "valid"
    assert resolve(f"cn_clip:{tmp_path}@train", default_split="valid").split == "train"
    with pytest.raises(SpecError, match=r"no such directory, and not KIND:LOCATION"):
        resolve(str(tmp_path / "nowhere"))
    with pytest.raises(SpecError, match=r"a list spec offers no retrieval split .*kinds that do: files, cn_clip"):
        open_retrieval(f"list:{tmp_path / 'x.txt'}")
    with pytest.raises(SpecError, match=r"a webdataset spec offers no classification set"):
        open_classification("webdataset:/x/0.tar")


def test_ccj_train_takes_a_spec_as_data_name_and_its_keys(one_set):
    from chinese_clip_jax.data import apply_spec, check_config

    root, _ = one_set
    cfg = default_data_config("demo")
    cfg.spec = f"files:{root / 'pairs.csv'}"
    check_config(cfg)
    assert cfg.name == "files" and cfg.files.table == str(root / "pairs.csv")
    cfg = default_data_config("demo")
    cfg.spec = f"cn_clip:{root / 'cn'}@valid"
    apply_spec(cfg)
    got = (cfg.name, cfg.cn_clip.root, cfg.cn_clip.split, cfg.cn_clip.format)
    assert got == ("cn_clip", str(root / "cn"), "valid", "tsv")
    cfg = default_data_config("demo")
    cfg.spec = f"folder:{root / 'imgs'}"
    with pytest.raises(SpecError, match=r"data.spec folder:.*offers no training pairs"):
        apply_spec(cfg)
    # what ccj-train runs first: --config.data.spec=... is expanded before the other checks
    from chinese_clip_jax.training.recipes import base
    from chinese_clip_jax.training.validate import ConfigError, validate_config

    config = base.get_config()
    config.data.spec = f"files:{root / 'pairs.csv'}"
    validate_config(config, reference=base.get_config())
    assert config.data.name == "files" and config.data.files.table == str(root / "pairs.csv")
    config.data.spec = "files:/nowhere/pairs.csv"
    with pytest.raises(ConfigError, match=r"^data.files.table '/nowhere/pairs.csv' does not exist"):
        validate_config(config)


# ---------------------------------------------------------------- one text-decoding path


def test_utf8_with_or_without_bom_and_named_decode_errors(tmp_path):
    plain, bom, gbk = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    plain.write_text("猫\n狗\n", encoding="utf-8")
    bom.write_bytes("猫\n狗\n".encode("utf-8-sig"))
    gbk.write_bytes("猫\n狗\n".encode("gbk"))
    assert list(decoded_lines(plain)) == list(decoded_lines(bom)) == [(1, "猫"), (2, "狗")]
    assert list(decoded_lines(gbk, encoding="gbk")) == [(1, "猫"), (2, "狗")]
    with pytest.raises(TextDecodeError) as e:
        list(decoded_lines(gbk, what="--texts"))
    # 猫 in GBK (c3 a8) is valid UTF-8 (è): line 2 (狗: b9 b7) is the first that does not decode
    assert str(e.value) == (
        f"--texts {gbk}:2: not valid utf-8 text (byte 0xb9 at offset 0); it reads as GBK: rerun with --encoding gbk"
    )
    with pytest.raises(TextDecodeError, match="--encoding 'klingon': unknown text encoding"):
        list(decoded_lines(plain, encoding="klingon"))


def test_a_gbk_row_in_a_files_table_names_the_table_row_and_byte(one_set):
    root, _ = one_set
    table = root / "pairs.csv"
    table.write_bytes(table.read_bytes() + "imgs/a.png,狗\n".encode("gbk"))
    cfg = default_data_config("files")
    cfg.files.table = str(table)
    with pytest.raises(ValueError) as e:
        from chinese_clip_jax.data import check_config

        check_config(cfg)
    assert str(e.value) == (
        f"data.files.table: {table}:6: not valid utf-8 text (byte 0xb9 at offset 11); it reads as GBK: "
        "rerun with --config.data.files.encoding gbk"
    )
    utf8_rows = table.read_bytes()[: -len("狗\n".encode("gbk"))].decode("utf-8")
    table.write_bytes((utf8_rows + "狗\n").encode("gbk"))
    cfg.files.encoding = "gbk"  # the whole table in GBK, read as such
    check_config(cfg)
    assert open_retrieval(f"files:{table}", encoding="gbk").texts[-1] == "狗"


def test_ccj_embed_texts_take_an_encoding(tmp_path, capsys):
    from chinese_clip_jax.embed import cli

    texts = tmp_path / "t.txt"
    texts.write_bytes("一只猫\n一条狗\n".encode("gbk"))
    code = cli.main(["--model", "nowhere", "--texts", str(texts), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: --texts {texts}:") and "not valid utf-8 text" in err and "--encoding gbk" in err
    assert read_texts(texts, encoding="gbk").texts == ["一只猫", "一条狗"]
    bom = tmp_path / "b.jsonl"
    bom.write_bytes('{"text_id": 7, "text": "猫"}\n'.encode("utf-8-sig"))
    assert read_texts(bom).ids == [7]  # a BOM is no part of the first record


def test_captions_are_parsed_once(one_set):
    """ccj-eval's retrieval set and the trainer read cn_clip captions through one parser: a bad
    line is skipped and named the same way by both."""
    root, _ = one_set
    texts = root / "cn" / "valid_texts.jsonl"
    texts.write_text(texts.read_text(encoding="utf-8") + "{not json\n", encoding="utf-8")
    rset = open_retrieval(str(root / "cn"))
    assert len(rset.texts) == 4 and rset.skipped[0].startswith(f"{texts}:5: not a caption object")


# ---------------------------------------------------------------- one bad-record policy


@pytest.fixture
def with_bad(one_set):
    """one_set plus unreadable images: two zero-byte files in the table, one bad base64 line."""
    root, _ = one_set
    for n in ("bad1.png", "bad2.png"):
        (root / "imgs" / n).write_bytes(b"")
    with open(root / "pairs.csv", "a", encoding="utf-8") as f:
        f.write("imgs/bad1.png,坏一\nimgs/bad2.png,坏二\n")
    return root


def test_training_skips_counts_names_and_caps_bad_records(with_bad, capsys):
    from chinese_clip_jax.data.bad_records import TooManyBadRecords

    cfg = default_data_config("files")
    cfg.files.table = str(with_bad / "pairs.csv")
    cfg.num_threads, cfg.prefetch_buffer_size = 1, 4
    it = train_iterator(cfg, global_batch_size=4, seed=0, image_size=8, process_index=0, process_count=1)
    for _ in range(3):
        next(it)
    assert it.stats["skipped"] >= 2 and it.first_bad.startswith(f"{with_bad / 'pairs.csv'} row ")  # named
    cfg.max_bad = 1
    it = train_iterator(cfg, global_batch_size=4, seed=0, image_size=8, process_index=0, process_count=1)
    with pytest.raises(TooManyBadRecords, match=r"more than 1 of 6 records could not be read \(data.max_bad 1"):
        for _ in range(3):
            next(it)


def test_evaluation_and_embedding_skip_name_and_cap_the_same_records(with_bad):
    """The same unreadable records are what ccj-eval's runner and ccj-embed's decoder skip: both
    see the same records (the same spec), and both read them with the same failure."""
    from chinese_clip_jax.data.bad_records import default_max_bad, max_bad_limit

    spec = f"files:{with_bad / 'pairs.csv'}"
    rset = open_retrieval(spec)
    corpus = open_images(spec)
    assert [str(i) for i in rset.image_ids] == [r["id"] for r in corpus.records]
    unreadable = []
    for j in range(len(rset.images)):
        try:
            PIL.Image.open(io.BytesIO(rset.images[j])).load()
        except Exception:  # noqa: BLE001
            unreadable.append(rset.image_ids[j])
    assert [u.rsplit("/", 1)[1] for u in unreadable] == ["bad1.png", "bad2.png"]
    assert default_max_bad(6) == 5 and max_bad_limit(None, 6) == max_bad_limit(-1, 6) == 5 and max_bad_limit(1, 6) == 1


def test_dataset_errors_are_one_line(tmp_path):
    with pytest.raises(DatasetError, match=r"^--images folder:.*: no such directory") as e:
        open_images(f"folder:{tmp_path / 'none'}")
    assert "\n" not in str(e.value)
    with pytest.raises(DatasetError, match=r"no split 'test' under"):
        open_images(f"cn_clip:{tmp_path}@test")


# ---------------------------------------------------------------- the ground floor: gs:// staging


def test_staging_a_remote_source_and_output(tmp_path, fake_gcs):
    """io.staged_input / staged_output: the one way a gs:// checkpoint is read (init_from, convert's
    SRC) and a gs:// directory written (the trainer's HF export): a local copy, removed after;
    the output copied only when the block succeeds."""
    from chinese_clip_jax.io import as_path, staged_input, staged_output

    (as_path("gs://bucket/ckpt") / "sub").mkdir(parents=True, exist_ok=True)
    as_path("gs://bucket/ckpt/config.json").write_text("{}")
    as_path("gs://bucket/ckpt/sub/w.bin").write_bytes(b"123")
    with staged_input("gs://bucket/ckpt", what="init_from") as local:
        assert "://" not in str(local) and (local / "sub" / "w.bin").read_bytes() == b"123"
    assert not local.exists()
    local_dir = tmp_path / "here"
    with staged_input(str(local_dir)) as same:
        assert str(same) == str(local_dir)  # a local path is used in place
    with staged_output("gs://bucket/out", what="export") as out:
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"ok")
    assert as_path("gs://bucket/out/model.safetensors").read_bytes() == b"ok"
    with pytest.raises(RuntimeError), staged_output("gs://bucket/failed") as out:
        out.mkdir(parents=True)
        (out / "half").write_bytes(b"x")
        raise RuntimeError("the writer failed")
    assert not as_path("gs://bucket/failed").exists()


def test_ccj_embed_warns_in_one_line_and_fails_over_max_bad(tmp_path, capsys):
    """ccj-embed's end of run (the manifest's counts and DIR/images-bad.jsonl): under the cap one
    warning line naming the first skipped record and the list; over it one error line, exit 1."""
    from chinese_clip_jax.embed.cli import _too_many_bad
    from chinese_clip_jax.embed.store import Store

    store = Store(str(tmp_path), "images")
    store.path("-bad.jsonl").write_text('{"id": "cat/1.png", "why": "UnidentifiedImageError"}\n')
    manifest = {"bad": 1, "num_records": 40}
    assert _too_many_bad(store, manifest, None) is False
    err = capsys.readouterr().err
    assert err == (
        "warning: 1 of 40 records could not be read and were skipped (first: cat/1.png: UnidentifiedImageError); "
        f"all listed in {tmp_path / 'images-bad.jsonl'}\n"
    )
    assert _too_many_bad(store, manifest, 0) is True
    err = capsys.readouterr().err
    assert err.startswith("error: more than 0 of 40 records could not be read (--max-bad 0; 1 so far)")
    assert err.count("\n") == 1
