"""LoRA adapters (modeling.lora) and what trains (training.optim): exactness at init, the merge
against a NumPy reference, a LoRA train step that moves only the adapters, the trainer's
counts in run_options.json, its merged HF export against transformers' PyTorch model, resume,
partial unfreezing and the config errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _train_helpers import fake_batches, opt_config, random_params, tiny_config
from _train_run import make_iterator, tiny_train_config

import chinese_clip_jax as ccj
from chinese_clip_jax.modeling.lora import init_lora, lora_paths, merge_lora
from chinese_clip_jax.training import optim
from chinese_clip_jax.training.loop import train


def _features(cfg, params, batch, scan_layers=False):
    model = ccj.ChineseCLIPModel(cfg, scan_layers=scan_layers)
    v = {"params": params}
    text = model.apply(v, batch["input_ids"], batch["attention_mask"], method="get_text_features")
    image = model.apply(v, batch["pixel_values"], method="get_image_features")
    return np.asarray(text), np.asarray(image)


def _randomize_b(adapters, seed=1):
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = jax.tree_util.keystr(path)
        return (0.1 * rng.standard_normal(x.shape)).astype(np.float32) if name.endswith("['b']") else x

    return jax.tree_util.tree_map_with_path(draw, adapters)


def test_fresh_adapters_leave_the_model_exactly_as_it_was():
    cfg = tiny_config()
    params = random_params(cfg)
    batch = fake_batches(1, 3)[0]
    adapters = init_lora(params, 4, 8.0, ("text", "image"), ("attention", "mlp"))
    assert (
        len(lora_paths(params, ("text", "image"), ("attention", "mlp"))) == 2 * 2 * 6
    )  # towers x layers x projections
    merged = merge_lora({**params, "lora": adapters})
    assert "lora" not in merged
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), merged, params)
    assert all(jax.tree.leaves(same))  # B = 0: bitwise the base
    for got, want in zip(_features(cfg, merged, batch), _features(cfg, params, batch)):
        np.testing.assert_array_equal(got, want)


def test_merge_equals_a_numpy_reference_unrolled_and_scanned():
    cfg = tiny_config()
    params = random_params(cfg)
    adapters = _randomize_b(init_lora(params, 3, 6.0, ("text", "image"), ("attention", "mlp"), seed=2))
    merged = merge_lora({**params, "lora": adapters})
    scale = 6.0 / 3
    # attention output kernel: (heads, head_dim, embed); A: (heads, head_dim, r), B: (r, embed)
    ab = adapters["vision_model"]["encoder"]["layer_1"]["attention"]["out"]
    w = params["vision_model"]["encoder"]["layer_1"]["attention"]["out"]["kernel"]
    want = w.astype(np.float64) + scale * np.einsum("hdr,re->hde", ab["a"], ab["b"])
    got = merged["vision_model"]["encoder"]["layer_1"]["attention"]["out"]["kernel"]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)
    # query kernel: (embed, heads, head_dim)
    ab = adapters["text_model"]["encoder"]["layer_0"]["attention"]["query"]
    w = params["text_model"]["encoder"]["layer_0"]["attention"]["query"]["kernel"]
    want = w + scale * np.einsum("er,rhd->ehd", ab["a"], ab["b"])
    np.testing.assert_allclose(
        np.asarray(merged["text_model"]["encoder"]["layer_0"]["attention"]["query"]["kernel"]),
        want,
        rtol=1e-6,
        atol=1e-7,
    )
    # untouched leaves come back as they were
    assert merged["text_projection"] is params["text_projection"]

    # the same adapters stacked for scan_layers merge to the stacked merged kernels
    def stack(tree, top):
        enc = tree[top]["encoder"]
        layers = [enc[f"layer_{i}"] for i in range(2)]
        return {**tree[top], "encoder": {"layers": jax.tree.map(lambda *xs: np.stack(xs), *layers)}}

    stacked = {**params, "text_model": stack(params, "text_model"), "vision_model": stack(params, "vision_model")}
    stacked_lora = {
        "scale": adapters["scale"],
        "text_model": {
            "encoder": {
                "layers": jax.tree.map(
                    lambda *xs: np.stack(xs), *[adapters["text_model"]["encoder"][f"layer_{i}"] for i in range(2)]
                )
            }
        },
        "vision_model": {
            "encoder": {
                "layers": jax.tree.map(
                    lambda *xs: np.stack(xs), *[adapters["vision_model"]["encoder"][f"layer_{i}"] for i in range(2)]
                )
            }
        },
    }
    fresh = init_lora(stacked, 3, 6.0, ("text", "image"), ("attention", "mlp"))
    assert jax.tree.map(np.shape, fresh) == jax.tree.map(np.shape, stacked_lora)
    got = merge_lora({**stacked, "lora": stacked_lora})["vision_model"]["encoder"]["layers"]["mlp"]["fc1"]["kernel"]
    want = np.stack([merged["vision_model"]["encoder"][f"layer_{i}"]["mlp"]["fc1"]["kernel"] for i in range(2)])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)
    batch = fake_batches(1, 3)[0]
    for got, want in zip(
        _features(cfg, merge_lora({**stacked, "lora": stacked_lora}), batch, True), _features(cfg, merged, batch)
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_lora_step_moves_only_the_adapters_and_holds_moments_for_them_alone():
    from chinese_clip_jax import sharding as shd
    from chinese_clip_jax.training import create_train_state, make_optimizer, make_train_step

    cfg = tiny_config()
    model = ccj.ChineseCLIPModel(cfg)
    mesh = shd.make_mesh()
    tx, schedule = make_optimizer(opt_config(), total_steps=10)
    lora = dict(rank=2, alpha=4.0, towers=("text", "image"), targets=("attention", "mlp"))
    state, shardings = create_train_state(model, tx, mesh, 0, init_params=random_params(cfg), lora=lora)
    before = jax.tree.map(np.asarray, state.params)
    labels = optim.trainable_labels(before, None)
    trainable, total = optim.label_count(before, labels)
    assert trainable == sum(x.size for x in jax.tree.leaves(before["lora"])) - 1  # all but the scale
    assert trainable < total  # (hidden 16: rank 2 is 1/8 of a kernel; the trainer test checks < 5%)
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if getattr(x, "ndim", 0) > 0)
    assert moments == 2 * trainable  # AdamW's mu and nu, for the adapters only
    step = make_train_step(model, tx, schedule, mesh, shardings)
    with shd.use_mesh_and_rules(mesh):
        for b in fake_batches(3, 4):
            state, metrics = step(state, shd.shard_batch(b, mesh))
    after = jax.tree.map(np.asarray, state.params)
    for (path, x), y, lab in zip(
        jax.tree_util.tree_flatten_with_path(before)[0], jax.tree.leaves(after), jax.tree.leaves(labels)
    ):
        name = jax.tree_util.keystr(path)
        if lab == "frozen":
            assert np.array_equal(x, y), name
    assert not np.array_equal(
        before["lora"]["text_model"]["encoder"]["layer_0"]["mlp"]["fc2"]["b"],
        after["lora"]["text_model"]["encoder"]["layer_0"]["mlp"]["fc2"]["b"],
    )
    assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0


def test_partial_unfreezing_trains_the_last_layers_and_the_head_only():
    cfg = tiny_config(layers=3)
    params = random_params(cfg)
    labels = optim.trainable_labels(params, None, {"text": 1})
    flat = {jax.tree_util.keystr(p): lab for p, lab in jax.tree_util.tree_flatten_with_path(labels)[0]}
    text = {k: v for k, v in flat.items() if k.startswith(("['text_model']", "['text_projection']"))}
    trained = {k for k, v in text.items() if v == "trainable"}
    assert trained == {k for k in text if "['layer_2']" in k or k.startswith("['text_projection']")}
    assert all(v == "trainable" for k, v in flat.items() if k.startswith(("['vision_model']", "['logit_scale']")))
    # image tower, 0 layers: only what follows the layers (post LayerNorm, projection)
    labels = optim.trainable_labels(params, None, {"image": 0})
    flat = {jax.tree_util.keystr(p): lab for p, lab in jax.tree_util.tree_flatten_with_path(labels)[0]}
    assert {k for k, v in flat.items() if v == "trainable" and "vis" in k} == {
        "['vision_model']['post_layernorm']['bias']",
        "['vision_model']['post_layernorm']['scale']",
        "['visual_projection']['kernel']",
    }
    # with LoRA: adapters plus the unfrozen layers; the rest of the base frozen
    adapters = init_lora(params, 2, 2.0, ("image",), ("attention",))
    labels = optim.trainable_labels({**params, "lora": adapters}, None, {"text": 1})
    flat = {jax.tree_util.keystr(p): lab for p, lab in jax.tree_util.tree_flatten_with_path(labels)[0]}
    assert flat["['logit_scale']"] == "frozen" and flat["['lora']['scale']"] == "frozen"
    assert flat["['vision_model']['post_layernorm']['scale']"] == "frozen"
    assert flat["['text_model']['encoder']['layer_2']['mlp']['fc1']['kernel']"] == "trainable"
    assert flat["['lora']['vision_model']['encoder']['layer_0']['attention']['out']['a']"] == "trainable"


def test_the_abstract_state_for_lowering_holds_the_same_adapters():
    from chinese_clip_jax import sharding as shd
    from chinese_clip_jax.training import create_train_state, make_optimizer
    from chinese_clip_jax.training.state import abstract_train_state

    cfg = tiny_config()
    model = ccj.ChineseCLIPModel(cfg, scan_layers=True)
    mesh = shd.make_mesh()
    tx, _ = make_optimizer(opt_config(), total_steps=10)
    lora = dict(rank=2, alpha=4.0, towers=("image",), targets=("mlp",))
    abstract = abstract_train_state(model, tx, mesh, lora=lora)
    state, _ = create_train_state(model, tx, mesh, 0, lora=lora)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == jax.tree.map(lambda x: (x.shape, x.dtype), state)
    assert set(state.params["lora"]) == {"scale", "vision_model"}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"lora.rank": -1}, "config.lora.rank = -1: must be an int >= 0"),
        ({"lora.alpha": 0.0}, "config.lora.alpha = 0.0: must be a number > 0"),
        (
            {"lora.towers": "text,audio"},
            "config.lora.towers = 'text,audio': must be a comma-separated list of text, image",
        ),
        ({"lora.targets": "ffn"}, "config.lora.targets = 'ffn'"),
        ({"lora.rank": 4, "freeze": "image"}, "includes the tower config.freeze = 'image' freezes"),
        ({"unfreeze_last_layers.text": 2, "freeze": "text"}, "contradicts config.freeze = 'text'"),
        ({"unfreeze_last_layers.image": 1}, "unfreeze_last_layers needs unrolled layers"),
        ({"unfreeze_last_layers.image": -2}, "config.unfreeze_last_layers.image = -2: must be an int >= 0, or -1"),
    ],
)
def test_bad_lora_and_unfreeze_settings_fail_in_one_line(overrides, message):
    from chinese_clip_jax.training.validate import ConfigError, validate_config

    config = tiny_train_config(2, **overrides)
    with pytest.raises(ConfigError) as e:
        validate_config(config)
    assert message in str(e.value) and "\n" not in str(e.value)


def _restore_params(workdir, step):
    import orbax.checkpoint as ocp

    restored = ocp.StandardCheckpointer().restore(str(workdir / "checkpoints" / str(step) / "state"))
    return jax.tree.map(np.asarray, restored["params"])


@pytest.mark.slow
def test_a_lora_run_records_its_counts_exports_merged_weights_and_resumes(tmp_path):
    """A few LoRA steps through the trainer: < 5% trains (run_options.json); DIR/hf loads in
    transformers with no missing keys and gives the features of the merged trained params;
    a run stopped at step 2 and resumed ends with the adapters of the uninterrupted run."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    overrides = {"lora.rank": 2, "lora.targets": "attention,mlp", "checkpoint_every": 2, "export_hf": True}
    config = tiny_train_config(4, **overrides)
    with_eval = tiny_train_config(4, **overrides, eval_every=4)  # the evaluator sees the merged weights
    result = train(with_eval, str(tmp_path / "straight"), data_iter=make_iterator(config), progress=False)
    assert 0 <= result["last_eval"]["retrieval/mean_recall"] <= 1
    options = json.loads((tmp_path / "straight" / "run_options.json").read_text())
    assert 0 < options["trainable_params"] < 0.05 * options["total_params"]
    assert options["trainable_fraction"] == pytest.approx(options["trainable_params"] / options["total_params"])
    params = _restore_params(tmp_path / "straight", 4)
    assert "lora" in params

    # the export: an ordinary HF checkpoint of the merged weights
    hf, info = transformers.ChineseCLIPModel.from_pretrained(result["export_dir"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    cfg = ccj.ChineseCLIPConfig.from_pretrained(result["export_dir"])
    b = fake_batches(1, 3, seq=8, image=16, vocab=64)[0]
    text, image = _features(cfg, merge_lora(params), b, scan_layers=True)
    with torch.no_grad():
        ids, mask = torch.tensor(b["input_ids"]).long(), torch.tensor(b["attention_mask"]).long()
        want_text = hf.eval().get_text_features(
            input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)
        )
        want_image = hf.get_image_features(pixel_values=torch.tensor(b["pixel_values"]))
    want_text = getattr(want_text, "pooler_output", want_text).numpy()
    want_image = getattr(want_image, "pooler_output", want_image).numpy()
    np.testing.assert_allclose(text, want_text, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(image, want_image, rtol=1e-4, atol=1e-5)
    # and the base did not move: the export differs from the untrained model only by the deltas
    assert not np.allclose(
        merge_lora(params)["text_model"]["encoder"]["layers"]["mlp"]["fc1"]["kernel"],
        params["text_model"]["encoder"]["layers"]["mlp"]["fc1"]["kernel"],
    )

    # resume: the same run stopped (an error) while fetching batch 3, after checkpoint 2, then rerun
    def stop_at_3(index, batch):
        if index == 3:
            raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        train(config, str(tmp_path / "resumed"), data_iter=make_iterator(config, stop_at_3), progress=False)
    again = train(config, str(tmp_path / "resumed"), data_iter=make_iterator(config), progress=False)
    assert again["steps_run"] == 2
    resumed = _restore_params(tmp_path / "resumed", 4)
    for x, y in zip(jax.tree.leaves(resumed["lora"]), jax.tree.leaves(params["lora"])):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    # another rank on the same workdir is refused by name, the checkpoints untouched
    from chinese_clip_jax.training.validate import ConfigError

    other = tiny_train_config(6, **{**overrides, "lora.rank": 4})
    with pytest.raises(ConfigError, match="lora.rank is 2 there, 4 now"):
        train(other, str(tmp_path / "resumed"), data_iter=make_iterator(other), progress=False)


def test_lora_gradients_with_accumulation_equal_the_full_batch_ones():
    from chinese_clip_jax import sharding as shd
    from chinese_clip_jax.training.step import make_grad_fn

    cfg = tiny_config()
    model = ccj.ChineseCLIPModel(cfg)
    params = random_params(cfg)
    params = {**params, "lora": _randomize_b(init_lora(params, 2, 4.0, ("text", "image"), ("attention", "mlp")))}
    mesh = shd.make_mesh()
    batch = shd.shard_batch(fake_batches(1, 8)[0], mesh)
    rng = jax.random.PRNGKey(0)
    with shd.use_mesh_and_rules(mesh):
        loss1, g1 = jax.jit(make_grad_fn(model, mesh, deterministic=True))(params, batch, rng)
        loss2, g2 = jax.jit(make_grad_fn(model, mesh, accum_steps=2, deterministic=True))(params, batch, rng)
    np.testing.assert_allclose(float(loss2), float(loss1), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1["lora"]), jax.tree.leaves(g2["lora"])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-7)
    assert float(jnp.abs(g1["lora"]["text_model"]["encoder"]["layer_0"]["mlp"]["fc1"]["a"]).max()) > 0
    assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(g1["text_model"]))  # the base: zero gradient
