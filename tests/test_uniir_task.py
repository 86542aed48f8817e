"""UniIR training (`tasks/uniir.py`) on the bundled mini M-BEIR with generated images: batches (instructions,
per-epoch positives, hashed ids), the BLIP momentum / queue step against the seed's order of operations,
the four variants learning, exports that the M-BEIR encoder reloads, exact resume with the queues, and the
errors a user meets."""

from __future__ import annotations

import json
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmret_jax import losses
from mmret_jax.data.sources import mbeir
from mmret_jax.train import loop
from mmret_jax.train.metrics import read_metrics
from mmret_jax.train.partitioning import make_mesh

from fixtures import override

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import uniir_common  # noqa: E402  pylint: disable=wrong-import-position


def tiny(variant, tmp, **over):
  c = uniir_common.uniir_config(variant, "smoke", per_device_batch=1, init_from="")
  base = {"data.image_root": str(tmp / "images"), "total_steps": 30, "log_every": 5, "checkpoint_every": 15,
          "checkpoint.async_save": False, "eval.sets": ()}
  return override(c, {**base, **over})


def losses_of(workdir):
  return [r["loss"] for r in read_metrics(workdir) if "loss" in r]


def make_task(c, workdir):
  from mmret_jax.tasks.uniir import UniIRTask  # pylint: disable=import-outside-toplevel
  mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  with jax.set_mesh(mesh):
    return UniIRTask(c, mesh, pathlib.Path(workdir))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """clip_sf and blip_sf trained 30 steps each (shared by the tests below)."""
  tmp = tmp_path_factory.mktemp("uniir")
  out = {}
  for v in ("clip_sf", "blip_sf"):
    out[v] = loop.train_and_evaluate(tiny(v, tmp), tmp / v)
  return tmp, out


def test_batches_follow_the_seed(tmp_path):
  task = make_task(tiny("clip_sf", tmp_path), tmp_path / "w")
  sel = np.arange(8)
  a, a2 = task.make_batch(sel, 0), task.make_batch(sel, 0)
  for k in a:  # deterministic per (epoch, row): resume replays the same batch
    np.testing.assert_array_equal(a[k], a2[k])
  assert a["ids"].shape == (16, 77) and a["pixels"].shape == (16, 32, 32, 3) and a["cand_ids"].shape == (8,)
  for i, row in enumerate(task.rows[sel]):
    q = task.queries[int(row)]
    assert mbeir.unhash_did(int(a["cand_ids"][i])) in q.pos_cand_list  # the drawn positive
    assert a["txt_mask"][i] == float(bool(mbeir.query_text(q, task.instructions, "random", 2023, (0, int(row)))))
    assert a["img_mask"][i] == float(q.img_path is not None)
    # the query text starts with an instruction of its (dataset, modality pair): CLIP ids decode to it
    text = task.tokenizer.decode(a["ids"][i][a["mask"][i] > 0], skip_special_tokens=True).lower()
    cand = task.pool.get(int(a["cand_ids"][i]))
    variants = task.instructions.variants(q.dataset_id, q.modality, cand.modality)
    assert any(text.replace(" ", "").startswith(v.lower().replace(" ", "")[:20]) for v in variants), text
  # CLIP pads with id 0 to 77 tokens; positives drawn per epoch (the mini queries have several)
  assert (a["ids"][a["mask"] == 0] == 0).all() and a["mask"].sum(1).min() >= 2
  multi = [i for i, r in enumerate(task.rows) if len(task.queries[int(r)].pos_cand_list) > 1]
  assert multi
  draws = {int(task.make_batch(np.asarray([multi[0]]), e)["cand_ids"][0]) for e in range(12)}
  assert len(draws) > 1


def test_blip_step_updates_momentum_then_queues(tmp_path):
  """The seed's `_momentum_update` runs before the momentum pass; `_dequeue_and_enqueue` writes the
  momentum features and the positives' ids at `ptr`; the temperature is clamped after the update."""
  c = tiny("blip_ff", tmp_path, **{"uniir.queue_size": 48})
  task = make_task(c, tmp_path / "w")
  boxed = task.init_params(jax.random.PRNGKey(0))
  params, ts = nn.meta.unbox(boxed), nn.meta.unbox(task.init_task_state(boxed))
  # the seed's layout [D, Q]: random unit columns, ids -100 (empty)
  assert ts["query_queue"].shape == (32, 48) and np.allclose(np.linalg.norm(ts["cand_queue"], axis=0), 1, atol=1e-5)
  assert (np.asarray(ts["id_queue"]) == -100).all()
  old_m = jax.tree.map(lambda x: 0.5 * x, ts["params_m"])
  ts = {**ts, "params_m": old_m, "ptr": jnp.asarray(8, jnp.int32), "step": jnp.asarray(0, jnp.int32)}
  batch = task.make_batch(np.arange(16), 0)
  # BLIP trains on augmented images (random crop, flip, RandomAugment), drawn per (seed, epoch, row)
  np.testing.assert_array_equal(batch["pixels"], task.make_batch(np.arange(16), 0)["pixels"])
  i = next(i for i in range(16) if task.queries[int(task.rows[i])].img_path)
  plain, _ = task.inputs.images([str(task.data.image_root / task.queries[int(task.rows[i])].img_path)])
  assert batch["img_mask"][i] == 1.0 and np.abs(batch["pixels"][i] - plain[0]).max() > 0.1
  loss, aux = task.loss_fn(params, batch, jax.random.PRNGKey(1), train=False, task_state=ts)
  new = aux["task_state"]
  want_m = jax.tree.map(lambda m, p: 0.995 * m + 0.005 * p, old_m, {k: v for k, v in params.items() if k != "temp"})
  for a, b in zip(jax.tree.leaves(new["params_m"]), jax.tree.leaves(want_m)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # the momentum pass with the updated copy, written at ptr 8..24, ids of the positives
  emb_m = task.model.apply({"params": {**want_m, "temp": params["temp"]}}, batch["ids"], batch["mask"],
                           batch["pixels"], batch["txt_mask"], batch["img_mask"])
  np.testing.assert_allclose(new["query_queue"][:, 8:24], losses.l2_normalize(emb_m[:16]).T, atol=2e-6)
  np.testing.assert_allclose(new["cand_queue"][:, 8:24], losses.l2_normalize(emb_m[16:]).T, atol=2e-6)
  np.testing.assert_array_equal(new["query_queue"][:, :8], ts["query_queue"][:, :8])
  np.testing.assert_array_equal(new["id_queue"][24:], -100)
  np.testing.assert_array_equal(new["id_queue"][8:24], batch["cand_ids"])
  assert int(new["ptr"]) == 24 and int(new["step"]) == 1 and float(aux["alpha"]) == 0.0  # ramp starts at 0
  # the loss is the seed's on these features (losses.uniir_queue_loss is checked against PyTorch)
  emb = task.model.apply({"params": params}, batch["ids"], batch["mask"], batch["pixels"], batch["txt_mask"],
                         batch["img_mask"])
  want = losses.uniir_queue_loss(emb[:16], emb[16:], emb_m[:16], emb_m[16:], batch["cand_ids"], ts["query_queue"],
                                 ts["cand_queue"], ts["id_queue"], params["temp"], 0.0)
  assert float(loss) == pytest.approx(float(want), rel=1e-5)
  clamped = task.post_update({**params, "temp": jnp.asarray(0.9)})
  low = task.post_update({**params, "temp": jnp.asarray(1e-5, jnp.float32)})
  assert float(clamped["temp"]) == 0.5 and float(low["temp"]) == pytest.approx(1e-3)


def test_variants_learn_and_export(runs, tmp_path):
  from mmret_jax.tasks.uniir import UniIREncoder  # pylint: disable=import-outside-toplevel
  tmp, out = runs
  for v, res in out.items():
    ls = losses_of(tmp / v)
    assert len(ls) == 6 and np.mean(ls[-2:]) < np.mean(ls[:2]), (v, ls)
    model = tmp / v / "model"
    assert json.loads((model / "uniir.json").read_text())["variant"] == v
    enc = UniIREncoder.from_dir(tmp / v)  # a workdir: its model/
    data = mbeir.MBEIR(mbeir.mini_root(), tmp / "images")
    es = data.load_eval_set("mscoco_task3")
    cands = [es.pool[i] for i in range(6)]
    got = enc.encode_candidates(cands, data.image_root, batch_size=4)
    # the same as the trained params in the task's encoder
    task = make_task(tiny(v, tmp), tmp / v)
    ref = UniIREncoder(task.model, res.state.params, task.inputs).encode_candidates(cands, data.image_root,
                                                                                    batch_size=6)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    qs = [es.queries[i] for i in range(4)]
    assert enc.encode_queries(qs, data.image_root, data.instructions()).shape == (4, enc.model.config.embed_dim)
  assert {"alpha", "temperature"} <= set(read_metrics(tmp / "blip_sf")[0])
  assert "logit_scale" in read_metrics(tmp / "clip_sf")[0]


def test_ff_variants_train(tmp_path):
  for v in ("clip_ff", "blip_ff"):
    loop.train_and_evaluate(tiny(v, tmp_path, total_steps=10, checkpoint_every=10), tmp_path / v)
    ls = losses_of(tmp_path / v)
    assert len(ls) == 2 and all(np.isfinite(ls))


def test_blip_resume_is_bitwise_with_queues(runs):
  tmp, out = runs
  loop.train_and_evaluate(tiny("blip_sf", tmp, stop_at_step=15), tmp / "res")
  res = loop.train_and_evaluate(tiny("blip_sf", tmp), tmp / "res")
  assert losses_of(tmp / "blip_sf") == losses_of(tmp / "res")
  full = out["blip_sf"]
  for a, b in zip(jax.tree.leaves((full.state.params, full.state.task_state)),
                  jax.tree.leaves((res.state.params, res.state.task_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(np.asarray(jax.tree.leaves(res.state.task_state["ptr"])[0])) == (30 * 16) % 64


def test_user_errors(tmp_path, capsys):
  with pytest.raises(ValueError, match="queue_size 40 must be a multiple of batch_size 16"):
    make_task(tiny("blip_sf", tmp_path, **{"uniir.queue_size": 40}), tmp_path / "a")
  with pytest.raises(ValueError, match="uniir.variant must be one of"):
    make_task(tiny("clip_sf", tmp_path, **{"uniir.variant": "clip_xx"}), tmp_path / "b")
  with pytest.raises(ValueError, match="task 'uniir_blip' trains blip_sf / _ff, but uniir.variant is 'clip_sf'"):
    make_task(tiny("clip_sf", tmp_path, task="uniir_blip"), tmp_path / "b2")
  with pytest.raises(ValueError, match="has no images"):
    make_task(tiny("clip_sf", tmp_path, **{"data.synthetic_images": False, "data.image_root": ""}), tmp_path / "c")
  from mmret_jax.tasks.uniir import UniIREncoder  # pylint: disable=import-outside-toplevel
  with pytest.raises(FileNotFoundError, match="model not found"):
    UniIREncoder.from_dir(tmp_path / "nope")
  # a missing image is counted, and that query trains without it
  first = make_task(tiny("clip_sf", tmp_path), tmp_path / "d")
  row = next(i for i, r in enumerate(first.rows) if first.queries[int(r)].img_path)
  (tmp_path / "images" / first.queries[int(first.rows[row])].img_path).unlink()
  capsys.readouterr()
  task = make_task(tiny("clip_sf", tmp_path, **{"data.synthetic_images": False}), tmp_path / "e")
  assert f"note: 1 of {len(task.queries)} training queries have a missing image" in capsys.readouterr().err
  b = task.make_batch(np.asarray([row]), 0)
  assert b["img_mask"][0] == 0.0 and not b["pixels"][0].any() and b["txt_mask"][0] == 1.0


def test_smoke_config_trains_then_prints_the_table(tmp_path):
  """`configs/uniir_clip_sf.py:smoke` through main: training, then the command line's pipeline on the
  mini test sets (both pools) printing the table; the CLI on the exported model gives the same numbers."""
  import subprocess  # pylint: disable=import-outside-toplevel
  w, images = tmp_path / "w", tmp_path / "images"
  r = subprocess.run([sys.executable, "-m", "mmret_jax.main", "--config=configs/uniir_clip_sf.py:smoke",
                      f"--workdir={w}", "--config.total_steps=10", f"--config.data.image_root={images}"],
                     capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "M-BEIR test, local pools" in r.stdout and "M-BEIR test, UNION pool" in r.stdout
  trained = json.loads((w / "mbeir_eval" / "results.json").read_text())
  assert len(trained["results"]) == 2 * len(uniir_common.MINI_SETS)
  assert (w / "mbeir_eval" / "results.tsv").is_file() and "eval.mbeir all --model" in r.stdout
  out = tmp_path / "cli"
  r = subprocess.run([sys.executable, "-m", "mmret_jax.eval.mbeir", "all", "--model", str(w), "--mbeir-root",
                      str(mbeir.mini_root()), "--image-root", str(images), "--out", str(out), "--pool", "both",
                      "--seed", "2023", "--batch-size", "8"], capture_output=True, text=True, cwd=REPO, timeout=600,
                     check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  cli = json.loads((out / "results.json").read_text())
  key = lambda row: (row["pool"], row["dataset"], row["task_id"])
  want = {key(row): row for row in trained["results"]}
  for row in cli["results"]:
    for m in ("Recall@1", "Recall@5", "Recall@10", "Recall@50"):
      if m in row:
        assert row[m] == pytest.approx(want[key(row)][m]), (key(row), m)
  assert cli["average_headline"] == pytest.approx(trained["average_headline"])


def test_clip_optimizer_follows_the_seed():
  """clip_sf/clip_ff `create_optimizer`: AdamW(0.9, 0.98, eps 1e-6), weight decay 0.2 except params with
  fewer than 2 dims, norms, biases and logit_scale; CLIP-FF's T5 layers at 50x the base rate."""
  from mmret_jax.train import optim  # pylint: disable=import-outside-toplevel
  c = uniir_common.uniir_config("clip_ff", "", per_device_batch=1, init_from="").optim
  params = {"clip": {"text_model": {"fc1": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))},
                                    "layer_norm1": {"scale": jnp.ones((2,))}},
                     "logit_scale": jnp.ones(()), "class_embedding": jnp.ones((2,))},
            "t5_layers": {"block_0": {"wi": {"kernel": jnp.ones((2, 2))}}}}
  tx, _ = optim.make_optimizer(c, total_steps=100)
  state = tx.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)  # no gradient: the update is the decoupled decay alone
  upd, _ = tx.update(zero, state, params)
  lr = float(c.learning_rate)
  assert float(upd["clip"]["text_model"]["fc1"]["kernel"][0, 0]) == pytest.approx(-lr * 0.2, rel=1e-4)
  assert float(upd["t5_layers"]["block_0"]["wi"]["kernel"][0, 0]) == pytest.approx(-50 * lr * 0.2, rel=1e-4)
  for leaf in (upd["clip"]["text_model"]["fc1"]["bias"], upd["clip"]["text_model"]["layer_norm1"]["scale"],
               upd["clip"]["logit_scale"], upd["clip"]["class_embedding"]):
    assert float(jnp.abs(leaf).max()) == 0.0
