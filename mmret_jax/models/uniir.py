"""UniIR (Wei et al., ECCV 2024, arXiv 2311.17136): universal multimodal retrievers on CLIP and BLIP.

One encoder embeds queries and candidates of any modality (text, image, image + text) into one space
(shared/reference/uniir.md; seed `TIGER-AI-Lab/UniIR` `src/models/uniir_*`). Every item has a text
(the instruction-prefixed query text, the candidate text, or "" when absent), an image (zeros *after*
normalisation when absent) and presence flags `txt_mask`, `img_mask` in {0, 1}:

  CLIP-SF  e = txt_mask * clip.get_text_features(t) + img_mask * clip.get_image_features(x)   (unnormalised)
  CLIP-FF  tokens = [ln_final(text transformer(t)) (77) ; ln_post(ViT(x)) @ proj (all 1 + N)] -> 2-layer
           T5 encoder (no mask) -> mean over every position; the flags are not used (as the seed)
  BLIP-SF  e = txt_mask * text_proj(CLS(text mode)) + img_mask * vision_proj(CLS(ViT))   (projections to 768)
  BLIP-FF  e = pooler(text encoder cross-attending all ViT tokens (image mask all ones))    (Linear + tanh)

Towers are ours: `clip.CLIPModel`, `vit.VisionTransformer` (BLIP layout), `bert.BertModel` with cross-
attention, `t5.T5Encoder`. Param names: `clip/...` (HF CLIPModel names) for CLIP variants plus `t5_layers/`
for FF; BLIP variants use HF BLIP names (`vision_model`, `text_encoder`, `vision_proj`, `text_proj`).
The contrastive temperature lives in the params (`clip/logit_scale` for CLIP, `temp` for BLIP).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmret_jax.models import bert, blip, clip, layers, vit

Array = jax.Array
Dtype = Any
BACKBONES = ("clip", "blip")
FUSIONS = ("sf", "ff")


@dataclasses.dataclass(frozen=True)
class UniIRConfig:
  """A UniIR variant: the backbone's config, the fusion, the embedding width (768 for the large models).

  `t5` (CLIP-FF only) is a `t5.T5Config`; `blip` is a `blip.BlipConfig` whose text encoder has the
  cross-attention blocks (its `image_text_hidden_size` is unused: `embed_dim` sets the projections)."""
  backbone: str = "clip"
  fusion: str = "sf"
  clip: clip.CLIPConfig | None = None
  blip: blip.BlipConfig | None = None
  t5: Any = None
  embed_dim: int = 768

  def __post_init__(self):
    if self.backbone not in BACKBONES or self.fusion not in FUSIONS:
      raise ValueError(f"UniIR backbone must be one of {BACKBONES} and fusion one of {FUSIONS}, got "
                       f"{self.backbone!r}, {self.fusion!r}")
    if (self.backbone == "clip") != (self.clip is not None) or (self.backbone == "blip") != (self.blip is not None):
      raise ValueError(f"UniIR {self.backbone}: give exactly the {self.backbone} config")
    if self.backbone == "clip" and self.fusion == "ff" and self.t5 is None:
      raise ValueError("UniIR CLIP-FF needs a t5 config")

  @property
  def name(self) -> str:
    return f"{self.backbone}_{self.fusion}"

  def to_dict(self) -> dict[str, Any]:
    """Our config.json (the inverse of `from_dict`)."""
    d = {"model_type": "uniir", "backbone": self.backbone, "fusion": self.fusion, "embed_dim": self.embed_dim}
    if self.clip is not None:
      d["clip_config"] = self.clip.to_dict()
    if self.blip is not None:
      d["blip_config"] = self.blip.to_dict()
    if self.t5 is not None:
      d["t5_config"] = self.t5.to_dict()
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "UniIRConfig":
    """From our config.json (`{"model_type": "uniir", "backbone", "fusion", "embed_dim", "clip_config" |
    "blip_config", "t5_config"}`; the sub-configs are HF config dicts)."""
    t5_cfg = None
    if d.get("t5_config"):
      from mmret_jax.models import t5  # pylint: disable=import-outside-toplevel
      t5_cfg = t5.T5Config.from_dict(d["t5_config"])
    return cls(backbone=d["backbone"], fusion=d["fusion"], embed_dim=int(d.get("embed_dim", 768)),
               clip=clip.CLIPConfig.from_dict(d["clip_config"]) if d.get("clip_config") else None,
               blip=blip.BlipConfig.from_dict(d["blip_config"]) if d.get("blip_config") else None, t5=t5_cfg)


class UniIRClipSF(nn.Module):
  """CLIP score fusion (seed `CLIPScoreFusion.encode_multimodal_input`)."""
  config: UniIRConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  def setup(self):
    self.clip = clip.CLIPModel(self.config.clip, dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat)

  def __call__(self, input_ids, attention_mask, pixel_values, txt_mask, img_mask, *, deterministic=True):
    """ids / mask [B, L], pixels [B, H, W, 3], flags [B] -> [B, D] float32 (unnormalised)."""
    t = self.clip.get_text_features(input_ids, attention_mask, deterministic=deterministic).astype(jnp.float32)
    i = self.clip.get_image_features(pixel_values, deterministic=deterministic).astype(jnp.float32)
    return _flag(txt_mask) * t + _flag(img_mask) * i

  def logit_scale(self):
    return self.clip.logit_scale


class UniIRClipFF(nn.Module):
  """CLIP feature fusion (seed `CLIPFeatureFusion`): text tokens after `ln_final` (no EOS pooling, no
  text projection), every image token through `post_layernorm` + `visual_projection`, a T5 encoder over
  the concatenation (text first, no attention mask), mean over all positions."""
  config: UniIRConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  def setup(self):
    from mmret_jax.models import t5  # pylint: disable=import-outside-toplevel
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.clip = _ClipTokens(c.clip, remat=self.remat, **kw)
    self.t5_layers = t5.T5Encoder(c.t5, embed_tokens=False, **kw)

  def __call__(self, input_ids, attention_mask, pixel_values, txt_mask, img_mask, *, deterministic=True):
    del attention_mask, txt_mask, img_mask  # the seed uses neither padding masks nor modality flags here
    tokens = self.clip(input_ids, pixel_values, deterministic=deterministic)
    out = self.t5_layers(inputs_embeds=tokens, attention_mask=None, deterministic=deterministic)
    return out["last_hidden_state"].astype(jnp.float32).mean(axis=1)

  def logit_scale(self):
    return self.clip.logit_scale


class _ClipTokens(nn.Module):
  """CLIP's towers without pooling: [B, L] text + [B, H, W, 3] image -> [B, L + 1 + N, D] tokens.
  Param names match `clip.CLIPModel` (no `text_projection`: CLIP-FF deletes it)."""
  config: clip.CLIPConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  def setup(self):
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat)
    self.text_model = clip.TextTransformer(c.text, **kw)
    # post_layernorm on every token (the seed's `ln_post(x)` before `@ proj`), CLIP's layout otherwise
    self.vision_model = vit.VisionTransformer(dataclasses.replace(c.vision, post_layernorm_all=True), **kw)
    self.visual_projection = layers.Dense(c.projection_dim, ("embed", "mlp"), use_bias=False,
                                          init_std=c.vision.hidden_size ** -0.5, dtype=self.dtype,
                                          param_dtype=self.param_dtype)
    self.logit_scale = layers.logical_param(self, "logit_scale", (), (),
                                            nn.initializers.constant(c.logit_scale_init_value), self.param_dtype)

  def __call__(self, input_ids, pixel_values, *, deterministic=True):
    text = self.text_model(input_ids, None, deterministic=deterministic)["last_hidden_state"]
    image = self.vision_model(pixel_values, deterministic=deterministic)["last_hidden_state"]
    return jnp.concatenate([text, self.visual_projection(image).astype(text.dtype)], axis=1)


class UniIRBlipSF(nn.Module):
  """BLIP score fusion (seed `BLIPScoreFusion`): text mode CLS -> text_proj, ViT CLS -> vision_proj."""
  config: UniIRConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  def setup(self):
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.vision_model = vit.VisionTransformer(c.blip.vision, remat=self.remat, **kw)
    self.text_encoder = bert.BertModel(c.blip.text, add_pooling_layer=False, remat=self.remat, **kw)
    self.vision_proj = layers.Dense(c.embed_dim, ("embed", "mlp"), init_std=0.02, **kw)
    self.text_proj = layers.Dense(c.embed_dim, ("embed", "mlp"), init_std=0.02, **kw)
    self.temp = layers.logical_param(self, "temp", (), (), nn.initializers.constant(0.07), self.param_dtype)

  def __call__(self, input_ids, attention_mask, pixel_values, txt_mask, img_mask, *, deterministic=True):
    t = blip.text_features(self.text_encoder, self.text_proj, input_ids, attention_mask, deterministic)
    img = self.vision_model(pixel_values, deterministic=deterministic)["last_hidden_state"]
    i = self.vision_proj(img[:, 0])
    if self.is_initializing():  # the text encoder's cross-attention blocks exist (frozen) in the seed
      self.text_encoder(input_ids, attention_mask, encoder_hidden_states=img, deterministic=True)
    return _flag(txt_mask) * t.astype(jnp.float32) + _flag(img_mask) * i.astype(jnp.float32)


class UniIRBlipFF(nn.Module):
  """BLIP feature fusion (seed `BLIPFeatureFusion`): the text encoder cross-attends every ViT token (mask
  all ones, also for a missing image) -> BERT pooler (dense + tanh on CLS)."""
  config: UniIRConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  def setup(self):
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.vision_model = vit.VisionTransformer(c.blip.vision, remat=self.remat, **kw)
    self.text_encoder = bert.BertModel(c.blip.text, add_pooling_layer=True, remat=self.remat, **kw)
    self.temp = layers.logical_param(self, "temp", (), (), nn.initializers.constant(0.07), self.param_dtype)

  def __call__(self, input_ids, attention_mask, pixel_values, txt_mask, img_mask, *, deterministic=True):
    del txt_mask, img_mask
    img = self.vision_model(pixel_values, deterministic=deterministic)["last_hidden_state"]
    out = self.text_encoder(input_ids, attention_mask, encoder_hidden_states=img, deterministic=deterministic)
    return out["pooler_output"].astype(jnp.float32)


MODELS = {"clip_sf": UniIRClipSF, "clip_ff": UniIRClipFF, "blip_sf": UniIRBlipSF, "blip_ff": UniIRBlipFF}


def build(config: UniIRConfig, **kw) -> nn.Module:
  return MODELS[config.name](config, **kw)


def _flag(m: Array) -> Array:
  return jnp.asarray(m, jnp.float32).reshape(-1, 1)


def image_size(config: UniIRConfig) -> int:
  return (config.clip.vision if config.backbone == "clip" else config.blip.vision).image_size


def init_params(model: nn.Module, rng: Array, seq_len: int = 8) -> dict:
  """Every param of a UniIR model (boxed)."""
  size = image_size(model.config)
  ids = jnp.ones((1, seq_len), jnp.int32)
  px = jnp.zeros((1, size, size, 3), jnp.float32)
  ones = jnp.ones((1,), jnp.float32)
  return model.init(rng, ids, jnp.ones_like(ids), px, ones, ones)["params"]
