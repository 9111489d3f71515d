"""Files written by other tools, bad values and unsafe inputs (issue 13): each case ends in a
one-line error naming the file, key or value (exit 2 for the CLI) with nothing overwritten or left
behind, or loads with parity to transformers."""

import json
import os

import numpy as np
import PIL.Image
import pytest
import transformers
from _makers import REPO, one_line_error
from _makers import run_module as run_cli
from safetensors.numpy import load_file, save_file

import chinese_clip_jax as ccj
from chinese_clip_jax.conversion import CheckpointError
from chinese_clip_jax.conversion.mapping import flatten

VOCAB = os.path.join(REPO, "chinese_clip_jax", "assets", "vocab.txt")


def listing(path):
    return sorted(os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(path) for f in fs)


# --------------------------------------------------------------------------- transformers 5 files


@pytest.fixture(scope="module")
def tf5_dir(small_hf_dir, tmp_path_factory):
    """A checkpoint whose processor was saved by transformers 5's ChineseCLIPProcessor.save_pretrained:
    processor_config.json + tokenizer.json/tokenizer_config.json, non-default image settings and a
    custom vocab (the bundled one reordered, so token ids differ)."""
    import shutil

    path = tmp_path_factory.mktemp("tf5")
    for f in os.listdir(small_hf_dir):
        shutil.copy(small_hf_dir / f, path / f)
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
    assert run_cli("convert", tf5_dir, tmp_path / "out", "--to", "hf", "--skip-parity").returncode == 0
    out = tmp_path / "out"
    for name in ("processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (tf5_dir / name).read_bytes()
    assert not (out / "vocab.txt").exists() and not (out / "preprocessor_config.json").exists()
    _assert_processor_parity(out, tf5_dir)


# --------------------------------------------------------------------------- config.json


def test_old_layout_config_dicts_load_like_transformers(small_hf_dir, tmp_path):
    import shutil

    d = json.loads((small_hf_dir / "config.json").read_text())
    d["text_config_dict"], d["vision_config_dict"] = d.pop("text_config"), d.pop("vision_config")
    d["text_config"] = {"hidden_size": 999}  # transformers lets the *_dict values win
    shutil.copy(small_hf_dir / "model.safetensors", tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(d))
    ours = ccj.ChineseCLIPConfig.from_pretrained(tmp_path)
    ref = transformers.ChineseCLIPConfig.from_pretrained(tmp_path)
    for ours_sub, ref_sub in ((ours.text_config, ref.text_config), (ours.vision_config, ref.vision_config)):
        for field in ours_sub._field_names():
            assert getattr(ours_sub, field) == getattr(ref_sub, field), field
    assert ours == ccj.ChineseCLIPConfig.from_pretrained(small_hf_dir)
    _, params = ccj.from_pretrained(tmp_path)
    _, want = ccj.from_pretrained(small_hf_dir)
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


def test_bad_config_json_in_the_cli_exits_2_and_writes_nothing(small_hf_dir, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(small_hf_dir, src)
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


def test_bad_preprocessor_config_stops_convert_before_any_work(small_hf_dir, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(small_hf_dir, src)
    (src / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 0}}))
    line = one_line_error(run_cli("convert", src, tmp_path / "out"))
    assert f"{src / 'preprocessor_config.json'}: size.shortest_edge must be an int >= 1" in line
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- weights and outputs


def test_int8_and_bool_weights_are_refused(small_hf_dir, tmp_path):
    tensors = load_file(small_hf_dir / "model.safetensors")
    for dtype in (np.int8, np.bool_):
        src = tmp_path / np.dtype(dtype).name
        src.mkdir()
        (src / "config.json").write_text((small_hf_dir / "config.json").read_text())
        save_file({k: v.astype(dtype) for k, v in tensors.items()}, src / "model.safetensors")
        line = one_line_error(run_cli("convert", src, tmp_path / f"out_{dtype.__name__}"))
        assert "weights must be floating point" in line and str(src / "model.safetensors") in line
        assert not (tmp_path / f"out_{dtype.__name__}").exists()


def test_sharded_index_outside_the_checkpoint_is_refused(small_hf_dir, tmp_path):
    tensors = load_file(small_hf_dir / "model.safetensors")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file(tensors, tmp_path / "outside_shard.safetensors")
    (ckpt / "config.json").write_text((small_hf_dir / "config.json").read_text())
    index = {"metadata": {}, "weight_map": {k: "../outside_shard.safetensors" for k in tensors}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="names shard '../outside_shard.safetensors' outside its directory"):
        ccj.from_pretrained(ckpt)


def test_convert_never_overwrites_a_users_file(small_hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("my own notes")
    for to in ("flax", "hf"):
        line = one_line_error(run_cli("convert", small_hf_dir, out, "--to", to))
        assert f"{out / 'config.json'} already exists; convert never overwrites" in line
    assert listing(out) == ["config.json"] and (out / "config.json").read_text() == "my own notes"


def test_flax_dir_whose_config_disagrees_is_named_at_load(small_hf_dir, tmp_path):
    assert run_cli("convert", small_hf_dir, tmp_path / "flax").returncode == 0
    d = json.loads((tmp_path / "flax" / "config.json").read_text())
    d["vision_config"]["intermediate_size"] = 128
    (tmp_path / "flax" / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"config.json and params/ disagree: .*wrong shape .*mlp/fc1"):
        ccj.from_pretrained(tmp_path / "flax")


def test_disk_full_convert_removes_its_temporaries(small_hf_dir, tmp_path):
    size = os.path.getsize(small_hf_dir / "model.safetensors")
    for to in ("hf", "flax"):
        out = tmp_path / f"out_{to}"
        result = run_cli("convert", small_hf_dir, out, "--to", to, limit_bytes=size // 3)
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
