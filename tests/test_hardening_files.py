"""Files written by other tools, bad values and unsafe inputs (issue 13): each case ends in a
one-line error naming the file, key or value (exit 2 for the CLI) with nothing overwritten or left
behind, or loads with parity to transformers."""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from _train_helpers import tiny_config
from safetensors.numpy import load_file, save_file

import chinese_clip_jax as ccj
from chinese_clip_jax.conversion import CheckpointError
from chinese_clip_jax.conversion.mapping import flatten

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = os.path.join(REPO, "chinese_clip_jax", "assets", "vocab.txt")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    cfg = tiny_config(
        vocab_size=21128, hidden=32, layers=1, max_positions=64, image_size=32, patch_size=8, projection_dim=16
    )
    torch.manual_seed(0)
    model = transformers.ChineseCLIPModel(transformers.ChineseCLIPConfig.from_dict(cfg.to_dict())).eval()
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    return path


def run_cli(module, *args, limit_bytes=None):
    """``python -m module args``; with limit_bytes, under a file-size limit the child sets itself
    (writes past it fail with EFBIG), not a preexec_fn: forking this multithreaded (jax) process
    to run Python before exec can deadlock."""
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
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


def listing(path):
    return sorted(os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(path) for f in fs)


# --------------------------------------------------------------------------- transformers 5 files


@pytest.fixture(scope="module")
def tf5_dir(hf_dir, tmp_path_factory):
    """A checkpoint whose processor was saved by transformers 5's ChineseCLIPProcessor.save_pretrained:
    processor_config.json + tokenizer.json/tokenizer_config.json, non-default image settings and a
    custom vocab (the bundled one reordered, so token ids differ)."""
    import shutil

    path = tmp_path_factory.mktemp("tf5")
    for f in os.listdir(hf_dir):
        shutil.copy(hf_dir / f, path / f)
    words = open(VOCAB, encoding="utf-8").read().splitlines()
    custom = words[:106] + words[106:][::-1]  # special tokens kept in place, the rest reversed
    vocab = path / "custom_vocab" / "vocab.txt"
    vocab.parent.mkdir()
    vocab.write_text("\n".join(custom) + "\n", encoding="utf-8")
    tokenizer = transformers.BertTokenizer.from_pretrained(str(vocab.parent))
    image_processor = transformers.ChineseCLIPImageProcessor(
        size={"shortest_edge": 18},
        crop_size={"height": 30, "width": 40},
        image_mean=[0.1, 0.2, 0.3],
        image_std=[0.5, 0.6, 0.7],
    )
    transformers.ChineseCLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    shutil.rmtree(vocab.parent)
    assert {"processor_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(path))
    assert not (path / "preprocessor_config.json").exists() and not (path / "vocab.txt").exists()
    return path


def _assert_processor_parity(ours_dir, reference_dir):
    ref = transformers.ChineseCLIPProcessor.from_pretrained(str(reference_dir))
    ours = ccj.ChineseCLIPProcessor.from_pretrained(ours_dir)
    texts = ["一只猫在睡觉", "皮卡丘"]
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8))]
    want = ref(text=texts, images=images, padding="max_length", max_length=52, return_tensors="np")
    got = ours(text=texts, images=images)
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    assert got["pixel_values"].shape == want["pixel_values"].shape == (1, 3, 30, 40)
    np.testing.assert_allclose(got["pixel_values"], want["pixel_values"], atol=1e-6)
    default_ids = ccj.ChineseCLIPProcessor()(text=texts)["input_ids"]
    assert (got["input_ids"] != default_ids).any()  # the custom vocab is in use


def test_transformers5_processor_files_are_read(tf5_dir):
    _assert_processor_parity(tf5_dir, tf5_dir)


def test_convert_carries_transformers5_processor_files(tf5_dir, tmp_path):
    assert run_cli("convert", tf5_dir, tmp_path / "out", "--to", "hf").returncode == 0
    out = tmp_path / "out"
    for name in ("processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (tf5_dir / name).read_bytes()
    assert not (out / "vocab.txt").exists() and not (out / "preprocessor_config.json").exists()
    _assert_processor_parity(out, tf5_dir)


# --------------------------------------------------------------------------- config.json


def test_old_layout_config_dicts_load_like_transformers(hf_dir, tmp_path):
    import shutil

    d = json.loads((hf_dir / "config.json").read_text())
    d["text_config_dict"], d["vision_config_dict"] = d.pop("text_config"), d.pop("vision_config")
    d["text_config"] = {"hidden_size": 999}  # transformers lets the *_dict values win
    shutil.copy(hf_dir / "model.safetensors", tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(d))
    ours = ccj.ChineseCLIPConfig.from_pretrained(tmp_path)
    ref = transformers.ChineseCLIPConfig.from_pretrained(tmp_path)
    for ours_sub, ref_sub in ((ours.text_config, ref.text_config), (ours.vision_config, ref.vision_config)):
        for field in ours_sub._field_names():
            assert getattr(ours_sub, field) == getattr(ref_sub, field), field
    assert ours == ccj.ChineseCLIPConfig.from_pretrained(hf_dir)
    _, params = ccj.from_pretrained(tmp_path)
    _, want = ccj.from_pretrained(hf_dir)
    a, b = flatten(params), flatten(want)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


BAD_CONFIGS = [
    ([1, 2], "must hold a JSON object, got a list"),
    ({"text_config": "base"}, "text_config must be a JSON object, got str 'base'"),
    ({"text_config": {"num_attention_heads": 0}}, "text_config.num_attention_heads must be an int >= 1, got 0"),
    ({"vision_config": {"hidden_size": 0}}, "vision_config.hidden_size must be an int >= 1, got 0"),
    ({"vision_config": {"hidden_size": -32}}, "vision_config.hidden_size must be an int >= 1, got -32"),
    ({"vision_config": {"hidden_size": "32"}}, "vision_config.hidden_size must be an int >= 1, got '32'"),
    ({"vision_config": {"patch_size": 0}}, "vision_config.patch_size must be an int >= 1, got 0"),
    ({"text_config": {"intermediate_size": -1}}, "text_config.intermediate_size must be an int >= 1, got -1"),
]


@pytest.mark.parametrize("content,message", BAD_CONFIGS)
def test_bad_config_json_values_are_one_line_errors(tmp_path, content, message):
    (tmp_path / "config.json").write_text(json.dumps(content))
    with pytest.raises(ValueError) as info:
        ccj.ChineseCLIPConfig.from_pretrained(tmp_path)
    assert str(info.value) in (f"{tmp_path / 'config.json'}: {message}", f"{tmp_path / 'config.json'} {message}")
    assert "\n" not in str(info.value)


def test_bad_config_json_in_the_cli_exits_2_and_writes_nothing(hf_dir, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    d = json.loads((src / "config.json").read_text())
    d["vision_config"]["num_attention_heads"] = 0
    (src / "config.json").write_text(json.dumps(d))
    line = one_line_error(run_cli("convert", src, tmp_path / "out"))
    assert f"{src / 'config.json'}: vision_config.num_attention_heads must be an int >= 1, got 0" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content,message",
    [
        ("{not json", "preprocessor_config.json is not valid JSON"),
        (
            json.dumps({"size": {"shortest_edge": 0}}),
            "preprocessor_config.json: size.shortest_edge must be an int >= 1",
        ),
        (
            json.dumps({"crop_size": {"height": 224, "width": -1}}),
            "crop_size.width must be an int >= 1 (pixels), got -1",
        ),
        (json.dumps({"image_std": [0.2, 0, 0.2]}), "image_std must be 3 numbers > 0"),
    ],
)
def test_bad_preprocessor_config_fails_at_load_naming_file_and_key(tmp_path, content, message):
    (tmp_path / "preprocessor_config.json").write_text(content)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ccj.ChineseCLIPProcessor.from_pretrained(tmp_path)  # at load, not at the first image


def test_bad_preprocessor_config_stops_convert_before_any_work(hf_dir, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    (src / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 0}}))
    line = one_line_error(run_cli("convert", src, tmp_path / "out"))
    assert f"{src / 'preprocessor_config.json'}: size.shortest_edge must be an int >= 1" in line
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- weights and outputs


def test_int8_and_bool_weights_are_refused(hf_dir, tmp_path):
    tensors = load_file(hf_dir / "model.safetensors")
    for dtype in (np.int8, np.bool_):
        src = tmp_path / np.dtype(dtype).name
        src.mkdir()
        (src / "config.json").write_text((hf_dir / "config.json").read_text())
        save_file({k: v.astype(dtype) for k, v in tensors.items()}, src / "model.safetensors")
        line = one_line_error(run_cli("convert", src, tmp_path / f"out_{dtype.__name__}"))
        assert "weights must be floating point" in line and str(src / "model.safetensors") in line
        assert not (tmp_path / f"out_{dtype.__name__}").exists()


def test_sharded_index_outside_the_checkpoint_is_refused(hf_dir, tmp_path):
    tensors = load_file(hf_dir / "model.safetensors")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file(tensors, tmp_path / "outside_shard.safetensors")
    (ckpt / "config.json").write_text((hf_dir / "config.json").read_text())
    index = {"metadata": {}, "weight_map": {k: "../outside_shard.safetensors" for k in tensors}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="names shard '../outside_shard.safetensors' outside its directory"):
        ccj.from_pretrained(ckpt)


def test_convert_never_overwrites_a_users_file(hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("my own notes")
    for to in ("flax", "hf"):
        line = one_line_error(run_cli("convert", hf_dir, out, "--to", to))
        assert f"{out / 'config.json'} already exists; convert never overwrites" in line
    assert listing(out) == ["config.json"] and (out / "config.json").read_text() == "my own notes"


def test_flax_dir_whose_config_disagrees_is_named_at_load(hf_dir, tmp_path):
    assert run_cli("convert", hf_dir, tmp_path / "flax").returncode == 0
    d = json.loads((tmp_path / "flax" / "config.json").read_text())
    d["vision_config"]["intermediate_size"] = 128
    (tmp_path / "flax" / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"config.json and params/ disagree: .*wrong shape .*mlp/fc1"):
        ccj.from_pretrained(tmp_path / "flax")


def test_disk_full_convert_removes_its_temporaries(hf_dir, tmp_path):
    size = os.path.getsize(hf_dir / "model.safetensors")
    for to in ("hf", "flax"):
        out = tmp_path / f"out_{to}"
        result = run_cli("convert", hf_dir, out, "--to", to, limit_bytes=size // 3)
        line = one_line_error(result)
        assert "File too large" in line or "disk full" in line, line
        assert "removed" in line
        assert not out.exists(), listing(out)  # the directory it created, with everything in it


# --------------------------------------------------------------------------- paths, text, data, images


def test_hub_ids_and_mistyped_local_paths(tmp_path, monkeypatch):
    from chinese_clip_jax.io import is_hub_id

    monkeypatch.chdir(tmp_path)
    (tmp_path / "build").mkdir()
    assert is_hub_id("OFA-Sys/chinese-clip-vit-base-patch16")
    for local in ("build/hff", "./x/y", "/abs/path", "a/b/c", "~/x", "justaname"):
        assert not is_hub_id(local), local
        with pytest.raises(FileNotFoundError, match=f"no such local path: {local}"):
            ccj.ChineseCLIPConfig.from_pretrained(local)


def test_lone_surrogate_text_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"text 1 .* is not valid Unicode \(a lone surrogate\)"):
        ccj.ChineseCLIPProcessor().tokenize(["好", "坏\ud800"])


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


def test_extreme_aspect_ratio_resizes_only_the_crop_window(monkeypatch):
    import chinese_clip_jax.processing as processing
    import chinese_clip_jax.processing.image as image_processing

    requested = []
    resize = PIL.Image.Image.resize
    monkeypatch.setattr(
        PIL.Image.Image, "resize", lambda self, size, *a, **k: requested.append(size) or resize(self, size, *a, **k)
    )
    rng = np.random.default_rng(0)
    strip = PIL.Image.fromarray(rng.integers(0, 255, (4000, 1, 3), dtype=np.uint8))
    out = ccj.ChineseCLIPProcessor().preprocess_images(strip)
    assert out.shape == (1, 3, 224, 224) and np.isfinite(out).all()
    assert max(w * h for w, h in requested) <= 224 * 4000  # not 224 x 896000
    # where the full resize is affordable, the window path gives transformers' pixels
    monkeypatch.setattr(image_processing, "MAX_RESIZED_PIXELS", 1 << 12)
    for shape in ((300, 1, 3), (2, 500, 3), (700, 3, 3), (5, 900, 3)):
        image = PIL.Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8))
        want = transformers.ChineseCLIPImageProcessor()(image, return_tensors="np")["pixel_values"]
        got = ccj.ChineseCLIPProcessor().preprocess_images(image)
        np.testing.assert_allclose(got, want, atol=1.01 / 255 / min(processing.OPENAI_CLIP_STD))
        assert np.mean(got == want) > 0.999
