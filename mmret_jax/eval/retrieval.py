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
