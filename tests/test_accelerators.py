"""The accelerator levers, checked on CPU: the dropout RNG implementation (exact resume with each),
the cuDNN form of the key-padding mask (same results through the xla implementation), the
``precision`` option (reaches every matmul of the lowered program), ``scan_layers="auto"`` and the
one place XLA GPU flags are set."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _train_helpers import fake_batches, opt_config, tiny_config

import chinese_clip_jax as ccj
from chinese_clip_jax.inference import sharding as shd
from chinese_clip_jax.modeling.layers import attention_mask_kwargs, resolve_scan_layers
from chinese_clip_jax.training import create_train_state, make_optimizer, make_train_step, xla_flags
from chinese_clip_jax.training.checkpoint import Checkpointer, abstract_like
from chinese_clip_jax.training.step import RNG_IMPLS, dropout_key


def _mesh():
    return shd.make_mesh(-1, 1, 1)


def test_each_rng_impl_resumes_exactly_and_draws_its_own_masks(tmp_path):
    """4 steps straight == 2 steps, an Orbax checkpoint round trip, 2 more steps: bit for bit, per
    implementation; and the implementations draw different dropout masks (the option reaches dropout)."""
    mesh = _mesh()
    model = ccj.ChineseCLIPModel(tiny_config(dropout=0.3, layers=1), scan_layers=True)
    tx, schedule = make_optimizer(opt_config(lr=0.02), 10)
    batches = [shd.shard_batch(b, mesh) for b in fake_batches(4, 8, seed=3)]
    first_losses = {}
    init, shardings = create_train_state(model, tx, mesh, 0)
    for impl in RNG_IMPLS:
        step = make_train_step(model, tx, schedule, mesh, shardings, rng_impl=impl)
        state = jax.tree.map(jnp.copy, init)  # the step donates its state
        losses = []
        with shd.use_mesh_and_rules(mesh):
            for b in batches:
                state, m = step(state, b)
                losses.append(float(m["loss"]))
        straight = jax.tree.map(np.asarray, state.params)

        state = jax.tree.map(jnp.copy, init)
        with shd.use_mesh_and_rules(mesh):
            for b in batches[:2]:
                state, _ = step(state, b)
        ckpt = Checkpointer(tmp_path / impl, every=2, async_save=False)
        ckpt.save(2, state)
        ckpt.wait()
        state = ckpt.restore(abstract_like(state, shardings), step=2)
        ckpt.close()
        with shd.use_mesh_and_rules(mesh):
            for b in batches[2:]:
                state, m = step(state, b)
        assert float(m["loss"]) == losses[-1], impl
        for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(state.params)):
            assert np.asarray(b).tobytes() == a.tobytes(), impl
        first_losses[impl] = losses[0]
    assert len(set(first_losses.values())) == len(RNG_IMPLS), first_losses  # three different mask draws


def test_dropout_key_is_a_pure_function_of_the_raw_key():
    raw = jax.random.PRNGKey(7)
    assert dropout_key(raw) is raw
    for impl in ("rbg", "unsafe_rbg"):
        a, b = dropout_key(raw, impl), dropout_key(raw, impl)
        assert str(jax.random.key_impl(a)) == impl
        np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(b))
        bits = jax.random.bits(a, (64,))
        assert len(np.unique(np.asarray(bits))) > 60  # real random bits
    with pytest.raises(ValueError, match="rng_impl must be one of"):
        dropout_key(raw, "philox")


def test_cudnn_mask_form_gives_the_boolean_mask_result():
    """The cuDNN arguments (key_value_seq_lengths, no mask) through the xla implementation equal the
    boolean key-padding mask, on right-padded texts."""
    rng = np.random.default_rng(0)
    b, s, h, d = 5, 12, 4, 8
    q, k, v = (jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.float32) for _ in range(3))
    lengths = np.array([12, 1, 7, 3, 10])
    mask = jnp.asarray(np.arange(s)[None, :] < lengths[:, None])[:, None, None, :]
    cudnn_kwargs = attention_mask_kwargs(mask, "cudnn")
    assert set(cudnn_kwargs) == {"key_value_seq_lengths"}
    assert cudnn_kwargs["key_value_seq_lengths"].dtype == jnp.int32
    np.testing.assert_array_equal(cudnn_kwargs["key_value_seq_lengths"], lengths)
    assert set(attention_mask_kwargs(mask, "xla")) == {"mask"} and attention_mask_kwargs(None, "cudnn") == {}
    ref = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    got = jax.nn.dot_product_attention(q, k, v, implementation="xla", **cudnn_kwargs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_cudnn_model_passes_lengths_for_text_and_nothing_for_images(monkeypatch):
    """attention_impl="cudnn" on CPU with dot_product_attention redirected to xla: the text tower
    hands over sequence lengths, the image tower no mask at all, and the features equal the xla model's."""
    cfg = tiny_config()
    calls = []
    real = jax.nn.dot_product_attention

    def spy(q, k, v, *args, implementation=None, **kwargs):
        calls.append((q.shape[1], implementation, sorted(kwargs)))
        return real(q, k, v, *args, implementation="xla", **kwargs)

    batch = fake_batches(1, 4, seed=1)[0]

    def run(impl, params):
        model = ccj.ChineseCLIPModel(cfg, attention_impl=impl)
        return jax.jit(lambda p, b: model.apply({"params": p}, b["input_ids"], b["pixel_values"], b["attention_mask"]))(
            params, batch
        )

    params = jax.jit(ccj.ChineseCLIPModel(cfg).init)(jax.random.key(0), batch["input_ids"], batch["pixel_values"])[
        "params"
    ]
    want = run("xla", params)
    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    got = run("cudnn", params)
    text_len, image_len = batch["input_ids"].shape[1], cfg.vision_config.num_patches + 1
    assert {c[0] for c in calls} == {text_len, image_len}
    for seq, impl, kwargs in calls:
        assert impl == "cudnn"
        assert kwargs == (["key_value_seq_lengths"] if seq == text_len else []), (seq, kwargs)
    for a, b in ((got.text_embeds, want.text_embeds), (got.image_embeds, want.image_embeds)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _dot_precisions(hlo: str) -> list[str]:
    """The operand precision config of every dot_general in StableHLO text ("" when none is set)."""
    out = []
    for line in hlo.splitlines():
        if "stablehlo.dot_general" in line:
            m = re.search(r"precision = \[([A-Z]+), ([A-Z]+)\]", line)
            out.append(m.group(1) if m else "")
    return out


def test_precision_reaches_every_matmul_forward_and_backward():
    cfg = tiny_config()
    b = fake_batches(1, 2)[0]
    params = ccj.ChineseCLIPModel(cfg).init(jax.random.key(0), b["input_ids"], b["pixel_values"])["params"]

    def lowered(precision):
        model = ccj.ChineseCLIPModel(cfg, precision=precision)

        def loss(p):
            out = model.apply({"params": p}, b["input_ids"], b["pixel_values"], b["attention_mask"])
            return out.logits_per_text.sum()

        return jax.jit(jax.grad(loss)).lower(params).as_text()

    highest = _dot_precisions(lowered("highest"))
    assert len(highest) > 20 and set(highest) == {"HIGHEST"}, highest
    default = _dot_precisions(lowered(None))
    assert len(default) == len(highest)
    assert default.count("HIGHEST") <= 3  # only the (n, n) cosine logits, fp32 by design (and their grads)
    with pytest.raises(ValueError, match="precision must be None or one of"):
        ccj.ChineseCLIPModel(cfg, precision="fp32")


def test_precision_is_a_from_pretrained_option(tmp_path):
    cfg = tiny_config(vocab_size=21128, layers=1)  # the bundled tokenizer's vocab, for ChineseCLIP
    b = fake_batches(1, 2)[0]
    params = ccj.ChineseCLIPModel(cfg).init(jax.random.key(0), b["input_ids"], b["pixel_values"])["params"]
    ccj.save_pretrained(tmp_path / "hf", cfg, params)
    model, loaded = ccj.from_pretrained(tmp_path / "hf", precision="highest")
    assert model.precision == "highest"
    text = (
        jax.jit(lambda p: model.apply({"params": p}, b["input_ids"], b["attention_mask"], method="get_text_features"))
        .lower(loaded)
        .as_text()
    )
    assert set(_dot_precisions(text)) == {"HIGHEST"}
    clip = ccj.ChineseCLIP.from_pretrained(tmp_path / "hf", precision="highest")
    assert clip.model.precision == "highest"


def test_scan_layers_auto_picks_per_backend(monkeypatch):
    assert resolve_scan_layers("auto") is True  # CPU
    assert resolve_scan_layers(False) is False and resolve_scan_layers("true") is True
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert resolve_scan_layers("auto") is False
    cfg = tiny_config()
    b = fake_batches(1, 2)[0]
    params = ccj.ChineseCLIPModel(cfg, scan_layers="auto").init(jax.random.key(0), b["input_ids"], b["pixel_values"])[
        "params"
    ]
    assert "layer_0" in params["text_model"]["encoder"]  # unrolled on "gpu"
    with pytest.raises(ValueError, match="scan_layers must be"):
        ccj.ChineseCLIPModel(cfg, scan_layers="sometimes")


def test_xla_gpu_flags_are_set_once_and_never_override_the_user(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    added = xla_flags.apply("tuned")
    flags = os.environ["XLA_FLAGS"].split()
    assert flags[0] == "--xla_dump_to=/tmp/x" and added and all(f in flags for f in added)
    assert xla_flags.apply("tuned") == []  # already there: nothing added twice
    name = xla_flags.GPU_FLAG_SETS["tuned"][0].split("=")[0]
    monkeypatch.setenv("XLA_FLAGS", f"{name}=false")
    assert name not in " ".join(xla_flags.apply("tuned"))  # the user's own value wins
    assert xla_flags.apply("none") == []
    with pytest.raises(ValueError, match="unknown XLA GPU flag set"):
        xla_flags.apply("fastest")
