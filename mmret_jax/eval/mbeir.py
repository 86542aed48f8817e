"""UniIR's M-BEIR evaluation: embed -> exact inner-product index -> top-k -> TREC run files -> Recall@K.

    python -m mmret_jax.eval.mbeir all --model DIR --mbeir-root ROOT --out OUT [--pool local|global|both]
        [--plot OUT/topk.png [--plot-queries N]]

Seed: `TIGER-AI-Lab/UniIR` `src/common/mbeir_embedder.py`, `src/common/mbeir_retriever.py` and the
eval yamls (`configs_scripts/large/eval/{inbatch,unirag}`); shared/reference/uniir.md.

* Embed: queries get their instruction (`--instructions`), candidates none; raw embeddings are
  saved as float16 shards with their hashed ids (mbeir_store.py: layout, resuming, memory bound,
  process / device sharding). The UNION pool is not embedded: it is the concatenation of the local
  pools' shards (a repeated did kept at its first occurrence), as the seed builds it.
* Index: vectors L2-normalised per row, then faiss `IDMap,Flat` with METRIC_INNER_PRODUCT and the
  hashed dids (`--backend faiss`), or, for `--backend jax`, the normalised matrix is streamed into
  device memory at retrieval time, split over the local devices (`retrieval.device_pool`).
* Retrieve: k = the set's largest Recall@K (10 or 50; `--k` overrides); run files
  `qid Q0 did rank score run_id task_id` with the seed's run ids.
* Tie rule (both backends, `retrieval.topk_exact`): candidates are ranked by the float64 inner
  product of the normalised float32 vectors, highest first; equal scores by pool row, lowest first
  (row = line order of the pool file; UNION: the local pools in the seed's order). Each backend's
  float32 shortlist (depth k + 16, deeper when it ends within float32 error of the k-th score) is
  re-scored that way, so faiss and jax give identical rankings and scores. (faiss alone orders
  equal scores by descending id; the seed leaves ties to faiss.)
* Score: Recall@K = hit rate, averaged per (dataset, task) (`mbeir.recall_by_task`), the seed's K
  list per set; headline R@5 (R@10 for Fashion200K, FashionIQ) and its average.

Output folder OUT:
    images/                          --synthetic-images without --image-root: the generated images
    embeddings/mbeir_<set>_<split>/  query shards;  embeddings/mbeir_<pool>_cand_pool/: local pools
    index/<pool key>.json            rows, dim, dropped duplicates, embeddings fingerprint
    index/<pool key>.index           faiss.write_index of the IDMap,Flat index (--backend faiss)
    runs/<run_id>_run.txt            TREC run per (set, pool): mbeir_<set>_{single|union}_pool_<split>_k<k>
    runs/retrieve.json               the backend and pools of the last retrieve step
    results.tsv, results.json        Recall@K table (the seed's TSV columns) and everything as JSON
    retrieved_candidates/<run_id>_retrieved.jsonl   --unirag: UniRAG records (mbeir_unirag.py)
    --plot PATH.png                  retrieve / all: a row per query (the first --plot-queries of each
                                     (set, pool) run): the query, then its top candidates (images, texts,
                                     or images titled by their text), relevant ones (qrels) framed green
Pool keys: mbeir_<pool>_cand_pool (e.g. mbeir_mscoco_task0_test_cand_pool), mbeir_union_<split>_cand_pool.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib
import statistics
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np

from mmret_jax.data.sources import mbeir
from mmret_jax.eval import mbeir_store as store
from mmret_jax.eval import retrieval

POOLS = {"local": ("local",), "global": ("union",), "union": ("union",), "both": ("local", "union")}
BACKENDS = ("faiss", "jax")
TSV_METRICS = ("Recall@1", "Recall@5", "Recall@10", "Recall@20", "Recall@50")


def task_name(task_id: int) -> str:
  """Seed `get_mbeir_task_name`: "image,text -> image"."""
  q, c = mbeir.TASKS[int(task_id)]
  return f"{q} -> {c}"


def select_sets(data: mbeir.MBEIR, split: str, names: Sequence[str] = ()) -> list[mbeir.EvalSetSpec]:
  """The eval sets to run (default: every set with a query file for `split`), in the seed's order."""
  from mmret_jax import cli  # pylint: disable=import-outside-toplevel
  have = {s.name: s for s in data.eval_sets(split)}
  if not have:
    raise FileNotFoundError(f"no M-BEIR {split} query files under {data.root / 'query' / split}")
  for n in names:
    if n not in have:
      known = n in mbeir.EVAL_SETS
      raise ValueError(f"eval set {n!r} " + (f"has no {split} query file {data.query_path(n, split)}" if known else
                                             f"is not an M-BEIR eval set{cli.suggest(n, mbeir.EVAL_SETS)}")
                       + f"; available: {','.join(have)}")
  return [s for s in have.values() if not names or s.name in names]


def union_pool_names(data: mbeir.MBEIR, split: str) -> list[str]:
  """Local pools whose concatenation is the UNION pool of `split` (all that exist, seed order)."""
  names = []
  for s in mbeir.EVAL_SETS.values():
    p = s.pool_name(split)
    if p not in names and data.local_pool_path(p).is_file():
      names.append(p)
  if not names:
    raise FileNotFoundError(f"no local candidate pools under {data.root / 'cand_pool' / 'local'} for {split}")
  return names


def score_run(spec: mbeir.EvalSetSpec, ranked: dict[str, Sequence[str]], qrels: mbeir.Qrels,
              depth: int) -> list[dict[str, Any]]:
  """Recall@K rows (one per task id of the set) of a ranking; queries without qrels are counted."""
  no_qrels = sum(q not in qrels.relevant for q in ranked)
  run = {q: list(d) for q, d in ranked.items() if q in qrels.relevant}
  ks = [k for k in spec.recall_ks if k <= depth]
  out = []
  for task, res in mbeir.recall_by_task(run, qrels, ks, round_to=None).items():
    row = {"dataset": spec.name, "task_id": int(task), "task": task_name(task), "queries": int(res["queries"]),
           "no_qrels": no_qrels, "headline_metric": f"Recall@{spec.headline_k}"}
    row.update({f"Recall@{k}": float(res[f"Recall@{k}"]) for k in ks})
    row["headline"] = row.get(row["headline_metric"])
    out.append(row)
  return out


def average_headline(rows: Sequence[dict]) -> float | None:
  vals = [r["headline"] for r in rows if r.get("headline") is not None]
  return statistics.fmean(vals) if vals else None


def _bar(blocks, total: int, desc: str, progress: bool):
  """Blocks of rows with a progress bar over their rows."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  with tqdm(total=total, desc=desc, unit="row", disable=not progress) as bar:
    for b in blocks:
      yield b
      bar.update(len(b[0]) if isinstance(b, tuple) else len(b))


def make_searcher(backend: str, emb: store.Embeddings, faiss_index=None, progress: bool = False):
  """A `topk_exact` search function over `emb` (a loaded faiss index, or one built here)."""
  if backend == "faiss":
    if faiss_index is None:
      faiss_index = retrieval.faiss_idmap_index(_bar(emb.id_blocks(), emb.num_rows, "faiss add", progress), emb.dim)
    return retrieval.FaissSearcher(faiss_index, emb.ids)
  if backend == "jax":
    blocks = _bar(emb.blocks(), emb.num_rows, "to device", progress)
    return retrieval.DeviceSearcher(retrieval.device_pool(blocks, emb.num_rows, emb.dim))
  raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def rank(searcher, emb: store.Embeddings, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(scores [Q, K], pool rows [Q, K]) under the tie rule of the module docstring."""
  return retrieval.topk_exact(searcher, emb.gather, queries, k, emb.num_rows)


def mbeir_queries(data: mbeir.MBEIR, name: str, split: str, check_images: bool = True) -> mbeir.JsonlRecords:
  """An eval set's queries (the data layer joins paths to its root, so pass them relative)."""
  return data.queries(data.query_path(name, split).relative_to(data.root), check_images=check_images)


def mbeir_pool(data: mbeir.MBEIR, pool_name: str, check_images: bool = False) -> mbeir.JsonlRecords:
  """A local candidate pool by name (e.g. mscoco_task0_test)."""
  return data.pool(data.local_pool_path(pool_name).relative_to(data.root), check_images=check_images)


def _stats(records: mbeir.JsonlRecords) -> tuple[int, int]:
  return int(records.stats.get("skipped", 0)), int(records.stats.get("missing_images", 0))


# ---------------------------------------------------------------------------
# In memory (a training task's eval)
# ---------------------------------------------------------------------------
def evaluate(encoder, data: mbeir.MBEIR, split: str = "test", sets: Sequence[str] = (), pool: str = "local",
             instructions: str = "random", seed: int = 0, backend: str = "jax",
             batch_size: int = 64) -> dict[str, float]:
  """The whole pipeline in memory: Recall@K of `encoder` (a `UniIREncoder`) on M-BEIR eval sets.

  Each set's queries and its local pool (pool "local"), or the UNION pool (pool "union" / "global":
  every local pool of `split`, each embedded once, concatenated) are embedded, L2-normalised and
  ranked exactly (module docstring). Every process computes the same full result.

  Returns flat keys: `<set>/recall@<k>` (the seed's K list), `<set>/headline`, `<set>/queries`,
  `average_headline`, and counts `queries`, `candidates`, `skipped_lines` (malformed lines of the
  files read), `missing_images` (image paths absent on disk), `unreadable_images`. Recalls are
  fractions in [0, 1]. A set with several task ids gets `<set>/task<t>/...` keys.
  """
  if pool not in POOLS or len(POOLS[pool]) != 1:
    raise ValueError(f"pool must be 'local' or 'union' (alias 'global'), got {pool!r}")
  pool = POOLS[pool][0]
  specs = select_sets(data, split, tuple(sets))
  instr = data.instructions() if instructions != "none" else None
  fwd = store.Forward(encoder, batch_size)
  bad0 = fwd.bad_images
  counts = {"queries": 0, "candidates": 0, "skipped_lines": 0, "missing_images": 0}

  def embed(records, queries: bool):
    skipped, missing = _stats(records)
    counts["skipped_lines"] += skipped
    counts["missing_images"] += missing
    counts["queries" if queries else "candidates"] += len(records)
    raw = store.embed_in_memory(fwd, records, data.image_root, instr if queries else None, instructions, seed)
    return store.MemoryEmbeddings(raw, records.ids)

  def local_pool(name):
    return embed(mbeir_pool(data, name, check_images=True), False)

  union = searcher = None
  if pool == "union":
    union, _ = store.MemoryEmbeddings.concat([local_pool(n) for n in union_pool_names(data, split)])
    searcher = make_searcher(backend, union)
  out: dict[str, float] = {}
  rows = []
  for spec in specs:
    queries = mbeir_queries(data, spec.name, split, check_images=True)
    if not len(queries):
      continue
    q = embed(queries, True)
    emb = union if union is not None else local_pool(spec.pool_name(split))
    k = max(spec.recall_ks)
    _, top = rank(searcher if searcher is not None else make_searcher(backend, emb), emb, q.x, k)
    ranked = {mbeir.unhash_qid(h): [mbeir.unhash_did(d) for d in emb.ids[r]] for h, r in zip(q.ids, top)}
    res = score_run(spec, ranked, data.qrels(spec.name, split), k)
    for r in res:
      prefix = spec.name if len(res) == 1 else f"{spec.name}/task{r['task_id']}"
      out.update({f"{prefix}/{m.lower()}": r[m] for m in r if m.startswith("Recall@")})
      out[f"{prefix}/headline"] = r["headline"]
      out[f"{prefix}/queries"] = float(r["queries"])
    rows += res
  avg = average_headline(rows)
  if avg is not None:
    out["average_headline"] = avg
  counts["unreadable_images"] = fwd.bad_images - bad0
  out.update({k: float(v) for k, v in counts.items()})
  return out


# ---------------------------------------------------------------------------
# The command line: a plan of folders, then the four steps
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class PoolGroup:
  key: str  # mbeir_<pool>_cand_pool or mbeir_union_<split>_cand_pool
  names: list[str]  # local pool names (several for UNION)
  dirs: list[pathlib.Path]  # their embedding folders
  dedupe: bool  # UNION: a repeated did is kept at its first occurrence
  members: list[tuple[mbeir.EvalSetSpec, str]]  # (set, "local" | "union") searched in it


class Plan:
  """Which sets, pools and folders a command line means."""

  def __init__(self, args, data: mbeir.MBEIR):
    self.args, self.data, self.split = args, data, args.split
    self.out = pathlib.Path(args.out)
    self.sets = select_sets(data, args.split, tuple(n for n in (args.datasets or "").split(",") if n))
    self.pools = POOLS[args.pool]

  def query_dir(self, spec) -> pathlib.Path:
    return self.out / "embeddings" / f"mbeir_{spec.name}_{self.split}"

  def pool_dir(self, pool_name: str) -> pathlib.Path:
    return self.out / "embeddings" / f"mbeir_{pool_name}_cand_pool"

  def pool_key(self, spec, pool: str) -> str:
    return f"mbeir_union_{self.split}_cand_pool" if pool == "union" else f"mbeir_{spec.pool_name(self.split)}_cand_pool"

  def pool_names(self, pool: str) -> list[str]:
    if pool == "union":
      return union_pool_names(self.data, self.split)
    return list(dict.fromkeys(s.pool_name(self.split) for s in self.sets))

  def pool_groups(self) -> list[PoolGroup]:
    """Each pool the plan searches, once, with the (set, pool) pairs searched in it."""
    groups: dict[str, PoolGroup] = {}
    for pool in self.pools:
      for spec in self.sets:
        key = self.pool_key(spec, pool)
        if key not in groups:
          names = self.pool_names("union") if pool == "union" else [spec.pool_name(self.split)]
          groups[key] = PoolGroup(key, names, [self.pool_dir(n) for n in names], pool == "union", [])
        groups[key].members.append((spec, pool))
    return list(groups.values())

  def depth(self, spec) -> int:
    return int(self.args.k) or max(spec.recall_ks)

  def run_id(self, spec, pool: str) -> str:
    return mbeir.run_id(spec.name, pool, self.split, self.depth(spec))

  def run_path(self, spec, pool: str) -> pathlib.Path:
    return self.out / "runs" / f"{self.run_id(spec, pool)}_run.txt"


def _log(msg: str) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_index() == 0:
    print(msg, file=sys.stderr, flush=True)


def _progress(plan: Plan) -> bool:
  return not plan.args.no_progress and sys.stderr.isatty()


def load_encoder(args):
  from mmret_jax.tasks.uniir import UniIREncoder  # pylint: disable=import-outside-toplevel
  if not args.model:
    raise ValueError(f"the {args.step} step needs --model DIR (a converted UniIR dir or a training workdir)")
  return UniIREncoder.from_dir(args.model, args.dtype)


def encoder_fingerprint(encoder) -> dict[str, str]:
  import dataclasses  # pylint: disable=import-outside-toplevel
  from mmret_jax.data import feature_cache  # pylint: disable=import-outside-toplevel
  inp = encoder.inputs
  cfg = encoder.model.config
  image = dataclasses.asdict(inp.image_cfg) if dataclasses.is_dataclass(inp.image_cfg) else repr(inp.image_cfg)
  settings = {"config": cfg.to_dict() if hasattr(cfg, "to_dict") else repr(cfg), "backbone": inp.backbone,
              "dtype": str(getattr(encoder.model, "dtype", "")), "max_length": inp.max_length, "image": image,
              "tokenizer": [type(inp.tokenizer).__name__, len(inp.tokenizer)]}
  return {"weights": feature_cache.params_digest(encoder.params)[:24], "inputs": store.digest(settings)}


def step_embed(plan: Plan, encoder) -> dict[str, dict]:
  """Embeds every query file and pool the plan needs (resumable). Raises ShardLimitReached."""
  args, data = plan.args, plan.data
  instr = data.instructions() if args.instructions != "none" else None
  fwd = store.Forward(encoder, args.batch_size)
  base = encoder_fingerprint(encoder)
  qbase = {**base, "instructions": args.instructions, "seed": int(args.seed),
           "instruction_table": store.digest(sorted(instr.table.items())) if instr else None}
  budget = store.ShardBudget(args.max_shards or None)
  kw = {"image_root": data.image_root, "shard_size": args.shard_size, "budget": budget, "overwrite": args.overwrite,
        "progress": _progress(plan), "log": _log}
  report = {}
  for spec in plan.sets:
    recs = mbeir_queries(data, spec.name, plan.split, check_images=True)
    report[plan.query_dir(spec).name] = store.embed_to_shards(
        fwd, recs, plan.query_dir(spec), fingerprint=qbase, instructions=instr, mode=args.instructions,
        seed=args.seed, **kw)
  names = list(dict.fromkeys(n for pool in plan.pools for n in plan.pool_names(pool)))
  for name in names:
    recs = mbeir_pool(data, name, check_images=True)
    report[plan.pool_dir(name).name] = store.embed_to_shards(fwd, recs, plan.pool_dir(name), fingerprint=base, **kw)
  done = sum(r["computed"] for r in report.values())
  reused = sum(r["reused"] for r in report.values())
  bad = sum(r["unreadable_images"] for r in report.values())
  _log(f"embed: {done} shards computed, {reused} reused" + (f", {bad} unreadable images (embedded as absent)"
                                                             if bad else ""))
  return report


def step_index(plan: Plan) -> None:
  """Checks the shards of every pool, writes index/<key>.json and, for faiss, index/<key>.index."""
  idx_dir = plan.out / "index"
  idx_dir.mkdir(parents=True, exist_ok=True)
  for g in plan.pool_groups():
    key, dirs = g.key, g.dirs
    emb = store.StoredEmbeddings(dirs, dedupe=g.dedupe)
    meta = {"pool": key, "embeddings": [str(d) for d in dirs], "rows": emb.num_rows, "dim": emb.dim,
            "dropped_duplicates": emb.dropped, "fingerprint": emb.fingerprint(), "faiss_index": None,
            "metric": "inner product of L2-normalised vectors"}
    if plan.args.backend == "faiss":
      import faiss  # pylint: disable=import-outside-toplevel
      index = retrieval.faiss_idmap_index(_bar(emb.id_blocks(), emb.num_rows, key, _progress(plan)), emb.dim)
      tmp = idx_dir / f"{key}.index.tmp"
      faiss.write_index(index, str(tmp))
      os.replace(tmp, idx_dir / f"{key}.index")
      meta["faiss_index"] = f"{key}.index"
    (idx_dir / f"{key}.json").write_text(json.dumps(meta, indent=1))
    _log(f"index: {key}: {emb.num_rows} rows x {emb.dim}" + (f" ({emb.dropped} repeated dids dropped)"
                                                             if emb.dropped else "")
         + (" -> faiss IDMap,Flat" if meta["faiss_index"] else ""))


def open_pool(plan: Plan, group: PoolGroup, backend: str):
  """(embeddings, searcher) of an indexed pool; errors when the index is missing or stale."""
  key = group.key
  emb = store.StoredEmbeddings(group.dirs, dedupe=group.dedupe)
  meta_path = plan.out / "index" / f"{key}.json"
  if not meta_path.is_file():
    raise FileNotFoundError(f"no index for {key} ({meta_path}); run the `index` step first")
  meta = json.loads(meta_path.read_text())
  if meta.get("fingerprint") != emb.fingerprint():
    raise ValueError(f"the index {meta_path} was built from other embeddings; rerun the `index` step")
  faiss_index = None
  if backend == "faiss":
    if not meta.get("faiss_index") or not (plan.out / "index" / meta["faiss_index"]).is_file():
      raise FileNotFoundError(f"no faiss index for {key} in {plan.out / 'index'}; run `index --backend faiss`")
    import faiss  # pylint: disable=import-outside-toplevel
    faiss_index = faiss.read_index(str(plan.out / "index" / meta["faiss_index"]))
  return emb, make_searcher(backend, emb, faiss_index, _progress(plan))


def step_retrieve(plan: Plan) -> None:
  runs = plan.out / "runs"
  runs.mkdir(parents=True, exist_ok=True)
  (runs / "retrieve.json").write_text(json.dumps({"backend": plan.args.backend, "split": plan.split,
                                                  "pools": list(plan.pools)}))
  for g in plan.pool_groups():
    emb, searcher = open_pool(plan, g, plan.args.backend)
    for spec, pool in g.members:
      q = store.StoredEmbeddings([plan.query_dir(spec)])
      if not q.num_rows:
        _log(f"retrieve: {spec.name} has no queries; skipped")
        continue
      scores, top = rank(searcher, emb, q.matrix(), plan.depth(spec))
      qrels = plan.data.qrels(spec.name, plan.split)
      qids = [mbeir.unhash_qid(h) for h in q.ids]
      tasks = {qid: qrels.task_ids.get(qid, spec.task_id) for qid in qids}
      results = ((qid, [mbeir.unhash_did(d) for d in emb.ids[r]], s) for qid, r, s in zip(qids, top, scores))
      path = plan.run_path(spec, pool)
      tmp = path.with_name(path.name + ".tmp")
      mbeir.write_run_file(tmp, results, plan.run_id(spec, pool), tasks)
      os.replace(tmp, path)
      _log(f"retrieve: {path.name} ({len(qids)} queries, {g.key}, {plan.args.backend})")
  if getattr(plan.args, "plot", None):
    path = plot_runs(plan, plan.args.plot, plan.args.plot_queries)
    _log(f"retrieve: plot of the top {PLOT_TOP} per query -> {path}")


PLOT_TOP = 5  # candidates drawn per query by --plot


def _item(img_path: str | None, text: str | None, image_root: pathlib.Path):
  """What viz draws for a record: its image path, its text, or (image, text) when it has both."""
  img = str(image_root / img_path) if img_path else None
  if img and text:
    return img, text
  return img or (text or "(empty)")


def topk_queries(data: mbeir.MBEIR, spec: mbeir.EvalSetSpec, split: str, run: mbeir.RunFile, n: int = 3,
                 k: int = PLOT_TOP, pools: Sequence[mbeir.JsonlRecords] | None = None,
                 qids: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """`viz.topk_rows` rows for the first `n` queries of a run file (file order; or the run's queries
  `qids`): the query (image, text or (image, text)), its top-`k` candidates (an image+text candidate as
  its image, the did and the start of its text in its title), scores, dids and relevance (the set's qrels:
  True frames green). `pools`: the candidate records the run searched (default: the set's local pool; a
  UNION run: `[mbeir_pool(data, n) for n in union_pool_names(data, split)]`)."""
  queries = mbeir_queries(data, spec.name, split, check_images=False)
  qrels = data.qrels(spec.name, split)
  pools = list(pools) if pools is not None else [mbeir_pool(data, spec.pool_name(split))]
  rows = []
  for qid in list(qids) if qids is not None else list(run.ranked)[:n]:
    if qid not in run.ranked:
      raise KeyError(f"query {qid!r} is not in the run file")
    dids = run.ranked[qid][:k]
    cands, names = [], []
    for did in dids:
      c = next((c for p in pools if (c := p.get(did)) is not None), None)
      item = "(not in the pool)" if c is None else _item(c.img_path, c.text, data.image_root)
      if isinstance(item, tuple):  # image + text: the image, titled by the text
        item, text = item
        names.append(f"{did} {textwrap.shorten(text, 22, placeholder='...')}")
      else:
        names.append(did)
      cands.append(item)
    q = queries.get(qid)
    rel = set(qrels.relevant.get(qid, ()))
    rows.append({"query": "(unknown qid)" if q is None else _item(q.img_path, q.text, data.image_root),
                 "title": spec.name, "candidates": cands, "names": names,
                 "scores": list(run.scores[qid][:k]), "relevant": [d in rel for d in dids]})
  return rows


def plot_runs(plan: Plan, path: str | os.PathLike, n: int = 2) -> pathlib.Path:
  """--plot: the first `n` queries of every (set, pool) run file of the plan, a row each (viz.topk_rows)."""
  from mmret_jax import viz  # pylint: disable=import-outside-toplevel
  rows = []
  union = None
  for pool in plan.pools:
    for spec in plan.sets:
      run_path = plan.run_path(spec, pool)
      if not run_path.is_file():
        continue
      if pool == "union" and union is None:
        union = [mbeir_pool(plan.data, name) for name in union_pool_names(plan.data, plan.split)]
      for r in topk_queries(plan.data, spec, plan.split, mbeir.read_run_file(run_path), n, PLOT_TOP,
                            union if pool == "union" else None):
        if len(plan.pools) > 1:
          r["title"] = f"{r['title']} ({pool})"
        rows.append(r)
  if not rows:
    raise FileNotFoundError(f"--plot: no run file with queries under {plan.out / 'runs'}")
  return viz.save_png(viz.topk_rows(rows, k=PLOT_TOP), path)


def step_score(plan: Plan) -> dict[str, Any]:
  rows = []
  for pool in plan.pools:
    for spec in plan.sets:
      path = plan.run_path(spec, pool)
      if not path.is_file():
        raise FileNotFoundError(f"no run file {path}; run the `retrieve` step first")
      run = mbeir.read_run_file(path)
      for r in score_run(spec, run.ranked, plan.data.qrels(spec.name, plan.split), plan.depth(spec)):
        rows.append({**r, "split": plan.split, "pool": pool, "run_id": plan.run_id(spec, pool),
                     "cand_pool": "union" if pool == "union" else spec.pool_name(plan.split)})
  embeddings = {}
  for d in sorted((plan.out / "embeddings").glob("*/")):
    m = store.read_manifest(d)
    if m:
      embeddings[d.name] = {"rows": m["rows"], **(m.get("stats") or {})}
  info = plan.out / "runs" / "retrieve.json"
  backend = json.loads(info.read_text()).get("backend") if info.is_file() else None
  result = {"split": plan.split, "pools": list(plan.pools), "backend": backend, "results": rows,
            "average_headline": {p: average_headline([r for r in rows if r["pool"] == p]) for p in plan.pools},
            "embeddings": embeddings}
  (plan.out / "results.json").write_text(json.dumps(result, indent=1))
  write_tsv(plan.out / "results.tsv", rows)
  print(format_table(result))
  skipped = sum(e.get("skipped") or 0 for e in embeddings.values())
  missing = sum(e.get("missing_images") or 0 for e in embeddings.values())
  no_qrels = sum(r["no_qrels"] for r in rows)
  if skipped or missing or no_qrels:
    print(f"data: {skipped} malformed lines skipped, {missing} missing images (embedded without image), "
          f"{no_qrels} queries without qrels (not scored)")
  return result


def write_tsv(path: pathlib.Path, rows: Sequence[dict]) -> None:
  """The seed's `eval_results_*.tsv` columns; one line per (set, task, metric), local values with the
  union value beside them when both pools ran (union-only runs: CandPool "union", no union columns)."""
  order = {name: i for i, name in enumerate(mbeir.EVAL_SETS)}
  union = {(r["dataset"], r["task_id"]): r for r in rows if r["pool"] == "union"}
  main = [r for r in rows if r["pool"] == "local"] or list(union.values())
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f, delimiter="\t")
    w.writerow(["TaskID", "Task", "Dataset", "Split", "Metric", "CandPool", "Value", "UnionPool", "UnionValue"])
    for r in sorted(main, key=lambda r: (r["task_id"], order.get(r["dataset"], 99))):
      u = union.get((r["dataset"], r["task_id"])) if r["pool"] == "local" else None
      for m in TSV_METRICS:
        if m in r:
          w.writerow([r["task_id"], r["task"], r["dataset"], r["split"], m, r["cand_pool"], round(r[m], 4),
                      "union" if u else "", round(u[m], 4) if u and m in u else ""])


def format_table(result: dict) -> str:
  """Recall@K in percent per (set, task) and pool, the headline column and its average."""
  lines = []
  for pool in result["pools"]:
    rows = [r for r in result["results"] if r["pool"] == pool]
    lines.append(f"M-BEIR {result['split']}, {'UNION pool' if pool == 'union' else 'local pools'} "
                 f"(Recall@K, %; retrieved with {result['backend'] or '?'})")
    lines.append(f"{'dataset':<18} {'task':<26}" + "".join(f"{m.replace('Recall', 'R'):>7}" for m in TSV_METRICS)
                 + f"{'headline':>10} {'queries':>8}")
    for r in rows:
      vals = "".join(f"{100 * r[m]:7.2f}" if m in r else f"{'':7}" for m in TSV_METRICS)
      head = "n/a" if r["headline"] is None else f"{100 * r['headline']:.2f}"
      lines.append(f"{r['dataset']:<18} {r['task']:<26}{vals}{head:>10} {r['queries']:>8}")
    avg = result["average_headline"].get(pool)
    n = sum(r["headline"] is not None for r in rows)
    label = "average headline" + (f" ({n} of {len(rows)} rows)" if n < len(rows) else "")
    lines.append(f"{label:<79}{'n/a' if avg is None else f'{100 * avg:.2f}':>10}")
    if n < len(rows):
      lines.append("(n/a: the headline Recall@K is deeper than the retrieval depth --k)")
  return "\n".join(lines)


def flat_metrics(result: dict) -> dict[str, float]:
  """`step_score`'s result as `evaluate`'s flat keys (`<set>/recall@k`, `<set>/headline`, ...; with both
  pools the union ones under `union/`)."""
  out: dict[str, float] = {}
  for pool in result["pools"]:
    rows = [r for r in result["results"] if r["pool"] == pool]
    pre = "union/" if pool == "union" and len(result["pools"]) > 1 else ""
    for r in rows:
      name = r["dataset"] if sum(x["dataset"] == r["dataset"] for x in rows) == 1 else \
          f"{r['dataset']}/task{r['task_id']}"
      out.update({f"{pre}{name}/{m.lower()}": r[m] for m in r if m.startswith("Recall@")})
      if r["headline"] is not None:
        out[f"{pre}{name}/headline"] = r["headline"]
      out[f"{pre}{name}/queries"] = float(r["queries"])
    if (avg := result["average_headline"].get(pool)) is not None:
      out[f"{pre}average_headline"] = avg
  return out


def run_pipeline(encoder, data: mbeir.MBEIR, out, *, split: str = "test", sets: Sequence[str] = (),
                 pool: str = "local", instructions: str = "random", seed: int = 0, backend: str = "faiss",
                 batch_size: int = 64) -> dict[str, Any]:
  """The command line's `all` with an encoder in memory (a training task's final eval): shards, index,
  run files and results.{tsv,json} under `out`, the table printed. Returns `step_score`'s result
  (process 0; {} on the others)."""
  args = _parser().parse_args(["all", "--mbeir-root", str(data.root), "--out", str(out), "--split", split,
                               "--pool", pool, "--instructions", instructions, "--seed", str(seed),
                               "--backend", backend, "--batch-size", str(batch_size), "--no-progress",
                               "--overwrite"] + (["--datasets", ",".join(sets)] if sets else []))
  import jax  # pylint: disable=import-outside-toplevel
  from mmret_jax.train import partitioning  # pylint: disable=import-outside-toplevel
  plan = Plan(args, data)
  step_embed(plan, encoder)
  partitioning.sync_processes("mbeir-embed")
  if jax.process_index() != 0:
    return {}  # index, retrieve and score run on process 0
  step_index(plan)
  step_retrieve(plan)
  return step_score(plan)


def main(argv: Sequence[str] | None = None) -> int:
  from mmret_jax import cli  # pylint: disable=import-outside-toplevel
  args = _parser().parse_args(argv)
  return cli.run(lambda: _run(args))


def _parser():
  from mmret_jax import cli  # pylint: disable=import-outside-toplevel
  ap = cli.ArgumentParser(prog="python -m mmret_jax.eval.mbeir", description=__doc__.split("\n\n")[0])
  ap.add_argument("step", choices=("embed", "index", "retrieve", "score", "all"))
  ap.add_argument("--model", default=None, help="converted UniIR dir or training workdir (embed, all, "
                                              "--unirag-complements)")
  ap.add_argument("--mbeir-root", required=True, help="M-BEIR root (query/, cand_pool/, qrels/, instructions/)")
  ap.add_argument("--out", required=True, help="output folder (embeddings, index, runs, results)")
  ap.add_argument("--image-root", default=None, help="folder the img_path values are relative to (default: the root)")
  ap.add_argument("--split", default="test", choices=mbeir.SPLITS)
  ap.add_argument("--datasets", default=None, help="comma-separated eval sets (default: all with query files)")
  ap.add_argument("--pool", default="local", choices=("local", "global", "both"),
                  help="local pools, the UNION (global) pool, or both")
  ap.add_argument("--instructions", default="random", choices=mbeir.INSTRUCTION_MODES,
                  help="query instructions: random variant (seeded per qid), the first one, or none")
  ap.add_argument("--k", type=int, default=0, help="retrieval depth (0: each set's largest Recall@K, as the seed)")
  ap.add_argument("--backend", default="faiss", choices=BACKENDS, help="exact search: faiss IDMap,Flat or jax")
  ap.add_argument("--batch-size", type=int, default=256, help="items per forward (rounded to the device count)")
  ap.add_argument("--shard-size", type=int, default=32768, help="embedding rows per shard file")
  ap.add_argument("--max-shards", type=int, default=0, help="debug: stop after computing N shards (exit 75)")
  ap.add_argument("--overwrite", action="store_true", help="replace embeddings made with other settings")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  ap.add_argument("--unirag", action="store_true", help="also write UniRAG retrieved-candidate records")
  ap.add_argument("--unirag-complements", action="store_true",
                  help="with --unirag: find each text / image candidate's image / text complement (needs --model)")
  ap.add_argument("--seed", type=int, default=0, help="seed of the instruction draws")
  ap.add_argument("--synthetic-images", action="store_true",
                  help="draw missing images first (the bundled mini M-BEIR; demos and tests only)")
  ap.add_argument("--plot", default=None, metavar="PATH.png",
                  help="retrieve / all: also save a PNG of the top-5 candidates of the first queries of each run")
  ap.add_argument("--plot-queries", type=int, default=2, metavar="N", help="with --plot: queries per (set, pool)")
  ap.add_argument("--no-progress", action="store_true")
  return ap


def _run(args) -> int:
  from mmret_jax import cli  # pylint: disable=import-outside-toplevel
  from mmret_jax.train import partitioning  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  if args.unirag_complements and not args.unirag:
    raise ValueError("--unirag-complements needs --unirag")
  if args.k < 0 or args.batch_size < 1 or args.shard_size < 1:
    raise ValueError("--k must be >= 0, --batch-size and --shard-size >= 1")
  if args.plot is not None:
    if args.step not in ("retrieve", "all"):
      raise ValueError(f"--plot draws the retrieve step's results: use it with `retrieve` or `all`, not `{args.step}`")
    if pathlib.Path(args.plot).suffix.lower() != ".png":
      raise ValueError(f"--plot writes a PNG: give a path ending in .png, got {args.plot}")
    if args.plot_queries < 1:
      raise ValueError(f"--plot-queries must be >= 1, got {args.plot_queries}")
  partitioning.maybe_initialize_distributed()
  root = pathlib.Path(args.mbeir_root)
  if not root.exists():
    raise FileNotFoundError(f"M-BEIR root not found: {root}")
  image_root = pathlib.Path(args.image_root) if args.image_root else None
  if args.synthetic_images:
    from mmret_jax.data.samples import make_mbeir_mini  # pylint: disable=import-outside-toplevel
    image_root = image_root or pathlib.Path(args.out) / "images"
    if jax.process_index() == 0:
      make_mbeir_mini.write_mini_images(root, image_root)
    partitioning.sync_processes("mbeir-images")
  plan = Plan(args, mbeir.MBEIR(root, image_root))
  steps = ("embed", "index", "retrieve", "score") if args.step == "all" else (args.step,)
  encoder = load_encoder(args) if "embed" in steps or (args.unirag_complements and "score" in steps) else None
  if "embed" in steps:
    try:
      step_embed(plan, encoder)
    except store.ShardLimitReached as e:
      _log(f"embed: {e}")
      return cli.EXIT_INTERRUPTED
    partitioning.sync_processes("mbeir-embed")
  if jax.process_index() != 0:
    return 0  # index, retrieve and score run on process 0
  if "index" in steps:
    step_index(plan)
  if "retrieve" in steps:
    step_retrieve(plan)
  if "score" in steps:
    step_score(plan)
    if args.unirag:
      from mmret_jax.eval import mbeir_unirag  # pylint: disable=import-outside-toplevel
      mbeir_unirag.write_all(plan, encoder if args.unirag_complements else None, log=_log)
  return 0


if __name__ == "__main__":
  sys.exit(main())
