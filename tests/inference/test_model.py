"""ChineseCLIP (high-level inference) against the raw Flax model, on a tiny random model."""

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
from _makers import TESTS, normalize, script_env
from _train_helpers import tiny_config
from flax import linen as nn

import chinese_clip_jax as ccj
from chinese_clip_jax.inference import ChineseCLIP, bucket_sizes
from chinese_clip_jax.processing import ChineseCLIPProcessor, ImageLoadError, ImageSettings

RES = 32
SIZES = dict(vocab_size=21128, hidden=32, heads=2, max_positions=64, image_size=RES, patch_size=16, projection_dim=16)
TEXTS = ["皮卡丘", "一只在草地上奔跑的小狗", "", "A cat 😺 坐在沙发上", "长" * 70, "杭州西湖"]


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config(**SIZES)
    model = ccj.ChineseCLIPModel(cfg)
    params = jax.jit(model.init)(
        jax.random.key(0), jnp.ones((1, 8), jnp.int32), jnp.zeros((1, 3, RES, RES), jnp.float32)
    )["params"]
    params = nn.unbox(params)
    params["logit_scale"] = jnp.asarray(np.log(20.0), jnp.float32)
    return cfg, model, params


@pytest.fixture(scope="module")
def processor():
    return ChineseCLIPProcessor(
        image_settings=ImageSettings(size={"shortest_edge": RES}, crop_size={"height": RES, "width": RES})
    )


@pytest.fixture(scope="module")
def clip(tiny, processor):
    _, model, params = tiny
    return ChineseCLIP(model, params, processor)


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 256, (40 + 3 * i, 50, 3), dtype=np.uint8)) for i in range(n)]


def test_encode_text_equals_raw_model(tiny, processor, clip):
    _, model, params = tiny
    enc = processor(text=TEXTS)
    raw = model.apply(
        {"params": params}, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], method="get_text_features"
    )
    ours = clip.encode_text(TEXTS, batch_size=4)  # a full batch and a padded one
    assert ours.shape == (len(TEXTS), 16) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, normalize(raw), atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_encode_image_equals_raw_model(tiny, processor, clip, tmp_path):
    _, model, params = tiny
    imgs = images(5)
    raw = model.apply({"params": params}, processor(images=imgs)["pixel_values"], method="get_image_features")
    ours = clip.encode_image(imgs, batch_size=2)
    np.testing.assert_allclose(ours, normalize(raw), atol=2e-5)
    # a path and a uint8 array give the same embedding as the PIL image
    single = clip.encode_image(np.asarray(imgs[0]))
    np.testing.assert_allclose(single[0], ours[0], atol=2e-5)
    stacked = clip.encode_image(np.stack([np.asarray(imgs[0])] * 2))  # (N, H, W, C) uint8 batch
    np.testing.assert_allclose(stacked, ours[[0, 0]], atol=2e-5)
    imgs[1].save(tmp_path / "one.png")
    np.testing.assert_allclose(clip.encode_image(tmp_path / "one.png")[0], ours[1], atol=2e-5)


def test_zero_shot_equals_model_logits(tiny, processor, clip):
    _, model, params = tiny
    labels = ["猫", "狗", "汽车"]
    imgs = images(3, seed=1)
    probs = clip.zero_shot(imgs, labels, templates=["{}"])
    batch = processor(text=labels, images=imgs)
    out = model.apply(
        {"params": params},
        input_ids=batch["input_ids"],
        pixel_values=batch["pixel_values"],
        attention_mask=batch["attention_mask"],
        token_type_ids=batch["token_type_ids"],
    )
    np.testing.assert_allclose(probs, np.asarray(jax.nn.softmax(out.logits_per_image, axis=-1)), atol=1e-5)
    # default templates: a distribution per image, and the prompt ensemble is a mean of normalized embeddings
    probs = clip.zero_shot(imgs, labels)
    assert probs.shape == (3, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    cls = clip.class_embeddings(["猫"], templates=["{}的照片。", "一张{}的图片。"])
    t = clip.encode_text(["猫的照片。", "一张猫的图片。"])
    np.testing.assert_allclose(cls[0], normalize(t.mean(axis=0)), atol=1e-6)
    with pytest.raises(ValueError, match="placeholder"):
        clip.zero_shot(imgs, labels, templates=["no placeholder"])


def test_bucket_sizes():
    assert bucket_sizes(64) == (1, 4, 16, 64)
    assert bucket_sizes(8, 8) == (8,)
    assert bucket_sizes(100, 8) == (8, 32, 104)
    assert all(b % 8 == 0 for b in bucket_sizes(1000, 8))


def test_compilations_are_bounded(tiny, processor):
    _, model, params = tiny
    clip = ChineseCLIP(model, params, processor)  # fresh trace counters
    for n in range(1, 21):
        out = clip.encode_text(["文本"] * n, batch_size=8)
        assert out.shape == (n, 16)
    # 20 different input sizes, buckets (1, 2, 8): at most three compiled functions
    assert clip.trace_counts["text"] <= len(clip.bucket_sizes(8)) == 3
    assert clip._text_fn._cache_size() <= 3
    for n in (1, 2, 3, 5, 7, 9):
        clip.encode_image(images(n), batch_size=4)
    assert clip.trace_counts["image"] <= len(clip.bucket_sizes(4)) == 2


def test_unreadable_image_is_named_with_its_position(clip, tmp_path):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG garbage")
    items = images(5) + [str(bad)]
    with pytest.raises(ImageLoadError, match=r"image 5 .*corrupt\.png"):
        clip.encode_image(items, batch_size=2)


def test_processor_resolution_must_match(tiny):
    _, model, params = tiny
    with pytest.raises(ValueError, match=r"\(224, 224\) images but the model takes \(32, 32\)"):
        ChineseCLIP(model, params, ChineseCLIPProcessor())


def test_from_pretrained_directory(tiny, tmp_path, clip):
    cfg, _, params = tiny
    ccj.save_pretrained(tmp_path, cfg, params)
    # no preprocessor_config.json: transformers' defaults at the model's resolution
    loaded = ChineseCLIP.from_pretrained(tmp_path)
    np.testing.assert_allclose(loaded.encode_text(TEXTS), clip.encode_text(TEXTS), atol=1e-5)
    imgs = images(3)
    np.testing.assert_allclose(loaded.encode_image(imgs), clip.encode_image(imgs), atol=1e-5)
    # with one: it is honoured (here a squash to 32 x 32 instead of shortest-edge + crop)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"size": {"height": RES, "width": RES}, "crop_size": RES})
    )
    squashed = ChineseCLIP.from_pretrained(tmp_path)
    assert squashed.processor.image_processor.settings.size == {"height": RES, "width": RES}
    tall = [PIL.Image.fromarray(np.random.default_rng(3).integers(0, 256, (90, 30, 3), dtype=np.uint8))]
    assert not np.allclose(squashed.encode_image(tall), loaded.encode_image(tall), atol=1e-3)


MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from flax import linen as nn
    from _train_helpers import tiny_config
    from tests.inference.test_model import SIZES, images, TEXTS, RES
    import chinese_clip_jax as ccj
    from chinese_clip_jax.inference import ChineseCLIP
    from chinese_clip_jax.processing import ChineseCLIPProcessor, ImageSettings
    assert jax.local_device_count() == 8
    cfg = tiny_config(**SIZES)
    model = ccj.ChineseCLIPModel(cfg)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 8), jnp.int32),
                                          jnp.zeros((1, 3, RES, RES)))["params"])
    proc = ChineseCLIPProcessor(image_settings=ImageSettings(size={"shortest_edge": RES},
                                                             crop_size={"height": RES, "width": RES}))
    sharded = ChineseCLIP(model, params, proc)
    single = ChineseCLIP(model, params, proc, devices=jax.local_devices()[:1])
    texts = TEXTS * 3
    a = sharded.encode_text(texts, batch_size=12)
    assert sharded.bucket_sizes(12) == (8, 16), sharded.bucket_sizes(12)
    np.testing.assert_allclose(a, single.encode_text(texts, batch_size=12), atol=2e-5)
    imgs = images(11)
    np.testing.assert_allclose(sharded.encode_image(imgs, batch_size=8), single.encode_image(imgs), atol=2e-5)
    fn = sharded._text_fn
    out = fn(sharded.params, *[np.zeros((16, 52), np.int32)] * 3)
    assert len(out.sharding.device_set) == 8, out.sharding
    print("OK")
""")


@pytest.mark.slow
def test_batch_is_sharded_over_local_devices(tmp_path):
    script = tmp_path / "multi.py"
    script.write_text(MULTI_DEVICE_SCRIPT)
    env = script_env(TESTS, JAX_PLATFORMS="cpu")  # the script imports this module and the helpers
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
