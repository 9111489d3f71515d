"""Explicit name-mapping tables between checkpoint layouts, in both directions.

Three layouts (a ResNet image tower, cn_clip's RN50, has no HF layout: its rows carry cn_clip's
``visual.*`` names in the HF column, and only our Flax format and cn_clip's ``.pt`` hold it):
  * HF: transformers' ``ChineseCLIPModel.state_dict()`` names, torch ``Linear`` weights (out, in).
  * Flax: our param tree (see ``modeling/clip.py``), kernels (in, out), attention kernels split into
    (embed, heads, head_dim); unscanned (``encoder/layer_i``) or scanned (``encoder/layers``).
  * cn_clip: the original ``.pt`` state dict (``visual.*``, ``bert.*``, fused ``in_proj`` q/k/v,
    ``text_projection`` and ``visual.proj`` stored (in, out)). It is converted to HF names first.

Each table row is ``(hf_suffix, flax_path, transform)``; a transform is a named pair of functions
(to_flax, to_hf) so the same row serves both directions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np

from ..modeling.config import TEXT_ARCHS, VISION_ARCHS, ChineseCLIPConfig, ChineseCLIPResNetConfig, from_cn_clip_arch
from .sources import CheckpointError


class Transform(NamedTuple):
    to_flax: Callable[[np.ndarray, int], np.ndarray]  # (tensor, num_heads) -> flax param
    to_hf: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform(lambda x, h: x, lambda x: x)
LINEAR = Transform(lambda x, h: x.T, lambda x: x.T)  # torch (out, in) <-> flax (in, out)
QKV_KERNEL = Transform(  # (heads*hd, embed) <-> (embed, heads, hd)
    lambda x, h: x.T.reshape(x.shape[1], h, x.shape[0] // h),
    lambda x: x.reshape(x.shape[0], -1).T,
)
QKV_BIAS = Transform(lambda x, h: x.reshape(h, -1), lambda x: x.reshape(-1))  # (heads*hd,) <-> (heads, hd)
OUT_KERNEL = Transform(  # (embed, heads*hd) <-> (heads, hd, embed)
    lambda x, h: x.T.reshape(h, x.shape[1] // h, x.shape[0]),
    lambda x: x.reshape(-1, x.shape[-1]).T,
)
CONV_KERNEL = Transform(  # torch OIHW (hidden, C, p, p) <-> flax HWIO (p, p, C, hidden)
    lambda x, h: x.transpose(2, 3, 1, 0),
    lambda x: x.transpose(3, 2, 0, 1),
)

TEXT_LAYER = [
    ("attention.self.query.weight", "attention/query/kernel", QKV_KERNEL),
    ("attention.self.query.bias", "attention/query/bias", QKV_BIAS),
    ("attention.self.key.weight", "attention/key/kernel", QKV_KERNEL),
    ("attention.self.key.bias", "attention/key/bias", QKV_BIAS),
    ("attention.self.value.weight", "attention/value/kernel", QKV_KERNEL),
    ("attention.self.value.bias", "attention/value/bias", QKV_BIAS),
    ("attention.output.dense.weight", "attention/out/kernel", OUT_KERNEL),
    ("attention.output.dense.bias", "attention/out/bias", IDENTITY),
    ("attention.output.LayerNorm.weight", "attention_norm/scale", IDENTITY),
    ("attention.output.LayerNorm.bias", "attention_norm/bias", IDENTITY),
    ("intermediate.dense.weight", "mlp/fc1/kernel", LINEAR),
    ("intermediate.dense.bias", "mlp/fc1/bias", IDENTITY),
    ("output.dense.weight", "mlp/fc2/kernel", LINEAR),
    ("output.dense.bias", "mlp/fc2/bias", IDENTITY),
    ("output.LayerNorm.weight", "mlp_norm/scale", IDENTITY),
    ("output.LayerNorm.bias", "mlp_norm/bias", IDENTITY),
]

VISION_LAYER = [
    ("self_attn.q_proj.weight", "attention/query/kernel", QKV_KERNEL),
    ("self_attn.q_proj.bias", "attention/query/bias", QKV_BIAS),
    ("self_attn.k_proj.weight", "attention/key/kernel", QKV_KERNEL),
    ("self_attn.k_proj.bias", "attention/key/bias", QKV_BIAS),
    ("self_attn.v_proj.weight", "attention/value/kernel", QKV_KERNEL),
    ("self_attn.v_proj.bias", "attention/value/bias", QKV_BIAS),
    ("self_attn.out_proj.weight", "attention/out/kernel", OUT_KERNEL),
    ("self_attn.out_proj.bias", "attention/out/bias", IDENTITY),
    ("layer_norm1.weight", "layer_norm1/scale", IDENTITY),
    ("layer_norm1.bias", "layer_norm1/bias", IDENTITY),
    ("mlp.fc1.weight", "mlp/fc1/kernel", LINEAR),
    ("mlp.fc1.bias", "mlp/fc1/bias", IDENTITY),
    ("mlp.fc2.weight", "mlp/fc2/kernel", LINEAR),
    ("mlp.fc2.bias", "mlp/fc2/bias", IDENTITY),
    ("layer_norm2.weight", "layer_norm2/scale", IDENTITY),
    ("layer_norm2.bias", "layer_norm2/bias", IDENTITY),
]

GLOBAL = [
    ("text_model.embeddings.word_embeddings.weight", "text_model/embeddings/word_embeddings/embedding", IDENTITY),
    (
        "text_model.embeddings.position_embeddings.weight",
        "text_model/embeddings/position_embeddings/embedding",
        IDENTITY,
    ),
    (
        "text_model.embeddings.token_type_embeddings.weight",
        "text_model/embeddings/token_type_embeddings/embedding",
        IDENTITY,
    ),
    ("text_model.embeddings.LayerNorm.weight", "text_model/embeddings/layer_norm/scale", IDENTITY),
    ("text_model.embeddings.LayerNorm.bias", "text_model/embeddings/layer_norm/bias", IDENTITY),
    ("vision_model.embeddings.class_embedding", "vision_model/class_embedding", IDENTITY),
    ("vision_model.embeddings.patch_embedding.weight", "vision_model/patch_embedding/kernel", CONV_KERNEL),
    ("vision_model.embeddings.position_embedding.weight", "vision_model/position_embedding", IDENTITY),
    ("vision_model.pre_layrnorm.weight", "vision_model/pre_layernorm/scale", IDENTITY),
    ("vision_model.pre_layrnorm.bias", "vision_model/pre_layernorm/bias", IDENTITY),
    ("vision_model.post_layernorm.weight", "vision_model/post_layernorm/scale", IDENTITY),
    ("vision_model.post_layernorm.bias", "vision_model/post_layernorm/bias", IDENTITY),
    ("text_projection.weight", "text_projection/kernel", LINEAR),
    ("visual_projection.weight", "visual_projection/kernel", LINEAR),
    ("logit_scale", "logit_scale", IDENTITY),
]

# ViT rows that a ResNet image tower does not have (it projects inside its attention pool).
_VIT_ONLY = re.compile(r"^(vision_model\.|visual_projection\.)")

RESNET_BN = [("weight", "scale"), ("bias", "bias"), ("running_mean", "running_mean"), ("running_var", "running_var")]


def resnet_rows(v) -> list[tuple[str, str, Transform, int]]:
    """(cn_clip name, Flax path, transform, heads) of every param of a ModifiedResNet tower."""
    rows = []

    def conv_bn(cn_conv, cn_bn, fx_conv, fx_bn):
        rows.append((f"visual.{cn_conv}.weight", f"vision_model/{fx_conv}/kernel", CONV_KERNEL, 0))
        rows.extend((f"visual.{cn_bn}.{a}", f"vision_model/{fx_bn}/{b}", IDENTITY, 0) for a, b in RESNET_BN)

    for k in (1, 2, 3):
        conv_bn(f"conv{k}", f"bn{k}", f"stem/conv{k}", f"stem/bn{k}")
    for i, blocks in enumerate(v.layers, 1):
        for j in range(blocks):
            cn, fx = f"layer{i}.{j}", f"layer{i}/block_{j}"
            for k in (1, 2, 3):
                conv_bn(f"{cn}.conv{k}", f"{cn}.bn{k}", f"{fx}/conv{k}", f"{fx}/bn{k}")
            if j == 0:  # stride 2, or (stage 1) 4x the channels: a projected shortcut
                conv_bn(f"{cn}.downsample.0", f"{cn}.downsample.1", f"{fx}/downsample_conv", f"{fx}/downsample_bn")
    h = v.num_attention_heads
    rows.append(("visual.attnpool.positional_embedding", "vision_model/attnpool/position_embedding", IDENTITY, 0))
    for cn, fx in (("q", "query"), ("k", "key"), ("v", "value")):
        rows.append((f"visual.attnpool.{cn}_proj.weight", f"vision_model/attnpool/{fx}/kernel", QKV_KERNEL, h))
        rows.append((f"visual.attnpool.{cn}_proj.bias", f"vision_model/attnpool/{fx}/bias", QKV_BIAS, h))
    rows.append(("visual.attnpool.c_proj.weight", "vision_model/attnpool/out/kernel", OUT_KERNEL, h))
    rows.append(("visual.attnpool.c_proj.bias", "vision_model/attnpool/out/bias", IDENTITY, 0))
    return rows


# Flax params with no slot in transformers' ChineseCLIPModel, present only in some models
# (path -> shape): the SigLIP ``logit_bias`` (``ChineseCLIPModel(logit_bias_init=...)``). The HF
# layout leaves them out; a `python -m convert --to flax` directory keeps them.
FLAX_ONLY = {"logit_bias": ()}

# Non-persistent buffers that some exported checkpoints still carry, and BatchNorm's update
# counter (unused at a fixed momentum): safe to drop.
IGNORED_HF_KEYS = re.compile(
    r"^(text_model|vision_model)\.embeddings\.(position_ids|token_type_ids)$"
    r"|^visual\..*\.num_batches_tracked$"
)


class Row(NamedTuple):
    hf: str
    flax: str
    transform: Transform
    num_heads: int


def table(cfg: ChineseCLIPConfig) -> list[Row]:
    """Every parameter of the joint model: HF name, Flax path (unscanned), transform, heads."""
    t, v = cfg.text_config, cfg.vision_config
    rows = [Row(hf, fx, tr, 0) for hf, fx, tr in GLOBAL if not (cfg.is_resnet and _VIT_ONLY.match(hf))]
    for i in range(t.num_hidden_layers):
        rows += [
            Row(f"text_model.encoder.layer.{i}.{hf}", f"text_model/encoder/layer_{i}/{fx}", tr, t.num_attention_heads)
            for hf, fx, tr in TEXT_LAYER
        ]
    if cfg.is_resnet:
        return rows + [Row(*r) for r in resnet_rows(v)]
    for i in range(v.num_hidden_layers):
        rows += [
            Row(
                f"vision_model.encoder.layers.{i}.{hf}",
                f"vision_model/encoder/layer_{i}/{fx}",
                tr,
                v.num_attention_heads,
            )
            for hf, fx, tr in VISION_LAYER
        ]
    return rows


# --------------------------------------------------------------------------- tree helpers


def set_path(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def get_path(tree: Mapping, path: str):
    for p in path.split("/"):
        tree = tree[p]
    return tree


def flatten(tree: Mapping, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "/"))
        else:
            out[key] = v
    return out


TOWERS = ("text_model", "vision_model")


def _map_encoders(params: Mapping, fn) -> dict:
    params = dict(params)
    for name in TOWERS:
        if name in params and "encoder" in params[name]:
            tower = dict(params[name])
            tower["encoder"] = fn(tower["encoder"])
            params[name] = tower
    return params


def is_scanned(params: Mapping) -> bool:
    return any("layers" in params[t].get("encoder", {}) for t in TOWERS if t in params)


def _stack(encoder: Mapping) -> dict:
    import jax

    if "layers" in encoder:
        return dict(encoder)
    layers = [encoder[f"layer_{i}"] for i in range(len(encoder))]
    return {"layers": jax.tree_util.tree_map(lambda *xs: jax.numpy.stack(xs), *layers)}


def _unstack(encoder: Mapping) -> dict:
    import jax

    if "layers" not in encoder:
        return dict(encoder)
    stacked = encoder["layers"]
    n = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    return {f"layer_{i}": jax.tree_util.tree_map(lambda x, i=i: x[i], stacked) for i in range(n)}


def stack_layers(params: Mapping) -> dict:
    """Unscanned (``encoder/layer_i``) -> scanned (``encoder/layers`` with a leading layer axis)."""
    return _map_encoders(params, _stack)


def unstack_layers(params: Mapping) -> dict:
    """Scanned -> unscanned; the inverse of ``stack_layers``."""
    return _map_encoders(params, _unstack)


# --------------------------------------------------------------------------- cn_clip layout

# cn_clip's head width is 64, except ViT-H (80): heads by width, for inference from shapes
# (from the one table of published sizes).
_VISION_HEADS_BY_WIDTH = {
    v.hidden_size: v.num_attention_heads for v in VISION_ARCHS.values() if not isinstance(v, ChineseCLIPResNetConfig)
}
_TEXT_HEADS_BY_WIDTH = {t.hidden_size: t.num_attention_heads for t in TEXT_ARCHS.values()}

CN_CLIP_VISION_LAYER = [  # cn_clip resblock suffix -> HF vision layer suffix (in_proj handled apart)
    ("attn.out_proj.weight", "self_attn.out_proj.weight"),
    ("attn.out_proj.bias", "self_attn.out_proj.bias"),
    ("ln_1.weight", "layer_norm1.weight"),
    ("ln_1.bias", "layer_norm1.bias"),
    ("ln_2.weight", "layer_norm2.weight"),
    ("ln_2.bias", "layer_norm2.bias"),
    ("mlp.c_fc.weight", "mlp.fc1.weight"),
    ("mlp.c_fc.bias", "mlp.fc1.bias"),
    ("mlp.c_proj.weight", "mlp.fc2.weight"),
    ("mlp.c_proj.bias", "mlp.fc2.bias"),
]
_CN_CLIP_LAYER_MAP = dict(CN_CLIP_VISION_LAYER)
CN_CLIP_GLOBAL = [  # (cn_clip name, HF name, transpose)
    ("visual.class_embedding", "vision_model.embeddings.class_embedding", False),
    ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight", False),
    ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight", False),
    ("visual.ln_pre.weight", "vision_model.pre_layrnorm.weight", False),
    ("visual.ln_pre.bias", "vision_model.pre_layrnorm.bias", False),
    ("visual.ln_post.weight", "vision_model.post_layernorm.weight", False),
    ("visual.ln_post.bias", "vision_model.post_layernorm.bias", False),
    ("visual.proj", "visual_projection.weight", True),
    ("text_projection", "text_projection.weight", True),
    ("logit_scale", "logit_scale", False),
]


parse_cn_clip_arch = from_cn_clip_arch  # "ViT-B-16@RoBERTa-wwm-ext-base-chinese" -> config


def _cn_clip_config(width, layers, heads, patch, res, hidden, t_layers, t_heads, inter, embed_dim):
    """A cn_clip-style ViT + RoBERTa config from sizes read off a checkpoint's tensors, built by the
    same helpers as the published-sizes table (``config.VISION_ARCHS`` / ``TEXT_ARCHS``)."""
    from ..modeling.config import roberta_config, vit_config

    return ChineseCLIPConfig(
        text_config=roberta_config(hidden, t_layers, t_heads, inter),
        vision_config=vit_config(width, layers, heads, patch, res, embed_dim),
        projection_dim=embed_dim,
    )


def _count_layers(names, pattern: str) -> int:
    idx = {int(m.group(1)) for n in names if (m := re.match(pattern, n))}
    return max(idx) + 1 if idx else 0


def infer_cn_clip_config(shapes: Mapping[str, tuple]) -> ChineseCLIPConfig:
    """Architecture from the tensor shapes of a cn_clip state dict (names without ``module.``)."""
    if is_cn_clip_resnet(shapes):
        return _infer_cn_clip_resnet(shapes)
    need = [
        "visual.conv1.weight",
        "visual.positional_embedding",
        "bert.embeddings.word_embeddings.weight",
        "text_projection",
        "bert.encoder.layer.0.intermediate.dense.weight",
    ]
    missing = [n for n in need if n not in shapes]
    if missing:
        raise CheckpointError(f"not a cn_clip ViT or ResNet (RN50) checkpoint: missing {', '.join(missing)}")
    width, _, patch, _ = shapes["visual.conv1.weight"]
    grid = int(round((shapes["visual.positional_embedding"][0] - 1) ** 0.5))
    hidden = shapes["bert.embeddings.word_embeddings.weight"][1]
    if width not in _VISION_HEADS_BY_WIDTH or hidden not in _TEXT_HEADS_BY_WIDTH:
        raise CheckpointError(
            f"cannot infer the number of attention heads for vision width {width} / text width {hidden}; "
            "pass arch='ViT-...@RoBERTa-...' explicitly"
        )
    names = list(shapes)
    return _cn_clip_config(
        width,
        _count_layers(names, r"visual\.transformer\.resblocks\.(\d+)\."),
        _VISION_HEADS_BY_WIDTH[width],
        patch,
        grid * patch,
        hidden,
        _count_layers(names, r"bert\.encoder\.layer\.(\d+)\."),
        _TEXT_HEADS_BY_WIDTH[hidden],
        shapes["bert.encoder.layer.0.intermediate.dense.weight"][0],
        shapes["text_projection"][1],
    )


def is_cn_clip_resnet(names) -> bool:
    """Whether a cn_clip state dict's image tower is a ModifiedResNet (it has an attention pool)."""
    return any(n.startswith("visual.attnpool.") for n in names)


def _text_from_shapes(shapes: Mapping[str, tuple], names) -> tuple[int, int, int, int]:
    hidden = shapes["bert.embeddings.word_embeddings.weight"][1]
    if hidden not in _TEXT_HEADS_BY_WIDTH:
        raise CheckpointError(
            f"cannot infer the number of attention heads for text width {hidden}; "
            "pass arch='...@RoBERTa-...' explicitly"
        )
    return (
        hidden,
        _count_layers(names, r"bert\.encoder\.layer\.(\d+)\."),
        _TEXT_HEADS_BY_WIDTH[hidden],
        shapes["bert.encoder.layer.0.intermediate.dense.weight"][0],
    )


def _infer_cn_clip_resnet(shapes: Mapping[str, tuple]) -> ChineseCLIPConfig:
    """A ModifiedResNet + RoBERTa config from shapes: blocks per stage, stem width, pooled grid."""
    from ..modeling.config import ChineseCLIPTextConfig

    need = [
        "visual.conv3.weight",
        "visual.attnpool.positional_embedding",
        "visual.attnpool.c_proj.weight",
        "bert.embeddings.word_embeddings.weight",
        "bert.encoder.layer.0.intermediate.dense.weight",
        "text_projection",
    ]
    missing = [n for n in need if n not in shapes]
    if missing:
        raise CheckpointError(f"not a cn_clip ResNet checkpoint: missing {', '.join(missing)}")
    names = list(shapes)
    width = shapes["visual.conv3.weight"][0]
    layers = tuple(_count_layers(names, rf"visual\.layer{i}\.(\d+)\.") for i in (1, 2, 3, 4))
    grid = int(round((shapes["visual.attnpool.positional_embedding"][0] - 1) ** 0.5))
    embed_dim = shapes["visual.attnpool.c_proj.weight"][0]
    hidden, t_layers, t_heads, inter = _text_from_shapes(shapes, names)
    vision = ChineseCLIPResNetConfig(
        layers=layers, width=width, num_attention_heads=width * 32 // 64, image_size=grid * 32, projection_dim=embed_dim
    )
    text = ChineseCLIPTextConfig(
        vocab_size=shapes["bert.embeddings.word_embeddings.weight"][0],
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=t_layers,
        num_attention_heads=t_heads,
    )
    return ChineseCLIPConfig(text_config=text, vision_config=vision, projection_dim=embed_dim)


_RESNET_NAME = re.compile(r"visual\.(conv\d|bn\d|layer\d|attnpool)\.")


def cn_clip_to_hf_names(names) -> dict[str, tuple[str, str, int | None]]:
    """Maps each cn_clip tensor name to a list of ``(hf_name, op, part)``.

    op: "copy", "transpose", or "split" (HF tensor = q/k/v ``part`` 0/1/2 of a fused in_proj); names
    that are dropped (``bert.pooler.*``) map to []. A ResNet tower's ``visual.*`` names are their own
    table names. Unknown names raise with the list of them.
    """
    out, unknown = {}, []
    resnet = is_cn_clip_resnet(names)
    global_map = {
        cn: (hf, "transpose" if tr else "copy")
        for cn, hf, tr in CN_CLIP_GLOBAL
        if not (resnet and cn.startswith("visual."))
    }
    for name in names:
        if resnet and _RESNET_NAME.match(name):
            out[name] = [(name, "copy", None)]
        elif name in global_map:
            hf, op = global_map[name]
            out[name] = [(hf, op, None)]
        elif name.startswith("bert.pooler."):
            out[name] = []
        elif name.startswith("bert."):
            out[name] = [("text_model." + name[len("bert.") :], "copy", None)]
        elif m := re.match(r"visual\.transformer\.resblocks\.(\d+)\.(.+)$", name):
            i, rest = m.groups()
            prefix = f"vision_model.encoder.layers.{i}."
            fused = re.match(r"attn\.(in_proj|Wqkv)\.?(weight|bias)$", rest.replace("in_proj_", "in_proj."))
            if fused:
                kind = fused.group(2)
                out[name] = [(prefix + f"self_attn.{p}_proj.{kind}", "split", j) for j, p in enumerate("qkv")]
            elif rest in _CN_CLIP_LAYER_MAP:
                out[name] = [(prefix + _CN_CLIP_LAYER_MAP[rest], "copy", None)]
            else:
                unknown.append(name)
        else:
            unknown.append(name)
    if unknown:
        raise CheckpointError(
            f"unexpected keys in cn_clip checkpoint: {', '.join(sorted(unknown)[:20])}"
            + (f" (+{len(unknown) - 20} more)" if len(unknown) > 20 else "")
        )
    return out
