"""Exact top-k search (faiss / numpy / device) and ranking metrics on hand-computable cases."""

import math
import warnings

import numpy as np
import pytest

from mmret_jax.eval import retrieval


def _log2inv(rank1: int) -> float:
  """Discount of a hit at 1-based rank: 1/log2(rank+1) (BLaIR / RecBole)."""
  return 1.0 / math.log2(rank1 + 1)


# 4 docs on the axes of R^2; query [1, 0.5] ranks them 0 (1.0), 1 (0.5), 3 (-0.5), 2 (-1.0).
DOCS = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], np.float32)
QUERY = np.array([[1, 0.5]], np.float32)


@pytest.mark.parametrize("use_faiss", [True, False])
def test_search_known_ranking(use_faiss):
  scores, idx = retrieval.search(QUERY, DOCS, 4, use_faiss=use_faiss)
  assert idx.dtype == np.int64 and scores.dtype == np.float32
  np.testing.assert_array_equal(idx, [[0, 1, 3, 2]])
  np.testing.assert_allclose(scores, [[1.0, 0.5, -0.5, -1.0]])


@pytest.mark.parametrize("use_faiss", [True, False])
def test_search_clamps_k_and_cosine(use_faiss):
  scores, idx = retrieval.search(QUERY * 3, DOCS * 2, 10, metric="cosine", use_faiss=use_faiss)
  assert idx.shape == (1, 4)
  np.testing.assert_array_equal(idx, [[0, 1, 3, 2]])
  c = 1 / math.sqrt(1.25)
  np.testing.assert_allclose(scores, [[c, 0.5 * c, -0.5 * c, -c]], rtol=1e-6)
  s_dev, i_dev = retrieval.topk_device(QUERY, DOCS, 10)
  np.testing.assert_array_equal(i_dev, [[0, 1, 3, 2]])
  assert s_dev.dtype == np.float32 and i_dev.dtype == np.int64


def test_numpy_ties_lowest_index_first():
  docs = np.array([[1.0], [2.0], [2.0], [1.0], [2.0], [2.0]], np.float32)
  _, idx = retrieval.search(np.ones((1, 1), np.float32), docs, 3, use_faiss=False)
  np.testing.assert_array_equal(idx, [[1, 2, 4]])
  _, idx = retrieval.topk_device(np.ones((1, 1), np.float32), docs, 3)
  np.testing.assert_array_equal(idx, [[1, 2, 4]])


def test_numpy_blocked_merge_matches_one_block(monkeypatch):
  rng = np.random.default_rng(0)
  q = rng.integers(-2, 3, (37, 8)).astype(np.float32)  # integer scores: many exact ties
  d = rng.integers(-2, 3, (500, 8)).astype(np.float32)
  ref = retrieval.search(q, d, 20, use_faiss=False)
  monkeypatch.setattr(retrieval, "_BLOCK_ELEMENTS", 7 * 30)  # doc blocks of 30, merged 17 times
  got = retrieval.search(q, d, 20, use_faiss=False, batch_size=7)
  np.testing.assert_array_equal(got[1], ref[1])
  np.testing.assert_array_equal(got[0], ref[0])
  # Brute force: stable sort by score keeps lower indices first among ties.
  full = q @ d.T
  order = np.argsort(-full, axis=1, kind="stable")[:, :20]
  np.testing.assert_array_equal(ref[1], order)


def test_backends_agree_on_random_data():
  rng = np.random.default_rng(1)
  q = retrieval.l2_normalize(rng.standard_normal((64, 32)))
  d = retrieval.l2_normalize(rng.standard_normal((3000, 32)))
  k = 50
  s_f, i_f = retrieval.search(q, d, k + 1, use_faiss=True)
  s_n, i_n = retrieval.search(q, d, k + 1, use_faiss=False, batch_size=16)
  s_d, i_d = retrieval.topk_device(q, d, k + 1, batch_size=16)
  for s, i in ((s_n, i_n), (s_d, i_d)):
    np.testing.assert_allclose(s, s_f, atol=1e-5)
    # Compare ranks 0..k-1 whose score is separated from both neighbours (no near-tie swaps).
    gap = np.diff(s_f, axis=1)  # [Q, k], <= 0
    clear = np.ones((q.shape[0], k), bool)
    clear &= -gap[:, :k] > 1e-5
    clear[:, 1:] &= -gap[:, :k - 1] > 1e-5
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(i[:, :k][clear], i_f[:, :k][clear])


def test_backends_exact_on_integer_data():
  rng = np.random.default_rng(2)
  q = rng.integers(-3, 4, (20, 6)).astype(np.float32)
  d = rng.integers(-3, 4, (400, 6)).astype(np.float32)
  s_n, i_n = retrieval.search(q, d, 25, use_faiss=False)
  s_d, i_d = retrieval.topk_device(q, d, 25)
  s_f, i_f = retrieval.search(q, d, 25, use_faiss=True)
  np.testing.assert_array_equal(i_d, i_n)
  np.testing.assert_array_equal(s_d, s_n)
  np.testing.assert_array_equal(s_f, s_n)
  cut = s_n == s_n[:, -1:]  # faiss may keep other docs tied at the k-th score
  np.testing.assert_array_equal(i_f[~cut], i_n[~cut])


def test_fallback_warns_once(monkeypatch):
  import builtins  # pylint: disable=import-outside-toplevel
  real_import = builtins.__import__

  def no_faiss(name, *args, **kwargs):
    if name == "faiss":
      raise ImportError("no faiss")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_faiss)
  retrieval._faiss.cache_clear()
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      _, i1 = retrieval.search(QUERY, DOCS, 2)
      _, i2 = retrieval.search(QUERY, DOCS, 2)
    assert sum("faiss is not installed" in str(w.message) for w in caught) == 1
    np.testing.assert_array_equal(i1, [[0, 1]])
    np.testing.assert_array_equal(i2, [[0, 1]])
  finally:
    retrieval._faiss.cache_clear()


def test_search_rejects_bad_inputs():
  with pytest.raises(ValueError):
    retrieval.search(QUERY, DOCS[:, :1], 2)
  with pytest.raises(ValueError):
    retrieval.search(QUERY, DOCS, 0)
  with pytest.raises(ValueError):
    retrieval.search(QUERY, DOCS, 2, metric="l2")


def test_metrics_single_relevant_by_hand():
  # Relevant item at 0-based rank 0, 2, 4 and missing, for 4 queries.
  indices = np.array([[7, 1, 2, 3, 4],
                      [1, 2, 7, 3, 4],
                      [1, 2, 3, 4, 7],
                      [1, 2, 3, 4, 5]])
  m = retrieval.retrieval_metrics(indices, np.array([7, 7, 7, 7]), ks=(1, 3, 5, 10))
  assert "recall@10" not in m and "ndcg@10" not in m  # deeper than retrieved: no key
  assert m["recall@1"] == pytest.approx(1 / 4)
  assert m["recall@3"] == pytest.approx(2 / 4)
  assert m["recall@5"] == pytest.approx(3 / 4)
  assert m["hit@5"] == pytest.approx(3 / 4)
  assert _log2inv(3) == pytest.approx(0.5)  # rank 3 -> 1/log2(4)
  assert m["ndcg@1"] == pytest.approx(1 / 4)
  assert m["ndcg@3"] == pytest.approx((1 + 0.5) / 4)
  assert m["ndcg@5"] == pytest.approx((1 + 0.5 + _log2inv(5)) / 4)
  assert m["mrr@3"] == pytest.approx((1 + 1 / 3) / 4)
  assert m["mrr@5"] == pytest.approx((1 + 1 / 3 + 1 / 5) / 4)
  # The same relevance as a list of sets gives the same numbers.
  assert retrieval.retrieval_metrics(indices, [{7}] * 4, ks=(1, 3, 5, 10)) == pytest.approx(m)


def test_metrics_multi_relevant_by_hand():
  indices = np.array([[5, 9, 1, 2], [0, 1, 2, 3]])
  relevant = [{1, 2, 8}, {3, 4}]  # q0: hits at ranks 3, 4 of 3 relevant; q1: rank 4 of 2
  m = retrieval.retrieval_metrics(indices, relevant, ks=(2, 4))
  assert m["recall@2"] == 0.0 and m["hit@2"] == 0.0 and m["ndcg@2"] == 0.0
  assert m["recall@4"] == pytest.approx((2 / 3 + 1 / 2) / 2)
  assert m["hit@4"] == 1.0
  idcg0 = 1 + _log2inv(2) + _log2inv(3)  # min(3, 4) = 3 ideal hits
  idcg1 = 1 + _log2inv(2)                # min(2, 4) = 2 ideal hits
  ndcg0 = (_log2inv(3) + _log2inv(4)) / idcg0
  ndcg1 = _log2inv(4) / idcg1
  assert m["ndcg@4"] == pytest.approx((ndcg0 + ndcg1) / 2)
  assert m["mrr@4"] == pytest.approx((1 / 3 + 1 / 4) / 2)
  # Ideal DCG is cut at k: 3 relevant, all in the top 2 -> NDCG@2 = 1, recall@2 = 2/3.
  m2 = retrieval.retrieval_metrics(np.array([[1, 2, 8]]), [{1, 2, 8}], ks=(2,))
  assert m2["ndcg@2"] == pytest.approx(1.0) and m2["recall@2"] == pytest.approx(2 / 3)


def test_metrics_reject_empty_relevance():
  with pytest.raises(ValueError, match="no relevant"):
    retrieval.retrieval_metrics(np.array([[0, 1]]), [set()], ks=(1,))
  with pytest.raises(ValueError):
    retrieval.retrieval_metrics(np.array([[0, 1]]), np.array([0, 1]), ks=(1,))


@pytest.mark.parametrize("use_faiss", [True, False])
def test_evaluate_text_retrieval(use_faiss):
  # Unnormalised embeddings: doc 3 has the largest inner product with q0 but is not the closest
  # in cosine; normalising puts q0's relevant doc 0 first (cosines 1, .71, 0, -.99) and q1's
  # relevant doc 0 third (cosines .98 for doc 1, .83 for doc 3, .20 for doc 0).
  docs = np.array([[1, 0], [0, 1], [-1, 0.1], [5, 5]], np.float32)
  queries = np.array([[2, 0], [0.2, 1]], np.float32)
  m = retrieval.evaluate_text_retrieval(queries, docs, np.array([0, 0]), ks=(1, 3, 100),
                                        use_faiss=use_faiss)
  assert set(m) == {f"{n}@{k}" for n in ("recall", "ndcg", "mrr", "hit") for k in (1, 3)}
  assert m["recall@1"] == pytest.approx(0.5)
  assert m["ndcg@3"] == pytest.approx((1 + 0.5) / 2)
  assert m["mrr@3"] == pytest.approx((1 + 1 / 3) / 2)


def test_l2_normalize():
  x = retrieval.l2_normalize(np.array([[3, 4], [0, 0]]))
  np.testing.assert_allclose(x, [[0.6, 0.8], [0, 0]])
  assert x.dtype == np.float32 and x.flags.c_contiguous
