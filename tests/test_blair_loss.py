"""BLaIR objective parity: `BlairTask.loss_fn` vs a PyTorch re-implementation of the seed's
`RobertaForCL.cl_forward` (hyp1231/AmazonReviews2023 `blair/simcse/models.py`), on a tiny RoBERTa
loaded from one HF dir; plus the MLM masking statistics of `BlairTask.mask_for_mlm`.

Seed objective (shared/reference/blair.md §2): z = tanh(mlp(CLS)), cos-sim / temp (0.05), CE
review -> meta with target i; MLM on masked copies of both sentences through `lm_head`, CE with
ignore_index -100 over flattened logits; total = cl + 0.1 * mlm.
"""

from __future__ import annotations

import math
import os
import pathlib
import sys
import types

os.environ["TRANSFORMERS_VERBOSITY"] = "error"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from fixtures import CORPUS, make_hf_dir  # noqa: E402
from mmret_jax.tasks.blair import BlairTask, TokenizePairs  # noqa: E402
from mmret_jax.train.partitioning import make_mesh  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "configs"))
import blair_base  # noqa: E402  pylint: disable=wrong-import-position

BATCH = 6
MAX_LEN = 24
TOL = 1e-5

EXTRA = ["great value", "would buy again", "arrived late", "works as described", "blue color",
         "small size", "for the kitchen", "gift for my son", "easy to clean", "sturdy build"]


def _write_pairs(path: pathlib.Path, n: int = 40) -> pathlib.Path:
  """Distinct texts within the first MAX_LEN tokens; every third review / fourth meta is short
  (padded), the rest are truncated."""
  lines = ["review\tmeta"]
  for i in range(n):
    review = f"{EXTRA[i % len(EXTRA)]} {i}, {CORPUS[i % len(CORPUS)]}" if i % 3 else f"{EXTRA[i % len(EXTRA)]} {i}"
    meta = f"Model {i} {EXTRA[(7 * i + 3) % len(EXTRA)]}"
    if i % 4:
      meta += f" {CORPUS[(3 * i + 1) % len(CORPUS)]}"
    lines.append(f"{review}\t{meta}")
  path.write_text("\n".join(lines) + "\n")
  return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A tiny RobertaForMaskedLM dir, a 40-row pairs TSV, a workdir, and a cache of the init."""
  root = tmp_path_factory.mktemp("blair")
  hf_dir = root / "hf"
  model, _ = make_hf_dir(hf_dir, "roberta", head="mlm", seed=3)
  # At init_range 0.02 a tiny random RoBERTa maps every input to nearly the same CLS vector
  # (all cosines ~0.999, CE = log(batch), vanishing grads): scale the encoder's matrices up so
  # the contrastive logits are far from degenerate, and save the dir again.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.startswith("roberta.encoder.") and name.endswith(".weight") and "LayerNorm" not in name:
        p.mul_(20.0)
  model.save_pretrained(hf_dir)
  tsv = _write_pairs(root / "pairs.tsv")
  return types.SimpleNamespace(hf_dir=hf_dir, tsv=tsv, workdir=root / "work", init=None)


def _task(setup, **loss_overrides) -> BlairTask:
  c = blair_base.get_config("smoke")
  with c.unlocked():
    c.init_from = str(setup.hf_dir)
    c.tokenizer = ""
    c.data.train_file = str(setup.tsv)
    c.data.max_seq_length = MAX_LEN
    c.model.dropout = 0.0
    c.model.dtype = "float32"
    for k, v in loss_overrides.items():
      c.loss[k] = v
  mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  return BlairTask(c, mesh, setup.workdir)


def _params(setup, task: BlairTask):
  """task.init_params (unboxed, on the host) then task.load_init. Initialising costs seconds on
  CPU, so it runs once per module: with learnable_temp on, whose params are a superset."""
  rng = jax.random.PRNGKey(0)
  if setup.init is None:
    full = _task(setup, learnable_temp=True)
    setup.init = jax.device_get(nn.unbox(jax.jit(full.init_params)(rng)))
  host = dict(setup.init)
  if not task.config.loss.learnable_temp:
    del host["logit_scale"]
  expected = jax.eval_shape(lambda r: nn.unbox(task.init_params(r)), rng)
  assert jax.tree.structure(expected) == jax.tree.structure(host)
  return jax.tree.map(jnp.asarray, task.load_init(host))


def _batch(task: BlairTask) -> dict[str, np.ndarray]:
  tok = TokenizePairs(task.tokenizer, MAX_LEN)
  rows = [tok.map(task.source[int(i)]) for i in task.train_idx[:BATCH]]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class TorchBlair(torch.nn.Module):
  """The seed's RobertaForCL (pooler `cls`, do_mlm) forward, with our weights."""

  def __init__(self, hf_dir, params, temp=0.05, mlm_weight=0.1, symmetric=False):
    super().__init__()
    from transformers import RobertaForMaskedLM  # pylint: disable=import-outside-toplevel
    mlm = RobertaForMaskedLM.from_pretrained(str(hf_dir), attn_implementation="eager")
    self.roberta, self.lm_head = mlm.roberta, mlm.lm_head  # RobertaModel(add_pooling_layer=False)
    assert self.roberta.pooler is None
    h = mlm.config.hidden_size
    self.mlp = torch.nn.Sequential(torch.nn.Linear(h, h), torch.nn.Tanh())  # MLPLayer
    dense = params["encoder"]["mlp"]["dense"]
    with torch.no_grad():
      self.mlp[0].weight.copy_(torch.from_numpy(np.asarray(dense["kernel"]).T.copy()))
      self.mlp[0].bias.copy_(torch.from_numpy(np.asarray(dense["bias"]).copy()))
    self.cos = torch.nn.CosineSimilarity(dim=-1)
    self.temp, self.mlm_weight, self.symmetric = temp, mlm_weight, symmetric
    self.vocab_size = mlm.config.vocab_size
    self.eval()  # dropout off (ours runs train=True with dropout 0)

  def forward(self, input_ids, attention_mask, mlm_input_ids, mlm_labels):
    """All inputs [bs, 2, L] (review, meta), flattened to [bs * 2, L] as the seed does."""
    bs, num_sent, length = input_ids.shape
    flat_mask = attention_mask.view(-1, length)
    out = self.roberta(input_ids.view(-1, length), attention_mask=flat_mask)
    pooled = self.mlp(out.last_hidden_state[:, 0]).view(bs, num_sent, -1)
    z1, z2 = pooled[:, 0], pooled[:, 1]
    cos_sim = self.cos(z1.unsqueeze(1), z2.unsqueeze(0)) / self.temp
    labels = torch.arange(bs)
    ce = torch.nn.CrossEntropyLoss()
    cl_one_way = ce(cos_sim, labels)  # the seed: review -> meta only
    cl = 0.5 * (cl_one_way + ce(cos_sim.T, labels)) if self.symmetric else cl_one_way
    mlm_out = self.roberta(mlm_input_ids.view(-1, length), attention_mask=flat_mask)
    scores = self.lm_head(mlm_out.last_hidden_state)
    mlm = ce(scores.view(-1, self.vocab_size), mlm_labels.view(-1, length).view(-1))
    return {"loss": cl + self.mlm_weight * mlm, "cl": cl, "mlm": mlm, "cl_one_way": cl_one_way}


def _pairs_layout(x: np.ndarray, b: int) -> torch.Tensor:
  """[2b, L] (reviews then metas, our layout) -> [b, 2, L] (the seed's layout)."""
  x = np.asarray(x)
  return torch.from_numpy(np.stack([x[:b], x[b:]], axis=1).astype(np.int64))


def _compare(setup, symmetric=False, learnable_temp=False, check_grads=False) -> dict[str, float]:
  """Runs our loss_fn and the torch seed loss on the same batch / masked copies; returns our aux."""
  task = _task(setup, symmetric=symmetric, learnable_temp=learnable_temp)
  params = _params(setup, task)
  if learnable_temp:
    np.testing.assert_allclose(float(jnp.exp(params["logit_scale"])), 20.0, rtol=1e-6)
  batch = _batch(task)
  jbatch = {k: jnp.asarray(v) for k, v in batch.items() if k != "index"}
  assert (batch["review_mask"] == 0).any() and (batch["meta_mask"] == 0).any()  # some padding
  assert (batch["review_mask"] == 1).all(1).any()  # and some truncation
  rng = jax.random.PRNGKey(1234)

  def fn(p, b, r):
    return task.loss_fn(p, b, r, train=True)
  if check_grads:
    (loss, aux), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params, jbatch, rng)
  else:
    loss, aux = jax.jit(fn)(params, jbatch, rng)

  # Non-degenerate contrastive logits (cosines spread out, not all ~1).
  ids = jnp.concatenate([jbatch["review_ids"], jbatch["meta_ids"]], 0)
  mask = jnp.concatenate([jbatch["review_mask"], jbatch["meta_mask"]], 0)
  z = np.asarray(task.embed(params, ids, mask))
  z = z / np.linalg.norm(z, axis=1, keepdims=True)
  cos = z[:BATCH] @ z[BATCH:].T
  assert cos.max() - cos.min() > 0.3, cos  # logits spread over > 6 nats at temp 0.05

  # The masked copies loss_fn builds internally (same rng split, review ids then meta ids).
  _, r_mask, _ = jax.random.split(rng, 3)
  mids, labels = task.mask_for_mlm(r_mask, ids)
  assert int((np.asarray(labels) != -100).sum()) > 0

  model = TorchBlair(setup.hf_dir, params, temp=float(task.config.loss.temp), symmetric=symmetric)
  b = batch["review_ids"].shape[0]
  t_ids = _pairs_layout(np.concatenate([batch["review_ids"], batch["meta_ids"]]), b)
  t_mask = _pairs_layout(np.concatenate([batch["review_mask"], batch["meta_mask"]]), b)
  t = model(t_ids, t_mask, _pairs_layout(mids, b), _pairs_layout(labels, b))
  t_loss, t_cl, t_mlm = t["loss"], t["cl"], t["mlm"]

  diffs = {"loss": abs(float(loss) - t_loss.item()),
           "cl_loss": abs(float(aux["cl_loss"]) - t_cl.item()),
           "mlm_loss": abs(float(aux["mlm_loss"]) - t_mlm.item())}
  print(f"symmetric={symmetric} learnable_temp={learnable_temp}: loss={float(loss):.6f} "
        f"(cl {float(aux['cl_loss']):.6f}, mlm {float(aux['mlm_loss']):.6f}) torch={t_loss.item():.6f} "
        f"diffs={ {k: f'{v:.2e}' for k, v in diffs.items()} }")
  for k, d in diffs.items():
    assert d <= TOL, (k, d)
  np.testing.assert_allclose(float(loss), float(aux["cl_loss"]) + 0.1 * float(aux["mlm_loss"]), rtol=1e-6)
  if learnable_temp:
    np.testing.assert_allclose(float(aux["temperature"]), 0.05, rtol=1e-6)

  if check_grads:
    t_loss.backward()
    pairs = {
        "mlp/dense/kernel": (grads["encoder"]["mlp"]["dense"]["kernel"], model.mlp[0].weight.grad.T),
        "mlp/dense/bias": (grads["encoder"]["mlp"]["dense"]["bias"], model.mlp[0].bias.grad),
        # The MLM head only sees the MLM term: checks the masked copies and the 0.1 weight.
        "lm_head/dense/kernel": (grads["encoder"]["lm_head"]["dense"]["kernel"],
                                 model.lm_head.dense.weight.grad.T),
    }
    # Inside the encoder: the custom GELU gradient (layers.bias_gelu), the fused q/k/v matmul
    # (layers.fused_projections) and the word embeddings (lookup + tied MLM decoder).
    enc, layer = grads["encoder"]["encoder"]["layer_0"], model.roberta.encoder.layer[0]
    pairs.update({
        "layer_0/intermediate/dense/kernel": (enc["intermediate"]["dense"]["kernel"],
                                              layer.intermediate.dense.weight.grad.T),
        "layer_0/intermediate/dense/bias": (enc["intermediate"]["dense"]["bias"],
                                            layer.intermediate.dense.bias.grad),
        "layer_0/attention/self/query/kernel": (enc["attention"]["self"]["query"]["kernel"],
                                                layer.attention.self.query.weight.grad.T),
        "layer_0/attention/self/value/bias": (enc["attention"]["self"]["value"]["bias"],
                                              layer.attention.self.value.bias.grad),
        "embeddings/word_embeddings": (grads["encoder"]["embeddings"]["word_embeddings"]["embedding"],
                                       model.roberta.embeddings.word_embeddings.weight.grad),
    })
    for name, (ours, theirs) in pairs.items():
      ours, theirs = np.asarray(ours), theirs.numpy()
      scale = np.abs(theirs).max()
      print(f"grad {name}: max|diff|={np.abs(ours - theirs).max():.3e} max|g|={scale:.3e}")
      assert scale > 1e-3, name  # a real signal, not two ~zeros
      # float32 noise: torch float32 itself is ~2e-6 * max|g| from a float64 torch run here, so
      # the absolute slack is relative to the gradient's scale (a flat 1e-6 is below that floor).
      np.testing.assert_allclose(ours, theirs, atol=1e-5 * scale, rtol=1e-4, err_msg=name)
  return {"aux": {k: float(v) for k, v in aux.items()}, "torch_cl_one_way": t["cl_one_way"].item()}


def test_loss_and_grad_match_seed_torch(setup):
  _compare(setup, check_grads=True)


def test_symmetric_matches_torch_symmetric(setup):
  out = _compare(setup, symmetric=True)
  # the meta -> review term is really there
  assert abs(out["aux"]["cl_loss"] - out["torch_cl_one_way"]) > 0.1


def test_learnable_temp_at_init_equals_fixed_temp(setup):
  _compare(setup, learnable_temp=True)


def test_init_from_copies_roberta_and_leaves_mlp_fresh(setup):
  task = _task(setup)
  params = _params(setup, task)
  from transformers import RobertaForMaskedLM  # pylint: disable=import-outside-toplevel
  hf = RobertaForMaskedLM.from_pretrained(str(setup.hf_dir))
  sd = {k: v.numpy() for k, v in hf.state_dict().items()}
  enc = params["encoder"]
  np.testing.assert_array_equal(enc["embeddings"]["word_embeddings"]["embedding"],
                                sd["roberta.embeddings.word_embeddings.weight"])
  np.testing.assert_array_equal(enc["lm_head"]["dense"]["kernel"], sd["lm_head.dense.weight"].T)
  np.testing.assert_array_equal(enc["lm_head"]["bias"], sd["lm_head.bias"])
  assert not any(k.startswith("mlp.") for k in sd)
  assert float(jnp.abs(enc["mlp"]["dense"]["kernel"]).max()) > 0


def test_mlm_masking_statistics(setup):
  task = _task(setup)
  vocab = task.model_config.vocab_size
  special = np.asarray(task.special_ids)
  mask_id = int(task.tokenizer.mask_token_id)
  assert mask_id in special
  rs = np.random.RandomState(0)
  ids = rs.randint(0, vocab, size=(512, 512)).astype(np.int32)
  ids[:, 0], ids[:, -1], ids[:, -40:-1] = task.tokenizer.bos_token_id, task.tokenizer.eos_token_id, \
      task.tokenizer.pad_token_id
  out, labels = task.mask_for_mlm(jax.random.PRNGKey(7), jnp.asarray(ids))
  out, labels = np.asarray(out), np.asarray(labels)
  is_special = np.isin(ids, special)
  assert is_special.sum() > 512 * 41  # bos, eos, pads plus the random special ids

  # Specials are never selected nor changed.
  assert (labels[is_special] == -100).all()
  assert (out[is_special] == ids[is_special]).all()
  picked = labels != -100
  np.testing.assert_array_equal(labels[picked], ids[picked])
  assert (out[~picked] == ids[~picked]).all()  # unselected tokens untouched
  assert out.min() >= 0 and out.max() < vocab

  def check(name, count, n, p):
    frac, std = count / n, np.sqrt(p * (1 - p) / n)
    print(f"{name}: {frac:.4f} (expected {p:.4f}, std {std:.4f}, n={n})")
    assert abs(frac - p) < 5 * std, (name, frac, p, std)

  n_cand = int((~is_special).sum())
  n_pick = int(picked.sum())
  check("selected / non-special", n_pick, n_cand, 0.15)
  # A random replacement equals the original / the mask id with probability 1 / vocab each.
  n_mask = int((out[picked] == mask_id).sum())
  n_same = int((out[picked] == ids[picked]).sum())
  check("<mask> / selected", n_mask, n_pick, 0.8 + 0.1 / vocab)
  check("unchanged / selected", n_same, n_pick, 0.1 + 0.1 / vocab)
  check("random / selected", n_pick - n_mask - n_same, n_pick, 0.1 * (1 - 2 / vocab))


def test_mlm_prediction_cap():
  from mmret_jax import losses  # pylint: disable=import-outside-toplevel
  for tokens in (16, 24, 64, 128, 512, 4096):
    cap = losses.mlm_prediction_cap(tokens, 0.15)
    assert cap < tokens
    # Exact binomial tail (in logs): a group of `tokens` maskable positions overflows with p < 1e-7.
    logpmf = lambda k, n=tokens: (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                                  + k * math.log(0.15) + (n - k) * math.log(0.85))
    tail = sum(math.exp(logpmf(k)) for k in range(cap + 1, tokens + 1))
    assert tail < 1e-7, (tokens, cap, tail)
  assert losses.mlm_prediction_cap(64, 0.15) == 28 and losses.mlm_prediction_cap(4096, 0.15) == 753
  assert losses.mlm_prediction_cap(64, 0.15, -1) == 64
  assert losses.mlm_prediction_cap(64, 0.15, 10) == 10
  assert losses.mlm_prediction_cap(128, 0.15, 10, rows=2) == 20
  assert losses.mlm_prediction_cap(8, 0.15, 10) == 8
  with pytest.raises(ValueError, match="mlm_max_predictions"):
    losses.mlm_prediction_cap(64, 0.15, -3)


@pytest.mark.parametrize("groups", [None, 1, 7])
def test_select_mlm_positions_keeps_the_loss_and_counts_overflow(groups):
  from mmret_jax import losses  # pylint: disable=import-outside-toplevel
  rs = np.random.RandomState(5)
  b, length, vocab = 7, 20, 11
  labels = np.where(rs.rand(b, length) < 0.3, rs.randint(0, vocab, (b, length)), -100).astype(np.int32)
  labels[0] = -100  # a row with nothing to predict
  labels[1] = -100
  labels[1, 3:15] = 3  # a row with 12 labels
  logits = rs.randn(b, length, vocab).astype(np.float32)
  full = float(losses.masked_lm_loss(jnp.asarray(logits), jnp.asarray(labels)))
  g = b if groups is None else groups
  flat_labels, flat_logits = labels.reshape(g, -1), logits.reshape(g, -1, vocab)
  counts = (flat_labels != -100).sum(1)
  n = flat_labels.shape[1]
  for cap in (int(counts.max()), int(counts.max()) + 3, n):
    pos, sel, dropped = losses.select_mlm_positions(jnp.asarray(labels), cap, groups)
    pos, sel = np.asarray(pos), np.asarray(sel)
    assert pos.shape == (g, cap) and int(dropped) == 0
    if cap == n:  # no selection: every position, as is
      np.testing.assert_array_equal(pos, np.broadcast_to(np.arange(n), (g, n)))
    # Otherwise every labelled position is selected once, in order, with its label.
    for r in range(g if cap < n else 0):
      np.testing.assert_array_equal(pos[r, :counts[r]], np.flatnonzero(flat_labels[r] != -100))
      assert (sel[r, counts[r]:] == -100).all()
    got = float(losses.masked_lm_loss(jnp.asarray(np.take_along_axis(flat_logits, pos[..., None], 1)),
                                      jnp.asarray(sel)))
    np.testing.assert_allclose(got, full, rtol=1e-6)
  cap = 4
  _, sel, dropped = losses.select_mlm_positions(jnp.asarray(labels), cap, groups)
  assert int(dropped) == int(np.maximum(counts - cap, 0).sum()) > 0
  assert int((np.asarray(sel) != -100).sum()) == int(np.minimum(counts, cap).sum())
  with pytest.raises(ValueError, match="MLM groups"):
    losses.select_mlm_positions(jnp.asarray(labels), cap, 3)


def test_capped_mlm_head_equals_full_head_in_the_task(setup):
  """The task's loss with the auto cap (head at <= cap positions per row) equals the seed's
  full-sequence head (-1) on the same batch and rng; a too-small cap is counted, not silent."""
  batch = {k: jnp.asarray(v) for k, v in _batch(_task(setup)).items() if k != "index"}
  rng = jax.random.PRNGKey(99)
  out = {}
  for cap in (-1, 0, 2):
    task = _task(setup, mlm_max_predictions=cap)
    params = _params(setup, task)
    out[cap] = jax.jit(lambda p, b, r, t=task: t.loss_fn(p, b, r, train=True))(params, batch, rng)
  from mmret_jax import losses  # pylint: disable=import-outside-toplevel
  assert losses.mlm_prediction_cap(2 * BATCH * MAX_LEN, 0.15) < 2 * BATCH * MAX_LEN  # parity tests use the cap
  (l_full, a_full), (l_auto, a_auto), (_, a_two) = out[-1], out[0], out[2]
  np.testing.assert_allclose(float(l_auto), float(l_full), rtol=2e-6)
  np.testing.assert_allclose(float(a_auto["mlm_loss"]), float(a_full["mlm_loss"]), rtol=2e-6)
  assert float(a_full["mlm_overflow"]) == float(a_auto["mlm_overflow"]) == 0.0
  assert float(a_two["mlm_overflow"]) > 0
