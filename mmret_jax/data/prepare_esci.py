"""The ESCI product-search benchmark for BLaIR (the seed's `product_search_results/dataset/process_esci.py`).

    python -m mmret_jax.data.prepare_esci --esci esci/test.parquet \\
        --asin2category asin2category.json --meta raw/meta_categories --output data/esci
    python -m mmret_jax.data.prepare_esci --esci shopping_queries_dataset_examples.parquet \\
        --asin2category asin2category.json --meta raw/meta_categories --output data/esci --n-neg 50 --seed 0

Inputs:
* `--esci`: the ESCI test rows as the HF dataset `tasksource/esci` gives them, or the original
  amazon-science `shopping_queries_dataset_examples.parquet` (its one-letter labels E/S/C/I are read as
  Exact/Substitute/Complement/Irrelevant). A `.parquet`, `.jsonl[.gz]` / `.json` (JSON lines) or
  `.csv[.gz]` file, or a directory of them (searched recursively; when some file names contain "test",
  only those are read). Needed columns: `query`, `product_id`, `product_locale`, `esci_label`,
  `small_version`; with a `split` column only rows with split == "test" are kept.
* `--asin2category`: the HF dataset `McAuley-Lab/Amazon-Reviews-2023`'s `asin2category.json`
  ({asin: category}); read as a stream.
* `--meta`: raw Amazon Reviews 2023 item metadata, a directory of `meta_{Category}.jsonl[.gz]` (or
  comma-separated files); a category name's spaces are underscores in the file name.

Rows are kept when all hold, checked in the seed's order and each counted: product_id in asin2category;
its category does not contain "Unknown"; product_locale == "us"; esci_label == "Exact";
small_version == 1. Each kept row is one query (qid = running index from 0, the query stripped, tabs ->
spaces) whose positive is its product; it adds that product and `--n-neg` items drawn uniformly without
replacement from all asins of the same category (in asin2category's order) to that category's
candidates. Then every category's meta file is streamed and each candidate written once, in file
order, as `{"item_id", "category", "metadata"}`; metadata = for `title` then `description` (when
present and not None) `clean_text(value) + " "`, tabs -> spaces (the seed's `clean_metadata`).

Outputs in `--output` (written to `incomplete.<name>` and renamed when complete):
* `test.csv`: header `qid,query,item_id`, csv-module quoting, `\\n` line ends;
* `sampled_item_metadata_esci.jsonl`: the item pool;
* `prepare_esci_stats.json`: every count of the summary table printed at the end.
Both load with `mmret_jax.data.sources.amazon_reviews.load_amazon_c4(test_csv, pool_jsonl)`.

Differences from the seed, on purpose:
* The pool key is `item_id`; the seed writes `item`, which its own readers (`eval_search.py`, `bm25.py`)
  do not read (they read `item_id`; the paper used a Google-Drive copy).
* Negatives come from `random.Random(--seed)`, one `sample(category_asins, n_neg)` per kept query in
  qid order (the seed calls the unseeded global `random.sample` the same way). A category with fewer
  than `--n-neg` asins gives all of them, without a draw (the seed raises), counted as
  `queries_small_category`.
* Items are written once, the first meta line of an asin winning (the seed writes every line of a
  candidate, so a repeated asin would repeat). Candidates with no meta line are counted, as are the
  queries whose positive is among them (those queries are still written, as the seed does).
* Rows that could not be processed at all (bad JSON, a missing field or a mistyped value such as a
  non-integer small_version, or a kept query that is empty after stripping) are skipped and counted,
  where the seed would crash or write a query no reader keeps. List items and scalars of other types in
  title / description are `str()`-ed (the seed would crash).
* Meta lines whose `parent_asin` (found by a quick byte search) is not a candidate are not parsed, so
  the malformed-line count covers candidate lines and lines without a recognisable parent_asin only.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import os
import pathlib
import random
import re
import sys
from typing import Any, Iterator, Mapping, Sequence

import tqdm

from mmret_jax import cli, storage
from mmret_jax.data.prepare_blair import find_files
from mmret_jax.data.sources.amazon_reviews import MAX_BAD_LINES, iter_wanted_meta, open_text

ESCI_COLUMNS = ("query", "product_id", "product_locale", "esci_label", "small_version")
ESCI_EXTENSIONS = (".parquet", ".jsonl", ".jsonl.gz", ".json", ".csv", ".csv.gz")
# The original esci-data release labels rows E/S/C/I; tasksource/esci spells them out.
LABEL_NAMES = {"E": "Exact", "S": "Substitute", "C": "Complement", "I": "Irrelevant"}
QUERIES_FILE = "test.csv"
POOL_FILE = "sampled_item_metadata_esci.jsonl"
STATS_FILE = "prepare_esci_stats.json"
META_FIELDS = ("title", "description")


# ---------------------------------------------------------------------------
# Text cleaning (the seed's clean_text / clean_metadata)
# ---------------------------------------------------------------------------
_DROP_CHARS = str.maketrans("", "", '"\n\r')


def clean_text(value: Any) -> str:
  """One metadata field as the seed cleans it.

  A list is joined with spaces, a dict `str()`-ed; then HTML entities are unescaped, every `"`, `\\n`,
  `\\r` deleted, and the end normalised to exactly one ".": trailing dots are removed and one appended.
  As in the seed, a text made only of dots keeps its first character (so "..." -> ".."), and "" -> ".".
  """
  if isinstance(value, list):
    text = " ".join(x if isinstance(x, str) else str(x) for x in value)
  elif isinstance(value, str):
    text = value
  else:
    text = str(value)
  text = html.unescape(text).translate(_DROP_CHARS)
  body = text.rstrip(".")
  if not body and text:
    body = text[0]
  return body + "."


def clean_metadata(item: Mapping[str, Any]) -> str:
  """The item text of the pool: `clean_text(v) + " "` for title then description (present, not None),
  then tabs -> spaces. Keeps the seed's trailing space; "" when the item has neither field."""
  parts = [clean_text(item[k]) + " " for k in META_FIELDS if item.get(k) is not None]
  return "".join(parts).replace("\t", " ")


def clean_query(query: str) -> str:
  return query.strip().replace("\t", " ")


# ---------------------------------------------------------------------------
# Counters
# ---------------------------------------------------------------------------
def new_counts() -> dict[str, Any]:
  """All counters of a run (see `SUMMARY` for their meaning)."""
  keys = [k for k, _ in SUMMARY]
  out: dict[str, Any] = dict.fromkeys(keys, 0)
  out["esci_skip_reasons"] = {}
  out["esci_bad_lines"] = []
  out["meta_bad_lines"] = []
  return out


def _skip(counts: dict[str, Any], prefix: str, why: str, where: str) -> None:
  counts[f"{prefix}_malformed"] += 1
  if prefix == "esci":
    reasons = counts["esci_skip_reasons"]
    reasons[why] = reasons.get(why, 0) + 1
  if len(counts[f"{prefix}_bad_lines"]) < MAX_BAD_LINES:
    counts[f"{prefix}_bad_lines"].append(where)


SUMMARY: tuple[tuple[str, str], ...] = (
    ("asin2category_entries", "asin2category entries"),
    ("asin2category_bad", "  skipped (category not a string)"),
    ("esci_files", "ESCI files read"),
    ("esci_rows", "ESCI rows read"),
    ("esci_not_test_split", "  split != test"),
    ("esci_malformed", "  malformed (skipped)"),
    ("esci_not_in_asin2category", "  product_id not in asin2category"),
    ("esci_unknown_category", "  category contains 'Unknown'"),
    ("esci_not_us", "  product_locale != us"),
    ("esci_not_exact", "  esci_label != Exact"),
    ("esci_not_small", "  small_version != 1"),
    ("esci_empty_query", "  empty query (skipped)"),
    ("queries", "queries written"),
    ("categories", "categories with candidates"),
    ("candidates", "candidate items"),
    ("queries_small_category", "queries whose category has < n_neg asins"),
    ("meta_lines", "meta lines read"),
    ("meta_malformed", "  malformed (skipped)"),
    ("meta_duplicate", "  repeated candidate asin (first kept)"),
    ("items", "items written"),
    ("items_empty_metadata", "  with no title / description"),
    ("candidates_without_meta", "candidates with no meta line"),
    ("queries_without_positive", "queries whose positive has no meta line"),
)


# ---------------------------------------------------------------------------
# asin2category.json (a flat {asin: category} object, ~48M entries: parsed as a stream)
# ---------------------------------------------------------------------------
_PAIR = re.compile(r'\s*"((?:[^"\\]|\\.)*)"\s*:\s*"((?:[^"\\]|\\.)*)"\s*([,}])', re.S)
_CHUNK = 1 << 22


def _unescape(s: str) -> str:
  return json.loads(f'"{s}"') if "\\" in s else s


def _stream_flat_object(f, bar) -> Iterator[tuple[str, str]]:
  """(key, value) pairs of a flat JSON object of strings; raises _NotFlat on anything else."""
  buf = f.read(_CHUNK)
  bar.update(len(buf.encode("utf-8", "surrogatepass")))
  buf = buf.lstrip()
  if not buf.startswith("{"):
    raise _NotFlat
  pos, eof, closed = 1, False, False
  if buf[1:].lstrip().startswith("}"):
    pos, closed = buf.index("}") + 1, True
  while not closed:
    m = _PAIR.match(buf, pos)
    if m is None:
      if eof or len(buf) - pos > _CHUNK:
        raise _NotFlat
      more = f.read(_CHUNK)
      bar.update(len(more.encode("utf-8", "surrogatepass")))
      eof = not more
      buf, pos = buf[pos:] + more, 0
      continue
    yield _unescape(m.group(1)), _unescape(m.group(2))
    pos = m.end()
    closed = m.group(3) == "}"
  rest = buf[pos:] + f.read()
  if rest.strip():
    raise _NotFlat


class _NotFlat(Exception):
  pass


def load_asin2category(path: str | os.PathLike, counts: dict[str, Any] | None = None,
                       progress: bool = True) -> dict[str, str]:
  """asin -> category from `asin2category.json` (`.gz` too). Entries whose category is not a string
  are skipped and counted (`asin2category_bad`); a file that is not a JSON object is an error."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"--asin2category file not found: {path}")
  counts = counts if counts is not None else new_counts()
  canon: dict[str, str] = {}  # one string object per category name (tens of millions of entries)
  out: dict[str, str] = {}
  try:
    with open_text(path, "rt") as f, tqdm.tqdm(desc=f"read {path.name}", unit="B", unit_scale=True,
                                               total=None if path.name.endswith(".gz") else path.stat().st_size,
                                               disable=not progress,
                                               mininterval=1.0) as bar:
      for asin, cat in _stream_flat_object(f, bar):
        out[asin] = canon.setdefault(cat, cat)
  except _NotFlat:  # not a plain {"asin": "category", ...} text: let json say what it is
    out.clear()
    try:
      with open_text(path, "rt") as f:
        data = json.load(f)
    except ValueError as e:
      raise ValueError(f"--asin2category {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
      raise ValueError(f"--asin2category {path}: expected a JSON object {{asin: category}}, "
                       f"got {type(data).__name__}")
    for asin, cat in data.items():
      if isinstance(cat, str):
        out[asin] = canon.setdefault(cat, cat)
      else:
        counts["asin2category_bad"] += 1
  except UnicodeDecodeError as e:
    raise ValueError(f"--asin2category {path}: not utf-8 text ({e})") from None
  counts["asin2category_entries"] = len(out)
  if not out:
    raise ValueError(f"--asin2category {path}: no (asin, category) entries")
  return out


# ---------------------------------------------------------------------------
# ESCI rows
# ---------------------------------------------------------------------------
def _esci_kind(path: pathlib.Path) -> str | None:
  name = path.name.lower()
  for ext in ESCI_EXTENSIONS:
    if name.endswith(ext):
      return ext.split(".")[1]
  return None


def find_esci_files(spec: str | os.PathLike) -> list[pathlib.Path]:
  """The ESCI files of `--esci`: the file itself, or a directory's supported files (recursively;
  when some file names contain "test", only those)."""
  p = pathlib.Path(spec)
  if p.is_file():
    if _esci_kind(p) is None:
      raise ValueError(f"--esci {p}: unsupported file type (expected one of {', '.join(ESCI_EXTENSIONS)})")
    return [p]
  if not p.is_dir():
    raise FileNotFoundError(f"--esci file or directory not found: {p}")
  files = sorted(x for x in p.rglob("*") if x.is_file() and _esci_kind(x) is not None)
  tests = [x for x in files if "test" in x.name.lower()]
  files = tests or files
  if not files:
    raise FileNotFoundError(f"--esci {p}: no {', '.join(ESCI_EXTENSIONS)} files in the directory")
  return files


def _check_columns(path: pathlib.Path, columns: Sequence[str]) -> None:
  missing = [c for c in ESCI_COLUMNS if c not in columns]
  if missing:
    raise ValueError(f"--esci {path}: missing columns {missing} (has {list(columns)}); "
                     f"need {list(ESCI_COLUMNS)}")


def _parquet_rows(path: pathlib.Path, bar) -> Iterator[tuple[str, dict[str, Any]]]:
  try:
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError(f"--esci {path}: reading parquet needs pyarrow (pip install 'pyarrow>=14'), "
                      "or pass the rows as .jsonl / .csv") from None
  try:
    pf = pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises its own ArrowInvalid  # pylint: disable=broad-except
    raise ValueError(f"--esci {path}: not a readable parquet file ({e})") from None
  names = pf.schema_arrow.names
  _check_columns(path, names)
  cols = list(ESCI_COLUMNS) + (["split"] if "split" in names else [])
  row = 0
  for batch in pf.iter_batches(batch_size=65536, columns=cols):
    data = batch.to_pydict()
    for k in range(batch.num_rows):
      row += 1
      yield f"{path.name}:row {row}", {c: data[c][k] for c in cols}
    bar.update(batch.num_rows)


def _jsonl_rows(path: pathlib.Path, bar, counts) -> Iterator[tuple[str, dict[str, Any]]]:
  checked = False
  with open_text(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      bar.update(1)
      if not raw.strip():
        continue
      where = f"{path.name}:{lineno}"
      try:
        rec = json.loads(raw)
      except ValueError:
        counts["esci_rows"] += 1
        _skip(counts, "esci", "json", where)
        continue
      if not isinstance(rec, dict):
        counts["esci_rows"] += 1
        _skip(counts, "esci", "not_an_object", where)
        continue
      if not checked:  # the first record names the columns; a later one lacking a field is skipped
        _check_columns(path, list(rec))
        checked = True
      yield where, rec


def _csv_rows(path: pathlib.Path, bar, counts) -> Iterator[tuple[str, dict[str, Any]]]:
  with open_text(path, "rt", newline="") as f:
    reader = csv.reader(f)
    header = next(reader, None) or []
    _check_columns(path, header)
    while True:
      try:
        fields = next(reader)
      except StopIteration:
        break
      except csv.Error:
        counts["esci_rows"] += 1
        _skip(counts, "esci", "csv", f"{path.name}:{reader.line_num}")
        continue
      bar.update(1)
      if not fields:
        continue
      if len(fields) != len(header):
        counts["esci_rows"] += 1
        _skip(counts, "esci", "columns", f"{path.name}:{reader.line_num}")
        continue
      yield f"{path.name}:{reader.line_num}", dict(zip(header, fields))


def _as_flag(v: Any) -> int | None:
  """small_version as an int (1/0; "1", 1.0 and True read as 1), None when not a number."""
  if isinstance(v, (bool, int)):
    return int(v)
  try:
    x = float(v.strip() if isinstance(v, str) else v)
  except (TypeError, ValueError):
    return None
  return int(x) if x.is_integer() else None


def iter_esci_queries(files: Sequence[pathlib.Path], asin2category: Mapping[str, str],
                      counts: dict[str, Any], progress: bool = True) -> Iterator[tuple[str, str, str]]:
  """(query, product_id, category) for the ESCI rows that pass the seed's filters, in file order."""
  for path in files:
    kind = _esci_kind(path)
    counts["esci_files"] += 1
    with tqdm.tqdm(desc=f"esci {path.name}", unit=" rows", unit_scale=True, disable=not progress,
                   mininterval=1.0) as bar:
      if kind == "parquet":
        rows = _parquet_rows(path, bar)
      elif kind in ("jsonl", "json"):
        rows = _jsonl_rows(path, bar, counts)
      else:
        rows = _csv_rows(path, bar, counts)
      for where, rec in rows:
        counts["esci_rows"] += 1
        if "split" in rec and rec["split"] != "test":
          counts["esci_not_test_split"] += 1
          continue
        missing = [c for c in ESCI_COLUMNS if c not in rec]
        if missing:
          _skip(counts, "esci", "missing_field", where)
          continue
        item = rec["product_id"]
        if not isinstance(item, str) or not item:
          _skip(counts, "esci", "product_id", where)
          continue
        cat = asin2category.get(item)
        if cat is None:
          counts["esci_not_in_asin2category"] += 1
          continue
        if "Unknown" in cat:
          counts["esci_unknown_category"] += 1
          continue
        if rec["product_locale"] != "us":
          counts["esci_not_us"] += 1
          continue
        label = rec["esci_label"]
        if LABEL_NAMES.get(label, label) != "Exact":
          counts["esci_not_exact"] += 1
          continue
        small = _as_flag(rec["small_version"])
        if small is None:
          _skip(counts, "esci", "small_version", where)
          continue
        if small != 1:
          counts["esci_not_small"] += 1
          continue
        query = rec["query"]
        if not isinstance(query, str):
          _skip(counts, "esci", "query", where)
          continue
        query = clean_query(query)
        if not query:
          counts["esci_empty_query"] += 1
          continue
        yield query, item, cat


def sample_candidates(queries: Sequence[tuple[str, str, str]], asin2category: Mapping[str, str], n_neg: int,
                      seed: int, counts: dict[str, Any], progress: bool = True) -> dict[str, set[str]]:
  """category -> candidate asins (positives + `n_neg` same-category draws per query, in qid order),
  categories in order of first use."""
  needed = dict.fromkeys(cat for _, _, cat in queries)
  by_cat: dict[str, list[str]] = {c: [] for c in needed}
  for asin, cat in tqdm.tqdm(asin2category.items(), desc="group asins", unit=" asins", unit_scale=True,
                             disable=not progress, mininterval=1.0):
    lst = by_cat.get(cat)
    if lst is not None:
      lst.append(asin)
  rng = random.Random(seed)
  cands: dict[str, set[str]] = {c: set() for c in needed}
  for _, item, cat in tqdm.tqdm(queries, desc="sample negatives", unit=" queries", disable=not progress,
                                mininterval=1.0):
    pool = by_cat[cat]
    cands[cat].add(item)
    if len(pool) < n_neg:
      counts["queries_small_category"] += 1
      cands[cat].update(pool)
    else:
      cands[cat].update(rng.sample(pool, n_neg))
  counts["categories"] = len(cands)
  counts["candidates"] = len(set().union(*cands.values())) if cands else 0
  return cands


# ---------------------------------------------------------------------------
# Item metadata
# ---------------------------------------------------------------------------
def iter_category_items(category: str, path: pathlib.Path, wanted: set[str], counts: dict[str, Any],
                        progress: bool = True) -> Iterator[dict[str, str]]:
  """`{"item_id", "category", "metadata"}` for the first meta line of each asin in `wanted`."""
  seen: set[str] = set()
  for lineno, rec, _ in iter_wanted_meta(path, wanted, counts, progress):
    if rec is None:
      _skip(counts, "meta", "", f"{path.name}:{lineno}")
      continue
    asin = rec["parent_asin"]
    if asin not in wanted:
      continue
    if asin in seen:
      counts["meta_duplicate"] += 1
      continue
    seen.add(asin)
    text = clean_metadata(rec)
    counts["items_empty_metadata"] += not text.strip()
    yield {"item_id": asin, "category": category, "metadata": text}


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = cli.ArgumentParser(prog="python -m mmret_jax.data.prepare_esci", description=__doc__)
  p.add_argument("--esci", required=True, help="ESCI test rows: a .parquet / .jsonl[.gz] / .csv file or a dir")
  p.add_argument("--asin2category", required=True, help="asin2category.json of McAuley-Lab/Amazon-Reviews-2023")
  p.add_argument("--meta", required=True, help="dir with meta_<Category>.jsonl[.gz], or comma-separated files")
  p.add_argument("--output", required=True, help="output directory (test.csv, sampled_item_metadata_esci.jsonl)")
  p.add_argument("--n-neg", type=int, default=50, help="same-category negatives drawn per query")
  p.add_argument("--seed", type=int, default=0, help="seed of the negative draws")
  p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  args = p.parse_args(argv)
  if args.n_neg < 0:
    p.error(f"--n-neg must be >= 0, got {args.n_neg}")
  return args


def _write_lines(path: pathlib.Path, lines: Iterator[str]) -> int:
  """Writes `lines` to `path`; returns the count."""
  n = 0
  with open(path, "w", encoding="utf-8", newline="") as f:
    for line in lines:
      f.write(line)
      n += 1
  return n


def _csv_lines(queries: Sequence[tuple[str, str, str]]) -> Iterator[str]:
  class _Line:
    def write(self, s):
      self.s = s

  sink = _Line()
  w = csv.writer(sink, lineterminator="\n")
  for row in [("qid", "query", "item_id")] + [(qid, q, item) for qid, (q, item, _) in enumerate(queries)]:
    w.writerow(row)
    yield sink.s


def report(counts: Mapping[str, Any], file=None) -> None:
  """Prints the summary table (to stdout by default)."""
  file = file or sys.stdout
  width = max(len(label) for _, label in SUMMARY)
  for key, label in SUMMARY:
    print(f"{label:<{width}}  {counts[key]:>12,}", file=file)
  if counts["esci_skip_reasons"]:
    print(f"ESCI rows skipped as malformed: {counts['esci_skip_reasons']} (first at {counts['esci_bad_lines']})",
          file=file)
  if counts["meta_malformed"]:
    print(f"meta lines skipped as malformed: first at {counts['meta_bad_lines']}", file=file)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the CLI; returns the counts (also in `<output>/prepare_esci_stats.json`) plus `output`."""
  args = parse_args(argv)
  progress = not args.no_progress
  out = pathlib.Path(args.output)
  if out.exists() and not out.is_dir():
    raise NotADirectoryError(f"--output {out} exists and is not a directory")
  targets = [out / QUERIES_FILE, out / POOL_FILE]
  existing = [str(t) for t in targets if t.exists()]
  if existing and not args.overwrite:
    raise FileExistsError(f"{', '.join(existing)} exist; remove them or pass --overwrite.")
  esci_files = find_esci_files(args.esci)
  meta_files = find_files(args.meta, meta=True)
  counts = new_counts()
  asin2category = load_asin2category(args.asin2category, counts, progress)

  queries = list(iter_esci_queries(esci_files, asin2category, counts, progress))
  counts["queries"] = len(queries)
  if not queries:
    raise ValueError(f"No ESCI row of {args.esci} passed the filters: {_brief(counts)}")
  missing = sorted({cat for _, _, cat in queries if cat.replace(" ", "_") not in meta_files})
  if missing:
    raise FileNotFoundError(f"--meta {args.meta}: no meta_<Category>.jsonl[.gz] for categories "
                            f"{[c.replace(' ', '_') for c in missing]}")
  cands = sample_candidates(queries, asin2category, args.n_neg, args.seed, counts, progress)
  del asin2category

  out.mkdir(parents=True, exist_ok=True)
  found: set[str] = set()

  def pool_lines() -> Iterator[str]:
    for cat, wanted in cands.items():
      for rec in iter_category_items(cat, meta_files[cat.replace(" ", "_")], wanted, counts, progress):
        found.add(rec["item_id"])
        yield json.dumps(rec) + "\n"

  with storage.replaced_together(targets) as twins:  # both files complete, or neither replaced
    _write_lines(twins[targets[0]], _csv_lines(queries))
    counts["items"] = _write_lines(twins[targets[1]], pool_lines())
  counts["candidates_without_meta"] = sum(len(w - found) for w in cands.values())
  counts["queries_without_positive"] = sum(item not in found for _, item, _ in queries)
  result = {**counts, "output": str(out), "n_neg": args.n_neg, "seed": args.seed,
            "esci": [str(p) for p in esci_files]}
  (out / STATS_FILE).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
  report(counts)
  print(f"Wrote {counts['queries']} queries to {out / QUERIES_FILE} and {counts['items']} items to "
        f"{out / POOL_FILE}; counts in {out / STATS_FILE}")
  return result


def _brief(counts: Mapping[str, Any]) -> dict[str, int]:
  return {k: counts[k] for k, _ in SUMMARY if k.startswith("esci") and counts[k]}


def cli_main(argv: Sequence[str] | None = None) -> int:
  """`python -m mmret_jax.data.prepare_esci`: `main` with one-line errors and an exit status."""
  return cli.run(lambda: (main(argv), 0)[1])


if __name__ == "__main__":
  sys.exit(cli_main())
