"""BERT and RoBERTa encoders (Devlin et al. 2019; Liu et al. 2019) in Flax linen.

Mirrors Hugging Face `BertModel` / `RobertaModel` (post-LN blocks, exact GELU,
absolute positions; RoBERTa's position ids start after `pad_token_id`), with
optional heads: the pooler (`pooler/dense` + tanh), the MLM head (BERT
`cls/predictions`, RoBERTa `lm_head`, decoder tied to the word embeddings), and
the SimCSE / BLaIR training head `mlp/dense` + tanh. A layer's cross-attention
sub-block (BLIP text encoder, BagFormer) is the `add_cross_attention` flag; it runs only when
encoder states are given (BLIP's "multimodal" mode; without them, its "text" mode).
`type_vocab_size=0` leaves out the token-type table (BLIP).

ALBEF's split encoder (`xbert`, used by BagFormer): with `fusion_layer` = F set, only layers >= F own
a cross-attention block, and `mode` picks the layers that run: "multi_modal" all of them, "text"
[0, F) on the embeddings of the ids, "fusion" [F, N) on given states `encoder_embeds` [B, L, D]
(cross-attending `encoder_hidden_states`), "embeddings" none (the embedding output alone).

Param paths mirror HF state-dict keys with `.` -> `/` and `encoder/layer/{i}`
-> `encoder/layer_{i}` (see `mmret_jax/convert/bert.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmret_jax.models import layers

Array = jax.Array
Dtype = Any


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """HF `BertConfig` / `RobertaConfig` fields (names match config.json)."""
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  pad_token_id: int = 0
  model_type: str = "bert"
  position_embedding_type: str = "absolute"
  is_decoder: bool = False  # causal self-attention (BLIP text decoder / HF decoder mode)
  add_cross_attention: bool = False
  encoder_width: int | None = None  # width of cross-attended states (BLIP); None = hidden_size
  # ALBEF / BagFormer (xbert): the first layer with cross-attention; "text" mode runs the layers before
  # it, "fusion" mode the rest. None = every layer has cross-attention when add_cross_attention (BLIP).
  fusion_layer: int | None = None
  # Not model properties (never exported): the attention kernel (layers.dot_product_attention) and
  # the residual + LayerNorm kernels (layers.ResidualPostLN).
  attention_impl: str = "auto"
  norm_impl: str = "xla"

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "BertConfig":
    """Builds from an HF config dict, ignoring fields we do not model; rejects unsupported ones."""
    mt = d.get("model_type", "bert")
    if mt not in ("bert", "roberta", "xlm-roberta"):
      raise ValueError(f"Not a BERT-family config: model_type={mt!r}")
    pet = d.get("position_embedding_type", "absolute")
    if pet != "absolute":
      raise ValueError(f"position_embedding_type={pet!r} is not supported (only 'absolute')")
    kw = layers.fields_from_hf(cls, d)
    kw["model_type"] = mt
    return cls(**kw)

  def __post_init__(self):
    f = self.fusion_layer
    if f is not None and not 0 <= f <= self.num_hidden_layers:
      raise ValueError(f"fusion_layer {f} is outside [0, num_hidden_layers={self.num_hidden_layers}]")

  def to_dict(self) -> dict[str, Any]:
    """HF config fields (the runtime-only `attention_impl`, `norm_impl` left out; `fusion_layer` only
    when set, as ALBEF's config json)."""
    d = dataclasses.asdict(self)
    d.pop("attention_impl")
    d.pop("norm_impl")
    if d["fusion_layer"] is None:
      d.pop("fusion_layer")
    return d

  def has_cross_attention(self, layer: int) -> bool:
    """Whether layer `layer` owns a cross-attention block (xbert: `layer_num >= fusion_layer`)."""
    return self.add_cross_attention and (self.fusion_layer is None or layer >= self.fusion_layer)

  def layer_range(self, mode: str) -> tuple[int, int]:
    """[start, stop) of the layers a `BertModel` mode runs."""
    n = self.num_hidden_layers
    if mode == "multi_modal":
      return 0, n
    if mode == "embeddings":
      return 0, 0
    if mode not in ("text", "fusion"):
      raise ValueError(f"mode {mode!r} is not one of multi_modal, text, fusion, embeddings")
    if self.fusion_layer is None:
      raise ValueError(f"mode {mode!r} needs config.fusion_layer (ALBEF's split encoder); it is None")
    return (0, self.fusion_layer) if mode == "text" else (self.fusion_layer, n)

  @property
  def is_roberta(self) -> bool:
    return self.model_type in ("roberta", "xlm-roberta")


PRESETS = {
    "bert-base": BertConfig(),
    "bert-large": BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                             intermediate_size=4096),
    "roberta-base": BertConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                               layer_norm_eps=1e-5, pad_token_id=1, model_type="roberta"),
    # From-scratch smoke runs (vocab_size and pad_token_id come from the tokenizer).
    # A larger init std than HF's 0.02 (which suits width 768): at width 64 it would leave every
    # CLS vector nearly identical at init, and contrastive training would idle for hundreds of steps.
    "roberta-tiny": BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=256, max_position_embeddings=130, type_vocab_size=1,
                               layer_norm_eps=1e-5, pad_token_id=1, model_type="roberta",
                               initializer_range=0.1),
    "roberta-large": BertConfig(vocab_size=50265, hidden_size=1024, num_hidden_layers=24,
                                num_attention_heads=16, intermediate_size=4096,
                                max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
                                pad_token_id=1, model_type="roberta"),
}


def position_ids_for(config: BertConfig, input_ids: Array) -> Array:
  """[B, L] position ids: 0..L-1 for BERT; RoBERTa counts non-pad tokens from pad_token_id + 1."""
  if config.is_roberta:
    not_pad = (input_ids != config.pad_token_id).astype(jnp.int32)
    return jnp.cumsum(not_pad, axis=1) * not_pad + config.pad_token_id
  return jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)


class BertEmbeddings(nn.Module):
  """HF BertEmbeddings: word + token type + position, LayerNorm, dropout."""
  config: BertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    c = self.config
    emb = lambda num, axes: layers.Embed(num, c.hidden_size, axes, param_dtype=self.param_dtype,
                                         init_std=c.initializer_range)
    self.word_embeddings = emb(c.vocab_size, ("vocab", "embed"))
    if c.type_vocab_size > 0:  # BLIP's text encoder has no token-type table (type_vocab_size 0)
      self.token_type_embeddings = emb(c.type_vocab_size, (None, "embed"))
    self.position_embeddings = emb(c.max_position_embeddings, (None, "embed"))
    self.LayerNorm = layers.LayerNorm(c.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
    self.dropout = layers.Dropout(c.hidden_dropout_prob)

  def __call__(self, input_ids, token_type_ids, position_ids, deterministic=True, inputs_embeds=None):
    """[B, L] ids (or `inputs_embeds` [B, L, D] in place of the word embeddings) -> [B, L, D]."""
    words = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
    h = words + self.position_embeddings(position_ids)
    if self.config.type_vocab_size > 0:
      h = h + self.token_type_embeddings(token_type_ids)
    return self.dropout(self.LayerNorm(h), deterministic=deterministic)

  def attend(self, h: Array) -> Array:
    """[B, L, D] -> float32 [B, L, V] against the word table (tied MLM decoder), in `dtype`."""
    return self.word_embeddings.attend(h, self.dtype)


class BertAttentionBlock(nn.Module):
  """HF BertAttention: `self` (q/k/v + softmax) then `output` (dense, dropout, residual LN)."""
  config: BertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, kv, mask, deterministic=True):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, init_std=c.initializer_range)
    ctx = layers.Attention(c.num_attention_heads, c.hidden_size, dropout_rate=c.attention_probs_dropout_prob,
                           implementation=c.attention_impl, name="self", **kw)(
                               x, kv, mask, deterministic)
    return layers.ResidualPostLN(c.hidden_size, epsilon=c.layer_norm_eps, dropout_rate=c.hidden_dropout_prob,
                                 implementation=c.norm_impl, name="output", **kw)(
                                     ctx, x, deterministic)


class BertLayer(nn.Module):
  """One post-LN block: self-attention, optional cross-attention, MLP."""
  config: BertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  cross_attention: bool = True  # False: no cross-attention block here (xbert layers < fusion_layer)

  @nn.compact
  def __call__(self, x, mask, encoder_hidden_states=None, encoder_mask=None, deterministic=True,
               query_first_only=False):
    """x: [B, L, D]; mask: bool [B, 1, 1|L, L]; encoder_hidden_states: [B, S, De].
    query_first_only: outputs for position 0 alone ([B, 1, D]); keys / values still span x."""
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    lkw = dict(kw, init_std=c.initializer_range)
    x = layers.constrain(x, ("batch", "length", "embed"))
    if query_first_only:
      h = BertAttentionBlock(c, name="attention", **kw)(x[:, :1], x, mask[:, :, :1], deterministic)
    else:
      h = BertAttentionBlock(c, name="attention", **kw)(x, None, mask, deterministic)
    if c.add_cross_attention and self.cross_attention and encoder_hidden_states is not None:
      # Without encoder states the block is skipped: BLIP's text mode (HF BlipTextLayer).
      h = BertAttentionBlock(c, name="crossattention", **kw)(
          h, encoder_hidden_states, encoder_mask, deterministic)
    inter = layers.DenseAct(c.intermediate_size, c.hidden_act, name="intermediate", **lkw)(h)
    out = layers.ResidualPostLN(c.hidden_size, in_axis="mlp", epsilon=c.layer_norm_eps,
                                dropout_rate=c.hidden_dropout_prob, implementation=c.norm_impl,
                                name="output", **lkw)(
                                    inter, h, deterministic)
    return layers.constrain(out, ("batch", "length", "embed"))


class MlmHead(nn.Module):
  """Masked-LM head, tied decoder + `bias`. RoBERTa (`lm_head`): dense, exact GELU, `layer_norm`;
  BERT (`cls/predictions`): `transform/{dense, LayerNorm}` with `hidden_act`."""
  config: BertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: Array, embeddings: BertEmbeddings) -> Array:
    """[B, L, D] -> float32 logits [B, L, V]."""
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if c.is_roberta:
      h = layers.get_activation("gelu")(layers.Dense(c.hidden_size, ("mlp", "embed"), name="dense",
                                                     init_std=c.initializer_range, **kw)(h))
      h = layers.LayerNorm(c.layer_norm_eps, name="layer_norm", **kw)(h)
    else:
      h = _BertTransform(c, name="transform", **kw)(h)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vocab",)),
                      (c.vocab_size,), self.param_dtype)
    return embeddings.attend(h) + bias


class _BertTransform(nn.Module):
  config: BertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.get_activation(c.hidden_act)(
        layers.Dense(c.hidden_size, ("mlp", "embed"), name="dense", init_std=c.initializer_range, **kw)(h))
    return layers.LayerNorm(c.layer_norm_eps, name="LayerNorm", **kw)(h)


class _BertCls(nn.Module):
  """HF BertOnlyMLMHead: `cls/predictions`."""
  config: BertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h, embeddings):
    return MlmHead(self.config, self.dtype, self.param_dtype, name="predictions")(h, embeddings)


class BertEncoder(nn.Module):
  """HF BertEncoder: `layer_{i}` blocks; returns every hidden state after each block."""
  config: BertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, h, mask, encoder_hidden_states=None, encoder_mask=None, deterministic=True,
               cls_only_last_layer=False, layer_range=None):
    """`layer_range`: [start, stop) of the blocks to run (default all; see `BertConfig.layer_range`)."""
    # static_argnums counts `self` as 0: arguments 5 and 6 are `deterministic`, `query_first_only`.
    block = nn.remat(BertLayer, static_argnums=(5, 6)) if self.remat else BertLayer
    states = []
    c = self.config
    start, stop = layer_range or (0, c.num_hidden_layers)
    for i in range(start, stop):
      h = block(c, self.dtype, self.param_dtype, cross_attention=c.has_cross_attention(i), name=f"layer_{i}")(
          h, mask, encoder_hidden_states, encoder_mask, deterministic, cls_only_last_layer and i == stop - 1)
      states.append(h)
    return states


class BertModel(nn.Module):
  """BERT / RoBERTa encoder with optional pooler, MLM head and SimCSE/BLaIR `mlp` head.

  Returns a dict: `last_hidden_state` [B, L, D]; `pooler_output` [B, D] if
  `add_pooling_layer`; `hidden_states` (embeddings + every layer) if asked;
  `mlm_logits` float32 [B, L, V] if `add_mlm_head` and `return_mlm_logits`; with `mlm_positions`
  [G, M] only there: the B*L tokens split into G equal contiguous groups (G = B: per row), M
  positions into each group's flattened tokens -> [G, M, V] (see losses.select_mlm_positions);
  with `cls_only_last_layer` the last block runs for position 0 alone (its keys and values still
  see every position): `last_hidden_state` is then [B, 1, D], exact for CLS pooling at ~1/num_layers
  less compute;
  `cl_output` [B, D] = tanh(mlp(h[:, 0])) if `add_cl_head`.
  """
  config: BertConfig
  add_pooling_layer: bool = True
  add_mlm_head: bool = False
  add_cl_head: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids: Array | None, attention_mask: Array | None = None,
               token_type_ids: Array | None = None, position_ids: Array | None = None,
               encoder_hidden_states: Array | None = None,
               encoder_attention_mask: Array | None = None, *,
               deterministic: bool = True, output_hidden_states: bool = False,
               return_mlm_logits: bool = False,
               mlm_positions: Array | None = None,
               cls_only_last_layer: bool = False,
               mode: str = "multi_modal",
               inputs_embeds: Array | None = None,
               encoder_embeds: Array | None = None) -> dict[str, Array]:
    """`mode` (ALBEF xbert, see the module docstring): "multi_modal" | "text" | "fusion" | "embeddings".
    `inputs_embeds` [B, L, D] replaces the word embeddings of `input_ids` (positions, token types and the
    embedding LayerNorm still apply, as HF / xbert); `encoder_embeds` [B, L, D] ("fusion" mode) replaces
    the whole embedding output."""
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    layer_range = c.layer_range(mode)
    given = [n for n, x in (("input_ids", input_ids), ("inputs_embeds", inputs_embeds),
                            ("encoder_embeds", encoder_embeds)) if x is not None]
    if (mode == "fusion") != (given == ["encoder_embeds"]) or len(given) != 1:
      raise ValueError(f"mode {mode!r} takes {'encoder_embeds' if mode == 'fusion' else 'input_ids or inputs_embeds'}"
                       f" alone; got {', '.join(given) or 'none'}")
    if mode == "fusion" and c.add_cross_attention and encoder_hidden_states is None:
      raise ValueError("mode 'fusion' cross-attends: pass encoder_hidden_states")
    shape = (input_ids if input_ids is not None else (inputs_embeds if inputs_embeds is not None
                                                      else encoder_embeds)[..., 0]).shape
    if attention_mask is None:
      attention_mask = jnp.ones(shape, jnp.int32)
    embeddings = BertEmbeddings(c, name="embeddings", **kw)
    if encoder_embeds is not None:
      h0 = encoder_embeds.astype(self.dtype)
    else:
      if token_type_ids is None:
        token_type_ids = jnp.zeros(shape, jnp.int32)
      if position_ids is None:
        if input_ids is not None:
          position_ids = position_ids_for(c, input_ids)
        else:  # HF: sequential positions (RoBERTa's start after pad_token_id)
          start = c.pad_token_id + 1 if c.is_roberta else 0
          position_ids = jnp.broadcast_to(start + jnp.arange(shape[1], dtype=jnp.int32), shape)
      h0 = embeddings(input_ids, token_type_ids, position_ids, deterministic, inputs_embeds=inputs_embeds)
    enc_mask = None
    if encoder_hidden_states is not None:
      if encoder_attention_mask is None:
        encoder_attention_mask = jnp.ones(encoder_hidden_states.shape[:2], jnp.int32)
      enc_mask = layers.attention_bias_from_mask(encoder_attention_mask)
    if cls_only_last_layer and return_mlm_logits:
      raise ValueError("cls_only_last_layer leaves no per-token states for the MLM head")
    states = []
    if layer_range[1] > layer_range[0]:
      states = BertEncoder(c, remat=self.remat, name="encoder", **kw)(
          h0, layers.attention_bias_from_mask(attention_mask, shape[1] if c.is_decoder else None),
          encoder_hidden_states, enc_mask, deterministic, cls_only_last_layer, layer_range)
    h = states[-1] if states else h0
    out = {"last_hidden_state": h}
    if output_hidden_states:
      out["hidden_states"] = (h0, *states)
    head = lambda name: layers.DenseAct(c.hidden_size, "tanh", ("embed", "mlp"), name=name,
                                        init_std=c.initializer_range, **kw)
    if self.add_pooling_layer:
      out["pooler_output"] = head("pooler")(h[:, 0])
    if self.add_cl_head:
      out["cl_output"] = head("mlp")(h[:, 0])
    if self.add_mlm_head and return_mlm_logits:
      hm = h
      if mlm_positions is not None:
        hm = h.reshape(mlm_positions.shape[0], -1, h.shape[-1])
        hm = jnp.take_along_axis(hm, mlm_positions[..., None], axis=1)
      if c.is_roberta:
        out["mlm_logits"] = MlmHead(c, name="lm_head", **kw)(hm, embeddings)
      else:
        out["mlm_logits"] = _BertCls(c, name="cls", **kw)(hm, embeddings)
    return out


def init_params(model: BertModel, rng: Array, seq_len: int = 8) -> dict:
  """Initialises every param of `model` (all enabled heads) from `rng`; returns boxed params."""
  ids = jnp.ones((1, seq_len), jnp.int32)
  enc = None
  if model.config.add_cross_attention:
    enc = jnp.zeros((1, 2, model.config.encoder_width or model.config.hidden_size), jnp.float32)
  return model.init(rng, ids, encoder_hidden_states=enc, return_mlm_logits=True)["params"]
