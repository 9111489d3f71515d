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
from _train_helpers import data_mesh, fake_batches, opt_config, tiny_config

import chinese_clip_jax as ccj
from chinese_clip_jax import sharding as shd
from chinese_clip_jax.modeling.layers import attention_mask_kwargs, resolve_scan_layers
from chinese_clip_jax.training import create_train_state, make_optimizer, make_train_step, xla_flags
from chinese_clip_jax.training.checkpoint import Checkpointer, abstract_like
from chinese_clip_jax.training.step import RNG_IMPLS, dropout_key


@pytest.mark.slow
def test_each_rng_impl_resumes_exactly_and_draws_its_own_masks(tmp_path):
    """4 steps straight == 2 steps, an Orbax checkpoint round trip, 2 more steps: bit for bit, per
    implementation; and the implementations draw different dropout masks (the option reaches dropout)."""
    mesh = data_mesh()
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


def test_cudnn_model_passes_key_lengths_and_pads_the_odd_image_length(monkeypatch):
    """attention_impl="cudnn" on CPU with dot_product_attention redirected to xla: the text tower
    hands over its sequence lengths; the image tower (1 + 4 patches: odd, which cuDNN refuses in
    training) runs padded to 8 tokens with every image's length 5; the features equal the xla model's."""
    from chinese_clip_jax.modeling.layers import cudnn_padded_length

    cfg = tiny_config()
    calls = []
    real = jax.nn.dot_product_attention

    def spy(q, k, v, *args, implementation=None, **kwargs):
        calls.append((q.shape[1], implementation, sorted(kwargs), kwargs.get("key_value_seq_lengths")))
        return real(q, k, v, *args, implementation="xla", **kwargs)

    batch = fake_batches(1, 4, seed=1, seq=6)[0]  # text length 6, image 5 tokens padded to 8

    def run(impl, params):
        model = ccj.ChineseCLIPModel(cfg, attention_impl=impl)
        return model.apply({"params": params}, batch["input_ids"], batch["pixel_values"], batch["attention_mask"])

    params = jax.jit(ccj.ChineseCLIPModel(cfg).init)(jax.random.key(0), batch["input_ids"], batch["pixel_values"])[
        "params"
    ]
    want = run("xla", params)
    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    got = run("cudnn", params)
    text_len, image_len = batch["input_ids"].shape[1], cfg.vision_config.num_patches + 1
    assert image_len == 5 and cudnn_padded_length(image_len) == 8
    assert {c[0] for c in calls} == {text_len, 8}
    for seq, impl, kwargs, lengths in calls:
        assert impl == "cudnn" and kwargs == ["key_value_seq_lengths"], (seq, kwargs)
        want_lengths = batch["attention_mask"].sum(-1) if seq == text_len else np.full(4, image_len)
        np.testing.assert_array_equal(np.asarray(lengths), want_lengths)
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


@pytest.mark.parametrize("seq", [17, 12], ids=["odd-padded", "even"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "key-mask"])
def test_padded_cudnn_arguments_equal_the_plain_xla_attention(seq, masked):
    """``padded_attention`` (cuDNN's arguments: odd lengths zero-padded to a multiple of 8, the
    padding masked by key lengths), run by the xla implementation, equals plain XLA attention on
    the unpadded inputs, forward and gradients, fp32."""
    from chinese_clip_jax.modeling.layers import cudnn_padded_length, padded_attention

    assert cudnn_padded_length(197) == 200 and cudnn_padded_length(52) == 52 and cudnn_padded_length(17) == 24
    rng = np.random.default_rng(seq)
    b, h, d = 3, 4, 8
    q, k, v = (jnp.asarray(rng.standard_normal((b, seq, h, d)), jnp.float32) for _ in range(3))
    mask = None
    if masked:
        lengths = np.array([seq, 1, seq // 2])
        mask = jnp.asarray(np.arange(seq)[None, :] < lengths[:, None])[:, None, None, :]
    cot = jnp.asarray(rng.standard_normal((b, seq, h, d)), jnp.float32)

    def plain(q, k, v):
        return (jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla") * cot).sum()

    def padded(q, k, v):
        return (padded_attention(q, k, v, mask, "xla") * cot).sum()

    np.testing.assert_allclose(
        np.asarray(padded_attention(q, k, v, mask, "xla")),
        np.asarray(jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")),
        rtol=1e-5,
        atol=1e-5,
    )
    for got, want in zip(jax.grad(padded, (0, 1, 2))(q, k, v), jax.grad(plain, (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_run_defaults_per_platform_and_explicit_values_win():
    from chinese_clip_jax.training.defaults import platform_defaults, resolve_run_options
    from chinese_clip_jax.training.recipes import base

    c = base.get_config()
    assert {p: resolve_run_options(c, p).model_options() for p in ("cpu", "cuda", "tpu")} == {
        "cpu": dict(attention_impl=None, scan_layers=True, remat="dots"),
        "cuda": dict(attention_impl="cudnn", scan_layers=False, remat="none"),
        "tpu": dict(attention_impl="xla", scan_layers=True, remat="dots"),
    }
    assert resolve_run_options(c, "cpu").rng_impl == "threefry" and resolve_run_options(c, "tpu").rng_impl == "rbg"
    assert resolve_run_options(c).platform == "cpu"  # this host
    c.dtype = "float32"  # cuDNN attention takes fp16/bf16 only: an fp32 run on cuda gets XLA's
    assert resolve_run_options(c, "cuda").attention_impl == "xla"
    c.model.update(attention_impl="cudnn", scan_layers="true", remat="false")  # command-line strings
    c.rng_impl = "unsafe_rbg"
    o = resolve_run_options(c, "cuda")
    assert (o.attention_impl, o.scan_layers, o.remat, o.rng_impl, o.dtype) == (
        "cudnn",
        True,
        "none",
        "unsafe_rbg",
        "float32",
    )
    assert set(o.source.values()) == {"config"}
    assert "attention_impl = 'cudnn' (set in the config)" in o.describe()
    with pytest.raises(ValueError, match="platform must be one of"):
        platform_defaults("metal")


def test_run_options_are_printed_once_and_written_to_the_workdir(tmp_path, capsys):
    import json

    from chinese_clip_jax.io import as_path
    from chinese_clip_jax.training.defaults import resolve_run_options
    from chinese_clip_jax.training.loop import _record_run_options
    from chinese_clip_jax.training.recipes import base

    options = resolve_run_options(base.get_config(), "tpu")
    _record_run_options(as_path(str(tmp_path)), options)
    printed = capsys.readouterr().out
    assert printed.startswith("run options for tpu") and "rng_impl = 'rbg' (auto)" in printed
    saved = json.loads((tmp_path / "run_options.json").read_text())
    assert saved["remat"] == "dots" and saved["source"]["dtype"] == "auto" and saved["platform"] == "tpu"
    assert not list(tmp_path.glob("*.tmp"))


def test_text_embedding_gradients_have_no_scatter_into_small_tables():
    """bf16 compute: the only scatter in the text tower's gradient is the word table's, in fp32;
    token types (one-hot matmul) and default positions (a slice) have none. Explicit position ids
    (a gather) give the same features as the default range."""
    cfg = tiny_config(dropout=0.0)
    b = fake_batches(1, 2)[0]
    model = ccj.ChineseCLIPModel(cfg, dtype=jnp.bfloat16)
    params = model.init(jax.random.key(0), b["input_ids"], b["pixel_values"])["params"]

    def loss(p):
        return model.apply({"params": p}, b["input_ids"], b["attention_mask"], method="get_text_features").sum()

    lines = jax.jit(jax.grad(loss)).lower(params).as_text().splitlines()
    starts = [i for i, line in enumerate(lines) if "stablehlo.scatter" in line]
    assert len(starts) == 1, [lines[i] for i in starts]
    signature = next(line for line in lines[starts[0] :] if "}) : (" in line)  # the op's type, after its region
    assert f"-> tensor<{cfg.text_config.vocab_size}x{cfg.text_config.hidden_size}xf32>" in signature, signature

    fp32 = ccj.ChineseCLIPModel(cfg)
    ids, mask = b["input_ids"], b["attention_mask"]
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    default = fp32.apply({"params": params}, ids, mask, method="get_text_features")
    explicit = fp32.apply({"params": params}, ids, mask, position_ids=positions, method="get_text_features")
    np.testing.assert_allclose(np.asarray(default), np.asarray(explicit), rtol=1e-6, atol=1e-6)
