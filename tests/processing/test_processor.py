"""ChineseCLIPProcessor against transformers' ChineseCLIPProcessor (PIL backend) as reference."""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

transformers = pytest.importorskip("transformers")
import torch  # noqa: E402
from transformers import BertTokenizer, ChineseCLIPImageProcessorPil  # noqa: E402

import chinese_clip_jax as ccj  # noqa: E402
from chinese_clip_jax.processing import (  # noqa: E402
    ASSETS_DIR,
    ChineseCLIPProcessor,
    ImageLoadError,
    ImageSettings,
)

TEXTS = [
    "皮卡丘",
    "",
    "一只可爱的小猫咪在草地上玩耍, A cute kitten 😺 playing on the grass！",
    "ＡＢＣ全角字符１２３，。？",
    "[MASK] 是 [MASK]",
    "长" * 80,
    "mixed 中英 text with UPPER case and ümlaut, 日本語のテキスト, 한국어",
    "   \t\n  ",
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    return BertTokenizer.from_pretrained(str(ASSETS_DIR))


@pytest.fixture(scope="module")
def proc():
    return ChineseCLIPProcessor(num_threads=2)


def _rng_image(h, w, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    # smooth-ish content, so bicubic resampling is exercised on real gradients
    base = rng.integers(0, 256, (max(h // 4, 1), max(w // 4, 1), 4), dtype=np.uint8)
    img = PIL.Image.fromarray(base, "RGBA").resize((w, h), PIL.Image.Resampling.BILINEAR)
    noise = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    arr = ((np.asarray(img).astype(np.uint16) + noise) // 2).astype(np.uint8)
    img = PIL.Image.fromarray(arr, "RGBA")
    if mode == "I;16":
        return PIL.Image.frombytes("I;16", (w, h), (arr[..., 0].astype("<u2") * 257).tobytes())
    if mode == "P_transparent":
        p = img.convert("RGB").convert("P")
        p.info["transparency"] = int(np.bincount(np.asarray(p).ravel()).argmax())  # a used index
        return p
    return img.convert(mode)


def test_tokens_equal_transformers(proc, hf_tokenizer):
    ours = proc(text=TEXTS)
    ref = hf_tokenizer(TEXTS, padding="max_length", max_length=52, truncation=True, return_tensors="np")
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert ours[key].shape == (len(TEXTS), 52)
        assert ours[key].dtype == np.int32
        np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)
    assert len(proc.tokenizer) == 21128
    # [MASK] stays the special token, the long text is truncated and ends with [SEP]
    assert (ours["input_ids"][4] == hf_tokenizer.mask_token_id).sum() == 2
    assert ours["input_ids"][5, -1] == hf_tokenizer.sep_token_id
    assert ours["input_ids"][1, :3].tolist() == [hf_tokenizer.cls_token_id, hf_tokenizer.sep_token_id, 0]


def test_tokenize_single_string_and_length(proc):
    out = proc.tokenize("你好", context_length=8)
    assert out["input_ids"].shape == (1, 8)
    with pytest.raises(TypeError, match="item 1"):
        proc.tokenize(["ok", 3])


MODES = ["RGB", "RGBA", "LA", "L", "P", "P_transparent", "CMYK", "1", "I;16"]
SIZES = [(480, 640), (224, 224), (1, 1), (3, 500), (700, 2), (150, 100)]


def _reference_pixels(images, **settings):
    ref = ChineseCLIPImageProcessorPil(**settings)
    return ref(images, return_tensors="np")["pixel_values"]


def _assert_close_pixels(ours, ref):
    assert ours.shape == ref.shape and ours.dtype == np.float32
    # "within one grey level after normalisation": 1/255/std ~= 0.0146
    tol = 1.0 / 255 / min(ImageSettings().image_std) + 1e-6
    np.testing.assert_allclose(ours, ref, rtol=0, atol=tol)
    # in practice they are bit-identical: pin that too, so a drift does not go unnoticed
    assert np.mean(ours == ref) > 0.999


@pytest.mark.parametrize("mode", MODES)
def test_pixels_every_mode(proc, mode):
    images = [_rng_image(h, w, mode, seed=i) for i, (h, w) in enumerate(SIZES)]
    _assert_close_pixels(proc(images=images)["pixel_values"], _reference_pixels(images))


def test_pixels_arrays_and_paths(proc, tmp_path):
    rgb = np.asarray(_rng_image(97, 131, "RGB"))
    rgba = np.asarray(_rng_image(64, 40, "RGBA", seed=3))
    grey = np.asarray(_rng_image(50, 70, "L", seed=4))[..., None]
    arrays = [rgb, rgba, grey]
    _assert_close_pixels(proc(images=arrays)["pixel_values"], _reference_pixels(arrays))
    paths = []
    for i, mode in enumerate(["RGB", "L", "RGBA"]):
        p = tmp_path / f"img{i}.png"
        _rng_image(120 + 10 * i, 90, mode, seed=i).save(p)
        paths.append(str(p))
    jpg = tmp_path / "photo.jpg"
    _rng_image(480, 640, "RGB", seed=9).save(jpg, quality=90)
    paths.append(str(jpg))
    _assert_close_pixels(proc(images=paths)["pixel_values"], _reference_pixels(paths))


HEIGHT_WIDTH_CONFIGS = [
    (
        {
            "size": {"height": 256, "width": 192},
            "crop_size": {"height": 240, "width": 200},  # bigger than the resize width: zero padding
            "do_center_crop": True,
            "resample": 2,
            "image_mean": [0.5, 0.4, 0.3],
            "image_std": [0.2, 0.3, 0.25],
            "image_processor_type": "ChineseCLIPImageProcessor",
        },
        (240, 200),
    ),
    # the layout of the released checkpoints' configs: a squash to height x width, no crop
    (
        {
            "size": {"height": 224, "width": 224},
            "crop_size": 224,
            "do_center_crop": False,
            "do_resize": True,
            "do_normalize": True,
            "resample": 3,
            "feature_extractor_type": "ChineseCLIPFeatureExtractor",
            "image_mean": list(ImageSettings().image_mean),
            "image_std": list(ImageSettings().image_std),
        },
        (224, 224),
    ),
]


@pytest.mark.parametrize("cfg,out_size", HEIGHT_WIDTH_CONFIGS)
def test_pixels_from_directory_with_height_width(tmp_path, hf_tokenizer, cfg, out_size):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    hf_tokenizer.save_pretrained(tmp_path)
    proc = ChineseCLIPProcessor.from_pretrained(tmp_path)
    assert proc.image_size == out_size
    ref = ChineseCLIPImageProcessorPil.from_pretrained(str(tmp_path))
    images = [_rng_image(h, w, "RGB", seed=i) for i, (h, w) in enumerate(SIZES)]
    ours = proc(images=images)["pixel_values"]
    assert ours.shape == (len(images), 3) + out_size
    _assert_close_pixels(ours, ref(images, return_tensors="np")["pixel_values"])
    np.testing.assert_array_equal(
        proc(text=TEXTS)["input_ids"],
        hf_tokenizer(TEXTS, padding="max_length", max_length=52, truncation=True, return_tensors="np")["input_ids"],
    )


def test_int_sizes_in_legacy_config(tmp_path):
    # released checkpoints' configs use ints: size = shortest edge, crop_size = square
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": 160, "crop_size": 128}))
    proc = ChineseCLIPProcessor.from_pretrained(tmp_path)  # no tokenizer files: bundled vocab
    assert proc.image_size == (128, 128)
    ref = ChineseCLIPImageProcessorPil.from_pretrained(str(tmp_path))
    images = [_rng_image(h, w, "RGB", seed=i) for i, (h, w) in enumerate(SIZES)]
    _assert_close_pixels(proc(images=images)["pixel_values"], ref(images, return_tensors="np")["pixel_values"])


def test_squash_matches_cn_clip_transform():
    torch = pytest.importorskip("torch")
    images = [_rng_image(h, w, "RGB", seed=i) for i, (h, w) in enumerate(SIZES)]
    proc = ChineseCLIPProcessor(resize_mode="squash", num_threads=1)
    ours = proc(images=images)["pixel_values"]
    assert ours.shape == (len(images), 3, 224, 224)
    # cn_clip: Resize((r, r), BICUBIC) on the PIL image, convert RGB, ToTensor, Normalize
    mean = torch.tensor(ImageSettings().image_mean)[:, None, None]
    std = torch.tensor(ImageSettings().image_std)[:, None, None]
    for img, got in zip(images, ours):
        r = img.resize((224, 224), PIL.Image.Resampling.BICUBIC).convert("RGB")
        t = torch.from_numpy(np.array(r)).permute(2, 0, 1).float().div(255)
        np.testing.assert_allclose(got, ((t - mean) / std).numpy(), rtol=0, atol=1e-6)


def test_unreadable_image_is_named(proc, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ImageLoadError, match=r"image 1 .*broken\.jpg"):
        proc(images=[_rng_image(10, 10), str(bad)])
    with pytest.raises(ImageLoadError, match="image 0 .*missing"):
        proc(images=[str(tmp_path / "missing.png")])
    with pytest.raises(ImageLoadError, match="uint8"):
        proc(images=[np.zeros((8, 8, 3), np.float64)])
    with pytest.raises(ValueError, match="give text, images or both"):
        proc()


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="shortest_edge"):
        ImageSettings.from_dict({"size": {"longest_edge": 3}})
    with pytest.raises(ValueError, match="resize_mode"):
        ChineseCLIPProcessor(resize_mode="stretch")


def test_joint_call_equals_transformers_processor(proc, hf_tokenizer):
    ref_proc = transformers.ChineseCLIPProcessor(image_processor=ChineseCLIPImageProcessorPil(), tokenizer=hf_tokenizer)
    images = [_rng_image(h, w, "RGB", seed=i) for i, (h, w) in enumerate(SIZES[:3])]
    ref = ref_proc(text=TEXTS, images=images, padding="max_length", max_length=52, truncation=True, return_tensors="np")
    ours = proc(text=TEXTS, images=images)
    assert set(ours) == {"input_ids", "attention_mask", "token_type_ids", "pixel_values"}
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)
    _assert_close_pixels(ours["pixel_values"], ref["pixel_values"])
    jax_out = proc(text=TEXTS[:2], return_tensors="jax")
    assert jax_out["input_ids"].dtype == np.int32 and jax_out["input_ids"].shape == (2, 52)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(padding=True),
        dict(padding="longest", truncation=True, max_length=12),
        dict(padding="max_length", max_length=20),
        dict(padding="max_length", max_length=16, truncation=True),
        dict(padding="max_length", max_length=64, truncation=False),
        dict(padding=False, truncation=True, max_length=8),
        dict(padding="do_not_pad", truncation=False),
    ],
    ids=["longest", "longest-trunc12", "max20", "max16-trunc", "max64-notrunc", "nopad-trunc8", "nopad"],
)
def test_hf_keyword_arguments_equal_transformers(proc, hf_tokenizer, kwargs):
    ref_proc = transformers.ChineseCLIPProcessor(image_processor=ChineseCLIPImageProcessorPil(), tokenizer=hf_tokenizer)
    # transformers does not truncate unless asked: without truncation, only texts that fit
    texts = TEXTS if kwargs.get("truncation") else [t for t in TEXTS if len(t) < 19]
    stackable = kwargs.get("padding") not in (False, "do_not_pad")
    rt = "np" if stackable else None
    ref = ref_proc(text=texts, return_tensors=rt, **kwargs)
    ours = proc(text=texts, return_tensors=rt, **kwargs)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        want = ref[key]
        if stackable:
            assert ours[key].dtype == np.int32
            np.testing.assert_array_equal(ours[key], want, err_msg=key)
        else:
            assert ours[key] == [list(r) for r in want], key
    if stackable:
        pt, ref_pt = (
            proc(text=texts, return_tensors="pt", **kwargs),
            ref_proc(text=texts, return_tensors="pt", **kwargs),
        )
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            assert pt[key].dtype == ref_pt[key].dtype and pt[key].equal(ref_pt[key]), key


def test_pt_tensors_with_images_and_ragged_errors(proc, hf_tokenizer):

    ref_proc = transformers.ChineseCLIPProcessor(image_processor=ChineseCLIPImageProcessorPil(), tokenizer=hf_tokenizer)
    images = [_rng_image(40, 60, "RGB", seed=3)]
    ours = proc(text=TEXTS[:2], images=images, return_tensors="pt")
    ref = ref_proc(
        text=TEXTS[:2], images=images, return_tensors="pt", padding="max_length", max_length=52, truncation=True
    )
    assert ours["pixel_values"].dtype == torch.float32 and ours["input_ids"].shape == (2, 52)
    assert ours["input_ids"].equal(ref["input_ids"])
    _assert_close_pixels(ours["pixel_values"].numpy(), ref["pixel_values"].numpy())
    with pytest.raises(ValueError, match="padding=False left rows of different lengths"):
        proc(text=TEXTS[:3], padding=False)
    with pytest.raises(ValueError, match="padding must be"):
        proc(text=TEXTS[:3], padding="left")


@pytest.fixture(scope="module")
def short_tokenizer():
    """The bundled vocab with a model_max_length (a saved checkpoint's tokenizer_config has one)."""
    return BertTokenizer.from_pretrained(str(ASSETS_DIR), model_max_length=24)


@pytest.mark.parametrize(
    "kwargs",
    [dict(padding="max_length"), dict(truncation=True, max_length=8), dict(max_length=8), dict(truncation=True)],
    ids=["max-no-length", "trunc8-nopad", "length-only", "trunc-only"],
)
def test_any_hf_keyword_means_transformers_semantics(short_tokenizer, kwargs):
    ours = ChineseCLIPProcessor(short_tokenizer)
    ref_proc = transformers.ChineseCLIPProcessor(
        image_processor=ChineseCLIPImageProcessorPil(), tokenizer=short_tokenizer
    )
    texts = TEXTS[:4] if kwargs.get("truncation") or kwargs.get("max_length") else TEXTS[:2]
    ref = ref_proc(text=texts, return_tensors=None, **kwargs)
    got = ours(text=texts, return_tensors=None, **kwargs)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        rows = got[key].tolist() if isinstance(got[key], np.ndarray) else got[key]
        assert rows == [list(r) for r in ref[key]], key
    if kwargs == dict(padding="max_length"):  # the tokenizer's model_max_length, not the context length 52
        assert {len(r) for r in ref["input_ids"]} == {24}


def test_no_keyword_keeps_fixed_context_length(short_tokenizer):
    out = ChineseCLIPProcessor(short_tokenizer)(text=TEXTS)
    assert out["input_ids"].shape == (len(TEXTS), 52)


def test_decode_equals_transformers(proc, hf_tokenizer):
    ref_proc = transformers.ChineseCLIPProcessor(image_processor=ChineseCLIPImageProcessorPil(), tokenizer=hf_tokenizer)
    ids = proc(text=TEXTS)["input_ids"]
    assert proc.batch_decode(ids) == ref_proc.batch_decode(ids)
    assert proc.batch_decode(ids, skip_special_tokens=True) == ref_proc.batch_decode(ids, skip_special_tokens=True)
    assert proc.decode(ids[2]) == ref_proc.decode(ids[2])
    assert proc.batch_decode(ids.tolist()) == ref_proc.batch_decode(ids.tolist())


def test_torch_uint8_chw_tensors_equal_transformers(proc):
    """transformers' test_call_pytorch feeds uint8 (3, H, W) torch tensors."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    images = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for h, w in ((30, 40), (300, 200))]
    ref = ChineseCLIPImageProcessorPil()(images, return_tensors="np")["pixel_values"]
    _assert_close_pixels(proc(images=images)["pixel_values"], ref)
    _assert_close_pixels(proc(images=images[0])["pixel_values"], ref[:1])


def test_from_pretrained_takes_resolution_from_config_json(tmp_path, hf_tokenizer):
    """A transformers-saved folder with no preprocessor config: the model's resolution, not 224."""
    cfg = transformers.ChineseCLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=37,
        ),
        projection_dim=16,
    )
    cfg.save_pretrained(tmp_path)
    hf_tokenizer.save_pretrained(tmp_path)
    ours = ChineseCLIPProcessor.from_pretrained(tmp_path)
    assert ours.image_size == (32, 32)
    ref = ChineseCLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    image = _rng_image(50, 70)
    _assert_close_pixels(ours(images=[image])["pixel_values"], ref([image], return_tensors="np")["pixel_values"])
    (tmp_path / "config.json").write_text('{"vision_config": {"image_size": "big"}}')
    with pytest.raises(ValueError, match="vision_config.image_size"):
        ChineseCLIPProcessor.from_pretrained(tmp_path)


LIGHT_SCRIPT = r"""
import json, sys
import numpy as np, PIL.Image

# 1. the image path: numpy + PIL only
from chinese_clip_jax.processing.image import ImagePreprocessor, apply_normalize_table, normalize_pixels
from chinese_clip_jax.processing.image_settings import ImageSettings

image = PIL.Image.fromarray(np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3))
image.save(sys.argv[2])
pre = ImagePreprocessor(ImageSettings.at_resolution(32), num_threads=1)
pixels = pre([image, sys.argv[2], np.asarray(image)])
small = pre.resized_batch([image, sys.argv[2]])
assert pixels.shape == (3, 3, 32, 32) and small.dtype == np.uint8 and small.shape == (2, 32, 32, 3)
assert (apply_normalize_table(small, pre.table) == pixels[:2]).all()
assert (normalize_pixels(small) == pixels[:2]).all()  # default mean/std
heavy = sorted(m for m in ("jax", "flax", "transformers", "torch", "tokenizers") if m in sys.modules)
assert not heavy, heavy

# 2. the processor: tokenizer (bundled, and a saved checkpoint's) without torch
from chinese_clip_jax.processing import ChineseCLIPProcessor

for proc in (ChineseCLIPProcessor(), ChineseCLIPProcessor.from_pretrained(sys.argv[1])):
    out = proc(text=["一只猫", "皮卡丘"], images=[image])
    assert out["input_ids"].shape == (2, 52) and out["pixel_values"].shape[:2] == (1, 3)
torch_like = ("torch.", "transformers.models.auto.modeling")
torch_modules = sorted(m for m in sys.modules if m == "torch" or m.startswith(torch_like))
assert not torch_modules, torch_modules[:5]
assert "jax" not in sys.modules
print(json.dumps(out["input_ids"][:, :6].tolist()))
"""


def test_light_paths_import_no_torch(tmp_path, hf_tokenizer):
    """Worker-side preprocessing: the image path needs numpy + PIL only, the processor no torch."""

    hf_tokenizer.save_pretrained(tmp_path)  # tokenizer_config.json + vocab.txt, as a checkpoint has
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run(
        [sys.executable, "-c", LIGHT_SCRIPT, str(tmp_path), str(tmp_path / "x.png")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    want = hf_tokenizer(["一只猫", "皮卡丘"], padding="max_length", max_length=52, truncation=True)["input_ids"]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == [row[:6] for row in want]


def test_lone_surrogate_text_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"text 1 .* is not valid Unicode \(a lone surrogate\)"):
        ccj.ChineseCLIPProcessor().tokenize(["好", "坏\ud800"])


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
