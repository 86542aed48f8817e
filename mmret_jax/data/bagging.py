"""BagFormer's bagging layer, on the host: dictionary entities in token ids -> static-shape bags.

BagFormer (Hou et al., arXiv 2212.14322) sums a query's token states over dictionary-matched entity
spans ("bags") before its late interaction. This module finds the spans and emits, per batch,

  bag_index  int32 [B, L]    the bag of every token (in [0, K)): bag k of row b is the sum of the
                             states of the tokens t with bag_index[b, t] == k; a bag no token maps
                             to is empty (a zero vector)
  bag_mask   float32 [B, K]  the seed's bag mask (0 for a bag that is exactly [CLS] or exactly
                             [PAD], and for the padding bags past a row's bag count)
  bag_count  int32 [B]       how many bags a row has (K_row <= K)

with K = `num_bags` (default L) fixed, so the device program never changes shape. The device side is
`models.bagformer.BagFormer.bag_feats` (a one-hot segment sum).

Two modes (`bagging.mode`):

faithful  the seed's `EmbeddingBagHelperAutomaton` exactly (models/model_helper.py):
  * maximum matching scans left to right and extends the current group while the group plus the
    next id is a dictionary word, so a span is found only if every prefix of length >= 2 is itself a
    word ("the every-prefix rule"); spans shorter than 2 are dropped. A quirk kept: the group open
    at the start of a row records end positions only, so when the row's first id is itself a
    one-token word the first span starts one position late (never happens after [CLS]);
  * offsets: every position outside a span is its own bag, a span is one bag, and the end of a span
    is always an offset, so two adjacent spans leave an empty bag between them (and a span ending
    the row leaves an empty bag past the row);
  * every row of the batch is cut to the batch-minimum bag count: the last kept bag absorbs the rest
    of its row (PAD and SEP included);
  * the mask is read off the untruncated bags (ids exactly [CLS] or exactly [PAD] -> 0; [SEP] -> 1).
  A row's bags therefore depend on the other rows of its batch.

fixed  full dictionary words even when a prefix is absent (leftmost-longest matching over every
  occurrence an Aho-Corasick automaton reports), and no batch-minimum cut: every row keeps its own
  bags (up to K, the last absorbing the rest), so its bags do not depend on the batch. Offsets and the
  mask rule are the seed's. On a prefix-closed dictionary and a single row, the two modes agree.

The dictionary is a text file of one word per line, each tokenised without special tokens (the
seed's `load_dict`); the automaton is pyahocorasick's, keyed by id sequences.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence

import numpy as np

MODES = ("faithful", "fixed")


@dataclasses.dataclass
class DictionaryReport:
  words: int = 0          # dictionary entries (distinct id sequences of length >= 1)
  multi_token: int = 0    # of which >= 2 tokens (the only ones that can make a span)
  empty: int = 0          # blank lines or words that tokenise to nothing (skipped)
  duplicates: int = 0     # words whose ids another line already gave

  def line(self) -> str:
    return (f"entity dictionary: {self.words} words ({self.multi_token} of >= 2 tokens); "
            f"{self.empty} empty, {self.duplicates} duplicate id sequences skipped")


def _automaton(words: Iterable[Sequence[int]]):
  import ahocorasick  # pylint: disable=import-outside-toplevel
  a = ahocorasick.Automaton(ahocorasick.STORE_ANY, ahocorasick.KEY_SEQUENCE)
  for w in words:
    a.add_word(tuple(int(i) for i in w), len(w))
  if len(a):
    a.make_automaton()
  return a


class EntityBagger:
  """Token ids [B, L] -> {bag_index, bag_mask, bag_count} (see the module docstring).

  words: the dictionary as id sequences; cls_id / pad_id: the ids whose single-token bags are
  masked; mode: faithful | fixed; num_bags: K (default: the batch's L)."""

  def __init__(self, words: Iterable[Sequence[int]], *, cls_id: int, pad_id: int, mode: str = "faithful",
               num_bags: int | None = None, report: DictionaryReport | None = None):
    if mode not in MODES:
      raise ValueError(f"bagging.mode must be one of {MODES}, got {mode!r}")
    words = [tuple(int(i) for i in w) for w in words if len(w)]
    self.automaton = _automaton(words)
    self.mode = mode
    self.num_bags = num_bags
    self.masked = {(int(cls_id),), (int(pad_id),)}
    self.report = report or DictionaryReport(words=len(set(words)), multi_token=len({w for w in words if len(w) > 1}))

  @classmethod
  def from_file(cls, path: str | os.PathLike, encode: Callable[[list[str]], list[list[int]]], **kw) -> "EntityBagger":
    """Reads a dictionary file (one word a line; UTF-8). `encode(words)` -> id lists without special
    tokens (e.g. `lambda w: tokenizer(w, add_special_tokens=False)["input_ids"]`)."""
    path = os.fspath(path)
    if not os.path.exists(path):
      raise FileNotFoundError(f"entity dictionary not found: {path}")
    with open(path, encoding="utf-8") as f:
      lines = [line.strip() for line in f]
    rep = DictionaryReport()
    texts = [t for t in lines if t]
    rep.empty = len(lines) - len(texts)
    ids = encode(texts) if texts else []
    seen, words = set(), []
    for w in ids:
      w = tuple(int(i) for i in w)
      if not w:
        rep.empty += 1
      elif w in seen:
        rep.duplicates += 1
      else:
        seen.add(w)
        words.append(w)
    if not words:
      raise ValueError(f"entity dictionary {path} has no words")
    rep.words, rep.multi_token = len(words), sum(len(w) > 1 for w in words)
    return cls(words, report=rep, **kw)

  @classmethod
  def from_tokenizer(cls, path: str | os.PathLike, tokenizer, **kw) -> "EntityBagger":
    """Dictionary file + an HF tokenizer (its [CLS] / [PAD] ids are the masked ones)."""
    encode = lambda words: tokenizer(words, add_special_tokens=False)["input_ids"]  # noqa: E731
    return cls.from_file(path, encode, cls_id=tokenizer.cls_token_id, pad_id=tokenizer.pad_token_id, **kw)

  # --- one row -------------------------------------------------------------------------------------

  def spans(self, ids: Sequence[int]) -> list[tuple[int, int]]:
    """Entity spans [start, end) of length >= 2 (the faithful quirk aside), in order."""
    ids = [int(i) for i in ids]
    if not len(self.automaton):
      return []
    if self.mode == "faithful":
      return self._maximum_matching(ids)
    return self._leftmost_longest(ids)

  def _maximum_matching(self, ids: list[int]) -> list[tuple[int, int]]:
    exists = self.automaton.exists
    groups: list[list[int]] = [[]]  # positions recorded per group (the seed's `offsets`)
    word: list[int] = []
    for i, t in enumerate(ids):
      if exists(tuple(word) + (t,)):
        word.append(t)
        groups[-1].append(i + 1)
      else:
        word = [t]
        groups.append([i])
    return [(g[0], g[-1]) for g in groups if len(g) > 1]

  def _leftmost_longest(self, ids: list[int]) -> list[tuple[int, int]]:
    longest = [0] * len(ids)  # longest word (>= 2 tokens) starting at each position
    for end, n in self.automaton.iter(tuple(ids)):
      if n > 1:
        s = end - n + 1
        longest[s] = max(longest[s], n)
    out, i = [], 0
    while i < len(ids):
      if longest[i]:
        out.append((i, i + longest[i]))
        i += longest[i]
      else:
        i += 1
    return out

  @staticmethod
  def offsets(spans: list[tuple[int, int]], length: int) -> list[int]:
    """Bag start offsets (the seed's `pad_offsets`): positions outside spans, then per span its
    start and its end; a repeated offset is an empty bag, an offset == length a bag past the row."""
    if not spans:
      return list(range(length))
    out = list(range(spans[0][0]))
    for k, (s, e) in enumerate(spans):
      out += [s, e]
      nxt = spans[k + 1][0] if k + 1 < len(spans) else length
      out += list(range(e + 1, nxt))
    return out

  def mask(self, ids: Sequence[int], offsets: list[int]) -> list[int]:
    """The seed's bag mask over untruncated bags: 0 iff a bag's ids are exactly [CLS] or [PAD]."""
    ids = tuple(int(i) for i in ids)
    ends = offsets[1:] + [len(ids)]  # offsets never decrease
    return [0 if ids[s:e] in self.masked else 1 for s, e in zip(offsets, ends)]

  # --- a batch -------------------------------------------------------------------------------------

  def __call__(self, input_ids) -> dict[str, np.ndarray]:
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}")
    b, length = ids.shape
    k_max = int(self.num_bags or length)
    rows = [r.tolist() for r in ids]
    offs = [self.offsets(self.spans(r), length) for r in rows]
    masks = [self.mask(r, o) for r, o in zip(rows, offs)]
    if self.mode == "faithful":
      counts = [min(len(o) for o in offs)] * b
    else:
      counts = [len(o) for o in offs]
    counts = [min(n, k_max) for n in counts]
    bag_index = np.zeros((b, length), np.int32)
    bag_mask = np.zeros((b, k_max), np.float32)
    positions = np.arange(length)
    for r, (o, m, n) in enumerate(zip(offs, masks, counts)):
      kept = np.asarray(o[:n])
      bag_index[r] = np.searchsorted(kept, positions, side="right") - 1
      bag_mask[r, :n] = m[:n]
    return {"bag_index": bag_index, "bag_mask": bag_mask, "bag_count": np.asarray(counts, np.int32)}


def flat_offsets(bag_index: np.ndarray, bag_count: np.ndarray) -> list[int]:
  """The seed's flattened `embed_bag_offset` (o + i*L over each row's kept bags), read back from
  `bag_index` / `bag_count`: for tests and for feeding `torch.nn.functional.embedding_bag`."""
  b, length = bag_index.shape
  out = []
  for r in range(b):
    row = bag_index[r]
    for k in range(int(bag_count[r])):
      hit = np.nonzero(row >= k)[0]
      out.append(int(hit[0]) + r * length if len(hit) else (r + 1) * length)
  return out
