"""Bi-BLIP4CIR (`tasks/cir.py`): the Combiner and both stages' losses against PyTorch versions of the seed's
formulas; the optimizer's groups and per-epoch cosine; the two stages end to end on the bundled real val
annotations with generated images (features cached, resume exact, missing images counted); the eval and
submission command lines."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mmret_jax import losses
from mmret_jax.models import combiner as combiner_lib
from mmret_jax.train import loop, optim
from mmret_jax.train.metrics import read_metrics

from fixtures import override

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import cir_cirr  # noqa: E402  pylint: disable=wrong-import-position
import cir_fashioniq  # noqa: E402  pylint: disable=wrong-import-position

F = torch.nn.functional


# ----------------------------------------------------------------------------- the seed's formulas in PyTorch
class TorchCombiner(torch.nn.Module):
  """Bi-BLIP4CIR `src/combiner.py` as the reference describes it (dropout off in these tests)."""

  def __init__(self, d, p, h):
    super().__init__()
    self.text_projection_layer = torch.nn.Linear(d, p)
    self.image_projection_layer = torch.nn.Linear(d, p)
    self.combiner_layer = torch.nn.Linear(2 * p, h)
    self.output_layer = torch.nn.Linear(h, d)
    self.dynamic_scalar = torch.nn.Sequential(torch.nn.Linear(2 * p, h), torch.nn.ReLU(), torch.nn.Dropout(0.5),
                                              torch.nn.Linear(h, 1), torch.nn.Sigmoid())

  def combine_features(self, i, t):
    tp = F.relu(self.text_projection_layer(t))
    ip = F.relu(self.image_projection_layer(i))
    raw = torch.cat((tp, ip), -1)
    lam = self.dynamic_scalar(raw)
    return F.normalize(self.output_layer(F.relu(self.combiner_layer(raw))) + lam * t + (1 - lam) * i, dim=-1)


def seed_losses(ref, tgt, txt_f, txt_b, combine, stage):
  """The seed's loss code (clip_fine_tune.py stage I, combiner_train.py stage II), B x B x D tensors included."""
  b = ref.shape[0]
  gt = torch.arange(b)
  t_n = F.normalize(tgt, dim=-1)
  loss_f = F.cross_entropy(100 * combine(ref, txt_f) @ t_n.T, gt)
  t_rev = t_n if stage == 1 else tgt  # stage I feeds normalised targets to the reversed query
  tij = t_rev.unsqueeze(1).repeat(1, b, 1).transpose(0, 1)
  ti = txt_b.unsqueeze(1).repeat(1, b, 1)
  ri = F.normalize(ref, dim=-1).unsqueeze(1).repeat(1, b, 1).unsqueeze(-1)
  pi = combine(tij, ti).unsqueeze(-2)
  logits_r = (100 * pi @ ri).squeeze()
  return loss_f, F.cross_entropy(logits_r, gt)


def _feats(b=6, d=12, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal((b, d)).astype(np.float32) * s for s in (0.7, 0.5, 0.3, 0.4)]


def test_stage1_losses_match_the_seed():
  ref, tgt, txt_f, txt_b = _feats()
  want = seed_losses(*map(torch.tensor, (ref, tgt, txt_f, txt_b)),
                     combine=lambda i, t: F.normalize(i + t, dim=-1), stage=1)
  got = losses.cir_sum_losses(ref, tgt, txt_f, txt_b)
  for g, w in zip(got, want):
    assert abs(float(g) - float(w)) <= 1e-5, (float(g), float(w))
  assert float(want[1]) > 0.1  # not a degenerate case


def test_combiner_and_stage2_losses_match_the_seed():
  cfg = combiner_lib.CombinerConfig(feature_dim=12, projection_dim=20, hidden_dim=24, dropout=0.5)
  model = combiner_lib.Combiner(cfg)
  params = jax.device_get(nn.unbox(combiner_lib.init_params(model, jax.random.PRNGKey(0))))
  params = jax.tree.map(lambda x: x + 0.05 * np.random.default_rng(1).standard_normal(x.shape).astype(np.float32),
                        params)  # non-zero biases
  tm = TorchCombiner(12, 20, 24).eval()
  names = {"text_projection_layer": tm.text_projection_layer, "image_projection_layer": tm.image_projection_layer,
           "combiner_layer": tm.combiner_layer, "output_layer": tm.output_layer,
           "dynamic_scalar_0": tm.dynamic_scalar[0], "dynamic_scalar_3": tm.dynamic_scalar[3]}
  with torch.no_grad():
    for name, lin in names.items():
      lin.weight.copy_(torch.tensor(np.asarray(params[name]["kernel"]).T))
      lin.bias.copy_(torch.tensor(np.asarray(params[name]["bias"])))
  ref, tgt, txt_f, txt_b = _feats()
  combine = lambda i, t: model.apply({"params": params}, i, t)
  np.testing.assert_allclose(np.asarray(combine(ref, txt_f)),
                             tm.combine_features(torch.tensor(ref), torch.tensor(txt_f)).detach().numpy(),
                             atol=1e-5, rtol=0)
  got = losses.cir_combiner_losses(combine, ref, tgt, txt_f, txt_b)
  want = seed_losses(*map(torch.tensor, (ref, tgt, txt_f, txt_b)), combine=tm.combine_features, stage=2)
  for g, w in zip(got, want):
    assert abs(float(g) - float(w.detach())) <= 1e-5, (float(g), float(w.detach()))
  # dropout on: a train call differs from eval, and is a function of the key
  r = jax.random.PRNGKey(3)
  train = lambda key: model.apply({"params": params}, ref, txt_f, deterministic=False, rngs={"dropout": key})
  assert not np.allclose(np.asarray(train(r)), np.asarray(combine(ref, txt_f)))
  np.testing.assert_array_equal(np.asarray(train(r)), np.asarray(train(r)))


def test_epoch_cosine_and_lr_groups():
  """Seed `cosine_lr_schedule(..., onlyGroup0=True)`, called per epoch: the text encoder follows the
  unclamped cosine (back up after max_epoch), text_proj keeps 100x the base rate."""
  c = cir_cirr.get_config("stage1").optim
  sched = optim.make_schedule(c, total_steps=100, steps_per_epoch=5)
  seed = lambda e: 5e-5 * 0.5 * (1 + np.cos(np.pi * e / 10))
  for step in (0, 4, 5, 49, 50, 51, 99):
    assert float(sched(step)) == pytest.approx(seed(step // 5), rel=1e-6, abs=1e-12)  # float32
  assert float(sched(50)) == pytest.approx(0.0, abs=1e-12) and float(sched(99)) > 4e-5  # the restart
  clamped = override(cir_cirr.get_config("stage1"), {"optim.cosine_clamp": True}).optim
  assert float(optim.make_schedule(clamped, 100, 5)(99)) == pytest.approx(0.0, abs=1e-12)
  params = {"text_encoder": {"w": jnp.ones((3,))}, "text_proj": {"kernel": jnp.ones((3,))}}
  grads = jax.tree.map(lambda x: 0.5 * x, params)
  tx, _ = optim.make_optimizer(c, total_steps=100, steps_per_epoch=5)
  state = tx.init(params)
  for step in range(12):  # first step of epoch 0, then into epoch 2
    updates, state = tx.update(grads, state, params)
    if step in (0, 11):
      # Adam's first steps move each weight by ~lr (plus decoupled weight decay lr * 0.05 * w)
      enc, proj = float(-updates["text_encoder"]["w"][0]), float(-updates["text_proj"]["kernel"][0])
      assert proj == pytest.approx(5e-3 * 1.05, rel=1e-3)
      assert enc == pytest.approx(seed(step // 5) * 1.05, rel=1e-3)


# ----------------------------------------------------------------------------- both stages on the smoke config
def tiny(cfg_module, tmp, **over):
  c = cir_cirr.get_config("smoke") if cfg_module is cir_cirr else cir_fashioniq.get_config("smoke")
  base = {"data.feature_cache": str(tmp / "features"), "data.image_root": str(tmp / "images"),
          "data.max_train_queries": 32, "data.max_eval_queries": 32, "total_steps": 24, "log_every": 4,
          "checkpoint_every": 12, "checkpoint.async_save": False, "batch_size": 8, "optim.cosine_epochs": 10}
  c = override(c, {**base, **over})
  c.then = None
  return c


def losses_of(workdir):
  return [r["loss"] for r in read_metrics(workdir) if "loss" in r]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("cir")
  c = tiny(cir_cirr, tmp, total_steps=60, **{"optim.learning_rate": 1e-3})
  res = loop.train_and_evaluate(c, tmp / "s1")
  return tmp, c, res


def test_stage1_learns_exports_and_caches(stage1, capsys):
  tmp, c, res = stage1
  ls = losses_of(tmp / "s1")
  assert len(ls) == 15 and np.mean(ls[-3:]) < 0.6 * np.mean(ls[:3])
  rows = read_metrics(tmp / "s1")
  assert {"loss_forward", "loss_reversed", "lr"} <= set(rows[0])
  ev = res.eval
  for k in ("recall_at1", "recall_at5", "recall_at10", "recall_at50", "group_recall_at1", "recall_mean"):
    assert 0.0 <= ev[f"eval/{k}"] <= 100.0
  assert ev["eval/recall_mean"] == pytest.approx((ev["eval/recall_at5"] + ev["eval/group_recall_at1"]) / 2)
  model = tmp / "s1" / "model"
  info = json.loads((model / "cir.json").read_text())
  assert info["fusion"] == "sum" and info["stage"] == 1 and (model / "mmret_jax.json").exists()
  # The same run again finds its image features in the cache; other weights get a new entry.
  capsys.readouterr()
  loop.train_and_evaluate(tiny(cir_cirr, tmp, total_steps=2), tmp / "again")
  assert "cached features" in capsys.readouterr().err
  loop.train_and_evaluate(tiny(cir_cirr, tmp, total_steps=2, seed=5), tmp / "other")
  entries = sorted(p.name for p in (tmp / "features").iterdir() if p.name.startswith("cirr-image"))
  assert len(entries) == 2


def test_resume_is_bitwise_both_stages(stage1):
  tmp, _, _ = stage1
  for stage, over in ((1, {}), (2, {"cir.stage": 2, "init_from": str(tmp / "s1"), "optim.lr_groups": (),
                                    "optim.schedule": "constant", "cir.combiner_dropout": 0.5})):
    full = loop.train_and_evaluate(tiny(cir_cirr, tmp, **over), tmp / f"full{stage}")
    loop.train_and_evaluate(tiny(cir_cirr, tmp, stop_at_step=12, **over), tmp / f"res{stage}")
    res = loop.train_and_evaluate(tiny(cir_cirr, tmp, **over), tmp / f"res{stage}")
    assert losses_of(tmp / f"full{stage}") == losses_of(tmp / f"res{stage}")
    for a, b in zip(jax.tree.leaves(full.state.params), jax.tree.leaves(res.state.params)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert (tmp / "full2" / "model" / "combiner").is_dir()
  assert json.loads((tmp / "full2" / "model" / "cir.json").read_text())["fusion"] == "combiner"


def test_fashioniq_stage2_and_missing_images(tmp_path, capsys):
  c = tiny(cir_fashioniq, tmp_path, total_steps=4, **{"data.categories": ("dress",)})
  loop.train_and_evaluate(c, tmp_path / "s1")
  # two images of the training triplets go missing: counted and skipped, no crash
  from mmret_jax.data.sources import cir as cir_data  # pylint: disable=import-outside-toplevel
  data = cir_data.load("fashioniq", cir_data.sample_root("fashioniq"), image_root=tmp_path / "images",
                       categories=("dress",))
  for q in data.queries[:2]:
    data.image_path(q.target).unlink()
  c2 = tiny(cir_fashioniq, tmp_path, total_steps=4, **{
      "data.categories": ("dress",), "data.synthetic_images": False, "cir.stage": 2, "init_from": str(tmp_path / "s1"),
      "optim.lr_groups": (), "optim.schedule": "constant"})
  capsys.readouterr()
  res = loop.train_and_evaluate(c2, tmp_path / "s2")
  err = capsys.readouterr().err
  assert "2 of " in err and "images are missing or unreadable" in err
  assert "2 training triplets skipped (missing images)" in err
  assert res.eval["eval/queries_skipped"] == 2.0 and res.eval["eval/images_skipped"] == 2.0
  assert "eval/dress_recall_at10" in res.eval and "eval/average_recall" in res.eval


def test_fashioniq_captions_redrawn_each_epoch(tmp_path):
  from mmret_jax.tasks.cir import CirTask  # pylint: disable=import-outside-toplevel
  from mmret_jax.train.partitioning import make_mesh  # pylint: disable=import-outside-toplevel
  c = tiny(cir_fashioniq, tmp_path, **{"data.categories": ("dress",)})
  mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  with jax.set_mesh(mesh):
    task = CirTask(c, mesh, tmp_path / "w")
  sel = np.arange(8)
  a, b, a2 = task.make_batch(sel, 0), task.make_batch(sel, 1), task.make_batch(sel, 0)
  np.testing.assert_array_equal(a["fwd_ids"], a2["fwd_ids"])  # deterministic (resume replays it)
  assert not np.array_equal(a["fwd_ids"], b["fwd_ids"]) or not np.array_equal(a["bwd_ids"], b["bwd_ids"])
  assert task.steps_per_epoch(8) == 32 // 8  # the last partial batch of an epoch is dropped


def test_eval_and_submission_cli(stage1, tmp_path):
  tmp, _, res = stage1
  env = {**os.environ, "MMRET_JAX_CACHE": str(tmp_path / "cache")}
  common = ["--model", str(tmp / "s1"), "--image-root", str(tmp / "images"), "--feature-cache",
            str(tmp / "features"), "--synthetic-images"]
  r = subprocess.run([sys.executable, "-m", "mmret_jax.eval.cir", *common, "--dataset", "cirr", "--max-queries",
                      "32", "--output", str(tmp_path / "m.json")], capture_output=True, text=True, env=env)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "R@1" in r.stdout and "Rs@1" in r.stdout
  metrics = json.loads((tmp_path / "m.json").read_text())
  for k in ("recall_at1", "recall_at50", "group_recall_at3"):  # the CLI reproduces the training eval
    assert metrics[k] == pytest.approx(res.eval[f"eval/{k}"], abs=1e-6)
  r = subprocess.run([sys.executable, "-m", "mmret_jax.eval.cir_submission", *common, "--output",
                      str(tmp_path / "sub"), "--name", "smoke"], capture_output=True, text=True, env=env)
  assert r.returncode == 0, r.stderr[-2000:]
  recall = json.loads((tmp_path / "sub" / "recall_submission_smoke.json").read_text())
  subset = json.loads((tmp_path / "sub" / "recall_subset_submission_smoke.json").read_text())
  assert recall["version"] == subset["version"] == "rc2" and recall["metric"] == "recall"
  assert len(recall) == 4148 + 2 and len(subset) == 4148 + 2
  # a converted BLIP dir (no cir.json): zero-shot, element-wise sum; here the stage-I model without its cir.json
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.copytree(tmp / "s1" / "model", tmp_path / "blip")
  (tmp_path / "blip" / "cir.json").unlink()
  r = subprocess.run([sys.executable, "-m", "mmret_jax.eval.cir", "--model", str(tmp_path / "blip"), "--dataset", "cirr",
                      "--max-queries", "32", "--output", str(tmp_path / "z.json"),
                      *common[2:]], capture_output=True, text=True, env=env)
  assert r.returncode == 0, r.stderr[-2000:]
  zero_shot = json.loads((tmp_path / "z.json").read_text())
  assert zero_shot["recall_at50"] == pytest.approx(metrics["recall_at50"], abs=1e-6)  # same model, same fusion
  r = subprocess.run([sys.executable, "-m", "mmret_jax.eval.cir", "--model", str(tmp_path / "nope"), "--dataset",
                      "cirr", "--synthetic-images"], capture_output=True, text=True, env=env)
  assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: model not found")
