"""Product search evaluation as BLaIR reports it: Amazon-C4 and ESCI, dense (any text encoder) and BM25.

The seed's `product_search_results/` (`generate_emb.py` + `eval_search.py`, and `bm25.py`): every query
ranks the whole item pool and the single ground-truth item's rank gives NDCG@k (k = 100; with one relevant
item, 1 / log2(rank + 2) for a 0-based rank < k, else 0), averaged over queries, overall and per category
of the target item.

    # dense: a converted / trained model dir (or an HF dir), CLS of the last layer at up to 512 tokens
    python -m mmret_jax.eval.product_search dense --model runs/blair_base \\
        --queries amazon-c4/test.csv --pool amazon-c4/sampled_item_metadata_1M.jsonl \\
        --cache runs/blair_base/c4_emb --out runs/blair_base/c4.json
    # the BM25 baseline (the seed's length normalisation by default; --length-norm okapi for the textbook one)
    python -m mmret_jax.eval.product_search bm25 --queries esci/test.csv --pool esci/sampled_item_metadata_esci.jsonl

Inputs: the Amazon-C4 layout (`test.csv` with `qid,query,item_id`, a pool JSONL of `{"item_id", "category",
"metadata"}`), which `python -m mmret_jax.data.prepare_esci` also writes for ESCI. Categories come from
`--categories asin2category.json` (the seed's per-domain report) or else the pool's `category` field.

Differences from the seed, all deliberate:
- Queries whose target item is not in the pool are left out and counted (the seed stops with a KeyError).
- Ties go to the lower pool row (the seed leaves them to `torch.topk`).
- Recall@k is reported too (the seed prints NDCG only).
- Dense encoding pads each batch to a multiple of 8 tokens (the seed: to the batch's longest text; masks make
  the embeddings the same).
- The seed's `Mean` pooling leaves the first token out; `--pooling mean` averages every token.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from mmret_jax import cli

K_DEFAULT = 100


# ----------------------------------------------------------------------------- data
def load_benchmark(queries: str | os.PathLike, pool: str | os.PathLike, categories: str | os.PathLike | None = None):
  """(the loaded `AmazonC4`, the target item's category per query [Q] str). Categories: an asin -> category
  JSON object (the seed's `asin2category.json`) or, without one, the pool's `category` field ("" if unknown)."""
  from mmret_jax.data.sources.amazon_reviews import load_amazon_c4  # pylint: disable=import-outside-toplevel
  bench = load_amazon_c4(queries, pool)
  if categories:
    path = pathlib.Path(categories)
    if not path.is_file():
      raise FileNotFoundError(f"--categories {path}: no such file (the asin2category.json of Amazon Reviews 2023)")
    try:
      table = json.loads(path.read_text())
    except ValueError as e:
      raise ValueError(f"--categories {path}: not JSON ({e})") from None
    if not isinstance(table, dict):
      raise ValueError(f"--categories {path}: expected a JSON object asin -> category, got {type(table).__name__}")
    cats = [str(table.get(item, "")) for item in bench.item_ids]
  else:
    by_item = dict(zip(bench.pool_ids, bench.pool_categories))
    cats = [by_item.get(item, "") for item in bench.item_ids]
  return bench, np.asarray(cats, dtype=object)


def report(indices: np.ndarray, targets: np.ndarray, categories: np.ndarray, k: int) -> dict[str, Any]:
  """NDCG@k and Recall@k of the retrieved pool rows `indices` [Q, k] against one target row each, overall
  and per category (sorted by query count, then name): {"overall": {...}, "categories": {name: {...}}}."""
  from mmret_jax.eval import retrieval  # pylint: disable=import-outside-toplevel

  def metrics(rows):
    m = retrieval.retrieval_metrics(indices[rows], targets[rows], ks=(k,))
    return {"queries": int(len(rows)), f"ndcg@{k}": m[f"ndcg@{k}"], f"recall@{k}": m[f"recall@{k}"]}
  out = {"overall": metrics(np.arange(len(targets))), "categories": {}}
  names, counts = np.unique(categories, return_counts=True)
  for name, _ in sorted(zip(names, counts), key=lambda x: (-x[1], x[0])):
    out["categories"][name or "(unknown)"] = metrics(np.flatnonzero(categories == name))
  return out


def format_report(res: dict[str, Any], k: int, title: str) -> str:
  lines = [title, f"| category | queries | NDCG@{k} | Recall@{k} |", "|---|---:|---:|---:|"]
  rows = [("**overall**", res["overall"])] + list(res["categories"].items())
  for name, m in rows:
    lines.append(f"| {name} | {m['queries']:,} | {m[f'ndcg@{k}']:.4f} | {m[f'recall@{k}']:.4f} |")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- dense
def _cache_key(model: str, pool: str, pooling: str, max_length: int, dtype: str) -> str:
  """What the pool embeddings depend on: the model dir (path and its files' sizes and mtimes), the pool file
  (path, size, mtime) and the encoding settings."""
  h = hashlib.sha256()
  mp = pathlib.Path(model)
  files = sorted(p for p in mp.rglob("*") if p.is_file()) if mp.is_dir() else []
  for p in [pathlib.Path(pool).resolve(), *files]:
    st = p.stat()
    h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
  h.update(f"{mp.resolve() if mp.exists() else model}|{pooling}|{max_length}|{dtype}".encode())
  return h.hexdigest()[:16]


def encode_pool(encoder, texts: Sequence[str], *, cache: pathlib.Path | None, key: str, chunk: int,
                **kw) -> np.ndarray:
  """[N, D] float32 embeddings of the pool texts, in chunks of `chunk` items; with a `cache` dir each chunk is
  saved as it is done (`pool-KEY/NNNNN.npy`, written atomically), so an interrupted run resumes at the next
  chunk and a rerun with the same model, pool and settings encodes nothing."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  n = len(texts)
  folder = cache / f"pool-{key}" if cache is not None else None
  if folder is not None:
    folder.mkdir(parents=True, exist_ok=True)
  parts = []
  bar = tqdm(range(0, n, chunk), desc="pool chunks", unit="chunk", disable=not kw.get("progress", False))
  for i, start in enumerate(bar):
    path = folder / f"{i:05d}.npy" if folder is not None else None
    rows = min(chunk, n - start)
    if path is not None and path.exists():
      part = np.load(path)
      if part.shape[0] == rows:
        parts.append(part)
        continue
    part = np.asarray(encoder.encode_text(list(texts[start:start + rows]), **kw), np.float32)
    if path is not None:
      tmp = path.with_suffix(".tmp.npy")
      np.save(tmp, part)
      os.replace(tmp, path)
    parts.append(part)
  return np.concatenate(parts) if parts else np.zeros((0, encoder.dim), np.float32)


def dense_rankings(args, bench, keep: np.ndarray) -> np.ndarray:
  """[Q', k] pool rows ranked by cosine similarity for the queries `keep`."""
  from mmret_jax import embed  # pylint: disable=import-outside-toplevel
  from mmret_jax.eval import retrieval  # pylint: disable=import-outside-toplevel
  encoder = embed.load(args.model, dtype=args.dtype)
  kw = dict(pooling=args.pooling, max_length=args.max_length, batch_size=args.batch_size, normalize=False,
            progress=args.progress)
  cache = pathlib.Path(args.cache) if args.cache else None
  key = _cache_key(args.model, args.pool, args.pooling, args.max_length, args.dtype)
  print(f"encoding {len(bench.pool_texts):,} pool items and {len(keep):,} queries with {args.model} "
        f"({args.pooling}, <= {args.max_length} tokens, {args.dtype})", file=sys.stderr)
  docs = encode_pool(encoder, bench.pool_texts, cache=cache, key=key, chunk=args.chunk, **kw)
  queries = np.asarray(encoder.encode_text([bench.queries[i] for i in keep], **kw), np.float32)
  _, idx = retrieval.search(retrieval.l2_normalize(queries), retrieval.l2_normalize(docs), args.k)
  return idx


def bm25_rankings(args, bench, keep: np.ndarray) -> np.ndarray:
  """[Q', k] pool rows ranked by the seed's BM25 for the queries `keep`."""
  from mmret_jax.eval import bm25  # pylint: disable=import-outside-toplevel
  docs = bm25.tokenize_all(bench.pool_texts, progress=args.progress, desc="tokenize pool")
  index = bm25.BM25(docs, k1=args.k1, b=args.b, epsilon=args.epsilon, length_norm=args.length_norm,
                    progress=args.progress)
  queries = bm25.tokenize_all([bench.queries[i] for i in keep], progress=False)
  _, idx = index.topk(queries, args.k, progress=args.progress)
  return idx


# ----------------------------------------------------------------------------- CLI
def evaluate(args) -> dict[str, Any]:
  bench, cats = load_benchmark(args.queries, args.pool, args.categories)
  if not bench.pool_ids:
    raise ValueError(f"--pool {args.pool}: no usable item (every line was skipped: {bench.stats})")
  keep = np.flatnonzero(bench.target_index >= 0)
  missing = len(bench.target_index) - len(keep)
  if missing:
    print(f"note: {missing:,} of {len(bench.target_index):,} queries have a target item that is not in the pool; "
          "left out", file=sys.stderr)
  if not len(keep):
    raise ValueError(f"no query of {args.queries} has its item in {args.pool}")
  if args.max_queries:
    keep = keep[:args.max_queries]
  k = min(args.k, len(bench.pool_ids))
  args.k = k
  idx = dense_rankings(args, bench, keep) if args.method == "dense" else bm25_rankings(args, bench, keep)
  res = report(idx, bench.target_index[keep], cats[keep], k)
  res.update(method=args.method, k=k, pool_items=len(bench.pool_ids), queries_without_target=int(missing),
             skipped=bench.stats, settings={a: getattr(args, a) for a in sorted(vars(args))
                                            if a not in ("progress", "out")})
  what = (f"dense {args.model} ({args.pooling})" if args.method == "dense"
          else f"BM25 (k1 {args.k1}, b {args.b}, epsilon {args.epsilon}, length norm {args.length_norm})")
  print(format_report(res, k, f"{what}: {len(keep):,} queries, pool of {len(bench.pool_ids):,} items"))
  if args.out:
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=1, sort_keys=True, default=str))
    os.replace(tmp, out)
    print(f"wrote {out}", file=sys.stderr)
  return res


def main(argv: Sequence[str] | None = None) -> int:
  ap = cli.ArgumentParser(prog="python -m mmret_jax.eval.product_search",
                          description=__doc__.split("\n\n", 1)[0])
  sub = ap.add_subparsers(dest="method", required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--queries", required=True, help="test.csv (qid,query,item_id[,...]); .gz accepted")
  common.add_argument("--pool", required=True, help='item pool JSONL {"item_id", "category", "metadata"}')
  common.add_argument("--categories", help="asin2category.json for the per-category report (default: the pool's "
                      "`category` field)")
  common.add_argument("-k", type=int, default=K_DEFAULT, help="ranking depth (NDCG@k, Recall@k)")
  common.add_argument("--max-queries", type=int, default=0, help="only the first N queries (0 = all)")
  common.add_argument("--out", help="write the results as JSON")
  common.add_argument("--no-progress", action="store_true", help="no progress bars")
  d = sub.add_parser("dense", parents=[common], help="a text encoder's embeddings, cosine similarity")
  d.add_argument("--model", required=True, help="converted mmret_jax dir, training workdir or Hugging Face dir")
  d.add_argument("--pooling", default="cls", help="cls (BLaIR; the seed's default), mean, ...")
  d.add_argument("--max-length", type=int, default=512, help="tokens per text (the seed's 512)")
  d.add_argument("--batch-size", type=int, default=32, help="texts per batch")
  d.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  d.add_argument("--cache", help="dir for the pool embeddings: saved in chunks, reused and resumed")
  d.add_argument("--chunk", type=int, default=65536, help="pool items per cached chunk")
  b = sub.add_parser("bm25", parents=[common], help="the seed's BM25 baseline")
  b.add_argument("--k1", type=float, default=1.5)
  b.add_argument("--b", type=float, default=0.75)
  b.add_argument("--epsilon", type=float, default=0.25, help="floor of negative idfs, x the mean idf")
  b.add_argument("--length-norm", choices=("seed", "okapi"), default="seed",
                 help="seed: the seed's corpus size / avgdl in every document's norm (its reported numbers); "
                      "okapi: the document's own length / avgdl")
  args = ap.parse_args(argv)
  args.progress = not args.__dict__.pop("no_progress")
  if args.k < 1:
    ap.error(f"-k must be >= 1, got {args.k}")
  if args.max_queries < 0:
    ap.error(f"--max-queries must be >= 0, got {args.max_queries}")
  if args.method == "dense":
    from mmret_jax import embed  # pylint: disable=import-outside-toplevel
    if args.pooling not in embed.POOLINGS:
      ap.error(f"--pooling must be one of {', '.join(embed.POOLINGS)}, got {args.pooling!r}")
    if args.max_length < 2 or args.batch_size < 1 or args.chunk < 1:
      ap.error("--max-length must be >= 2, --batch-size and --chunk >= 1")
  for name in ("queries", "pool"):
    if not pathlib.Path(getattr(args, name)).is_file():
      ap.error(f"--{name} {getattr(args, name)}: no such file")

  def run() -> int:
    evaluate(args)
    return 0
  return cli.run(run)


if __name__ == "__main__":
  sys.exit(main())
