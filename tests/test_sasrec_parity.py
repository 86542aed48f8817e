"""Parity of `mmret_jax.models.sasrec` (SASRecText / UniSRec) with the PyTorch reference `recbole_torch.py`.

The reference has RecBole's state-dict key names, so every JAX model here gets its weights through
`mmret_jax.convert.sasrec.to_jax` (the key map is exercised by every value test). fp32 throughout; dropout off
(eval mode, or train mode with every dropout probability 0); the MoE gating in train mode takes the same
given noise on both sides.

Measured (CPU, these configs): scores max|diff| 1.2e-7 .. 1.4e-6 (|scores| up to ~6 for SASRecText, cosine for
UniSRec), losses <= 7.2e-7, gradients max|diff| / max|torch| <= 1.6e-6 per tensor; asserted 1e-5.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import recbole_torch
from mmret_jax.convert import sasrec as convert_sasrec
from mmret_jax.convert.core import ConversionError
from mmret_jax.models import sasrec

FP32_ATOL = 1e-5
GRAD_RTOL = 1e-5  # max |ours - torch| / max |torch| per tensor

CASES = {
    # hidden (16) != plm (12); the seed's two-Linear adaptor
    "sasrectext": sasrec.SASRecConfig.sasrectext(
        n_layers=2, n_heads=2, hidden_size=16, inner_size=24, plm_size=12, adaptor_layers=(12, 20, 16),
        max_seq_length=6, n_items=9),
    # three Linears (Sequential indices 1, 4, 7), 3 heads, relu blocks, another eps
    "sasrectext-deep-relu": sasrec.SASRecConfig.sasrectext(
        n_layers=1, n_heads=3, hidden_size=12, inner_size=20, plm_size=10, adaptor_layers=(10, 14, 8, 12),
        hidden_act="relu", layer_norm_eps=1e-5, max_seq_length=5, n_items=7),
    "unisrec-inductive": sasrec.SASRecConfig.unisrec(
        n_layers=1, n_heads=2, hidden_size=20, inner_size=16, plm_size=12, adaptor_layers=(12, 20), n_exps=3,
        max_seq_length=6, n_items=9),
    "unisrec-transductive": sasrec.SASRecConfig.unisrec(
        n_layers=2, n_heads=4, hidden_size=16, inner_size=24, plm_size=10, adaptor_layers=(10, 16), n_exps=4,
        max_seq_length=5, n_items=8, train_stage="transductive_ft", temperature=0.2),
}


def _maxdiff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _randomize_(model: torch.nn.Module, seed: int) -> None:
  """Every trained param away from its init (LayerNorms near 1 / 0, gates non-uniform) so outputs are O(1)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if not p.requires_grad:
        continue
      noise = torch.randn(p.shape, generator=g)
      if "LayerNorm" in name:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
      elif name.endswith("bias"):
        p.copy_(0.3 * noise if "experts" in name else 0.1 * noise)
      elif p.ndim == 2 and name.endswith(".weight") and "embedding" not in name:  # Linear [out, in]
        p.copy_(noise / p.shape[1] ** 0.5)
      else:  # embeddings, w_gate, w_noise
        p.copy_(0.5 * noise)


def _inputs(c: sasrec.SASRecConfig, seed: int) -> dict:
  """Left-aligned sequences padded with 0: a full row (L = max_seq_length), padded rows and a length-1 row."""
  rng = np.random.default_rng(seed)
  length = c.max_seq_length
  lens = np.array([length, 3, 1, length - 1, 2])
  seq = rng.integers(1, c.n_items, size=(len(lens), length))
  seq = np.where(np.arange(length)[None] < lens[:, None], seq, 0)
  return {"item_seq": seq, "seq_len": lens, "pos_items": rng.integers(1, c.n_items, size=len(lens))}


@pytest.fixture(scope="module")
def built():
  """Lazily built (torch model, plm table, our params via the converter, inputs) per case."""
  cache = {}

  def get(case: str):
    if case not in cache:
      c = CASES[case]
      seed = len(cache)
      rng = np.random.default_rng(100 + seed)
      plm = rng.standard_normal((c.n_items, c.plm_size)).astype(np.float32)
      plm[0] = 0.0  # [PAD]
      torch.manual_seed(seed)
      tmodel = recbole_torch.build(dataclasses.asdict(c), torch.from_numpy(plm))
      _randomize_(tmodel, seed)
      tmodel.eval()
      sd = {k: v.detach().clone() for k, v in tmodel.state_dict().items()}
      params, table = convert_sasrec.to_jax({"state_dict": sd, "epoch": 3}, c)
      cache[case] = (tmodel, sd, params, table, _inputs(c, seed))
    return cache[case]

  return get


@functools.lru_cache(maxsize=None)
def _jitted(c: sasrec.SASRecConfig, method: str, deterministic: bool, dtype=jnp.float32, grad: bool = False):
  """One compiled `method` per (config, mode); eval mode ignores the dropout rates, so it is shared."""
  if deterministic:
    c = _no_dropout(c)
  model = sasrec.SeqRecModel(c, dtype=dtype)

  def f(params, args, noise, rng):
    run = lambda name, *a: model.apply({"params": params}, *a, deterministic=deterministic, noise=noise,
                                       method=getattr(model, name), rngs=None if rng is None else {"dropout": rng})
    if method == "scores+loss":  # (scores, loss) in one program: args = (item_seq, seq_len, pos_items, table)
      return run("scores", args[0], args[1], args[3]), run("loss", *args)
    return run(method, *args)

  return jax.jit(jax.value_and_grad(f) if grad else f)


def _ours(c, params, method, *args, deterministic=True, noise=None, dtype=jnp.float32, rng=None, grad=False):
  """SeqRecModel(c).`method`(*args) (grad: (value, d value / d params)), jitted."""
  return _jitted(c, method, deterministic, dtype, grad)(params, tuple(jnp.asarray(a) for a in args), noise, rng)


def _t(x):
  return torch.as_tensor(np.asarray(x))


def _no_dropout(c: sasrec.SASRecConfig) -> sasrec.SASRecConfig:
  return dataclasses.replace(c, hidden_dropout_prob=0.0, attn_dropout_prob=0.0, adaptor_dropout_prob=0.0)


def _train_mode_torch(tmodel):
  tmodel.train()
  for m in tmodel.modules():
    if isinstance(m, torch.nn.Dropout):
      m.p = 0.0
  return tmodel


def _noise(c, inputs, seed):
  """(sequence noise [B, L, E], item noise [N, E]) for the gating, or None for SASRecText."""
  if c.adaptor != "moe":
    return None
  rng = np.random.default_rng(seed)
  b, length = inputs["item_seq"].shape
  return (rng.standard_normal((b, length, c.n_exps)).astype(np.float32),
          rng.standard_normal((c.n_items, c.n_exps)).astype(np.float32))


@pytest.mark.parametrize("case", list(CASES))
def test_scores_and_loss_eval_mode(built, case):
  c = CASES[case]
  tmodel, _, params, table, x = built(case)
  with torch.no_grad():
    ref = tmodel.full_sort_predict(_t(x["item_seq"]), _t(x["seq_len"])).numpy()
    ref_loss = float(tmodel.calculate_loss(_t(x["item_seq"]), _t(x["seq_len"]), _t(x["pos_items"])))
  scores, loss = _ours(c, params, "scores+loss", x["item_seq"], x["seq_len"], x["pos_items"], table)
  assert scores.dtype == jnp.float32 and scores.shape == (5, c.n_items)
  assert _maxdiff(scores, ref) <= FP32_ATOL
  assert abs(float(loss) - ref_loss) <= FP32_ATOL
  # the outputs are not trivially small, and the rows differ (padding / lengths matter)
  assert float(np.abs(ref).max()) > (0.5 if c.cosine else 1.0)
  assert _maxdiff(ref[1], ref[2]) > 1e-2
  if c.cosine:  # cosine scores: |s| <= 1
    assert float(np.abs(ref).max()) <= 1.0 + 1e-6

  if case != "unisrec-transductive":
    return
  # a batch shorter than max_seq_length (positions 0..L-1 only)
  short = {"item_seq": x["item_seq"][:, :3], "seq_len": np.minimum(x["seq_len"], 3)}
  with torch.no_grad():
    ref_short = tmodel.full_sort_predict(_t(short["item_seq"]), _t(short["seq_len"])).numpy()
  assert _maxdiff(_ours(c, params, "scores", short["item_seq"], short["seq_len"], table), ref_short) <= FP32_ATOL


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_grads_train_mode(built, case):
  """Train mode without dropout: the MoE gates get the same given noise; gradients of the loss agree."""
  c0 = CASES[case]
  c = _no_dropout(c0)
  _, sd, params, table, x = built(case)
  tmodel = recbole_torch.build(dataclasses.asdict(c0), torch.from_numpy(np.asarray(table)))
  tmodel.load_state_dict(sd)
  _train_mode_torch(tmodel)
  noise = _noise(c, x, seed=7)
  if noise is not None:
    tmodel.moe_adaptor.noise = [torch.from_numpy(n) for n in noise]
  ref_loss = tmodel.calculate_loss(_t(x["item_seq"]), _t(x["seq_len"]), _t(x["pos_items"]))
  ref_loss.backward()
  if noise is not None:
    assert tmodel.moe_adaptor.noise == []  # both gating calls consumed their noise

  loss, grads = _ours(c, params, "loss", x["item_seq"], x["seq_len"], x["pos_items"], table, deterministic=False,
                      noise=None if noise is None else tuple(jnp.asarray(n) for n in noise), grad=True)
  assert abs(float(loss) - ref_loss.item()) <= FP32_ATOL
  ours_g = convert_sasrec.to_torch(grads, c, table)
  ref_g = {k: p.grad.numpy() for k, p in tmodel.named_parameters() if p.requires_grad}
  assert set(ours_g) - {convert_sasrec.PLM_KEY} == set(ref_g)
  last = c.n_layers - 1
  keys = ["position_embedding.weight", "LayerNorm.weight", "trm_encoder.layer.0.multi_head_attention.query.weight",
          "trm_encoder.layer.0.multi_head_attention.LayerNorm.bias",
          f"trm_encoder.layer.{last}.feed_forward.dense_1.weight"]
  if c.adaptor == "mlp":
    keys += [f"adaptor.mlp_layers.{3 * k + 1}.{w}" for k in range(len(c.adaptor_layers) - 1)
             for w in ("weight", "bias")]
  else:
    keys += ["moe_adaptor.w_gate", "moe_adaptor.w_noise", "moe_adaptor.experts.0.bias",
             "moe_adaptor.experts.1.lin.weight"]
  if c.transductive:
    keys += ["item_embedding.weight"]
  for k in keys:
    scale = float(np.abs(ref_g[k]).max())
    assert scale > 1e-4, k  # a live gradient
    assert _maxdiff(ours_g[k], ref_g[k]) <= GRAD_RTOL * scale, (k, _maxdiff(ours_g[k], ref_g[k]) / scale)
  # every other gradient too; the key biases' is 0 (softmax is shift-invariant): both are rounding noise there
  for k, g in ref_g.items():
    if k.endswith("key.bias"):
      assert max(float(np.abs(g).max()), float(np.abs(ours_g[k]).max())) <= 1e-6, k
    else:
      assert _maxdiff(ours_g[k], g) <= GRAD_RTOL * float(np.abs(g).max()), k


def test_transductive_pad_lookup_gives_row0_no_gradient(built):
  """torch nn.Embedding(padding_idx=0): the ID table's row 0 gets no gradient from the sequence lookup, only from
  the item vectors. With right padding the pad slots never reach a gathered state, so this shows only when a 0
  sits at the gathered slot (slot 1 of the first row here): row 0's gradient must still equal torch's, and
  differ from what a table without padding_idx would get."""
  c0 = CASES["unisrec-transductive"]
  c = _no_dropout(c0)
  _, sd, params, table, x = built("unisrec-transductive")
  seq, lens = x["item_seq"].copy(), x["seq_len"].copy()
  seq[0, 1], lens[0] = 0, 2  # the gathered slot itself holds id 0
  noise = tuple(np.zeros_like(n) for n in _noise(c, x, seed=0))
  refs = []
  for padding_idx in (0, None):
    tmodel = recbole_torch.build(dataclasses.asdict(c0), torch.from_numpy(np.asarray(table)))
    tmodel.load_state_dict(sd)
    tmodel.item_embedding.padding_idx = padding_idx
    _train_mode_torch(tmodel).moe_adaptor.noise = [torch.from_numpy(n) for n in noise]
    tmodel.calculate_loss(_t(seq), _t(lens), _t(x["pos_items"])).backward()
    refs.append(tmodel.item_embedding.weight.grad.numpy())
  _, g = _ours(c, params, "loss", seq, lens, x["pos_items"], table, deterministic=False,
               noise=tuple(map(jnp.asarray, noise)), grad=True)
  ours = np.asarray(g["item_embedding"]["embedding"])
  scale = float(np.abs(refs[0]).max())
  assert _maxdiff(ours, refs[0]) <= GRAD_RTOL * scale
  assert _maxdiff(ours[0], refs[1][0]) > 1e-3 * scale  # the quirk is visible here
  np.testing.assert_allclose(ours[1:], refs[1][1:], rtol=0, atol=GRAD_RTOL * scale)  # other rows: the same


@pytest.mark.parametrize("case", ["unisrec-inductive"])
def test_gating_noise_semantics(built, case):
  c = _no_dropout(CASES[case])
  _, _, params, table, x = built(case)
  args = (x["item_seq"], x["seq_len"], table)
  clean, clean_loss = _ours(c, params, "scores+loss", x["item_seq"], x["seq_len"], x["pos_items"], table)
  b, length = x["item_seq"].shape
  zeros = (jnp.zeros((b, length, c.n_exps)), jnp.zeros((c.n_items, c.n_exps)))
  # zero noise in training = the clean gates of eval mode
  train_loss, _ = _ours(c, params, "loss", x["item_seq"], x["seq_len"], x["pos_items"], table, deterministic=False,
                        noise=zeros, grad=True)
  assert abs(float(train_loss) - float(clean_loss)) <= 1e-6
  # drawn noise: from the dropout stream, reproducible, and it moves the scores
  drawn = [_ours(c, params, "scores", *args, deterministic=False, rng=jax.random.PRNGKey(s)) for s in (0, 0, 1)]
  assert _maxdiff(drawn[0], drawn[1]) == 0.0
  assert _maxdiff(drawn[0], clean) > 1e-3 and _maxdiff(drawn[0], drawn[2]) > 1e-3
  with pytest.raises(ValueError, match="only used in training"):
    _ours(c, params, "scores", *args, noise=zeros)
  with pytest.raises(ValueError, match="gating noise of shape"):
    _ours(c, params, "scores", *args, deterministic=False, noise=(zeros[0][:, :, :1], zeros[1]))


def test_dropout_active_in_training(built):
  c = CASES["sasrectext"]
  _, _, params, table, x = built("sasrectext")
  args = (x["item_seq"], x["seq_len"], table)
  run = lambda s: _ours(c, params, "scores", *args, deterministic=False, rng=jax.random.PRNGKey(s))
  eval_scores = _ours(c, params, "scores+loss", x["item_seq"], x["seq_len"], x["pos_items"], table)[0]
  assert _maxdiff(run(0), run(0)) == 0.0
  assert _maxdiff(run(0), eval_scores) > 1e-2 and _maxdiff(run(0), run(1)) > 1e-2


def test_bf16_compute_close_to_fp32(built):
  c = CASES["unisrec-transductive"]
  tmodel, _, params, table, x = built("unisrec-transductive")
  with torch.no_grad():
    ref = tmodel.full_sort_predict(_t(x["item_seq"]), _t(x["seq_len"])).numpy()
  out = _ours(c, params, "scores", x["item_seq"], x["seq_len"], table, dtype=jnp.bfloat16)
  assert out.dtype == jnp.float32
  d = _maxdiff(out, ref)
  assert 1e-4 < d <= 3e-2 * float(np.abs(ref).max())  # bf16 is in use, and close


# ----------------------------------------------------------------------------- converter


@pytest.mark.parametrize("case", list(CASES))
def test_converter_round_trip_bitwise(built, case):
  c = CASES[case]
  _, sd, params, table, _ = built(case)
  back = convert_sasrec.to_torch(params, c, table)
  assert set(back) == set(sd)
  for k, v in sd.items():
    assert back[k].dtype == np.float32 and back[k].shape == tuple(v.shape), k
    np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)
  # and ours -> torch -> ours (other values: every leaf moved)
  moved = jax.tree_util.tree_map(lambda a: np.asarray(a) * np.float32(1.5) + np.float32(0.01), params)
  again, table2 = convert_sasrec.to_jax(convert_sasrec.to_torch(moved, c, table), c)
  np.testing.assert_array_equal(table2, table)
  assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(moved)
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, moved)


def test_converter_takes_boxed_init_params(built):
  """A fresh `init_params` (logical-axis boxed) converts to RecBole's keys and back, bitwise; the seed's inits:
  LayerNorm 1 / 0, w_gate / w_noise / expert biases 0."""
  c = CASES["unisrec-transductive"]
  _, sd, _, table, _ = built("unisrec-transductive")
  fresh = jax.jit(sasrec.init_params, static_argnums=0)(c, jax.random.PRNGKey(3))
  assert all(isinstance(leaf, nn.Partitioned) for leaf in jax.tree_util.tree_leaves(
      fresh, is_leaf=lambda x: isinstance(x, nn.Partitioned)))
  out = convert_sasrec.to_torch(fresh, c, table)
  assert set(out) == set(sd)
  np.testing.assert_array_equal(out["LayerNorm.weight"], np.ones(c.hidden_size, np.float32))
  for k in ("moe_adaptor.w_gate", "moe_adaptor.w_noise", "moe_adaptor.experts.2.bias"):
    np.testing.assert_array_equal(out[k], np.zeros_like(out[k]))
  lin = out["moe_adaptor.experts.0.lin.weight"]
  assert 0.015 < float(lin.std()) < 0.025  # the seed's std 0.02 for the experts
  again, _ = convert_sasrec.to_jax(out, c)
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, jax.tree_util.tree_map(np.asarray, nn.unbox(fresh)))


def test_converter_key_names(built):
  """The RecBole names the map uses (Sequential indices, the experts' `lin`)."""
  _, sd, _, _, _ = built("sasrectext-deep-relu")
  assert {"adaptor.mlp_layers.1.weight", "adaptor.mlp_layers.4.bias", "adaptor.mlp_layers.7.weight",
          "trm_encoder.layer.0.feed_forward.dense_2.weight", "plm_embedding.weight"} <= set(sd)
  assert not any(k.startswith("item_embedding") for k in sd)
  _, sd, params, _, _ = built("unisrec-transductive")
  assert {"moe_adaptor.experts.3.bias", "moe_adaptor.experts.3.lin.weight", "moe_adaptor.w_gate",
          "moe_adaptor.w_noise", "item_embedding.weight"} <= set(sd)
  np.testing.assert_array_equal(params["moe_adaptor"]["experts_2"]["lin"]["kernel"],
                                sd["moe_adaptor.experts.2.lin.weight"].numpy().T)


def test_converter_errors(built):
  c = CASES["unisrec-transductive"]
  _, sd, params, table, _ = built("unisrec-transductive")
  missing = dict(sd)
  del missing["trm_encoder.layer.1.feed_forward.dense_1.bias"]
  with pytest.raises(ConversionError, match=r"missing keys: trm_encoder\.layer\.1\.feed_forward\.dense_1\.bias"):
    convert_sasrec.to_jax(missing, c)
  extra = dict(sd, **{"moe_adaptor.experts.9.bias": sd["moe_adaptor.experts.0.bias"]})
  with pytest.raises(ConversionError, match=r"unexpected keys: moe_adaptor\.experts\.9\.bias"):
    convert_sasrec.to_jax(extra, c)
  wrong = dict(sd, **{"position_embedding.weight": torch.zeros(c.max_seq_length + 1, c.hidden_size)})
  with pytest.raises(ConversionError, match=r"position_embedding\.weight \(6, 16\) -> position_embedding/embedding"):
    convert_sasrec.to_jax(wrong, c)
  wrong_lin = dict(sd, **{"moe_adaptor.experts.0.lin.weight": torch.zeros(c.plm_size, c.hidden_size)})
  with pytest.raises(ConversionError, match=r"moe_adaptor\.experts\.0\.lin\.weight"):
    convert_sasrec.to_jax(wrong_lin, c)
  no_plm = {k: v for k, v in sd.items() if k != "plm_embedding.weight"}
  with pytest.raises(ConversionError, match=r"missing keys: plm_embedding\.weight"):
    convert_sasrec.to_jax(no_plm, c)
  with pytest.raises(ConversionError, match=r"plm_embedding\.weight: shape \(8, 11\)"):
    convert_sasrec.to_jax(dict(sd, **{"plm_embedding.weight": torch.zeros(8, 11)}), c)
  # the other way: a param the map does not know, and a wrongly shaped one
  bad = jax.tree_util.tree_map(lambda a: a, params)
  bad["moe_adaptor"]["extra"] = np.zeros(3, np.float32)
  with pytest.raises(ConversionError, match="moe_adaptor/extra"):
    convert_sasrec.to_torch(bad, c, table)
  bad = jax.tree_util.tree_map(lambda a: a, params)
  bad["LayerNorm"]["scale"] = np.zeros(3, np.float32)
  with pytest.raises(ConversionError, match="LayerNorm.*scale.*expects"):
    convert_sasrec.to_torch(bad, c, table)
  # a config that does not match the checkpoint (SASRecText's keys for a UniSRec config)
  _, sd_text, _, _, _ = built("sasrectext")
  with pytest.raises(ConversionError, match=r"unexpected keys: adaptor\.mlp_layers\.1\.bias"):
    convert_sasrec.to_jax(sd_text, dataclasses.replace(c, plm_size=12, adaptor_layers=(12, 16), n_items=9,
                                                       max_seq_length=6))


# ----------------------------------------------------------------------------- config


def test_presets_are_the_seed_yaml():
  t = sasrec.SASRecConfig.sasrectext()
  assert (t.n_layers, t.n_heads, t.hidden_size, t.inner_size, t.hidden_dropout_prob, t.attn_dropout_prob) == \
      (2, 2, 64, 256, 0.5, 0.5)
  assert (t.hidden_act, t.layer_norm_eps, t.initializer_range, t.loss_type) == ("gelu", 1e-12, 0.02, "CE")
  assert (t.plm_size, t.adaptor, t.adaptor_layers, t.adaptor_dropout_prob, t.max_seq_length) == \
      (768, "mlp", (768, 300, 64), 0.2, 50)
  u = sasrec.SASRecConfig.unisrec(n_items=5)
  assert (u.hidden_size, u.inner_size, u.n_layers, u.n_heads, u.hidden_dropout_prob) == (300, 256, 2, 2, 0.5)
  assert (u.adaptor, u.adaptor_layers, u.n_exps, u.temperature, u.train_stage, u.n_items) == \
      ("moe", (768, 300), 8, 0.07, "inductive_ft", 5)
  assert sasrec.SASRecConfig.unisrec(adaptor_layers=[768, 300]).adaptor_layers == (768, 300)  # yaml lists


@pytest.mark.parametrize("over,msg", [
    ({"adaptor": "linear"}, "unknown adaptor 'linear'"),
    ({"adaptor_layers": (700, 300, 64)}, r"adaptor_layers\[0\] = 700 != plm_size 768"),
    ({"adaptor_layers": (768, 300, 32)}, r"adaptor_layers\[-1\] = 32 != hidden_size 64"),
    ({"adaptor_layers": (64,), "plm_size": 64}, "adaptor_layers needs >= 2"),
    ({"n_heads": 3}, "hidden_size 64 is not divisible by n_heads 3"),
    ({"train_stage": "pretrain"}, "train_stage 'pretrain' is not supported"),
    ({"train_stage": "transductive_ft", "n_items": 10}, "needs adaptor 'moe'"),
    ({"hidden_act": "sigmoid"}, "hidden_act 'sigmoid' is not supported"),
    ({"loss_type": "BPR"}, "loss_type 'BPR'"),
    ({"hidden_dropout_prob": 1.0}, r"hidden_dropout_prob must be in \[0, 1\)"),
    ({"n_layers": 0}, "n_layers must be >= 1"),
])
def test_config_errors_sasrectext(over, msg):
  with pytest.raises(ValueError, match=msg):
    sasrec.SASRecConfig.sasrectext(**over)


@pytest.mark.parametrize("over,msg", [
    ({"adaptor_layers": (768, 300, 300)}, r"adaptor 'moe' takes adaptor_layers \[plm_size, hidden_size\]"),
    ({"train_stage": "transductive_ft"}, "n_items must be >= 2"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"n_exps": 0}, "n_exps must be >= 1"),
])
def test_config_errors_unisrec(over, msg):
  with pytest.raises(ValueError, match=msg):
    sasrec.SASRecConfig.unisrec(**over)


def test_runtime_input_errors(built):
  c = CASES["sasrectext"]
  _, _, params, table, x = built("sasrectext")
  long_seq = np.ones((1, c.max_seq_length + 1), np.int64)
  with pytest.raises(ValueError, match="sequence length 7 > max_seq_length 6"):
    _ours(c, params, "scores", long_seq, np.array([7]), table)
  b, length = x["item_seq"].shape
  with pytest.raises(ValueError, match="'mlp' adaptor"):
    _ours(c, params, "scores", x["item_seq"], x["seq_len"], table, deterministic=False,
          noise=(jnp.zeros((b, length, 2)), jnp.zeros((c.n_items, 2))))
  ct = CASES["unisrec-transductive"]
  _, _, params_t, table_t, xt = built("unisrec-transductive")
  with pytest.raises(ValueError, match="plm_table has 5 rows; transductive_ft needs n_items = 8"):
    _ours(ct, params_t, "scores", xt["item_seq"], xt["seq_len"], table_t[:5])
