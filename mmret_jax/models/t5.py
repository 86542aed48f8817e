"""T5 / mT5 encoder (Raffel et al. 2020; Xue et al. 2021) in Flax linen.

Mirrors Hugging Face `T5EncoderModel` / `MT5EncoderModel` and a bare encoder `T5Stack`: pre-RMSNorm
residual blocks (`T5LayerNorm`: no mean, no bias), self-attention without biases and without logit
scaling (T5 folds it into the q init), a bucketed relative position bias owned by block 0 and shared
by every block, a ReLU (T5) or gated-GELU-tanh (T5 v1.1 / mT5, `gated-gelu` -> `gelu_new`) FFN, a
final RMSNorm, and dropout on the embeddings, on each sub-layer's output, inside the FFN, on the
attention probabilities and after the final norm. UniIR's CLIP-FF fuses CLIP tokens with a bare
2-layer `T5Stack` (`inputs_embeds`, no mask): `T5Encoder(config, embed_tokens=False)`.

The sub-layers (`T5LayerSelfAttention`, `T5LayerFF`, `T5Attention`, `relative_position_bucket`)
are written for reuse by the mT5 decoder: `bidirectional=False` gives the causal buckets, `offset`
the positions of cached steps, and a decoder block inserts its cross-attention sub-layer at `layer_1`.

Param paths mirror HF keys with `.` -> `/` and `block.{i}` -> `block_{i}`: `block_{i}/layer_0/
SelfAttention/{q,k,v,o}/kernel`, `block_0/layer_0/SelfAttention/relative_attention_bias/embedding`,
`block_{i}/layer_{0,1}/layer_norm/scale`, `block_{i}/layer_1/DenseReluDense/{wi|wi_0,wi_1},wo/kernel`,
`final_layer_norm/scale`, and `shared/embedding` with `embed_tokens` (HF's `encoder.` prefix dropped;
see `mmret_jax/convert/t5.py`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmret_jax.models import layers

Array = jax.Array
Dtype = Any
MODEL_TYPES = ("t5", "mt5")


@dataclasses.dataclass(frozen=True)
class T5Config:
  """HF `T5Config` / `MT5Config` fields (names match config.json); defaults are `T5Config()`'s."""
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_decoder_layers: int | None = None  # None = num_layers (HF)
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.1
  layer_norm_epsilon: float = 1e-6
  initializer_factor: float = 1.0
  feed_forward_proj: str = "relu"  # "{act}" or "gated-{act}"; HF maps "gated-gelu" to gelu_new (tanh)
  tie_word_embeddings: bool = True  # for the decoder's LM head (mT5 checkpoints: untied)
  pad_token_id: int = 0
  eos_token_id: int = 1
  decoder_start_token_id: int = 0
  model_type: str = "t5"
  # Not a model property (never exported): run the FFN output projection `wo` in float32 under
  # 16-bit compute, as HF keeps `wo` in float32 (`_keep_in_fp32_modules`); its float32 output then
  # keeps the residual stream in float32 after the first FFN, as in HF.
  wo_float32: bool = True

  def __post_init__(self):
    parts = self.feed_forward_proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
      raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r} is not '{{act}}' or 'gated-{{act}}'")
    layers.get_activation(self.dense_act_fn)
    if self.model_type not in MODEL_TYPES:
      raise ValueError(f"Not a T5 / mT5 config: model_type={self.model_type!r}")

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "T5Config":
    """From an HF config dict; a missing field takes `T5Config()`'s or `MT5Config()`'s default."""
    mt = d.get("model_type", "t5")
    base = MT5_DEFAULTS if mt == "mt5" else {}
    return cls(**{**base, **layers.fields_from_hf(cls, d), "model_type": mt})

  def to_dict(self) -> dict[str, Any]:
    """HF config fields (the runtime-only `wo_float32` left out)."""
    d = dataclasses.asdict(self)
    d.pop("wo_float32")
    return d

  @property
  def is_gated_act(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def dense_act_fn(self) -> str:
    """The FFN activation's HF name (HF `T5Config.dense_act_fn`)."""
    return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]

  @property
  def inner_dim(self) -> int:
    """Width of q, k, v: num_heads * d_kv (may differ from d_model)."""
    return self.num_heads * self.d_kv


# MT5Config's defaults where they differ from T5Config's.
MT5_DEFAULTS = dict(vocab_size=250112, d_ff=1024, num_layers=8, num_heads=6, feed_forward_proj="gated-gelu")

PRESETS = {
    # UniIR CLIP-FF fusion stacks (seed clip_ff.py: T5Config() with these fields set; T5Stack(conf)).
    "uniir-clip-ff-b32": T5Config(num_layers=2, num_decoder_layers=2, num_heads=12, d_model=512, d_kv=64),
    "uniir-clip-ff-l14": T5Config(num_layers=2, num_decoder_layers=2, num_heads=12, d_model=768, d_kv=64),
}


def relative_position_bucket(relative_position: Array, *, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 128) -> Array:
  """int relative positions (key - query) -> int32 bucket ids in [0, num_buckets) (HF / Mesh TF T5).

  Bidirectional (encoder): half the buckets for keys after the query. Within a half, distances below
  max_exact = half // 2 get a bucket each, larger ones logarithmically wider buckets up to
  max_distance, beyond which all share the last bucket. Unidirectional (decoder): keys after the query
  fall in bucket 0. The log part runs in float32 and truncates, as HF does, so the ids match it."""
  rel = relative_position.astype(jnp.int32)
  buckets = jnp.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    buckets = buckets + (rel > 0).astype(jnp.int32) * num_buckets
    rel = jnp.abs(rel)
  else:
    rel = -jnp.minimum(rel, 0)
  max_exact = num_buckets // 2
  is_small = rel < max_exact
  # max(rel, 1): the log branch is discarded where rel < max_exact; this keeps log(0) out of it.
  ratio = jnp.maximum(rel, 1).astype(jnp.float32) / jnp.float32(max_exact)
  scaled = jnp.log(ratio) / jnp.float32(math.log(max_distance / max_exact)) * jnp.float32(num_buckets - max_exact)
  large = jnp.minimum(max_exact + scaled.astype(jnp.int32), num_buckets - 1)
  return buckets + jnp.where(is_small, rel, large)


def relative_position_bias(table: layers.Embed, query_length: int, key_length: int, *, bidirectional: bool,
                           num_buckets: int, max_distance: int, offset: int | Array = 0) -> Array:
  """HF `T5Attention.compute_bias`: float32 [1, N, L, S] from the [num_buckets, N] table; query i sits
  at position offset + i (offset: cached decoder steps)."""
  q = jnp.arange(query_length, dtype=jnp.int32)[:, None] + offset
  k = jnp.arange(key_length, dtype=jnp.int32)[None, :]
  ids = relative_position_bucket(k - q, bidirectional=bidirectional, num_buckets=num_buckets,
                                 max_distance=max_distance)
  return jnp.transpose(table(ids), (2, 0, 1))[None].astype(jnp.float32)


class T5Attention(layers.Attention):
  """HF `T5Attention`: `layers.Attention` with projections q, k, v, o (no biases), no logit scaling,
  and, when `has_relative_attention_bias`, the bucket table `relative_attention_bias` [buckets, N].

  Returns (out [B, L, D], position_bias): the bias it added (float32 [1, N, L, S]; None when it had
  neither a table nor a given bias), which HF hands to the later blocks."""
  has_relative_attention_bias: bool = False
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  bidirectional: bool = True

  @nn.compact
  def __call__(self, x: Array, kv: Array | None = None, mask: Array | None = None,  # pylint: disable=arguments-differ
               deterministic: bool = True, *, position_bias: Array | None = None,
               offset: int | Array = 0) -> tuple[Array, Array | None]:
    """x: [B, L, D]; kv: [B, S, D] (cross-attention) or None; mask: bool [B|1, 1, L|1, S]."""
    if position_bias is None and self.has_relative_attention_bias:
      table = layers.Embed(self.relative_attention_num_buckets, self.num_heads, (None, "heads"),
                           param_dtype=self.param_dtype, init_std=self.init_std, name="relative_attention_bias")
      length = x.shape[1] if kv is None else kv.shape[1]
      position_bias = relative_position_bias(
          table, x.shape[1], length, bidirectional=self.bidirectional,
          num_buckets=self.relative_attention_num_buckets, max_distance=self.relative_attention_max_distance,
          offset=offset)
    out = super().__call__(x, kv, mask, deterministic, bias=position_bias)
    return out, position_bias


def _attention(c: T5Config, has_bias: bool, bidirectional: bool, dtype: Dtype, param_dtype: Dtype,
               name: str) -> T5Attention:
  """A T5Attention with HF's init (T5PreTrainedModel._init_weights): q std (d_model * d_kv)^-0.5,
  k / v d_model^-0.5, o inner_dim^-0.5, bias table d_model^-0.5, each times initializer_factor."""
  f = c.initializer_factor
  stds = (f * (c.d_model * c.d_kv) ** -0.5, f * c.d_model ** -0.5, f * c.d_model ** -0.5, f * c.inner_dim ** -0.5)
  return T5Attention(c.num_heads, c.inner_dim, names=("q", "k", "v"), out_name="o", dropout_rate=c.dropout_rate,
                     use_bias=False, dtype=dtype, param_dtype=param_dtype, init_std=f * c.d_model ** -0.5,
                     scale=1.0, init_stds=stds, has_relative_attention_bias=has_bias,
                     relative_attention_num_buckets=c.relative_attention_num_buckets,
                     relative_attention_max_distance=c.relative_attention_max_distance,
                     bidirectional=bidirectional, name=name)


class T5LayerSelfAttention(nn.Module):
  """HF `T5LayerSelfAttention`: x + dropout(SelfAttention(layer_norm(x)))."""
  config: T5Config
  has_relative_attention_bias: bool = False
  bidirectional: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array | None, position_bias: Array | None = None,
               deterministic: bool = True) -> tuple[Array, Array | None]:
    c = self.config
    h = layers.RMSNorm(c.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype, name="layer_norm")(x)
    h, position_bias = _attention(c, self.has_relative_attention_bias, self.bidirectional, self.dtype,
                                  self.param_dtype, "SelfAttention")(h, None, mask, deterministic,
                                                                     position_bias=position_bias)
    return x + layers.Dropout(c.dropout_rate, name="dropout")(h, deterministic), position_bias


class T5LayerFF(nn.Module):
  """HF `T5LayerFF`: x + dropout(DenseReluDense(layer_norm(x))); `wi -> act -> dropout -> wo`, or gated
  `act(wi_0) * wi_1 -> dropout -> wo` (HF T5DenseActDense / T5DenseGatedActDense)."""
  config: T5Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    c = self.config
    h = layers.RMSNorm(c.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype, name="layer_norm")(x)
    f = c.initializer_factor
    h = layers.Mlp(c.d_ff, c.dense_act_fn, names=("wi_0", "wi_1", "wo") if c.is_gated_act else ("wi", "wo"),
                   dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False, gated=c.is_gated_act,
                   dropout_rate=c.dropout_rate, out_dtype=jnp.float32 if c.wo_float32 else None,
                   init_stds=(f * c.d_model ** -0.5, f * c.d_ff ** -0.5), name="DenseReluDense")(h, deterministic)
    # With `wo` in float32 the sum is float32 (as torch promotes bf16 + fp32 in HF).
    return x + layers.Dropout(c.dropout_rate, name="dropout")(h, deterministic)


class T5Block(nn.Module):
  """HF `T5Block` (encoder): `layer_0` self-attention, `layer_1` FFN. Returns (x, position_bias)."""
  config: T5Config
  has_relative_attention_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array | None, position_bias: Array | None = None,
               deterministic: bool = True) -> tuple[Array, Array | None]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.constrain(x, ("batch", "length", "embed"))
    x, position_bias = T5LayerSelfAttention(self.config, self.has_relative_attention_bias, name="layer_0", **kw)(
        x, mask, position_bias, deterministic)
    x = T5LayerFF(self.config, name="layer_1", **kw)(x, deterministic)
    return layers.constrain(x, ("batch", "length", "embed")), position_bias


class T5Encoder(nn.Module):
  """HF `T5EncoderModel` / `MT5EncoderModel` (`embed_tokens=True`: the `shared` token table, fed
  `input_ids` or `inputs_embeds`) or a bare encoder `T5Stack` (`embed_tokens=False`: `inputs_embeds`
  only; UniIR CLIP-FF's `t5_layers`): dropout, `block_{i}`, `final_layer_norm`, dropout. The stack's
  params sit at the top (HF's `encoder.` key prefix is dropped, as BERT's `bert.`), so both layouts
  share one key map (`convert/t5.py` `stack_rules`).

  Returns {last_hidden_state [B, L, D], hidden_states (with `output_hidden_states`; as HF): the stack's
  input (after the embedding dropout), every block's output but the last, and last_hidden_state}."""
  config: T5Config
  embed_tokens: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids: Array | None = None, attention_mask: Array | None = None,
               inputs_embeds: Array | None = None, *, deterministic: bool = True,
               output_hidden_states: bool = False) -> dict[str, Any]:
    """input_ids [B, L] or inputs_embeds [B, L, D]; attention_mask [B, L] (1 = attend; None = everywhere)."""
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("Give exactly one of input_ids and inputs_embeds")
    if input_ids is not None:
      if not self.embed_tokens:
        raise ValueError("T5Encoder(embed_tokens=False) has no token table: give inputs_embeds")
      inputs_embeds = layers.Embed(c.vocab_size, c.d_model, ("vocab", "embed"), init_std=c.initializer_factor,
                                   name="shared", **kw)(input_ids)
    mask = layers.attention_bias_from_mask(attention_mask)
    # static_argnums counts `self` as 0: argument 4 is `deterministic`.
    block = nn.remat(T5Block, static_argnums=(4,)) if self.remat else T5Block
    h = layers.Dropout(c.dropout_rate, name="dropout")(inputs_embeds.astype(self.dtype), deterministic)
    states, position_bias = [], None
    for i in range(c.num_layers):
      states.append(h)
      h, position_bias = block(c, i == 0, name=f"block_{i}", **kw)(h, mask, position_bias, deterministic)
    h = layers.RMSNorm(c.layer_norm_epsilon, name="final_layer_norm", **kw)(h)
    out = {"last_hidden_state": layers.Dropout(c.dropout_rate, name="final_dropout")(h, deterministic)}
    if output_hidden_states:
      out["hidden_states"] = (*states, out["last_hidden_state"])
    return out


def init_params(model: T5Encoder, rng: Array, seq_len: int = 8) -> dict:
  """Initialises every param of `model` (the token table too, with `embed_tokens`) from `rng`; returns
  boxed params."""
  if model.embed_tokens:
    return model.init(rng, jnp.ones((1, seq_len), jnp.int32))["params"]
  return model.init(rng, inputs_embeds=jnp.zeros((1, seq_len, model.config.d_model), jnp.float32))["params"]
