"""BLIP (Li et al. 2022, arXiv 2201.12086) for retrieval: ViT + BERT text encoder with cross-attention.

Mirrors Hugging Face `BlipForImageTextRetrieval`:
  vision_model  `vit.VisionTransformer` in BLIP's layout (no pre-LN, patch conv with bias,
                `post_layernorm` on every token; positions resized to other input sizes)
  text_encoder  `bert.BertModel` with a cross-attention block in every layer (HF BlipTextModel:
                no token-type table, positions from 0, no pooler). "text" mode = no image states
                (the cross-attention blocks are skipped); "multimodal" mode = cross-attending the
                image tokens (`last_hidden_state` of the ViT, mask all ones)
  vision_proj / text_proj  Linear(D -> image_text_hidden_size) on the CLS token of each tower
  itm_head      Linear(768 -> 2) on the multimodal CLS state; index 1 = match

The original BLIP puts `[ENC]` (id 30523 in the released vocab) in place of `[CLS]` for the
multimodal (ITM) pass and keeps `[CLS]` for the unimodal (ITC) text pass; HF feeds ids as given.
`enc_token_id` does the substitution when asked (`itm_logits(..., replace_cls_with_enc=True)`).
ViT attention params use CLIP's names (`q_proj/k_proj/v_proj/out_proj`): HF's fused `self_attn.qkv`
is split into thirds by the converter (`convert/blip.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmret_jax.models import bert, layers, vit

Array = jax.Array
Dtype = Any

# HF BlipVisionConfig / BlipTextConfig defaults that differ from our dataclass defaults.
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        image_size=384, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-5,
                        initializer_range=1e-10)
_TEXT_DEFAULTS = dict(vocab_size=30524, hidden_size=768, encoder_hidden_size=768, intermediate_size=3072,
                      num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=512,
                      hidden_act="gelu", layer_norm_eps=1e-12, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, initializer_range=0.02, pad_token_id=0)
BLIP_VIT_LAYOUT = dict(pre_layernorm=False, patch_bias=True, post_layernorm_all=True,
                       interpolate_pos_encoding=True)
ENC_TOKEN_ID = 30523  # `[ENC]` in BLIP's bert-base-uncased + [DEC] + [ENC] vocab


@dataclasses.dataclass(frozen=True)
class BlipConfig:
  """HF `BlipConfig` (as `BlipForImageTextRetrieval` uses it): the two towers + the ITC width."""
  vision: vit.ViTConfig = vit.ViTConfig(**{k: v for k, v in _VISION_DEFAULTS.items()}, **BLIP_VIT_LAYOUT)
  text: bert.BertConfig = bert.BertConfig(
      vocab_size=30524, num_attention_heads=8, type_vocab_size=0, add_cross_attention=True,
      encoder_width=768, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
  image_text_hidden_size: int = 256
  enc_token_id: int = ENC_TOKEN_ID

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "BlipConfig":
    """From an HF `BlipConfig` dict (config.json of a `BlipForImageTextRetrieval` dir)."""
    if d.get("model_type", "blip") != "blip":
      raise ValueError(f"Not a BLIP config: model_type={d.get('model_type')!r}")
    v = {**_VISION_DEFAULTS, **{k: x for k, x in (d.get("vision_config") or {}).items() if x is not None}}
    t = {**_TEXT_DEFAULTS, **{k: x for k, x in (d.get("text_config") or {}).items() if x is not None}}
    vision = vit.ViTConfig(**layers.fields_from_hf(vit.ViTConfig, v), **BLIP_VIT_LAYOUT)
    text_fields = layers.fields_from_hf(bert.BertConfig, t)
    for k in ("type_vocab_size", "is_decoder", "add_cross_attention", "model_type", "encoder_width",
              "position_embedding_type"):
      text_fields.pop(k, None)  # BLIP's text encoder: fixed layout (see module docstring)
    text = bert.BertConfig(**text_fields, model_type="bert", type_vocab_size=0, add_cross_attention=True,
                           encoder_width=int(t.get("encoder_hidden_size") or vision.hidden_size))
    return cls(vision=vision, text=text, image_text_hidden_size=int(d.get("image_text_hidden_size", 256)),
               enc_token_id=int(d.get("enc_token_id", ENC_TOKEN_ID)))

  def to_dict(self) -> dict[str, Any]:
    """An HF `BlipConfig` dict that `BlipForImageTextRetrieval.from_pretrained` reads."""
    v = self.vision.to_dict()
    v.pop("projection_dim", None)
    t = self.text
    text = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, encoder_hidden_size=t.encoder_width,
                intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
                num_attention_heads=t.num_attention_heads, max_position_embeddings=t.max_position_embeddings,
                hidden_act=t.hidden_act, layer_norm_eps=t.layer_norm_eps, hidden_dropout_prob=t.hidden_dropout_prob,
                attention_probs_dropout_prob=t.attention_probs_dropout_prob,
                initializer_range=t.initializer_range, pad_token_id=t.pad_token_id, model_type="blip_text_model")
    return {"model_type": "blip", "architectures": ["BlipForImageTextRetrieval"],
            "image_text_hidden_size": self.image_text_hidden_size, "projection_dim": self.image_text_hidden_size,
            "vision_config": {**v, "model_type": "blip_vision_model"}, "text_config": text}

  def validate(self) -> None:
    for name, hidden, heads in (("vision", self.vision.hidden_size, self.vision.num_attention_heads),
                                ("text", self.text.hidden_size, self.text.num_attention_heads)):
      if heads < 1 or hidden % heads:
        raise ValueError(f"{name} hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    if self.text.encoder_width != self.vision.hidden_size:
      raise ValueError(f"text encoder_hidden_size {self.text.encoder_width} != vision hidden_size "
                       f"{self.vision.hidden_size}")


PRESETS = {
    # BLIP ViT-B/16 at 384 px with the BERT-base "med" text encoder (model_base.pth, blip-itm-base-*).
    "base": BlipConfig(vision=vit.ViTConfig(**{**_VISION_DEFAULTS, "layer_norm_eps": 1e-6,
                                                "initializer_range": 0.02}, **BLIP_VIT_LAYOUT),
                       text=dataclasses.replace(BlipConfig().text, num_attention_heads=12)),
    "large": BlipConfig(vision=vit.ViTConfig(**{**_VISION_DEFAULTS, "hidden_size": 1024, "intermediate_size": 4096,
                                                 "num_hidden_layers": 24, "num_attention_heads": 16,
                                                 "layer_norm_eps": 1e-6, "initializer_range": 0.02},
                                              **BLIP_VIT_LAYOUT),
                        text=dataclasses.replace(BlipConfig().text, num_attention_heads=12, encoder_width=1024)),
}


class BlipRetrieval(nn.Module):
  """`BlipForImageTextRetrieval`. Methods: `image_embeds`, `get_image_features`, `get_text_features`,
  `itm_logits`; `__call__` runs all of them (used to initialise every param)."""
  config: BlipConfig
  add_itm_head: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.vision_model = vit.VisionTransformer(c.vision, remat=self.remat, **kw)
    self.text_encoder = bert.BertModel(c.text, add_pooling_layer=False, remat=self.remat, **kw)
    self.vision_proj = layers.Dense(c.image_text_hidden_size, ("embed", "mlp"), init_std=0.02, **kw)
    self.text_proj = layers.Dense(c.image_text_hidden_size, ("embed", "mlp"), init_std=0.02, **kw)
    if self.add_itm_head:
      self.itm_head = layers.Dense(2, ("embed", None), init_std=0.02, **kw)

  def image_embeds(self, pixel_values: Array, *, deterministic: bool = True) -> Array:
    """[B, H, W, 3] -> ViT `last_hidden_state` [B, 1 + N, Dv] (post-LN on every token)."""
    return self.vision_model(pixel_values, deterministic=deterministic)["last_hidden_state"]

  def get_image_features(self, pixel_values: Array, *, deterministic: bool = True) -> Array:
    """[B, H, W, 3] -> vision_proj(CLS) [B, image_text_hidden_size], unnormalised."""
    return self.vision_proj(self.image_embeds(pixel_values, deterministic=deterministic)[:, 0])

  def get_text_features(self, input_ids: Array, attention_mask: Array | None = None, *,
                        deterministic: bool = True) -> Array:
    """Text mode: [B, L] -> text_proj(CLS) [B, image_text_hidden_size], unnormalised."""
    return text_features(self.text_encoder, self.text_proj, input_ids, attention_mask, deterministic)

  def itm_logits(self, input_ids: Array, attention_mask: Array | None, image_embeds: Array, *,
                 deterministic: bool = True, replace_cls_with_enc: bool = False) -> Array:
    """Multimodal mode: text cross-attending the image tokens -> itm_head(CLS) [B, 2] (index 1 =
    match). `replace_cls_with_enc` puts `[ENC]` at position 0, as the original BLIP's ITM pass."""
    if not self.add_itm_head:
      raise ValueError("this BLIP model has no itm_head (converted from a checkpoint without one)")
    if replace_cls_with_enc:
      input_ids = input_ids.at[:, 0].set(self.config.enc_token_id)
    h = self.text_encoder(input_ids, attention_mask, encoder_hidden_states=image_embeds,
                          deterministic=deterministic, cls_only_last_layer=True)["last_hidden_state"]
    return self.itm_head(h[:, 0])

  def __call__(self, input_ids: Array, pixel_values: Array, attention_mask: Array | None = None, *,
               deterministic: bool = True) -> dict[str, Array]:
    img = self.image_embeds(pixel_values, deterministic=deterministic)
    out = {"image_feat": self.vision_proj(img[:, 0]),
           "text_feat": self.get_text_features(input_ids, attention_mask, deterministic=deterministic)}
    if self.add_itm_head:
      out["itm_logits"] = self.itm_logits(input_ids, attention_mask, img, deterministic=deterministic)
    else:  # still create the cross-attention params
      out["multimodal"] = self.text_encoder(input_ids, attention_mask, encoder_hidden_states=img,
                                            deterministic=deterministic)["last_hidden_state"]
    return out


def text_features(text_encoder: bert.BertModel, text_proj: nn.Module, input_ids: Array,
                  attention_mask: Array | None, deterministic: bool = True) -> Array:
  """Text-mode CLS through `text_proj` (only position 0 of the last layer is computed)."""
  h = text_encoder(input_ids, attention_mask, deterministic=deterministic,
                   cls_only_last_layer=True)["last_hidden_state"]
  return text_proj(h[:, 0])


class BlipTextTower(nn.Module):
  """`text_encoder` + `text_proj` alone, with BlipRetrieval's param names: the part Bi-BLIP4CIR's
  stage I trains. [B, L] -> text_proj(CLS) [B, image_text_hidden_size], unnormalised."""
  config: BlipConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # No cross-attention params: text mode never runs them (BlipRetrieval keeps them for ITM).
    self.text_encoder = bert.BertModel(dataclasses.replace(c.text, add_cross_attention=False),
                                       add_pooling_layer=False, remat=self.remat, **kw)
    self.text_proj = layers.Dense(c.image_text_hidden_size, ("embed", "mlp"), init_std=0.02, **kw)

  def __call__(self, input_ids: Array, attention_mask: Array | None = None, *,
               deterministic: bool = True) -> Array:
    return text_features(self.text_encoder, self.text_proj, input_ids, attention_mask, deterministic)


def init_params(model: BlipRetrieval, rng: Array, seq_len: int = 8) -> dict:
  """Every param of `model` (boxed) from `rng`."""
  c = model.config
  ids = jnp.ones((1, seq_len), jnp.int32)
  px = jnp.zeros((1, c.vision.image_size, c.vision.image_size, c.vision.num_channels), jnp.float32)
  return model.init(rng, ids, px)["params"]
