"""Tests of `mmret_jax.data.sources.seqrec` (RecBole-format loading, the train iterator) and
`mmret_jax.eval.seqrec` (full-sort Recall / NDCG) against transcriptions of RecBole 1.2.1
(`Dataset._load_feat` / `_remap` / `_dataframe_to_interaction`, `SequentialDataset._benchmark_presets`,
`Collector.eval_batch_collect`, `Recall` / `NDCG.metric_info`).

    .venv/bin/pytest tests/test_seqrec_data.py
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import torch
from test_prepare_seqrec import DOMAIN, _argv, make_inputs

from mmret_jax.data import prepare_seqrec
from mmret_jax.data.sources import seqrec
from mmret_jax.eval import seqrec as seqrec_eval

HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token\n"


# ---------------------------------------------------------------------------
# RecBole, transcribed (the reference)
# ---------------------------------------------------------------------------
def ref_recbole(folder, domain):
  """What RecBole builds from the benchmark files with the seed's overall.yaml: per split {uid, item_id_list
  (RecBole ids, padded to the longest history of all files), item_length, item_id}, and item id -> token."""
  feats, lens, seqlen = [], [], 0
  for split in ("train", "valid", "test"):
    path = folder / f"{domain}.{split}.inter"
    with open(path) as f:
      head = f.readline()[:-1]
    usecols = [c for c in head.split("\t") if c.split(":")[0] in ("user_id", "item_id_list", "item_id")]
    df = pd.read_csv(path, delimiter="\t", usecols=usecols, dtype={c: str for c in usecols}, engine="python")
    df.columns = [c.split(":")[0] for c in usecols]
    df["item_id_list"] = df["item_id_list"].fillna("")
    df["item_id_list"] = [np.array(list(filter(None, s.split(" ")))) for s in df["item_id_list"].values]
    seqlen = max(seqlen, max(map(len, df["item_id_list"].values)))  # overall_field2seqlen
    feats.append(df)
    lens.append(len(df))
  inter = pd.concat(feats, ignore_index=True)
  # _remap over the alias [item_id, item_id_list]: targets first, then the histories' tokens
  tokens = [inter["item_id"].values, np.concatenate(list(inter["item_id_list"].values))]
  split_point = np.cumsum(list(map(len, tokens)))[:-1]
  new_ids, mp = pd.factorize(np.concatenate(tokens))
  new_ids = np.split(new_ids + 1, split_point)
  id2token = np.array(["[PAD]"] + list(mp))
  item_id = new_ids[0]
  hist = np.split(new_ids[1], np.cumsum(inter["item_id_list"].map(len))[:-1])
  item_length = inter["item_id_list"].map(len).values  # _benchmark_presets
  seqs = torch.nn.utils.rnn.pad_sequence([torch.LongTensor(h[:seqlen]) for h in hist], batch_first=True)
  out, start = {}, 0
  for split, n in zip(("train", "valid", "test"), lens):
    out[split] = {"user": inter["user_id"].values[start:start + n], "item_id_list": seqs[start:start + n].numpy(),
                  "item_length": item_length[start:start + n], "item_id": item_id[start:start + n]}
    start += n
  return out, id2token


def ref_full_sort(scores, target, topk=(10, 50)):
  """Trainer._full_sort_batch_eval + Collector (rec.topk) + Recall / NDCG, unrounded."""
  scores = torch.tensor(scores, dtype=torch.float32).clone()
  scores[:, 0] = -np.inf
  _, topk_idx = torch.topk(scores, max(topk), dim=-1)
  pos_matrix = torch.zeros_like(scores, dtype=torch.int)
  pos_matrix[torch.arange(len(target)), torch.as_tensor(target, dtype=torch.long)] = 1
  pos_len = pos_matrix.sum(dim=1, keepdim=True)
  pos_index = torch.gather(pos_matrix, dim=1, index=topk_idx).to(torch.bool).numpy()
  pos_len = pos_len.squeeze(-1).numpy()
  recall = np.cumsum(pos_index, axis=1) / pos_len.reshape(-1, 1)
  len_rank = np.full_like(pos_len, pos_index.shape[1])
  idcg_len = np.where(pos_len > len_rank, len_rank, pos_len)
  iranks = np.zeros_like(pos_index, dtype=float)
  iranks[:, :] = np.arange(1, pos_index.shape[1] + 1)
  idcg = np.cumsum(1.0 / np.log2(iranks + 1), axis=1)
  for row, idx in enumerate(idcg_len):
    idcg[row, idx:] = idcg[row, idx - 1]
  dcg = np.cumsum(np.where(pos_index, 1.0 / np.log2(iranks + 1), 0), axis=1)
  ndcg = dcg / idcg
  out = {}
  for k in topk:
    out[f"recall@{k}"] = recall.mean(axis=0)[k - 1]
    out[f"ndcg@{k}"] = ndcg.mean(axis=0)[k - 1]
  return out


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """prepare_seqrec's own output on test_prepare_seqrec's inputs, plus a feature file (row i-1 = item i)."""
  tmp = tmp_path_factory.mktemp("seqrec")
  spec, meta, _ = make_inputs(tmp)
  out = tmp / "processed"
  prepare_seqrec.main(_argv(spec, meta, out))
  folder = out / DOMAIN
  maps = json.loads((folder / f"{DOMAIN}.data_maps").read_text())
  n = len(maps["id2item"]) - 1
  feat = np.arange(1, n + 1, dtype=np.float32)[:, None] * np.array([1.0, -0.5, 0.25], np.float32)
  feat.tofile(folder / f"{DOMAIN}.tiny.feature")
  return out, folder, maps, feat


def write_domain(folder, domain, items, splits):
  """Hand-written .data_maps (items 1..N in `items` order) and .inter files ({split: text after the header})."""
  folder.mkdir(parents=True, exist_ok=True)
  id2item = ["[PAD]", *items]
  maps = {"user2id": {"[PAD]": 0}, "id2user": ["[PAD]"], "item2id": {t: i for i, t in enumerate(id2item)},
          "id2item": id2item, "id2meta": {"0": "[PAD]"}}
  (folder / f"{domain}.data_maps").write_text(json.dumps(maps))
  for split, text in splits.items():
    (folder / f"{domain}.{split}.inter").write_text(text)


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------
def test_loads_what_recbole_builds(prepared):
  out, folder, maps, feat = prepared
  data = seqrec.load_seqrec(out, DOMAIN, feature="tiny.feature")
  ref, id2token = ref_recbole(folder, DOMAIN)
  item2id = maps["item2id"]
  assert data.n_items == len(maps["id2item"]) == len(id2token)  # RecBole's item_num
  assert data.id2item == maps["id2item"]
  for split in ("train", "valid", "test"):
    s, r = data[split], ref[split]
    assert len(s) == len(r["item_id"]) > 0 and s.counts["skipped"] == 0 and s.counts["truncated"] == 0
    # RecBole ids -> tokens -> data_maps ids
    to_ours = np.array([item2id[t] if t != "[PAD]" else 0 for t in id2token])
    width = r["item_id_list"].shape[1]
    np.testing.assert_array_equal(s.item_seq[:, :width], to_ours[r["item_id_list"]])
    assert not s.item_seq[:, width:].any() and s.item_seq.shape[1] == 50
    np.testing.assert_array_equal(s.seq_len, r["item_length"])
    np.testing.assert_array_equal(s.target, to_ours[r["item_id"]])
    assert list(s.user) == list(r["user"])
    assert s.item_seq.dtype == s.seq_len.dtype == s.target.dtype == np.int32
  assert data["train"].seq_len.max() == 50  # the fixture's long history (cut to 50 by prepare_seqrec)
  # features: row 0 zeros, row i = the feature of item i (the seed's UniSRecDataset.load_plm_embedding)
  assert data.plm_size == 3 and data.plm_table.dtype == np.float32
  assert not data.plm_table[0].any()
  for i, token in enumerate(maps["id2item"][1:], start=1):
    np.testing.assert_array_equal(data.plm_table[item2id[token]], feat[i - 1])
  np.testing.assert_array_equal(data.plm_table[data["test"].target[0]][0], data["test"].target[0])
  # root = the domain dir itself; a path as feature; one split only; no feature
  d2 = seqrec.load_seqrec(folder, DOMAIN, feature=folder / f"{DOMAIN}.tiny.feature", plm_size=3, splits=("test",))
  assert list(d2.splits) == ["test"]
  np.testing.assert_array_equal(d2["test"].item_seq, data["test"].item_seq)
  np.testing.assert_array_equal(d2.plm_table, data.plm_table)
  assert seqrec.load_seqrec(out, DOMAIN).plm_table is None


def test_edge_cases_skipped_and_counted(tmp_path):
  items = ["a", "b", "c", "d", "e"]
  train = ("item_id:token\tuser_id:token\textra:float\titem_id_list:token_seq\n"  # reordered, an extra column
           "c\tu1\t1.0\ta  b\n"  # double space: empty token dropped
           "\n"  # blank line
           "d\tu2\t2.0\n"  # wrong field count
           "d\tu3\t3.0\t\n"  # empty history
           "zz\tu4\t4.0\ta\n"  # unknown target
           "e\tu5\t5.0\ta qq b\n"  # unknown history item
           "a\tu6\t6.0\tb [PAD]\n"  # the pad token is no item
           "\tu7\t7.0\ta\n"  # empty target
           "e\tu8\t8.0\ta b c d\n"  # 4 > max_seq_length 3: the last 3 kept
           "b\tu9\t9.0\te\n")
  write_domain(tmp_path / "D", "D", items, {"train": train, "valid": HEADER + "u1\ta b c\td\n",
                                            "test": HEADER + "u1\ta b c d\te\n"})
  data = seqrec.load_seqrec(tmp_path, "D", max_seq_length=3)
  s = data["train"]
  np.testing.assert_array_equal(s.item_seq, [[1, 2, 0], [2, 3, 4], [5, 0, 0]])
  np.testing.assert_array_equal(s.seq_len, [2, 3, 1])
  np.testing.assert_array_equal(s.target, [3, 5, 2])
  assert list(s.user) == ["u1", "u8", "u9"]
  c = s.counts
  assert (c["rows_read"], c["rows"], c["skipped"], c["truncated"], c["blank_lines"]) == (9, 3, 6, 1, 1)
  assert c["skip_reasons"] == {"wrong field count": 1, "empty history": 1, "item not in data_maps": 3,
                               "empty item_id": 1}
  assert c["examples"] == ["D.train.inter:4 (wrong field count: 3 fields, header has 4)",
                           "D.train.inter:5 (empty history)", "D.train.inter:6 (item not in data_maps: 'zz')",
                           "D.train.inter:7 (item not in data_maps: 'qq')",
                           "D.train.inter:8 (item not in data_maps: '[PAD]')"]  # the first MAX_EXAMPLES
  assert data.counts["test"]["truncated"] == 1 and data["test"].item_seq.tolist() == [[2, 3, 4]]
  assert data["valid"].counts["skipped"] == 0


@pytest.mark.parametrize("header,match", [
    ("user_id:token\titem_id_list:token\titem_id:token\n", "another type"),
    ("user_id:token\titem_id:token\n", "no item_id_list:token_seq"),
    ("user_id:token\titem_id_list:token_seq\titem_id:token\titem_id:token\n", "twice"),
    ("user_id\titem_id_list:token_seq\titem_id:token\n", "NAME:TYPE"),
    ("", "empty file"),
])
def test_bad_header(tmp_path, header, match):
  write_domain(tmp_path, "D", ["a", "b"], {"train": header + ("u\ta\tb\n" if header else ""),
                                           "valid": HEADER, "test": HEADER})
  with pytest.raises(ValueError, match=match):
    seqrec.load_seqrec(tmp_path, "D")


def test_missing_files(tmp_path):
  with pytest.raises(ValueError, match=r"No D\.data_maps.*prepare_seqrec --domain D"):
    seqrec.load_seqrec(tmp_path, "D")
  write_domain(tmp_path / "D", "D", ["a", "b"], {"train": HEADER + "u\ta\tb\n", "valid": HEADER})
  with pytest.raises(ValueError, match=r"D\.test\.inter not found; make the files with: python -m "
                                       r"mmret_jax\.data\.prepare_seqrec --domain D"):
    seqrec.load_seqrec(tmp_path, "D")
  data = seqrec.load_seqrec(tmp_path / "D", "D", splits=("train", "valid"))  # an empty split is fine
  assert len(data["valid"]) == 0 and data["valid"].item_seq.shape == (0, 50)
  with pytest.raises(ValueError, match=r"D\.blair\.feature not found.*--feature-name"):
    seqrec.load_seqrec(tmp_path, "D", feature="blair.feature", splits=("train",))


def test_plm_size_inference_and_mismatch(tmp_path):
  write_domain(tmp_path, "D", ["a", "b", "c"], {"train": HEADER + "u\ta\tb\n"})
  np.arange(3 * 4, dtype=np.float32).tofile(tmp_path / "D.f.feature")
  data = seqrec.load_seqrec(tmp_path, "D", feature="f.feature", splits=("train",))
  assert data.plm_table.shape == (4, 4)
  np.testing.assert_array_equal(data.plm_table[1:], np.arange(12, dtype=np.float32).reshape(3, 4))
  with pytest.raises(ValueError, match="plm_size 768 given, but the file holds 3 items x 4 floats"):
    seqrec.load_seqrec(tmp_path, "D", feature="f.feature", plm_size=768, splits=("train",))
  np.arange(10, dtype=np.float32).tofile(tmp_path / "D.g.feature")  # not a multiple of 3 items
  with pytest.raises(ValueError, match=r"40 bytes is not float32 \[3 items, plm_size\]"):
    seqrec.load_seqrec(tmp_path, "D", feature="g.feature", splits=("train",))
  with pytest.raises(ValueError, match="give feature="):
    seqrec.load_seqrec(tmp_path, "D", plm_size=4, splits=("train",))


# ---------------------------------------------------------------------------
# Train iterator
# ---------------------------------------------------------------------------
def _split(n, length=4):
  rng = np.random.default_rng(0)
  seq = rng.integers(1, 50, size=(n, length), dtype=np.int32)
  lens = rng.integers(1, length + 1, size=n).astype(np.int32)
  seq[np.arange(length)[None] >= lens[:, None]] = 0
  return seqrec.SeqRecSplit(item_seq=seq, seq_len=lens, target=np.arange(1, n + 1, dtype=np.int32),
                            user=np.array([f"u{i}" for i in range(n)]), counts={})


def test_train_batches_epochs_and_padding():
  s = _split(10)
  assert seqrec.steps_per_epoch(10, 4) == 3 and seqrec.steps_per_epoch(8, 4) == 2
  its = [seqrec.train_batches(s, 7, 4, 2, p) for p in (0, 1)]
  epochs = []
  for _ in range(2):
    rows = []
    for step in range(3):
      for p, it in enumerate(its):
        b = next(it)
        assert b["item_seq"].shape == (2, 4) and b["weight"].dtype == np.float32
        real = b["weight"] == 1
        idx = b["index"][real]
        np.testing.assert_array_equal(b["item_seq"][real], s.item_seq[idx])
        np.testing.assert_array_equal(b["seq_len"][real], s.seq_len[idx])
        np.testing.assert_array_equal(b["target"][real], s.target[idx])
        if step == 2 and p == 1:  # the global batch 8..9 of the epoch: process 1 gets padding only
          assert not real.any()
        if not real.all():
          assert (b["index"][~real] == -1).all() and (b["target"][~real] == 0).all()
          assert (b["seq_len"][~real] == 1).all() and not b["item_seq"][~real].any()
        rows.extend(idx.tolist())
    assert sorted(rows) == list(range(10))  # every row exactly once per epoch
    epochs.append(rows)
  assert epochs[0] != epochs[1]
  # the permutation is default_rng([seed, epoch]), as in data/pipeline.EpochBatches
  assert epochs[1] == np.random.default_rng([7, 1]).permutation(10).tolist()


def test_train_batches_resume():
  s = _split(11)
  it = seqrec.train_batches(s, 3, 4, 4, 0)
  for _ in range(4):  # into the second epoch (3 steps per epoch)
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(4)]
  it2 = seqrec.train_batches(s, 3, 4, 4, 0)
  it2.set_state(state)
  for a, b in zip(want, [next(it2) for _ in range(4)]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert [w["weight"].sum() for w in want] == [4, 3, 4, 4]  # step 5 ends epoch 1 with 3 rows
  with pytest.raises(ValueError, match="must be a multiple of the per-process batch 3"):
    seqrec.train_batches(s, 0, 4, 3, 0)


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------
def test_metrics_from_ranks():
  m = seqrec_eval.metrics_from_ranks(np.array([1, 2, 10, 11, 50, 51]), ks=(10, 50))
  assert m["count"] == 6
  assert m["recall@10"] == 3 / 6 and m["recall@50"] == 5 / 6
  assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11)) / 6, abs=1e-12)
  assert m["ndcg@50"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11) + 1 / math.log2(12)
                                        + 1 / math.log2(51)) / 6, abs=1e-12)


def _table_score_fn(scores, traces=None):
  """score_fn of precomputed scores [N, V]: item_seq column 0 holds row + 1."""
  table = jnp.asarray(scores)

  @jax.jit
  def fn(item_seq, seq_len):
    if traces is not None:
      traces.append(item_seq.shape)
    return table[item_seq[:, 0] - 1] + 0 * seq_len[:, None]
  return fn


def test_full_sort_matches_recbole():
  rng = np.random.default_rng(0)
  n, v = 37, 300
  scores = np.stack([rng.permutation(v) for _ in range(n)]).astype(np.float32) / 7  # distinct per row
  target = rng.integers(1, v, size=n).astype(np.int32)
  for r in range(0, n, 3):  # some hits in the top 10 / 50: swap the target's score with a high one
    top = np.argsort(-scores[r])[rng.integers(0, 40)]
    scores[r, [top, target[r]]] = scores[r, [target[r], top]]
  scores[:, 0] = 1e9  # the pad column: never ranked
  assert all(len(np.unique(r)) == v for r in scores)  # no ties
  item_seq = np.zeros((n, 5), np.int32)
  item_seq[:, 0] = np.arange(1, n + 1)
  seq_len = np.ones(n, np.int32)
  traces = []
  got = seqrec_eval.full_sort_metrics(_table_score_fn(scores, traces), item_seq, seq_len, target, ks=(10, 50),
                                      batch_size=16, progress=False)
  want = ref_full_sort(scores, target)
  assert got["count"] == n and traces == [(16, 5)]  # three batches, the last padded: one compilation
  for k, val in want.items():
    assert abs(got[k] - val) < 1e-6, k
  assert 0 < got["recall@10"] < got["recall@50"] < 1
  # numpy scores work too; batch larger than the data
  got2 = seqrec_eval.full_sort_metrics(lambda s, l: scores[s[:, 0] - 1], item_seq, seq_len, target,
                                       batch_size=64, progress=False)
  assert got2 == got


def test_pad_column_and_ties():
  n, v = 4, 60
  item_seq = np.zeros((n, 2), np.int32)
  item_seq[:, 0] = np.arange(1, n + 1)
  seq_len = np.ones(n, np.int32)
  target = np.array([5, 6, 7, 8], np.int32)
  # the target beats every item but the pad column: rank 1
  scores = np.zeros((n, v), np.float32)
  scores[:, 0] = 100.0
  scores[np.arange(n), target] = 1.0
  m = seqrec_eval.full_sort_metrics(_table_score_fn(scores), item_seq, seq_len, target, batch_size=4,
                                    progress=False)
  assert m["recall@10"] == m["ndcg@10"] == 1.0
  # Ties go to the lower item id: rows 0-1 (targets 5, 6) tie with items 20-30 and come first (rank 1); rows 2-3
  # (targets 40, 45) come after those 11 (rank 12). torch.topk may order ties either way, so RecBole's value lies
  # between the optimistic and the pessimistic bound.
  target = np.array([5, 6, 40, 45], np.int32)
  tied = np.zeros((n, v), np.float32)
  tied[:, 20:31] = 1.0
  tied[np.arange(n), target] = 1.0
  m = seqrec_eval.full_sort_metrics(_table_score_fn(tied), item_seq, seq_len, target, batch_size=4,
                                    progress=False)
  assert m == seqrec_eval.metrics_from_ranks(np.array([1, 1, 12, 12]), ks=(10, 50))
  assert m["recall@10"] == 0.5 and m["recall@50"] == 1.0
  optimistic = seqrec_eval.metrics_from_ranks(np.ones(n), ks=(10, 50))
  pessimistic = seqrec_eval.metrics_from_ranks(np.full(n, 12), ks=(10, 50))
  ref = ref_full_sort(tied, target)
  assert all(pessimistic[k] - 1e-12 <= ref[k] <= optimistic[k] + 1e-12 for k in ref)
  # all scores equal: the target comes after every lower id but the pad: rank = its id
  flat = seqrec_eval.full_sort_metrics(lambda s, l: np.zeros((len(s), v), np.float32), item_seq, seq_len, target,
                                       batch_size=3, progress=False)
  assert flat == seqrec_eval.metrics_from_ranks(target, ks=(10, 50)) and flat["count"] == n


def test_full_sort_errors():
  item_seq, seq_len = np.ones((2, 3), np.int32), np.ones(2, np.int32)
  nan = np.zeros((2, 10), np.float32)
  nan[1, 4] = np.nan
  with pytest.raises(ValueError, match="NaN for the target of row 1"):
    seqrec_eval.full_sort_metrics(lambda s, l: nan, item_seq, seq_len, np.array([3, 4]), batch_size=2,
                                  progress=False)
  with pytest.raises(ValueError, match="outside the 10 scored items"):
    seqrec_eval.full_sort_metrics(lambda s, l: nan, item_seq, seq_len, np.array([3, 10]), batch_size=2,
                                  progress=False)
  with pytest.raises(ValueError, match="0 is padding"):
    seqrec_eval.full_sort_metrics(lambda s, l: nan, item_seq, seq_len, np.array([0, 1]), batch_size=2,
                                  progress=False)
