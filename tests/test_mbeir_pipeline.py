"""The M-BEIR evaluation pipeline (`python -m mmret_jax.eval.mbeir`, eval/mbeir_store.py, eval/mbeir_unirag.py,
the sharded / exact search in eval/retrieval.py) on the bundled mini M-BEIR with generated images.

A tiny from-scratch CLIP-SF (random weights: pipeline mechanics only) embeds the mini data; scores are
checked on hand-made embeddings whose rankings are fixed by construction.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tracemalloc
import types

import numpy as np
import pytest

from mmret_jax.data.samples import make_mbeir_mini
from mmret_jax.data.sources import mbeir
from mmret_jax.eval import mbeir as pipeline
from mmret_jax.eval import mbeir_store as store
from mmret_jax.eval import mbeir_unirag as unirag
from mmret_jax.eval import retrieval
from fixtures import simulated_devices  # noqa: E402

ROOT = str(mbeir.mini_root())


def _run_cli(*argv):
  return pipeline.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  root = tmp_path_factory.mktemp("mbeir_images")
  make_mbeir_mini.write_mini_images(ROOT, root)
  return root


@pytest.fixture(scope="module")
def data(images):
  return mbeir.MBEIR(ROOT, images)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A converted UniIR dir (as `UniIRTask.export` writes it) of a tiny random CLIP-SF."""
  import flax.linen as nn
  import jax
  from mmret_jax.convert.core import write_converted
  from mmret_jax.data import text as text_lib
  from mmret_jax.models import uniir
  from mmret_jax.tasks import uniir as uniir_task
  ns = types.SimpleNamespace
  c = ns(model=ns(width=32, layers=1, heads=2, patch_size=8, dropout=0.0), uniir=ns(variant="clip_sf"),
         data=ns(image_size=16, max_length=77))
  texts = [v for vs in mbeir.MBEIR(ROOT).instructions().table.values() for v in vs]
  tok = text_lib.build_clip_bpe_tokenizer(texts, 300)
  cfg = uniir_task.scratch_config(c, len(tok))
  model = uniir.build(cfg)
  params = nn.unbox(uniir.init_params(model, jax.random.PRNGKey(0)))
  dst = tmp_path_factory.mktemp("tiny_uniir")
  tok.save_pretrained(dst)
  write_converted(dst, family="uniir", hf_config=cfg.to_dict(), params=jax.device_get(params),
                  meta={"variant": cfg.name}, tokenizer_src=None)
  (dst / "uniir.json").write_text(json.dumps({"variant": cfg.name, "max_length": 77, "image_size": 16}))
  return dst


@pytest.fixture(scope="module")
def encoder(model_dir):
  from mmret_jax.tasks.uniir import UniIREncoder
  return UniIREncoder.from_dir(model_dir)


def _common(out, images, *extra):
  return ["--mbeir-root", ROOT, "--out", out, "--image-root", images, "--no-progress", *extra]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, images, model_dir):
  """The mini test split embedded (both pools, shards of 4 rows), indexed and retrieved with both
  backends: {"out": OUT, "faiss": {run name: text}, "jax": {...}}."""
  out = tmp_path_factory.mktemp("mbeir_out")
  args = _common(out, images, "--pool", "both", "--batch-size", 8)
  assert _run_cli("embed", "--model", model_dir, "--shard-size", 4, *args) == 0
  runs = {}
  for backend in ("jax", "faiss"):  # faiss last: its runs / index stay in OUT
    assert _run_cli("index", "--backend", backend, *args) == 0
    assert _run_cli("retrieve", "--backend", backend, *args) == 0
    runs[backend] = {p.name: p.read_text() for p in sorted((out / "runs").glob("*_run.txt"))}
  assert _run_cli("score", "--backend", "faiss", *args) == 0
  return {"out": out, **runs}


# ---------------------------------------------------------------------------
# Search building blocks
# ---------------------------------------------------------------------------
def test_device_pool_sharded_topk_and_exact_rule():
  rng = np.random.default_rng(0)
  docs = retrieval.l2_normalize(rng.standard_normal((40, 8)).astype(np.float32))[rng.integers(0, 40, 700)]
  q = retrieval.l2_normalize(rng.standard_normal((13, 8)).astype(np.float32))
  blocks = (docs[s:s + 97] for s in range(0, 700, 97))  # ragged blocks, re-chunked by 64 rows
  pool = retrieval.device_pool(blocks, 700, 8, chunk_rows=64)
  assert pool.docs.shape == (704, 8)  # padded to whole chunks; the padding never comes back
  s1, r1 = retrieval.topk_sharded(q, pool, 25)
  s0, r0 = retrieval.topk_device(q, docs, 25)
  np.testing.assert_array_equal(r1, r0)  # lower row first on the many exact ties
  np.testing.assert_array_equal(s1, s0)
  ids = rng.permutation(700).astype(np.int64) * 7 + 3
  faiss_search = retrieval.FaissSearcher(retrieval.faiss_idmap_index([(docs, ids)], 8), ids)
  want = np.lexsort((np.broadcast_to(np.arange(700), (13, 700)), -(q.astype(np.float64) @ docs.T.astype(np.float64))),
                    axis=-1)[:, :25]
  for search in (faiss_search, retrieval.DeviceSearcher(pool)):
    _, r = retrieval.topk_exact(search, lambda rows: docs[rows], q, 25, 700)
    np.testing.assert_array_equal(r, want)  # duplicates tie exactly: by row, whatever faiss's own order
  # The whole pool at once (depth = N): still the rule.
  _, r = retrieval.topk_exact(faiss_search, lambda rows: docs[rows], q, 700, 700)
  np.testing.assert_array_equal(r[:, :25], want)


def test_forward_matches_encoder(data, encoder):
  spec = mbeir.EVAL_SETS["cirr_task7"]
  queries = pipeline.mbeir_queries(data, spec.name, "test")
  pool = pipeline.mbeir_pool(data, spec.pool_name("test"))
  instr = data.instructions()
  fwd = store.Forward(encoder, batch_size=5)
  got_q = store.embed_in_memory(fwd, queries, data.image_root, instr, "random", 3, chunk=4)
  got_p = store.embed_in_memory(fwd, pool, data.image_root, chunk=7)
  want_q = encoder.encode_queries([queries[i] for i in range(len(queries))], data.image_root, instr, "random", 3,
                                  batch_size=5)
  want_p = encoder.encode_candidates([pool[i] for i in range(len(pool))], data.image_root, batch_size=5)
  np.testing.assert_allclose(got_q, want_q, atol=1e-6)
  np.testing.assert_allclose(got_p, want_p, atol=1e-6)
  assert np.abs(got_q).max() > 0.1 and fwd.bad_images == 0


# ---------------------------------------------------------------------------
# (a) scores of hand-made embeddings, local and UNION pools, both backends
# ---------------------------------------------------------------------------
PLACES = (1, "tie", 5, 6, 11, "last")  # where each set's 6 queries put their first relevant candidate


def _handmade(data, out):
  """One-hot candidates (axis = UNION row); each query weights its relevant dids and the distractors
  ranked above them. Returns {set: [expected first-relevant rank per query]} for local and UNION."""
  names = pipeline.union_pool_names(data, "test")
  offsets, pools, off = {}, {}, 0
  for n in names:
    pools[n] = pipeline.mbeir_pool(data, n)
    offsets[n] = off
    off += len(pools[n])
  dim = off + 3
  for n in names:
    rows = offsets[n] + np.arange(len(pools[n]))
    store.write_embeddings(out / "embeddings" / f"mbeir_{n}_cand_pool", np.eye(dim, dtype=np.float32)[rows],
                           pools[n].ids, kind="candidate", shard_size=7)
  expect = {"local": {}, "union": {}}
  for spec in data.eval_sets("test"):
    pool = pools[spec.pool_name("test")]
    queries = pipeline.mbeir_queries(data, spec.name, "test")
    qrels = data.qrels(spec.name, "test")
    x = np.zeros((len(queries), dim), np.float32)
    for i, place in enumerate(PLACES):
      rel = sorted(pool.index_of(d) for d in qrels.relevant[queries[i].qid])
      others = [r for r in range(len(pool)) if r not in rel]
      u = offsets[spec.pool_name("test")]
      if place == "last":  # below every zero-score candidate
        x[i, [u + r for r in rel]] = -1.0
        ranks = {"local": len(pool) - len(rel) + 1, "union": dim - 3 - len(rel) + 1}
      elif place == "tie":  # a distractor with the same score: the lower row ranks first
        x[i, [u + r for r in rel]] = 1.0
        x[i, u + others[0]] = 1.0
        ranks = dict.fromkeys(("local", "union"), 2 if others[0] < rel[0] else 1)
      else:
        x[i, [u + r for r in others[:place - 1]]] = 1.0 - 0.02 * np.arange(place - 1)
        x[i, [u + r for r in rel]] = 1.0 - 0.02 * (place - 1)
        ranks = dict.fromkeys(("local", "union"), place)
      for p in ranks:
        expect[p].setdefault(spec.name, []).append(ranks[p])
    store.write_embeddings(out / "embeddings" / f"mbeir_{spec.name}_test", 3.0 * x, queries.ids, kind="query",
                           shard_size=4)
  return expect


@pytest.mark.parametrize("backend", ["faiss", "jax"])
def test_handmade_scores_local_and_union(tmp_path, data, images, backend):
  expect = _handmade(data, tmp_path)
  args = _common(tmp_path, images, "--pool", "both", "--backend", backend)
  for step in ("index", "retrieve", "score"):
    assert _run_cli(step, *args) == 0
  res = json.loads((tmp_path / "results.json").read_text())
  assert len(res["results"]) == 14  # 7 sets x (local, union)
  for r in res["results"]:
    spec = mbeir.EVAL_SETS[r["dataset"]]
    first = expect[r["pool"]][r["dataset"]]
    for k in spec.recall_ks:
      assert r[f"Recall@{k}"] == pytest.approx(np.mean([f <= k for f in first])), (r["dataset"], r["pool"], k)
    assert r["headline"] == r[f"Recall@{spec.headline_k}"] and r["queries"] == 6
  # By hand: places 1, tie, 5, 6, 11, last -> R@1 1/6 (+1/6 when the tie goes to the positive), R@5 3/6 ...
  row = {(r["dataset"], r["pool"]): r for r in res["results"]}
  assert row["cirr_task7", "local"]["Recall@5"] == pytest.approx(3 / 6)
  assert row["cirr_task7", "local"]["Recall@10"] == pytest.approx(4 / 6)
  assert row["fashioniq_task7", "local"]["Recall@50"] == 1.0  # its 24-candidate pool: "last" is rank 24
  assert row["fashioniq_task7", "union"]["Recall@50"] == pytest.approx(5 / 6)  # 155 candidates
  assert row["fashioniq_task7", "union"]["Recall@20"] == pytest.approx(5 / 6)
  heads = [r["headline"] for r in res["results"] if r["pool"] == "union"]
  assert res["average_headline"]["union"] == pytest.approx(np.mean(heads))
  # The tie query of cirr (query 2): distractor and positive have equal scores, the lower row first.
  run = mbeir.read_run_file(tmp_path / "runs" / "mbeir_cirr_task7_single_pool_test_k10_run.txt")
  qid = pipeline.mbeir_queries(data, "cirr_task7", "test")[1].qid
  assert run.scores[qid][0] == run.scores[qid][1] > run.scores[qid][2]
  pool = pipeline.mbeir_pool(data, "cirr_task7")
  assert pool.index_of(run.ranked[qid][0]) < pool.index_of(run.ranked[qid][1])
  tsv = (tmp_path / "results.tsv").read_text().splitlines()
  assert tsv[0].split("\t") == ["TaskID", "Task", "Dataset", "Split", "Metric", "CandPool", "Value", "UnionPool",
                                "UnionValue"]
  assert "7\timage,text -> image\tcirr_task7\ttest\tRecall@5\tcirr_task7\t0.5\tunion\t0.5" in tsv


# ---------------------------------------------------------------------------
# (b) faiss == jax on the model's embeddings; in-memory evaluate == the CLI
# ---------------------------------------------------------------------------
def test_backends_identical_and_evaluate_matches_cli(embedded, encoder, data):
  assert embedded["faiss"] == embedded["jax"] and len(embedded["faiss"]) == 14  # byte-identical run files
  res = json.loads((embedded["out"] / "results.json").read_text())
  for pool in ("local", "union"):
    got = pipeline.evaluate(encoder, data, "test", pool=pool, seed=0, backend="jax", batch_size=8)
    for r in (r for r in res["results"] if r["pool"] == pool):
      for k in mbeir.EVAL_SETS[r["dataset"]].recall_ks:
        assert got[f"{r['dataset']}/recall@{k}"] == pytest.approx(r[f"Recall@{k}"])
      assert got[f"{r['dataset']}/headline"] == pytest.approx(r["headline"])
    assert got["average_headline"] == pytest.approx(res["average_headline"][pool])
    assert got["queries"] == 42 and got["candidates"] == 155 and got["missing_images"] == 0
  one = pipeline.evaluate(encoder, data, "test", sets=("cirr_task7",), backend="faiss", batch_size=8)
  assert {k for k in one if k.startswith("cirr")} == {"cirr_task7/recall@1", "cirr_task7/recall@5",
                                                         "cirr_task7/recall@10", "cirr_task7/headline",
                                                         "cirr_task7/queries"}


# ---------------------------------------------------------------------------
# (c) the CLI end to end in a subprocess (2 host devices: sharded forward and pool)
# ---------------------------------------------------------------------------
def test_cli_all_subprocess(tmp_path, images, model_dir, embedded, data):
  env = dict(os.environ, XLA_FLAGS=simulated_devices(2), JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "mmret_jax.eval.mbeir", "all", "--model", str(model_dir), "--mbeir-root", ROOT,
         "--out", str(tmp_path), "--image-root", str(images), "--pool", "global", "--backend", "jax",
         "--batch-size", "8", "--unirag", "--unirag-complements", "--datasets", "mscoco_task3,cirr_task7"]
  p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "M-BEIR test, UNION pool" in p.stdout and "average headline" in p.stdout
  runs = sorted(x.name for x in (tmp_path / "runs").glob("*_run.txt"))
  assert runs == ["mbeir_cirr_task7_union_pool_test_k10_run.txt", "mbeir_mscoco_task3_union_pool_test_k10_run.txt"]
  assert (tmp_path / "results.tsv").is_file() and (tmp_path / "index" / "mbeir_union_test_cand_pool.json").is_file()
  # Every local pool was embedded for the UNION (7 pools), the queries of the 2 sets only.
  assert len(list((tmp_path / "embeddings").iterdir())) == 9
  # 2-device forward == 1-device forward up to float rounding (float16 shards).
  a = store.StoredEmbeddings([tmp_path / "embeddings" / "mbeir_cirr_task7_cand_pool"])
  b = store.StoredEmbeddings([embedded["out"] / "embeddings" / "mbeir_cirr_task7_cand_pool"])
  np.testing.assert_array_equal(a.ids, b.ids)
  np.testing.assert_allclose(a.matrix(), b.matrix(), atol=2e-3)
  res = json.loads((tmp_path / "results.json").read_text())
  assert [r["dataset"] for r in res["results"]] == ["mscoco_task3", "cirr_task7"]
  # UniRAG records: the seed's layout.
  pool_lines = {}
  for n in pipeline.union_pool_names(data, "test"):
    for line in data.local_pool_path(n).read_text(encoding="utf-8").splitlines():
      pool_lines[json.loads(line)["did"]] = json.loads(line)
  queries = {json.loads(x)["qid"]: json.loads(x)
             for x in data.query_path("mscoco_task3", "test").read_text(encoding="utf-8").splitlines()}
  run = mbeir.read_run_file(tmp_path / "runs" / "mbeir_mscoco_task3_union_pool_test_k10_run.txt")
  lines = (tmp_path / "retrieved_candidates" / "mbeir_mscoco_task3_union_pool_test_k10_retrieved.jsonl")
  recs = [json.loads(x) for x in lines.read_text().splitlines()]
  assert [r["query"]["qid"] for r in recs] == list(run.ranked) and len(recs) == 6
  for r in recs:
    assert list(r) == ["query", "candidates", "complement_candidates"]
    assert r["query"] == queries[r["query"]["qid"]]
    assert r["candidates"] == [pool_lines[d] for d in run.ranked[r["query"]["qid"]]]
    single = [c for c in r["candidates"] if c["modality"] in ("text", "image")]
    assert len(r["complement_candidates"]) == len(single)
    for c, comp in zip(single, r["complement_candidates"]):  # random weights: mostly None (see the next test)
      assert comp is None or (comp["modality"] == unirag.COMPLEMENT[c["modality"]] and comp == pool_lines[comp["did"]])


def _attrs(text, path):
  """(colour, shape) named by an image path or a text of the mini data, else None."""
  if path:
    return make_mbeir_mini.image_attributes(path)
  words = (text or "").lower().replace(".", " ").replace(":", " ").split()
  c = next((w for w in words if w in make_mbeir_mini.COLOURS), None)
  s = next((w for w in words if w in make_mbeir_mini.SHAPES), None)
  return (c, s) if c and s else None


class _FakeEncoder:
  """An encoder whose embedding is the one-hot (colour, shape) an item names, whatever its modality:
  a text candidate's complement is then an image of the same colour and shape."""
  COMBOS = [(c, s) for c in make_mbeir_mini.COLOURS for s in make_mbeir_mini.SHAPES]

  def __init__(self):
    import jax
    dim = len(self.COMBOS) + 1
    self.params = {}
    self.model = types.SimpleNamespace(config=types.SimpleNamespace(embed_dim=dim),
                                       apply=lambda v, ids, *a: jax.nn.one_hot(ids[:, 0], dim))
    enc = self

    class Inputs:
      backbone, max_length, tokenizer, image_cfg, bad_images = "fake", 0, (), None, 0

      def __call__(self, texts, paths):
        ids = [enc.COMBOS.index(a) if (a := _attrs(t, p)) in enc.COMBOS else len(enc.COMBOS)
               for t, p in zip(texts, [p and pathlib.Path(p).name for p in paths])]
        n = len(ids)
        return {"ids": np.asarray(ids, np.int32)[:, None], "mask": np.ones((n, 1), np.int32),
                "pixels": np.zeros((n, 1, 1, 3), np.float32), "txt_mask": np.ones(n, np.float32),
                "img_mask": np.ones(n, np.float32)}
    self.inputs = Inputs()


def test_unirag_complements_found(tmp_path, images, monkeypatch, data):
  monkeypatch.setattr(pipeline, "load_encoder", lambda args: _FakeEncoder())
  args = _common(tmp_path, images, "--pool", "global", "--unirag", "--unirag-complements", "--datasets",
                 "webqa_task1,mscoco_task0", "--instructions", "none", "--batch-size", 8)
  assert _run_cli("all", "--model", "fake", *args) == 0
  found = 0
  for name in ("webqa_task1", "mscoco_task0"):
    path = tmp_path / "retrieved_candidates" / f"mbeir_{name}_union_pool_test_k10_retrieved.jsonl"
    for rec in map(json.loads, path.read_text().splitlines()):
      q = rec["query"]
      single = [c for c in rec["candidates"] if c["modality"] in unirag.COMPLEMENT]
      assert len(rec["complement_candidates"]) == len(single) > 0
      for c, comp in zip(single, rec["complement_candidates"]):
        if comp is None:
          continue
        found += 1
        assert comp["modality"] == unirag.COMPLEMENT[c["modality"]]
        assert _attrs(comp["txt"], comp["img_path"] and pathlib.Path(comp["img_path"]).name) == \
            _attrs(c["txt"], c["img_path"] and pathlib.Path(c["img_path"]).name)
        assert (comp["img_path"] and comp["img_path"] != q["query_img_path"]) or \
            (comp["txt"] and comp["txt"] != q["query_txt"])
  assert found >= 20


_IN_MESH = """
import json, sys
import jax
from mmret_jax.data.sources import mbeir
from mmret_jax.eval import mbeir as pipeline
from mmret_jax.tasks.uniir import UniIREncoder
import flax.linen as nn
from mmret_jax.train.partitioning import RULES, make_mesh
enc = UniIREncoder.from_dir(sys.argv[1])
data = mbeir.MBEIR(mbeir.mini_root(), sys.argv[2])
assert len(jax.devices()) == 2
with jax.set_mesh(make_mesh({"data": -1})), nn.logical_axis_rules(RULES):  # as the training loop runs evaluate
  out = {b: pipeline.evaluate(enc, data, sets=("cirr_task7", "webqa_task1"), pool="union", backend=b, batch_size=3)
         for b in ("jax", "faiss")}
print(json.dumps(out))
"""


def test_evaluate_inside_a_training_mesh(images, model_dir):
  """evaluate() under a caller's 2-device mesh: the forward, the device pool and the sharded top-k
  run on their own meshes."""
  env = dict(os.environ, XLA_FLAGS=simulated_devices(2), JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-c", _IN_MESH, str(model_dir), str(images)], env=env, capture_output=True,
                     text=True, timeout=300, check=False)
  assert p.returncode == 0, p.stderr[-3000:]
  out = json.loads(p.stdout.strip().splitlines()[-1])
  assert out["jax"] == out["faiss"]
  assert out["jax"]["queries"] == 12 and out["jax"]["candidates"] == 155
  assert 0.0 <= out["jax"]["average_headline"] <= 1.0


def test_complement_rule():
  cands = [mbeir.Candidate("9:1", "A red star.", None, "text", None),
           mbeir.Candidate("9:2", None, "a/b.jpg", "image", None),
           mbeir.Candidate("5:3", "x", "c.jpg", "image,text", None)]
  qs = unirag.complement_queries(cands, 4)
  assert [(q.qid, q.modality, q.task_id, q.text, q.img_path) for q in qs] == [
      ("9:4", "text", 0, "A red star.", None), ("9:5", "image", 3, None, "a/b.jpg")]
  query = mbeir.Query("9:1", "A red star.", "q.jpg", "image,text", ("9:1",), (), 8, None)
  same_img = mbeir.Candidate("9:7", None, "q.jpg", "image", None)
  other = mbeir.Candidate("9:8", None, "o.jpg", "image", None)
  text = mbeir.Candidate("9:9", "A red star.", None, "text", None)
  assert unirag.pick_complement(query, "image", [text, same_img, other]) is other
  assert unirag.pick_complement(query, "text", [text, same_img]) is None  # same text as the query
  assert unirag.pick_complement(query, "text", [mbeir.Candidate("9:3", "B.", None, "text", None)]).did == "9:3"


# ---------------------------------------------------------------------------
# (d) resuming after lost / damaged shards, --max-shards, changed settings
# ---------------------------------------------------------------------------
def test_resume_recomputes_only_missing_shards(tmp_path, embedded, images, model_dir, capsys):
  src = embedded["out"] / "embeddings"
  shutil.copytree(src, tmp_path / "embeddings")
  before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "embeddings").rglob("*.npy")}
  mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "embeddings").rglob("*.npy")}
  d = tmp_path / "embeddings" / "mbeir_nights_task4_cand_pool"
  (d / "shard-00002.emb.npy").unlink()  # lost
  with open(d / "shard-00004.emb.npy", "r+b") as f:  # cut short by a kill
    f.truncate(100)
  (tmp_path / "embeddings" / "mbeir_oven_task8_test" / "shard-00001.ids.npy").unlink()
  args = _common(tmp_path, images, "--pool", "both", "--batch-size", 8, "--shard-size", 4)
  with pytest.raises(ValueError, match="incomplete: 2 of 6 shards"):
    store.StoredEmbeddings([d])
  capsys.readouterr()
  assert _run_cli("embed", "--model", model_dir, *args) == 0
  assert "embed: 3 shards computed, 50 reused" in capsys.readouterr().err
  after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "embeddings").rglob("*.npy")}
  assert after == before  # identical results
  touched = {p.name for p, t in mtimes.items() if p.exists() and p.stat().st_mtime_ns != t}
  assert touched <= {"shard-00002.emb.npy", "shard-00002.ids.npy", "shard-00004.emb.npy", "shard-00004.ids.npy",
                     "shard-00001.emb.npy", "shard-00001.ids.npy"}
  # Other settings: a one-line error naming what differs, unless --overwrite.
  assert _run_cli("embed", "--model", model_dir, *args, "--instructions", "first") == 1
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and err.startswith("error: ") and "differ: instructions" in err


def test_max_shards_then_resume(tmp_path, embedded, images, model_dir, capsys):
  args = _common(tmp_path, images, "--batch-size", 8, "--shard-size", 4, "--datasets", "cirr_task7")
  assert _run_cli("embed", "--model", model_dir, *args, "--max-shards", 3) == 75
  assert len(list((tmp_path / "embeddings").rglob("*.emb.npy"))) == 3
  assert "rerun to continue" in capsys.readouterr().err
  assert _run_cli("embed", "--model", model_dir, *args) == 0
  assert "embed: 5 shards computed, 3 reused" in capsys.readouterr().err
  for name in ("mbeir_cirr_task7_test", "mbeir_cirr_task7_cand_pool"):
    for p in (tmp_path / "embeddings" / name).glob("*.npy"):
      assert p.read_bytes() == (embedded["out"] / "embeddings" / name / p.name).read_bytes()


# ---------------------------------------------------------------------------
# (e) host memory of embed is bounded by a shard, not the pool
# ---------------------------------------------------------------------------
def _pool_file(path, n, image_rels):
  kinds = ("text", "image", "image,text")
  with open(path, "w", encoding="utf-8") as f:
    for i in range(n):
      m = kinds[i % 3]
      f.write(json.dumps({"did": f"9:{i}", "txt": None if m == "image" else f"A shape with number {i} on it",
                          "img_path": None if m == "text" else image_rels[i % len(image_rels)], "modality": m,
                          "src_content": None}) + "\n")
  return mbeir.JsonlRecords(path, "candidate")


class _Sampled:
  """Wraps a Forward's `inputs`: records the traced host memory each time a batch is prepared."""

  def __init__(self, inner):
    self.inner, self.high = inner, 0

  def __call__(self, texts, paths):
    out = self.inner(texts, paths)
    self.high = max(self.high, tracemalloc.get_traced_memory()[0])
    return out

  def __getattr__(self, name):
    return getattr(self.inner, name)


def test_embed_host_memory_bounded(tmp_path, encoder):
  """tracemalloc traces every numpy buffer and Python object on the host (not XLA's own buffers). The
  memory held by the embed loop is sampled at every batch (after batch i + 1's inputs are built, while
  batch i runs): a 3,000-row pool (188 batches of 16, 47 shards of 64 rows) must hold no more than a
  300-row pool plus a small slack, and less than one float32 copy of its embeddings (3,000 x 32 x 4 =
  384 KB). Keeping the pool's embeddings, texts or records would break both. (Transient allocations
  inside image decoding, up to ~0.4 MB per batch with this tiny model, are per batch and not sampled.)"""
  rels = [f"img/{c}_star_{i}.jpg" for i, c in enumerate(("red", "blue", "green", "cyan"))]
  for r in rels:
    (tmp_path / r).parent.mkdir(parents=True, exist_ok=True)
    make_mbeir_mini.synthetic_image(r).resize((16, 16)).save(tmp_path / r)
  small, big = _pool_file(tmp_path / "small.jsonl", 300, rels), _pool_file(tmp_path / "big.jsonl", 3000, rels)
  fwd = store.Forward(encoder, batch_size=16)
  kw = {"image_root": tmp_path, "fingerprint": {}, "shard_size": 64}
  store.embed_to_shards(fwd, small, tmp_path / "warm", **kw)  # compile, caches
  held = []
  for name, recs in (("small", small), ("big", big)):
    fwd.inputs = _Sampled(fwd.inputs.inner if isinstance(fwd.inputs, _Sampled) else fwd.inputs)
    tracemalloc.start()
    stats = store.embed_to_shards(fwd, recs, tmp_path / name, **kw)
    tracemalloc.stop()
    held.append(fwd.inputs.high)
    assert stats["computed"] == stats["shards"]
  print("host memory held by the embed loop (300 rows, 3000 rows):", held)
  assert held[1] - held[0] < 2700 * 32 * 4 / 4, held
  assert held[1] < 3000 * 32 * 4, held
  emb = store.StoredEmbeddings([tmp_path / "big"])
  assert emb.num_rows == 3000 and emb.dim == 32 and np.abs(emb.matrix()).max() > 0


# ---------------------------------------------------------------------------
# (f) one-line errors
# ---------------------------------------------------------------------------
def test_errors_one_line(tmp_path, images, capsys):
  cases = [
      (["all", "--model", tmp_path / "no_model", "--mbeir-root", ROOT, "--out", tmp_path / "o"],
       f"model not found: {tmp_path / 'no_model'}"),
      (["all", "--model", tmp_path, "--mbeir-root", tmp_path / "no_root", "--out", tmp_path / "o"],
       f"M-BEIR root not found: {tmp_path / 'no_root'}"),
      (["embed", "--mbeir-root", ROOT, "--out", tmp_path / "o", "--image-root", images],
       "the embed step needs --model DIR"),
      (["retrieve", "--mbeir-root", ROOT, "--out", tmp_path / "o", "--datasets", "cirr_task7"],
       "no embeddings in"),
      (["score", "--mbeir-root", ROOT, "--out", tmp_path / "o", "--datasets", "cirr_task8"],
       "is not an M-BEIR eval set"),
  ]
  for argv, want in cases:
    assert _run_cli(*argv) == 1, argv
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and want in err, err
