"""BLOOM / BLOOMZ decoder (BigScience 2022; Muennighoff et al. 2023) in Flax linen: mBLIP's decoder-only LLM.

Mirrors Hugging Face `BloomModel` and `BloomForCausalLM` (the forward pass, and cached decoding):
  x = word_embeddings_layernorm(inputs_embeds)       # also for given inputs_embeds (mBLIP's visual prefix)
  per block h_{i}:  a = input_layernorm(x);  x = r(a, x) + dense(attention(query_key_value(a)))
                    m = post_attention_layernorm(x);  x = r(m, x) + dense_4h_to_h(gelu_tanh(dense_h_to_4h(m)))
  logits = ln_f(x) @ word_embeddings^T                 # lm_head tied to the token table (no own param)
with r(n, x) = n when `apply_residual_connection_post_layernorm`, else x. Attention is causal, scaled by
H^-0.5, with the ALiBi bias slope_n * position(key) added to the logits, the key position counted over the
attention mask (cumsum - 1, 0 on padding), so a left-padded row gets the positions of an unpadded one
(HF `build_alibi_tensor`; mBLIP pads BLOOM batches on the left).

Shapes: input_ids / attention_mask [B, L], inputs_embeds [B, L, D], logits float32 [B, L, V]; D =
hidden_size, N = n_head, H = D / N, F = 4D. `query_key_value` projects to [B, L, 3D] in BLOOM's head-major
layout [N, 3, H] (q, k, v of head n are columns n*3H + {0, H, 2H} + [0, H)).

Param paths mirror HF keys with `.` -> `/` and `h.{i}` -> `h_{i}`, HF's `transformer.` prefix dropped:
`word_embeddings/embedding`, `word_embeddings_layernorm/{scale,bias}`, `h_{i}/{input_layernorm,
post_attention_layernorm}/{scale,bias}`, `h_{i}/self_attention/{query_key_value,dense}/{kernel,bias}`,
`h_{i}/mlp/{dense_h_to_4h,dense_4h_to_h}/{kernel,bias}`, `ln_f/{scale,bias}` (`mmret_jax/convert/bloom.py`).

Generation (`decode=True`, flax `examples/lm1b` style; `layers` module docstring): `init_cache` preallocates
every block's key / value cache for S positions; `decode_step` runs L new positions (a prefill of the whole
prompt, e.g. mBLIP's prefix + left-padded text, then one token per step) with the attention mask over all S
cache positions [B, S]: the prompt's mask, then 1 for every generated position (HF appends a 1 per step).
ALiBi and the key padding come from that mask; positions not yet written are hidden by the cache's causal
mask, and a key's ALiBi position (a prefix count of the mask) does not depend on later entries, so one mask
serves every step.

Local pieces not in `layers.py`: the fused head-major qkv split and the ALiBi bias (both BLOOM-only); the
attention itself is `layers.dot_product_attention` with `bias` and `scale`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmret_jax import losses
from mmret_jax.models import layers

Array = jax.Array
Dtype = Any
MODEL_TYPES = ("bloom",)
# HF BloomConfig accepts these alternative names (`n_embed` in __post_init__, the others via attribute_map).
ALIASES = {"n_embed": "hidden_size", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head"}


@dataclasses.dataclass(frozen=True)
class BloomConfig:
  """HF `BloomConfig` fields (names match config.json); defaults are `BloomConfig()`'s."""
  vocab_size: int = 250880
  hidden_size: int = 64
  n_layer: int = 2
  n_head: int = 8
  layer_norm_epsilon: float = 1e-5
  initializer_range: float = 0.02
  apply_residual_connection_post_layernorm: bool = False
  hidden_dropout: float = 0.0
  attention_dropout: float = 0.0
  # Megatron tensor-parallel degree of pretraining; only with slow_but_exact does HF split the output
  # projections into tp slices, which changes rounding, not the math: we run one matmul either way.
  pretraining_tp: int = 1
  slow_but_exact: bool = False
  tie_word_embeddings: bool = True
  bos_token_id: int | None = 1
  eos_token_id: int | None = 2
  pad_token_id: int | None = None
  model_type: str = "bloom"

  def __post_init__(self):
    if self.model_type not in MODEL_TYPES:
      raise ValueError(f"Not a BLOOM config: model_type={self.model_type!r}")
    if self.hidden_size % self.n_head:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of n_head {self.n_head}")
    if not self.tie_word_embeddings:
      raise ValueError("tie_word_embeddings=False: only BLOOM's tied LM head (lm_head = word_embeddings) "
                       "is supported")

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "BloomConfig":
    """From an HF config dict; `n_embed` / `num_hidden_layers` / `num_attention_heads` are read as HF does
    (an alias that disagrees with its canonical field is an error)."""
    d = dict(d)
    for alias, name in ALIASES.items():
      if d.get(alias) is None:
        continue
      if d.get(name) is not None and d[name] != d[alias]:
        raise ValueError(f"BLOOM config sets {alias}={d[alias]} and {name}={d[name]}")
      d[name] = d[alias]
    if isinstance(d.get("eos_token_id"), list):
      raise ValueError(f"eos_token_id must be one id, got {d['eos_token_id']}")
    return cls(**{**layers.fields_from_hf(cls, d), "model_type": d.get("model_type", "bloom")})

  def to_dict(self) -> dict[str, Any]:
    """HF config fields (canonical names: hidden_size, n_layer, n_head)."""
    return dataclasses.asdict(self)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.n_head

  @property
  def num_hidden_layers(self) -> int:
    return self.n_layer

  @property
  def num_attention_heads(self) -> int:
    return self.n_head


PRESETS = {
    # bigscience/bloomz-7b1 (mBLIP's BLOOMZ LLM) and bigscience/bloomz-560m (same family, small).
    "bloomz-7b1": BloomConfig(vocab_size=250880, hidden_size=4096, n_layer=30, n_head=32, pad_token_id=3,
                              pretraining_tp=4),
    "bloomz-560m": BloomConfig(vocab_size=250880, hidden_size=1024, n_layer=24, n_head=16, pad_token_id=3),
}


# ----------------------------------------------------------------------------- ALiBi

def alibi_slopes(num_heads: int) -> np.ndarray:
  """float32 [N] ALiBi slopes (Press et al. 2022; HF `_get_alibi_slopes`). With P the largest power of two
  <= N: 2^(-8k/P) for k = 1..P, then, for N > P, the odd terms 2^(-8k/2P), k = 1, 3, .., of the 2P series."""
  p = 2 ** int(math.floor(math.log2(num_heads)))
  slopes = [2.0 ** (-8.0 * k / p) for k in range(1, p + 1)]
  slopes += [2.0 ** (-8.0 * k / (2 * p)) for k in range(1, 1 + 2 * min(p, num_heads - p), 2)]
  return np.asarray(slopes, np.float32)


def alibi_bias(attention_mask: Array, num_heads: int) -> Array:
  """attention mask [B, S] (1 = token) -> float32 ALiBi logit bias [B, N, 1, S]: slope_n * the key's
  position among the row's tokens ((cumsum - 1) * mask, as HF `build_alibi_tensor`). Adding a per-query
  constant leaves softmax unchanged, so only the key position matters."""
  mask = attention_mask.astype(jnp.int32)
  positions = ((jnp.cumsum(mask, axis=-1) - 1) * mask).astype(jnp.float32)
  return jnp.asarray(alibi_slopes(num_heads))[None, :, None, None] * positions[:, None, None, :]


# ----------------------------------------------------------------------------- modules

class BloomAttention(nn.Module):
  """HF `BloomAttention` without its residual: `query_key_value` [D, 3D] (head-major [N, 3, H] columns),
  causal + padding mask, ALiBi bias, softmax in float32, `dense` [D, D]. [B, L, D] -> [B, L, D]."""
  config: BloomConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array, alibi: Array, deterministic: bool = True, decode: bool = False) -> Array:
    """x [B, L, D]; mask bool [B, 1, L, L]; alibi float32 [B, N, 1, L]. `decode`: through the key / value cache
    (S positions); mask [B, 1, 1, S] (key padding; the causal part is the cache's) and alibi [B, N, 1, S]."""
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, init_std=c.initializer_range)
    qkv = layers.Dense(3 * c.hidden_size, ("embed", "heads"), name="query_key_value", **kw)(x)
    q, k, v = einops.rearrange(qkv, "b l (n t h) -> t b l n h", n=c.n_head, t=3)
    if decode:
      cached = layers.cache_position(self)
      if cached is not None and mask.shape[-1] != cached[1]:
        raise ValueError(f"decode: attention_mask spans {mask.shape[-1]} positions, the cache {cached[1]}; give the "
                         "mask over every cache position (the prompt's, then 1 per generated token)")
      k, v, causal = layers.self_attention_cache(self, k, v)
      mask = jnp.logical_and(mask, causal)
    rng = self.make_rng("dropout") if c.attention_dropout > 0 and not deterministic else None
    out = layers.dot_product_attention(q, k, v, mask, dropout_rate=c.attention_dropout, dropout_rng=rng,
                                       bias=alibi, scale=c.head_dim ** -0.5)
    return layers.Dense(c.hidden_size, ("heads", "embed"), name="dense", **kw)(layers.merge_heads(out))


class BloomBlock(nn.Module):
  """HF `BloomBlock`: pre-LN attention and MLP sub-blocks, dropout before each residual add; the residual
  is the LayerNorm output with `apply_residual_connection_post_layernorm`. [B, L, D] -> [B, L, D]."""
  config: BloomConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array, alibi: Array, deterministic: bool = True, decode: bool = False) -> Array:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    post_ln = c.apply_residual_connection_post_layernorm
    x = layers.constrain(x, ("batch", "length", "embed"))
    a = layers.LayerNorm(c.layer_norm_epsilon, name="input_layernorm", **kw)(x)
    h = BloomAttention(c, name="self_attention", **kw)(a, mask, alibi, deterministic, decode)
    x = (a if post_ln else x) + layers.Dropout(c.hidden_dropout, name="attention_dropout")(h, deterministic)
    m = layers.LayerNorm(c.layer_norm_epsilon, name="post_attention_layernorm", **kw)(x)
    # HF BloomGelu is the tanh approximation (`gelu_new`).
    h = layers.Mlp(4 * c.hidden_size, "gelu_new", names=("dense_h_to_4h", "dense_4h_to_h"),
                   init_std=c.initializer_range, name="mlp", **kw)(m, deterministic)
    x = (m if post_ln else x) + layers.Dropout(c.hidden_dropout, name="mlp_dropout")(h, deterministic)
    return layers.constrain(x, ("batch", "length", "embed"))


class BloomModel(nn.Module):
  """HF `BloomModel`: `word_embeddings`, `word_embeddings_layernorm`, blocks `h_{i}`, `ln_f`.

  Returns {last_hidden_state [B, L, D] (after ln_f), hidden_states (with `output_hidden_states`; as HF):
  every block's input, the first being the embedding LayerNorm's output, then last_hidden_state}."""
  config: BloomConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.word_embeddings = layers.Embed(c.vocab_size, c.hidden_size, ("vocab", "embed"),
                                        init_std=c.initializer_range, **kw)
    self.word_embeddings_layernorm = layers.LayerNorm(c.layer_norm_epsilon, **kw)
    # static_argnums counts `self` as 0: argument 4 is `deterministic`, 5 `decode`.
    block = nn.remat(BloomBlock, static_argnums=(4, 5)) if self.remat else BloomBlock
    self.h = [block(c, **kw) for _ in range(c.n_layer)]  # named h_0, h_1, ...
    self.ln_f = layers.LayerNorm(c.layer_norm_epsilon, **kw)

  def embed(self, input_ids: Array) -> Array:
    """Token embeddings [B, L] -> [B, L, D] before `word_embeddings_layernorm` (what HF's `inputs_embeds`
    holds): mBLIP concatenates its projected visual prefix with these."""
    return self.word_embeddings(input_ids)

  def __call__(self, input_ids: Array | None = None, attention_mask: Array | None = None,
               inputs_embeds: Array | None = None, *, deterministic: bool = True,
               output_hidden_states: bool = False, decode: bool = False) -> dict[str, Any]:
    """input_ids [B, L] or inputs_embeds [B, L, D]; attention_mask [B, L] (1 = token, None = all ones).
    `decode`: L new positions through the cache (`decode_step`); attention_mask [B, S] then spans the cache."""
    c = self.config
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("Give exactly one of input_ids and inputs_embeds")
    if input_ids is not None:
      if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {input_ids.shape}")
      inputs_embeds = self.embed(input_ids)
    if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != c.hidden_size:
      raise ValueError(f"inputs_embeds must be [B, L, {c.hidden_size}], got shape {inputs_embeds.shape}")
    b, length = inputs_embeds.shape[:2]
    if attention_mask is None and not decode:
      attention_mask = jnp.ones((b, length), jnp.int32)
    if decode and (attention_mask is None or attention_mask.ndim != 2 or attention_mask.shape[0] != b
                   or attention_mask.shape[1] < length):
      shape = None if attention_mask is None else attention_mask.shape
      raise ValueError(f"decode: attention_mask must be [B, S] over the cache positions (B = {b}, S >= {length}), "
                       f"got {shape}")
    if not decode and attention_mask.shape != (b, length):
      raise ValueError(f"attention_mask must be [B, L] = {(b, length)}, got shape {attention_mask.shape}")
    alibi = alibi_bias(attention_mask, c.n_head)
    if decode:  # key padding [B, 1, 1, S]; the causal part comes from each block's cache
      mask = layers.attention_bias_from_mask(attention_mask)
    else:
      mask = layers.attention_bias_from_mask(attention_mask, causal_length=length)  # [B, 1, L, L]
    h = self.word_embeddings_layernorm(inputs_embeds.astype(self.dtype))
    states = []
    for block in self.h:
      states.append(h)
      h = block(h, mask, alibi, deterministic, decode)
    h = self.ln_f(h)
    out = {"last_hidden_state": h}
    if output_hidden_states:
      out["hidden_states"] = (*states, h)
    return out


class BloomForCausalLM(BloomModel):
  """HF `BloomForCausalLM`: `BloomModel` plus the LM head tied to `word_embeddings` (no param of its own).

  Returns BloomModel's dict plus logits float32 [B, L, V] (the matmul in `dtype`)."""

  def __call__(self, input_ids: Array | None = None, attention_mask: Array | None = None,
               inputs_embeds: Array | None = None, *, deterministic: bool = True,
               output_hidden_states: bool = False, decode: bool = False) -> dict[str, Any]:
    out = super().__call__(input_ids, attention_mask, inputs_embeds, deterministic=deterministic,
                           output_hidden_states=output_hidden_states, decode=decode)
    return {**out, "logits": self.word_embeddings.attend(out["last_hidden_state"])}


def causal_lm_loss(logits: Array, labels: Array, ignore_index: int = -100) -> Array:
  """HF `ForCausalLMLoss`: mean float32 cross-entropy of logits[:, t] against labels[:, t + 1] over labels
  != ignore_index. logits [B, L, V], labels [B, L] -> scalar (0 where nothing is labelled; HF gives NaN)."""
  if logits.shape[:2] != labels.shape:
    raise ValueError(f"labels {labels.shape} do not match logits {logits.shape[:2]}")
  return losses.masked_lm_loss(logits[:, :-1], labels[:, 1:], ignore_index)


def init_cache(model: BloomModel, batch_size: int, max_length: int) -> dict:
  """An empty decoding cache (zeros, index 0) for `max_length` positions (prompt + generated tokens):
  {"h_{i}": {"self_attention": {cached_key, cached_value [B, max_length, N, H], cache_index}}}. Shapes only:
  nothing is computed."""
  def create():
    ids = jnp.zeros((batch_size, max_length), jnp.int32)
    return model.init(jax.random.PRNGKey(0), ids, jnp.ones_like(ids), decode=True)
  shapes = jax.eval_shape(create)[layers.CACHE]
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def decode_step(model: BloomForCausalLM, params: dict, cache: dict, attention_mask: Array,
                input_ids: Array | None = None, inputs_embeds: Array | None = None) -> tuple[Array, dict]:
  """input_ids [B, L] or inputs_embeds [B, L, D] at the next L cache positions -> (float32 logits [B, L, V], the
  updated cache). attention_mask [B, S] spans every cache position (module docstring): the prompt's mask (left
  padding allowed), then 1 for each generated token (positions not yet written may hold anything)."""
  out, variables = model.apply({"params": params, layers.CACHE: cache}, input_ids, attention_mask, inputs_embeds,
                               decode=True, mutable=[layers.CACHE])
  return out["logits"], variables[layers.CACHE]


def init_params(model: BloomModel, rng: Array, seq_len: int = 8) -> dict:
  """Initialises every param of `model` from `rng`; returns boxed params."""
  return model.init(rng, jnp.ones((1, seq_len), jnp.int32))["params"]
