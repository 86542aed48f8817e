"""Exact dense retrieval (top-k by inner product) and ranking metrics.

Mirrors the two evaluations we reproduce:
- BLaIR product search (`eval_search.py`): L2-normalised embeddings, dot product over the whole
  pool, top 100, RecBole NDCG (one relevant item: 1/log2(rank+1), 1-based rank).
- UniIR (`mbeir_retriever.py`): faiss exact inner-product index, Recall@K = hit rate (1 if any
  positive is in the top K), reported here as `hit@k`.

Shapes: Q queries, N docs, D embedding dim, K retrieved depth.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Elements of one [queries, docs] score block in the numpy path (128 MiB of float32).
_BLOCK_ELEMENTS = 1 << 25


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
  """[..., D] -> float32 rows of unit L2 norm (all-zero rows stay zero)."""
  x = np.asarray(x, dtype=np.float32)
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  return np.ascontiguousarray(x / np.maximum(norm, eps))


@functools.lru_cache(maxsize=None)
def _faiss():
  """The faiss module, or None (warning once per process) when it is not installed."""
  try:
    import faiss  # pylint: disable=import-outside-toplevel
  except ImportError:
    warnings.warn("faiss is not installed; mmret_jax.eval.retrieval.search falls back to exact "
                  "numpy top-k (same results, slower). `pip install 'mmret_jax[faiss]'`.",
                  RuntimeWarning, stacklevel=3)
    return None
  return faiss


def _check_inputs(queries, docs, k: int, metric: str) -> tuple[np.ndarray, np.ndarray, int]:
  """Casts to float32 C-contiguous, validates shapes, applies `metric`, clamps k to N."""
  queries = np.ascontiguousarray(queries, dtype=np.float32)
  docs = np.ascontiguousarray(docs, dtype=np.float32)
  if queries.ndim != 2 or docs.ndim != 2 or queries.shape[1] != docs.shape[1]:
    raise ValueError(f"queries [Q, D] and docs [N, D] needed, got {queries.shape} and {docs.shape}")
  if metric == "cosine":
    queries, docs = l2_normalize(queries), l2_normalize(docs)
  elif metric != "ip":
    raise ValueError(f"metric must be 'ip' or 'cosine', got {metric!r}")
  k = min(int(k), docs.shape[0])
  if k < 1:
    raise ValueError(f"need k >= 1 and a non-empty pool, got k={k}, N={docs.shape[0]}")
  return queries, docs, k


def _sort_rows(scores: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Sorts each row by score descending, then index ascending."""
  order = np.lexsort((idx, -scores), axis=-1)
  return np.take_along_axis(scores, order, 1), np.take_along_axis(idx, order, 1)


def _topk_block(scores: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Row-wise top k of [B, M] candidates; ties at the cut go to the lowest index.

  Requires that within each row, equal scores appear in increasing `idx` order by position.
  """
  if scores.shape[1] > k:
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1:k]  # k-th largest score per row
    above = scores > kth
    tied = scores == kth
    need = k - above.sum(1, keepdims=True)
    keep = above | (tied & (np.cumsum(tied, axis=1) <= need))
    scores = scores[keep].reshape(-1, k)
    idx = idx[keep].reshape(-1, k)
  return _sort_rows(scores, idx)


def _search_numpy(queries: np.ndarray, docs: np.ndarray, k: int,
                  batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Blocked exact top-k: query blocks of `batch_size`, doc blocks bounded by `_BLOCK_ELEMENTS`."""
  n = docs.shape[0]
  out_s = np.empty((queries.shape[0], k), np.float32)
  out_i = np.empty((queries.shape[0], k), np.int64)
  for q0 in range(0, queries.shape[0], batch_size):
    q = queries[q0:q0 + batch_size]
    doc_block = max(k, _BLOCK_ELEMENTS // len(q))
    best_s = np.empty((len(q), 0), np.float32)
    best_i = np.empty((len(q), 0), np.int64)
    for d0 in range(0, n, doc_block):
      s = q @ docs[d0:d0 + doc_block].T
      i = np.broadcast_to(np.arange(d0, d0 + s.shape[1], dtype=np.int64), s.shape)
      # The running best (earlier, lower indices, sorted) goes first, so ties keep index order.
      best_s, best_i = _topk_block(np.concatenate([best_s, s], 1),
                                   np.concatenate([best_i, i], 1), k)
    out_s[q0:q0 + len(q)], out_i[q0:q0 + len(q)] = best_s, best_i
  return out_s, out_i


def _search_faiss(faiss, queries: np.ndarray, docs: np.ndarray, k: int,
                  batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """faiss `IndexFlatIP` (exact); rows re-sorted so ties inside the top k are in index order."""
  index = faiss.IndexFlatIP(docs.shape[1])
  index.add(docs)
  out_s = np.empty((queries.shape[0], k), np.float32)
  out_i = np.empty((queries.shape[0], k), np.int64)
  for q0 in range(0, queries.shape[0], batch_size):
    s, i = index.search(queries[q0:q0 + batch_size], k)
    out_s[q0:q0 + len(s)], out_i[q0:q0 + len(s)] = _sort_rows(s, i.astype(np.int64))
  return out_s, out_i


def search(queries: np.ndarray, docs: np.ndarray, k: int, *, metric: str = "ip",
           use_faiss: bool = True, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k retrieval.

  Args:
    queries: [Q, D] query embeddings (cast to float32 C-contiguous).
    docs: [N, D] pool embeddings.
    k: depth; clamped to N.
    metric: "ip" (inner product) or "cosine" (L2-normalises both sides first).
    use_faiss: use `faiss.IndexFlatIP` if installed; otherwise (or if False) blocked numpy.
    batch_size: queries per search call / score block.

  Returns:
    scores [Q, K] float32 (descending) and indices [Q, K] int64. Rows are ordered by score, then
    by index. The numpy path keeps the lowest indices when several docs tie at the k-th score;
    faiss decides that cut itself.
  """
  queries, docs, k = _check_inputs(queries, docs, k, metric)
  faiss = _faiss() if use_faiss else None
  if faiss is not None:
    return _search_faiss(faiss, queries, docs, k, batch_size)
  return _search_numpy(queries, docs, k, batch_size)


@functools.partial(jax.jit, static_argnames="k")
def _topk_scores(q: jax.Array, d: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """[B, D] x [N, D] -> top-k scores and indices; lax.top_k puts the lower index first on ties."""
  return jax.lax.top_k(jnp.matmul(q, d.T, precision=jax.lax.Precision.HIGHEST), k)


def topk_device(queries: np.ndarray | jax.Array, docs: np.ndarray | jax.Array, k: int, *,
                batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """On-device exact inner-product top-k (jnp matmul + `jax.lax.top_k`) for pools that fit.

  Same contract as `search(..., metric="ip")`: returns host scores [Q, K] float32 and indices
  [Q, K] int64, k clamped to N. The matmul runs at full float32 precision (no TF32 / bf16 passes).
  """
  docs = jnp.asarray(docs, jnp.float32)
  queries = jnp.asarray(queries, jnp.float32)
  if queries.ndim != 2 or docs.ndim != 2 or queries.shape[1] != docs.shape[1]:
    raise ValueError(f"queries [Q, D] and docs [N, D] needed, got {queries.shape} and {docs.shape}")
  k = min(int(k), docs.shape[0])
  if k < 1:
    raise ValueError(f"need k >= 1 and a non-empty pool, got k={k}, N={docs.shape[0]}")
  parts = [_topk_scores(queries[q0:q0 + batch_size], docs, k)
           for q0 in range(0, queries.shape[0], batch_size)]
  if not parts:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
  scores = np.concatenate([np.asarray(s) for s, _ in parts]).astype(np.float32)
  indices = np.concatenate([np.asarray(i) for _, i in parts]).astype(np.int64)
  return scores, indices


def _relevant_sets(relevant, num_queries: int) -> list[set[int]]:
  """Sequence of id sets (or single ids) -> list of Q non-empty sets."""
  sets = [{int(r)} if isinstance(r, (int, np.integer)) else {int(x) for x in r} for r in relevant]
  if len(sets) != num_queries:
    raise ValueError(f"{len(sets)} relevance entries for {num_queries} queries")
  empty = [q for q, s in enumerate(sets) if not s]
  if empty:
    raise ValueError(f"{len(empty)} queries have no relevant docs (first: query {empty[0]})")
  return sets


def retrieval_metrics(indices: np.ndarray, relevant: Sequence[Iterable[int]] | np.ndarray,
                      ks: Sequence[int] = (1, 5, 10, 50, 100)) -> dict[str, float]:
  """Ranking metrics of retrieved `indices` [Q, K] against the relevant doc ids of each query.

  With binary relevance and 0-based rank r, averaged over queries:
  - `recall@k`: |relevant in top k| / |relevant| (RecBole; equals hit rate for one relevant item).
  - `ndcg@k`: sum_{r<k, hit} 1/log2(r+2) over the ideal DCG of min(|relevant|, k) hits.
  - `mrr@k`: 1/(r+1) of the first hit within the top k, else 0.
  - `hit@k`: 1 if any relevant doc is in the top k (UniIR's "Recall@K").

  Args:
    indices: [Q, K] retrieved doc ids, best first.
    relevant: per query, a set of relevant ids (or a single id), or an int array [Q].
    ks: cutoffs; those above the retrieved depth K get no key rather than a wrong value.

  Returns:
    {"recall@k", "ndcg@k", "mrr@k", "hit@k"} -> float for each k <= K in `ks`.
  """
  indices = np.asarray(indices)
  if indices.ndim != 2:
    raise ValueError(f"indices must be [Q, K], got {indices.shape}")
  num_q, depth = indices.shape
  if isinstance(relevant, np.ndarray) and relevant.ndim == 1:  # one relevant id per query
    if len(relevant) != num_q:
      raise ValueError(f"{len(relevant)} relevance entries for {num_q} queries")
    hits = indices == relevant[:, None]
    num_rel = np.ones(num_q)
  else:
    sets = _relevant_sets(relevant, num_q)
    hits = np.zeros((num_q, depth), bool)
    for q, s in enumerate(sets):
      hits[q] = np.isin(indices[q], np.fromiter(s, np.int64, len(s)))
    num_rel = np.array([len(s) for s in sets], np.float64)
  discount = 1.0 / np.log2(np.arange(depth) + 2.0)  # rank r -> 1/log2(r+2)
  ideal_cum = np.cumsum(discount)
  first = np.where(hits.any(1), hits.argmax(1), depth)  # depth = no hit
  out = {}
  for k in sorted(set(int(k) for k in ks)):
    if k < 1:
      raise ValueError(f"cutoffs must be >= 1, got {k}")
    if k > depth:
      continue
    top = hits[:, :k]
    dcg = top @ discount[:k]
    idcg = ideal_cum[np.minimum(num_rel, k).astype(int) - 1]
    out[f"recall@{k}"] = float(np.mean(top.sum(1) / num_rel))
    out[f"ndcg@{k}"] = float(np.mean(dcg / idcg))
    out[f"mrr@{k}"] = float(np.mean(np.where(first < k, 1.0 / (first + 1.0), 0.0)))
    out[f"hit@{k}"] = float(np.mean(top.any(1)))
  return out


def evaluate_text_retrieval(query_emb: np.ndarray, doc_emb: np.ndarray,
                            relevant: Sequence[Iterable[int]] | np.ndarray,
                            ks: Sequence[int] = (1, 5, 10, 50, 100),
                            **search_kwargs) -> dict[str, float]:
  """L2-normalises both sides, retrieves max(ks) (clamped to N) and returns `retrieval_metrics`.

  `search_kwargs` go to `search` (`use_faiss`, `batch_size`).
  """
  _, indices = search(l2_normalize(query_emb), l2_normalize(doc_emb), max(ks), **search_kwargs)
  return retrieval_metrics(indices, relevant, ks)


# ---------------------------------------------------------------------------
# Pools sharded over devices, faiss IDMap indexes, and one tie rule for both
# ---------------------------------------------------------------------------
POOL_AXIS = "pool"
# Float32 [query batch, rows per device] score elements per device in `topk_sharded` (1 GiB).
SCORE_BUDGET = 1 << 28
# Extra depth of the float32 shortlist that `topk_exact` re-scores in float64.
RERANK_MARGIN = 16


class DevicePool:
  """An [N, D] float32 pool in device memory, rows split evenly over a 1-D mesh (`POOL_AXIS`).

  `docs` is [devices * rows_per_device, D]; rows >= `num_docs` are zero padding that
  `topk_sharded` never returns. Build it with `device_pool`.
  """

  def __init__(self, docs: jax.Array, num_docs: int, mesh):
    self.docs, self.num_docs, self.mesh = docs, int(num_docs), mesh
    self.rows_per_device = docs.shape[0] // mesh.devices.size

  @property
  def dim(self) -> int:
    return int(self.docs.shape[1])


@functools.partial(jax.jit, donate_argnums=0)
def _write_rows(buf: jax.Array, rows: jax.Array, start: jax.Array) -> jax.Array:
  return jax.lax.dynamic_update_slice(buf, rows, (start, jnp.zeros_like(start)))


def device_pool(blocks: Iterable[np.ndarray], num_docs: int, dim: int, *, devices=None,
                chunk_rows: int = 8192) -> DevicePool:
  """Streams host row blocks (in pool order, `num_docs` rows in all) into a `DevicePool`.

  Host memory stays at one chunk of `chunk_rows` rows: each device's slice is allocated on the
  device and filled chunk by chunk (in place, donated), so no [N, D] host array is ever built.
  `devices` defaults to this process's local devices (in a multi-process run each process holds
  its own copy of the pool; the seed's faiss index is per-process too).
  """
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  devices = list(devices) if devices is not None else jax.local_devices()
  mesh = Mesh(np.asarray(devices), (POOL_AXIS,))
  ndev, num_docs = len(devices), int(num_docs)
  if num_docs < 1:
    raise ValueError("cannot build a device pool of 0 rows")
  per_device = (num_docs + ndev - 1) // ndev
  chunk = max(1, min(int(chunk_rows), per_device))
  rpd = (per_device + chunk - 1) // chunk * chunk  # rows per device: a multiple of the chunk
  # Each device's slice is filled under a one-device mesh context: jit then ignores any mesh the
  # caller has set (e.g. a training mesh over the same devices), whose devices would not match.
  single = [Mesh(np.asarray([d]), (POOL_AXIS,)) for d in devices]
  bufs = []
  for d, m in zip(devices, single):
    with jax.set_mesh(m):
      bufs.append(jnp.zeros((rpd, dim), jnp.float32, device=d))
  pending = np.zeros((chunk, dim), np.float32)
  filled = written = 0

  def flush():
    nonlocal filled, written, pending
    if filled:
      pending[filled:] = 0.0
      dev, local = divmod(written, rpd)
      # A fresh host chunk each time: on CPU the device array may alias it, and the update runs async.
      with jax.set_mesh(single[dev]):
        bufs[dev] = _write_rows(bufs[dev], jax.device_put(pending, devices[dev]), jnp.int32(local))
      pending = np.zeros((chunk, dim), np.float32)
      written += chunk
      filled = 0

  seen = 0
  for block in blocks:
    block = np.asarray(block, np.float32)
    if block.ndim != 2 or block.shape[1] != dim:
      raise ValueError(f"pool blocks must be [rows, {dim}], got {block.shape}")
    seen += len(block)
    if seen > num_docs:
      raise ValueError(f"pool blocks hold more than the {num_docs} rows announced")
    pos = 0
    while pos < len(block):
      take = min(chunk - filled, len(block) - pos)
      pending[filled:filled + take] = block[pos:pos + take]
      filled, pos = filled + take, pos + take
      if filled == chunk:
        flush()
  flush()
  if seen != num_docs:
    raise ValueError(f"pool blocks hold {seen} rows, {num_docs} announced")
  docs = jax.make_array_from_single_device_arrays((ndev * rpd, dim), NamedSharding(mesh, P(POOL_AXIS, None)), bufs)
  return DevicePool(docs, num_docs, mesh)


@functools.lru_cache(maxsize=32)
def _sharded_topk_fn(mesh, rows_per_device: int, num_docs: int, k_local: int, k: int):
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

  def local(q, d):
    offset = jax.lax.axis_index(POOL_AXIS) * rows_per_device
    s = jnp.matmul(q, d.T, precision=jax.lax.Precision.HIGHEST)
    rows = offset + jnp.arange(rows_per_device, dtype=jnp.int32)
    s = jnp.where(rows[None, :] < num_docs, s, -jnp.inf)
    ls, li = jax.lax.top_k(s, k_local)  # lower local row first on ties
    ls = jax.lax.all_gather(ls, POOL_AXIS, axis=1, tiled=True)  # devices in mesh order
    gi = jax.lax.all_gather(li + offset, POOL_AXIS, axis=1, tiled=True)
    fs, pos = jax.lax.top_k(ls, k)  # lower position = lower device, then lower rank, on ties
    return fs, jnp.take_along_axis(gi, pos, axis=1)

  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(POOL_AXIS, None)), out_specs=(P(), P()),
                               check_vma=False))


def topk_sharded(queries: np.ndarray | jax.Array, pool: DevicePool, k: int, *,
                 score_budget: int = SCORE_BUDGET) -> tuple[np.ndarray, np.ndarray]:
  """Exact inner-product top-k over a `DevicePool` sharded across devices.

  Each device scores its rows (full float32 matmul), keeps its local top k, the candidates are
  all-gathered and merged with a second `lax.top_k`. Equal scores come out lower row first, as
  `topk_device`. Queries go in batches of at most `score_budget / rows_per_device` (padded to one
  shape per call). Returns host scores [Q, K] float32 and pool rows [Q, K] int64, K = min(k, N).
  """
  queries = np.ascontiguousarray(queries, np.float32)
  if queries.ndim != 2 or queries.shape[1] != pool.dim:
    raise ValueError(f"queries must be [Q, {pool.dim}], got {queries.shape}")
  k = min(int(k), pool.num_docs)
  if k < 1:
    raise ValueError(f"need k >= 1, got {k}")
  nq = queries.shape[0]
  if nq == 0:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
  batch = max(1, min(int(score_budget) // pool.rows_per_device, 4096, (nq + 7) // 8 * 8))
  fn = _sharded_topk_fn(pool.mesh, pool.rows_per_device, pool.num_docs, min(k, pool.rows_per_device), k)
  out_s, out_i = np.empty((nq, k), np.float32), np.empty((nq, k), np.int64)
  for q0 in range(0, nq, batch):
    q = queries[q0:q0 + batch]
    n = len(q)
    if n < batch:
      q = np.concatenate([q, np.zeros((batch - n, q.shape[1]), np.float32)])
    with jax.set_mesh(pool.mesh):  # the pool's mesh, whatever mesh the caller has set
      s, i = fn(q, pool.docs)
    out_s[q0:q0 + n], out_i[q0:q0 + n] = np.asarray(s)[:n], np.asarray(i)[:n]
  return out_s, out_i


def faiss_idmap_index(blocks: Iterable[tuple[np.ndarray, np.ndarray]], dim: int):
  """The seed's index: `index_factory(dim, "IDMap,Flat", METRIC_INNER_PRODUCT)` filled from
  (vectors [b, D] float32, ids [b] int64) blocks with `add_with_ids` (vectors used as given)."""
  faiss = _faiss()
  if faiss is None:
    raise ImportError("faiss is not installed: `pip install faiss-cpu` (or use the jax backend)")
  index = faiss.index_factory(int(dim), "IDMap,Flat", faiss.METRIC_INNER_PRODUCT)
  for vecs, ids in blocks:
    index.add_with_ids(np.ascontiguousarray(vecs, np.float32), np.ascontiguousarray(ids, np.int64))
  return index


class FaissSearcher:
  """Top-k pool rows from a faiss index whose ids are `ids` (row r has id ids[r], ids unique)."""

  def __init__(self, index, ids: np.ndarray, batch_size: int = 4096):
    self.index, self.ids, self.batch_size = index, np.asarray(ids, np.int64), batch_size
    if index.ntotal != len(self.ids):
      raise ValueError(f"the faiss index holds {index.ntotal} vectors, the pool {len(self.ids)}")
    self._order = np.argsort(self.ids, kind="stable")
    self._sorted = self.ids[self._order]
    self.num_docs = len(self.ids)

  def __call__(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    queries = np.ascontiguousarray(queries, np.float32)
    s_all, r_all = [], []
    for q0 in range(0, len(queries), self.batch_size):
      s, found = self.index.search(queries[q0:q0 + self.batch_size], int(k))
      pos = np.clip(np.searchsorted(self._sorted, found), 0, self.num_docs - 1)
      rows = np.where((found >= 0) & (self._sorted[pos] == found), self._order[pos], -1)
      s_all.append(s.astype(np.float32))
      r_all.append(rows.astype(np.int64))
    if not s_all:
      return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.concatenate(s_all), np.concatenate(r_all)


class DeviceSearcher:
  """Top-k pool rows from a `DevicePool` (`topk_sharded`)."""

  def __init__(self, pool: DevicePool):
    self.pool, self.num_docs = pool, pool.num_docs

  def __call__(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    return topk_sharded(queries, self.pool, k)


def score_tolerance(dim: int) -> float:
  """Twice a bound on the float32 error of a dot product of two unit vectors of length `dim`
  (|error| <= dim * 2^-24 for any summation order), the gap `topk_exact` demands."""
  return max(1e-6, 2.0 * int(dim) * 2.0 ** -24)


def exact_scores(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
  """float64 inner products of queries [B, D] with their own candidates [B, M, D] -> [B, M].

  Products of float32 values are exact in float64 and every pair is summed the same way, so a
  pair's score does not depend on where it sits (identical vectors get identical scores)."""
  q = np.asarray(queries, np.float64)[:, None, :]
  return (q * np.asarray(vectors, np.float64)).sum(-1)


def topk_exact(search, gather, queries: np.ndarray, k: int, num_docs: int, *, margin: int = RERANK_MARGIN,
               tol: float | None = None, block: int = 256) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k under one tie rule, whatever the float32 search backend.

  The rule: rank by the float64 inner product of the (float32) query and pool vectors, highest
  first; equal scores by pool row, lowest first. `search(queries, depth)` (a `FaissSearcher`,
  `DeviceSearcher`, ...) gives a float32 shortlist of depth k + margin, which is re-scored with
  `exact_scores` on `gather(rows)` (the pool's float32 vectors) and sorted by the rule. A query whose
  shortlist ends within `tol` (default `score_tolerance(D)`) of its k-th float32 score could miss a
  tied or better row, so it is searched again 4x deeper, up to the whole pool. Rankings therefore
  agree across backends, float32 rounding orders and faiss's own tie order.

  Returns scores [Q, K] (the float64 scores as float32) and rows [Q, K] int64, K = min(k, N).
  """
  queries = np.ascontiguousarray(queries, np.float32)
  k = min(int(k), int(num_docs))
  if k < 1:
    raise ValueError(f"need k >= 1 and a non-empty pool, got k={k}, N={num_docs}")
  tol = score_tolerance(queries.shape[1]) if tol is None else float(tol)
  nq = len(queries)
  out_s, out_r = np.zeros((nq, k), np.float32), np.zeros((nq, k), np.int64)
  todo, depth = np.arange(nq), min(int(num_docs), k + int(margin))
  while len(todo):
    s32, rows = search(queries[todo], depth)
    final = depth >= num_docs
    ok = np.ones(len(todo), bool) if final else (s32[:, k - 1] - s32[:, depth - 1]) > tol
    for b0 in range(0, len(todo), block):
      sel = np.arange(b0, min(b0 + block, len(todo)))
      sel = sel[ok[sel]]
      if not len(sel):
        continue
      r = rows[sel]
      uniq, inv = np.unique(np.maximum(r, 0), return_inverse=True)
      vecs = np.asarray(gather(uniq), np.float32)[inv.reshape(r.shape)]
      s64 = np.where(r >= 0, exact_scores(queries[todo[sel]], vecs), -np.inf)
      order = np.lexsort((r, -s64), axis=-1)[:, :k]
      out_s[todo[sel]] = np.take_along_axis(s64, order, 1).astype(np.float32)
      out_r[todo[sel]] = np.take_along_axis(r, order, 1)
    todo, depth = todo[~ok], min(int(num_docs), depth * 4)
  return out_s, out_r
