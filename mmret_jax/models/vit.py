"""Vision Transformer (Dosovitskiy et al. 2021) as used by CLIP (Radford et al. 2021).

Mirrors Hugging Face `CLIPVisionTransformer`: stride-P patch embedding without bias, a class
token, learned positions, `pre_layrnorm` (sic, the HF name), pre-LN blocks (`layer_norm1`,
`self_attn`, `layer_norm2`, `mlp/fc1,fc2`, quick_gelu), `post_layernorm` on the class token.
`EncoderLayer` / `Encoder` are the pre-LN stack shared with CLIP's text tower (`clip.py`).
Images are NHWC float arrays (`mmret_jax.data.image` makes them).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmret_jax.models import layers

Array = jax.Array
Dtype = Any


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """HF `CLIPVisionConfig` fields (names match config.json)."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  attention_dropout: float = 0.0
  initializer_range: float = 0.02
  projection_dim: int = 512
  # Layout flags (defaults = CLIP). BLIP's ViT: pre_layernorm=False, patch_bias=True,
  # post_layernorm_all=True: post_layernorm normalises every token (last_hidden_state) and, as HF
  # `BlipVisionModel`, pooler_output applies it once more to token 0 (post_layernorm(post_layernorm(x)[:, 0]));
  # BLIP's retrieval heads read last_hidden_state[:, 0] instead (tests/test_vit_blip_layout.py).
  pre_layernorm: bool = True
  patch_bias: bool = False
  post_layernorm_all: bool = False
  # Inputs of another size than image_size: False = an error (CLIP); True = the position grid is
  # resized bicubically to the input's patch grid, as HF `interpolate_pos_encoding=True` (BLIP).
  interpolate_pos_encoding: bool = False

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ViTConfig":
    return cls(**layers.fields_from_hf(cls, d))

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  def to_dict(self) -> dict[str, Any]:
    """The HF config fields (layout flags left out: they follow from the model type)."""
    d = dataclasses.asdict(self)
    for k in ("pre_layernorm", "patch_bias", "post_layernorm_all", "interpolate_pos_encoding"):
      d.pop(k)
    return d


PRESETS = {
    "B/32": ViTConfig(),
    "B/16": ViTConfig(patch_size=16),
    "L/14": ViTConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                      num_attention_heads=16, patch_size=14, projection_dim=768),
}


class EncoderLayer(nn.Module):
  """Pre-LN block: x + attn(ln1(x)); x + mlp(ln2(x)) (HF CLIPEncoderLayer)."""
  hidden_size: int
  intermediate_size: int
  num_heads: int
  activation: str = "quick_gelu"
  epsilon: float = 1e-5
  attention_dropout: float = 0.0
  init_std: float = 0.02
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None, deterministic: bool = True) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.constrain(x, ("batch", "length", "embed"))
    h = layers.LayerNorm(self.epsilon, name="layer_norm1", **kw)(x)
    h = layers.Attention(self.num_heads, self.hidden_size, names=("q_proj", "k_proj", "v_proj"),
                         out_name="out_proj", dropout_rate=self.attention_dropout, init_std=self.init_std,
                         name="self_attn", **kw)(h, None, mask, deterministic)
    x = x + h
    h = layers.LayerNorm(self.epsilon, name="layer_norm2", **kw)(x)
    h = layers.Mlp(self.intermediate_size, self.activation, init_std=self.init_std, name="mlp", **kw)(h)
    return layers.constrain(x + h, ("batch", "length", "embed"))


class Encoder(nn.Module):
  """`layers_{i}` pre-LN blocks (HF `encoder.layers.{i}`); optional remat per block."""
  num_layers: int
  block: dict  # EncoderLayer fields
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None, deterministic: bool = True) -> list[Array]:
    # static_argnums counts `self` as 0: argument 3 is `deterministic`.
    cls = nn.remat(EncoderLayer, static_argnums=(3,)) if self.remat else EncoderLayer
    states = []
    for i in range(self.num_layers):
      x = cls(**self.block, dtype=self.dtype, param_dtype=self.param_dtype, name=f"layers_{i}")(
          x, mask, deterministic)
      states.append(x)
    return states


def encoder_block_kwargs(hidden_size, intermediate_size, num_heads, act, eps, attn_dropout, init_std) -> dict:
  return dict(hidden_size=hidden_size, intermediate_size=intermediate_size, num_heads=num_heads,
              activation=act, epsilon=eps, attention_dropout=attn_dropout, init_std=init_std)


class VisionTransformer(nn.Module):
  """HF `CLIPVisionTransformer`. [B, H, W, C] -> {last_hidden_state [B, 1+N, D], pooler_output [B, D]}."""
  config: ViTConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, pixel_values: Array, *, deterministic: bool = True,
               output_hidden_states: bool = False) -> dict[str, Array]:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = _VisionEmbeddings(c, name="embeddings", **kw)(pixel_values)
    if c.pre_layernorm:
      h = layers.LayerNorm(c.layer_norm_eps, name="pre_layrnorm", **kw)(h)
    block = encoder_block_kwargs(c.hidden_size, c.intermediate_size, c.num_attention_heads, c.hidden_act,
                                 c.layer_norm_eps, c.attention_dropout, c.initializer_range)
    states = Encoder(c.num_hidden_layers, block, remat=self.remat, name="encoder", **kw)(
        h, None, deterministic)
    last = states[-1] if states else h
    post = layers.LayerNorm(c.layer_norm_eps, name="post_layernorm", **kw)
    if c.post_layernorm_all:
      last = post(last)
      out = {"last_hidden_state": last, "pooler_output": post(last[:, 0])}  # twice on token 0, as HF BLIP
    else:
      out = {"last_hidden_state": last, "pooler_output": post(last[:, 0])}
    if output_hidden_states:
      out["hidden_states"] = (h, *states)
    return out


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] float64 weights of torch `interpolate(mode="bicubic", align_corners=False)` along one
  axis: source x = (i + 0.5) * in / out - 0.5, cubic convolution with A = -0.75, edge indices
  clamped (no antialiasing)."""
  a = -0.75
  m = np.zeros((out_size, in_size))
  for i in range(out_size):
    x = (i + 0.5) * in_size / out_size - 0.5
    x0 = int(np.floor(x))
    t = x - x0
    for j, d in zip(range(x0 - 1, x0 + 3), (1 + t, t, 1 - t, 2 - t)):
      w = ((a + 2) * d - (a + 3)) * d * d + 1 if d <= 1 else ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
      m[i, min(max(j, 0), in_size - 1)] += w
  return m


def resize_positions(table, grid_hw: tuple[int, int]):
  """Position table [1 + g*g, D] (class token first) -> [1 + h*w, D] with the patch grid resized
  bicubically to `grid_hw` (HF BLIP `interpolate_pos_encoding`, BLIP's `interpolate_pos_embed`).
  Works on numpy (converters) and jax arrays (inside a model)."""
  xp = jnp if isinstance(table, jax.Array) else np
  g = int(round((table.shape[0] - 1) ** 0.5))
  if g * g != table.shape[0] - 1:
    raise ValueError(f"position table of {table.shape[0]} rows is not 1 + a square grid")
  h, w = grid_hw
  if (h, w) == (g, g):
    return table
  grid = table[1:].reshape(g, g, table.shape[-1])
  mh, mw = (bicubic_matrix(g, n).astype(np.float32) for n in (h, w))
  out = xp.einsum("pi,ijd,qj->pqd", mh, grid.astype(xp.float32), mw,
                  **({"precision": jax.lax.Precision.HIGHEST} if xp is jnp else {}))
  return xp.concatenate([table[:1], out.reshape(h * w, -1).astype(table.dtype)], axis=0)


class _VisionEmbeddings(nn.Module):
  """HF CLIPVisionEmbeddings: `class_embedding`, `patch_embedding`, `position_embedding`."""
  config: ViTConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: Array) -> Array:
    c = self.config
    if pixel_values.ndim != 4 or pixel_values.shape[-1] != c.num_channels:
      raise ValueError(f"expected NHWC images with {c.num_channels} channels, got {pixel_values.shape}")
    size = tuple(pixel_values.shape[1:3])
    if size != (c.image_size, c.image_size) and not (
        c.interpolate_pos_encoding and size[0] % c.patch_size == 0 and size[1] % c.patch_size == 0):
      raise ValueError(f"expected {c.image_size}x{c.image_size} images"
                       f"{' (or multiples of the patch size ' + str(c.patch_size) + ')' if c.interpolate_pos_encoding else ''}"
                       f", got {size[0]}x{size[1]}")
    patches = layers.PatchEmbed(c.hidden_size, c.patch_size, use_bias=c.patch_bias, init_std=c.initializer_range,
                                dtype=self.dtype, param_dtype=self.param_dtype,
                                name="patch_embedding")(pixel_values)
    cls = layers.logical_param(self, "class_embedding", (c.hidden_size,), ("embed",),
                               nn.initializers.normal(c.initializer_range), self.param_dtype)
    cls = jnp.broadcast_to(cls.astype(self.dtype), (patches.shape[0], 1, c.hidden_size))
    h = jnp.concatenate([cls, patches], axis=1)
    pos = layers.Embed(c.num_patches + 1, c.hidden_size, (None, "embed"), param_dtype=self.param_dtype,
                       init_std=c.initializer_range, name="position_embedding")
    table = pos(jnp.arange(c.num_patches + 1))
    if patches.shape[1] != c.num_patches or size[0] != size[1]:
      table = resize_positions(table, (size[0] // c.patch_size, size[1] // c.patch_size))
    return h + table.astype(self.dtype)[None]
