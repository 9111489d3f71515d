"""RN50@RBT3-chinese: parity with cn_clip's own ModifiedResNet + 3-layer RoBERTa (built from its
model config files, random weights and BatchNorm statistics), the .pt round trip, the CLI, and
training with frozen BatchNorm statistics."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _makers import import_cn_clip_model
from _makers import run_convert as run_cli
from _train_helpers import RESNET_SIZES, random_params, tiny_config

import chinese_clip_jax as ccj
from chinese_clip_jax.conversion import save_cn_clip


def cn_clip_rn50(seed=0, **overrides):
    """cn_clip's CLIP from its RN50.json + RBT3-chinese.json, BatchNorm made non-trivial."""
    cn_model = import_cn_clip_model()
    spec_dir = os.path.join(os.path.dirname(cn_model.__file__), "model_configs")
    spec = {}
    for name in ("RN50", "RBT3-chinese"):
        with open(os.path.join(spec_dir, name + ".json")) as f:
            spec.update(json.load(f))
    spec["vision_layers"] = json.loads(spec["vision_layers"])  # "[3,4,6,3]", as cn_clip reads it
    spec.update(overrides)
    torch.manual_seed(seed)
    model = cn_model.CLIP(**spec).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model.logit_scale.fill_(np.log(100.0))
        for m in model.visual.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # cn_clip zero-inits bn3: randomise all of it
                n = m.num_features
                m.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model


def save_like_cn_clip(model, path):
    state = {"module." + k: v for k, v in model.state_dict().items()}
    state["module.bert.pooler.dense.weight"] = torch.randn(768, 768)  # released files carry it
    state["module.bert.pooler.dense.bias"] = torch.randn(768)
    torch.save({"epoch": 1, "step": 10, "name": "rn50", "state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def rn50(tmp_path_factory):
    model = cn_clip_rn50()
    return model, save_like_cn_clip(model, tmp_path_factory.mktemp("rn50") / "clip_cn_rn50.pt")


def text_inputs(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(106, 21128, (3, 12))
    ids[:, 0] = 101
    ids[1, 6:] = 0  # padded row
    return ids, (ids != 0).astype(np.int32)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [None, "RN50@RBT3-chinese"], ids=["inferred", "named"])
def test_rn50_matches_cn_clip_model(rn50, arch):
    ref, path = rn50
    model, params = ccj.from_pretrained(path, arch=arch)
    assert model.config == ccj.ChineseCLIPConfig.preset("chinese-clip-rn50")
    assert "visual_projection" not in params
    ids, mask = text_inputs()
    px = np.random.default_rng(1).standard_normal((2, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        want_text = ref.encode_text(torch.tensor(ids)).numpy()
        want_image = ref.encode_image(torch.tensor(px)).numpy()
        want_logits, _ = ref.get_similarity(torch.tensor(px), torch.tensor(ids))
    v = {"params": params}
    text = model.apply(v, jnp.asarray(ids), jnp.asarray(mask), method="get_text_features")
    image = jax.jit(lambda p, x: model.apply({"params": p}, x, method="get_image_features"))(params, px)
    logits = model.apply(v, jnp.asarray(ids), jnp.asarray(px), attention_mask=jnp.asarray(mask)).logits_per_image
    assert want_image.shape == (2, 1024) and np.abs(want_image).max() > 1e-2
    np.testing.assert_allclose(np.asarray(text), want_text, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(image), want_image, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(logits), want_logits.numpy(), atol=1e-3, rtol=0)


@pytest.mark.slow
def test_rn50_pt_round_trip_is_bitwise(rn50, tmp_path):
    ref, path = rn50
    _, params = ccj.from_pretrained(path)
    back = save_cn_clip(tmp_path / "back.pt", ccj.ChineseCLIPConfig.preset("chinese-clip-rn50"), params)
    original = {k: v for k, v in ref.state_dict().items()}
    written = torch.load(back, weights_only=True)["state_dict"]
    assert all(k.startswith("module.") for k in written)
    written = {k[len("module.") :]: v for k, v in written.items()}
    assert set(written) == set(original)  # pooler dropped, num_batches_tracked kept
    for k, v in original.items():
        if k.endswith("num_batches_tracked"):
            assert written[k].dtype == torch.int64
        else:
            assert torch.equal(written[k], v), k
    # cn_clip's own model loads it strictly
    fresh = cn_clip_rn50(seed=5)
    fresh.load_state_dict(written, strict=True)


@pytest.mark.slow
def test_rn50_cli_flax_and_back_and_hf_refused(rn50, tmp_path):
    _, path = rn50
    r = run_cli(path, tmp_path / "flax")
    assert r.returncode == 0, r.stderr
    r = run_cli(tmp_path / "flax", tmp_path / "pt", "--to", "pt")
    assert r.returncode == 0, r.stderr
    a = torch.load(path, weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "pt" / "cn_clip.pt", weights_only=True)["state_dict"]
    for k, v in b.items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(a[k], v), k
    r = run_cli(tmp_path / "flax", tmp_path / "hf", "--to", "hf", "--skip-parity")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "transformers has no ResNet (RN50)" in r.stderr
    assert not (tmp_path / "hf").exists()


# --------------------------------------------------------------------------- training


def test_resnet_config_round_trips_and_validates(tmp_path):
    cfg = tiny_config(**RESNET_SIZES)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["vision_config"]["model_type"] == "chinese_clip_resnet_vision_model"
    assert ccj.ChineseCLIPConfig.from_dict(d) == cfg and cfg.is_resnet
    cfg.save(tmp_path)
    assert ccj.ChineseCLIPConfig.from_pretrained(tmp_path) == cfg
    with pytest.raises(ValueError, match="image_size must be a multiple of 32"):
        ccj.ChineseCLIPResNetConfig(image_size=100)
    with pytest.raises(ValueError, match="unknown model_type 'vit'"):
        ccj.ChineseCLIPConfig.from_dict({"vision_config": {"model_type": "vit"}})


@pytest.mark.slow
def test_finetuning_keeps_batchnorm_statistics(tmp_path):
    """init_from a converted RN model: weights train, BatchNorm statistics stay bitwise, and the
    optimizer holds no moments for them."""
    from _train_run import tiny_train_config

    from chinese_clip_jax.training.loop import train

    cfg = tiny_config(**RESNET_SIZES)
    params = random_params(cfg)
    ccj.conversion.save_flax(tmp_path / "init", cfg, params)
    config = tiny_train_config(2, init_from=str(tmp_path / "init"), export_hf=True)
    config.model.update(scan_layers="false", remat="none")
    config.batch_size = 8
    result = train(config, str(tmp_path / "ft"), progress=False)  # demo data at the model's 32 px
    assert result["export_dir"].endswith("flax")
    _, after = ccj.from_pretrained(result["export_dir"])
    flat_before = ccj.conversion.mapping.flatten(params)
    flat_after = ccj.conversion.mapping.flatten(after)
    stats = [k for k in flat_before if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 2 * (3 + 3 * 5 + 4)  # stem 3 BNs, 5 blocks x 3, 4 shortcut BNs
    for k in stats:
        assert np.array_equal(flat_before[k], np.asarray(flat_after[k])), k
    moved = [k for k in flat_before if k.endswith("kernel") and not np.array_equal(flat_before[k], flat_after[k])]
    assert "vision_model/stem/conv1/kernel" in moved and "vision_model/attnpool/out/kernel" in moved


def test_optimizer_labels_statistics_frozen():
    from chinese_clip_jax.training.optim import trainable_labels

    cfg = tiny_config(**RESNET_SIZES)
    params = random_params(cfg)
    labels = ccj.conversion.mapping.flatten(trainable_labels(dict(params), None))
    assert labels["vision_model/stem/bn1/running_var"] == "frozen"
    assert labels["vision_model/stem/bn1/scale"] == "trainable"


def test_chinese_clip_high_level_api_takes_a_resnet(tmp_path):
    import PIL.Image

    cfg = tiny_config(**RESNET_SIZES)
    params = random_params(cfg)
    ccj.conversion.save_flax(tmp_path / "rn", cfg, params)
    clip = ccj.ChineseCLIP.from_pretrained(tmp_path / "rn", image_batch_size=2)
    assert clip.processor.image_size == (32, 32)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    emb = clip.encode_image([image, image, image])
    px = clip.processor.preprocess_images([image])
    want = np.asarray(clip.model.apply({"params": clip.params}, jnp.asarray(px), method="get_image_features"))
    np.testing.assert_allclose(emb[2], want[0] / np.linalg.norm(want[0]), atol=1e-5)
    clip.processor.context_length = 16  # the tiny text tower's positions
    assert clip.zero_shot([image], ["猫", "狗"]).shape == (1, 2)
