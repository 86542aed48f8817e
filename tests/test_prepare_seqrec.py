"""Tests of `mmret_jax.data.prepare_seqrec` against a plain transcription of the seed's
`seq_rec_results/dataset/process_amazon_2023.py` (filter, drop, truncate, remap, id2meta, clean_metadata,
statistics, CLS features).

    .venv/bin/pytest tests/test_prepare_seqrec.py
"""

from __future__ import annotations

import csv
import gzip
import html
import json
import re

import numpy as np
import pytest

from mmret_jax.data import prepare_seqrec

import fixtures

DOMAIN = "All_Beauty"
FIELDS = ("title", "features", "categories", "description")


# ---------------------------------------------------------------------------
# The seed, transcribed (the test's reference)
# ---------------------------------------------------------------------------
def ref_list_to_str(l):
  if isinstance(l, list):
    return ref_list_to_str(", ".join(l))
  return l


def ref_clean_text(raw_text):
  text = ref_list_to_str(raw_text)
  text = html.unescape(text)
  text = text.strip()
  text = re.sub(r"<[^>]+>", "", text)
  text = re.sub(r"[\n\t]", " ", text)
  text = re.sub(r" +", " ", text)
  text = re.sub(r"[^\x00-\x7F]", " ", text)
  return text


def ref_feature_process(feature):
  sentence = ""
  if isinstance(feature, float):
    sentence += str(feature)
    sentence += "."
  elif isinstance(feature, list) and len(feature) > 0:
    for v in feature:
      sentence += ref_clean_text(v)
      sentence += ", "
    sentence = sentence[:-2]
    sentence += "."
  else:
    sentence = ref_clean_text(feature)
  return sentence + " "


def ref_clean_metadata(example):
  return "".join(ref_feature_process(example[f]) for f in FIELDS)


def ref_pipeline(splits, item2meta, max_his_len):
  """splits: {split: [row dicts with user_id, parent_asin, history]} -> (inter lines, data_maps, stats)."""
  truncated = {}
  lines = {}
  for split in ("train", "valid", "test"):
    rows = []
    for ex in splits[split]:
      ex = dict(ex)
      if ex["parent_asin"] not in item2meta:
        ex["history"] = ""
      ex["history"] = " ".join(h for h in ex["history"].split(" ") if h in item2meta)
      rows.append(ex)
    rows = [ex for ex in rows if len(ex["history"]) > 0]
    for ex in rows:
      ex["history"] = " ".join(ex["history"].split(" ")[-max_his_len:])
    truncated[split] = rows
    lines[split] = ["user_id:token\titem_id_list:token_seq\titem_id:token\n"] + [
        f"{ex['user_id']}\t{ex['history']}\t{ex['parent_asin']}\n" for ex in rows]
  user2id, id2user, item2id, id2item = {"[PAD]": 0}, ["[PAD]"], {"[PAD]": 0}, ["[PAD]"]
  for split in ("train", "valid", "test"):
    for ex in truncated[split]:
      if ex["user_id"] not in user2id:
        user2id[ex["user_id"]] = len(id2user)
        id2user.append(ex["user_id"])
      for item in [ex["parent_asin"]] + ex["history"].split(" "):
        if item not in item2id:
          item2id[item] = len(id2item)
          id2item.append(item)
  maps = {"user2id": user2id, "id2user": id2user, "item2id": item2id, "id2item": id2item}
  id2meta = {0: "[PAD]"}
  for item in item2meta:
    if item in item2id:
      id2meta[item2id[item]] = item2meta[item]
  maps["id2meta"] = id2meta
  sorted_text = [id2meta[i] for i in range(1, len(item2id))]
  n_inter = {}
  for split in ("train", "valid", "test"):
    n_inter[split] = len(truncated[split]) + sum(len(ex["history"].split(" ")) == 1 for ex in truncated[split])
  n_rows = sum(len(truncated[s]) for s in truncated)
  stats = {"users": len(user2id) - 1, "items": len(item2id) - 1, "interactions_total": sum(n_inter.values()),
           "interactions": n_inter,
           "avg_history_length": sum(len(ex["history"].split(" ")) for s in truncated for ex in truncated[s]) / n_rows,
           "avg_metadata_chars": float(np.mean([len(t) for t in sorted_text]))}
  return lines, maps, sorted_text, stats


# ---------------------------------------------------------------------------
# Fixtures: meta jsonl + benchmark CSVs, written here
# ---------------------------------------------------------------------------
TRICKY = [
    {"parent_asin": "A", "title": "Caf&eacute; &amp; <b>Bold</b>\tRoast  \n",
     "features": ["  100% <i>Arabica</i> ", "Made in Caf\u00e9 \u2014 Colombia", "two\n\nlines"],
     "categories": ["Grocery", ["Coffee", "Whole Bean"]], "description": []},
    {"parent_asin": "B", "title": 3.5, "features": [], "categories": [],
     "description": ["Line1\nLine2", "&lt;tag&gt; gone?", "  spaced   out  "]},
    {"parent_asin": "C0", "title": "na\u00efve \u201cquoted\u201d \u65e5\u672c  end", "features": ["x"],
     "categories": [], "description": "a plain string <br/>description"},
    {"parent_asin": "D", "title": "", "features": [""], "categories": ["  "], "description": ["&#39;q&#39; &quot;"]},
]


def _meta_records():
  recs = [dict(r) for r in TRICKY]
  for i in range(60):  # a long history's items
    recs.append({"parent_asin": f"I{i:02d}", "title": f"Item number {i} " + "lotion " * (i % 7),
                 "features": [f"feature {i}"], "categories": ["Beauty", "Skin"], "description": [f"desc {i}"]})
  recs.append({"parent_asin": "E", "title": "a very long description item", "features": [],
               "categories": ["Beauty"], "description": ["word " * 80]})
  recs.append({"parent_asin": "UNUSED", "title": "never mentioned", "features": [], "categories": [],
               "description": []})
  recs.append({"parent_asin": "B", "title": "B again: the last line wins", "features": ["dup"],
               "categories": [], "description": []})
  return recs


def write_meta(path):
  recs = _meta_records()
  with open(path, "w", encoding="utf-8") as f:
    for r in recs[:2]:
      f.write(json.dumps(r) + "\n")
    f.write('{"parent_asin": "BROKEN", "title": \n')  # malformed line of a mentioned item
    f.write("\n")
    for r in recs[2:]:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  item2meta = {}
  for r in recs:
    item2meta[r["parent_asin"]] = ref_clean_metadata(r)
  return item2meta


LONG = [f"I{i:02d}" for i in range(55)]
SPLIT_ROWS = {
    "train": [
        ("u1", "A", ""),  # empty history: dropped
        ("u1", "B", "A"),
        ("u2", "NOMETA", "A B"),  # target without metadata: dropped
        ("u2", "D", "A ZZ B"),  # ZZ has no metadata: removed
        ("u3", "E", " ".join(LONG[:20] + ["ZZ"] + LONG[20:])),  # 55 items with metadata: cut to 50
        ("u4", "C0", "ZZ YY"),  # no history item with metadata: dropped
        ("u5", "BROKEN", "A"),  # malformed meta line = no metadata: dropped
        ("u\t6", "A", "B"),  # a tab in user_id: skipped as malformed
    ],
    "valid": [
        ("u1", "C0", "A B"),
        ("u6", "I55", "I56 ZZ"),  # new user, new items; history of one item
        ("u2", "UNUSED", ""),
    ],
    "test": [
        ("u1", "I57", "A B C0"),
        ("u6", "I58", "I59 I55"),
        ("u7", "B", "D"),
    ],
}


def write_split(path, rows, extra_bad_row=False):
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "wt", encoding="utf-8", newline="") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(["user_id", "parent_asin", "rating", "timestamp", "history"])
    for k, (u, a, h) in enumerate(rows):
      w.writerow([u, a, 5.0, 1600000000000 + k, h])
    if extra_bad_row:
      w.writerow(["u9", "A", 5.0])  # too few fields


def make_inputs(tmp_path, layout="dir"):
  meta_dir = tmp_path / "meta"
  meta_dir.mkdir()
  item2meta = write_meta(meta_dir / f"meta_{DOMAIN}.jsonl")
  (meta_dir / "meta_Other.jsonl").write_text('{"parent_asin": "A", "title": "wrong domain"}\n')
  inter = tmp_path / "inter"
  folder = inter / DOMAIN if layout == "subdir" else inter
  folder.mkdir(parents=True)
  paths = {}
  for split, ext in (("train", ".csv"), ("valid", ".csv.gz"), ("test", ".csv")):
    paths[split] = folder / f"{DOMAIN}.{split}{ext}"
    write_split(paths[split], SPLIT_ROWS[split], extra_bad_row=split == "train")
  spec = ",".join(str(paths[s]) for s in ("train", "valid", "test")) if layout == "list" else str(inter)
  return spec, str(meta_dir), item2meta


def ref_rows():
  return {s: [{"user_id": u, "parent_asin": a, "history": h} for u, a, h in rows if "\t" not in u]
          for s, rows in SPLIT_ROWS.items()}


def _argv(spec, meta, out, *extra):
  return ["--domain", DOMAIN, "--interactions", spec, "--meta", meta, "--output", str(out), "--no-progress",
          *extra]


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------
def test_clean_metadata_matches_seed():
  for rec in _meta_records():
    assert prepare_seqrec.clean_metadata(rec) == ref_clean_metadata(rec), rec["parent_asin"]
  # the tricky parts really are exercised
  a = prepare_seqrec.clean_metadata(TRICKY[0])
  assert "<b>" not in a and "&amp;" not in a and "\t" not in a and "Caf  & Bold Roast" in a
  assert "Coffee, Whole Bean" in a and a.endswith(" ")
  b = prepare_seqrec.clean_metadata(TRICKY[1])
  assert b.startswith("3.5. ") and "tag" not in b and "Line1 Line2" in b
  assert all(ord(c) < 128 for r in TRICKY for c in prepare_seqrec.clean_metadata(r))


def test_clean_metadata_beyond_seed():
  # Inputs the seed crashes on: missing / None fields -> "", deeper nesting flattened, other scalars str()-ed.
  rec = {"parent_asin": "X", "title": None, "features": ["a", ["b", ["c", "d"]]], "categories": [7, None]}
  assert prepare_seqrec.clean_metadata(rec) == " a, b, c, d. 7, . " + " "


@pytest.mark.parametrize("layout", ["dir", "subdir", "list"])
def test_outputs_match_seed(tmp_path, layout, capsys):
  spec, meta, item2meta = make_inputs(tmp_path, layout)
  out = tmp_path / "processed"
  result = prepare_seqrec.main(_argv(spec, meta, out))
  assert "BROKEN" not in item2meta  # its only meta line is malformed: no metadata (the seed would crash)
  lines, maps, sorted_text, stats = ref_pipeline(ref_rows(), item2meta, 50)
  d = out / DOMAIN
  for split in ("train", "valid", "test"):
    assert (d / f"{DOMAIN}.{split}.inter").read_text(encoding="utf-8") == "".join(lines[split]), split
  # the exact JSON the seed's json.dump writes (int keys of id2meta become strings)
  assert (d / f"{DOMAIN}.data_maps").read_text(encoding="utf-8") == json.dumps(maps)
  assert result["statistics"] == stats
  assert not list(d.glob("*.feature")) and not list(d.glob("incomplete.*"))
  # the fixture hits every case
  train = (d / f"{DOMAIN}.train.inter").read_text().splitlines()
  assert len(train) == 1 + 3 and len(train[3].split("\t")[1].split(" ")) == 50
  assert train[3].split("\t")[1].split(" ") == LONG[5:]
  c = result["counts"]
  assert (c["rows_malformed"], c["meta_malformed"], c["meta_duplicate"]) == (2, 1, 1)
  assert c["rows_history_empty"] == 2 and c["rows_target_no_meta"] == 2 and c["rows_history_no_meta"] == 1
  assert c["rows_truncated"] == 1 and c["rows_written"] == sum(len(v) - 1 for v in lines.values())
  printed = capsys.readouterr().out
  assert f"#Users: {stats['users']}\n#Items: {stats['items']}\n" in printed
  assert f"Average history length: {stats['avg_history_length']}" in printed
  assert "No --model" in printed
  assert json.loads((d / prepare_seqrec.STATS_FILE).read_text())["statistics"]["interactions"] == stats["interactions"]


def test_max_his_len_and_overwrite(tmp_path):
  spec, meta, item2meta = make_inputs(tmp_path)
  out = tmp_path / "processed"
  prepare_seqrec.main(_argv(spec, meta, out))
  with pytest.raises(FileExistsError):
    prepare_seqrec.main(_argv(spec, meta, out, "--max-his-len", "2"))
  prepare_seqrec.main(_argv(spec, meta, out, "--max-his-len", "2", "--overwrite"))
  lines, maps, _, _ = ref_pipeline(ref_rows(), item2meta, 2)
  for split in ("train", "valid", "test"):
    assert (out / DOMAIN / f"{DOMAIN}.{split}.inter").read_text() == "".join(lines[split])
  assert json.loads((out / DOMAIN / f"{DOMAIN}.data_maps").read_text()) == json.loads(json.dumps(maps))


def test_features_match_transformers_cls(tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  model, tok = fixtures.make_hf_dir(tmp_path / "blair-tiny", "roberta", max_position_embeddings=80)
  spec, meta, item2meta = make_inputs(tmp_path)
  out = tmp_path / "processed"
  result = prepare_seqrec.main(_argv(spec, meta, out, "--model", str(tmp_path / "blair-tiny"), "--max-length",
                                     "32", "--batch-size", "8"))
  _, _, sorted_text, _ = ref_pipeline(ref_rows(), item2meta, 50)
  feat_path = out / DOMAIN / f"{DOMAIN}.blair-tiny.feature"
  hidden = model.config.hidden_size
  got = np.fromfile(feat_path, dtype=np.float32).reshape(-1, hidden)
  want = []
  with torch.no_grad():
    for k in range(0, len(sorted_text), 16):  # the seed's loop (batch 16, padding, truncation)
      inputs = tok(sorted_text[k:k + 16], padding=True, truncation=True, max_length=32, return_tensors="pt")
      want.append(model(**inputs).last_hidden_state[:, 0, :].numpy())
  want = np.concatenate(want)
  assert got.shape == (len(sorted_text), hidden) == tuple(result["feature"]["shape"])
  assert result["feature"]["truncated_texts"] >= 1  # item E's long description is cut
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert np.abs(np.linalg.norm(got, axis=1) - 1).max() > 1e-2  # not normalised
  # --max-length beyond the model's positions: one clear error, nothing written
  out2 = tmp_path / "p2"
  with pytest.raises(ValueError, match="exceeds"):
    prepare_seqrec.main(_argv(spec, meta, out2, "--model", str(tmp_path / "blair-tiny"), "--feature-name", "x"))
  assert not (out2 / DOMAIN).exists()


def _error(capsys, argv):
  try:
    rc = prepare_seqrec.cli_main(argv)
  except SystemExit as e:  # argparse usage errors exit from inside the parser
    rc = e.code
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
  return rc, err


def test_bad_input(tmp_path, capsys):
  spec, meta, _ = make_inputs(tmp_path)
  out = tmp_path / "o"
  # usage errors: exit status 2
  assert _error(capsys, _argv(spec, meta, out, "--max-his-len", "0"))[0] == 2
  rc, err = _error(capsys, _argv(spec, meta, out, "--feature-name", "blair"))
  assert rc == 2 and "--model" in err
  # a missing split file
  (tmp_path / "inter" / f"{DOMAIN}.test.csv").rename(tmp_path / "moved.csv")
  rc, err = _error(capsys, _argv(spec, meta, out))
  assert rc == 1 and f"{DOMAIN}.test.csv" in err
  # a missing column
  write_split(tmp_path / "inter" / f"{DOMAIN}.test.csv", SPLIT_ROWS["test"])
  bad = tmp_path / "inter" / f"{DOMAIN}.valid.csv.gz"
  with gzip.open(bad, "wt") as f:
    f.write("user_id,parent_asin,rating,timestamp\nu1,A,5.0,1\n")
  rc, err = _error(capsys, _argv(spec, meta, out))
  assert rc == 1 and "history" in err and "valid" in err
  write_split(bad, SPLIT_ROWS["valid"])
  # a comma list in the wrong order, or of the wrong length
  files = [str(tmp_path / "inter" / f"{DOMAIN}.{s}{e}") for s, e in (("valid", ".csv.gz"), ("train", ".csv"),
                                                                     ("test", ".csv"))]
  rc, err = _error(capsys, _argv(",".join(files), meta, out))
  assert rc == 1 and "order" in err
  rc, err = _error(capsys, _argv(",".join(files[:2]), meta, out))
  assert rc == 1 and "three" in err
  # no meta file for the domain
  (tmp_path / "meta" / f"meta_{DOMAIN}.jsonl").rename(tmp_path / "meta.jsonl")
  rc, err = _error(capsys, _argv(spec, meta, out))
  assert rc == 1 and f"meta_{DOMAIN}" in err
  # the meta file itself works; every row dropped -> error, nothing written
  (tmp_path / "empty.jsonl").write_text('{"parent_asin": "nothing"}\n')
  rc, err = _error(capsys, _argv(spec, str(tmp_path / "empty.jsonl"), out))
  assert rc == 1 and "No interaction row kept" in err
  assert not list((out / DOMAIN).iterdir())
  assert prepare_seqrec.cli_main(_argv(spec, str(tmp_path / "meta.jsonl"), out)) == 0
  assert (out / DOMAIN / f"{DOMAIN}.data_maps").is_file()
