"""The joint Chinese-CLIP model: both towers, their projections and the logit scale.

Param tree (unscanned; with ``scan_layers`` each ``encoder`` holds one stacked ``layers``)::

    text_model/{embeddings, encoder/layer_i}      vision_model/{patch_embedding, class_embedding,
    text_projection/kernel (text_hidden, proj)    position_embedding, pre_layernorm, encoder/layer_i,
    visual_projection/kernel (vision_hidden, proj) post_layernorm}
    logit_scale ()
    logit_bias ()                                 only with ``logit_bias_init`` (sigmoid loss)

With a ResNet image tower (``config.is_resnet``, cn_clip's RN50) ``vision_model`` is
``modeling.resnet.ResNetTower``'s tree and there is no ``visual_projection``: its attention pool
projects to ``projection_dim`` itself.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from .inputs import check_pixels, check_token_ids
from .layers import ConfiguredModule, Dense, matmul_precision, partitioned
from .resnet import ResNetTower
from .text import TextOutput, TextTower
from .vision import VisionOutput, VisionTower

Dtype = Any


@struct.dataclass
class ChineseCLIPOutput:
    """Same meaning as transformers' ``ChineseCLIPOutput``; all arrays fp32."""

    logits_per_image: jax.Array  # (n_images, n_texts) = exp(logit_scale) * cos
    logits_per_text: jax.Array  # (n_texts, n_images)
    text_embeds: jax.Array  # (n_texts, proj), L2-normalized
    image_embeds: jax.Array  # (n_images, proj), L2-normalized
    text_model_output: TextOutput | None = None
    vision_model_output: VisionOutput | None = None


def l2_normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class ChineseCLIPModel(ConfiguredModule):
    """Chinese-CLIP as a Flax Linen module; ``config`` is a ``ChineseCLIPConfig``, the run fields
    (dtype, attention_impl, scan_layers, remat, precision) are ``ConfiguredModule``'.

    ``logit_bias_init``: None (CLIP, softmax loss: no bias) or the initial value of a learnable
    scalar ``logit_bias`` param (SigLIP's sigmoid loss; big_vision's ``b``, open_clip's
    ``init_logit_bias``), which is then added to the logits. transformers' ChineseCLIPModel has
    no such param: ``save_pretrained`` leaves it out of the HF layout, ``save_flax`` keeps it.
    """

    logit_bias_init: float | None = None

    def setup(self):
        cfg = self.config
        opts = dict(
            dtype=self.dtype, attention_impl=self.attention_impl, scan_layers=self.scan_layers, remat=self.remat
        )
        self.text_model = TextTower(cfg.text_config, **opts)
        if cfg.is_resnet:
            self.vision_model = ResNetTower(cfg.vision_config, **opts)
        else:
            self.vision_model = VisionTower(cfg.vision_config, **opts)
        self.text_projection = Dense(
            cfg.projection_dim,
            ("embed",),
            (None,),
            std=cfg.text_config.hidden_size**-0.5,
            use_bias=False,
            dtype=self.dtype,
        )
        if not cfg.is_resnet:
            self.visual_projection = Dense(
                cfg.projection_dim,
                ("embed",),
                (None,),
                std=cfg.vision_config.hidden_size**-0.5,
                use_bias=False,
                dtype=self.dtype,
            )
        self.logit_scale = self.param(
            "logit_scale", partitioned(nn.initializers.constant(cfg.logit_scale_init_value), ()), (), jnp.float32
        )
        if self.logit_bias_init is not None:
            self.logit_bias = self.param(
                "logit_bias", partitioned(nn.initializers.constant(self.logit_bias_init), ()), (), jnp.float32
            )

    def get_text_features(
        self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, deterministic: bool = True
    ) -> jax.Array:
        """(batch, seq) token ids -> (batch, projection_dim) unnormalized projection of [CLS], fp32.

        Ids outside [0, vocab_size) are refused when concrete, clamped inside jit (``modeling.inputs``).
        """
        input_ids = check_token_ids(input_ids, self.config.text_config.vocab_size)
        with matmul_precision(self.precision):
            hidden = self.text_model(input_ids, attention_mask, token_type_ids, position_ids, deterministic)
            return self.text_projection(hidden[:, 0]).astype(jnp.float32)

    def _vision(self, pixel_values, deterministic: bool, interpolate_pos_encoding: bool):
        if self.config.is_resnet:
            if interpolate_pos_encoding:
                raise ValueError("interpolate_pos_encoding is for ViT image towers; this model's is a ResNet")
            vision = self.vision_model(pixel_values, deterministic)
            return vision, vision.pooler_output
        vision = self.vision_model(pixel_values, deterministic, interpolate_pos_encoding)
        return vision, self.visual_projection(vision.pooler_output)

    def get_image_features(
        self, pixel_values, deterministic: bool = True, interpolate_pos_encoding: bool = False
    ) -> jax.Array:
        """NCHW float pixel values (normalized, as the processor makes them) -> (batch,
        projection_dim) unnormalized projection, fp32. Integer pixels are refused
        (``encoding.model_pixels`` converts uint8 images).

        ``interpolate_pos_encoding``: a ViT takes other image sizes (multiples of its patch), its
        position grid resized bicubically as in transformers.
        """
        pixel_values = check_pixels(pixel_values)
        with matmul_precision(self.precision):
            return self._vision(pixel_values, deterministic, interpolate_pos_encoding)[1].astype(jnp.float32)

    def __call__(
        self,
        input_ids,
        pixel_values,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        deterministic: bool = True,
        interpolate_pos_encoding: bool = False,
    ) -> ChineseCLIPOutput:
        """Both towers and the logits ``exp(logit_scale) * cos`` (``+ logit_bias`` when the model has one).

        Inputs as ``get_text_features`` / ``get_image_features`` take them (same checks)."""
        input_ids = check_token_ids(input_ids, self.config.text_config.vocab_size)
        pixel_values = check_pixels(pixel_values)
        with matmul_precision(self.precision):
            hidden = self.text_model(input_ids, attention_mask, token_type_ids, position_ids, deterministic)
            vision, image_features = self._vision(pixel_values, deterministic, interpolate_pos_encoding)
            text_embeds = l2_normalize(self.text_projection(hidden[:, 0]))
            image_embeds = l2_normalize(image_features)
        cos = jnp.matmul(text_embeds, image_embeds.T, precision=jax.lax.Precision.HIGHEST)
        logits_per_text = jnp.exp(self.logit_scale) * cos
        if self.logit_bias_init is not None:
            logits_per_text = logits_per_text + self.logit_bias
        return ChineseCLIPOutput(
            logits_per_image=logits_per_text.T,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=TextOutput(last_hidden_state=hidden),
            vision_model_output=vision,
        )
