"""The model's input contracts and the helpers for using it inside your own JAX code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _train_helpers import tiny_config
from flax import linen as nn

import chinese_clip_jax as ccj
from chinese_clip_jax import sharding as shd
from chinese_clip_jax.inference import encoding

RES = 16


@pytest.fixture(scope="module")
def tiny16():
    cfg = tiny_config(vocab_size=64, hidden=16, layers=1, heads=2, image_size=RES, patch_size=8, projection_dim=8)
    model = ccj.ChineseCLIPModel(cfg)
    params = nn.unbox(
        jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 8), jnp.int32), jnp.zeros((1, 3, RES, RES)))["params"]
    )
    return cfg, model, params


def _uint8_images(n=2, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, RES, RES, 3), dtype=np.uint8)


def test_integer_pixels_are_refused(tiny16):
    _, model, params = tiny16
    nhwc = _uint8_images()
    for pixels in (nhwc, nhwc.transpose(0, 3, 1, 2), nhwc.transpose(0, 3, 1, 2).astype(np.int32)):
        with pytest.raises(TypeError, match="model_pixels"):
            model.apply({"params": params}, pixels, method="get_image_features")
        with pytest.raises(TypeError, match="float NCHW"):
            model.apply({"params": params}, jnp.ones((2, 4), jnp.int32), pixels)
    with pytest.raises(TypeError, match="model_pixels"):  # inside jit too (the dtype is known at trace time)
        jax.jit(lambda p, x: model.apply({"params": p}, x, method="get_image_features"))(params, nhwc)


def test_model_pixels_equals_transformers_normalisation(tiny16):
    """uint8 NHWC and NCHW -> the pixels transformers' image processor makes (no resize or crop)."""
    transformers = pytest.importorskip("transformers")
    _, model, params = tiny16
    nhwc = _uint8_images()
    ref = transformers.ChineseCLIPImageProcessorPil(do_resize=False, do_center_crop=False)(
        list(nhwc), return_tensors="np"
    )["pixel_values"]
    np.testing.assert_array_equal(np.asarray(encoding.model_pixels(nhwc)), ref)
    np.testing.assert_array_equal(np.asarray(encoding.model_pixels(nhwc.transpose(0, 3, 1, 2))), ref)
    want = jax.jit(lambda p, x: model.apply({"params": p}, x, method="get_image_features"))(params, ref)
    got = encoding.image_fn(model)(params, nhwc)
    np.testing.assert_allclose(got, want / np.linalg.norm(want, axis=-1, keepdims=True), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="uint8"):
        encoding.model_pixels(nhwc.astype(np.uint16))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\) or \(N, 3, H, W\)"):
        encoding.model_pixels(nhwc[:, :, :, :2])


def test_out_of_vocabulary_ids_refused_or_clamped(tiny16):
    cfg, model, params = tiny16
    vocab = cfg.text_config.vocab_size
    ids = np.array([[1, 5, 7, 2], [1, 9, 3, 2]], np.int32)
    mask = np.ones_like(ids)
    features = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, method="get_text_features"))
    for bad in (vocab, -1):
        oov = ids.copy()
        oov[1, 2] = bad
        with pytest.raises(ValueError, match=f"token id {bad}, outside the vocabulary"):
            model.apply({"params": params}, oov, mask, method="get_text_features")
        with pytest.raises(ValueError, match="outside the vocabulary"):
            model.apply({"params": params}, oov, np.zeros((2, 3, RES, RES), np.float32), mask)
        # traced: clamped to the nearest valid id, finite, the same as that id's embedding
        got = features(params, oov, mask)
        clamped = oov.copy()
        clamped[1, 2] = vocab - 1 if bad >= vocab else 0
        want = features(params, clamped, mask)
        assert np.isfinite(np.asarray(got)).all()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="integer token ids"):
        model.apply({"params": params}, ids.astype(np.float32), mask, method="get_text_features")


def test_pad_to_bucket_and_compile_count(tiny16):
    _, model, params = tiny16
    buckets = encoding.bucket_sizes(16)
    assert buckets == (1, 4, 16)
    ids = np.random.default_rng(0).integers(1, 64, (11, 6)).astype(np.int32)
    batch = {"ids": ids, "mask": np.ones_like(ids)}
    padded, n = encoding.pad_to_bucket(batch, buckets)
    assert n == 11 and padded["ids"].shape == (16, 6)
    np.testing.assert_array_equal(padded["ids"][:11], ids)
    np.testing.assert_array_equal(padded["ids"][11:], np.repeat(ids[-1:], 5, axis=0))
    traces = []

    def text(p, i, m):
        traces.append(i.shape)
        return encoding.text_embeddings(model, p, i, m)

    fn = jax.jit(text)
    ref = np.asarray(fn(params, *padded.values()))  # all 11 rows (+5 padding) in one call
    for size in (1, 3, 4, 11, 2):
        (pi, pm), k = encoding.pad_to_bucket((ids[:size], np.ones_like(ids[:size])), buckets)
        out = np.asarray(fn(params, pi, pm))[:k]
        np.testing.assert_allclose(out, ref[:size], rtol=1e-5, atol=1e-6)
    assert len(traces) == 3  # one compile per bucket, not per batch size
    with pytest.raises(ValueError, match="larger than the largest bucket 16"):
        encoding.pad_to_bucket(np.zeros((17, 2)), buckets)
    with pytest.raises(ValueError, match="different leading sizes"):
        encoding.pad_to_bucket((np.zeros((3, 2)), np.zeros((4, 2))), buckets)


def test_cast_params_bf16(tiny16):
    _, model, params = tiny16
    half = encoding.cast_params(params)
    assert half["logit_scale"].dtype == jnp.float32
    assert half["text_projection"]["kernel"].dtype == jnp.bfloat16
    sizes = [sum(x.nbytes for x in jax.tree.leaves(p)) for p in (params, half)]
    assert sizes[1] < 0.6 * sizes[0]
    ids = np.array([[1, 5, 7, 2]], np.int32)
    fn = encoding.text_fn(model)
    full, low = fn(params, ids, np.ones_like(ids)), fn(half, ids, np.ones_like(ids))
    assert float(jnp.sum(full * low)) > 0.99  # cosine of the fp32 and bf16-param embeddings


def test_dropout_rngs(tiny16):
    cfg = tiny_config(vocab_size=64, hidden=16, layers=1, heads=2, image_size=RES, patch_size=8, dropout=0.5)
    model = ccj.ChineseCLIPModel(cfg)
    params = tiny16[2]
    ids = np.array([[1, 5, 7, 9, 2]], np.int32)
    mask = np.ones_like(ids)
    det = encoding.text_fn(model)(params, ids, mask)
    train = jax.jit(lambda p, rng: encoding.text_embeddings(model, p, ids, mask, deterministic=False, rng=rng))
    a, b, c = (train(params, jax.random.key(k)) for k in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, det) and not np.allclose(a, c)
    with pytest.raises(Exception, match="dropout"):  # flax: no "dropout" rng given
        encoding.text_embeddings(model, params, ids, mask, deterministic=False)


def test_shard_params_needs_no_inputs(tiny16):
    _, model, params = tiny16
    mesh = shd.make_mesh(devices=jax.devices()[:1])
    placed = shd.shard_params(model, params, mesh)
    assert jax.tree.structure(placed) == jax.tree.structure(params)
    want = shd.param_shardings(model, mesh, jnp.ones((1, 8), jnp.int32), jnp.zeros((1, 3, RES, RES)))
    assert jax.tree.leaves(jax.tree.map(lambda x: x.sharding, placed)) == jax.tree.leaves(want)
    broken = dict(params)
    del broken["text_projection"]
    with pytest.raises(ValueError, match="text_projection"):
        shd.shard_params(model, broken, mesh)
