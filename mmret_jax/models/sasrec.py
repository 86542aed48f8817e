"""SASRec towers over frozen text features: SASRecText and UniSRec (BLaIR's sequential recommenders) in Flax linen.

Mirrors the seed `hyp1231/AmazonReviews2023` `seq_rec_results/model/{sasrectext,unisrec}.py`, which subclass
RecBole 1.2 `SASRec` (Kang & McAuley 2018) with its `TransformerEncoder`; UniSRec is Hou et al. 2022 ("Towards
Universal Sequence Representation Learning for Recommender Systems"), fine-tuning stages only.

  item vectors   adaptor(plm[item]): SASRecText `AdaptorLayer` (Sequential [Dropout, Linear] then
                 [ReLU, Dropout, Linear]...), UniSRec `MoEAdaptorLayer` (n_exps whitening experts
                 lin(dropout(x) - bias), softmax gates x @ w_gate, plus noise in training)
                 (+ an ID embedding under UniSRec `transductive_ft`)
  sequence       item vectors + position_embedding (+ ID embedding) -> LayerNorm -> dropout ->
                 n_layers post-LN blocks, causal + key-padding mask -> the state at seq_len - 1
  scores         SASRecText: seq @ items^T; UniSRec: cosine (F.normalize both sides)
  loss           cross-entropy over every item row (row 0 = [PAD] included), mean over the batch;
                 UniSRec divides the cosine logits by `temperature`

RecBole's `TransformerLayer` is our `bert.BertLayer` (checked against recbole/model/layers.py 1.2.1): q/k/v
Linear, logits / sqrt(H) + mask, softmax, attention dropout, `dense`, dropout, LayerNorm(. + input); then
`dense_1`, activation (gelu = erf form), `dense_2`, dropout, LayerNorm(. + input). The blocks are reused as
`trm_encoder/layer_{i}` (param paths of BertLayer: `attention/self/query`, `intermediate/dense`, ...).

Differences from the seed (values equal for valid inputs):
  * RecBole adds -10000.0 to masked logits; we mask with float32 min. The probabilities of masked keys are 0 in
    both for any query with a visible key, i.e. whenever item_seq[:, 0] != 0 (RecBole's sequences are
    left-aligned, padded on the right with 0).
  * The frozen `plm_embedding` ([n_items, plm_size] float32, row 0 zeros) is an input array, not a param.
  * The noisy gating draws its normal noise from the `dropout` RNG stream (or takes it as an argument).
  * UniSRec `pretrain` (the seq-item / seq-seq contrastive stage) is not implemented.
The seed's quirks kept: the adaptors init with std 0.02 (not `initializer_range`; they are created after
SASRec's `_init_weights` ran); the ID table (`padding_idx=0`) gets no gradient into row 0 through the sequence
lookup, but does through the item vectors (`item_embedding.weight` is used whole there).

Param paths mirror RecBole state-dict keys (`mmret_jax/convert/sasrec.py`): `position_embedding`, `LayerNorm`,
`trm_encoder/layer_{i}`, `item_embedding`, `adaptor/mlp_layers_{j}` (j = the Sequential index),
`moe_adaptor/experts_{e}/{lin,bias}`, `moe_adaptor/{w_gate,w_noise}`.

Shapes: B batch, L sequence length (<= max_seq_length), P plm_size, D hidden_size, E n_exps, N item rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmret_jax.models import bert, layers

Array = jax.Array
Dtype = Any

ADAPTORS = ("mlp", "moe")
TRAIN_STAGES = ("inductive_ft", "transductive_ft")
ACTIVATIONS = ("gelu", "relu", "swish", "tanh")  # RecBole's FeedForward also has "sigmoid": not in layers.py
ADAPTOR_INIT_STD = 0.02  # the seed's AdaptorLayer / PWLayer `_init_weights`
GATE_NOISE_EPSILON = 1e-2  # the seed's noisy_top_k_gating(noise_epsilon)
NORMALIZE_EPS = 1e-12  # torch F.normalize


@dataclasses.dataclass(frozen=True)
class SASRecConfig:
  """RecBole / seed yaml keys. Defaults: the seed's `config/SASRecText.yaml` (RecBole's MAX_ITEM_LIST_LENGTH 50).

  `n_items`: item rows including [PAD] (RecBole `dataset.num(item_id)`); needed for the `transductive_ft` ID
  table, 0 = not known (then only the plm table fixes N). `temperature`, `n_exps`, `train_stage` apply to the
  "moe" adaptor (UniSRec); "mlp" (SASRecText) has no ID table and raw-dot scores.
  """
  n_layers: int = 2
  n_heads: int = 2
  hidden_size: int = 64
  inner_size: int = 256
  hidden_dropout_prob: float = 0.5
  attn_dropout_prob: float = 0.5
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  loss_type: str = "CE"
  max_seq_length: int = 50
  plm_size: int = 768
  adaptor: str = "mlp"
  adaptor_layers: tuple[int, ...] = (768, 300, 64)
  adaptor_dropout_prob: float = 0.2
  n_exps: int = 8
  temperature: float = 0.07
  train_stage: str = "inductive_ft"
  n_items: int = 0

  @classmethod
  def sasrectext(cls, **over) -> "SASRecConfig":
    """The seed's `config/SASRecText.yaml`."""
    return cls(**over)

  @classmethod
  def unisrec(cls, **over) -> "SASRecConfig":
    """The seed's `config/UniSRec.yaml` (train_stage inductive_ft)."""
    kw = dict(hidden_size=300, adaptor="moe", adaptor_layers=(768, 300), n_exps=8, temperature=0.07,
              train_stage="inductive_ft")
    return cls(**{**kw, **over})

  def __post_init__(self):
    object.__setattr__(self, "adaptor_layers", tuple(int(n) for n in self.adaptor_layers))
    sizes = self.adaptor_layers
    if self.adaptor not in ADAPTORS:
      raise ValueError(f"unknown adaptor {self.adaptor!r}; expected one of {ADAPTORS}")
    if self.train_stage not in TRAIN_STAGES:
      raise ValueError(f"train_stage {self.train_stage!r} is not supported; expected one of {TRAIN_STAGES} "
                       "(UniSRec pretrain is not implemented)")
    if self.adaptor == "mlp" and self.train_stage != "inductive_ft":
      raise ValueError("train_stage 'transductive_ft' needs adaptor 'moe' (SASRecText has no ID embedding)")
    if self.loss_type != "CE":
      raise ValueError(f"loss_type {self.loss_type!r}: the seed's models compute CE over all items only")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; expected one of {ACTIVATIONS}")
    for name in ("n_layers", "n_heads", "hidden_size", "inner_size", "max_seq_length", "plm_size", "n_exps"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.hidden_size % self.n_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by n_heads {self.n_heads}")
    for name in ("hidden_dropout_prob", "attn_dropout_prob", "adaptor_dropout_prob"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
    if len(sizes) < 2 or min(sizes) < 1:
      raise ValueError(f"adaptor_layers needs >= 2 positive sizes (input, ..., output), got {list(sizes)}")
    if self.adaptor == "moe" and len(sizes) != 2:
      raise ValueError(f"adaptor 'moe' takes adaptor_layers [plm_size, hidden_size], got {list(sizes)}")
    if sizes[0] != self.plm_size:
      raise ValueError(f"adaptor_layers[0] = {sizes[0]} != plm_size {self.plm_size}")
    if sizes[-1] != self.hidden_size:
      raise ValueError(f"adaptor_layers[-1] = {sizes[-1]} != hidden_size {self.hidden_size}")
    if self.temperature <= 0:
      raise ValueError(f"temperature must be > 0, got {self.temperature}")
    if self.n_items < 0 or (self.transductive and self.n_items < 2):
      raise ValueError(f"n_items must be >= 2 (with [PAD]) for train_stage 'transductive_ft', got {self.n_items}")

  @property
  def transductive(self) -> bool:
    return self.train_stage == "transductive_ft"

  @property
  def cosine(self) -> bool:
    """UniSRec scores with cosine similarity (and divides the loss logits by `temperature`)."""
    return self.adaptor == "moe"

  def bert_config(self) -> bert.BertConfig:
    """The BertConfig whose BertLayer is RecBole's TransformerLayer (causal: `is_decoder`)."""
    return bert.BertConfig(vocab_size=max(self.n_items, 1), hidden_size=self.hidden_size,
                           num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads,
                           intermediate_size=self.inner_size, hidden_act=self.hidden_act,
                           hidden_dropout_prob=self.hidden_dropout_prob,
                           attention_probs_dropout_prob=self.attn_dropout_prob,
                           max_position_embeddings=self.max_seq_length, type_vocab_size=0,
                           layer_norm_eps=self.layer_norm_eps, initializer_range=self.initializer_range,
                           is_decoder=True, attention_impl="xla")


def normalize(x: Array) -> Array:
  """torch F.normalize(x, dim=-1): x / max(||x||, 1e-12), float32; the norm's gradient is 0 at x = 0 (as torch's)
  instead of NaN."""
  x = x.astype(jnp.float32)
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  norm = jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)
  return x / jnp.maximum(norm, NORMALIZE_EPS)


class MlpAdaptor(nn.Module):
  """The seed's SASRecText `AdaptorLayer`: [..., sizes[0]] -> [..., sizes[-1]].

  Linear k is `mlp_layers_{3k+1}` (torch Sequential index); dropout before each Linear, ReLU before every
  Linear but the first, nothing after the last."""
  sizes: tuple[int, ...]
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    n = len(self.sizes) - 1
    h = x.astype(self.dtype)
    in_axis = None  # the plm feature axis is not sharded; hidden widths alternate "mlp" / unsharded
    for k, features in enumerate(self.sizes[1:]):
      if k:
        h = jax.nn.relu(h)
      h = layers.Dropout(self.dropout_rate, name=f"mlp_layers_{3 * k}")(h, deterministic)
      out_axis = "embed" if k == n - 1 else (None if in_axis == "mlp" else "mlp")
      h = layers.Dense(features, (in_axis, out_axis), dtype=self.dtype, param_dtype=self.param_dtype,
                       init_std=ADAPTOR_INIT_STD, name=f"mlp_layers_{3 * k + 1}")(h)
      in_axis = out_axis
    return h


class PWLayer(nn.Module):
  """The seed's parametric whitening expert: lin(dropout(x) - bias), `lin` without bias. [..., P] -> [..., D]."""
  features: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    bias = layers.logical_param(self, "bias", (x.shape[-1],), (None,), nn.initializers.zeros_init(),
                                self.param_dtype)
    h = layers.Dropout(self.dropout_rate, name="dropout")(x.astype(self.dtype), deterministic)
    return layers.Dense(self.features, (None, "embed"), use_bias=False, dtype=self.dtype,
                        param_dtype=self.param_dtype, init_std=ADAPTOR_INIT_STD, name="lin")(
                            h - bias.astype(self.dtype))


class MoEAdaptor(nn.Module):
  """The seed's UniSRec `MoEAdaptorLayer`: sum_e softmax(gate logits)_e * experts_e(x). [..., P] -> [..., D].

  Gate logits (float32): x @ w_gate; in training (not deterministic) plus noise * (softplus(x @ w_noise) + 1e-2),
  noise ~ N(0, 1) of the logits' shape [..., E] from the `dropout` RNG stream, or the given `noise` array
  (tests; torch draws `randn_like`). w_gate, w_noise init zeros (uniform gates at init, as the seed)."""
  n_exps: int
  features: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True, noise: Array | None = None) -> Array:
    p = x.shape[-1]
    zeros = nn.initializers.zeros_init()
    w_gate = layers.logical_param(self, "w_gate", (p, self.n_exps), (None, None), zeros, self.param_dtype)
    w_noise = layers.logical_param(self, "w_noise", (p, self.n_exps), (None, None), zeros, self.param_dtype)
    experts = [PWLayer(self.features, self.dropout_rate, self.dtype, self.param_dtype, name=f"experts_{e}")(
        x, deterministic) for e in range(self.n_exps)]
    xf = x.astype(jnp.float32)
    logits = xf @ w_gate.astype(jnp.float32)
    if deterministic:
      if noise is not None:
        raise ValueError("gating noise is only used in training (deterministic=False)")
    else:
      if noise is None:
        noise = jax.random.normal(self.make_rng("dropout"), logits.shape, jnp.float32)
      elif noise.shape != logits.shape:
        raise ValueError(f"gating noise of shape {noise.shape}; expected {logits.shape}")
      std = jax.nn.softplus(xf @ w_noise.astype(jnp.float32)) + GATE_NOISE_EPSILON
      logits = logits + noise.astype(jnp.float32) * std
    gates = jax.nn.softmax(logits, axis=-1)  # [..., E]
    out = jnp.stack(experts, axis=-2).astype(jnp.float32)  # [..., E, D]
    return jnp.sum(gates[..., None] * out, axis=-2).astype(self.dtype)


class SeqRecModel(nn.Module):
  """SASRecText (adaptor "mlp") / UniSRec fine-tuning (adaptor "moe") over a frozen plm feature table.

  Every method takes `plm_table` float32 [N, P] (the seed's `plm_embedding.weight`, row 0 = [PAD] zeros; N must
  be `config.n_items` under transductive_ft). `noise`: the MoE gating noise for training (see MoEAdaptor),
  [B, L, E] for the sequence's items and [N, E] for the item table; `scores` / `loss` take the pair
  (sequence noise, item noise). `__call__` is `sequence` (it creates every param: use it for init).
  """
  config: SASRecConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.position_embedding = layers.Embed(c.max_seq_length, c.hidden_size, (None, "embed"),
                                           init_std=c.initializer_range, **kw)
    if c.transductive:
      self.item_embedding = layers.Embed(c.n_items, c.hidden_size, ("vocab", "embed"),
                                         init_std=c.initializer_range, **kw)
    self.LayerNorm = layers.LayerNorm(c.layer_norm_eps, **kw)
    self.dropout = layers.Dropout(c.hidden_dropout_prob)
    self.trm_encoder = bert.BertEncoder(c.bert_config(), **kw)
    if c.adaptor == "mlp":
      self.adaptor = MlpAdaptor(c.adaptor_layers, c.adaptor_dropout_prob, **kw)
    else:
      self.moe_adaptor = MoEAdaptor(c.n_exps, c.hidden_size, c.adaptor_dropout_prob, **kw)

  def _adapt(self, feats: Array, deterministic: bool, noise: Array | None) -> Array:
    if self.config.adaptor == "mlp":
      if noise is not None:
        raise ValueError("gating noise given to the 'mlp' adaptor (SASRecText has no gates)")
      return self.adaptor(feats, deterministic)
    return self.moe_adaptor(feats, deterministic, noise)

  def item_vectors(self, plm_table: Array, deterministic: bool = True, noise: Array | None = None) -> Array:
    """[N, P] -> [N, D]: the adaptor of every row (+ the whole ID table under transductive_ft)."""
    c = self.config
    items = self._adapt(plm_table, deterministic, noise)
    if c.transductive:
      if plm_table.shape[0] != c.n_items:
        raise ValueError(f"plm_table has {plm_table.shape[0]} rows; transductive_ft needs n_items = {c.n_items}")
      items = items + self.item_embedding.embedding.astype(self.dtype)
    return items

  def sequence(self, item_seq: Array, seq_len: Array, plm_table: Array, deterministic: bool = True,
               noise: Array | None = None) -> Array:
    """item_seq int [B, L] (left-aligned, 0 = [PAD]; L <= max_seq_length), seq_len int [B] (1..L) -> [B, D]:
    the last block's state at position seq_len - 1 (RecBole `gather_indexes`)."""
    c = self.config
    b, length = item_seq.shape
    if length > c.max_seq_length:
      raise ValueError(f"sequence length {length} > max_seq_length {c.max_seq_length}")
    h = self._adapt(jnp.take(plm_table, item_seq, axis=0), deterministic, noise)  # [B, L, D]
    h = h + self.position_embedding(jnp.arange(length, dtype=jnp.int32)[None])
    if c.transductive:
      ids = self.item_embedding(item_seq)
      # torch nn.Embedding(padding_idx=0): no gradient flows into row 0 from this lookup
      h = h + jnp.where((item_seq == 0)[..., None], jax.lax.stop_gradient(ids), ids)
    h = self.dropout(self.LayerNorm(h), deterministic)
    mask = layers.attention_bias_from_mask(item_seq != 0, length)  # causal AND key padding: [B, 1, L, L]
    h = self.trm_encoder(h, mask, deterministic=deterministic)[-1]
    out = jnp.take_along_axis(h, (seq_len.astype(jnp.int32) - 1).reshape(b, 1, 1), axis=1)[:, 0]
    return layers.constrain(out, ("batch", "embed"))

  def __call__(self, item_seq: Array, seq_len: Array, plm_table: Array, deterministic: bool = True,
               noise: Array | None = None) -> Array:
    return self.sequence(item_seq, seq_len, plm_table, deterministic, noise)

  def scores(self, item_seq: Array, seq_len: Array, plm_table: Array, deterministic: bool = True,
             noise: Sequence[Array] | None = None) -> Array:
    """float32 [B, N]: the seed's full_sort_predict (UniSRec: cosine, no temperature)."""
    seq_noise, item_noise = noise if noise is not None else (None, None)
    seq = self.sequence(item_seq, seq_len, plm_table, deterministic, seq_noise)
    items = self.item_vectors(plm_table, deterministic, item_noise)
    if self.config.cosine:
      return jnp.einsum("bd,nd->bn", normalize(seq), normalize(items))
    return jnp.einsum("bd,nd->bn", seq, items.astype(seq.dtype)).astype(jnp.float32)

  def loss(self, item_seq: Array, seq_len: Array, pos_items: Array, plm_table: Array, deterministic: bool = True,
           noise: Sequence[Array] | None = None) -> Array:
    """float32 []: the seed's calculate_loss, CE of `scores` (UniSRec: / temperature) against pos_items [B]
    over all N rows, mean over the batch."""
    logits = self.scores(item_seq, seq_len, plm_table, deterministic, noise)
    if self.config.cosine:
      logits = logits / self.config.temperature
    picked = jnp.take_along_axis(logits, pos_items.astype(jnp.int32)[:, None], axis=1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - picked)


def init_params(config: SASRecConfig, rng: Array, dtype: Dtype = jnp.float32) -> dict:
  """Every param of a SeqRecModel(config) from `rng` (boxed with logical axis names; `nn.unbox` for arrays)."""
  model = SeqRecModel(config, dtype=dtype)
  ids = jnp.ones((1, 1), jnp.int32)
  return model.init({"params": rng}, ids, jnp.ones((1,), jnp.int32),
                    jnp.zeros((2, config.plm_size), jnp.float32))["params"]
