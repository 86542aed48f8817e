"""BagFormer's bagging layer (data/bagging.py) against a plain-Python transcription of the seed's
algorithm (BagFormer models/model_helper.py `EmbeddingBagHelperAutomaton`), written here: string keys
in a pyahocorasick automaton queried with `match`, the greedy group extension, `pad_offsets`, the
batch-minimum truncation, the flattened offsets and the mask from untruncated bags."""

from __future__ import annotations

import pathlib

import ahocorasick
import numpy as np
import pytest

from mmret_jax.data import bagging

CLS, SEP, PAD = 101, 102, 0
SAMPLE = pathlib.Path(__file__).resolve().parents[1] / "mmret_jax" / "data" / "samples" / "muge"


class SeedBagging:
  """The seed's bagging, step by step (its data types: lists, str(tuple) keys, `match`)."""

  def __init__(self, words, cls_id=CLS, pad_id=PAD):
    self.auto = ahocorasick.Automaton()
    for w in words:
      self.auto.add_word(str(tuple(w)), len(w))
    self.auto.make_automaton()
    self.masked_ids = [[cls_id], [pad_id]]

  def matching(self, ids):
    groups, words = [[]], [[]]
    for i, t in enumerate(ids):
      if self.auto.match(str(tuple(words[-1] + [t]))):
        words[-1] = words[-1] + [t]
        groups[-1] = groups[-1] + [i + 1]
      else:
        words.append([t])
        groups.append([i])
    return [(g[0], g[-1]) for g in groups if len(g) > 1]

  @staticmethod
  def pad_offsets(spans, n):
    if not spans:
      return list(range(n))
    out = list(range(spans[0][0]))
    for k, (s, e) in enumerate(spans):
      out.append(s)
      out.append(e)
      if k + 1 < len(spans):
        out.extend(range(e + 1, spans[k + 1][0]))
    out.extend(range(spans[-1][1] + 1, n))
    return out

  def bags(self, ids, offsets):
    return [ids[s:offsets[k + 1]] if k + 1 < len(offsets) else ids[s:] for k, s in enumerate(offsets)]

  def process(self, batch):
    offs = [self.pad_offsets(self.matching(r), len(r)) for r in batch]
    k = min(len(o) for o in offs)
    length = len(batch[0])
    flat = [o + i * length for i, row in enumerate(offs) for o in row[:k]]
    masks = [[0 if b in self.masked_ids else 1 for b in self.bags(r, o)][:k] for r, o in zip(batch, offs)]
    return flat, masks


def random_dictionary(rng, alphabet, n_words, prefix_closed=False):
  words = set()
  while len(words) < n_words:
    n = int(rng.choice([1, 2, 2, 3, 3, 4]))
    words.add(tuple(int(x) for x in rng.choice(alphabet, n)))
  if prefix_closed:
    words |= {w[:j] for w in words for j in range(2, len(w))}
  return sorted(words)


def random_batch(rng, alphabet, b, length):
  """Rows like a tokenizer's: [CLS] ids [SEP] [PAD]..., random content lengths."""
  out = np.full((b, length), PAD, np.int64)
  for r in range(b):
    n = int(rng.integers(0, length - 1))
    out[r, 0] = CLS
    out[r, 1:1 + n] = rng.choice(alphabet, n)
    out[r, 1 + n] = SEP
  return out


def check_against_seed(bagger, seed, batch):
  got = bagger(batch)
  flat, masks = seed.process(batch.tolist())
  k = len(masks[0])
  assert (got["bag_count"] == k).all()
  assert bagging.flat_offsets(got["bag_index"], got["bag_count"]) == flat
  np.testing.assert_array_equal(got["bag_mask"][:, :k], np.asarray(masks, np.float32))
  assert not got["bag_mask"][:, k:].any()
  return got


def test_faithful_equals_the_seed_on_random_batches():
  rng = np.random.default_rng(0)
  alphabet = np.arange(1000, 1012)  # a small alphabet: many entities, adjacent spans, long chains
  checked_adjacent = checked_end = 0
  for trial in range(60):
    words = random_dictionary(rng, alphabet, 40)
    seed = SeedBagging(words)
    bagger = bagging.EntityBagger(words, cls_id=CLS, pad_id=PAD, mode="faithful")
    for _ in range(5):
      batch = random_batch(rng, alphabet, int(rng.integers(1, 9)), int(rng.integers(3, 26)))
      check_against_seed(bagger, seed, batch)
      for row in batch.tolist():
        offs = seed.pad_offsets(seed.matching(row), len(row))
        checked_adjacent += len(offs) != len(set(offs))
    # rows without [CLS]/[SEP]/[PAD] as well: spans ending the row, the first-group quirk
    batch = rng.choice(alphabet, (4, 6))
    check_against_seed(bagger, seed, batch)
    checked_end += any(s[-1][1] == 6 for s in (seed.matching(r) for r in batch.tolist()) if s)
  assert checked_adjacent > 20 and checked_end > 5  # the quirky cases were exercised


def test_faithful_quirks_by_hand():
  a, b, c, d = 11, 12, 13, 14
  bagger = bagging.EntityBagger([(a, b), (a, b, c), (c, d), (b, c, d)], cls_id=CLS, pad_id=PAD)
  # [CLS] a b c d [SEP]: "abc" then "d" alone: (a,b,c,d) is no word; "cd" is not found (c was eaten)
  assert bagger.spans([CLS, a, b, c, d, SEP]) == [(1, 4)]
  # "bcd" is a word but its prefix "bc" is not: the every-prefix rule misses it (and finds "cd")
  assert bagger.spans([CLS, b, c, d, SEP]) == [(2, 4)]
  assert bagging.EntityBagger([(a, b), (a, b, c), (c, d), (b, c, d)], cls_id=CLS, pad_id=PAD,
                              mode="fixed").spans([CLS, b, c, d, SEP]) == [(1, 4)]
  # adjacent spans: "ab" then "cd" -> offsets repeat 3: an empty bag
  bagger2 = bagging.EntityBagger([(a, b), (c, d)], cls_id=CLS, pad_id=PAD)
  row = [CLS, a, b, c, d, SEP, PAD, PAD]
  assert bagger2.spans(row) == [(1, 3), (3, 5)]
  offs = bagger2.offsets(bagger2.spans(row), len(row))
  assert offs == [0, 1, 3, 3, 5, 6, 7]
  assert bagger2.mask(row, offs) == [0, 1, 1, 1, 1, 0, 0]
  # truncation to the batch minimum: the second row has 8 bags, the first 7; the last kept bag
  # of row 2 absorbs the final [PAD]; its mask is the untruncated bag's ([PAD] -> 0)
  out = bagger2(np.asarray([row, [CLS, a, c, b, d, SEP, PAD, PAD]]))
  assert out["bag_count"].tolist() == [7, 7]
  assert out["bag_index"][1].tolist() == [0, 1, 2, 3, 4, 5, 6, 6]
  assert out["bag_index"][0].tolist() == [0, 1, 1, 3, 3, 4, 5, 6]  # bag 2 is empty
  assert out["bag_mask"][1].tolist() == [0, 1, 1, 1, 1, 1, 0, 0]
  # the first-group quirk: a row starting with a one-token word records a span one position late
  quirky = bagging.EntityBagger([(a,), (a, b)], cls_id=CLS, pad_id=PAD)
  assert quirky.spans([a, b, c]) == SeedBagging([(a,), (a, b)]).matching([a, b, c]) == [(1, 2)]


def leftmost_longest(words, ids):
  """Brute force: at each position the longest dictionary word (>= 2 ids) starting there."""
  words = {tuple(w) for w in words if len(w) > 1}
  out, i = [], 0
  while i < len(ids):
    n = max((j - i for j in range(i + 2, len(ids) + 1) if tuple(ids[i:j]) in words), default=0)
    if n:
      out.append((i, i + n))
      i += n
    else:
      i += 1
  return out


def test_fixed_mode():
  rng = np.random.default_rng(1)
  alphabet = np.arange(2000, 2010)
  differs = 0
  for _ in range(40):
    words = random_dictionary(rng, alphabet, 30)
    closed = sorted(set(words) | {w[:j] for w in words for j in range(2, len(w))})
    fixed = bagging.EntityBagger(words, cls_id=CLS, pad_id=PAD, mode="fixed")
    faithful = bagging.EntityBagger(words, cls_id=CLS, pad_id=PAD, mode="faithful")
    fixed_closed = bagging.EntityBagger(closed, cls_id=CLS, pad_id=PAD, mode="fixed")
    faithful_closed = bagging.EntityBagger(closed, cls_id=CLS, pad_id=PAD, mode="faithful")
    batch = random_batch(rng, alphabet, 6, 20)
    for row in batch.tolist():
      assert fixed.spans(row) == leftmost_longest(words, row)
      # on a prefix-closed dictionary the two modes find the same spans; they differ only where
      # some prefix of a word is missing from the dictionary (the seed's misses)
      assert fixed_closed.spans(row) == faithful_closed.spans(row)
      if fixed.spans(row) != faithful.spans(row):
        differs += 1
        missed = [row[s:e] for s, e in fixed.spans(row) if (s, e) not in faithful.spans(row)]
        assert any(any(tuple(w[:j]) not in set(words) for j in range(2, len(w))) for w in missed)
    # fixed bags do not depend on the other rows of the batch; faithful ones do (batch minimum)
    whole = fixed(batch)
    for r in range(len(batch)):
      alone = fixed(batch[r:r + 1])
      np.testing.assert_array_equal(alone["bag_index"][0], whole["bag_index"][r])
      np.testing.assert_array_equal(alone["bag_mask"][0], whole["bag_mask"][r])
  assert differs > 10


def test_static_shapes_and_errors(tmp_path):
  bagger = bagging.EntityBagger([(5, 6)], cls_id=CLS, pad_id=PAD, num_bags=4, mode="fixed")
  out = bagger(np.asarray([[CLS, 5, 6, 7, 8, 9, SEP, PAD]]))
  assert out["bag_index"].shape == (1, 8) and out["bag_mask"].shape == (1, 4)
  assert out["bag_count"].tolist() == [4]
  assert out["bag_index"][0].tolist() == [0, 1, 1, 2, 3, 3, 3, 3]  # the 4th bag absorbs the rest
  with pytest.raises(ValueError, match="bagging.mode must be one of"):
    bagging.EntityBagger([], cls_id=CLS, pad_id=PAD, mode="greedy")
  with pytest.raises(FileNotFoundError, match="entity dictionary not found"):
    bagging.EntityBagger.from_file(tmp_path / "nope.txt", lambda w: [], cls_id=CLS, pad_id=PAD)
  (tmp_path / "blank.txt").write_text("\n  \n", encoding="utf-8")
  with pytest.raises(ValueError, match="has no words"):
    bagging.EntityBagger.from_file(tmp_path / "blank.txt", lambda w: [[1]] * len(w), cls_id=CLS, pad_id=PAD)
  (tmp_path / "d.txt").write_text("ab\n\nab\nx\n", encoding="utf-8")
  b = bagging.EntityBagger.from_file(tmp_path / "d.txt", lambda ws: [[ord(c) for c in w] for w in ws],
                                     cls_id=CLS, pad_id=PAD)
  assert b.report.line() == ("entity dictionary: 2 words (1 of >= 2 tokens); 1 empty, "
                             "1 duplicate id sequences skipped")


def test_segment_sum_equals_embedding_bag():
  """bag_index drives a one-hot segment sum; it equals torch's embedding_bag over the seed offsets."""
  import torch  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(3)
  alphabet = np.arange(3000, 3006)
  words = random_dictionary(rng, alphabet, 12)
  bagger = bagging.EntityBagger(words, cls_id=CLS, pad_id=PAD)
  batch = random_batch(rng, alphabet, 5, 12)
  out = bagger(batch)
  h = rng.standard_normal((5, 12, 7)).astype(np.float32)
  onehot = np.eye(12, dtype=np.float32)[out["bag_index"]]  # [B, L, K]
  ours = np.einsum("blk,bld->bkd", onehot, h)
  offsets = torch.tensor(bagging.flat_offsets(out["bag_index"], out["bag_count"]))
  ref = torch.nn.functional.embedding_bag(torch.arange(5 * 12), torch.from_numpy(h.reshape(-1, 7)), offsets,
                                          mode="sum").view(5, -1, 7).numpy()
  k = int(out["bag_count"][0])
  np.testing.assert_allclose(ours[:, :k], ref, atol=1e-6)
  assert not ours[:, k:].any()


def test_real_dictionary_slice_with_the_sample_tokenizer():
  from mmret_jax.data.sources import muge  # pylint: disable=import-outside-toplevel
  tok = muge.bert_tokenizer(SAMPLE / "vocab.txt")
  words = [w.strip() for w in (SAMPLE / "entity_dict.txt").read_text(encoding="utf-8").splitlines() if w.strip()]
  ids = tok(words, add_special_tokens=False)["input_ids"]
  seed = SeedBagging(ids, tok.cls_token_id, tok.pad_token_id)
  for mode in ("faithful", "fixed"):
    bagger = bagging.EntityBagger.from_tokenizer(SAMPLE / "entity_dict.txt", tok, mode=mode)
    assert bagger.report.words == len({tuple(i) for i in ids})
  bagger = bagging.EntityBagger.from_tokenizer(SAMPLE / "entity_dict.txt", tok)
  rng = np.random.default_rng(4)
  pieces = [w for w in words] + list("的新款女男大小")
  for _ in range(100):
    texts = ["".join(rng.choice(pieces, int(rng.integers(1, 6)))) for _ in range(int(rng.integers(1, 9)))]
    batch = np.asarray(tok(texts, padding="max_length", truncation=True, max_length=25)["input_ids"])
    check_against_seed(bagger, seed, batch)
