"""MUGE data (data/sources/muge.py), the bundled sample (make_muge_sample.py) and metrics (eval/muge.py).

References written here: a naive reader of the raw files (json.loads / split("\\t") / urlsafe
base64 + PIL), transcriptions of the seed's `prepare_train_data` / `prepare_valid_data` and of its
`itm_eval` / `t2i_pred` (BagFormer `MUGE_helper/dataset.py`, `MUGE_helper/evaluation.py`).
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import io
import json
import pickle

import numpy as np
import pytest
from PIL import Image

from mmret_jax.data.samples import make_muge_sample
from mmret_jax.data.sources import muge
from mmret_jax.eval import muge as muge_eval

ROOT = muge.sample_root()


# ---------------------------------------------------------------------------
# Naive references
# ---------------------------------------------------------------------------
def naive_queries(path, labelled=True):
  """(line number, dict) of the lines a careful reader accepts, plus the rejected line numbers."""
  good, bad = [], []
  for lineno, line in enumerate(open(path, encoding="utf-8"), start=1):
    try:
      j = json.loads(line)
    except ValueError:
      bad.append(lineno)
      continue
    if "query_text" not in j or (labelled and "item_ids" not in j):
      bad.append(lineno)
      continue
    good.append((lineno, j))
  return good, bad


def naive_images(path):
  """item_id -> base64 string (first occurrence), lines without a tab."""
  table, no_tab = {}, []
  for lineno, line in enumerate(open(path, encoding="utf-8"), start=1):
    if "\t" not in line:
      no_tab.append(lineno)
      continue
    item, b64 = line.strip().split("\t")
    table.setdefault(int(item), b64)
  return table, no_tab


def naive_decode(b64):
  try:
    return np.asarray(Image.open(io.BytesIO(base64.urlsafe_b64decode(b64))).convert("RGB"))
  except Exception:  # pylint: disable=broad-except
    return None


def seed_train_pairs(ground_truth, id2img):
  """Seed `prepare_train_data`, tolerant of absent items: (query index, pool index) pairs."""
  pool = {item: i for i, item in enumerate(id2img)}
  return [(q, pool[item]) for q, j in enumerate(ground_truth) for item in j["item_ids"] if item in pool]


def seed_valid_maps(ground_truth, id2img):
  """Seed `prepare_valid_data`: txt2img / img2txt defaultdicts over file and pool order."""
  txt_id2txt_idx = {j["query_id"]: i for i, j in enumerate(ground_truth)}
  img_id2img_idx = {img_id: i for i, img_id in enumerate(id2img)}
  txt2img, img2txt = collections.defaultdict(list), collections.defaultdict(list)
  for j in ground_truth:
    t = txt_id2txt_idx[j["query_id"]]
    for img_id in j["item_ids"]:
      txt2img[t].append(img_id2img_idx[img_id])
      img2txt[img_id2img_idx[img_id]].append(t)
  return txt2img, img2txt


def seed_itm_eval(scores_i2t, scores_t2i, txt2img, img2txt):
  """The seed's `itm_eval`, transcribed (argsort reversed, best rank, 1e20 for no ground truth)."""
  def recalls(scores, gt):
    ranks = np.zeros(scores.shape[0])
    for index, score in enumerate(scores):
      inds = np.argsort(score)[::-1]
      rank = 1e20
      for i in gt[index]:
        tmp = np.where(inds == i)[0][0]
        if tmp < rank:
          rank = tmp
      ranks[index] = rank
    return [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
  tr, ir = recalls(scores_i2t, img2txt), recalls(scores_t2i, txt2img)
  tr_mean, ir_mean = (tr[0] + tr[1] + tr[2]) / 3, (ir[0] + ir[1] + ir[2]) / 3
  return {"txt_r1": tr[0], "txt_r5": tr[1], "txt_r10": tr[2], "txt_r_mean": tr_mean,
          "img_r1": ir[0], "img_r5": ir[1], "img_r10": ir[2], "img_r_mean": ir_mean,
          "r_mean": (tr_mean + ir_mean) / 2}


def seed_t2i_pred(scores_t2i, texts, img_idx2id, topk=10):
  out = []
  for index, score in enumerate(scores_t2i):
    inds = np.argsort(score)[::-1][:topk]
    text, text_id = texts[index]
    out.append({"query_id": text_id, "query_text": text, "item_ids": [img_idx2id[i] for i in inds]})
  return out


@pytest.fixture(scope="module")
def splits():
  return muge.load_splits(ROOT)


# ---------------------------------------------------------------------------
# Bundled sample
# ---------------------------------------------------------------------------
def test_sample_sizes_and_size_budget(splits):
  assert sum(f.stat().st_size for f in ROOT.iterdir()) < 1_000_000
  train, valid, test = splits["train"], splits["valid"], splits["test"]
  assert (len(train.queries), len(valid.queries), len(test.queries)) == (
      make_muge_sample.TRAIN_QUERIES, make_muge_sample.VALID_QUERIES, make_muge_sample.TEST_QUERIES)
  assert (len(valid.images), len(test.images)) == (make_muge_sample.VALID_POOL, make_muge_sample.TEST_POOL)
  assert 150 <= len(train.pairs) <= 250
  assert all(1 <= len(v) <= 3 for v in valid.txt2img) and all(len(v) == 1 for v in valid.img2txt)
  assert all(q.item_ids == () for q in test.queries)
  assert valid.notes() == [] and test.notes() == []


def test_sample_train_counts_match_a_naive_reader(splits):
  train = splits["train"]
  good, bad = naive_queries(ROOT / "MR_train_queries.jsonl")
  table, no_tab = naive_images(ROOT / "MR_train_imgs.tsv")
  assert bad == [18, 61] and len(no_tab) == 1
  assert train.skipped_queries.counts == {"json": 1, "missing:query_text": 1}
  assert train.skipped_queries.examples == {"json": [18], "missing:query_text": [61]}
  assert train.images.skipped.counts == {"no_tab": 1} and train.images.skipped.examples == {"no_tab": no_tab}
  assert train.query_ids == [j["query_id"] for _, j in good]
  assert train.texts == [j["query_text"] for _, j in good]
  assert train.pool_ids == list(table)
  absent = [i for _, j in good for i in j["item_ids"] if i not in table]
  assert len(absent) == 1 and train.missing.counts == {"missing_image": 1}
  assert train.missing.examples == {"missing_image": absent}
  np.testing.assert_array_equal(train.pairs, seed_train_pairs([j for _, j in good], table))
  # The undecodable image: exactly the one the naive decoder rejects, counted once.
  broken = [i for i, b64 in table.items() if naive_decode(b64) is None]
  assert len(broken) == 1
  assert [i for i in train.pool_ids if train.images.load(i) is None] == broken
  assert train.images.load(broken[0]) is None and train.images.failed_ids == set(broken)
  notes = train.notes()
  assert len(notes) == 3 and "json 1 (line 18)" in notes[0] and "missing:query_text 1 (line 61)" in notes[0]
  assert f"no_tab 1 (line {no_tab[0]})" in notes[1] and f"1 image did not decode (item {broken[0]})" in notes[1]
  assert f"missing_image 1 (item {absent[0]})" in notes[2]


def test_sample_valid_maps_equal_the_seed(splits):
  valid = splits["valid"]
  good, bad = naive_queries(ROOT / "MR_valid_queries.jsonl")
  table, no_tab = naive_images(ROOT / "MR_valid_imgs.tsv")
  assert bad == [] and no_tab == []
  txt2img, img2txt = seed_valid_maps([j for _, j in good], table)
  assert valid.txt2img == [txt2img[i] for i in range(len(good))]
  assert valid.img2txt == [img2txt[i] for i in range(len(table))]
  np.testing.assert_array_equal(valid.pairs, seed_train_pairs([j for _, j in good], table))


def test_offset_loading_equals_naive_decode(splits):
  for split in ("valid", "test"):
    images = splits[split].images
    table, _ = naive_images(ROOT / f"MR_{split}_imgs.tsv")
    for item, b64 in table.items():
      assert images.raw(item) == b64.encode("ascii")
      img = images.load(item)
      assert img.mode == "RGB" and img.size == (64, 64)
      np.testing.assert_array_equal(np.asarray(img), naive_decode(b64))
  # Thread-safe reads, and a pickled copy (grain workers) reads the same pixels.
  images = splits["valid"].images
  with concurrent.futures.ThreadPoolExecutor(4) as ex:
    threaded = list(ex.map(lambda i: np.asarray(images.load_at(i)), [*range(len(images))] * 3))
  clone = pickle.loads(pickle.dumps(images))
  for i, arr in enumerate(threaded):
    np.testing.assert_array_equal(arr, np.asarray(clone.load_at(i % len(images))))


def test_sample_images_are_learnable():
  """The colour word is the dominant non-background colour of the item's image."""
  valid = muge.MugeSplit(ROOT, "valid")
  for q, rows in zip(valid.queries, valid.txt2img):
    colour = next(c for c in make_muge_sample.COLOURS if c in q.text)
    for r in rows:
      px = np.asarray(valid.images.load_at(r)).reshape(-1, 3).astype(int)
      dist = np.abs(px - np.array(make_muge_sample.COLOURS[colour])).sum(1)
      assert (dist < 60).mean() > 0.1, (q.text, r)


def test_generator_is_deterministic(tmp_path):
  files = make_muge_sample.build()
  for name, lines in files.items():
    on_disk = (ROOT / name).read_text(encoding="utf-8").split("\n")[:-1]
    if name.endswith(".tsv"):  # JPEG bytes depend on the libjpeg build; ids and order do not
      assert [x.split("\t")[0] for x in on_disk] == [x.split("\t")[0] for x in lines], name
    else:
      assert on_disk == lines, name


def test_vocab_and_tokenizer_split_chinese_per_character(splits):
  vocab = (ROOT / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
  assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(set(vocab)) == len(vocab)
  tok = muge.bert_tokenizer(ROOT / "vocab.txt")
  assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id) == (0, 1, 2, 3)
  words = (ROOT / "entity_dict.txt").read_text(encoding="utf-8").split()
  for text in [t for s in splits.values() for t in s.texts] + words:
    pieces = tok.tokenize(text)
    assert "[UNK]" not in pieces, text
    cjk = [ch for ch in text if "\u4e00" <= ch <= "\u9fff"]
    assert [p for p in pieces if not p.isascii()] == cjk, text
    assert len(pieces) == len(text.replace(" ", "")) <= 23
  assert tok.tokenize("iPhone14手机壳") == ["i", "##p", "##h", "##o", "##n", "##e", "##1", "##4", "手", "机", "壳"]
  assert tok("红色", padding="max_length", max_length=6)["input_ids"] == [2, vocab.index("红"), vocab.index("色"), 3, 0, 0]


def test_entity_dict_has_the_matcher_edge_cases(splits):
  words = set((ROOT / "entity_dict.txt").read_text(encoding="utf-8").split())
  three = [w for w in words if len(w) == 3]
  assert any(w[:2] not in words for w in three) and any(w[:2] in words for w in three)
  texts = [t for s in splits.values() for t in s.texts]
  for w in three:
    assert any(w in t for t in texts) or w == "数据线", w
  adjacent = [t for t in texts if any(t[i:j] in words and t[j:k] in words
                                      for i in range(len(t)) for j in range(i + 2, len(t))
                                      for k in range(j + 2, len(t) + 1))]
  assert len(adjacent) > len(texts) // 2
  missed_prefix = [t for t in texts if any(w in t and w[:2] not in words for w in three)]
  assert missed_prefix


# ---------------------------------------------------------------------------
# Bad input files
# ---------------------------------------------------------------------------
BAD_QUERY_LINES = [
    ('{"query_id": 1, "query_text": "红色连衣裙", "item_ids": [10, 11]}', None),
    ('{"query_id": 2, "query_text": "蓝色"', "json"),
    ("[1, 2]", "not_object"),
    ('{"query_text": "a", "item_ids": [10]}', "missing:query_id"),
    ('{"query_id": true, "query_text": "a", "item_ids": [10]}', "type:query_id"),
    ('{"query_id": 3.5, "query_text": "a", "item_ids": [10]}', "type:query_id"),
    ('{"query_id": -4, "query_text": "a", "item_ids": [10]}', "type:query_id"),
    ('{"query_id": "5", "query_text": "字符串id", "item_ids": ["12"]}', None),
    ('{"query_id": 6, "item_ids": [10]}', "missing:query_text"),
    ('{"query_id": 7, "query_text": 7, "item_ids": [10]}', "type:query_text"),
    ('{"query_id": 8, "query_text": "  ", "item_ids": [10]}', "empty:query_text"),
    ('{"query_id": 9, "query_text": "a"}', "missing:item_ids"),
    ('{"query_id": 10, "query_text": "a", "item_ids": 10}', "type:item_ids"),
    ('{"query_id": 11, "query_text": "a", "item_ids": []}', "empty:item_ids"),
    ('{"query_id": 12, "query_text": "a", "item_ids": [10, "x"]}', "type:item_ids"),
    ('{"query_id": 1, "query_text": "重复", "item_ids": [10]}', "duplicate_id"),
    ("", None),  # blank: not a row
    ('{"query_id": 13, "query_text": "黑色围巾", "item_ids": [99]}', None),
]


def _write_queries(path, lines, extra=b""):
  path.write_bytes("\n".join(lines).encode("utf-8") + b"\n" + extra)
  return path


def test_read_queries_counts_every_bad_line(tmp_path):
  path = _write_queries(tmp_path / "q.jsonl", [line for line, _ in BAD_QUERY_LINES], b"\xff\xfe{}\n")
  queries, skipped = muge.read_queries(path, labelled=True)
  assert queries == [muge.Query(1, "红色连衣裙", (10, 11)), muge.Query(5, "字符串id", (12,)),
                     muge.Query(13, "黑色围巾", (99,))]
  expected = collections.defaultdict(list)
  for lineno, (_, reason) in enumerate(BAD_QUERY_LINES, start=1):
    if reason:
      expected[reason].append(lineno)
  expected["json"].append(len(BAD_QUERY_LINES) + 1)  # invalid UTF-8
  assert skipped.examples == dict(expected)
  assert skipped.counts == {k: len(v) for k, v in expected.items()} and skipped.total == 15
  assert "type:query_id 3 (lines 5, 6, 7)" in skipped.summary()
  # Unlabelled (test): item_ids are not read, so only the other problems count.
  queries, skipped = muge.read_queries(path, labelled=False)
  assert [q.query_id for q in queries] == [1, 5, 9, 10, 11, 12, 13] and all(q.item_ids == () for q in queries)
  assert "missing:item_ids" not in skipped.counts and skipped.counts["duplicate_id"] == 1


def test_read_queries_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    muge.read_queries(tmp_path / "nope.jsonl", labelled=True)
  path = _write_queries(tmp_path / "bad.jsonl", ["{", '{"query_id": 1}'])
  with pytest.raises(ValueError, match=r"bad\.jsonl has no valid query line .*json 1 \(line 1\)"):
    muge.read_queries(path, labelled=True)


def _jpeg_b64(colour, size=(8, 8)):
  buf = io.BytesIO()
  Image.new("RGB", size, colour).save(buf, format="JPEG")
  return base64.urlsafe_b64encode(buf.getvalue()).decode("ascii"), buf.getvalue()


def test_image_table_counts_every_bad_line(tmp_path):
  red, red_bytes = _jpeg_b64((255, 0, 0))
  blue, _ = _jpeg_b64((0, 0, 255))
  std_b64 = base64.b64encode(_jpeg_b64((0, 255, 0), (31, 29))[1]).decode()  # '+' / '/' alphabet
  truncated = base64.urlsafe_b64encode(red_bytes[:len(red_bytes) // 2]).decode()
  rows = [
      f"10\t{red}",  # 1 ok
      f"11 {red}",  # 2 no_tab
      f"12\t{red}\t{red}",  # 3 fields
      f"abc\t{red}",  # 4 bad_id
      f"-5\t{red}",  # 5 bad_id
      "13\t",  # 6 empty_image
      f"10\t{blue}",  # 7 duplicate_id: the first (red) is kept
      f"14\t{std_b64}",  # 8 ok: standard base64 decodes too
      "15\tabc",  # 9 bad padding: fails on load
      f"16\t{base64.urlsafe_b64encode(b'not an image').decode()}",  # 10 fails on load
      f"17\t{truncated}",  # 11 truncated JPEG: fails on load
      "",  # 12 blank: not a row
      f" 18 \t{blue}  ",  # 13 ok, padded with blanks
  ]
  path = tmp_path / "imgs.tsv"
  path.write_bytes("\r\n".join(rows).encode() + b"\r\n")
  table = muge.ImageTable(path)
  assert table.ids == [10, 14, 15, 16, 17, 18] and len(table) == 6
  assert 10 in table and 11 not in table and "10" not in table
  assert table.skipped.counts == {"no_tab": 1, "fields": 1, "bad_id": 2, "empty_image": 1, "duplicate_id": 1}
  assert table.skipped.examples == {"no_tab": [2], "fields": [3], "bad_id": [4, 5], "empty_image": [6],
                                    "duplicate_id": [7]}
  assert table.raw(10) == red.encode() and table.raw(18) == blue.encode()  # no \r, no blanks
  assert np.asarray(table.load(10))[0, 0, 0] > 200 and table.load(14).size == (31, 29)
  assert table.load(18).mode == "RGB"
  assert [table.load(i) for i in (15, 16, 17)] == [None, None, None]
  assert table.failed_ids == {15, 16, 17}
  report = table.report()
  assert report.startswith("imgs.tsv: 6 images; skipped 6 lines: no_tab 1 (line 2)")
  assert "3 images did not decode (items 15, 16, 17)" in report
  with pytest.raises(KeyError, match="item 99 is not in .*imgs.tsv"):
    table.load(99)
  with pytest.raises(IndexError):
    table.load_at(6)
  with pytest.raises(FileNotFoundError, match="none.tsv"):
    muge.ImageTable(tmp_path / "none.tsv")
  (tmp_path / "empty.tsv").write_text("x\ty\n")
  with pytest.raises(ValueError, match=r"empty\.tsv has no valid image line .*bad_id 1"):
    muge.ImageTable(tmp_path / "empty.tsv")


def test_split_layout_missing_items_and_unlabelled_test(tmp_path):
  sub = tmp_path / "Multimodal_Retrieval"
  sub.mkdir()
  a, _ = _jpeg_b64((255, 0, 0))
  (sub / "MR_valid_imgs.tsv").write_text(f"20\t{a}\n21\t{a}\n22\t{a}\n")
  _write_queries(sub / "MR_valid_queries.jsonl", [
      '{"query_id": 1, "query_text": "甲", "item_ids": [21, 77, 20]}',
      '{"query_id": 2, "query_text": "乙", "item_ids": [78]}',
      '{"query_id": 3, "query_text": "丙", "item_ids": [21]}'])
  valid = muge.MugeSplit(tmp_path, "valid")
  assert valid.root == sub
  assert valid.txt2img == [[1, 0], [], [1]] and valid.img2txt == [[0], [0, 2], []]
  np.testing.assert_array_equal(valid.pairs, [[0, 1], [0, 0], [2, 1]])
  assert valid.missing.counts == {"missing_image": 2} and valid.missing.examples == {"missing_image": [77, 78]}
  assert valid.queries_without_images == [2]
  notes = valid.notes()
  assert notes == ["2 labelled items not in MR_valid_imgs.tsv, skipped: missing_image 2 (items 77, 78)",
                   "1 query with no item in the pool (query ids 2); eval.muge.itm_eval counts them as misses"]
  # The query without a pooled item and the image without a query are misses for itm_eval.
  t2i = np.array([[0.1, 0.9, 0.0], [0.5, 0.4, 0.3], [0.0, 0.8, 0.1]])
  res = muge_eval.itm_eval(t2i.T, t2i, valid.txt2img, valid.img2txt)
  assert res["img_r1"] == pytest.approx(200 / 3) and res["txt_r1"] == pytest.approx(100 / 3)
  assert res["txt_r5"] == pytest.approx(200 / 3)

  (sub / "MR_test_imgs.tsv").write_text(f"30\t{a}\n")
  _write_queries(sub / "MR_test_queries.jsonl", ['{"query_id": 9, "query_text": "丁"}'])
  test = muge.MugeSplit(sub, "test")
  assert test.query_ids == [9] and test.pool_ids == [30]
  for attr in ("pairs", "txt2img", "img2txt"):
    with pytest.raises(ValueError, match="MUGE test has no labels"):
      getattr(test, attr)
  with pytest.raises(FileNotFoundError, match="MR_train_queries.jsonl not found"):
    muge.MugeSplit(tmp_path, "train")
  with pytest.raises(ValueError, match="split must be one of"):
    muge.MugeSplit(tmp_path, "val")


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------
def _random_case(rng, n_img=37, n_txt=23):
  scores_t2i = rng.standard_normal((n_txt, n_img))
  txt2img = collections.defaultdict(list)
  img2txt = collections.defaultdict(list)
  for t in range(n_txt):
    for i in rng.choice(n_img, size=rng.integers(1, 4), replace=False):
      txt2img[t].append(int(i))
      img2txt[int(i)].append(t)
  return scores_t2i, txt2img, img2txt


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_itm_eval_equals_the_seed_on_tie_free_scores(seed, monkeypatch):
  rng = np.random.default_rng(seed)
  t2i, txt2img, img2txt = _random_case(rng)
  i2t = t2i.T + 0.3 * rng.standard_normal(t2i.T.shape)  # asymmetric, as BagFormer's S_i2t
  for s in (t2i, i2t):
    assert all(len(set(row)) == len(row) for row in s)
  assert len(img2txt) < t2i.shape[1]  # some images have no text: misses in txt_r*
  expected = seed_itm_eval(i2t, t2i, txt2img, img2txt)
  assert muge_eval.itm_eval(i2t, t2i, txt2img, img2txt) == expected
  lists = ([txt2img[t] for t in range(t2i.shape[0])], [img2txt[i] for i in range(t2i.shape[1])])
  assert muge_eval.itm_eval(i2t.astype(np.float32), t2i.astype(np.float32), *lists) == seed_itm_eval(
      i2t.astype(np.float32), t2i.astype(np.float32), txt2img, img2txt)
  monkeypatch.setattr(muge_eval, "_BLOCK_ELEMENTS", 50)  # several row blocks
  assert muge_eval.itm_eval(i2t, t2i, *lists) == expected
  official = muge_eval.muge_metrics(t2i, txt2img)
  assert official == {"R@1": expected["img_r1"], "R@5": expected["img_r5"], "R@10": expected["img_r10"],
                      "MeanRecall": expected["img_r_mean"]}


def test_itm_eval_hand_computed():
  # 3 texts x 4 images. Texts: 0 -> {2} at rank 1; 1 -> {0, 2}, best (0) at rank 0; 2 -> {1} last (3).
  # Images: 0 -> {1} at rank 1; 1 -> {2} at 0; 2 -> {0, 1}, best (0) at 0; 3 -> none: a miss.
  t2i = np.array([[0.9, 0.1, 0.5, 0.2], [0.9, 0.2, 0.1, 0.8], [0.7, 0.1, 0.6, 0.5]])
  i2t = np.array([[0.5, 0.6, 0.9], [0.1, 0.0, 0.3], [0.9, 0.1, 0.2], [0.3, 0.9, 0.1]])
  txt2img, img2txt = [[2], [0, 2], [1]], [[1], [2], [0, 1], []]
  np.testing.assert_array_equal(muge_eval.best_ranks(t2i, txt2img), [1, 0, 3])
  np.testing.assert_array_equal(muge_eval.best_ranks(i2t, img2txt), [1, 0, 0, np.inf])
  res = muge_eval.itm_eval(i2t, t2i, txt2img, img2txt)
  assert res["img_r1"] == pytest.approx(100 / 3) and res["img_r5"] == 100.0 and res["img_r10"] == 100.0
  assert res["img_r_mean"] == pytest.approx((100 / 3 + 200) / 3)
  assert res["txt_r1"] == 50.0 and res["txt_r5"] == 75.0 and res["txt_r_mean"] == pytest.approx(200 / 3)
  assert res["r_mean"] == pytest.approx((res["txt_r_mean"] + res["img_r_mean"]) / 2)
  assert list(res) == ["txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10",
                       "img_r_mean", "r_mean"]


def test_ties_rank_lower_index_first():
  s = np.array([[0.5, 0.5, 0.5, 0.1], [0.2, 0.7, 0.7, 0.7], [-np.inf, -np.inf, 1.0, -np.inf]])
  np.testing.assert_array_equal(muge_eval.best_ranks(s, [[2], [3, 2], [3, 1]]), [2, 1, 2])
  np.testing.assert_array_equal(muge_eval.top_indices(s, 3), [[0, 1, 2], [1, 2, 3], [2, 0, 1]])
  # 12 tied images: a ground truth at index 11 is outside R@10 under our rule.
  assert muge_eval.muge_metrics(np.zeros((1, 12)), [[11]])["R@10"] == 0.0
  assert muge_eval.muge_metrics(np.zeros((1, 12)), [[9, 11]])["R@10"] == 100.0


def test_metric_input_errors():
  with pytest.raises(ValueError, match="NaN"):
    muge_eval.muge_metrics(np.array([[np.nan, 1.0]]), [[0]])
  with pytest.raises(ValueError, match=r"must be \[Ni, Nt\] and \[Nt, Ni\]"):
    muge_eval.itm_eval(np.zeros((2, 3)), np.zeros((2, 3)), [[0], [1]], [[0], [1]])
  with pytest.raises(ValueError, match="outside"):
    muge_eval.muge_metrics(np.zeros((1, 3)), [[3]])
  with pytest.raises(ValueError, match="2 entries for 1 score rows"):
    muge_eval.muge_metrics(np.zeros((1, 3)), [[0], [1]])


def test_t2i_predictions_match_the_seed_and_write_jsonl(tmp_path):
  rng = np.random.default_rng(7)
  t2i, txt2img, _ = _random_case(rng, n_img=15, n_txt=6)
  qids, texts, pool = [101, 102, 103, 104, 105, 106], ["红色连衣裙", "蓝色", "a", "b", "c", "d"], list(range(900, 915))
  preds = muge_eval.t2i_predictions(t2i, qids, texts, pool, k=10)
  assert preds == seed_t2i_pred(t2i, list(zip(texts, qids)), dict(enumerate(pool)))
  assert all(type(x) is int for p in preds for x in [p["query_id"], *p["item_ids"]])
  assert len(muge_eval.t2i_predictions(t2i, qids, texts, pool, k=50)[0]["item_ids"]) == 15
  labels = {qids[t]: [pool[i] for i in txt2img[t]] for t in range(6)}
  assert muge_eval.prediction_recall(preds, labels) == muge_eval.muge_metrics(t2i, txt2img)
  # Ties: lower pool index first.
  tied = muge_eval.t2i_predictions(np.array([[1.0, 3.0, 3.0, 2.0, 3.0]]), [7], ["x"], [50, 51, 52, 53, 54], k=4)
  assert tied == [{"query_id": 7, "query_text": "x", "item_ids": [51, 52, 54, 53]}]
  path = muge_eval.write_predictions(tmp_path / "out" / "merge_t2i.jsonl", preds)
  text = path.read_text(encoding="utf-8")
  assert "红色连衣裙" in text and "\\u" not in text
  assert [json.loads(line) for line in text.splitlines()] == preds
  with pytest.raises(ValueError, match="pool_ids"):
    muge_eval.t2i_predictions(t2i, qids, texts, pool[:3])
