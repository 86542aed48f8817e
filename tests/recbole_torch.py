"""A PyTorch reference of RecBole 1.2 SASRec + the seed's SASRecText / UniSRec (fine-tuning stages), torch.nn only.

Written from the semantics of recbole/model/sequential_recommender/sasrec.py, recbole/model/layers.py
(TransformerEncoder) and the seed's seq_rec_results/model/{sasrectext,unisrec}.py (RecBole cannot be installed in
CI: it depends on ray). The module tree gives RecBole's state-dict keys: `position_embedding.weight`,
`LayerNorm.*`, `trm_encoder.layer.{i}.multi_head_attention.{query,key,value,dense,LayerNorm}.*`,
`trm_encoder.layer.{i}.feed_forward.{dense_1,dense_2,LayerNorm}.*`, `plm_embedding.weight`,
`adaptor.mlp_layers.{j}.*` (Sequential indices), `moe_adaptor.experts.{e}.{bias,lin.weight}`,
`moe_adaptor.{w_gate,w_noise}`, `item_embedding.weight` (UniSRec transductive_ft only).

Checked once (scratch venv outside the repo, not in CI) against RecBole 1.2.1's real SASRec with the seed's
SASRecText / UniSRec classes, on the four configs of test_sasrec_parity.py with random weights: the same
state-dict keys in the same order, and full_sort_predict, calculate_loss (eval, and train mode with the same
torch RNG for the gating noise) and every gradient bitwise equal (max |diff| 0).

Test hook: `model.moe_adaptor.noise` = a list of tensors, consumed one per gating call in training (the seed
calls the adaptor on the sequence's items first, then on the whole table), in place of `torch.randn_like`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def _gelu(x):
  return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


ACTS = {"gelu": _gelu, "relu": F.relu, "swish": lambda x: x * torch.sigmoid(x), "tanh": torch.tanh,
        "sigmoid": torch.sigmoid}


class SelfAttention(nn.Module):
  """RecBole MultiHeadAttention: post-LN self-attention with an additive mask."""

  def __init__(self, heads, hidden, hidden_dropout, attn_dropout, eps):
    super().__init__()
    self.heads, self.head_dim = heads, hidden // heads
    self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
    self.attn_dropout = nn.Dropout(attn_dropout)
    self.dense = nn.Linear(hidden, hidden)
    self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
    self.out_dropout = nn.Dropout(hidden_dropout)

  def _split(self, t):  # [B, L, D] -> [B, N, L, H]
    b, length, _ = t.shape
    return t.reshape(b, length, self.heads, self.head_dim).transpose(1, 2)

  def forward(self, x, additive_mask):
    q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
    logits = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + additive_mask
    probs = self.attn_dropout(torch.softmax(logits, dim=-1))
    ctx = (probs @ v).transpose(1, 2).reshape(x.shape)
    return self.LayerNorm(self.out_dropout(self.dense(ctx)) + x)


class FeedForward(nn.Module):
  """RecBole FeedForward: dense_1, activation, dense_2, dropout, LayerNorm(. + input)."""

  def __init__(self, hidden, inner, hidden_dropout, act, eps):
    super().__init__()
    self.dense_1, self.dense_2 = nn.Linear(hidden, inner), nn.Linear(inner, hidden)
    self.act = ACTS[act]
    self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
    self.dropout = nn.Dropout(hidden_dropout)

  def forward(self, x):
    return self.LayerNorm(self.dropout(self.dense_2(self.act(self.dense_1(x)))) + x)


class Block(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.multi_head_attention = SelfAttention(c["n_heads"], c["hidden_size"], c["hidden_dropout_prob"],
                                              c["attn_dropout_prob"], c["layer_norm_eps"])
    self.feed_forward = FeedForward(c["hidden_size"], c["inner_size"], c["hidden_dropout_prob"], c["hidden_act"],
                                    c["layer_norm_eps"])

  def forward(self, x, additive_mask):
    return self.feed_forward(self.multi_head_attention(x, additive_mask))


class Encoder(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.layer = nn.ModuleList([Block(c) for _ in range(c["n_layers"])])

  def forward(self, x, additive_mask):
    for block in self.layer:
      x = block(x, additive_mask)
    return x


class MlpAdaptor(nn.Module):
  """The seed's AdaptorLayer: Sequential [Dropout, Linear] then [ReLU, Dropout, Linear] per further layer."""

  def __init__(self, sizes, dropout):
    super().__init__()
    mods = []
    for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
      mods += ([nn.ReLU()] if k else []) + [nn.Dropout(dropout), nn.Linear(a, b)]
    self.mlp_layers = nn.Sequential(*mods)

  def forward(self, x):
    return self.mlp_layers(x)


class Whitening(nn.Module):
  """The seed's PWLayer: lin(dropout(x) - bias), lin without bias."""

  def __init__(self, in_size, out_size, dropout):
    super().__init__()
    self.dropout = nn.Dropout(dropout)
    self.bias = nn.Parameter(torch.zeros(in_size))
    self.lin = nn.Linear(in_size, out_size, bias=False)

  def forward(self, x):
    return self.lin(self.dropout(x) - self.bias)


class MoEAdaptor(nn.Module):
  """The seed's MoEAdaptorLayer with noisy softmax gating (noise in training only)."""

  def __init__(self, n_exps, sizes, dropout):
    super().__init__()
    self.experts = nn.ModuleList([Whitening(sizes[0], sizes[1], dropout) for _ in range(n_exps)])
    self.w_gate = nn.Parameter(torch.zeros(sizes[0], n_exps))
    self.w_noise = nn.Parameter(torch.zeros(sizes[0], n_exps))
    self.noise: list[torch.Tensor] | None = None

  def forward(self, x):
    logits = x @ self.w_gate
    if self.training:
      eps = self.noise.pop(0) if self.noise is not None else torch.randn_like(logits)
      assert eps.shape == logits.shape, (eps.shape, logits.shape)
      logits = logits + eps * (F.softplus(x @ self.w_noise) + 1e-2)
    gates = torch.softmax(logits, dim=-1)
    outs = torch.stack([e(x) for e in self.experts], dim=-2)  # [..., E, D]
    return (gates.unsqueeze(-1) * outs).sum(dim=-2)


class SeqRec(nn.Module):
  """SASRec's trunk over adapted frozen plm features. `c`: the yaml keys (SASRecConfig field names);
  `plm`: [n_items, plm_size] float table (row 0 = [PAD])."""

  def __init__(self, c: dict, plm: torch.Tensor):
    super().__init__()
    self.c = c
    h = c["hidden_size"]
    self.item_embedding = nn.Embedding(plm.shape[0], h, padding_idx=0)
    self.position_embedding = nn.Embedding(c["max_seq_length"], h)
    self.trm_encoder = Encoder(c)
    self.LayerNorm = nn.LayerNorm(h, eps=c["layer_norm_eps"])
    self.dropout = nn.Dropout(c["hidden_dropout_prob"])
    self.apply(self._init)  # RecBole SASRec._init_weights, before the seed adds its own modules
    self.plm_embedding = nn.Embedding(plm.shape[0], plm.shape[1], padding_idx=0)
    self.plm_embedding.weight.requires_grad = False
    with torch.no_grad():
      self.plm_embedding.weight.copy_(plm)

  def _init(self, m):
    std = self.c["initializer_range"]
    if isinstance(m, (nn.Linear, nn.Embedding)):
      m.weight.data.normal_(0.0, std)
    elif isinstance(m, nn.LayerNorm):
      m.weight.data.fill_(1.0)
      m.bias.data.zero_()
    if isinstance(m, nn.Linear) and m.bias is not None:
      m.bias.data.zero_()

  def adapt(self, x):
    raise NotImplementedError

  def ids_embedding(self, item_seq):
    return None

  def forward(self, item_seq, item_seq_len):
    length = item_seq.shape[1]
    h = self.adapt(self.plm_embedding(item_seq)) + self.position_embedding(torch.arange(length)).unsqueeze(0)
    ids = self.ids_embedding(item_seq)
    if ids is not None:
      h = h + ids
    h = self.dropout(self.LayerNorm(h))
    visible = (item_seq != 0)[:, None, None, :]  # [B, 1, 1, L]
    causal = torch.tril(visible.expand(-1, -1, length, -1))
    additive = torch.where(causal, 0.0, -10000.0)
    out = self.trm_encoder(h, additive)
    return out[torch.arange(out.shape[0]), item_seq_len - 1]

  def item_vectors(self):
    return self.adapt(self.plm_embedding.weight)

  def logits(self, item_seq, item_seq_len):
    return self.forward(item_seq, item_seq_len) @ self.item_vectors().T

  def full_sort_predict(self, item_seq, item_seq_len):
    return self.logits(item_seq, item_seq_len)

  def calculate_loss(self, item_seq, item_seq_len, pos_items):
    return F.cross_entropy(self.logits(item_seq, item_seq_len), pos_items)


class SASRecTextRef(SeqRec):
  def __init__(self, c, plm):
    super().__init__(c, plm)
    self.item_embedding = None
    self.adaptor = MlpAdaptor(c["adaptor_layers"], c["adaptor_dropout_prob"])
    for m in self.adaptor.modules():
      if isinstance(m, nn.Linear):
        m.weight.data.normal_(0.0, 0.02)
        m.bias.data.zero_()

  def adapt(self, x):
    return self.adaptor(x)


class UniSRecRef(SeqRec):
  def __init__(self, c, plm):
    super().__init__(c, plm)
    self.transductive = c["train_stage"] == "transductive_ft"
    if not self.transductive:
      self.item_embedding = None
    self.moe_adaptor = MoEAdaptor(c["n_exps"], c["adaptor_layers"], c["adaptor_dropout_prob"])
    for e in self.moe_adaptor.experts:
      e.lin.weight.data.normal_(0.0, 0.02)

  def adapt(self, x):
    return self.moe_adaptor(x)

  def ids_embedding(self, item_seq):
    return self.item_embedding(item_seq) if self.transductive else None

  def item_vectors(self):
    v = self.adapt(self.plm_embedding.weight)
    return v + self.item_embedding.weight if self.transductive else v

  def full_sort_predict(self, item_seq, item_seq_len):
    seq = F.normalize(self.forward(item_seq, item_seq_len), dim=-1)
    return seq @ F.normalize(self.item_vectors(), dim=-1).T

  def calculate_loss(self, item_seq, item_seq_len, pos_items):
    seq = F.normalize(self.forward(item_seq, item_seq_len), dim=1)
    logits = seq @ F.normalize(self.item_vectors(), dim=1).T / self.c["temperature"]
    return F.cross_entropy(logits, pos_items)


def build(c: dict, plm: torch.Tensor) -> SeqRec:
  """The reference for config dict `c` (adaptor "mlp" -> SASRecText, "moe" -> UniSRec)."""
  return (SASRecTextRef if c["adaptor"] == "mlp" else UniSRecRef)(c, plm)
