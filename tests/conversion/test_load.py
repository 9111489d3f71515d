"""Checkpoint conversion: HF <-> Flax round trips, the cn_clip .pt path against cn_clip's own model,
the convert CLI, and the error cases (each must name the problem and leave nothing corrupted)."""

import json
import os
import pickle
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from _makers import REPO, import_cn_clip_model, one_line_error, run_module
from _makers import run_convert as run_cli
from _train_helpers import CONVERSION_SIZES as SIZES
from _train_helpers import tiny_config
from safetensors.numpy import load_file, save_file

import chinese_clip_jax as ccj
from chinese_clip_jax.conversion import CheckpointError


def inputs(cfg, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(106, 21128, (3, 12))
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    ids[mask == 0] = 0
    r = cfg.vision_config.image_size
    return ids, mask, rng.standard_normal((2, 3, r, r)).astype(np.float32)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, save_hf_model):
    cfg = tiny_config(**SIZES)
    path = tmp_path_factory.mktemp("hf")
    return cfg, path, save_hf_model(cfg, path)


def test_save_pretrained_loads_cleanly_in_transformers(hf_dir, tmp_path):
    cfg, path, ref_model = hf_dir
    model, params = ccj.from_pretrained(path, scan_layers=True)  # write from the scanned layout
    out = ccj.save_pretrained(tmp_path / "export", cfg, params)
    loaded, info = transformers.ChineseCLIPModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids, mask, px = inputs(cfg)
    with torch.no_grad():
        want = ref_model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(px)
        ).logits_per_image.numpy()
        got_torch = loaded.eval()(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(px)
        ).logits_per_image.numpy()
    got_jax = np.asarray(
        model.apply(
            {"params": params}, jnp.asarray(ids), jnp.asarray(px), attention_mask=jnp.asarray(mask)
        ).logits_per_image
    )
    np.testing.assert_array_equal(got_torch, want)  # identical weights back in torch
    np.testing.assert_allclose(got_jax, want, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
def test_cli_round_trip_hf_flax_hf_is_bitwise(hf_dir, tmp_path, scan):
    cfg, path, _ = hf_dir
    flags = ["--scan-layers"] if scan else []
    r1 = run_cli(path, tmp_path / "flax", *flags)
    assert r1.returncode == 0, r1.stderr
    assert "parameters:" in r1.stdout and "peak memory" in r1.stdout
    assert sorted(os.listdir(tmp_path / "flax")) == [
        "config.json",
        "flax_checkpoint.json",
        "params",
        "preprocessor_config.json",
        "vocab.txt",
    ]
    r2 = run_cli(tmp_path / "flax", tmp_path / "hf2", "--to", "hf", "--skip-parity")
    assert r2.returncode == 0, r2.stderr
    original = load_file(str(path / "model.safetensors"))
    back = load_file(str(tmp_path / "hf2" / "model.safetensors"))
    assert set(back) == set(original)
    for k in original:
        assert original[k].dtype == back[k].dtype and np.array_equal(original[k], back[k]), k
    assert ccj.ChineseCLIPConfig.from_pretrained(tmp_path / "hf2") == cfg


def test_bfloat16_storage_loads_close(hf_dir, tmp_path):
    cfg, path, _ = hf_dir
    assert run_cli(path, tmp_path / "bf16", "--dtype", "bfloat16").returncode == 0
    _, p32 = ccj.from_pretrained(path)
    _, p16 = ccj.from_pretrained(tmp_path / "bf16")
    k32 = np.asarray(p32["text_model"]["encoder"]["layer_0"]["mlp"]["fc1"]["kernel"])
    k16 = np.asarray(p16["text_model"]["encoder"]["layer_0"]["mlp"]["fc1"]["kernel"])
    assert k16.dtype == np.float32 and not np.array_equal(k16, k32)
    np.testing.assert_allclose(k16, k32, rtol=1e-2, atol=1e-6)


# --------------------------------------------------------------------------- cn_clip .pt


@pytest.fixture(scope="module")
def cn_clip_checkpoint(tmp_path_factory):
    cn_model = import_cn_clip_model()
    import json

    spec_dir = os.path.join(os.path.dirname(cn_model.__file__), "model_configs")
    spec = {}
    for name in ("ViT-B-16", "RoBERTa-wwm-ext-base-chinese"):
        with open(os.path.join(spec_dir, name + ".json")) as f:
            spec.update(json.load(f))
    torch.manual_seed(0)
    model = cn_model.CLIP(**spec).eval()
    with torch.no_grad():
        model.logit_scale.fill_(np.log(100.0))
    state = {"module." + k: v for k, v in model.state_dict().items()}
    # released checkpoints still carry the RoBERTa pooler, which the CLIP model does not use
    state["module.bert.pooler.dense.weight"] = torch.randn(768, 768)
    state["module.bert.pooler.dense.bias"] = torch.randn(768)
    path = tmp_path_factory.mktemp("cn_clip") / "epoch_latest.pt"
    torch.save({"epoch": 3, "step": 100, "name": "exp", "state_dict": state}, path)
    return model, path


@pytest.mark.slow
@pytest.mark.parametrize("arch", [None, "ViT-B-16@RoBERTa-wwm-ext-base-chinese"], ids=["inferred", "named"])
def test_cn_clip_pt_matches_cn_clip_model(cn_clip_checkpoint, arch):
    ref, path = cn_clip_checkpoint
    model, params = ccj.from_pretrained(path, arch=arch)
    assert model.config == ccj.ChineseCLIPConfig.preset("chinese-clip-vit-base-patch16")
    ids, mask, _ = inputs(model.config)
    px = np.random.default_rng(1).standard_normal((2, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        want_text = ref.encode_text(torch.tensor(ids)).numpy()  # cn_clip masks [PAD] (id 0) itself
        want_image = ref.encode_image(torch.tensor(px)).numpy()
        want_logits, _ = ref.get_similarity(torch.tensor(px), torch.tensor(ids))
    v = {"params": params}
    text = model.apply(v, jnp.asarray(ids), jnp.asarray(mask), method="get_text_features")
    image = model.apply(v, jnp.asarray(px), method="get_image_features")
    logits = model.apply(v, jnp.asarray(ids), jnp.asarray(px), attention_mask=jnp.asarray(mask)).logits_per_image
    np.testing.assert_allclose(np.asarray(text), want_text, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(image), want_image, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(logits), want_logits.numpy(), atol=1e-3, rtol=0)


@pytest.mark.slow
def test_cn_clip_to_hf_export_loads_in_transformers(cn_clip_checkpoint, tmp_path):
    ref, path = cn_clip_checkpoint
    result = run_cli(path, tmp_path / "hf", "--to", "hf", "--skip-parity")
    assert result.returncode == 0, result.stderr
    hf, info = transformers.ChineseCLIPModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    px = np.random.default_rng(2).standard_normal((1, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        got = hf.eval().get_image_features(pixel_values=torch.tensor(px)).pooler_output.numpy()
        want = ref.encode_image(torch.tensor(px)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_cn_clip_unknown_width_needs_arch(tmp_path):
    state = {
        "visual.conv1.weight": torch.zeros(640, 3, 16, 16),
        "visual.positional_embedding": torch.zeros(197, 640),
        "bert.embeddings.word_embeddings.weight": torch.zeros(10, 768),
        "bert.encoder.layer.0.intermediate.dense.weight": torch.zeros(3072, 768),
        "text_projection": torch.zeros(768, 512),
    }
    torch.save({"state_dict": state}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="arch="):
        ccj.from_pretrained(tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="does not match the configured architecture: missing keys"):
        ccj.from_pretrained(tmp_path / "odd.pt", arch="RN50@RBT3-chinese")  # a ViT file named as RN50
    with pytest.raises(ValueError, match="unknown vision arch 'RN101'; known: .*RN50"):
        ccj.from_pretrained(tmp_path / "odd.pt", arch="RN101@RBT3-chinese")


# --------------------------------------------------------------------------- errors


def rewrite_weights(src_dir, dst_dir, edit):
    import shutil

    shutil.copytree(src_dir, dst_dir)
    tensors = load_file(str(dst_dir / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst_dir / "model.safetensors"), metadata={"format": "pt"})
    return dst_dir


def test_missing_and_unexpected_keys_are_listed(hf_dir, tmp_path):
    _, path, _ = hf_dir

    def edit(t):
        del t["vision_model.encoder.layers.1.mlp.fc2.bias"]
        t["vision_model.extra_head.weight"] = np.zeros(3, np.float32)

    bad = rewrite_weights(path, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError) as e:
        ccj.from_pretrained(bad)
    msg = str(e.value)
    assert "missing keys (1): vision_model.encoder.layers.1.mlp.fc2.bias" in msg
    assert "unexpected keys (1): vision_model.extra_head.weight" in msg


def test_wrong_shape_names_key_and_both_shapes(hf_dir, tmp_path):
    _, path, _ = hf_dir
    key = "text_model.encoder.layer.0.intermediate.dense.weight"
    bad = rewrite_weights(path, tmp_path / "bad", lambda t: t.__setitem__(key, np.zeros((65, 32), np.float32)))
    with pytest.raises(CheckpointError, match=rf"'{key}' has shape \(65, 32\).*expects \(64, 32\)"):
        ccj.from_pretrained(bad)


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "pytorch_model.bin"
    with open(path, "wb") as f:
        pickle.dump({"text_projection.weight": Evil()}, f)
    with pytest.raises(CheckpointError, match="refusing to load .*pytorch_model.bin.*safetensors"):
        ccj.from_pretrained(path)
    assert not marker.exists()


def test_truncated_files_name_the_file(hf_dir, tmp_path):
    _, path, ref_model = hf_dir
    import shutil

    shutil.copytree(path, tmp_path / "st")
    weights = tmp_path / "st" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"{weights}.*truncated"):
        ccj.from_pretrained(tmp_path / "st")

    (tmp_path / "bin").mkdir()
    shutil.copy(path / "config.json", tmp_path / "bin" / "config.json")
    binary = tmp_path / "bin" / "pytorch_model.bin"
    torch.save(ref_model.state_dict(), binary)
    binary.write_bytes(binary.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=f"{binary}.*truncated"):
        ccj.from_pretrained(tmp_path / "bin")


def test_pytorch_model_bin_loads(hf_dir, tmp_path):
    cfg, path, ref_model = hf_dir
    import shutil

    shutil.copy(path / "config.json", tmp_path / "config.json")
    torch.save(ref_model.state_dict(), tmp_path / "pytorch_model.bin")
    _, from_bin = ccj.from_pretrained(tmp_path)
    _, from_st = ccj.from_pretrained(path)
    k = ("vision_model", "encoder", "layer_2", "attention", "out", "kernel")
    a, b = from_bin, from_st
    for part in k:
        a, b = a[part], b[part]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_paths_and_empty_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such local path: " + str(tmp_path / "nowhere")):
        ccj.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=f"{tmp_path} holds no checkpoint"):
        ccj.from_pretrained(tmp_path)


def test_cli_errors_are_one_line_and_keep_existing_output(hf_dir, tmp_path):
    _, path, _ = hf_dir
    result = run_cli(tmp_path / "missing", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"no such local path: {tmp_path / 'missing'}" in result.stderr
    assert run_cli(path, tmp_path / "out").returncode == 0
    before = sorted(os.listdir(tmp_path / "out" / "params"))
    again = run_cli(path, tmp_path / "out")  # refuses to overwrite, and leaves the first output intact
    assert again.returncode == 2 and "already exists" in again.stderr
    assert sorted(os.listdir(tmp_path / "out" / "params")) == before
    _, params = ccj.from_pretrained(tmp_path / "out")
    assert "text_model" in params


def test_save_pretrained_rejects_params_of_another_config(hf_dir, tmp_path):
    _, path, _ = hf_dir
    _, params = ccj.from_pretrained(path)
    with pytest.raises(CheckpointError, match="missing .*vision_model/encoder/layer_3"):
        ccj.save_pretrained(tmp_path / "x", tiny_config(**dict(SIZES, vision_layers=4)), params)
    assert not (tmp_path / "x").exists()


def test_written_preprocessor_config_matches_model_resolution(hf_dir, tmp_path):
    cfg, path, _ = hf_dir
    _, params = ccj.from_pretrained(path)
    out = ccj.save_pretrained(tmp_path / "export", cfg, params)
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    want = transformers.ChineseCLIPImageProcessor.from_pretrained(out)(image, return_tensors="np")["pixel_values"]
    got = ccj.ChineseCLIPProcessor.from_pretrained(out)(images=[image], return_tensors="np")["pixel_values"]
    assert want.shape == (1, 3, 32, 32)
    np.testing.assert_allclose(got, want, atol=1 / 255 / 0.26)


def test_bfloat16_hf_export_reads_back_in_torch(hf_dir, tmp_path):
    cfg, path, ref_model = hf_dir
    assert run_cli(path, tmp_path / "hf16", "--to", "hf", "--dtype", "bfloat16", "--skip-parity").returncode == 0
    from safetensors.torch import load_file as torch_load_file

    back = torch_load_file(str(tmp_path / "hf16" / "model.safetensors"))
    original = ref_model.state_dict()
    assert set(back) == {k for k in original if not k.endswith(("position_ids", "token_type_ids"))}
    for name, tensor in back.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, original[name].to(torch.bfloat16)), name


def test_hub_id_offline_gives_a_clear_error():
    code = (
        "import chinese_clip_jax as ccj\n"
        "try:\n    ccj.from_pretrained('OFA-Sys/chinese-clip-vit-base-patch16')\n"
        "except OSError as e:\n    print('ERR', e)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(REPO) + "/build/empty-hf-home")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120).stdout
    assert "ERR could not download 'OFA-Sys/chinese-clip-vit-base-patch16' from the hub" in out, out
    assert "Offline?" in out


def test_sharded_safetensors_index_loads(hf_dir, tmp_path):
    cfg, path, ref_model = hf_dir
    ref_model.save_pretrained(tmp_path, max_shard_size="200KB")
    shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    _, sharded = ccj.from_pretrained(tmp_path)
    _, single = ccj.from_pretrained(path)
    from chinese_clip_jax.conversion.mapping import flatten

    a, b = flatten(sharded), flatten(single)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
    os.remove(tmp_path / shards[0])  # a shard listed in the index but gone: named
    with pytest.raises(CheckpointError, match=f"shard listed in .*index.json does not exist: .*{shards[0]}"):
        ccj.from_pretrained(tmp_path)


@pytest.mark.parametrize("value", [0, -32, 32.0, True, "64"])
def test_bad_image_size_is_refused_before_loading(small_hf_dir, value):
    for load in (ccj.from_pretrained, ccj.ChineseCLIP.from_pretrained):
        with pytest.raises(ValueError, match=rf"image_size must be an int >= 1 \(pixels\).*got {value!r}"):
            load(small_hf_dir, image_size=value)
        with pytest.raises(ValueError, match="image_size must be an int"):  # checked before the path is read
            load(small_hf_dir / "no-such-dir", image_size=value)


def test_image_size_not_a_multiple_of_the_patch_names_both(small_hf_dir):
    for load in (ccj.from_pretrained, ccj.ChineseCLIP.from_pretrained):
        with pytest.raises(ValueError, match=r"image_size=36 is not a multiple of patch_size 8 .*e\.g\. 32 or 40"):
            load(small_hf_dir, image_size=36)
    model, _ = ccj.from_pretrained(small_hf_dir, image_size=40)  # a multiple: accepted, at that size
    assert model.config.vision_config.image_size == 40


def test_saved_crop_of_another_size_is_refused_as_transformers_refuses_it(small_hf_dir, tmp_path):
    import torch

    d = tmp_path / "ckpt"
    shutil.copytree(small_hf_dir, d)
    settings = {"size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64}}
    settings.update(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.4], do_resize=True, do_center_crop=True)
    (d / "preprocessor_config.json").write_text(json.dumps(settings))
    # the reference: transformers' processor from this directory makes 64 px images, its model refuses them
    reference = transformers.ChineseCLIPImageProcessor.from_pretrained(d)
    image = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    pixels = reference(images=[image], return_tensors="np")["pixel_values"]
    assert pixels.shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="doesn't match model"), torch.no_grad():
        transformers.ChineseCLIPModel.from_pretrained(d).get_image_features(pixel_values=torch.tensor(pixels))
    with pytest.raises(ValueError) as e:
        ccj.ChineseCLIP.from_pretrained(d)
    message = str(e.value)
    assert message.startswith(f"{d / 'preprocessor_config.json'}: the processor makes 64x64 images but the model")
    assert "takes 32x32" in message and "pass image_size=64" in message and "\n" not in message
    # asked for: the model runs at 64 px and the file's settings are used as they are, pixels as transformers'
    clip = ccj.ChineseCLIP.from_pretrained(d, image_size=64)
    np.testing.assert_allclose(clip.processor(images=[image])["pixel_values"], pixels, atol=1e-5, rtol=0)
    assert clip.encode_image([image]).shape == (1, 16)
    # another size asked for: the file's normalization at that size
    clip = ccj.ChineseCLIP.from_pretrained(d, image_size=48)
    s = clip.processor.image_processor.settings
    assert clip.processor.image_size == (48, 48) and s.image_mean == (0.5, 0.4, 0.3) and s.image_std == (0.2, 0.3, 0.4)


@pytest.fixture(scope="module")
def flax_dir(small_hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("flax") / "ckpt"
    cfg, params, _, _ = ccj.conversion.load_params(small_hf_dir)
    ccj.conversion.save_flax(out, cfg, params)
    return out


def test_truncated_largest_flax_params_file_is_one_line_naming_it(flax_dir, tmp_path):
    d = tmp_path / "damaged"
    shutil.copytree(flax_dir, d)
    files = [os.path.join(r, f) for r, _, fs in os.walk(d / "params") for f in fs]
    largest = max(files, key=os.path.getsize)
    os.truncate(largest, os.path.getsize(largest) // 2)
    result = run_module("convert", d, tmp_path / "out", "--to", "hf")
    line = one_line_error(result, only_line=True)  # no "Event loop is closed", no "Exception ignored in <coroutine>"
    assert f'Error reading local file "{largest}"' in line and "Truncated" in line, line
    assert "python -m convert SRC NEW_OUT" in line
    assert not (tmp_path / "out").exists()


def test_truncated_orbax_metadata_is_named(flax_dir, tmp_path):
    d = tmp_path / "damaged"
    shutil.copytree(flax_dir, d)
    meta = d / "params" / "_METADATA"
    os.truncate(meta, 100)
    with pytest.raises(CheckpointError, match=f"{meta} is not valid JSON"):
        ccj.from_pretrained(d)


@pytest.fixture(scope="module")
def export_dir(flax_dir, tmp_path_factory):
    from chinese_clip_jax.conversion.export import save_exported

    cfg, params, _, _ = ccj.conversion.load_params(flax_dir)
    return save_exported(tmp_path_factory.mktemp("export") / "e", cfg, params, platforms=("cpu",))


@pytest.mark.parametrize(
    "name,reason",
    [
        ("text_features.jaxexport", "not a readable jax.export artefact"),
        ("image_features.jaxexport", "not a readable jax.export artefact"),
        ("params.safetensors", "not a readable safetensors file"),
        ("export.json", "not valid JSON"),
    ],
)
def test_truncated_export_file_is_named_with_the_command_that_rewrites_it(export_dir, tmp_path, name, reason):
    from chinese_clip_jax.export import load_exported

    d = tmp_path / "e"
    shutil.copytree(export_dir, d)
    os.truncate(d / name, os.path.getsize(d / name) // 2)
    with pytest.raises(ValueError) as e:
        load_exported(d)
    message = str(e.value)
    assert message.startswith(f"{d / name}: {reason}") and "\n" not in message, message
    assert message.endswith("write it again with `python -m convert SRC NEW_OUT --export`")


def test_export_params_of_another_shape_are_named(export_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    from chinese_clip_jax.export import load_exported

    d = tmp_path / "e"
    shutil.copytree(export_dir, d)
    ids = np.full((2, 52), 100, np.int32)
    want = np.asarray(load_exported(d).text(ids))  # the intact export loads and runs
    assert want.shape == (2, 16) and np.isfinite(want).all()
    params = load_file(d / "params.safetensors")
    params["logit_scale"] = np.zeros(3, np.float32)
    save_file(params, d / "params.safetensors")
    with pytest.raises(
        ValueError, match=r"params.safetensors does not hold the params .*'logit_scale' has shape \(3,\)"
    ):
        load_exported(d)
