"""BagFormer training (`tasks/bagformer.py`) and evaluation (`eval/bagformer.py`) on the bundled MUGE sample:
batches (tokens, bags, pixels) as the seed forms them, the loss against the seed's composition, the smoke
config through main (loss falling, first-stage and re-ranked recall above chance), the command line on
the exported model, the three score sets, and the errors a user meets."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from mmret_jax import losses
from mmret_jax.data import bagging
from mmret_jax.data.sources import muge
from mmret_jax.train.metrics import read_metrics
from mmret_jax.train.partitioning import make_mesh

from fixtures import override

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import bagformer_muge  # noqa: E402  pylint: disable=wrong-import-position


def tiny(**over):
  c = bagformer_muge.get_config("smoke")
  return override(c, {"checkpoint.async_save": False, **over})


def make_task(c, workdir):
  from mmret_jax.tasks.bagformer import BagFormerTask  # pylint: disable=import-outside-toplevel
  mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  with jax.set_mesh(mesh):
    return BagFormerTask(c, mesh, pathlib.Path(workdir))


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  return make_task(tiny(**{"data.augment": "bagformer"}), tmp_path_factory.mktemp("bf"))


def test_batches_follow_the_seed(task):
  split = muge.MugeSplit(muge.sample_root(), "train")
  # the undecodable image's pair is dropped; every other pair of the seed's order is kept
  assert len(task.pairs) == len(split.pairs) - 1
  sel = np.arange(8)
  b = task.make_batch(sel, 0)
  texts = [split.queries[int(q)].text for q, _ in task.pairs[sel]]
  tok = muge.bert_tokenizer(muge.sample_root() / "vocab.txt")
  enc = tok(texts, padding="max_length", truncation=True, max_length=25)
  np.testing.assert_array_equal(b["ids"], np.asarray(enc["input_ids"]))
  np.testing.assert_array_equal(b["mask"], np.asarray(enc["attention_mask"]))
  bags = bagging.EntityBagger.from_tokenizer(muge.sample_root() / "entity_dict.txt", tok)(b["ids"])
  np.testing.assert_array_equal(b["bag_index"], bags["bag_index"])
  np.testing.assert_array_equal(b["bag_mask"], bags["bag_mask"])
  assert (b["bag_count"] if "bag_count" in b else bags["bag_count"]).min() < 25  # entities were bagged
  assert b["pixels"].shape == (8, 32, 32, 3) and np.isfinite(b["pixels"]).all()
  # the training augmentation is keyed by (seed, epoch, pair): the same batch again is bitwise equal,
  # another epoch differs
  np.testing.assert_array_equal(task.make_batch(sel, 0)["pixels"], b["pixels"])
  assert not np.array_equal(task.make_batch(sel, 1)["pixels"], b["pixels"])


def test_loss_is_the_seeds_composition(task):
  """loss = ITA + TWC + ITM, each recomputed here from the model's own outputs and losses.py."""
  m = task.model
  params = nn.unbox(task.init_params(jax.random.PRNGKey(0)))
  b = task.make_batch(np.arange(6), 0)
  b = {k: v for k, v in b.items() if k != "index"}
  rng = jax.random.PRNGKey(3)
  loss, aux = task.loss_fn(params, b, rng, train=False)
  _, _, r_neg, _ = jax.random.split(rng, 4)
  ap = lambda *a, method: m.apply({"params": params}, *a, method=method)  # noqa: E731
  img = ap(b["pixels"], method=m.image_embeds)
  img_f = ap(img, method=m.image_feats)
  txt = ap(b["ids"], b["mask"], method=m.text_embeds)
  bags = ap(txt, b["bag_index"], b["bag_mask"], method=m.bag_feats)
  temp = np.clip(float(params["temp"]), 0.05, 0.5)
  ita = losses.bagformer_ita_loss(img_f[:, 0], ap(txt, method=m.text_feat), temp)
  twc = losses.bagformer_twc_loss(bags, img_f)
  neg_img, neg_txt = losses.itm_negatives(r_neg, 6)
  assert not (np.asarray(neg_img) == np.arange(6)).any() and not (np.asarray(neg_txt) == np.arange(6)).any()
  logits = np.concatenate([ap(txt, b["mask"], img, method=m.itm_logits),
                           ap(txt, b["mask"], img[neg_img], method=m.itm_logits),
                           ap(txt[neg_txt], b["mask"][neg_txt], img, method=m.itm_logits)])
  itm = losses.bagformer_itm_loss(logits)
  np.testing.assert_allclose([aux["loss_ita"], aux["loss_twc"], aux["loss_itm"]], [ita, twc, itm], rtol=1e-5)
  np.testing.assert_allclose(loss, ita + twc + itm, rtol=1e-5)


def test_smoke_config_trains_then_evaluates(tmp_path):
  """`configs/bagformer_muge.py:smoke` through main: loss falls, the valid table shows first-stage and
  re-ranked recall above chance; the command line on the exported model gives the same numbers and
  the seed's top-10 files."""
  w = tmp_path / "w"
  r = subprocess.run([sys.executable, "-m", "mmret_jax.main", "--config=configs/bagformer_muge.py:smoke",
                      f"--workdir={w}"], capture_output=True, text=True, cwd=REPO, timeout=900, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "MUGE text -> image" in r.stdout and "eval.bagformer --model" in r.stdout
  loss = [x["loss"] for x in read_metrics(w) if "loss" in x]
  assert np.mean(loss[-3:]) < 0.8 * np.mean(loss[:2]), loss
  res = json.loads((w / "eval_valid" / "results.json").read_text())["metrics"]
  split = muge.MugeSplit(muge.sample_root(), "valid")
  chance_r5 = 100 * np.mean([min(1.0, 5 * len(t) / len(split.pool_ids)) for t in split.txt2img])
  assert res["recall_img_r5"] > 2 * chance_r5 and res["merge_img_r5"] > 2 * chance_r5, (res, chance_r5)
  out = tmp_path / "cli"
  r = subprocess.run([sys.executable, "-m", "mmret_jax.eval.bagformer", "--model", str(w), "--muge-root",
                      str(muge.sample_root()), "--split", "valid", "--out", str(out), "--k-test", "16", "--quiet"],
                     capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  cli = json.loads((out / "results.json").read_text())["metrics"]
  assert cli.keys() == res.keys()
  for k in res:
    assert cli[k] == pytest.approx(res[k], abs=1e-6), k
  preds = [json.loads(x) for x in (out / "merge_t2i.jsonl").read_text(encoding="utf-8").splitlines()]
  assert [p["query_id"] for p in preds] == split.query_ids and all(len(p["item_ids"]) == 10 for p in preds)
  assert set(preds[0]["item_ids"]) <= set(split.pool_ids)


def test_rerank_score_sets(task):
  """rank / merge: ITM logits on the first stage's top k, -100 elsewhere; merge = ITM + first stage."""
  from mmret_jax.eval import bagformer as bf_eval  # pylint: disable=import-outside-toplevel
  params = nn.unbox(task.init_params(jax.random.PRNGKey(1)))
  enc = bf_eval.BagFormerEncoder(task.model, params, task.inputs)
  split = muge.MugeSplit(muge.sample_root(), "test")
  texts = split.texts[:7]
  text = enc.encode_texts(texts, batch_size=4)
  raw, feats = enc.encode_images(split.images, split.pool_ids[:9], batch_size=4)
  s_t2i, s_i2t = bf_eval.first_stage(enc, text, feats)
  np.testing.assert_allclose(s_t2i, np.asarray(losses.tokenwise_similarity(text["feats"], feats)), atol=1e-5)
  np.testing.assert_allclose(s_i2t, np.asarray(losses.tokenwise_similarity(feats, text["feats"])), atol=1e-5)
  rank, merge = bf_eval.rerank(enc, s_t2i, text, raw, 3, True)
  for i in range(7):
    top = np.argsort(-s_t2i[i], kind="stable")[:3]
    want = enc.itm_scores(text["embeds"][[i] * 3], text["mask"][[i] * 3], raw[top].astype(np.float32))
    np.testing.assert_allclose(rank[i, top], want, atol=1e-5)
    np.testing.assert_allclose(merge[i, top], want + s_t2i[i, top], atol=1e-5)
    rest = np.setdiff1d(np.arange(9), top)
    assert (rank[i, rest] == -100).all() and (merge[i, rest] == -100).all()
  # bags are formed per encoding batch (the seed's batch_size_test): batch 4 = the seed's batches of 4
  again = enc.encode_texts(texts[:4], batch_size=4)
  np.testing.assert_allclose(again["feats"], text["feats"][:4], atol=1e-6)


def test_user_errors(tmp_path):
  with pytest.raises(ValueError, match="model.interaction must be one of"):
    make_task(tiny(**{"model.interaction": "bagwize"}), tmp_path / "a")
  with pytest.raises(ValueError, match="bagging.mode must be one of"):
    make_task(tiny(**{"bagging.mode": "greedy"}), tmp_path / "b")
  with pytest.raises(FileNotFoundError, match="entity dictionary not found"):
    make_task(tiny(**{"bagging.dictionary": str(tmp_path / "nope.txt")}), tmp_path / "c")
  with pytest.raises(FileNotFoundError):
    make_task(tiny(**{"data.root": str(tmp_path / "no_muge")}), tmp_path / "d")
  from mmret_jax.eval import bagformer as bf_eval  # pylint: disable=import-outside-toplevel
  r = subprocess.run([sys.executable, "-m", "mmret_jax.eval.bagformer", "--model", str(tmp_path / "none"),
                      "--muge-root", str(muge.sample_root()), "--out", str(tmp_path / "o")],
                     capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
  assert r.returncode == 1 and r.stderr.strip().startswith("error: model not found"), r.stderr
  assert bf_eval.DIRECTIONS == ("t2i", "i2t")


@pytest.mark.parametrize("over", [{"model.interaction": "cls_token"}, {"model.interaction": "tokenwise"},
                                  {"model.fusion_strategy": "early_fusion"}, {"bagging.mode": "fixed"}])
def test_variants_give_finite_losses_and_gradients(tmp_path, over):
  """The seed's baselines and options: cls_token has no TWC term; tokenwise contrasts all L tokens;
  early fusion encodes the bag sequence; fixed bagging feeds the same step."""
  t = make_task(tiny(**over), tmp_path)
  params = nn.unbox(t.init_params(jax.random.PRNGKey(0)))
  b = {k: v for k, v in t.make_batch(np.arange(4), 0).items() if k != "index"}
  (loss, aux), grads = jax.value_and_grad(t.loss_fn, has_aux=True)(params, b, jax.random.PRNGKey(1))
  assert np.isfinite(float(loss))
  assert ("loss_twc" in aux) == (over.get("model.interaction") != "cls_token")
  g = np.sqrt(sum(float(np.sum(np.square(x))) for x in jax.tree_util.tree_leaves(grads["text_encoder"])))
  assert np.isfinite(g) and g > 0
  if over.get("model.interaction") == "tokenwise":  # TWC over every projected token, unmasked
    m = t.model
    txt = m.apply({"params": params}, b["ids"], b["mask"], method=m.text_embeds)
    img = m.apply({"params": params}, m.apply({"params": params}, b["pixels"], method=m.image_embeds),
                  method=m.image_feats)
    tok = m.apply({"params": params}, txt, method=m.token_feats)
    np.testing.assert_allclose(aux["loss_twc"], losses.bagformer_twc_loss(tok, img), rtol=1e-5)
