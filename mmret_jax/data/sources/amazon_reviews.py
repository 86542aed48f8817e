"""Amazon Reviews 2023 data for BLaIR (Hou et al. 2024, arXiv 2403.03952).

* Text building exactly as the seed's `blair/sample_pretraining_data.py`
  (`meta_text`, `review_text`, `clean_text`).
* `PairsSource`: (review, meta) pretraining pairs as a grain random-access
  source, over the seed's `clean_review_meta.tsv` layout or an ArrayRecord
  dataset written by `python -m mmret_jax.data.prepare_blair`.
* `split_pairs`: the seed's validation split (the first 1% of rows).
* `load_amazon_c4`: the Amazon-C4 product-search benchmark (queries + item pool).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gzip
import itertools
import json
import logging
import operator
import os
import pathlib
import re
from typing import Any, Iterable, Iterator, Mapping, Sized

import numpy as np

PAIRS_COLUMNS = ("review", "meta")
MAX_BAD_LINES = 5  # line numbers kept in `.stats["bad_lines"]`


# ---------------------------------------------------------------------------
# Text building (seed: concat_item_metadata / concat_review)
# ---------------------------------------------------------------------------
def clean_text(s: str) -> str:
  """Seed cleaning: `\\t` and `\\n` -> space, delete `\\r`, strip."""
  return s.replace("\t", " ").replace("\n", " ").replace("\r", "").strip()


def _join_list(v: Any) -> str:
  if isinstance(v, str):
    return v
  return " ".join(str(x) for x in v if x is not None)


def meta_text(item: Mapping[str, Any]) -> str:
  """Item metadata text: title, features, description joined by single spaces, then cleaned.

  A part is skipped when the title is None or the list is empty (the seed's rule;
  leading/trailing blanks from an empty title vanish in the final strip).

  Args:
    item: a raw `meta_{Category}.jsonl` record (`title`, `features`, `description`).

  Returns:
    The cleaned text (may be empty).
  """
  parts = []
  title = item.get("title")
  if title is not None:
    parts.append(str(title))
  for key in ("features", "description"):
    v = item.get(key)
    if v:  # None / [] / "" -> skipped
      parts.append(_join_list(v))
  return clean_text(" ".join(parts))


def review_text(review: Mapping[str, Any]) -> str:
  """Review text: `title + " " + text` (None parts skipped), cleaned."""
  parts = [str(review[k]) for k in ("title", "text") if review.get(k) is not None]
  return clean_text(" ".join(parts))


# ---------------------------------------------------------------------------
# TSV rows (pandas `to_csv(sep="\t")` quoting, as the seed writes them)
# ---------------------------------------------------------------------------
def _quote(field: str) -> str:
  if any(c in field for c in '"\t\n\r'):
    return '"' + field.replace('"', '""') + '"'
  return field


def format_tsv_row(*fields: str) -> str:
  """One TSV line (with `\\n`), quoting like pandas `QUOTE_MINIMAL` (fields with `"` are quoted)."""
  return "\t".join(_quote(f) for f in fields) + "\n"


def parse_tsv_line(line: str) -> list[str] | None:
  """Splits one TSV line (no line end) into fields; undoes pandas quoting. None if badly quoted."""
  if '"' not in line:
    return line.split("\t")
  fields, i, n = [], 0, len(line)
  while True:
    if i < n and line[i] == '"':  # quoted field: ends at a lone quote followed by tab / end
      buf, i = [], i + 1
      while True:
        j = line.find('"', i)
        if j < 0:
          return None
        buf.append(line[i:j])
        if j + 1 < n and line[j + 1] == '"':
          buf.append('"')
          i = j + 2
          continue
        i = j + 1
        break
      if i < n and line[i] != "\t":
        return None
      fields.append("".join(buf))
    else:
      j = line.find("\t", i)
      j = n if j < 0 else j
      fields.append(line[i:j])
      i = j
    if i >= n:
      return fields
    i += 1  # skip the tab
    if i == n:
      fields.append("")
      return fields


def open_text(path: str | os.PathLike, mode: str = "rt", newline: str | None = None):
  """Opens a plain or `.gz` file (utf-8 in text mode)."""
  path = os.fspath(path)
  kw = {} if "b" in mode else {"encoding": "utf-8", "newline": newline}
  if path.endswith(".gz"):
    return gzip.open(path, mode, **kw)
  return open(path, mode, **kw)  # pylint: disable=unspecified-encoding


def _missing(path: pathlib.Path, what: str) -> FileNotFoundError:
  return FileNotFoundError(f"{what} not found: {path} (cwd {os.getcwd()})")


# ---------------------------------------------------------------------------
# PairsSource
# ---------------------------------------------------------------------------
def new_skip_stats() -> dict[str, Any]:
  """Counters for a reader that skips bad rows: `rows`, `skipped`, `skip_reasons`, `bad_lines`."""
  return {"rows": 0, "skipped": 0, "skip_reasons": {}, "bad_lines": []}


def note_skip(stats: dict[str, Any], why: str, lineno: int) -> None:
  """Counts one skipped row (keeps the first `MAX_BAD_LINES` line numbers)."""
  stats["skipped"] += 1
  stats["skip_reasons"][why] = stats["skip_reasons"].get(why, 0) + 1
  if len(stats["bad_lines"]) < MAX_BAD_LINES:
    stats["bad_lines"].append(lineno)


def tsv_header_columns(raw: bytes) -> tuple[tuple[int, int], int] | None:
  """((review_col, meta_col), n_columns) if `raw` is a header line naming both columns, else None."""
  try:
    fields = parse_tsv_line(raw.decode("utf-8").rstrip("\n").rstrip("\r"))
  except UnicodeDecodeError:
    return None
  if fields is None or not all(c in fields for c in PAIRS_COLUMNS):
    return None
  return (fields.index(PAIRS_COLUMNS[0]), fields.index(PAIRS_COLUMNS[1])), len(fields)


def pair_from_tsv_line(raw: bytes, cols: tuple[int, int] = (0, 1), ncols: int = 2) -> tuple[str, str] | str:
  """(review, meta) from one raw TSV line, or the reason it is malformed.

  Reasons: `encoding` (not utf-8), `quoting`, `columns` (count differs from the header's), `empty`.
  """
  try:
    line = raw.decode("utf-8").rstrip("\n").rstrip("\r")
  except UnicodeDecodeError:
    return "encoding"
  fields = parse_tsv_line(line)
  if fields is None:
    return "quoting"
  if len(fields) != ncols:
    return "columns"
  review, meta = fields[cols[0]], fields[cols[1]]
  if not (review.strip() and meta.strip()):
    return "empty"
  return review, meta


@contextlib.contextmanager
def read_pairs_tsv(path: str | os.PathLike, stats: dict[str, Any]) -> Iterator[Iterator[tuple[int, str, str]]]:
  """Opens a pairs TSV; yields an iterator of (line_number, review, meta) over its good rows.

  Bad rows are skipped and counted into `stats` (see `new_skip_stats`); `stats["header"]`
  says whether the first line was a header (a headerless file is read as `review, meta` data).
  """
  with open_text(path, "rb") as f:
    lines: Iterator[tuple[int, bytes]] = enumerate(f, start=1)
    first = next(lines, None)
    hdr = tsv_header_columns(first[1]) if first else None
    stats["header"] = hdr is not None
    cols, ncols = hdr or ((0, 1), 2)
    if hdr is None and first is not None:
      logging.warning("%s: first line is not a `review\\tmeta` header; reading it as data.", path)
      lines = itertools.chain([first], lines)

    def good_rows():
      for lineno, raw in lines:
        pair = pair_from_tsv_line(raw, cols, ncols)
        if isinstance(pair, str):
          note_skip(stats, pair, lineno)
          continue
        stats["rows"] += 1
        yield lineno, pair[0], pair[1]

    yield good_rows()


def _load_pairs_tsv(path: pathlib.Path) -> tuple[bytes, np.ndarray, dict[str, Any]]:
  """A pairs TSV as one utf-8 buffer + offsets [2N + 1] (review k, meta k = chunks 2k, 2k + 1)."""
  chunks: list[bytes] = []
  offsets = [0]
  pos = 0
  stats = {"format": "tsv", **new_skip_stats()}
  with read_pairs_tsv(path, stats) as rows:
    for _, review, meta in rows:
      for text in (review, meta):
        b = text.encode("utf-8")
        chunks.append(b)
        pos += len(b)
        offsets.append(pos)
  if stats["skipped"]:
    logging.warning("%s: skipped %d malformed rows %s (first at lines %s).", path, stats["skipped"],
                    stats["skip_reasons"], stats["bad_lines"])
  return b"".join(chunks), np.asarray(offsets, np.int64), stats


def find_dataset_dir(path: pathlib.Path) -> pathlib.Path:
  """The tfds dataset dir (holding `dataset_info.json`) at `path` or `path/<name>/<version>/`."""
  if (path / "dataset_info.json").is_file():
    return path
  found = sorted(p.parent for p in path.glob("*/*/dataset_info.json"))
  if not found:
    raise FileNotFoundError(
        f"{path} is a directory but holds no ArrayRecord dataset (no dataset_info.json there or in "
        "<name>/<version>/); write one with `python -m mmret_jax.data.prepare_blair --format array_record`.")
  if len(found) > 1:
    raise ValueError(f"{path} holds several datasets {[str(p) for p in found]}; pass one of them.")
  return found[0]


class PairsSource:
  """BLaIR (review, meta) pairs as a grain random-access source.

  `source[i] -> {"review": str, "meta": str, "index": i}`. Reads either

  * a TSV with header `review\\tmeta` (the seed's `clean_review_meta.tsv`; `.tsv.gz`
    too), loaded into memory as one utf-8 buffer; malformed rows (wrong column count,
    bad quoting or utf-8, an empty field) are skipped and counted in `.stats`. A file
    without the header is read as headerless data (`.stats["header"]` is False); or
  * a directory with an ArrayRecord dataset written by `prepare_blair`
    (random access from disk via `tfds`, nothing loaded up front; rows were
    validated when written).

  Picklable (grain workers): the ArrayRecord reader is reopened lazily per process.

  Attributes:
    path: the path given.
    format: "tsv" or "array_record".
    stats: `rows`, `skipped`, `bad_lines` (first few 1-based line numbers), `skip_reasons`, ...
  """

  def __init__(self, path: str | os.PathLike, split: str = "train"):
    self.path = pathlib.Path(path)
    if not self.path.exists():
      raise _missing(self.path, "BLaIR pairs (review\\tmeta TSV or prepare_blair ArrayRecord dir)")
    self._reader = None
    if self.path.is_dir():
      self.format = "array_record"
      self._dataset_dir = find_dataset_dir(self.path)
      self._split = split
      self._len = len(self._source())
      self._buf, self._offsets = b"", np.zeros(1, np.int64)
      self.stats = {"format": self.format, **new_skip_stats(), "rows": self._len,
                    "dataset_dir": str(self._dataset_dir)}
    else:
      self.format = "tsv"
      self._buf, self._offsets, self.stats = _load_pairs_tsv(self.path)
      self._len = self.stats["rows"]
    if self._len == 0:
      raise ValueError(f"No usable (review, meta) rows in {self.path} (stats: {self.stats}).")

  def _source(self):
    if self._reader is None:
      import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
      self._reader = tfds.builder_from_directory(self._dataset_dir).as_data_source(split=self._split)
    return self._reader

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_reader"] = None
    return state

  def __len__(self) -> int:
    return self._len

  def _text(self, k: int) -> str:
    return self._buf[self._offsets[k]:self._offsets[k + 1]].decode("utf-8")

  def _check(self, i) -> int:
    i = operator.index(i)
    if i < 0:
      i += self._len
    if not 0 <= i < self._len:
      raise IndexError(f"index {i} out of range for {self._len} pairs")
    return i

  def __getitem__(self, i) -> dict[str, Any]:
    i = self._check(i)
    if self.format == "tsv":
      return {"review": self._text(2 * i), "meta": self._text(2 * i + 1), "index": i}
    rec = self._source()[i]
    return {"review": _as_str(rec["review"]), "meta": _as_str(rec["meta"]), "index": i}

  def __getitems__(self, indices: Iterable[int]) -> list[dict[str, Any]]:
    indices = [self._check(i) for i in indices]
    if self.format == "tsv":
      return [self[i] for i in indices]
    recs = self._source().__getitems__(indices)
    return [{"review": _as_str(r["review"]), "meta": _as_str(r["meta"]), "index": i}
            for i, r in zip(indices, recs)]

  def __repr__(self) -> str:
    return f"PairsSource({str(self.path)!r}, format={self.format!r}, rows={self._len})"


def _as_str(v: Any) -> str:
  return v.decode("utf-8") if isinstance(v, (bytes, np.bytes_)) else str(v)


def split_pairs(source: Sized | int, valid_fraction: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
  """The seed's split: the FIRST `valid_fraction` of rows validate, the rest train.

  As HF `train[:1%]` / `train[1%:]`: `n_valid = round(n * fraction)`, but at least 1
  (and at most n - 1) when `valid_fraction > 0`.

  Args:
    source: anything with `len()` (e.g. a `PairsSource`), or the row count.
    valid_fraction: in [0, 1).

  Returns:
    (train_indices, valid_indices), int64 arrays.
  """
  n = source if isinstance(source, (int, np.integer)) else len(source)
  if not 0.0 <= valid_fraction < 1.0:
    raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
  n_valid = 0
  if valid_fraction > 0:
    if n < 2:
      raise ValueError(f"Need at least 2 rows for a train/valid split, got {n}.")
    n_valid = min(max(1, int(round(n * valid_fraction))), n - 1)
  idx = np.arange(n, dtype=np.int64)
  return idx[n_valid:], idx[:n_valid]


_PARENT_ASIN = re.compile(rb'"parent_asin"\s*:\s*"([^"\\]*)"')


def iter_wanted_meta(path: pathlib.Path, wanted: set[str] | frozenset[str], counts: dict[str, Any],
                     progress: bool = True) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
  """The lines of a raw `meta_{Category}.jsonl[.gz]` that may hold an item of `wanted`: (line number, the parsed
  record or None, why it is None). A line whose `parent_asin` (found by a byte search, no JSON parse) is not
  wanted is passed over unparsed, so a large meta file streams fast; a line that is not a JSON object with a
  non-empty string `parent_asin` comes as (lineno, None, reason). Counts every non-empty line in
  `counts["meta_lines"]`; a progress bar counts lines."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  with open_text(path, "rb") as f, tqdm(desc=f"meta {path.name}", unit=" lines", unit_scale=True,
                                        disable=not progress, mininterval=1.0) as bar:
    lineno = 0
    for lineno, raw in enumerate(f, start=1):
      if lineno % 10_000 == 0:
        bar.update(10_000)
      if not raw.strip():
        continue
      counts["meta_lines"] = counts.get("meta_lines", 0) + 1
      m = _PARENT_ASIN.search(raw)
      if m is not None and m.group(1).decode("utf-8", "replace") not in wanted:
        continue
      try:
        rec = json.loads(raw)
      except ValueError:
        yield lineno, None, "bad JSON"
        continue
      if not isinstance(rec, dict):
        yield lineno, None, "not a JSON object"
      elif "parent_asin" not in rec:
        yield lineno, None, "no parent_asin"
      elif not isinstance(rec["parent_asin"], str) or not rec["parent_asin"]:
        yield lineno, None, "parent_asin is not a non-empty string"
      else:
        yield lineno, rec, ""
    bar.update(lineno % 10_000)


# ---------------------------------------------------------------------------
# Amazon-C4
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class AmazonC4:
  """Amazon-C4 queries and item pool (`ori_rating` / `ori_review` are never read).

  Attributes:
    qids: [Q] int64 query ids.
    queries: [Q] query texts.
    item_ids: [Q] ground-truth item id per query.
    target_index: [Q] int64 index of the ground-truth item in the pool, -1 if absent.
    pool_ids: [P] item ids.
    pool_texts: [P] item `metadata` texts.
    pool_categories: [P] short category labels ("" when missing).
    stats: counts of rows read / skipped per file.
  """
  qids: np.ndarray
  queries: list[str]
  item_ids: list[str]
  target_index: np.ndarray
  pool_ids: list[str]
  pool_texts: list[str]
  pool_categories: list[str]
  stats: dict[str, Any]


def _read_c4_queries(path: pathlib.Path):
  stats = new_skip_stats()
  qids, queries, item_ids, seen = [], [], [], set()
  with open_text(path, "rt", newline="") as f:
    reader = csv.reader(f)
    try:
      header = next(reader)
    except StopIteration:
      header = []
    need = ("qid", "query", "item_id")
    if not all(c in header for c in need):
      raise ValueError(f"{path}: header {header} lacks one of {need} (Amazon-C4 test.csv layout).")
    col = {c: header.index(c) for c in need}
    while True:
      try:
        row = next(reader)
      except StopIteration:
        break
      except csv.Error:
        note_skip(stats, "csv", reader.line_num)
        continue
      if not row:
        continue
      if len(row) != len(header):
        note_skip(stats, "columns", reader.line_num)
        continue
      try:
        qid = int(row[col["qid"]])
      except ValueError:
        note_skip(stats, "qid", reader.line_num)
        continue
      query, item = row[col["query"]].strip(), row[col["item_id"]].strip()
      if not query or not item:
        note_skip(stats, "empty", reader.line_num)
        continue
      if qid in seen:
        note_skip(stats, "duplicate_qid", reader.line_num)
        continue
      seen.add(qid)
      qids.append(qid)
      queries.append(query)
      item_ids.append(item)
  stats["rows"] = len(qids)
  return np.asarray(qids, np.int64), queries, item_ids, stats


def _read_c4_pool(path: pathlib.Path):
  stats = new_skip_stats()
  ids, texts, cats, seen = [], [], [], set()
  with open_text(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      try:
        rec = json.loads(raw)
      except ValueError:
        note_skip(stats, "json", lineno)
        continue
      # `item`: the key the seed's ESCI script (process_esci.py) writes; its readers and Amazon-C4 use `item_id`
      item = rec.get("item_id", rec.get("item")) if isinstance(rec, dict) else None
      text = rec.get("metadata") if isinstance(rec, dict) else None
      if not isinstance(item, str) or not isinstance(text, str) or not item or not text.strip():
        note_skip(stats, "fields", lineno)
        continue
      if item in seen:
        note_skip(stats, "duplicate_item", lineno)
        continue
      seen.add(item)
      ids.append(item)
      texts.append(text)
      cat = rec.get("category")
      cats.append(cat if isinstance(cat, str) else "")
  stats["rows"] = len(ids)
  return ids, texts, cats, stats


def load_amazon_c4(queries_csv: str | os.PathLike, pool_jsonl: str | os.PathLike) -> AmazonC4:
  """Loads Amazon-C4 (`test.csv` + `sampled_item_metadata_1M.jsonl`; `.gz` accepted).

  Malformed rows (bad CSV/JSON, wrong column count, non-integer qid, empty text,
  duplicate qid or item id) are skipped and counted in `.stats`. Queries whose
  item is not in the pool are kept (`target_index` = -1) and counted.

  Args:
    queries_csv: CSV with header `qid,query,item_id,user_id,ori_rating,ori_review`.
    pool_jsonl: jsonl lines `{"item_id", "category", "metadata"}`.

  Returns:
    An `AmazonC4`.
  """
  queries_csv, pool_jsonl = pathlib.Path(queries_csv), pathlib.Path(pool_jsonl)
  for p, what in ((queries_csv, "Amazon-C4 queries CSV"), (pool_jsonl, "Amazon-C4 item pool jsonl")):
    if not p.is_file():
      raise _missing(p, what)
  qids, queries, item_ids, qstats = _read_c4_queries(queries_csv)
  pool_ids, pool_texts, pool_cats, pstats = _read_c4_pool(pool_jsonl)
  if not queries:
    raise ValueError(f"No usable queries in {queries_csv} (stats: {qstats}).")
  if not pool_ids:
    raise ValueError(f"No usable pool items in {pool_jsonl} (stats: {pstats}).")
  where = {item: k for k, item in enumerate(pool_ids)}
  target = np.asarray([where.get(i, -1) for i in item_ids], np.int64)
  stats = {"queries": qstats, "pool": pstats, "targets_missing_from_pool": int((target < 0).sum())}
  for name, s in (("queries", qstats), ("pool", pstats)):
    if s["skipped"]:
      logging.warning("Amazon-C4 %s: skipped %d malformed rows %s (first at lines %s).", name,
                      s["skipped"], s["skip_reasons"], s["bad_lines"])
  if stats["targets_missing_from_pool"]:
    logging.warning("Amazon-C4: %d queries' items are not in the pool.", stats["targets_missing_from_pool"])
  return AmazonC4(qids=qids, queries=queries, item_ids=item_ids, target_index=target,
                  pool_ids=pool_ids, pool_texts=pool_texts, pool_categories=pool_cats, stats=stats)


class MultimodalPairsSource:
  """BLaIR-CLIP rows from a TSV (`.csv` with commas also read) with a header naming `review`, `meta`
  and the image column (the fork's `sample_multimodal_data.py` output): `source[i] -> {"review",
  "meta", "image_path" (joined with `image_root` when relative), "index"}`. Loaded into memory;
  rows with a wrong column count, bad quoting or an empty review / meta are skipped and counted in
  `.stats`. An empty image field (an image that `prepare_blair --images` could not download) is
  skipped as `no_image`, or with `keep_missing_images` kept with image_path "" and counted in
  `stats["rows_without_image"]` (the fork feeds those rows a black image). Whether each image exists
  is checked when it is loaded (the image transform counts those rows).
  """

  def __init__(self, path: str | os.PathLike, image_column: str = "image_path", image_root: str = "",
               keep_missing_images: bool = False):
    self.path = pathlib.Path(path)
    if not self.path.exists():
      raise _missing(self.path, "BLaIR-CLIP pairs (TSV with review, meta and image columns)")
    self.image_root = str(image_root or "")
    self.stats: dict[str, Any] = {"format": "tsv", **new_skip_stats()}
    self.rows: list[tuple[str, str, str]] = []
    sep = "," if self.path.suffix == ".csv" else "\t"
    with open_text(self.path, "rt", newline="") as f:
      lines = csv.reader(f, delimiter=sep) if sep == "," else (parse_tsv_line(l.rstrip("\r\n")) for l in f)
      header = next(lines, None)
      need = ("review", "meta", image_column)
      if not header or not all(c in header for c in need):
        raise ValueError(f"{self.path}: the header must name columns {need}, got {header}")
      cols = [header.index(c) for c in need]
      no_image = 0
      for n, fields in enumerate(lines, start=2):
        if fields is None:
          note_skip(self.stats, "quoting", n)
        elif len(fields) != len(header):
          note_skip(self.stats, "columns", n)
        elif not all(fields[c].strip() for c in cols[:2]):
          note_skip(self.stats, "empty", n)
        elif not fields[cols[2]].strip() and not keep_missing_images:
          note_skip(self.stats, "no_image", n)
        else:
          self.rows.append(tuple(fields[c].strip() if c == cols[2] else fields[c] for c in cols))
          no_image += not self.rows[-1][2]
    self.stats["rows"] = len(self.rows)
    self.stats["rows_without_image"] = no_image
    if not self.rows:
      raise ValueError(f"No usable rows in {self.path} (stats: {self.stats}).")

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, i) -> dict[str, Any]:
    review, meta, image = self.rows[operator.index(i)]
    if image and self.image_root and not os.path.isabs(image):
      image = os.path.join(self.image_root, image)
    return {"review": review, "meta": meta, "image_path": image, "index": operator.index(i) % len(self.rows)}
