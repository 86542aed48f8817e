"""`python -m mmret_jax.eval.product_search` on a tiny Amazon-C4-layout benchmark: the dense NDCG@k / Recall@k,
overall and per category, equal the seed's pipeline written here in PyTorch (transformers AutoModel, CLS of the
last layer, L2-normalised dot products, torch.topk, NDCG with one relevant item); pool embeddings are cached in
chunks and reused / resumed; BM25 equals the seed's BM25_Model transcribed in tests/test_bm25.py; queries whose
item is not in the pool are left out and counted; bad input is a one-line error."""

from __future__ import annotations

import csv
import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from fixtures import make_hf_dir  # noqa: E402

from mmret_jax.eval import product_search  # noqa: E402

K = 10
WORDS = ("kettle steel fast boil quiet blender smoothie ice glass cup red blue dog leash cat toy soft warm "
         "winter coat rain boots leather wallet slim travel mug lid").split()


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  root = tmp_path_factory.mktemp("ps")
  rng = np.random.default_rng(0)
  items = []
  for i in range(30):
    cat = ("Home", "Pets", "Fashion")[i % 3]
    items.append({"item_id": f"B{i:04d}", "category": cat, "metadata": " ".join(rng.choice(WORDS, 12)) + "."})
  lines = [json.dumps(x) for x in items]
  lines.insert(5, "{not json")  # a malformed line: skipped and counted
  (root / "pool.jsonl").write_text("\n".join(lines) + "\n")
  with open(root / "test.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["qid", "query", "item_id", "user_id", "ori_rating", "ori_review"])
    for q in range(14):
      target = f"B{(q * 7) % 30:04d}" if q != 3 else "B9999"  # query 3: its item is not in the pool
      words = items[(q * 7) % 30]["metadata"].split()[:5]
      w.writerow([q, "I want a " + " ".join(words), target, "U", 5.0, "a review, with a comma"])
  asin2cat = {x["item_id"]: "All " + x["category"] for x in items}
  (root / "asin2category.json").write_text(json.dumps(asin2cat))
  hf = root / "hf"
  model, _ = make_hf_dir(hf, "roberta", seed=4)
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():  # spread the CLS vectors (a random tiny model's are nearly parallel: every score ~ 1 - 1e-7)
    for name, p in model.named_parameters():
      if name.startswith(("encoder.", "embeddings.word")) and name.endswith(".weight") and "LayerNorm" not in name:
        p.mul_(8.0)
  model.save_pretrained(hf)
  return root, items


def seed_dense(hf: pathlib.Path, queries: list[str], pool: list[str], targets: list[int], k: int) -> np.ndarray:
  """Per-query NDCG@k of the seed's generate_emb.py + eval_search.py, written in PyTorch."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  tok = transformers.AutoTokenizer.from_pretrained(str(hf))
  model = transformers.AutoModel.from_pretrained(str(hf)).eval()

  def emb(texts):
    out = []
    with torch.no_grad():
      for s in range(0, len(texts), 8):
        enc = tok(texts[s:s + 8], padding=True, max_length=64, truncation=True, return_tensors="pt")
        out.append(model(**enc).last_hidden_state[:, 0])
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)
  scores = emb(queries) @ emb(pool).T
  gaps = -np.diff(np.sort(scores.numpy(), 1)[:, ::-1][:, :k + 1], axis=1)
  assert gaps.min() > 1e-5, gaps.min()  # no near-tie inside the top k + 1: fp32 rounding cannot reorder them
  top = torch.topk(scores, k, dim=-1).indices.numpy()
  ndcg = []
  for row, t in zip(top, targets):
    hit = np.flatnonzero(row == t)
    ndcg.append(1.0 / math.log2(hit[0] + 2) if len(hit) else 0.0)
  return np.asarray(ndcg)


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "mmret_jax.eval.product_search", *map(str, args)],
                        capture_output=True, text=True, timeout=600)


def test_dense_equals_the_seed_pipeline_and_caches(bench, tmp_path):
  root, items = bench
  common = ["--queries", root / "test.csv", "--pool", root / "pool.jsonl", "-k", K, "--no-progress"]
  dense = ["dense", "--model", root / "hf", "--max-length", 64, "--batch-size", 4, "--cache", tmp_path / "cache",
           "--chunk", 8]
  r = run_cli(*dense, *common, "--out", tmp_path / "a.json", "--categories", root / "asin2category.json")
  assert r.returncode == 0, r.stderr
  assert "1 of 14 queries have a target item that is not in the pool" in r.stderr
  res = json.loads((tmp_path / "a.json").read_text())
  assert res["queries_without_target"] == 1 and res["pool_items"] == 30 and res["skipped"]["pool"]["skip_reasons"] == {"json": 1}
  # the seed's pipeline on the same queries and pool (the malformed line and query 3 left out)
  with open(root / "test.csv", newline="") as f:
    rows = [r_ for r_ in csv.DictReader(f) if r_["item_id"] != "B9999"]
  index = {x["item_id"]: i for i, x in enumerate(items)}
  targets = [index[r_["item_id"]] for r_ in rows]
  want = seed_dense(root / "hf", [r_["query"] for r_ in rows], [x["metadata"] for x in items], targets, K)
  assert res["overall"]["queries"] == 13
  assert res["overall"][f"ndcg@{K}"] == pytest.approx(want.mean(), abs=1e-6)
  assert 0.0 < want.mean() < 1.0  # an informative case: some hits, not all at rank 0
  cats = np.asarray(["All " + items[t]["category"] for t in targets])
  for name in set(cats):
    m = res["categories"][name]
    assert m["queries"] == int((cats == name).sum())
    assert m[f"ndcg@{K}"] == pytest.approx(want[cats == name].mean(), abs=1e-6)
  assert "| **overall** | 13 |" in r.stdout
  # 30 items in chunks of 8: 4 cached chunks; a rerun reads them; a lost chunk is re-encoded
  chunks = sorted((tmp_path / "cache").glob("pool-*/*.npy"))
  assert len(chunks) == 4
  chunks[-1].unlink()
  r = run_cli(*dense, *common, "--out", tmp_path / "b.json", "--categories", root / "asin2category.json")
  assert r.returncode == 0, r.stderr
  b = json.loads((tmp_path / "b.json").read_text())
  assert b["overall"] == res["overall"] and b["categories"] == res["categories"]
  assert len(sorted((tmp_path / "cache").glob("pool-*/*.npy"))) == 4
  # without --categories: the pool's own `category` field
  r = run_cli(*dense, *common, "--out", tmp_path / "c.json")
  assert r.returncode == 0, r.stderr
  assert set(json.loads((tmp_path / "c.json").read_text())["categories"]) == {"Home", "Pets", "Fashion"}


@pytest.mark.parametrize("norm", ["seed", "okapi"])
def test_bm25_equals_the_seed_formulas(bench, tmp_path, norm):
  from mmret_jax.eval import bm25  # pylint: disable=import-outside-toplevel
  from test_bm25 import seed_scores  # pylint: disable=import-outside-toplevel
  root, items = bench
  r = run_cli("bm25", "--queries", root / "test.csv", "--pool", root / "pool.jsonl", "-k", K, "--length-norm", norm,
              "--k1", 1.2, "--no-progress", "--out", tmp_path / "r.json")
  assert r.returncode == 0, r.stderr
  res = json.loads((tmp_path / "r.json").read_text())
  with open(root / "test.csv", newline="") as f:
    rows = [r_ for r_ in csv.DictReader(f) if r_["item_id"] != "B9999"]
  index = {x["item_id"]: i for i, x in enumerate(items)}
  corpus = [bm25.tokenize(x["metadata"]) for x in items]
  ndcg = []
  for row in rows:
    s = np.asarray(seed_scores(corpus, bm25.tokenize(row["query"]), k1=1.2, length_norm=norm))
    rank = int(np.sum(s > s[index[row["item_id"]]]))  # 0-based rank of the target; ties: lower row first
    rank += int(np.sum(s[:index[row["item_id"]]] == s[index[row["item_id"]]]))
    ndcg.append(1.0 / math.log2(rank + 2) if rank < K else 0.0)
  assert res["overall"]["queries"] == 13 and res["method"] == "bm25"
  assert res["overall"][f"ndcg@{K}"] == pytest.approx(np.mean(ndcg), abs=1e-12)
  assert np.mean(ndcg) > 0.3  # the queries reuse their item's words: BM25 finds most


def test_bad_input_is_one_line(bench, tmp_path):
  root, _ = bench
  r = run_cli("bm25", "--queries", tmp_path / "none.csv", "--pool", root / "pool.jsonl")
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --queries")
  r = run_cli("dense", "--model", root / "hf", "--pooling", "first", "--queries", root / "test.csv",
              "--pool", root / "pool.jsonl")
  assert r.returncode == 2 and "--pooling must be one of" in r.stderr
  (tmp_path / "other.jsonl").write_text(json.dumps({"item_id": "X1", "category": "Home", "metadata": "a b"}) + "\n")
  r = run_cli("bm25", "--queries", root / "test.csv", "--pool", tmp_path / "other.jsonl", "--no-progress")
  assert r.returncode == 1, r.stderr
  assert r.stderr.strip().splitlines()[-1] == (f"error: no query of {root / 'test.csv'} has its item in "
                                               f"{tmp_path / 'other.jsonl'}")
  with pytest.raises(FileNotFoundError, match="--categories"):
    product_search.load_benchmark(root / "test.csv", root / "pool.jsonl", tmp_path / "missing.json")
