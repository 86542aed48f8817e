"""Tests of `mmret_jax.data.prepare_esci` against a plain transcription of the seed's
`product_search_results/dataset/process_esci.py` (filters, negative draws, clean_text / clean_metadata).

    .venv/bin/pytest tests/test_prepare_esci.py
"""

from __future__ import annotations

import csv
import gzip
import html
import json
import random
import re

import pytest

from mmret_jax.data import prepare_esci
from mmret_jax.data.sources.amazon_reviews import load_amazon_c4

N_NEG = 3


# ---------------------------------------------------------------------------
# The seed, transcribed (the test's reference)
# ---------------------------------------------------------------------------
def ref_clean_text(raw):
  if isinstance(raw, list):
    text = " ".join(raw)
  elif isinstance(raw, dict):
    text = str(raw)
  else:
    text = raw
  text = html.unescape(text)
  text = re.sub(r'["\n\r]*', "", text)
  # walk back over trailing dots, never onto the first character; then end with one dot
  keep = len(text)
  while keep > 1 and text[keep - 1] == ".":
    keep -= 1
  return text[:keep] + "."


def ref_clean_metadata(example):
  out = ""
  for key in ("title", "description"):
    if key in example and example[key] is not None:
      out += ref_clean_text(example[key]) + " "
  return out.replace("\t", " ")


def reference(rows, a2c, metas, n_neg=N_NEG, seed=0):
  """(queries [(qid, query, item)], pool [{"item_id", "category", "metadata"}], filter counts).

  `rows`: the well-formed test-split rows with tasksource labels; `metas`: {category: [meta records]}.
  Ours draws from random.Random(seed) (the seed: the global `random`), takes a too-small category whole,
  and writes an asin's first meta line once.
  """
  cat2items = {}
  for asin, cat in a2c.items():
    cat2items.setdefault(cat, []).append(asin)
  rng = random.Random(seed)
  fate = {"not_in": 0, "unknown": 0, "locale": 0, "label": 0, "small": 0}
  queries, cands = [], {}
  for line in rows:
    item = line["product_id"]
    if item not in a2c:
      fate["not_in"] += 1
      continue
    cat = a2c[item]
    if "Unknown" in cat:
      fate["unknown"] += 1
      continue
    if line["product_locale"] != "us":
      fate["locale"] += 1
      continue
    if line["esci_label"] != "Exact":
      fate["label"] += 1
      continue
    if line["small_version"] != 1:
      fate["small"] += 1
      continue
    cands.setdefault(cat, set()).add(item)
    pool = cat2items[cat]
    cands[cat].update(pool if len(pool) < n_neg else rng.sample(pool, n_neg))
    queries.append((len(queries), line["query"].strip().replace("\t", " "), item))
  items = []
  for cat, wanted in cands.items():
    done = set()
    for rec in metas[cat]:
      if isinstance(rec, dict) and rec["parent_asin"] in wanted and rec["parent_asin"] not in done:
        done.add(rec["parent_asin"])
        items.append({"item_id": rec["parent_asin"], "category": cat, "metadata": ref_clean_metadata(rec)})
  return queries, items, fate, cands


# ---------------------------------------------------------------------------
# Fixtures in the real formats
# ---------------------------------------------------------------------------
A2C = {**{f"B{i}": "All Beauty" for i in range(1, 9)}, "U1": "Unknown", "T1": "Tiny Cat",
       **{f"P{i}": "Pet Supplies" for i in range(1, 7)}, "T2": "Tiny Cat", "B9": "All Beauty",
       **{f"R{i}": "Trio Set" for i in range(1, N_NEG + 1)}}  # exactly n_neg asins: drawn, all of them

GOOD_ROWS = [  # (query, product_id, locale, label, small_version)
    ("  red lipstick\tmatte ", "B1", "us", "Exact", 1),
    ("trio", "R2", "us", "Exact", 1),
    ("dog leash, 6 ft \"strong\"", "P2", "us", "Exact", 1),
    ("lipstick", "B3", "us", "Exact", 1),
    ("cat toy", "T1", "us", "Exact", 1),
    ("lipstick", "B1", "us", "Exact", 1),
    ("lipstick", "B2", "us", "Substitute", 1),
    ("lipstick", "B4", "us", "Exact", 0),
    ("pintalabios", "B5", "es", "Exact", 1),
    ("mystery", "U1", "us", "Exact", 1),
    ("gone", "Z9", "us", "Exact", 1),
    ("cat toy 2", "T2", "us", "Exact", 1),
    ("dog bowl", "P5", "us", "Irrelevant", 1),
    ("dog bowl", "P6", "us", "Exact", 1),
]
LETTER = {"Exact": "E", "Substitute": "S", "Complement": "C", "Irrelevant": "I"}


def esci_records(rows=GOOD_ROWS):
  return [{"example_id": k, "query": q, "query_id": 100 + k, "product_id": pid, "product_locale": loc,
           "esci_label": lab, "small_version": sv, "large_version": 1, "product_title": "x"}
          for k, (q, pid, loc, lab, sv) in enumerate(rows)]


def meta_records():
  beauty = [
      {"main_category": "All Beauty", "title": "Matte &amp; Lipstick \"Red\"...", "features": ["f"],
       "description": ["Long\nlasting.", "Vegan..."], "parent_asin": "B1"},
      {"title": "Gloss", "description": [], "parent_asin": "B2"},
      {"title": "...", "description": None, "parent_asin": "B3"},
      {"title": "Shine\tKit", "description": ["a\r\nb"], "parent_asin": "B4"},
      {"title": "", "description": ["Only &lt;desc&gt;"], "parent_asin": "B5"},
      {"title": "Brush", "description": {"k": "v"}, "parent_asin": "B6"},
      {"title": "Gloss again (repeat: first wins)", "parent_asin": "B2"},
      {"title": "Mirror.", "description": ["."], "parent_asin": "B7"},
      {"title": "Comb", "description": ["x"], "parent_asin": "B9"},
      {"title": "Not in asin2category", "parent_asin": "B99"},
  ]  # B8 has no meta line
  pets = [{"title": f"Pet item {i}", "description": [f"Desc {i}.."], "parent_asin": f"P{i}"} for i in range(1, 7)]
  tiny = [{"title": "Tiny one", "parent_asin": "T1"}, {"title": "Tiny two", "description": ["d"], "parent_asin": "T2"}]
  trio = [{"title": f"Trio {i}", "parent_asin": f"R{i}"} for i in range(1, N_NEG + 1)]
  return {"All Beauty": beauty, "Pet Supplies": pets, "Tiny Cat": tiny, "Trio Set": trio}


def write_jsonl(path, records, extra_lines=()):
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "wt", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
    for line in extra_lines:
      f.write(line + "\n")


@pytest.fixture
def inputs(tmp_path):
  a2c = tmp_path / "asin2category.json"
  a2c.write_text(json.dumps(A2C, indent=1), encoding="utf-8")
  meta = tmp_path / "meta"
  meta.mkdir()
  m = meta_records()
  # one malformed line (no recognisable parent_asin: parsed, counted) and one blank line
  write_jsonl(meta / "meta_All_Beauty.jsonl", m["All Beauty"][:3], ['{"title": "broken', ""])
  with open(meta / "meta_All_Beauty.jsonl", "a", encoding="utf-8") as f:
    for r in m["All Beauty"][3:]:
      f.write(json.dumps(r) + "\n")
  write_jsonl(meta / "meta_Pet_Supplies.jsonl.gz", m["Pet Supplies"])
  write_jsonl(meta / "meta_Tiny_Cat.jsonl", m["Tiny Cat"])
  write_jsonl(meta / "meta_Trio_Set.jsonl", m["Trio Set"])
  (meta / "README.txt").write_text("not a meta file")
  esci = tmp_path / "esci_test.jsonl"
  recs = esci_records()
  bad_field = dict(recs[0])
  del bad_field["small_version"]
  write_jsonl(esci, recs[:5], ["{not json", json.dumps(bad_field), ""])
  with open(esci, "a", encoding="utf-8") as f:
    for r in recs[5:]:
      f.write(json.dumps(r) + "\n")
  return {"a2c": a2c, "meta": meta, "esci": esci, "tmp": tmp_path}


def run(inputs, out, *extra, esci=None):
  argv = ["--esci", str(esci or inputs["esci"]), "--asin2category", str(inputs["a2c"]),
          "--meta", str(inputs["meta"]), "--output", str(out), "--n-neg", str(N_NEG), "--no-progress", *extra]
  return prepare_esci.main(argv)


def read_outputs(out):
  with open(out / "test.csv", newline="", encoding="utf-8") as f:
    rows = list(csv.reader(f))
  pool = [json.loads(line) for line in (out / "sampled_item_metadata_esci.jsonl").read_text("utf-8").splitlines()]
  return rows, pool


def expected(seed=0):
  return reference(esci_records(), A2C, meta_records(), seed=seed)


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("raw", [
    "Plain", "ends.", "ends...", "...", ".", "", "a.", "..x..", "&quot;Q&quot; &amp; \"q\"\r\n..",
    ["one", "two.."], [], ["."], {"k": "v."}, "tab\there", "&amp;.", "x\n.", ". .",
])
def test_clean_text_matches_seed(raw):
  assert prepare_esci.clean_text(raw) == ref_clean_text(raw)


@pytest.mark.parametrize("rec", meta_records()["All Beauty"] + [{}, {"title": None, "description": None},
                                                               {"description": ["only"]}, {"title": "t\tt"}])
def test_clean_metadata_matches_seed(rec):
  assert prepare_esci.clean_metadata(rec) == ref_clean_metadata(rec)


def test_outputs_match_seed_transcription(inputs, capsys):
  out = inputs["tmp"] / "out"
  res = run(inputs, out)
  queries, items, fate, cands = expected()
  rows, pool = read_outputs(out)
  assert rows[0] == ["qid", "query", "item_id"]
  assert rows[1:] == [[str(q), t, i] for q, t, i in queries]
  assert pool == items
  assert all(set(rec) == {"item_id", "category", "metadata"} for rec in pool)  # not the seed's `item`
  assert '\r' not in (out / "test.csv").read_text("utf-8")
  # counts
  assert res["queries"] == len(queries)
  assert res["esci_rows"] == len(GOOD_ROWS) + 2
  assert res["esci_malformed"] == 2
  assert res["esci_skip_reasons"] == {"json": 1, "missing_field": 1}
  assert (res["esci_not_in_asin2category"], res["esci_unknown_category"], res["esci_not_us"],
          res["esci_not_exact"], res["esci_not_small"]) == (fate["not_in"], fate["unknown"], fate["locale"],
                                                            fate["label"], fate["small"])
  assert res["categories"] == len(cands)
  assert res["candidates"] == sum(len(c) for c in cands.values())
  assert res["queries_small_category"] == sum(A2C[i] == "Tiny Cat" for _, _, i in queries)
  assert res["items"] == len(items)
  all_cands = set().union(*cands.values())
  assert res["candidates_without_meta"] == len(all_cands - {r["item_id"] for r in items}) == 1  # B8
  assert res["queries_without_positive"] == 0
  assert res["meta_malformed"] == 1
  assert res["meta_duplicate"] == int("B2" in cands["All Beauty"])
  assert res["asin2category_entries"] == len(A2C)
  stats = json.loads((out / "prepare_esci_stats.json").read_text())
  assert stats["queries"] == len(queries) and stats["items"] == len(items)
  printed = capsys.readouterr().out
  assert "queries written" in printed and "candidates with no meta line" in printed
  # the outputs load as an Amazon-C4-style benchmark, every query's target in the pool
  data = load_amazon_c4(out / "test.csv", out / "sampled_item_metadata_esci.jsonl")
  assert data.queries == [t for _, t, _ in queries]
  assert data.item_ids == [i for _, _, i in queries]
  assert data.qids.tolist() == [q for q, _, _ in queries]
  assert data.pool_ids == [r["item_id"] for r in items]
  assert (data.target_index >= 0).all()
  assert data.stats["queries"]["skipped"] == 0 and data.stats["pool"]["skipped"] == 0


def test_seeded_and_deterministic(inputs):
  r0a, r0b, r7 = (run(inputs, inputs["tmp"] / name, "--seed", str(s))
                  for name, s in (("a", 0), ("b", 0), ("c", 7)))
  assert all(r is not None for r in (r0a, r0b, r7))
  a, b, c = (inputs["tmp"] / n for n in "abc")
  for name in ("test.csv", "sampled_item_metadata_esci.jsonl"):
    assert (a / name).read_bytes() == (b / name).read_bytes()
  ref0, ref7 = expected(0), expected(7)
  assert ref0[3] != ref7[3]  # the two seeds draw different negatives here
  assert read_outputs(c)[1] == ref7[1]
  assert "B2" in ref7[3]["All Beauty"] and r7["meta_duplicate"] == 1  # B2's second meta line is not written
  assert read_outputs(a)[1] == ref0[1]


def test_parquet_original_layout_and_csv(inputs):
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  recs = [dict(r, esci_label=LETTER[r["esci_label"]], split="test") for r in esci_records()]
  train = [dict(r, split="train", query="train " + r["query"]) for r in recs]
  mixed = [x for pair in zip(recs, train) for x in pair]
  path = inputs["tmp"] / "shopping_queries_dataset_examples.parquet"
  pq.write_table(pa.Table.from_pylist(mixed), path, row_group_size=5)
  res = run(inputs, inputs["tmp"] / "pq", esci=path)
  queries, items, _, _ = expected()
  rows, pool = read_outputs(inputs["tmp"] / "pq")
  assert rows[1:] == [[str(q), t, i] for q, t, i in queries]
  assert pool == items
  assert res["esci_rows"] == 2 * len(GOOD_ROWS) and res["esci_not_test_split"] == len(GOOD_ROWS)
  # the same rows as CSV (values as strings), read from a directory where only "test" files count
  d = inputs["tmp"] / "esci_dir"
  d.mkdir()
  for name, rs in (("test.csv", esci_records()), ("train.csv", esci_records())):
    with open(d / name, "w", newline="", encoding="utf-8") as f:
      w = csv.DictWriter(f, fieldnames=list(rs[0]))
      w.writeheader()
      w.writerows(rs)
  res = run(inputs, inputs["tmp"] / "csv", esci=d)
  assert res["esci_files"] == 1
  assert read_outputs(inputs["tmp"] / "csv") == (rows, pool)


def test_positive_without_meta_is_counted(inputs):
  rows = [("x", "B8", "us", "Exact", 1), ("y", "B1", "us", "Exact", 1)]
  esci = inputs["tmp"] / "two.jsonl"
  write_jsonl(esci, esci_records(rows))
  res = run(inputs, inputs["tmp"] / "o", esci=esci)
  assert res["queries"] == 2 and res["queries_without_positive"] == 1
  queries, items, _, cands = reference(esci_records(rows), A2C, meta_records())
  assert read_outputs(inputs["tmp"] / "o")[1] == items
  assert res["candidates_without_meta"] == len(set().union(*cands.values()) - {r["item_id"] for r in items}) >= 1


def test_asin2category_stream_parser_matches_json(tmp_path):
  data = {"A\"1": "Cat \\ one", "B/2": "Caf\u00e9 \u2603", "C3": "", " ": "Unknown x", "D4": "Cat \\ one"}
  text = "\n {\n" + ",\n".join(f"  {json.dumps(k, ensure_ascii=a)} :\t{json.dumps(v, ensure_ascii=a)}"
                               for (k, v), a in zip(data.items(), [True, False] * 3)) + "\n}\n\n"
  p = tmp_path / "a.json"
  p.write_text(text, encoding="utf-8")
  assert json.loads(text) == data
  got = prepare_esci.load_asin2category(p, progress=False)
  assert got == data and list(got) == list(data)
  gz = tmp_path / "a.json.gz"
  with gzip.open(gz, "wt", encoding="utf-8") as f:
    f.write(json.dumps({f"K{i}": f"C{i % 3}" for i in range(5000)}))
  assert prepare_esci.load_asin2category(gz, progress=False) == {f"K{i}": f"C{i % 3}" for i in range(5000)}
  odd = tmp_path / "odd.json"  # not all strings: json's reading, non-string categories skipped and counted
  odd.write_text(json.dumps({"A": "Cat", "B": 3, "C": None, "D": "Dog"}))
  counts = prepare_esci.new_counts()
  assert prepare_esci.load_asin2category(odd, counts, progress=False) == {"A": "Cat", "D": "Dog"}
  assert counts["asin2category_bad"] == 2
  for bad, msg in (("[1, 2]", "expected a JSON object"), ('{"A": "x",}', "not valid JSON"), ("{}", "no (asin")):
    (tmp_path / "bad.json").write_text(bad)
    with pytest.raises(ValueError, match=re.escape(msg)):
      prepare_esci.load_asin2category(tmp_path / "bad.json", progress=False)


def test_bad_input_one_line_errors(inputs, capsys):
  def err(*argv):
    rc = prepare_esci.cli_main(list(argv))
    msg = capsys.readouterr().err.strip()
    return rc, msg

  base = ["--asin2category", str(inputs["a2c"]), "--meta", str(inputs["meta"]), "--no-progress"]
  rc, msg = err("--esci", str(inputs["tmp"] / "nope.jsonl"), "--output", str(inputs["tmp"] / "o1"), *base)
  assert rc == 1 and msg.startswith("error:") and "nope.jsonl" in msg and "\n" not in msg
  # missing columns, in each format: the file and the columns are named
  recs = [{k: v for k, v in r.items() if k not in ("esci_label", "small_version")} for r in esci_records()]
  write_jsonl(inputs["tmp"] / "cols.jsonl", recs)
  with open(inputs["tmp"] / "cols.csv", "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=list(recs[0]))
    w.writeheader()
    w.writerows(recs)
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.Table.from_pylist(recs), inputs["tmp"] / "cols.parquet")
  for name in ("cols.jsonl", "cols.csv", "cols.parquet"):
    rc, msg = err("--esci", str(inputs["tmp"] / name), "--output", str(inputs["tmp"] / "o2"), *base)
    assert rc == 1 and name in msg and "esci_label" in msg and "small_version" in msg, msg
  # a category without a meta file
  a2c = inputs["tmp"] / "a2c_more.json"
  a2c.write_text(json.dumps({**A2C, "Q1": "Toys Games"}))
  write_jsonl(inputs["tmp"] / "q.jsonl", esci_records([("toy", "Q1", "us", "Exact", 1)]))
  rc, msg = err("--esci", str(inputs["tmp"] / "q.jsonl"), "--output", str(inputs["tmp"] / "o3"),
                "--asin2category", str(a2c), "--meta", str(inputs["meta"]), "--no-progress")
  assert rc == 1 and "Toys_Games" in msg
  assert not (inputs["tmp"] / "o3").exists()
  # nothing passes the filters
  write_jsonl(inputs["tmp"] / "none.jsonl", esci_records([("x", "B1", "es", "Exact", 1)]))
  rc, msg = err("--esci", str(inputs["tmp"] / "none.jsonl"), "--output", str(inputs["tmp"] / "o4"), *base)
  assert rc == 1 and "passed the filters" in msg
  # an existing output is not replaced without --overwrite
  out = inputs["tmp"] / "o5"
  assert prepare_esci.cli_main(["--esci", str(inputs["esci"]), "--output", str(out), *base]) == 0
  before = (out / "test.csv").read_bytes()
  rc, msg = err("--esci", str(inputs["esci"]), "--output", str(out), *base)
  assert rc == 1 and "--overwrite" in msg and (out / "test.csv").read_bytes() == before
  assert prepare_esci.cli_main(["--esci", str(inputs["esci"]), "--output", str(out), "--overwrite", *base]) == 0
  assert not list(out.glob("incomplete.*"))
  # a bad flag value: usage error, exit status 2
  with pytest.raises(SystemExit) as e:
    prepare_esci.cli_main(["--esci", str(inputs["esci"]), "--output", str(out), "--n-neg", "-1", *base])
  assert e.value.code == 2 and capsys.readouterr().err.startswith("error: --n-neg")


def test_malformed_esci_values_are_counted(inputs):
  recs = esci_records([("ok", "B1", "us", "Exact", 1), ("bad flag", "B2", "us", "Exact", "yes"),
                       ("", "B3", "us", "Exact", 1), ("no id", None, "us", "Exact", 1)])
  recs.append({**esci_records()[0], "query": None})
  esci = inputs["tmp"] / "vals.jsonl"
  write_jsonl(esci, recs, ["[1, 2]"])
  res = run(inputs, inputs["tmp"] / "v", esci=esci)
  assert res["queries"] == 1 and res["esci_empty_query"] == 1
  assert res["esci_skip_reasons"] == {"small_version": 1, "product_id": 1, "query": 1, "not_an_object": 1}
  assert res["esci_rows"] == len(recs) + 1


def test_module_entry_point_exit_status(inputs):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  cmd = [sys.executable, "-m", "mmret_jax.data.prepare_esci", "--esci", str(inputs["esci"]), "--asin2category",
         str(inputs["tmp"] / "missing.json"), "--meta", str(inputs["meta"]), "--output", str(inputs["tmp"] / "x")]
  p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
  assert p.returncode == 1
  assert p.stderr.strip() == f"error: --asin2category file not found: {inputs['tmp'] / 'missing.json'}"
