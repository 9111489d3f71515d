"""Config schema: presets against cn_clip's own architecture files, HF config.json round trips."""

import json
import os

import pytest
import transformers

import chinese_clip_jax as ccj

CN_CLIP_ARCH = {  # preset -> (cn_clip vision spec, cn_clip text spec)
    "chinese-clip-vit-base-patch16": ("ViT-B-16", "RoBERTa-wwm-ext-base-chinese"),
    "chinese-clip-vit-large-patch14": ("ViT-L-14", "RoBERTa-wwm-ext-base-chinese"),
    "chinese-clip-vit-large-patch14-336px": ("ViT-L-14-336", "RoBERTa-wwm-ext-base-chinese"),
    "chinese-clip-vit-huge-patch14": ("ViT-H-14", "RoBERTa-wwm-ext-large-chinese"),
}


def cn_clip_spec(name):
    import cn_clip

    path = os.path.join(os.path.dirname(cn_clip.__file__), "clip", "model_configs", name + ".json")
    with open(path) as f:
        return json.load(f)


def test_presets_are_the_published_architecture_table():
    from chinese_clip_jax.modeling.config import PRESET_ARCHS, TEXT_ARCHS, VISION_ARCHS, from_cn_clip_arch

    assert set(PRESET_ARCHS) == set(CN_CLIP_ARCH) | {"chinese-clip-rn50"}
    for name, (vision, text) in CN_CLIP_ARCH.items():
        assert PRESET_ARCHS[name] == f"{vision}@{text}"
    for vision in VISION_ARCHS:  # every cn_clip arch name maps onto the one table
        for text in TEXT_ARCHS:
            cfg = from_cn_clip_arch(f"{vision}@{text}")
            assert cfg.vision_config == VISION_ARCHS[vision] and cfg.text_config == TEXT_ARCHS[text]


@pytest.mark.parametrize("vision", ["ViT-B-32", "RN50"])
@pytest.mark.parametrize("text", ["RBT3-chinese", "RoBERTa-wwm-ext-base-chinese"])
def test_table_rows_match_cn_clip_files(vision, text):
    from chinese_clip_jax.modeling.config import from_cn_clip_arch

    cfg = from_cn_clip_arch(f"{vision}@{text}")
    v, t, spec, tspec = cfg.vision_config, cfg.text_config, cn_clip_spec(vision), cn_clip_spec(text)
    assert cfg.projection_dim == v.projection_dim == spec["embed_dim"]
    assert v.image_size == spec["image_resolution"]
    if vision == "RN50":
        assert list(v.layers) == json.loads(spec["vision_layers"]) and v.width == spec["vision_width"]
        assert v.num_attention_heads == spec["vision_width"] * 32 // 64  # cn_clip's vision_heads
    else:
        assert (v.hidden_size, v.num_hidden_layers, v.patch_size) == (
            spec["vision_width"],
            spec["vision_layers"],
            spec["vision_patch_size"],
        )
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size) == (
        tspec["text_hidden_size"],
        tspec["text_num_hidden_layers"],
        tspec["text_num_attention_heads"],
        tspec["text_intermediate_size"],
    )


@pytest.mark.parametrize("preset", list(CN_CLIP_ARCH))
def test_presets_match_cn_clip_architecture_files(preset):
    cfg = ccj.ChineseCLIPConfig.preset(preset)
    vision, text = (cn_clip_spec(n) for n in CN_CLIP_ARCH[preset])
    v, t = cfg.vision_config, cfg.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.patch_size, v.image_size) == (
        vision["vision_width"],
        vision["vision_layers"],
        vision["vision_patch_size"],
        vision["image_resolution"],
    )
    assert v.head_dim == vision.get("vision_head_width", 64)  # ViT-H: 16 heads of width 80
    assert v.intermediate_size == 4 * v.hidden_size
    assert cfg.projection_dim == v.projection_dim == vision["embed_dim"]
    assert (
        t.hidden_size,
        t.num_hidden_layers,
        t.num_attention_heads,
        t.intermediate_size,
        t.vocab_size,
        t.max_position_embeddings,
        t.type_vocab_size,
    ) == (
        text["text_hidden_size"],
        text["text_num_hidden_layers"],
        text["text_num_attention_heads"],
        text["text_intermediate_size"],
        text["vocab_size"],
        text["text_max_position_embeddings"],
        text["text_type_vocab_size"],
    )
    assert ccj.ChineseCLIPConfig.preset("OFA-Sys/" + preset) == cfg


def test_hf_config_round_trip_keeps_unknown_keys(tmp_path):
    cfg = ccj.ChineseCLIPConfig.preset("chinese-clip-vit-huge-patch14")
    hf = transformers.ChineseCLIPConfig.from_dict(cfg.to_dict())
    assert hf.vision_config.num_attention_heads == 16 and hf.text_config.hidden_size == 1024
    hf.save_pretrained(tmp_path)  # transformers writes many keys we do not model
    loaded = ccj.ChineseCLIPConfig.from_pretrained(tmp_path)
    assert loaded == cfg
    assert "transformers_version" in loaded.extra and "initializer_factor" in loaded.extra
    again = loaded.to_dict()
    with open(tmp_path / "config.json") as f:
        original = json.load(f)
    for key in ("transformers_version", "initializer_factor"):
        assert again[key] == original[key]
    assert again["text_config"]["bos_token_id"] == original["text_config"]["bos_token_id"]
    assert ccj.ChineseCLIPConfig.from_dict(again) == cfg


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="hidden_size 100 is not a multiple of num_attention_heads 12"):
        ccj.ChineseCLIPTextConfig(hidden_size=100)
    with pytest.raises(ValueError, match="image_size 225 is not a multiple of patch_size 16"):
        ccj.ChineseCLIPVisionConfig(image_size=225, patch_size=16)
    with pytest.raises(ValueError, match="unknown preset 'vit-tiny'"):
        ccj.ChineseCLIPConfig.preset("vit-tiny")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "config.json")):
        ccj.ChineseCLIPConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        ccj.ChineseCLIPConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert', not 'chinese_clip'"):
        ccj.ChineseCLIPConfig.from_pretrained(tmp_path)
