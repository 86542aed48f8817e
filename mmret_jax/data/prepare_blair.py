"""BLaIR pretraining pairs from raw Amazon Reviews 2023 files (the seed's `sample_pretraining_data.py`).

    python -m mmret_jax.data.prepare_blair --reviews raw/review_categories \\
        --meta raw/meta_categories --output clean_review_meta.tsv
    python -m mmret_jax.data.prepare_blair --reviews raw/review_categories \\
        --meta raw/meta_categories --output pairs_ar --format array_record

Per category (`{Category}.jsonl[.gz]` reviews, `meta_{Category}.jsonl[.gz]` items),
in category order:

1. items: `meta_text(item)` (title, features, description; cleaned), kept when longer
   than `--min-chars`, indexed by `parent_asin` (a later duplicate wins, as in a dict);
2. reviews, kept when all hold (checked in this order, as the seed does):
   a random draw with probability `--sample-rate`; `timestamp < --max-timestamp`;
   the item has metadata; the cleaned `title + " " + text` is longer than `--min-chars`.
   Each kept review gives one (review, meta) row.

Differences from the seed, on purpose:
* The seed's draw is `random.randint(1, 10) == 1`, unseeded, over 64 worker
  processes, so its sample cannot be reproduced. Ours is `random.Random(f"{seed}/{category}")`,
  one draw per non-blank review line, so a category's sample does not depend on
  which other categories are processed. Lines not drawn are not parsed (fast);
  malformed-JSON counts therefore cover drawn lines only.
* The seed first loads every category's metadata into one global index; we
  keep one category's index at a time (bounded memory), so a review only
  matches items listed in its own category's meta file.
* The seed's category order is `all_categories.txt` of the HF dataset; ours is
  `--categories` (a comma list, or a file with one name per line) or, by
  default, the sorted category names found under `--reviews`.

Malformed lines (bad JSON, missing or mistyped fields) are skipped, counted per
category and reported at the end (also written to `<output>.stats.json`, or
`<output>/prepare_stats.json` for ArrayRecord). `--format tsv` writes the seed's
`review\\tmeta` TSV (header, `\\n` line ends, pandas quoting); `--format
array_record` writes a tensorflow-datasets ArrayRecord dataset (`blair_pairs`,
features `review`/`meta` Text, one `train` split, row order kept, shards of
`--rows-per-shard` rows) for `PairsSource` / grain random access, via a temporary
TSV in the output dir. TensorFlow is not needed. `--from-tsv` converts an existing
TSV (e.g. the seed's `clean_review_meta.tsv`) the same way.

BLaIR-CLIP (the fork aokhader/BLAIR-MultiModal's `sample_multimodal_data.py`):

    python -m mmret_jax.data.prepare_blair --reviews raw/review_categories \\
        --meta raw/meta_categories --categories Appliances \\
        --output clean_review_meta_with_images.tsv --images blair_clip_images

writes the same rows with a third column `image_path`: the item's image (`image_download`:
first `images` entry with a URL, hi_res > large > thumb; 224x224 bicubic) stored once per item as
`<images>/<parent_asin>.png`, the column holding that name relative to `--images` (train with
`data.image_root=<images>`). A row whose image could not be had keeps an empty `image_path` (the
fork's loader feeds a black image; our `MultimodalPairsSource` skips such rows and counts them as
`empty`), or is dropped with `--drop-missing-images`. Downloads are concurrent, retried, resumable
(a rerun requests only what is missing) and counted per failure reason (`<output>.stats.json`).
The fork differs: it keeps only items whose image downloaded (= `--drop-missing-images`), drops
repeated (review, meta) pairs (= `--dedup-pairs`), lets the first of two meta lines of an item win
and downloads the images of every item with metadata, not just of the items that have rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import pathlib
import random
import shutil
import sys
import tempfile
from typing import Any, Callable, Iterator, Sequence

import tqdm

from mmret_jax import cli
from mmret_jax.data.sources import amazon_reviews
from mmret_jax.data import image_download
from mmret_jax.data.sources.amazon_reviews import format_tsv_row, meta_text, open_text, parse_tsv_line, review_text

T1_TIMESTAMP = 1628643414042  # ms, 2021-08-11 UTC: t1 of the benchmark's timestamp split
DATASET_NAME = "blair_pairs"


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  """Filter settings of the seed's sampling step."""
  sample_rate: float = 0.1
  seed: int = 0
  max_timestamp: int = T1_TIMESTAMP
  min_chars: int = 30


# ---------------------------------------------------------------------------
# Input discovery
# ---------------------------------------------------------------------------
def _category_of(path: pathlib.Path, meta: bool) -> str | None:
  name = path.name
  for ext in (".jsonl.gz", ".jsonl"):
    if name.endswith(ext):
      name = name[:-len(ext)]
      break
  else:
    return None
  if meta:
    return name[len("meta_"):] if name.startswith("meta_") else None
  return None if name.startswith("meta_") else name


def find_files(spec: str, meta: bool) -> dict[str, pathlib.Path]:
  """`spec`: a directory, or comma-separated files -> {category: path}."""
  what = "meta" if meta else "reviews"
  p = pathlib.Path(spec)
  if p.is_dir():
    paths = sorted(x for x in p.iterdir() if x.is_file())
  else:
    paths = [pathlib.Path(s) for s in spec.split(",") if s]
    for x in paths:
      if not x.is_file():
        raise FileNotFoundError(f"--{what} file not found: {x}")
  out: dict[str, pathlib.Path] = {}
  for x in paths:
    cat = _category_of(x, meta)
    if cat is None and meta and not p.is_dir():
      cat = _category_of(x, meta=False)  # an explicitly named meta file without the prefix
    if cat is None:
      if p.is_dir():
        continue  # other files in the directory
      raise ValueError(f"--{what}: cannot tell the category of {x} "
                       f"(expected {'meta_' if meta else ''}<Category>.jsonl[.gz])")
    if cat in out:
      raise ValueError(f"--{what}: two files for category {cat!r}: {out[cat]} and {x}")
    out[cat] = x
  if not out:
    raise FileNotFoundError(f"--{what} {spec}: no {'meta_' if meta else ''}<Category>.jsonl[.gz] files")
  return out


def resolve_categories(reviews: str, meta: str, categories: str | None
                       ) -> list[tuple[str, pathlib.Path, pathlib.Path]]:
  """-> [(category, reviews_path, meta_path)] in processing order."""
  rev, met = find_files(reviews, meta=False), find_files(meta, meta=True)
  if categories:
    if os.path.isfile(categories):
      with open(categories, encoding="utf-8") as f:
        names = [ln.strip() for ln in f if ln.strip()]
    else:
      names = [c.strip() for c in categories.split(",") if c.strip()]
  else:
    names = sorted(rev)
  missing = [f"{c} ({'reviews' if c not in rev else 'meta'})" for c in names if c not in rev or c not in met]
  if missing:
    raise FileNotFoundError(f"No input file for categories: {', '.join(missing)}")
  return [(c, rev[c], met[c]) for c in names]


# ---------------------------------------------------------------------------
# Streaming filters
# ---------------------------------------------------------------------------
def _lines(path: pathlib.Path, desc: str, progress: bool) -> Iterator[bytes]:
  with open_text(path, "rb") as f, tqdm.tqdm(desc=desc, unit=" lines", unit_scale=True,
                                             disable=not progress, mininterval=1.0) as bar:
    n = 0
    for raw in f:
      n += 1
      if n == 10_000:
        bar.update(n)
        n = 0
      yield raw
    bar.update(n)


def load_meta_index(path: pathlib.Path, cfg: SampleConfig, counts: dict[str, int],
                    progress: bool = True, urls: dict[str, str | None] | None = None) -> dict[str, str]:
  """parent_asin -> cleaned meta text, for items whose text is longer than `cfg.min_chars`.

  With `urls`, also fills `urls[parent_asin]` with the item's image URL (`select_image_url` of its
  `images`, None when it has none) for the same items.
  """
  index: dict[str, str] = {}
  for raw in _lines(path, f"meta {path.name}", progress):
    if not raw.strip():
      continue
    counts["meta_lines"] += 1
    try:
      item = json.loads(raw)
      asin = item["parent_asin"]
      if not isinstance(asin, str) or not asin:
        raise ValueError(asin)
      text = meta_text(item)
    except (ValueError, TypeError, KeyError, AttributeError):
      counts["meta_malformed"] += 1
      continue
    if len(text) <= cfg.min_chars:
      counts["meta_short"] += 1
      continue
    if asin in index:
      counts["meta_duplicate"] += 1
    index[asin] = text
    if urls is not None:
      urls[asin] = image_download.select_image_url(item.get("images"))
  counts["items"] = len(index)
  return index


def iter_category_pairs(category: str, path: pathlib.Path, index: dict[str, str], cfg: SampleConfig,
                        counts: dict[str, int], progress: bool = True, with_item: bool = False
                        ) -> Iterator[tuple[str, ...]]:
  """Yields (review, meta) for the reviews of one category that pass the seed's filters
  ((review, meta, parent_asin) with `with_item`)."""
  rng = random.Random(f"{cfg.seed}/{category}")
  for raw in _lines(path, f"reviews {path.name}", progress):
    if not raw.strip():
      continue
    counts["review_lines"] += 1
    if rng.random() >= cfg.sample_rate:
      counts["review_not_sampled"] += 1
      continue
    try:
      r = json.loads(raw)
      asin, ts = r["parent_asin"], r["timestamp"]
      if not isinstance(asin, str) or isinstance(ts, bool) or not isinstance(ts, (int, float)):
        raise ValueError(asin)
      text = review_text(r)
    except (ValueError, TypeError, KeyError, AttributeError):
      counts["review_malformed"] += 1
      continue
    if ts >= cfg.max_timestamp:
      counts["review_after_cutoff"] += 1
    elif asin not in index:
      counts["review_no_meta"] += 1
    elif len(text) <= cfg.min_chars:
      counts["review_short"] += 1
    else:
      counts["pairs"] += 1
      yield (text, index[asin], asin) if with_item else (text, index[asin])


COUNT_KEYS = ("meta_lines", "meta_malformed", "meta_short", "meta_duplicate", "items", "review_lines",
              "review_not_sampled", "review_malformed", "review_after_cutoff", "review_no_meta",
              "review_short", "pairs")


def iter_pairs(files: Sequence[tuple[str, pathlib.Path, pathlib.Path]], cfg: SampleConfig,
               stats: dict[str, dict[str, int]], progress: bool = True, images: bool = False
               ) -> Iterator[tuple[str, ...]]:
  """All categories' pairs in order; fills `stats[category]` with the counts.

  Yields (review, meta), or with `images` (review, meta, parent_asin, image URL or None).
  """
  for category, reviews, meta in files:
    counts = stats.setdefault(category, dict.fromkeys(COUNT_KEYS, 0))
    urls: dict[str, str | None] | None = {} if images else None
    index = load_meta_index(meta, cfg, counts, progress, urls)
    if urls is None:
      yield from iter_category_pairs(category, reviews, index, cfg, counts, progress)
    else:
      for review, text, asin in iter_category_pairs(category, reviews, index, cfg, counts, progress, True):
        yield review, text, asin, urls[asin]
    del index, urls
    if progress:
      print(f"{category}: {counts['pairs']} pairs from {counts['review_lines']} reviews, "
            f"{counts['items']} items", file=sys.stderr)


# ---------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------
def write_tsv(pairs: Iterator[tuple[str, str]], path: pathlib.Path) -> int:
  """Writes the `review\\tmeta` TSV (via `incomplete.<name>`, renamed when done); returns the row count."""
  tmp = path.with_name("incomplete." + path.name)  # same suffix: `.gz` output is compressed
  n = 0
  with open_text(tmp, "wt", newline="") as f:
    f.write(format_tsv_row("review", "meta"))
    for review, meta in pairs:
      f.write(format_tsv_row(review, meta))
      n += 1
  os.replace(tmp, path)
  return n


class _ShardFeed:
  """Hands consecutive runs of `rows_per_shard` good rows of one open TSV to tfds, shard by shard.

  tfds (without Beam) calls the shard generators one after another in shard order;
  each continues reading where the previous stopped, so the file is read once,
  sequentially (`.gz` too).
  """

  def __init__(self, rows: Iterator[tuple[int, str, str]], rows_per_shard: int):
    self._rows = rows
    self._rows_per_shard = rows_per_shard
    self._next = 0

  def shard(self, k: int) -> Callable[[], Iterator[tuple[int, dict[str, str]]]]:
    return functools.partial(self._iter, k)

  def _iter(self, k: int) -> Iterator[tuple[int, dict[str, str]]]:
    if k != self._next:
      raise RuntimeError(f"tfds asked for shard {k} before shard {self._next}: order would break.")
    self._next += 1
    for lineno, review, meta in itertools.islice(self._rows, self._rows_per_shard):
      yield lineno, {"review": review, "meta": meta}


@functools.cache
def _builder_cls():
  """The tfds builder class (built lazily: tensorflow_datasets is only needed for ArrayRecord)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  # A ShardBasedBuilder, not a GeneratorBasedBuilder: the latter sorts examples through
  # temporary bucket files (tf.io.gfile, i.e. TensorFlow) once a split exceeds 1 GB.
  # This one writes the shards we hand it, in order, with no TensorFlow.
  class BlairPairs(tfds.core.ShardBasedBuilder, skip_registration=True):
    """BLaIR (review, meta) pretraining pairs, in source order."""
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Amazon Reviews 2023 pairs as sampled by mmret_jax.data.prepare_blair."}
    # tfds 4.9.10 resolves `code_path` (to look for a checksums file) through
    # `importlib_resources`, which it only declares for Python < 3.9: without that
    # package a builder defined inside an installed package fails. We download nothing.
    code_path = None

    def __init__(self, *, shards: Sequence[Callable[[], Iterator[Any]]] = (), **kwargs):
      self._shards = list(shards)
      super().__init__(**kwargs)

    # tfds prints "Downloading and preparing dataset ..." / "... downloaded and prepared": nothing is
    # downloaded here, and prepare_blair reports what it wrote itself.
    def _log_download_bytes(self):
      pass

    def _log_download_done(self):
      pass

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, description="BLaIR (review, meta) pairs from Amazon Reviews 2023.",
          features=tfds.features.FeaturesDict({"review": tfds.features.Text(),
                                               "meta": tfds.features.Text()}))

    def _shard_iterators_per_split(self, dl_manager):
      del dl_manager
      return {"train": self._shards}

  return BlairPairs


def tsv_to_array_record(tsv: str | os.PathLike, out_dir: str | os.PathLike,
                        rows_per_shard: int = 100_000) -> dict[str, Any]:
  """Converts a `review\\tmeta` TSV (ours or the seed's) to an ArrayRecord dataset, order kept.

  Writes `out_dir/blair_pairs/1.0.0/` (read it with `PairsSource(out_dir)`). Two
  sequential passes over the TSV (count, then write); malformed rows are skipped
  and counted. Memory: about one shard of rows (tfds buffers a shard while writing).

  Returns:
    The TSV reader's stats of the writing pass (`rows`, `skipped`, ...).
  """
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  out_dir = pathlib.Path(out_dir)
  count = amazon_reviews.new_skip_stats()
  with amazon_reviews.read_pairs_tsv(tsv, count) as rows:
    for _ in rows:
      pass
  if not count["rows"]:
    raise ValueError(f"No usable (review, meta) rows in {tsv} (stats: {count}).")
  n_shards = -(-count["rows"] // rows_per_shard)
  stats = amazon_reviews.new_skip_stats()
  out_dir.mkdir(parents=True, exist_ok=True)
  with amazon_reviews.read_pairs_tsv(tsv, stats) as rows, \
       tempfile.TemporaryDirectory(dir=out_dir, prefix=".downloads") as dl:
    feed = _ShardFeed(rows, rows_per_shard)
    builder = _builder_cls()(shards=[feed.shard(k) for k in range(n_shards)], data_dir=os.fspath(out_dir),
                             file_format="array_record")
    builder.download_and_prepare(
        download_dir=dl, download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  written = builder.info.splits["train"].num_examples
  if written != stats["rows"] or written != count["rows"]:
    raise RuntimeError(f"Wrote {written} rows, expected {count['rows']} (file changed while reading?)")
  return stats


def write_array_record(pairs: Iterator[tuple[str, str]], out_dir: pathlib.Path,
                       rows_per_shard: int = 100_000) -> int:
  """Writes pairs as an ArrayRecord dataset under `out_dir/blair_pairs/1.0.0`; returns the row count.

  The pairs go to a temporary TSV in `out_dir` first (tfds needs the shard count up
  front), which is removed afterwards.
  """
  out_dir.mkdir(parents=True, exist_ok=True)
  tmp = out_dir / ".pairs.incomplete.tsv"
  try:
    write_tsv(pairs, tmp)
    return tsv_to_array_record(tmp, out_dir, rows_per_shard)["rows"]
  finally:
    tmp.unlink(missing_ok=True)


class PairDeduper:
  """Drops a (review, meta) pair seen before (the fork's multimodal script: md5 of review + "\\n" + meta)."""

  def __init__(self):
    self._seen: set[bytes] = set()
    self.duplicates = 0

  def is_new(self, review: str, meta: str) -> bool:
    key = hashlib.md5((review + "\n" + meta).encode("utf-8")).digest()
    if key in self._seen:
      self.duplicates += 1
      return False
    self._seen.add(key)
    return True

  def filter(self, pairs: Iterator[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    return (p for p in pairs if self.is_new(p[0], p[1]))


IMAGE_COLUMN = "image_path"


def write_multimodal_tsv(rows: Iterator[tuple[str, str, str, str | None]], path: pathlib.Path,
                         image_dir: pathlib.Path, dl_cfg: image_download.DownloadConfig,
                         drop_missing: bool = False, dedup: bool = False) -> dict[str, Any]:
  """Writes the BLaIR-CLIP `review\\tmeta\\timage_path` TSV, downloading each row's item image once.

  Rows (review, meta, item id, image URL) go to a temporary file beside `path` while the distinct
  items are collected; then `image_download.download_images` fills `image_dir`, and the final TSV
  is written (via `incomplete.<name>`, renamed when done) with `image_path` = the image's file name
  inside `image_dir` (relative: train with `data.image_root=<image_dir>`), or "" when the item has
  no image (the row is dropped instead with `drop_missing`). With `dedup`, a (review, meta) pair
  already written is dropped (after the image drop, as the fork does).

  Returns:
    {"rows", "rows_with_image", "rows_without_image", "rows_dropped_missing_image",
     "duplicate_pairs", "items", "download": {counts, http_status, failure_examples}}.
  """
  rows_tmp = path.with_name("incomplete." + path.name + ".rows")
  out_tmp = path.with_name("incomplete." + path.name)
  needed: dict[str, str | None] = {}
  counts = dict.fromkeys(("rows", "rows_with_image", "rows_without_image", "rows_dropped_missing_image",
                          "duplicate_pairs"), 0)
  try:
    with open(rows_tmp, "w", encoding="utf-8", newline="") as f:
      for review, meta, item, url in rows:
        f.write(format_tsv_row(review, meta, item))
        needed.setdefault(item, url)
    dl = image_download.download_images(needed, image_dir, dl_cfg)
    dedupe = PairDeduper() if dedup else None
    with open(rows_tmp, encoding="utf-8", newline="") as f, open_text(out_tmp, "wt", newline="") as out:
      out.write(format_tsv_row("review", "meta", IMAGE_COLUMN))
      for lineno, line in enumerate(f, start=1):
        fields = parse_tsv_line(line.rstrip("\n"))
        if fields is None or len(fields) != 3:
          raise RuntimeError(f"{rows_tmp}:{lineno}: unreadable temporary row (file changed while running?)")
        review, meta, item = fields
        name = dl.files.get(item)
        if name is None and drop_missing:
          counts["rows_dropped_missing_image"] += 1
          continue
        if dedupe is not None and not dedupe.is_new(review, meta):
          continue
        out.write(format_tsv_row(review, meta, name or ""))
        counts["rows"] += 1
        counts["rows_with_image" if name else "rows_without_image"] += 1
    os.replace(out_tmp, path)
  finally:
    rows_tmp.unlink(missing_ok=True)
    out_tmp.unlink(missing_ok=True)
  counts["duplicate_pairs"] = dedupe.duplicates if dedupe is not None else 0
  return {**counts, "items": len(needed), "image_dir": str(image_dir),
          "download": {"counts": dl.counts, "http_status": dl.http_status, "failure_examples": dl.examples}}


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------
REPORT_COLUMNS = {  # count -> column header of the on-screen table (stats.json keeps the full names)
    "meta_lines": "meta_lines", "meta_malformed": "malformed", "meta_short": "short",
    "meta_duplicate": "duplicate", "items": "items", "review_lines": "review_lines",
    "review_not_sampled": "not_sampled", "review_malformed": "malformed", "review_after_cutoff": "after_cutoff",
    "review_no_meta": "no_meta", "review_short": "short", "pairs": "pairs"}


def _report(stats: dict[str, dict[str, int]], cfg: SampleConfig | None = None, out=sys.stdout) -> None:
  """Every count per category and in total, and how the review lines split up."""
  cols = list(REPORT_COLUMNS)
  heads = [REPORT_COLUMNS[c] for c in cols]
  w = max([len("category"), len("TOTAL")] + [len(c) for c in stats])
  widths = [max(len(h), 7) for h in heads]
  print(f"{'':<{w}} {'--- items (meta files) ---':<{sum(widths[:5]) + 4}} --- reviews ---", file=out)
  print(f"{'category':<{w}} " + " ".join(f"{h:>{n}}" for h, n in zip(heads, widths)), file=out)
  total = dict.fromkeys(cols, 0)
  for cat, counts in stats.items():
    print(f"{cat:<{w}} " + " ".join(f"{counts[c]:>{n}}" for c, n in zip(cols, widths)), file=out)
    for c in cols:
      total[c] += counts[c]
  print(f"{'TOTAL':<{w}} " + " ".join(f"{total[c]:>{n}}" for c, n in zip(cols, widths)), file=out)
  rate = f" (--sample-rate {cfg.sample_rate})" if cfg else ""
  print(f"review_lines {total['review_lines']} = not_sampled {total['review_not_sampled']}{rate} + malformed "
        f"{total['review_malformed']} + after_cutoff {total['review_after_cutoff']} (--max-timestamp) + no_meta "
        f"{total['review_no_meta']} + short {total['review_short']} (--min-chars) + pairs {total['pairs']}",
        file=out)


def _report_images(images: dict[str, Any], drop_missing: bool, out=sys.stdout) -> None:
  """Where each item's image came from, why the others failed, and what happened to their rows."""
  c, status = images["download"]["counts"], images["download"]["http_status"]
  reasons = ", ".join(f"{r} {c[r]}" + (f" {status}" if r == "http_error" and status else "")
                      for r in image_download.REASONS)
  print(f"images: {c['items']} items = on_disk {c['on_disk']} + downloaded {c['downloaded']} + failed "
        f"{c['failed']} ({reasons}; {c['not_retried']} recorded failures not retried); "
        f"{c['requests']} HTTP requests; in {images['image_dir']}", file=out)
  for ex in images["download"]["failure_examples"]:
    print(f"  failed: {ex['item']} {ex['url']}: {ex['reason']}: {ex['detail']}", file=out)
  missing = (f"dropped {images['rows_dropped_missing_image']} rows without an image (--drop-missing-images)"
             if drop_missing else f"{images['rows_without_image']} rows have no image (empty image_path)")
  print(f"rows: {images['rows_with_image']} with an image; {missing}", file=out)


DESCRIPTION = """BLaIR pretraining pairs from raw Amazon Reviews 2023 files (the seed's sampling step).

By default, as the seed does, only about 1 review in 10 is kept (--sample-rate 0.1), only reviews
written before 2021-08-11 (--max-timestamp, the benchmark's t1 split point), and only reviews and
item texts longer than 30 characters (--min-chars); a review whose item has no metadata is dropped.
The table at the end counts every line each filter dropped; <output>.stats.json keeps them.
Pass --sample-rate 1 to keep every review.

BLaIR-CLIP: --images DIR adds an image_path column (the fork's sample_multimodal_data.py): each row's
item image (its first `images` entry with a URL: hi_res, else large, else thumb) is downloaded once,
resized to 224x224 bicubic and stored as DIR/<parent_asin>.png; image_path is that name, relative to
DIR (train with --config.data.image_root=DIR). Rerunning skips the images already in DIR and retries
failures (--retry-failed). A row whose image failed keeps an empty image_path (the fork's loader feeds
a black image; ours skips and counts the row), or is dropped with --drop-missing-images."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = cli.ArgumentParser(prog="python -m mmret_jax.data.prepare_blair", description=DESCRIPTION)
  p.add_argument("--reviews", help="dir with <Category>.jsonl[.gz], or comma-separated review files")
  p.add_argument("--meta", help="dir with meta_<Category>.jsonl[.gz], or comma-separated meta files")
  p.add_argument("--from-tsv", default=None,
                 help="instead of --reviews/--meta: convert this review\\tmeta TSV (e.g. the seed's "
                      "clean_review_meta.tsv) to --format array_record")
  p.add_argument("--output", required=True, help="TSV file, or a directory for --format array_record")
  p.add_argument("--format", choices=("tsv", "array_record"), default="tsv",
                 help="tsv: the seed's review<TAB>meta file; array_record: a dataset dir for random access")
  p.add_argument("--categories", default=None,
                 help="comma list or a file of names, in output order (default: sorted found names)")
  p.add_argument("--sample-rate", type=float, default=0.1,
                 help="probability of keeping a review (seed: 1 in 10; 1 keeps all)")
  p.add_argument("--seed", type=int, default=0, help="seed of the per-category sampling draw")
  p.add_argument("--max-timestamp", type=int, default=T1_TIMESTAMP,
                 help="keep reviews strictly before this time (ms since 1970; default 2021-08-11 UTC)")
  p.add_argument("--min-chars", type=int, default=30,
                 help="keep reviews and item texts strictly longer than this many characters")
  p.add_argument("--rows-per-shard", type=int, default=100_000, help="ArrayRecord rows per shard file")
  p.add_argument("--dedup-pairs", action="store_true",
                 help="drop a (review, meta) pair identical to an earlier one (the fork's multimodal script does)")
  g = p.add_argument_group("BLaIR-CLIP images (--images)")
  g.add_argument("--images", default=None, metavar="DIR",
                 help="download one image per item into DIR and write a review/meta/image_path TSV")
  g.add_argument("--image-size", type=int, default=224, metavar="N", help="stored images are N x N (bicubic)")
  g.add_argument("--image-format", choices=tuple(image_download.FORMATS), default="png",
                 help="png: lossless; jpg: quality 95, about 5x smaller (the fork saves jpg)")
  g.add_argument("--download-workers", type=int, default=16, metavar="N", help="concurrent downloads")
  g.add_argument("--timeout", type=float, default=10.0, metavar="S",
                 help="seconds to connect and between received bytes (a whole response: 3x)")
  g.add_argument("--retries", type=int, default=3, metavar="N",
                 help="retries after a timeout, connection error, HTTP 5xx / 408 / 429 (not other 4xx)")
  g.add_argument("--backoff", type=float, default=1.0, metavar="S",
                 help="first retry delay in seconds; doubles each retry")
  g.add_argument("--user-agent", default=image_download.DEFAULT_USER_AGENT, metavar="UA", help="HTTP User-Agent header")
  g.add_argument("--retry-failed", choices=image_download.RETRY_FAILED, default="transient",
                 help="which failures recorded in DIR/download_failures.json a rerun requests again: transient "
                      "(timeouts, connection errors, 5xx / 408 / 429), all, or none")
  g.add_argument("--drop-missing-images", action="store_true",
                 help="drop rows whose image could not be had (default: keep them with an empty image_path)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing output")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  args = p.parse_args(argv)
  if args.from_tsv:
    if args.reviews or args.meta or args.format != "array_record":
      p.error("--from-tsv converts a TSV: use it with --format array_record and without --reviews/--meta")
  elif not (args.reviews and args.meta):
    p.error("--reviews and --meta are required (or --from-tsv)")
  if not 0.0 < args.sample_rate <= 1.0:
    p.error(f"--sample-rate must be in (0, 1], got {args.sample_rate}")
  if args.rows_per_shard < 1:
    p.error("--rows-per-shard must be positive")
  if args.images:
    if args.from_tsv or args.format != "tsv":
      p.error("--images writes a TSV (review, meta, image_path): use it with --format tsv, without --from-tsv")
    for name, lo in (("image_size", 1), ("download_workers", 1), ("retries", 0)):
      if getattr(args, name) < lo:
        p.error(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(args, name)}")
    if not args.timeout > 0 or args.backoff < 0:
      p.error(f"--timeout must be > 0 and --backoff >= 0, got {args.timeout}, {args.backoff}")
  elif args.drop_missing_images:
    p.error("--drop-missing-images needs --images DIR")
  return args


def _clear(target: pathlib.Path, overwrite: bool) -> None:
  if not target.exists():
    return
  if not overwrite:
    raise FileExistsError(f"{target} exists; remove it or pass --overwrite.")
  if target.is_dir():
    shutil.rmtree(target)
  else:
    target.unlink()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the CLI; returns {"rows", "output", "format", "categories": {name: counts}, ...}."""
  args = parse_args(argv)
  out = pathlib.Path(args.output)
  if args.format == "tsv":
    stats_path, target = out.with_name(out.name + ".stats.json"), out
  else:
    stats_path, target = out / "prepare_stats.json", out / DATASET_NAME
  if args.from_tsv:
    if not os.path.isfile(args.from_tsv):
      raise FileNotFoundError(f"--from-tsv file not found: {args.from_tsv}")
    _clear(target, args.overwrite)
    tsv_stats = tsv_to_array_record(args.from_tsv, out, args.rows_per_shard)
    result = {"rows": tsv_stats["rows"], "output": str(out), "format": args.format,
              "source_tsv": args.from_tsv, "tsv_stats": tsv_stats}
    stats_path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"Wrote {result['rows']} pairs to {out} ({args.format}); skipped {tsv_stats['skipped']} "
          f"malformed TSV rows {tsv_stats['skip_reasons']}")
    return result

  cfg = SampleConfig(sample_rate=args.sample_rate, seed=args.seed, max_timestamp=args.max_timestamp,
                     min_chars=args.min_chars)
  files = resolve_categories(args.reviews, args.meta, args.categories)
  if args.images and pathlib.Path(args.images).exists() and not pathlib.Path(args.images).is_dir():
    raise NotADirectoryError(f"--images {args.images} exists and is not a directory")
  _clear(target, args.overwrite)
  stats: dict[str, dict[str, int]] = {}
  images = None
  if args.images:
    dl_cfg = image_download.DownloadConfig(
        size=args.image_size, image_format=args.image_format, workers=args.download_workers,
        timeout=args.timeout, retries=args.retries, backoff=args.backoff, user_agent=args.user_agent,
        retry_failed=args.retry_failed, progress=not args.no_progress)
    rows_iter = iter_pairs(files, cfg, stats, progress=not args.no_progress, images=True)
    images = write_multimodal_tsv(rows_iter, out, pathlib.Path(args.images), dl_cfg,
                                  drop_missing=args.drop_missing_images, dedup=args.dedup_pairs)
    rows = images["rows"]
  else:
    dedupe = PairDeduper() if args.dedup_pairs else None
    pairs = iter_pairs(files, cfg, stats, progress=not args.no_progress)
    if dedupe is not None:
      pairs = dedupe.filter(pairs)
    if args.format == "tsv":
      rows = write_tsv(pairs, out)
    else:
      rows = write_array_record(pairs, out, args.rows_per_shard)
  result = {"rows": rows, "output": str(out), "format": args.format, "config": dataclasses.asdict(cfg),
            "categories": stats}
  if args.dedup_pairs:
    result["duplicate_pairs"] = images["duplicate_pairs"] if images else dedupe.duplicates
  if images is not None:
    result["images"] = images
  stats_path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
  _report(stats, cfg)
  if args.dedup_pairs:
    print(f"Dropped {result['duplicate_pairs']} repeated (review, meta) pairs (--dedup-pairs)")
  if images is not None:
    _report_images(images, args.drop_missing_images)
  bad = {c: {k: v for k, v in s.items() if k.endswith("malformed") and v} for c, s in stats.items()}
  bad = {c: v for c, v in bad.items() if v}
  if bad:
    print(f"Skipped malformed lines: {bad}")
  print(f"Wrote {rows} pairs to {out} ({args.format}); counts in {stats_path}")
  if images is not None:
    print(f"Train: python -m mmret_jax.main --config=configs/blair_clip.py --workdir=runs/blair_clip "
          f"--config.data.train_file={out} --config.data.image_root={args.images}")
  return result


def cli_main(argv: Sequence[str] | None = None) -> int:
  """`python -m mmret_jax.data.prepare_blair`: `main` with one-line errors and an exit status."""
  return cli.run(lambda: (main(argv), 0)[1])


if __name__ == "__main__":
  sys.exit(cli_main())
