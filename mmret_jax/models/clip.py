"""CLIP (Radford et al. 2021): text transformer, vision transformer, projections and logit scale.

Mirrors Hugging Face `CLIPModel`: `text_model` (token + position embeddings, causal pre-LN blocks,
`final_layer_norm`, pooled at the EOS token), `vision_model` (`vit.VisionTransformer`),
`visual_projection` / `text_projection` (no bias) and the scalar `logit_scale`. The pre-LN block
is `vit.EncoderLayer`, shared by both towers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmret_jax.models import layers, vit

Array = jax.Array
Dtype = Any


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """HF `CLIPTextConfig` fields."""
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  attention_dropout: float = 0.0
  initializer_range: float = 0.02
  pad_token_id: int = 1
  bos_token_id: int = 49406
  eos_token_id: int = 49407
  projection_dim: int = 512

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "CLIPTextConfig":
    return cls(**layers.fields_from_hf(cls, d))


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """HF `CLIPConfig`: the two tower configs plus the shared projection size and logit scale init."""
  text: CLIPTextConfig = CLIPTextConfig()
  vision: vit.ViTConfig = vit.ViTConfig()
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
    if d.get("model_type", "clip") != "clip":
      raise ValueError(f"Not a CLIP config: model_type={d.get('model_type')!r}")
    # Older hub configs also carry `text_config_dict` / `vision_config_dict`: as in HF, their values win.
    sub = lambda name: {**(d.get(f"{name}_config") or {}), **(d.get(f"{name}_config_dict") or {})}
    return cls(text=CLIPTextConfig.from_dict(sub("text")),
               vision=vit.ViTConfig.from_dict(sub("vision")),
               projection_dim=int(d.get("projection_dim", 512)),
               logit_scale_init_value=float(d.get("logit_scale_init_value", 2.6592)))

  def to_dict(self) -> dict[str, Any]:
    """An HF `CLIPConfig` dict (`CLIPModel.from_pretrained` reads it)."""
    return {"model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
            "text_config": dataclasses.asdict(self.text), "vision_config": self.vision.to_dict()}


def eos_positions(input_ids: Array, eos_token_id: int) -> Array:
  """[B, L] -> [B] index of the pooled token, as HF CLIPTextTransformer: argmax of the ids for the
  legacy eos id 2 (the EOS token has the largest id in the original vocab), else the first EOS."""
  if eos_token_id == 2:
    return jnp.argmax(input_ids, axis=-1)
  return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class TextTransformer(nn.Module):
  """HF `CLIPTextTransformer`. ids [B, L] -> {last_hidden_state [B, L, D], pooler_output [B, D]}."""
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None = None, *,
               deterministic: bool = True, output_hidden_states: bool = False) -> dict[str, Array]:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    length = input_ids.shape[1]
    if length > c.max_position_embeddings:
      raise ValueError(f"text length {length} exceeds max_position_embeddings {c.max_position_embeddings}")
    h = _TextEmbeddings(c, name="embeddings", param_dtype=self.param_dtype)(input_ids).astype(self.dtype)
    mask = layers.attention_bias_from_mask(attention_mask, causal_length=length)
    block = vit.encoder_block_kwargs(c.hidden_size, c.intermediate_size, c.num_attention_heads, c.hidden_act,
                                     c.layer_norm_eps, c.attention_dropout, c.initializer_range)
    states = vit.Encoder(c.num_hidden_layers, block, remat=self.remat, name="encoder", **kw)(
        h, mask, deterministic)
    last = layers.LayerNorm(c.layer_norm_eps, name="final_layer_norm", **kw)(states[-1] if states else h)
    pooled = jnp.take_along_axis(last, eos_positions(input_ids, c.eos_token_id)[:, None, None], axis=1)[:, 0]
    out = {"last_hidden_state": last, "pooler_output": pooled}
    if output_hidden_states:
      out["hidden_states"] = (h, *states)
    return out


class _TextEmbeddings(nn.Module):
  config: CLIPTextConfig
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Array) -> Array:
    c = self.config
    tok = layers.Embed(c.vocab_size, c.hidden_size, ("vocab", "embed"), param_dtype=self.param_dtype,
                       init_std=c.initializer_range, name="token_embedding")
    pos = layers.Embed(c.max_position_embeddings, c.hidden_size, (None, "embed"),
                       param_dtype=self.param_dtype, init_std=c.initializer_range, name="position_embedding")
    return tok(input_ids) + pos(jnp.arange(input_ids.shape[1]))[None]


class CLIPModel(nn.Module):
  """Both towers + projections. `__call__` returns normalised-free features and the logit scale;
  use `method=CLIPModel.get_text_features / get_image_features` for one tower."""
  config: CLIPConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  def setup(self):
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat)
    self.text_model = TextTransformer(c.text, **kw)
    self.vision_model = vit.VisionTransformer(c.vision, **kw)
    dkw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
    self.text_projection = layers.Dense(c.projection_dim, ("embed", "mlp"),
                                        init_std=c.text.hidden_size ** -0.5, **dkw)
    self.visual_projection = layers.Dense(c.projection_dim, ("embed", "mlp"),
                                          init_std=c.vision.hidden_size ** -0.5, **dkw)
    self.logit_scale = layers.logical_param(
        self, "logit_scale", (), (), nn.initializers.constant(c.logit_scale_init_value), self.param_dtype)

  def get_text_features(self, input_ids, attention_mask=None, *, deterministic=True):
    """[B, L] -> [B, projection_dim] (unnormalised, as HF)."""
    pooled = self.text_model(input_ids, attention_mask, deterministic=deterministic)["pooler_output"]
    return self.text_projection(pooled)

  def get_image_features(self, pixel_values, *, deterministic=True):
    """[B, H, W, C] -> [B, projection_dim] (unnormalised, as HF)."""
    pooled = self.vision_model(pixel_values, deterministic=deterministic)["pooler_output"]
    return self.visual_projection(pooled)

  def __call__(self, input_ids, pixel_values, attention_mask=None, *, deterministic=True):
    return {"text_embeds": self.get_text_features(input_ids, attention_mask, deterministic=deterministic),
            "image_embeds": self.get_image_features(pixel_values, deterministic=deterministic),
            "logit_scale": self.logit_scale}
