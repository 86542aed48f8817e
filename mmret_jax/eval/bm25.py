"""BM25 baseline of the BLaIR product-search evaluation (the seed's `product_search_results/bm25.py`).

    from mmret_jax.eval import bm25
    docs = bm25.tokenize_all(item_texts)                      # one token list per pool item
    model = bm25.BM25(docs)                                   # k1=1.5, b=0.75, epsilon=0.25
    top_scores, top_idx = model.topk(bm25.tokenize_all(queries), k=100)   # [Q, 100] each

Scoring, as the seed's `BM25_Model` (N docs, df(t) = number of docs holding t, tf = count of t in the doc):
* idf(t) = ln(N - df + 0.5) - ln(df + 0.5); a negative idf is replaced by epsilon x (mean idf over all terms).
* weight(t, doc) = idf x tf x (k1 + 1) / (tf + k1 x (1 - b + b x L / avgdl)), avgdl = mean doc length in tokens.
  `length_norm="seed"` (default) uses L = N, the corpus size: the seed's bug, which its reported numbers
  carry (every doc gets the same length factor). `length_norm="okapi"` uses L = the doc's length (textbook BM25).
* score(query, doc) = sum over the query's tokens, WITH repetition, of weight(token, doc) (0 when absent);
  tokens never seen in the corpus add nothing.

Implementation: one sparse term x doc weight matrix (scipy CSR, float64); queries become count vectors
and are scored a batch at a time by a sparse matmul, so a 1M-item pool is scored in seconds per batch
instead of the seed's per-doc Python loop.

Tokenizer: the seed uses NLTK `word_tokenize` and drops NLTK's English stopwords (exact, case-sensitive
membership: "the" goes, "The" stays). NLTK and its data files are not a dependency here, so `tokenize`
is our own Treebank-style approximation: punctuation split off (",", ":", ";", "!", "?", "$", "%", "&",
"#", "@", "*", brackets, "--", "..."), digits-with-separators kept ("1,000", "19.99", "10:30"), double
quotes turned into "``" / "''", contractions split ("don't" -> "do" "n't", "can't" -> "ca" "n't",
"it's" -> "it" "'s", "cannot" -> "can" "not"), case kept. NLTK first splits sentences with the Punkt
model and splits off each sentence's final period; we split a word's final period when it ends the text
or when the word does not look like an abbreviation ("U.S.", "e.g.", a single letter, or a listed one
such as "Inc." / "Mr." / "etc."), which Punkt mostly agrees with. `ENGLISH_STOPWORDS` is our own list of
common English function words (lower case, plus the fragments contractions leave, such as "s", "t",
"don"), meant to cover the same words as NLTK's list. Token streams may therefore differ from the seed's
on rare inputs (sentence boundaries after abbreviations, unusual quoting).

Differences from the seed, on purpose: scores stay float64 (the seed ranks float32 copies with
`torch.topk`, whose tie order is unspecified); ties are broken toward the lower doc index; an all-empty
corpus scores 0 everywhere (the seed divides by zero).
"""

from __future__ import annotations

import array
import re
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import scipy.sparse as sp
import tqdm

# ---------------------------------------------------------------------------------------------------------
# Tokenizer

_PRONOUNS = """
  i me my myself we us our ours ourselves you your yours yourself yourselves he him his himself
  she her hers herself it its itself they them their theirs themselves
  what which who whom whose this that these those
"""
_VERBS = """
  am is are was were be been being have has had having do does did doing
  can could will would shall should may might must ought
"""
_ARTICLES_CONJUNCTIONS = "a an the and but if or nor because as until while so than though although unless whether"
_PREPOSITIONS = """
  of at by for with about against between into through during before after above below to from
  up down in out on off over under again further
"""
_ADVERBS_DETERMINERS = """
  then once here there when where why how all any both each few more most other some such no not
  only own same too very just now
"""
# What contractions leave once split at the apostrophe ("don't" -> "don" "t" with a curly apostrophe),
# and their full forms.
_CONTRACTION_PARTS = """
  s t d ll m o re ve y ma ain aren couldn didn doesn hadn hasn haven isn mightn mustn needn shan
  shouldn wasn weren won wouldn don
  aren't couldn't didn't doesn't don't hadn't hasn't haven't isn't mightn't mustn't needn't shan't
  shouldn't wasn't weren't won't wouldn't should've it's she's you're you've you'll you'd that'll
"""
ENGLISH_STOPWORDS: frozenset[str] = frozenset(
    " ".join([_PRONOUNS, _VERBS, _ARTICLES_CONJUNCTIONS, _PREPOSITIONS, _ADVERBS_DETERMINERS,
              _CONTRACTION_PARTS]).split())

# Abbreviations whose period does not end a sentence (lower case, without the period).
_ABBREVIATIONS = frozenset("""
  mr mrs ms dr prof sr jr st vs etc inc ltd co corp no nos approx dept est fig figs min max oz lb lbs
  ft in cm mm kg pcs pc qty vol jan feb mar apr jun jul aug sep sept oct nov dec
""".split())

# Closing brackets and quotes that may follow a text-final period.
_CLOSERS = frozenset(["''", "'", ")", "]", "}", ">", "\u00bb", "\u201d", "\u2019"])

# Passes over the space-padded text, in order (Treebank style: pad what becomes its own token).
_PUNCT_PASSES: tuple[tuple[re.Pattern[str], str], ...] = (
    # Opening double quotes (at the start, after a space or an opening bracket) -> ``.
    (re.compile(r'(?<=[\s(\[{<])(?:"|\'\')'), " `` "),
    (re.compile(r"(`+|[\u00ab\u201c\u2018\u201e])"), r" \1 "),
    # Every other double quote closes -> ''.
    (re.compile(r'"|\'\''), " '' "),
    (re.compile(r"([\u00bb\u201d\u2019])"), r" \1 "),
    (re.compile(r"\.{2,}"), r" \g<0> "),                 # ellipsis
    (re.compile(r"[,:](?!\d)"), r" \g<0> "),             # "1,000" and "10:30" stay whole
    (re.compile(r"[;@#$%&?!*]"), r" \g<0> "),
    (re.compile(r"[\[\](){}<>]"), r" \g<0> "),
    (re.compile(r"--"), " -- "),
    (re.compile(r"(?<=[^'\s])' "), " ' "),               # a closing single quote ("dogs' ")
)

_CONTRACTION_PASSES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?i)(?<=[^'\s])('s|'m|'d) "), r" \1 "),
    (re.compile(r"(?i)(?<=[^'\s])('ll|'re|'ve|n't) "), r" \1 "),
    (re.compile(r"(?i)\b(can)(not)\b"), r"\1 \2"),
    (re.compile(r"(?i)\b(gon|wan)(na)\b"), r"\1 \2"),
    (re.compile(r"(?i)\b(got)(ta)\b"), r"\1 \2"),
    (re.compile(r"(?i)\b(gim|lem)(me)\b"), r"\1 \2"),
)


def _keeps_period(word: str) -> bool:
  """Whether `word` (ending in ".") looks like an abbreviation, whose period does not end a sentence."""
  core = word[:-1]
  if not core or core.endswith("."):
    return True
  return "." in core or (len(core) == 1 and core.isalpha()) or core.lower() in _ABBREVIATIONS


def _split_periods(words: list[str]) -> list[str]:
  out: list[str] = []
  last = len(words)
  while last > 0 and words[last - 1] in _CLOSERS:
    last -= 1
  for i, w in enumerate(words):
    if len(w) > 1 and w.endswith(".") and not w.endswith("..") and (i == last - 1 or not _keeps_period(w)):
      out.extend((w[:-1], "."))
    else:
      out.append(w)
  return out


def word_tokenize(text: str) -> list[str]:
  """Treebank-style tokens of `text` (case kept, stopwords kept): our approximation of NLTK's `word_tokenize`."""
  if not isinstance(text, str):
    raise TypeError(f"tokenize expects a str, got {type(text).__name__}")
  s = f" {text} "
  for pattern, repl in _PUNCT_PASSES:
    s = pattern.sub(repl, s)
  s = " " + " ".join(_split_periods(s.split())) + " "
  for pattern, repl in _CONTRACTION_PASSES:
    s = pattern.sub(repl, s)
  return s.split()


def tokenize(text: str, stopwords: frozenset[str] = ENGLISH_STOPWORDS) -> list[str]:
  """The seed's `sent_tokenize`: Treebank-style tokens of `text` without `stopwords` (case-sensitive)."""
  return [w for w in word_tokenize(text) if w not in stopwords]


def tokenize_all(texts: Iterable[str], stopwords: frozenset[str] = ENGLISH_STOPWORDS, *, progress: bool = True,
                 desc: str = "tokenize") -> list[list[str]]:
  """`tokenize` of every text, with a progress bar (stderr) unless `progress=False`."""
  total = len(texts) if isinstance(texts, Sequence) else None
  return [tokenize(t, stopwords) for t in tqdm.tqdm(texts, desc=desc, total=total, unit=" texts",
                                                     unit_scale=True, disable=not progress)]


# ---------------------------------------------------------------------------------------------------------
# BM25

LENGTH_NORMS = ("seed", "okapi")
# Elements of one dense [queries, docs] float64 score block in `topk` (128 MiB).
_BLOCK_ELEMENTS = 1 << 24


def _check_tokens(tokens: Sequence[str], what: str) -> None:
  if isinstance(tokens, (str, bytes)):
    raise TypeError(f"{what} must be a list of tokens, got a {type(tokens).__name__} "
                     "(tokenize it first, e.g. with mmret_jax.eval.bm25.tokenize)")


class BM25:
  """BM25 over a tokenized corpus (the seed's `BM25_Model`); see the module docstring for the formulas.

  Attributes: `num_docs` N, `vocabulary` {term: id}, `doc_lengths` [N] int64, `avgdl`, `df` [V] int64,
  `idf` [V] float64 (raw, may be negative), `average_idf`, `term_idf` [V] (negatives replaced by
  epsilon x average_idf), `weights` [V, N] float64 CSR (term-major BM25 weights).
  """

  def __init__(self, corpus: Sequence[Sequence[str]], *, k1: float = 1.5, b: float = 0.75, epsilon: float = 0.25,
               length_norm: str = "seed", progress: bool = True):
    if length_norm not in LENGTH_NORMS:
      raise ValueError(f"length_norm must be one of {', '.join(LENGTH_NORMS)}, got {length_norm!r}")
    if not k1 >= 0 or not 0 <= b <= 1:
      raise ValueError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
    n = len(corpus)
    if n == 0:
      raise ValueError("BM25 needs at least one document, the corpus is empty")
    self.k1, self.b, self.epsilon, self.length_norm = float(k1), float(b), float(epsilon), length_norm
    self.num_docs = n

    vocab: dict[str, int] = {}
    ids = array.array("i")  # term ids, int32
    indptr = np.zeros(n + 1, dtype=np.int64)
    for i, doc in enumerate(tqdm.tqdm(corpus, desc="BM25 index", total=n, unit=" docs", unit_scale=True,
                                      disable=not progress)):
      _check_tokens(doc, f"document {i}")
      ids.extend([vocab.setdefault(t, len(vocab)) for t in doc])
      indptr[i + 1] = len(ids)
    self.vocabulary = vocab
    v = len(vocab)
    self.doc_lengths = np.diff(indptr)
    self.avgdl = float(self.doc_lengths.sum()) / n

    term_ids = np.frombuffer(ids, dtype=np.intc) if len(ids) else np.zeros(0, np.intc)
    tf = sp.csr_matrix((np.ones(term_ids.size, np.int32), term_ids, indptr), shape=(n, v))
    del ids, term_ids
    tf.sum_duplicates()  # one entry per (doc, term): the term count
    self.df = np.bincount(tf.indices, minlength=v).astype(np.int64)
    self.idf = np.log(n - self.df + 0.5) - np.log(self.df + 0.5)
    self.average_idf = float(self.idf.mean()) if v else 0.0
    self.term_idf = np.where(self.idf >= 0, self.idf, self.epsilon * self.average_idf)

    counts = tf.data.astype(np.float64)
    if length_norm == "seed":
      length = float(n)
    else:
      length = np.repeat(self.doc_lengths, np.diff(tf.indptr)).astype(np.float64)
    norm = self.k1 * (1 - self.b + self.b * length / self.avgdl) if counts.size else 0.0
    data = self.term_idf[tf.indices] * counts * (self.k1 + 1) / (counts + norm)
    doc_major = sp.csr_matrix((data, tf.indices, tf.indptr), shape=(n, v))
    del tf, counts, data
    self.weights = doc_major.T.tocsr()  # [V, N]: a query's rows are read contiguously

  def _query_matrix(self, queries: Sequence[Sequence[str]]) -> sp.csr_matrix:
    """[Q, V] float64 counts of each query's known tokens (repeats counted, unknown tokens dropped)."""
    indptr, cols, vals = [0], [], []
    for j, q in enumerate(queries):
      _check_tokens(q, f"query {j}")
      counts = Counter(self.vocabulary[t] for t in q if t in self.vocabulary)
      cols.extend(counts.keys())
      vals.extend(counts.values())
      indptr.append(len(cols))
    return sp.csr_matrix((np.asarray(vals, np.float64), np.asarray(cols, np.int64), np.asarray(indptr, np.int64)),
                         shape=(len(queries), len(self.vocabulary)))

  def _score_block(self, queries: Sequence[Sequence[str]]) -> np.ndarray:
    """[Q, N] float64 dense scores of a few queries."""
    return np.asarray((self._query_matrix(queries) @ self.weights).toarray(), dtype=np.float64)

  def scores(self, query_tokens: Sequence[str]) -> np.ndarray:
    """[N] float64: the score of every doc for one tokenized query."""
    return self._score_block([query_tokens])[0]

  def topk(self, queries: Sequence[Sequence[str]], k: int, *, batch_size: int | None = None,
           progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The `k` best docs of every tokenized query: (scores [Q, k] float64, indices [Q, k] int64).

    Best first; equal scores in increasing doc index. `k` is clipped to the corpus size. Queries are
    scored `batch_size` at a time (default: as many as fit a 128 MiB dense score block).
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
      raise ValueError(f"k must be a positive integer, got {k!r}")
    if isinstance(queries, (str, bytes)):
      raise TypeError("queries must be a list of token lists, got a str")
    n = self.num_docs
    k = min(int(k), n)
    if batch_size is None:
      batch_size = max(1, min(256, _BLOCK_ELEMENTS // n))
    elif batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    nq = len(queries)
    top_scores = np.zeros((nq, k), np.float64)
    top_idx = np.zeros((nq, k), np.int64)
    with tqdm.tqdm(total=nq, desc="BM25 top-k", unit=" queries", unit_scale=True, disable=not progress) as bar:
      for start in range(0, nq, batch_size):
        block = self._score_block(queries[start:start + batch_size])
        for r, row in enumerate(block):
          idx = topk_indices(row, k)
          top_idx[start + r] = idx
          top_scores[start + r] = row[idx]
        bar.update(len(block))
    return top_scores, top_idx


def topk_indices(scores: np.ndarray, k: int) -> np.ndarray:
  """Indices of the `k` largest of 1-D `scores`, best first, equal scores in increasing index order
  (= a stable argsort of -scores, cut at k) without sorting the whole array."""
  n = scores.shape[0]
  k = min(k, n)
  if k <= 0:
    return np.zeros(0, np.int64)
  if 4 * k >= n:
    return np.argsort(-scores, kind="stable")[:k].astype(np.int64)
  cand = np.argpartition(scores, n - k)[n - k:]
  kth = scores[cand].min()
  above = np.flatnonzero(scores > kth)
  tied = np.flatnonzero(scores == kth)[:k - above.size]  # the lowest indices among the boundary ties
  sel = np.concatenate([above, tied])
  return sel[np.lexsort((sel, -scores[sel]))].astype(np.int64)
