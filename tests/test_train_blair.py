"""The generic loop on the BLaIR task: sharded meshes agree, resume is bitwise, bad data and
non-finite losses are handled, freezing freezes."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from mmret_jax.train import loop
from fixtures import override, simulated_devices
from mmret_jax.train.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import blair_base  # pylint: disable=wrong-import-position

BRANDS = ["acme", "zeta", "nova", "orbit", "lumen", "terra", "pixel", "vega"]
TYPES = ["kettle", "shoe", "glove", "lamp", "mug", "backpack", "tent", "watch"]


def write_pairs(path: pathlib.Path, n: int = 240, bad_rows: int = 0) -> pathlib.Path:
  rng = np.random.default_rng(0)
  lines = ["review\tmeta"]
  for i in range(n):
    b, t = BRANDS[rng.integers(len(BRANDS))], TYPES[rng.integers(len(TYPES))]
    lines.append(f"my {t} from {b} works well\t{b.title()} {t}, durable and light, by {b}.")
    if bad_rows and i % (n // bad_rows) == 5:
      lines.append("a row with no tab at all")
  path.write_text("\n".join(lines) + "\n")
  return path


def tiny_config(train_file, **over):
  c = blair_base.get_config("smoke")
  c.data.train_file = str(train_file)
  c.tokenizer = "bpe:300"
  c.model.preset = "roberta-tiny"
  c.data.max_seq_length = 24
  c.data.eval_max_pairs = 24
  c.data.eval_batch_size = 8
  c.data.num_threads = 1
  c.eval.ks = (1, 10)
  c.total_steps = 6
  c.batch_size = 16
  c.log_every = 1
  c.eval_every = -1
  c.checkpoint_every = 3
  c.checkpoint.async_save = False
  return override(c, over)


def losses_of(workdir):
  return [r["loss"] for r in read_metrics(workdir) if "loss" in r]


def test_resume_is_bitwise(tmp_path, monkeypatch, capsys):
  data = write_pairs(tmp_path / "pairs.tsv")
  full = loop.train_and_evaluate(tiny_config(data, eval_every=0), tmp_path / "full")
  monkeypatch.chdir(tmp_path)  # a relative workdir (as the README's --workdir=runs/...) resumes too
  loop.train_and_evaluate(tiny_config(data, stop_at_step=3, eval_every=0), "resumed")
  assert len(losses_of(tmp_path / "resumed")) == 3
  capsys.readouterr()
  resumed = loop.train_and_evaluate(tiny_config(data, eval_every=0), "resumed")
  err = capsys.readouterr().err
  assert "cannot be restored" not in err and not list(tmp_path.glob("resumed/checkpoints/corrupt*"))
  assert losses_of(tmp_path / "full") == losses_of(tmp_path / "resumed")  # every logged loss, exactly
  same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                      full.state.params, resumed.state.params)
  assert all(jax.tree.leaves(same))
  assert int(resumed.state.step) == 6
  assert full.eval["eval/recall@10"] == resumed.eval["eval/recall@10"]
  # The exported model embeds through the public API.
  import mmret_jax  # pylint: disable=import-outside-toplevel
  emb = mmret_jax.load(tmp_path / "full").encode_text(["my kettle from acme"])
  assert emb.shape == (1, 64) and abs(float(np.linalg.norm(emb)) - 1) < 1e-5


def write_c4(tmp_path):
  """A tiny Amazon-C4 in its real format: test.csv + the item-pool jsonl."""
  q = ["qid,query,item_id,user_id,ori_rating,ori_review"]
  pool = []
  for i, (b, t) in enumerate([(b, t) for b in BRANDS[:3] for t in TYPES[:4]]):
    pool.append(json.dumps({"item_id": f"B{i:03d}", "category": "Home", "metadata": f"{b.title()} {t} by {b}."}))
    q.append(f'{i},"I want a {t} from {b}",B{i:03d},U{i},5.0,"fine"')
  (tmp_path / "test.csv").write_text("\n".join(q) + "\n")
  (tmp_path / "pool.jsonl").write_text("\n".join(pool) + "\n")
  return tmp_path / "test.csv", tmp_path / "pool.jsonl"


def test_loss_goes_down_and_logs(tmp_path):
  data = write_pairs(tmp_path / "pairs.tsv", n=400)
  queries, pool = write_c4(tmp_path)
  cfg = tiny_config(data, total_steps=40, log_every=10, eval_every=0, **{
      "eval.c4_queries": str(queries), "eval.c4_pool": str(pool), "eval.c4_max_length": 24})
  res = loop.train_and_evaluate(cfg, tmp_path / "w")
  losses = losses_of(tmp_path / "w")
  assert len(losses) == 4 and losses[-1] < losses[0]
  rows = read_metrics(tmp_path / "w")
  assert {"lr", "grad_norm", "samples_per_s", "tokens_per_s", "mlm_loss", "cl_loss"} <= set(rows[0])
  # the compiled step's memory, logged once with the first row: the params (+ Adam's two moments) are arguments
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(res.state.params))
  assert rows[0]["memory/argument_bytes"] >= 3 * 4 * n_params and rows[0]["memory/temp_bytes"] > 0
  assert rows[0]["memory/peak_bytes"] >= rows[0]["memory/argument_bytes"] and "memory/temp_bytes" not in rows[1]
  assert any(p.name.startswith("events") for p in (tmp_path / "w" / "tensorboard").iterdir())
  assert 0.0 <= res.eval["eval/recall@10"] <= 1.0 and "eval/ndcg@10" in res.eval
  assert 0.0 < res.eval["eval/c4/ndcg@10"] <= 1.0 and res.eval["eval/c4/recall@10"] > 0.0
  assert res.eval["eval/c4/queries_without_target"] == 0


def test_malformed_rows_are_skipped_and_counted(tmp_path, capsys):
  data = write_pairs(tmp_path / "pairs.tsv", bad_rows=4)
  loop.train_and_evaluate(tiny_config(data, total_steps=2), tmp_path / "w")
  assert "4 malformed rows skipped" in capsys.readouterr().err


def test_missing_data_file_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.tsv"):
    loop.train_and_evaluate(tiny_config(tmp_path / "nope.tsv"), tmp_path / "w")


def test_main_rejects_config_typos(tmp_path):
  cmd = [sys.executable, "-m", "mmret_jax.main", f"--config={REPO}/configs/blair_base.py:smoke",
         f"--workdir={tmp_path}/w"]
  r = subprocess.run(cmd + ["--config.totl_steps=3"], capture_output=True, text=True, cwd=REPO)
  assert r.returncode != 0 and "totl_steps" in r.stderr
  r = subprocess.run(cmd + ["--config.on_nonfinite=ignore"], capture_output=True, text=True, cwd=REPO)
  assert r.returncode == 1 and "on_nonfinite must be stop|skip" in r.stderr
  r = subprocess.run(cmd + ["--config.data.train_file=/no/such.tsv"], capture_output=True, text=True, cwd=REPO)
  assert r.returncode == 1 and "/no/such.tsv" in r.stderr


def test_nonfinite_loss_stops_with_step_and_rows(tmp_path):
  data = write_pairs(tmp_path / "pairs.tsv")
  cfg = tiny_config(data, **{"optim.learning_rate": 1e30, "optim.grad_clip_norm": 0.0, "optim.warmup_steps": 0})
  with pytest.raises(loop.NonFiniteLossError, match=r"at step \d+, batch rows \[\d+"):
    loop.train_and_evaluate(cfg, tmp_path / "stop")
  cfg = tiny_config(data, on_nonfinite="skip", **{"optim.learning_rate": 1e30,
                                                   "optim.grad_clip_norm": 0.0, "optim.warmup_steps": 0})
  res = loop.train_and_evaluate(cfg, tmp_path / "skip")
  assert int(res.state.step) == 6
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(res.state.params))


def test_freeze_leaves_params_bitwise_unchanged(tmp_path):
  data = write_pairs(tmp_path / "pairs.tsv")
  cfg = tiny_config(data, total_steps=3, **{"optim.freeze": (r"^encoder/embeddings/", r"layer_0/")})
  res = loop.train_and_evaluate(cfg, tmp_path / "w")
  init = loop.train_and_evaluate(tiny_config(data, total_steps=3, stop_at_step=0, **{
      "optim.learning_rate": 0.0, "optim.freeze": (r"^encoder/embeddings/", r"layer_0/")}), tmp_path / "w0")
  p, p0 = res.state.params["encoder"], init.state.params["encoder"]
  for a, b in zip(jax.tree.leaves(p["embeddings"]), jax.tree.leaves(p0["embeddings"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(p["encoder"]["layer_0"]), jax.tree.leaves(p0["encoder"]["layer_0"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  changed = [not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(p["encoder"]["layer_1"]), jax.tree.leaves(p0["encoder"]["layer_1"]))]
  assert all(changed)
  bad = tiny_config(data, **{"optim.freeze": (r"no_such_param",)})
  with pytest.raises(ValueError, match="match no param"):
    loop.train_and_evaluate(bad, tmp_path / "w2")


MESH_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    import jax, numpy as np
    from test_train_blair import tiny_config
    from mmret_jax.train import loop
    from mmret_jax.train.metrics import read_metrics
    out = {{}}
    for name, mesh in [("single", None), ("dp8", dict(data=8)), ("dp4_fsdp2", dict(data=4, fsdp=2)),
                       ("dp2_tp4", dict(data=2, tensor=4))]:
      cfg = tiny_config({data!r}, total_steps=5, checkpoint_every=100, **{{"data.eval_max_pairs": 8}})
      if mesh is None:
        cfg.mesh.data = 1
        devices = jax.devices()[:1]
        import mmret_jax.train.partitioning as part
        orig = part.make_mesh
        part.make_mesh = lambda spec, d=None: orig(spec, devices)
      else:
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh.get("data", 1), mesh.get("fsdp", 1), mesh.get("tensor", 1)
      res = loop.train_and_evaluate(cfg, {workdir!r} + "/" + name)
      if mesh is None:
        part.make_mesh = orig
      q = res.state.params["encoder"]["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"]
      w = res.state.params["encoder"]["encoder"]["layer_0"]["intermediate"]["dense"]["kernel"]
      out[name] = dict(losses=[r["loss"] for r in read_metrics({workdir!r} + "/" + name) if "loss" in r],
                       q_spec=str(q.sharding.spec), w_spec=str(w.sharding.spec),
                       q_shard=list(q.addressable_shards[0].data.shape), ndev=len(q.sharding.device_set))
    print("RESULT" + json.dumps(out))
""")


def test_meshes_match_single_device(tmp_path):
  data = write_pairs(tmp_path / "pairs.tsv")
  script = MESH_SCRIPT.format(tests=str(REPO / "tests"), data=str(data), workdir=str(tmp_path))
  env = {**os.environ, "XLA_FLAGS": simulated_devices(8)}
  r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO,
                     timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.split("RESULT", 1)[1])
  ref = out["single"]["losses"]
  assert len(ref) == 5
  for name in ("dp8", "dp4_fsdp2", "dp2_tp4"):
    # fp32; only the order of sharded reductions differs
    np.testing.assert_allclose(out[name]["losses"], ref, rtol=0, atol=2e-5, err_msg=name)
  assert out["single"]["ndev"] == 1
  assert out["dp8"]["q_spec"] == "P(None, None)" and out["dp8"]["ndev"] == 8
  assert out["dp4_fsdp2"]["q_spec"] == "P('fsdp', None)" and out["dp4_fsdp2"]["q_shard"] == [32, 64]
  assert out["dp2_tp4"]["q_spec"] == "P(None, 'tensor')" and out["dp2_tp4"]["q_shard"] == [64, 16]
  assert out["dp2_tp4"]["w_spec"] == "P(None, 'tensor')"


def test_init_rng_impl(tmp_path):
  """threefry keeps split(PRNGKey(seed)); rbg gives the init its own RngBitGenerator key (and a
  different, finite init, trained as usual); the train RNG is the same either way; typos fail."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from mmret_jax.tasks.blair import BlairTask  # pylint: disable=import-outside-toplevel
  from mmret_jax.train.partitioning import make_mesh  # pylint: disable=import-outside-toplevel
  c = tiny_config(write_pairs(tmp_path / "pairs.tsv", n=40), init_rng_impl="threefry2x32")
  init_t, train_t = loop.init_and_train_keys(c)
  want_init, want_train = jax.random.split(jax.random.PRNGKey(int(c.seed)))
  np.testing.assert_array_equal(init_t, want_init)
  np.testing.assert_array_equal(train_t, want_train)
  assert jax.default_backend() == "cpu"
  c.init_rng_impl = "auto"  # threefry off GPU
  np.testing.assert_array_equal(loop.init_and_train_keys(c)[0], want_init)
  c.init_rng_impl = "rbg"
  init_r, train_r = loop.init_and_train_keys(c)
  assert jax.random.key_impl(init_r) == jax.random.key_impl(jax.random.key(0, impl="rbg"))
  np.testing.assert_array_equal(train_r, want_train)
  task = BlairTask(c, make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]), tmp_path / "w")
  p_t = jax.tree.leaves(nn.unbox(jax.jit(task.init_params)(init_t)))
  p_r = jax.tree.leaves(nn.unbox(jax.jit(task.init_params)(init_r)))
  assert len(p_t) == len(p_r) > 0
  assert all(np.isfinite(np.asarray(x)).all() for x in p_r)
  big = [i for i, x in enumerate(p_t) if x.size > 1000 and float(np.std(np.asarray(x))) > 0]
  assert big and all(not np.array_equal(np.asarray(p_t[i]), np.asarray(p_r[i])) for i in big)
  for i in big:  # same initializer, other random bits: the same spread
    np.testing.assert_allclose(np.std(np.asarray(p_r[i])), np.std(np.asarray(p_t[i])), rtol=0.1)
  c.init_rng_impl = "philox"
  with pytest.raises(ValueError, match="init_rng_impl"):
    loop.init_and_train_keys(c)


def test_held_out_cl_loss_counts_every_pair(tmp_path):
  """The held-out contrastive loss covers a last partial batch (and a held-out set smaller than one
  batch): the mean over batches weighted by their size, each batch's loss on its own pairs alone."""
  from mmret_jax.tasks.blair import BlairTask, TokenizePairs  # pylint: disable=import-outside-toplevel
  from mmret_jax.train.partitioning import make_mesh  # pylint: disable=import-outside-toplevel
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  c = tiny_config(write_pairs(tmp_path / "pairs.tsv", n=60))
  task = BlairTask(c, make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]), tmp_path / "w")
  params = nn.unbox(jax.jit(task.init_params)(jax.random.PRNGKey(3)))
  reviews, metas = task._held_out()  # pylint: disable=protected-access
  reviews, metas = reviews + reviews[:5], metas + metas[:5]
  tok = TokenizePairs(task.tokenizer, int(c.data.max_seq_length))

  def plain_loss(rs, ms):  # unpadded batch of exactly these pairs
    rows = [tok.map({"review": r, "meta": m, "index": 0}) for r, m in zip(rs, ms)]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0] if k != "index"}
    return float(task.loss_fn(params, batch, jax.random.PRNGKey(0), train=False)[0])

  bs = int(c.data.eval_batch_size)
  for n in (11, 5):  # 8 + 3, and fewer than one batch
    got = task._eval_cl_loss(params, reviews[:n], metas[:n])  # pylint: disable=protected-access
    chunks = [(reviews[s:min(s + bs, n)], metas[s:min(s + bs, n)]) for s in range(0, n, bs)]
    want = sum(len(r) * plain_loss(r, m) for r, m in chunks) / n
    assert np.isfinite(got)
    np.testing.assert_allclose(got, want, rtol=1e-5)
