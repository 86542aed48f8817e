"""BLaIR's sequential recommendation on the loop (tasks/seqrec.py): the task's loss equals the seed's (a torch
transcription of RecBole's SASRec + the seed's UniSRec / SASRecText, tests/recbole_torch.py) on a real batch, the
padding rows of an epoch's last batch count for nothing; training on the generated sample (prepare_seqrec's
formats) learns, early stopping ends the run RecBole's way and exports the best valid model, which the eval CLI
scores exactly as logged; a run stopped and resumed ends at the same step with the same best; clear errors."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys

import jax
import numpy as np
import pytest
import torch

import recbole_torch
from fixtures import override
from mmret_jax.convert import sasrec as convert_sasrec
from mmret_jax.data.sources import seqrec as seqrec_data
from mmret_jax.eval import seqrec as seqrec_eval
from mmret_jax.train import loop, partitioning
from mmret_jax.train.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import seqrec_sasrectext  # noqa: E402  pylint: disable=wrong-import-position
import seqrec_unisrec  # noqa: E402  pylint: disable=wrong-import-position


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
  root = tmp_path_factory.mktemp("seqrec")
  seqrec_data.write_sample(root, "Sample", n_items=40, n_users=80, plm_size=16)
  return root


def tiny(module, root, **over):
  c = module.get_config("smoke")
  c.data.root, c.data.domain, c.data.feature = str(root), "Sample", "sample.feature"
  c.model.update(n_layers=1, hidden_size=16, inner_size=32, adaptor_layers=(16, 16) if c.model.kind == "unisrec"
                 else (16, 24, 16), n_exps=3)
  c.batch_size = 48
  c.num_epochs = 6.0
  c.log_every = 5
  c.checkpoint.async_save = False
  c.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
  return override(c, over)


def make_task(config, workdir):
  from mmret_jax.tasks.seqrec import SeqRecTask  # pylint: disable=import-outside-toplevel
  mesh = partitioning.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  return SeqRecTask(config, mesh, workdir)


@pytest.mark.parametrize("module", [seqrec_unisrec, seqrec_sasrectext], ids=["unisrec", "sasrectext"])
def test_loss_equals_the_seed_on_a_real_batch(sample, tmp_path, module):
  task = make_task(tiny(module, sample), tmp_path)
  params = jax.device_get(jax.tree.map(lambda x: x.value if hasattr(x, "value") else x,
                                       task.init_params(jax.random.PRNGKey(3)),
                                       is_leaf=lambda x: hasattr(x, "value")))
  assert set(params) == {"model", "plm_embedding"} and not params["plm_embedding"].any()  # zeros until load_init
  assert task.freeze_patterns() == (r"^plm_embedding$",) and task.load_init_always
  params = task.load_init(params)
  np.testing.assert_array_equal(params["plm_embedding"], task.data.plm_table)
  rng = np.random.default_rng(0)
  params["model"] = jax.tree.map(lambda p: (p + 0.05 * rng.standard_normal(p.shape)).astype(np.float32),
                                 params["model"])
  it = task.train_iterator(48)
  batch = next(it)
  for _ in range(task.steps_per_epoch(48) - 1):  # the epoch's last batch: padded
    batch = next(it)
  real = batch["weight"] > 0
  assert 0 < real.sum() < 48, "the last batch of an epoch is partial here"
  sd = convert_sasrec.to_torch(params["model"], task.model_config, task.data.plm_table)
  ref = recbole_torch.build(dataclasses.asdict(task.model_config), torch.from_numpy(task.data.plm_table))
  ref.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()})
  ref.eval()  # no dropout, clean gating (the task's train=False)
  with torch.no_grad():
    want = float(ref.calculate_loss(*(torch.from_numpy(batch[k][real]).long()
                                      for k in ("item_seq", "seq_len", "target"))))
  got, aux = task.loss_fn(params, {k: v for k, v in batch.items() if k != "index"}, jax.random.PRNGKey(0),
                          train=False)
  assert abs(float(got) - want) <= 1e-5 * max(1.0, abs(want)), (float(got), want)
  assert float(aux["rows"]) == real.sum()
  # the feature table is an argument of the compiled step, not a constant baked into its program
  hlo = jax.jit(lambda p, b: task.loss_fn(p, b, jax.random.PRNGKey(0))[0]).lower(
      params, {k: v for k, v in batch.items() if k != "index"}).as_text()
  n, d = task.data.plm_table.shape
  assert f"tensor<{n}x{d}xf32>" in hlo.split("\n", 3)[1]  # in @main's signature
  assert not any("constant dense" in l and f"{n}x{d}" in l for l in hlo.splitlines())
  # the full-sort scores are the seed's full_sort_predict
  seq, ln = batch["item_seq"][real][:5], batch["seq_len"][real][:5]
  ours = np.asarray(jax.jit(task.scores)(params, seq, ln))
  with torch.no_grad():
    theirs = ref.full_sort_predict(torch.from_numpy(seq).long(), torch.from_numpy(ln).long()).numpy()
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_training_learns_stops_early_and_exports_the_best(sample, tmp_path):
  wd = tmp_path / "run"
  c = tiny(seqrec_unisrec, sample, **{"early_stopping.patience": 1, "num_epochs": 40.0})
  res = loop.train_and_evaluate(c, wd)
  rows = read_metrics(wd)
  evals = [r for r in rows if "eval/valid/ndcg@10" in r]
  steps_per_epoch = -(-len(seqrec_data.load_seqrec(sample, "Sample")["train"]) // 48)
  assert [r["step"] for r in evals] == [steps_per_epoch * (i + 1) for i in range(len(evals))]  # every epoch
  # RecBole's rule: stop once the metric has not improved (>=) for more than `patience` evaluations
  vals = [r["eval/valid/ndcg@10"] for r in evals]
  best = max(range(len(vals)), key=lambda i: (vals[i], i))
  assert res.stopped_early and res.finished and len(vals) == best + 3
  assert all(v < vals[best] for v in vals[best + 1:])
  assert res.best_step == evals[best]["step"] and res.eval == {k: v for k, v in evals[best].items() if k != "step"}
  # it learned: far above chance (10 of 40 items at random gives NDCG@10 ~ 0.1)
  assert vals[best] > 0.3, vals
  losses = [r["loss"] for r in rows if "loss" in r]
  assert losses[-1] < losses[0]
  # the exported model is the best checkpoint: the CLI scores it as logged
  out = tmp_path / "res.json"
  assert seqrec_eval.main(["--model", str(wd), "--splits", "valid,test", "--out", str(out), "--no-progress"]) == 0
  got = json.loads(out.read_text())
  for split in ("valid", "test"):
    for k in ("recall@10", "ndcg@10", "recall@50", "ndcg@50"):
      assert got[split][k] == pytest.approx(evals[best][f"eval/{split}/{k}"], abs=1e-9)
  # a rerun of the ended run trains nothing more
  again = loop.train_and_evaluate(c, wd)
  assert again.stopped_early and read_metrics(wd) == rows
  # resumed mid-run: stops at the same step with the same best
  wd2 = tmp_path / "resumed"
  loop.train_and_evaluate(tiny(seqrec_unisrec, sample, stop_at_step=steps_per_epoch + 2,
                               **{"early_stopping.patience": 1, "num_epochs": 40.0}), wd2)
  res2 = loop.train_and_evaluate(c, wd2)
  assert res2.best_step == res.best_step and int(res2.state.step) == int(res.state.step)
  assert [r["eval/valid/ndcg@10"] for r in read_metrics(wd2) if "eval/valid/ndcg@10" in r] == vals


def test_early_stopping_rule_and_errors(tmp_path):
  import ml_collections  # pylint: disable=import-outside-toplevel
  c = ml_collections.ConfigDict({"checkpoint": {"best_metric": "eval/x", "best_mode": "max"},
                                 "early_stopping": {"patience": 2}})
  es = loop.EarlyStopping(c)
  stops = [es.update(s, {"eval/x": v}) for s, v in enumerate([0.1, 0.3, 0.3, 0.2, 0.25, 0.1])]
  assert stops == [False, False, False, False, False, True] and es.best_step == 2  # a tie is the newer best
  c.checkpoint.best_mode = "min"
  es = loop.EarlyStopping(c)
  assert [es.update(s, {"eval/x": v}) for s, v in enumerate([0.5, 0.4, 0.6, 0.7, 0.8])][-1] and es.best_step == 1
  assert not es.update(9, {"eval/other": 1.0})  # another eval row: not counted
  c.checkpoint.best_metric = ""
  with pytest.raises(ValueError, match="early_stopping needs checkpoint.best_metric"):
    loop.EarlyStopping(c)
  c.checkpoint.best_metric = "valid/ndcg@10"
  with pytest.raises(ValueError, match="must name an eval metric: 'eval/<name>'"):
    loop.EarlyStopping(c)
  c.checkpoint.best_metric, c.early_stopping.patience = "eval/x", -1
  with pytest.raises(ValueError, match="patience must be >= 0"):
    loop.EarlyStopping(c)
  # a bad setting ends the run before anything is written
  bad = tiny(seqrec_unisrec, tmp_path, **{"checkpoint.best_metric": "ndcg"})
  with pytest.raises(ValueError, match="must name an eval metric"):
    loop.train_and_evaluate(bad, tmp_path / "never")
  assert not (tmp_path / "never").exists()


def test_task_errors(sample, tmp_path, capsys):
  with pytest.raises(ValueError, match="model.kind must be one of sasrectext, unisrec, got 'gru4rec'"):
    make_task(tiny(seqrec_unisrec, sample, **{"model.kind": "gru4rec"}), tmp_path)
  with pytest.raises(ValueError, match="the item features are needed: set data.feature"):
    make_task(tiny(seqrec_unisrec, sample, **{"data.feature": ""}), tmp_path)
  with pytest.raises(ValueError, match=r"No Beauty.data_maps .*prepare_seqrec"):
    make_task(tiny(seqrec_unisrec, sample, **{"data.domain": "Beauty"}), tmp_path)
  # the eval CLI on other data than the model's: a clear error
  wd = tmp_path / "m"
  loop.train_and_evaluate(tiny(seqrec_sasrectext, sample, num_epochs=1.0), wd)
  other = tmp_path / "other"
  seqrec_data.write_sample(other, "Sample", n_items=30, n_users=40, plm_size=16, seed=1)
  assert seqrec_eval.main(["--model", str(wd / "model"), "--data", str(other), "--no-progress"]) == 1
  assert "the data has 31 items x 16 features; the model was trained on 41 x 16" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    seqrec_eval.main(["--model", str(wd), "--splits", "dev"])
  assert e.value.code == 2 and "--splits takes train, valid, test; got 'dev'" in capsys.readouterr().err
