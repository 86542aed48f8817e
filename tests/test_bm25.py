"""BM25 baseline (mmret_jax.eval.bm25) against a plain-Python transcription of the seed's BM25_Model formulas.

    .venv/bin/pytest tests/test_bm25.py
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from mmret_jax.eval import bm25


def seed_scores(corpus, query, k1=1.5, b=0.75, eps=0.25, length_norm="seed"):
  """The seed's BM25_Model.get_scores, transcribed with dicts and loops (L = N for "seed", doc length for
  "okapi")."""
  n = len(corpus)
  avgdl = sum(float(len(d)) for d in corpus) / n
  freqs = []
  df = {}
  for doc in corpus:
    f = {}
    for w in doc:
      f[w] = f.get(w, 0) + 1
    freqs.append(f)
    for w in f:
      df[w] = df.get(w, 0) + 1
  idf = {w: math.log(n - c + 0.5) - math.log(c + 0.5) for w, c in df.items()}
  average_idf = sum(idf.values()) / len(idf)
  out = []
  for i, f in enumerate(freqs):
    length = n if length_norm == "seed" else len(corpus[i])
    score = 0.0
    for w in query:  # with repetition
      if w not in f:
        continue
      w_idf = idf[w] if idf[w] >= 0 else eps * average_idf
      score += w_idf * f[w] * (k1 + 1) / (f[w] + k1 * (1 - b + b * length / avgdl))
    out.append(score)
  return out


def random_corpus(seed, n_docs=400, n_queries=40):
  rng = random.Random(seed)
  common = ["c0", "c1", "c2"]  # in most docs: negative idf
  rare = [f"w{i}" for i in range(40)]
  weights = [1.0 / (i + 1) for i in range(len(rare))]
  corpus = []
  for i in range(n_docs):
    if i % 37 == 5:
      corpus.append([])  # empty docs
      continue
    doc = rng.choices(rare, weights, k=rng.randint(1, 20))
    doc += [c for c, p in zip(common, (0.95, 0.85, 0.7)) if rng.random() < p] * rng.randint(1, 3)
    rng.shuffle(doc)
    corpus.append(doc)
  queries = [[], ["unknown", "zzz"], ["c0"], ["w3", "w3", "w3"]]
  for _ in range(n_queries):
    q = rng.choices(rare + common + ["unknown1", "unknown2"], k=rng.randint(1, 8))
    q += rng.sample(q, k=min(2, len(q)))  # repeated query tokens
    queries.append(q)
  return corpus, queries


@pytest.mark.parametrize("length_norm", ["seed", "okapi"])
@pytest.mark.parametrize("params", [{}, {"k1": 0.9, "b": 0.4, "epsilon": 0.5}])
def test_scores_match_seed_transcription(length_norm, params):
  corpus, queries = random_corpus(seed=1)
  model = bm25.BM25(corpus, length_norm=length_norm, progress=False, **params)
  assert (model.idf < 0).any() and (model.idf > 0).any()  # the fixture exercises the epsilon branch
  ref_params = {"k1": params.get("k1", 1.5), "b": params.get("b", 0.75), "eps": params.get("epsilon", 0.25)}
  for q in queries:
    ref = np.asarray(seed_scores(corpus, q, length_norm=length_norm, **ref_params))
    ours = model.scores(q)
    assert ours.dtype == np.float64 and ours.shape == (len(corpus),)
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12 * max(1.0, np.abs(ref).max()))
  assert not model.scores(["unknown", "zzz"]).any()


def test_length_norms_differ():
  corpus, queries = random_corpus(seed=2)
  seed_model = bm25.BM25(corpus, length_norm="seed", progress=False)
  okapi = bm25.BM25(corpus, length_norm="okapi", progress=False)
  assert not np.allclose(seed_model.scores(queries[5]), okapi.scores(queries[5]))


@pytest.mark.parametrize("length_norm", ["seed", "okapi"])
def test_topk_equals_stable_argsort_of_seed_scores(length_norm):
  corpus, queries = random_corpus(seed=3)
  n = len(corpus)
  model = bm25.BM25(corpus, length_norm=length_norm, progress=False)
  refs = np.asarray([seed_scores(corpus, q, length_norm=length_norm) for q in queries])
  for k in (1, 7, 60, n, n + 5):
    kk = min(k, n)
    results = [model.topk(queries, k, progress=False), model.topk(queries, k, batch_size=1, progress=False),
               model.topk(queries, k, batch_size=3, progress=False)]
    for top_scores, top_idx in results:
      assert top_scores.shape == top_idx.shape == (len(queries), kk)
      assert top_scores.dtype == np.float64 and top_idx.dtype == np.int64
      np.testing.assert_array_equal(top_idx, results[0][1])
      for qi, q in enumerate(queries):
        ref = refs[qi]
        # Sums in another order differ by an ulp or so: snap to 1e-9 of the scale so equal scores tie.
        key = np.round(ref / max(1.0, np.abs(ref).max()), 9)
        np.testing.assert_array_equal(top_idx[qi], np.argsort(-key, kind="stable")[:kk])
        np.testing.assert_allclose(top_scores[qi], ref[top_idx[qi]], rtol=1e-9, atol=1e-12)
        ours = model.scores(q)  # and exactly a stable argsort of our own scores
        np.testing.assert_array_equal(top_idx[qi], np.argsort(-ours, kind="stable")[:kk])
        np.testing.assert_array_equal(top_scores[qi], ours[top_idx[qi]])


def test_topk_ties_go_to_lower_index():
  docs = [["a", "b"], ["c"], ["a", "b"], ["d", "d"], ["e"]] * 40  # identical docs tie exactly
  model = bm25.BM25(docs, progress=False)
  a_docs = np.flatnonzero(np.isin(np.arange(len(docs)) % 5, [0, 2]))
  queries = [["a"], ["c", "a"], ["zzz"]]
  for k in (1, 3, 30, 80, 81, 120, 200):
    _, idx = model.topk(queries, k, progress=False)
    for q, row in zip(queries, idx):
      np.testing.assert_array_equal(row, np.argsort(-model.scores(q), kind="stable")[:k])
    np.testing.assert_array_equal(idx[0][:80], a_docs[:k])
    np.testing.assert_array_equal(idx[2], np.arange(k))  # nothing matches: all zero, lowest indices


def test_topk_indices_with_many_ties():
  rng = np.random.default_rng(0)
  for n in (1, 5, 100, 1000):
    scores = rng.integers(-3, 4, size=n).astype(np.float64)
    for k in (1, 2, n // 3, n // 2, n, n + 1):
      if k < 1:
        continue
      np.testing.assert_array_equal(bm25.topk_indices(scores, k), np.argsort(-scores, kind="stable")[:k])


def test_empty_docs_and_corpus():
  with pytest.raises(ValueError, match="empty"):
    bm25.BM25([], progress=False)
  model = bm25.BM25([[], [], []], progress=False)  # no terms at all
  assert not model.scores(["a", "a"]).any()
  top_scores, top_idx = model.topk([["a"], []], 5, progress=False)  # k clipped to N
  np.testing.assert_array_equal(top_idx, [[0, 1, 2], [0, 1, 2]])
  assert not top_scores.any()
  # A single non-empty doc: df = N, idf < 0 -> epsilon x mean idf (the only idf).
  model = bm25.BM25([["x", "x"]], progress=False)
  np.testing.assert_allclose(model.scores(["x"]), seed_scores([["x", "x"]], ["x"]), rtol=1e-12)


def test_bad_inputs():
  with pytest.raises(TypeError, match="list of tokens"):
    bm25.BM25(["a plain string"], progress=False)
  with pytest.raises(ValueError, match="length_norm"):
    bm25.BM25([["a"]], length_norm="bm25+", progress=False)
  model = bm25.BM25([["a"], ["b"]], progress=False)
  with pytest.raises(TypeError, match="list of tokens"):
    model.scores("a")
  with pytest.raises(ValueError, match="k must be"):
    model.topk([["a"]], 0, progress=False)
  with pytest.raises(TypeError, match="list of token lists"):
    model.topk("a", 1, progress=False)


# Hand-written expectations (Treebank / NLTK `word_tokenize` conventions, NLTK-style English stopwords dropped).
TOKEN_CASES = [
    ("The kettle doesn't leak, and it's great!", ["The", "kettle", "n't", "leak", ",", "'s", "great", "!"]),
    ("I can't believe it costs $19.99 (on sale).", ["I", "ca", "n't", "believe", "costs", "$", "19.99", "(", "sale",
                                                    ")", "."]),
    ("Works with 1,000 items: great value... Buy it", ["Works", "1,000", "items", ":", "great", "value", "...",
                                                       "Buy"]),
    ('He said "wow" today.', ["He", "said", "``", "wow", "''", "today", "."]),
    ('She said "wow."', ["She", "said", "``", "wow", ".", "''"]),
    ("Made in the U.S. by Acme Inc. for you.", ["Made", "U.S.", "Acme", "Inc.", "."]),
    ("Stainless-Steel BOTTLE; 2-pack", ["Stainless-Steel", "BOTTLE", ";", "2-pack"]),
    ("Great fit. Runs small.", ["Great", "fit", ".", "Runs", "small", "."]),
    ("I cannot wait, we're gonna love it", ["I", "wait", ",", "'re", "gon", "na", "love"]),
    ("DON'T buy the dogs' toys -- ok?!", ["DO", "N'T", "buy", "dogs", "'", "toys", "--", "ok", "?", "!"]),
    ("Open at 10:30 & 50% off #1 @home*", ["Open", "10:30", "&", "50", "%", "#", "1", "@", "home", "*"]),
]


@pytest.mark.parametrize("text,expected", TOKEN_CASES)
def test_tokenize(text, expected):
  assert bm25.tokenize(text) == expected


def test_tokenize_keeps_stopwords_when_asked_and_is_case_sensitive():
  assert bm25.tokenize("You're the best", stopwords=frozenset()) == ["You", "'re", "the", "best"]
  assert bm25.tokenize("The the THE a A") == ["The", "THE", "A"]
  assert bm25.word_tokenize("It's not [really] {that} <big>") == ["It", "'s", "not", "[", "really", "]", "{", "that",
                                                                    "}", "<", "big", ">"]
  for w in ("the", "a", "and", "of", "is", "were", "i", "you", "it", "not", "s", "t", "don", "very"):
    assert w in bm25.ENGLISH_STOPWORDS
  assert bm25.tokenize_all(["A cat.", "the"], progress=False) == [["A", "cat", "."], []]
  with pytest.raises(TypeError):
    bm25.tokenize(None)
