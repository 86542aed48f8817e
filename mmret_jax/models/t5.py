"""T5 / mT5 encoder and encoder-decoder (Raffel et al. 2020; Xue et al. 2021) in Flax linen.

Mirrors Hugging Face `T5EncoderModel` / `MT5EncoderModel`, a bare encoder `T5Stack`, and
`T5ForConditionalGeneration` / `MT5ForConditionalGeneration` (mBLIP's mT0: `T5ForConditionalGeneration`
below, fed the projected visual tokens through `encode(inputs_embeds=...)`). The encoder: pre-RMSNorm
residual blocks (`T5LayerNorm`: no mean, no bias), self-attention without biases and without logit
scaling (T5 folds it into the q init), a bucketed relative position bias owned by block 0 and shared
by every block, a ReLU (T5) or gated-GELU-tanh (T5 v1.1 / mT5, `gated-gelu` -> `gelu_new`) FFN, a
final RMSNorm, and dropout on the embeddings, on each sub-layer's output, inside the FFN, on the
attention probabilities and after the final norm. UniIR's CLIP-FF fuses CLIP tokens with a bare
2-layer `T5Stack` (`inputs_embeds`, no mask): `T5Encoder(config, embed_tokens=False)`.

The decoder (`T5Decoder`) reuses the sub-layers: causal self-attention with its own relative bias table in
block 0 (unidirectional buckets), cross-attention `EncDecAttention` over the encoder states at `layer_1`
(no bias, the encoder's padding mask), the FFN at `layer_2`, a final RMSNorm. The LM head: the decoder
output, times d_model^-0.5 when `scales_decoder_outputs` (T5 v1.0), against the `shared` table
(`tie_word_embeddings`) or an own `lm_head` [D, V]; logits float32 [B, T, V].

Generation: `init_cache` preallocates every attention cache (`layers` module docstring) for T decoder
positions; `decode_step` runs T' new positions [B, T'] through it (the first step is given the encoder
states, which fill the cross-attention caches; later steps reuse them). Block 0's relative bias for a
cached step puts its queries at the cache index (`layers.cache_position`).

Param paths mirror HF keys with `.` -> `/` and `block.{i}` -> `block_{i}`: `block_{i}/layer_0/
SelfAttention/{q,k,v,o}/kernel`, `block_0/layer_0/SelfAttention/relative_attention_bias/embedding`,
`block_{i}/layer_{0,1}/layer_norm/scale`, `block_{i}/layer_1/DenseReluDense/{wi|wi_0,wi_1},wo/kernel`,
`final_layer_norm/scale`, and `shared/embedding` with `embed_tokens` (HF's `encoder.` prefix dropped;
see `mmret_jax/convert/t5.py`). `T5ForConditionalGeneration` keeps HF's layout: `shared/embedding`,
`encoder/...` (as above), `decoder/block_{i}/layer_1/EncDecAttention/{q,k,v,o}/kernel`,
`decoder/block_{i}/layer_2/DenseReluDense/...`, `decoder/final_layer_norm/scale`, `lm_head/kernel` [D, V].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmret_jax import losses
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
  # The LM head is the `shared` table (True) or an own `lm_head` (mT5 / T5 v1.1 / Flan-T5 checkpoints: False).
  tie_word_embeddings: bool = True
  # Decoder output times d_model^-0.5 before the LM head. None: `tie_word_embeddings` for t5 (HF 4 and 5:
  # T5 v1.0 scales, v1.1 does not), False for mt5 (HF 5 `MT5ForConditionalGeneration` never scales; every
  # released mT5 / mT0 is untied, where HF 4 agrees). HF 5 writes it to config.json for t5.
  scale_decoder_outputs: bool | None = None
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
    """From an HF config dict; a missing field takes `T5Config()`'s or `MT5Config()`'s default.
    `scale_decoder_outputs` is kept only where it departs from the rule (transformers 5 writes it for t5)."""
    mt = d.get("model_type", "t5")
    base = MT5_DEFAULTS if mt == "mt5" else {}
    config = cls(**{**base, **layers.fields_from_hf(cls, d), "model_type": mt})
    rule = dataclasses.replace(config, scale_decoder_outputs=None).scales_decoder_outputs
    return dataclasses.replace(config, scale_decoder_outputs=None) if config.scales_decoder_outputs == rule else config

  def to_dict(self) -> dict[str, Any]:
    """HF config fields (the runtime-only `wo_float32` left out; `scale_decoder_outputs` only when set)."""
    d = dataclasses.asdict(self)
    d.pop("wo_float32")
    if d["scale_decoder_outputs"] is None:
      d.pop("scale_decoder_outputs")
    return d

  @property
  def decoder_layers(self) -> int:
    return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

  @property
  def scales_decoder_outputs(self) -> bool:
    """Whether the decoder output is multiplied by d_model^-0.5 before the LM head (see the field)."""
    if self.scale_decoder_outputs is not None:
      return self.scale_decoder_outputs
    return self.tie_word_embeddings and self.model_type == "t5"

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
MT5_DEFAULTS = dict(vocab_size=250112, d_ff=1024, num_layers=8, num_heads=6, feed_forward_proj="gated-gelu",
                    tie_word_embeddings=False)

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
               offset: int | Array = 0, decode: bool = False) -> tuple[Array, Array | None]:
    """x: [B, L, D]; kv: [B, S, D] (cross-attention) or None; mask: bool [B|1, 1, L|1, S]. `decode`: through
    the cache (`layers.Attention`); the bias then spans the cache and its queries start at the cache index."""
    if position_bias is None and self.has_relative_attention_bias:
      table = layers.Embed(self.relative_attention_num_buckets, self.num_heads, (None, "heads"),
                           param_dtype=self.param_dtype, init_std=self.init_std, name="relative_attention_bias")
      length = x.shape[1] if kv is None else kv.shape[1]
      cached = layers.cache_position(self) if decode and kv is None else None
      if cached is not None:
        offset, length = cached
      position_bias = relative_position_bias(
          table, x.shape[1], length, bidirectional=self.bidirectional,
          num_buckets=self.relative_attention_num_buckets, max_distance=self.relative_attention_max_distance,
          offset=offset)
    out = super().__call__(x, kv, mask, deterministic, bias=position_bias, decode=decode)
    return out, position_bias


def _attention(c: T5Config, has_bias: bool, bidirectional: bool, dtype: Dtype, param_dtype: Dtype,
               name: str, cross: bool = False) -> T5Attention:
  """A T5Attention with HF's init (T5PreTrainedModel._init_weights): q std (d_model * d_kv)^-0.5,
  k / v d_model^-0.5, o inner_dim^-0.5, bias table d_model^-0.5, each times initializer_factor."""
  f = c.initializer_factor
  stds = (f * (c.d_model * c.d_kv) ** -0.5, f * c.d_model ** -0.5, f * c.d_model ** -0.5, f * c.inner_dim ** -0.5)
  return T5Attention(c.num_heads, c.inner_dim, names=("q", "k", "v"), out_name="o", dropout_rate=c.dropout_rate,
                     use_bias=False, dtype=dtype, param_dtype=param_dtype, init_std=f * c.d_model ** -0.5,
                     scale=1.0, init_stds=stds, has_relative_attention_bias=has_bias,
                     relative_attention_num_buckets=c.relative_attention_num_buckets,
                     relative_attention_max_distance=c.relative_attention_max_distance,
                     bidirectional=bidirectional, cross_attention=cross, name=name)


class T5LayerSelfAttention(nn.Module):
  """HF `T5LayerSelfAttention`: x + dropout(SelfAttention(layer_norm(x)))."""
  config: T5Config
  has_relative_attention_bias: bool = False
  bidirectional: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array | None, position_bias: Array | None = None,
               deterministic: bool = True, decode: bool = False) -> tuple[Array, Array | None]:
    c = self.config
    h = layers.RMSNorm(c.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype, name="layer_norm")(x)
    h, position_bias = _attention(c, self.has_relative_attention_bias, self.bidirectional, self.dtype,
                                  self.param_dtype, "SelfAttention")(h, None, mask, deterministic,
                                                                     position_bias=position_bias, decode=decode)
    return x + layers.Dropout(c.dropout_rate, name="dropout")(h, deterministic), position_bias


class T5LayerCrossAttention(nn.Module):
  """HF `T5LayerCrossAttention`: x + dropout(EncDecAttention(layer_norm(x), encoder states)); no position
  bias (HF adds zeros). `kv` None with `decode`: the encoder keys / values cached by an earlier step."""
  config: T5Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, kv: Array | None, mask: Array | None, deterministic: bool = True,
               decode: bool = False) -> Array:
    c = self.config
    h = layers.RMSNorm(c.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype, name="layer_norm")(x)
    h, _ = _attention(c, False, True, self.dtype, self.param_dtype, "EncDecAttention", cross=True)(
        h, kv, mask, deterministic, decode=decode)
    return x + layers.Dropout(c.dropout_rate, name="dropout")(h, deterministic)


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
  """HF `T5Block`: `layer_0` self-attention, `layer_1` FFN (encoder); with `is_decoder`, `layer_0` causal
  self-attention, `layer_1` cross-attention over `encoder_hidden_states` [B, S, D] (mask bool [B, 1, 1, S]),
  `layer_2` FFN. Returns (x, position_bias)."""
  config: T5Config
  has_relative_attention_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  is_decoder: bool = False

  @nn.compact
  def __call__(self, x: Array, mask: Array | None, position_bias: Array | None = None, deterministic: bool = True,
               encoder_hidden_states: Array | None = None, encoder_mask: Array | None = None,
               decode: bool = False) -> tuple[Array, Array | None]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.constrain(x, ("batch", "length", "embed"))
    x, position_bias = T5LayerSelfAttention(self.config, self.has_relative_attention_bias, not self.is_decoder,
                                            name="layer_0", **kw)(x, mask, position_bias, deterministic, decode)
    if self.is_decoder:
      x = T5LayerCrossAttention(self.config, name="layer_1", **kw)(x, encoder_hidden_states, encoder_mask,
                                                                   deterministic, decode)
    x = T5LayerFF(self.config, name=f"layer_{1 + self.is_decoder}", **kw)(x, deterministic)
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


class T5Decoder(nn.Module):
  """HF `T5Stack` as the decoder (no token table: `inputs_embeds`): dropout, `block_{i}` (causal self-attention,
  cross-attention, FFN; block 0 owns the unidirectional relative bias), `final_layer_norm`, dropout.
  `decode`: the attention caches (`decode_step`); `encoder_hidden_states` may then be None (cached)."""
  config: T5Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, inputs_embeds: Array, encoder_hidden_states: Array | None = None,
               encoder_attention_mask: Array | None = None, deterministic: bool = True,
               decode: bool = False) -> Array:
    """inputs_embeds [B, T, D]; encoder_hidden_states [B, S, D]; encoder_attention_mask [B, S] (1 = attend)
    -> [B, T, D]."""
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if encoder_hidden_states is None and not decode:
      raise ValueError("The T5 decoder needs encoder_hidden_states (None only for cached decoding steps)")
    # With `decode` the causal mask spans the cache and is built by the attention itself.
    mask = None if decode else layers.attention_bias_from_mask(None, causal_length=inputs_embeds.shape[1])
    enc_mask = layers.attention_bias_from_mask(encoder_attention_mask)
    # static_argnums counts `self` as 0: 4 is `deterministic`, 7 `decode`.
    block = nn.remat(T5Block, static_argnums=(4, 7)) if self.remat else T5Block
    h = layers.Dropout(c.dropout_rate, name="dropout")(inputs_embeds.astype(self.dtype), deterministic)
    position_bias = None
    for i in range(c.decoder_layers):
      h, position_bias = block(c, i == 0, is_decoder=True, name=f"block_{i}", **kw)(
          h, mask, position_bias, deterministic, encoder_hidden_states, enc_mask, decode)
    h = layers.RMSNorm(c.layer_norm_epsilon, name="final_layer_norm", **kw)(h)
    return layers.Dropout(c.dropout_rate, name="final_dropout")(h, deterministic)


def shift_right(labels: Array, decoder_start_token_id: int = 0, pad_token_id: int = 0) -> Array:
  """HF `_shift_right`: [B, T] labels -> decoder inputs [start, labels[:, :-1]], with -100 -> pad."""
  shifted = jnp.concatenate([jnp.full_like(labels[:, :1], decoder_start_token_id), labels[:, :-1]], axis=1)
  return jnp.where(shifted == -100, pad_token_id, shifted)


class T5ForConditionalGeneration(nn.Module):
  """HF `T5ForConditionalGeneration` / `MT5ForConditionalGeneration`: `shared` token table, `encoder`
  (`T5Encoder` without its own table), `decoder` (`T5Decoder`), LM head (`shared` when
  `tie_word_embeddings`, else `lm_head`). `encode` and `decode` are the two halves (`apply(..., method=)`);
  `__call__` runs both, and the loss with `labels`."""
  config: T5Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.shared = layers.Embed(c.vocab_size, c.d_model, ("vocab", "embed"), init_std=c.initializer_factor, **kw)
    self.encoder = T5Encoder(c, embed_tokens=False, remat=self.remat, **kw)
    self.decoder = T5Decoder(c, remat=self.remat, **kw)
    if not c.tie_word_embeddings:  # HF init: normal(initializer_factor)
      self.lm_head = layers.Dense(c.vocab_size, ("embed", "vocab"), use_bias=False, init_std=c.initializer_factor,
                                  **kw)

  def encode(self, input_ids: Array | None = None, attention_mask: Array | None = None,
             inputs_embeds: Array | None = None, *, deterministic: bool = True) -> Array:
    """input_ids [B, S] or inputs_embeds [B, S, D] (e.g. mBLIP's visual tokens before the prompt's);
    attention_mask [B, S] (1 = attend) -> encoder states [B, S, D]."""
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("Give exactly one of input_ids and inputs_embeds")
    if input_ids is not None:
      inputs_embeds = self.shared(input_ids)
    return self.encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                        deterministic=deterministic)["last_hidden_state"]

  def decode(self, decoder_input_ids: Array, encoder_hidden_states: Array | None = None,
             encoder_attention_mask: Array | None = None, *, deterministic: bool = True,
             decode: bool = False) -> Array:
    """decoder_input_ids [B, T]; encoder_hidden_states [B, S, D]; encoder_attention_mask [B, S] -> float32
    logits [B, T, V]. `decode`: a cached step (`decode_step`)."""
    c = self.config
    h = self.decoder(self.shared(decoder_input_ids), encoder_hidden_states, encoder_attention_mask, deterministic,
                     decode)
    if c.scales_decoder_outputs:  # HF: sequence_output * model_dim ** -0.5 (T5 v1.0)
      h = h * c.d_model ** -0.5
    if c.tie_word_embeddings:
      return self.shared.attend(h)
    return self.lm_head(h).astype(jnp.float32)

  def __call__(self, input_ids: Array | None = None, attention_mask: Array | None = None,
               decoder_input_ids: Array | None = None, labels: Array | None = None, *,
               inputs_embeds: Array | None = None, deterministic: bool = True) -> dict[str, Array]:
    """Encoder inputs as `encode`; decoder_input_ids [B, T] (default: `shift_right(labels)`); labels [B, T]
    (-100 = ignored) -> {logits float32 [B, T, V], encoder_last_hidden_state [B, S, D], loss (with labels:
    mean cross-entropy over the labelled tokens, as HF)}."""
    c = self.config
    if decoder_input_ids is None:
      if labels is None:
        raise ValueError("Give decoder_input_ids or labels")
      decoder_input_ids = shift_right(labels, c.decoder_start_token_id, c.pad_token_id)
    enc = self.encode(input_ids, attention_mask, inputs_embeds, deterministic=deterministic)
    logits = self.decode(decoder_input_ids, enc, attention_mask, deterministic=deterministic)
    out = {"logits": logits, "encoder_last_hidden_state": enc}
    if labels is not None:
      out["loss"] = losses.masked_lm_loss(logits, labels)
    return out


def init_cache(model: T5ForConditionalGeneration, batch_size: int, max_length: int) -> dict:
  """An empty decoding cache (zeros, index 0) for `max_length` decoder positions: {"decoder": {"block_{i}":
  {"layer_0": {"SelfAttention": {cached_key, cached_value [B, max_length, N, H], cache_index}}}}}. The
  cross-attention entries (`layer_1/EncDecAttention`) join it on the first `decode_step`, which is given the
  encoder states. Shapes only: nothing is computed."""
  def create():
    ids = jnp.zeros((batch_size, max_length), jnp.int32)
    enc = jnp.zeros((batch_size, 1, model.config.d_model), model.dtype)
    return model.init(jax.random.PRNGKey(0), ids, enc, decode=True, method="decode")
  shapes = jax.eval_shape(create)[layers.CACHE]
  blocks = {name: {"layer_0": block["layer_0"]} for name, block in shapes["decoder"].items()}
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), {"decoder": blocks})


def decode_step(model: T5ForConditionalGeneration, params: dict, cache: dict, decoder_input_ids: Array,
                encoder_attention_mask: Array | None, encoder_hidden_states: Array | None = None
                ) -> tuple[Array, dict]:
  """decoder_input_ids [B, T'] at the next T' positions -> (float32 logits [B, T', V], the updated cache).
  Give encoder_hidden_states [B, S, D] on the first step (they fill the cross-attention caches); later steps
  reuse the cached encoder keys / values. encoder_attention_mask [B, S] on every step."""
  logits, variables = model.apply({"params": params, layers.CACHE: cache}, decoder_input_ids, encoder_hidden_states,
                                  encoder_attention_mask, decode=True, method="decode",
                                  mutable=[layers.CACHE])
  return logits, variables[layers.CACHE]


def init_params(model: T5Encoder | T5ForConditionalGeneration, rng: Array, seq_len: int = 8) -> dict:
  """Initialises every param of `model` (the token table too, with `embed_tokens`) from `rng`; returns
  boxed params."""
  if isinstance(model, T5ForConditionalGeneration):
    ids = jnp.ones((1, seq_len), jnp.int32)
    return model.init(rng, ids, decoder_input_ids=ids)["params"]
  if model.embed_tokens:
    return model.init(rng, jnp.ones((1, seq_len), jnp.int32))["params"]
  return model.init(rng, inputs_embeds=jnp.zeros((1, seq_len, model.config.d_model), jnp.float32))["params"]
