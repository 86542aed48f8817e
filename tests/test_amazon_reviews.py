"""Amazon Reviews 2023 -> BLaIR pairs (prepare_blair), PairsSource, split_pairs, Amazon-C4 loader."""

from __future__ import annotations

import csv
import gzip
import json
import pickle

import numpy as np
import pytest

from mmret_jax.data import prepare_blair
from mmret_jax.data.samples import make_blair_sample
from mmret_jax.data.sources import amazon_reviews as ar
from mmret_jax.data.sources import PairsSource, load_amazon_c4, split_pairs

T1 = 1628643414042
SAMPLE_TSV = make_blair_sample.OUTPUT


# ---------------------------------------------------------------------------
# Raw Amazon Reviews 2023 fixture: two categories, one .jsonl and one .jsonl.gz
# ---------------------------------------------------------------------------
def _meta(asin, title, features=(), description=(), **extra):
  return {"main_category": "X", "title": title, "average_rating": 4.2, "rating_number": 7,
          "features": list(features), "description": list(description), "price": None, "images": [],
          "videos": [], "store": "S", "categories": [], "details": {}, "parent_asin": asin,
          "bought_together": None, **extra}


def _review(asin, title, text, ts, user="U1"):
  return {"rating": 5.0, "title": title, "text": text, "images": [], "asin": asin, "parent_asin": asin,
          "user_id": user, "timestamp": ts, "helpful_vote": 0, "verified_purchase": True}


RAW = {
    "All_Beauty": {
        "meta": [
            _meta("B1", "Rose Water Toner", ["Alcohol free", "200 ml"], ["Gentle\ttoner for\ndaily use.\r"]),
            _meta("B2", "Tiny", [], []),  # 4 chars: too short
            "{not json",
            _meta("B3", None, ["Vitamin C serum with hyaluronic acid"], []),  # no title
            {"title": "no parent asin here but long enough text"},  # malformed: missing parent_asin
            _meta("B4", "Lip Balm \"Cherry\" édition 🍒", [], ["Keeps lips soft all day long."]),
        ],
        "reviews": [
            _review("B1", "Lovely", "Smells great and my skin feels fresh.", T1 - 1),
            _review("B1", "After t1", "This review is too recent to be used at all.", T1),
            _review("B2", "Meta too short", "The item's metadata was filtered out, so skip.", 1),
            _review("B9", "No such item", "This item has no metadata line anywhere at all.", 2),
            _review("B3", "Short", "ok", 3),  # "Short ok": too short
            "{\"rating\": 5.0, broken",
            "",  # blank line: not a row
            _review("B4", None, "Best \"cherry\" balm ever,\tno\r\nregrets at all!", 4),
            _review("A1", "Wrong category", "Item A1 is listed only in the other category.", 5),
            {"rating": 1.0, "title": "no timestamp", "text": "missing the timestamp field entirely",
             "parent_asin": "B1"},
            _review("B3", "Works", "Noticeably brighter skin after two weeks of use.", 6),
        ],
    },
    "Appliances": {
        "meta": [
            _meta("A1", "AcmeBrew Kettle", ["1.7L", "Auto shut-off"], ["Stainless steel body."]),
            _meta("A2", "Fridge Water Filter Replacement", [], []),
            "not json either",
        ],
        "reviews": [
            _review("A2", "Fits perfectly", "Easy to install, water tastes clean.", 10),
            _review("A1", "Great kettle", "Boils fast and the handle stays cool.", 11),
            _review("B1", "Other category", "B1 is a beauty item, not in this meta file.", 12),
            "[1, 2",
            _review("A1", "Future", "Written after the cutoff, must be dropped.", T1 + 5),
        ],
    },
}


def _write_jsonl(path, records):
  lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
  data = ("\n".join(lines) + "\n").encode("utf-8")
  if path.suffix == ".gz":
    with gzip.open(path, "wb") as f:
      f.write(data)
  else:
    path.write_bytes(data)


@pytest.fixture()
def raw_dirs(tmp_path):
  rev, met = tmp_path / "reviews", tmp_path / "meta"
  rev.mkdir()
  met.mkdir()
  for cat, ext in (("All_Beauty", ".jsonl"), ("Appliances", ".jsonl.gz")):
    _write_jsonl(rev / f"{cat}{ext}", RAW[cat]["reviews"])
    _write_jsonl(met / f"meta_{cat}{ext}", RAW[cat]["meta"])
  (rev / "README.txt").write_text("not data")
  return rev, met


def _clean(s):
  return s.replace("\t", " ").replace("\n", " ").replace("\r", "").strip()


def _expected_pairs(categories):
  """The seed's rules, written out independently of the module under test (sample rate 1)."""
  out = []
  for cat in categories:
    index = {}
    for m in RAW[cat]["meta"]:
      if isinstance(m, str) or "parent_asin" not in m:
        continue
      parts = ([m["title"]] if m["title"] is not None else []) + \
              ([" ".join(m["features"])] if m["features"] else []) + \
              ([" ".join(m["description"])] if m["description"] else [])
      text = _clean(" ".join(parts))
      if len(text) > 30:
        index[m["parent_asin"]] = text
    for r in RAW[cat]["reviews"]:
      if isinstance(r, str) or "timestamp" not in r:
        continue
      text = _clean(" ".join(x for x in (r["title"], r["text"]) if x is not None))
      if r["timestamp"] < T1 and r["parent_asin"] in index and len(text) > 30:
        out.append((text, index[r["parent_asin"]]))
  return out


def _run(raw_dirs, out, fmt, *extra):
  rev, met = raw_dirs
  return prepare_blair.main(["--reviews", str(rev), "--meta", str(met), "--output", str(out),
                             "--format", fmt, "--sample-rate", "1.0", "--no-progress", *extra])


def _pairs(src):
  return [(src[i]["review"], src[i]["meta"]) for i in range(len(src))]


# ---------------------------------------------------------------------------
# prepare_blair
# ---------------------------------------------------------------------------
def test_text_building_matches_seed_rules():
  assert ar.clean_text(" a\tb\nc\r ") == "a b c"
  item = {"title": "T", "features": ["f1", "f2"], "description": ["d1", "d2"]}
  assert ar.meta_text(item) == "T f1 f2 d1 d2"
  assert ar.meta_text({"title": None, "features": [], "description": ["d"]}) == "d"
  assert ar.meta_text({"title": "", "features": ["f"], "description": []}) == "f"
  assert ar.review_text({"title": "Nice", "text": "it\tworks\n"}) == "Nice it works"
  assert ar.review_text({"title": None, "text": "only text"}) == "only text"


def test_prepare_tsv_exact_pairs_and_counts(raw_dirs, tmp_path):
  out = tmp_path / "pairs.tsv"
  result = _run(raw_dirs, out, "tsv")
  expected = _expected_pairs(["All_Beauty", "Appliances"])
  assert len(expected) == 5 and result["rows"] == 5
  assert out.read_text(encoding="utf-8").startswith("review\tmeta\n")
  src = PairsSource(out)
  assert _pairs(src) == expected
  assert src.stats["skipped"] == 0 and src.stats["header"]
  beauty, appl = result["categories"]["All_Beauty"], result["categories"]["Appliances"]
  assert beauty == {"meta_lines": 6, "meta_malformed": 2, "meta_short": 1, "meta_duplicate": 0, "items": 3,
                    "review_lines": 10, "review_not_sampled": 0, "review_malformed": 2,
                    "review_after_cutoff": 1, "review_no_meta": 3, "review_short": 1, "pairs": 3}
  assert appl == {"meta_lines": 3, "meta_malformed": 1, "meta_short": 0, "meta_duplicate": 0, "items": 2,
                  "review_lines": 5, "review_not_sampled": 0, "review_malformed": 1,
                  "review_after_cutoff": 1, "review_no_meta": 1, "review_short": 0, "pairs": 2}
  assert json.loads((tmp_path / "pairs.tsv.stats.json").read_text())["rows"] == 5
  with pytest.raises(FileExistsError):
    _run(raw_dirs, out, "tsv")
  assert _run(raw_dirs, out, "tsv", "--overwrite", "--categories", "Appliances")["rows"] == 2
  assert _pairs(PairsSource(out)) == _expected_pairs(["Appliances"])


def test_prepare_array_record_matches_tsv(raw_dirs, tmp_path):
  pytest.importorskip("tensorflow_datasets")
  _run(raw_dirs, tmp_path / "pairs.tsv", "tsv")
  result = _run(raw_dirs, tmp_path / "ar", "array_record", "--categories", "All_Beauty,Appliances")
  assert result["rows"] == 5
  tsv, arr = PairsSource(tmp_path / "pairs.tsv"), PairsSource(tmp_path / "ar")
  assert arr.format == "array_record" and len(arr) == 5
  assert _pairs(arr) == _pairs(tsv) == _expected_pairs(["All_Beauty", "Appliances"])
  assert arr[-1] == {**tsv[4], "index": 4}
  assert arr.__getitems__([3, 0]) == [tsv[3], tsv[0]]
  clone = pickle.loads(pickle.dumps(arr))
  assert _pairs(clone) == _pairs(arr)


def test_array_record_many_shards_keep_order_and_convert_tsv(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  rows = [(f"review number {i}", f'meta "{i % 7}"') for i in range(300)]
  assert prepare_blair.write_array_record(iter(rows), tmp_path / "ar", rows_per_shard=7) == 300
  src = PairsSource(tmp_path / "ar")
  assert _pairs(src) == rows
  assert len(list((tmp_path / "ar" / "blair_pairs" / "1.0.0").glob("*.array_record-*"))) == 43
  assert not list((tmp_path / "ar").glob(".*"))  # temporary TSV and download dir removed
  # --from-tsv: an existing TSV (bad rows skipped and counted) -> ArrayRecord
  tsv = tmp_path / "seed.tsv"
  tsv.write_text("review\tmeta\nfirst review\tfirst meta\nbroken row\nsecond review\tsecond meta\n")
  result = prepare_blair.main(["--from-tsv", str(tsv), "--format", "array_record",
                               "--output", str(tmp_path / "conv"), "--rows-per-shard", "1"])
  assert result["rows"] == 2 and result["tsv_stats"]["skip_reasons"] == {"columns": 1}
  assert _pairs(PairsSource(tmp_path / "conv")) == [("first review", "first meta"),
                                                    ("second review", "second meta")]


def test_prepare_sampling_is_seeded(raw_dirs, tmp_path):
  def run(name, seed):
    result = _run(raw_dirs, tmp_path / name, "tsv", "--sample-rate", "0.5", "--seed", str(seed))
    return _pairs(PairsSource(tmp_path / name)) if result["rows"] else []
  full = _expected_pairs(["All_Beauty", "Appliances"])
  a, b = run("a.tsv", 0), run("b.tsv", 0)
  assert a == b
  assert [p for p in full if p in a] == a  # a subsequence, order kept
  counts = [c["review_not_sampled"] for c in _run(raw_dirs, tmp_path / "c.tsv", "tsv", "--sample-rate",
                                                  "0.01")["categories"].values()]
  assert sum(counts) >= 12  # 15 review lines, p(kept) = 0.01 each


def test_prepare_input_errors(raw_dirs, tmp_path):
  rev, met = raw_dirs
  with pytest.raises(FileNotFoundError, match="Books"):
    _run(raw_dirs, tmp_path / "x.tsv", "tsv", "--categories", "Books")
  with pytest.raises(FileNotFoundError):
    prepare_blair.main(["--reviews", str(tmp_path / "nope"), "--meta", str(met),
                        "--output", str(tmp_path / "x.tsv")])
  (tmp_path / "cats.txt").write_text("Appliances\n")
  assert _run(raw_dirs, tmp_path / "z.tsv", "tsv", "--categories", str(tmp_path / "cats.txt"))["rows"] == 2
  result = prepare_blair.main(["--reviews", str(rev / "Appliances.jsonl.gz"),
                               "--meta", str(met / "meta_Appliances.jsonl.gz"), "--output", str(tmp_path / "y.tsv"), "--sample-rate", "1", "--no-progress"])
  assert result["rows"] == 2


# ---------------------------------------------------------------------------
# PairsSource / split_pairs
# ---------------------------------------------------------------------------
def test_pairs_tsv_malformed_rows_are_counted(tmp_path):
  p = tmp_path / "bad.tsv"
  lines = ["review\tmeta",
           "good review one\tmeta one",                    # 2
           "three\tcolumns\there",                         # 3: columns
           "only one column",                              # 4: columns
           "\tmeta without review",                        # 5: empty
           '"unterminated quote\tmeta',                    # 6: quoting
           '"He said ""wow"""\t"5"" screen, ""big"""',     # 7: valid pandas quoting
           "",                                             # 8: columns (blank)
           "good review two\tmeta two\r"]                  # 9: CRLF tolerated
  p.write_bytes(("\n".join(lines) + "\n").encode() + b"bad \xff utf8\tmeta\n")  # 10: encoding
  src = PairsSource(p)
  assert _pairs(src) == [("good review one", "meta one"), ('He said "wow"', '5" screen, "big"'),
                         ("good review two", "meta two")]
  assert src.stats["rows"] == 3 and src.stats["skipped"] == 6
  assert src.stats["skip_reasons"] == {"columns": 3, "empty": 1, "quoting": 1, "encoding": 1}
  assert src.stats["bad_lines"] == [3, 4, 5, 6, 8]
  assert src[1] == {"review": 'He said "wow"', "meta": '5" screen, "big"', "index": 1}
  assert src[-1]["index"] == 2
  with pytest.raises(IndexError):
    src[3]
  assert _pairs(pickle.loads(pickle.dumps(src))) == _pairs(src)


def test_pairs_tsv_quoting_round_trip(tmp_path):
  fields = [('a "quoted" word', "plain"), ('"', 'ends with "'), ("x", '""')]
  p = tmp_path / "q.tsv"
  p.write_text(ar.format_tsv_row("review", "meta") + "".join(ar.format_tsv_row(*f) for f in fields),
               encoding="utf-8")
  assert _pairs(PairsSource(p)) == fields
  with open(p, newline="", encoding="utf-8") as f:  # the stdlib csv reader (as pandas) agrees
    assert [tuple(r) for r in csv.reader(f, delimiter="\t")][1:] == fields


def test_pairs_headerless_missing_and_empty(tmp_path):
  p = tmp_path / "nohdr.tsv"
  p.write_text("first review\tfirst meta\nsecond review\tsecond meta\n")
  src = PairsSource(p)
  assert len(src) == 2 and src.stats["header"] is False and src[0]["review"] == "first review"
  with pytest.raises(FileNotFoundError, match="missing.tsv"):
    PairsSource(tmp_path / "missing.tsv")
  (tmp_path / "empty.tsv").write_text("review\tmeta\n")
  with pytest.raises(ValueError, match="No usable"):
    PairsSource(tmp_path / "empty.tsv")
  (tmp_path / "emptydir").mkdir()
  with pytest.raises(FileNotFoundError, match="no ArrayRecord dataset"):
    PairsSource(tmp_path / "emptydir")


def test_split_pairs_first_rows_validate():
  train, valid = split_pairs(1000)
  np.testing.assert_array_equal(valid, np.arange(10))
  np.testing.assert_array_equal(train, np.arange(10, 1000))
  assert [len(split_pairs(n)[1]) for n in (2, 50, 149, 150, 151)] == [1, 1, 1, 2, 2]
  train, valid = split_pairs(list(range(7)), valid_fraction=0.0)
  assert len(valid) == 0 and len(train) == 7
  assert len(split_pairs(10, valid_fraction=0.5)[1]) == 5
  with pytest.raises(ValueError):
    split_pairs(1)
  with pytest.raises(ValueError):
    split_pairs(10, valid_fraction=1.0)


# ---------------------------------------------------------------------------
# Amazon-C4
# ---------------------------------------------------------------------------
def test_load_amazon_c4(tmp_path):
  q = tmp_path / "test.csv"
  with open(q, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["qid", "query", "item_id", "user_id", "ori_rating", "ori_review"])
    w.writerow([0, "I want a kettle that heats fast, with a cool handle.", "K1", "U", 5.0, "Boils fast."])
    w.writerow([1, "Gloves for hiking\nand climbing", "G1", "U", 5.0, "Warm."])
    w.writerow(["x", "bad qid", "K1", "U", 5.0, "r"])
    w.writerow([2, "", "K1", "U", 5.0, "empty query"])
    w.writerow([3, "too few columns"])
    w.writerow([0, "duplicate qid", "K1", "U", 5.0, "r"])
    w.writerow([4, "an item that is not in the pool", "ZZ", "U", 4.0, "r"])
  pool = tmp_path / "pool.jsonl.gz"
  with gzip.open(pool, "wt", encoding="utf-8") as f:
    for rec in ({"item_id": "G1", "category": "Sports", "metadata": "Tactical gloves"}, "{broken",
                {"item_id": "K1", "category": "Kitchen", "metadata": "AcmeBrew kettle"},
                {"item_id": "K1", "category": "Kitchen", "metadata": "duplicate"},
                {"item_id": "N1", "category": "Care"}):
      f.write((rec if isinstance(rec, str) else json.dumps(rec)) + "\n")
  c4 = load_amazon_c4(q, pool)
  np.testing.assert_array_equal(c4.qids, [0, 1, 4])
  assert c4.queries[1] == "Gloves for hiking\nand climbing"
  assert c4.item_ids == ["K1", "G1", "ZZ"]
  assert c4.pool_ids == ["G1", "K1"] and c4.pool_texts == ["Tactical gloves", "AcmeBrew kettle"]
  assert c4.pool_categories == ["Sports", "Kitchen"]
  np.testing.assert_array_equal(c4.target_index, [1, 0, -1])
  assert c4.stats["queries"]["skipped"] == 4
  assert c4.stats["queries"]["skip_reasons"] == {"qid": 1, "empty": 1, "columns": 1, "duplicate_qid": 1}
  assert c4.stats["pool"]["skip_reasons"] == {"json": 1, "duplicate_item": 1, "fields": 1}
  assert c4.stats["targets_missing_from_pool"] == 1
  assert not any("ori_" in name for name in vars(c4))
  with pytest.raises(FileNotFoundError):
    load_amazon_c4(tmp_path / "nope.csv", pool)


# ---------------------------------------------------------------------------
# Bundled sample
# ---------------------------------------------------------------------------
def test_bundled_sample_tsv():
  assert SAMPLE_TSV.stat().st_size < 2 * 1024 * 1024
  src = PairsSource(SAMPLE_TSV)
  assert src.stats["skipped"] == 0 and src.stats["header"] and len(src) >= 3000
  metas = [src[i]["meta"] for i in range(len(src))]
  assert 400 <= len(set(metas)) <= 600
  _, valid = split_pairs(src)
  assert len({metas[i] for i in valid}) >= 0.8 * len(valid)  # rows are shuffled
  assert all(len(src[i]["review"]) > 30 and len(metas[i]) > 30 for i in range(0, len(src), 97))


def test_bundled_sample_is_reproducible():
  pairs = make_blair_sample.make_pairs(seed=0)
  src = PairsSource(SAMPLE_TSV)
  assert len(pairs) == len(src)
  assert [pairs[i] for i in (0, 1, 2, len(src) - 1)] == [(src[i]["review"], src[i]["meta"])
                                                         for i in (0, 1, 2, len(src) - 1)]


def _cli(*args, cwd=None):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  return subprocess.run([sys.executable, "-m", "mmret_jax.data.prepare_blair", *args], capture_output=True,
                        text=True, cwd=cwd)


def test_prepare_cli_errors_help_and_report(raw_dirs, tmp_path):
  """One-line errors with a non-zero status, defaults in --help, every count on screen."""
  rev, met = raw_dirs
  out = tmp_path / "pairs.tsv"
  r = _cli("--reviews", str(rev), "--meta", str(met), "--output", str(out), "--sample-rate", "0.5",
           "--no-progress")
  assert r.returncode == 0, r.stderr
  stats = json.loads((tmp_path / "pairs.tsv.stats.json").read_text())["categories"]
  total = {k: sum(c[k] for c in stats.values()) for k in prepare_blair.COUNT_KEYS}
  parts = ("review_not_sampled", "review_malformed", "review_after_cutoff", "review_no_meta", "review_short",
           "pairs")
  assert total["review_lines"] == sum(total[k] for k in parts) and total["review_not_sampled"] > 0
  lines = r.stdout.splitlines()
  assert "not_sampled" in lines[1] and "duplicate" in lines[1]
  totals_row = next(l for l in lines if l.startswith("TOTAL")).split()[1:]
  assert [int(x) for x in totals_row] == [total[k] for k in prepare_blair.REPORT_COLUMNS]
  assert (f"review_lines {total['review_lines']} = not_sampled {total['review_not_sampled']} "
          "(--sample-rate 0.5)") in r.stdout
  # the output exists / an input is missing: one line, status 1, no traceback
  r = _cli("--reviews", str(rev), "--meta", str(met), "--output", str(out), "--no-progress")
  assert r.returncode == 1 and r.stderr.strip().splitlines() == [
      f"error: {out} exists; remove it or pass --overwrite."]
  r = _cli("--reviews", str(tmp_path / "nope"), "--meta", str(met), "--output", str(tmp_path / "n.tsv"))
  assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
  assert r.stderr.startswith("error: ") and "nope" in r.stderr and "Traceback" not in r.stderr
  r = _cli("--reviews", str(rev), "--output", str(tmp_path / "n.tsv"))  # usage error: status 2
  assert r.returncode == 2 and r.stderr.startswith("error: --reviews and --meta are required")
  r = _cli("--help")
  assert r.returncode == 0
  help_text = " ".join(r.stdout.split())
  for shown in ("--sample-rate SAMPLE_RATE probability of keeping a review (seed: 1 in 10; 1 keeps all) "
                "(default: 0.1)", "(default: 1628643414042)", "(default: 30)", "about 1 review in 10"):
    assert shown in help_text


def test_prepare_array_record_prints_no_download_message(raw_dirs, tmp_path, capsys):
  pytest.importorskip("tensorflow_datasets")
  _run(raw_dirs, tmp_path / "ar", "array_record")
  out = capsys.readouterr()
  assert "ownload" not in out.out + out.err
  assert "Wrote 5 pairs" in out.out
