"""Sequential-recommendation data for BLaIR (the seed's `seq_rec_results/dataset/process_amazon_2023.py`).

    python -m mmret_jax.data.prepare_seqrec --domain All_Beauty --interactions benchmark/0core_timestamp_w_his \\
        --meta raw/meta_categories --output processed/
    python -m mmret_jax.data.prepare_seqrec --domain All_Beauty --interactions benchmark/0core_timestamp_w_his \\
        --meta raw/meta_categories --output processed/ --model ckpt/blair-base --feature-name blair-roberta-base

Inputs:
* `--interactions`: the Amazon Reviews 2023 benchmark split `0core_timestamp_w_his_{domain}`:
  `{domain}.train.csv`, `{domain}.valid.csv`, `{domain}.test.csv` (each `.csv` or `.csv.gz`; columns
  `user_id,parent_asin,rating,timestamp,history`, history = space-separated asins, may be empty) in a
  directory, or in `DIR/{domain}/`, or three comma-separated paths in the order train,valid,test.
  Only `user_id`, `parent_asin` and `history` are read.
* `--meta`: the raw item metadata `meta_{domain}.jsonl[.gz]`: a directory of meta files, comma-separated
  files, or the one file itself.

Item text (the seed's `clean_metadata`): for `title`, `features`, `categories`, `description` in this
order, `feature_process(value) + " "`, where a float gives `str(value) + "."`, a non-empty list gives its
items, each cleaned, joined with ", " plus "."; anything else is cleaned. Cleaning: a list is joined with
", "; HTML entities unescaped; stripped; tags `<...>` deleted; tabs / newlines -> space; runs of spaces
squeezed; then every non-ASCII character -> space (after the squeeze, as in the seed).

Per split (train, valid, test), in file order, as the seed does: a row whose target item has no metadata
gets an empty history; items without metadata are removed from the history; rows left with an empty
history are dropped (counted by cause); the history is cut to its last `--max-his-len` items. Ids: user
and item maps with "[PAD]" at 0, assigned over train, valid, test in row order (user, target item, then
the history items). Outputs in `{output}/{domain}/` (written to `incomplete.<name>`, all renamed at the
end, so a failed run replaces nothing):
* `{domain}.{split}.inter`: RecBole atomic files, header `user_id:token\\titem_id_list:token_seq\\titem_id:token`;
* `{domain}.data_maps`: JSON {user2id, id2user, item2id, id2item, id2meta} (id2meta: "0" -> "[PAD]", then
  item id -> text in metadata-file order; keys are strings, as in the seed's file);
* with `--model`: `{domain}.{feature_name}.feature`, raw float32 [#items, hidden] (`ndarray.tofile`), row
  i-1 = item id i: the unnormalised CLS vector of the last layer (`--max-length` tokens, truncated), as
  the seed's `plm_suffix` feature for UniSRec / SASRecText (`plm_size` = the model's hidden size);
* `prepare_seqrec_stats.json`: the statistics and every skip count.
The seed's statistics are printed at the end (interactions per split are counted as the seed counts
them: rows, plus one for each row whose history has exactly one item).

Differences from the seed, on purpose:
* Streaming and bounded memory: the interaction files are read twice (first to collect the asins they
  mention), and only the texts of those items are kept from the meta file; meta lines of other items are
  not parsed (a quick byte search finds their `parent_asin`), so malformed-line counts cover the
  mentioned items only.
* Malformed input is skipped and counted where the seed would crash: a CSV row with the wrong number of
  fields, an empty user_id / parent_asin, or one containing a tab or line break (it would break the atomic
  file); a meta line that is not JSON or has no string parent_asin. In item text, a missing or null field
  counts as "" (counted), a scalar other than str / float is `str()`-ed, and lists nested deeper than
  the seed's one level are flattened the same way (the seed raises on these).
* A repeated asin in the meta file: the last line's text wins, at the first line's position (the seed's
  dict does the same); counted.
* Features come from any mmret_jax text model (`mmret_jax.embed.load`); `--max-length` must fit the
  model's position table (the seed truncates at 512).
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import os
import pathlib
import re
import sys
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import tqdm

from mmret_jax import cli, storage
from mmret_jax.data.prepare_blair import find_files
from mmret_jax.data.sources.amazon_reviews import MAX_BAD_LINES, iter_wanted_meta, open_text

SPLITS = ("train", "valid", "test")
INTER_HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
USED_COLUMNS = ("user_id", "parent_asin", "history")
META_FIELDS = ("title", "features", "categories", "description")
PAD = "[PAD]"
STATS_FILE = "prepare_seqrec_stats.json"


# ---------------------------------------------------------------------------
# Item text (the seed's list_to_str / clean_text / feature_process / clean_metadata)
# ---------------------------------------------------------------------------
_TAG = re.compile(r"<[^>]+>")
_TAB_NL = re.compile(r"[\n\t]")
_SPACES = re.compile(r" +")
_NON_ASCII = re.compile(r"[^\x00-\x7F]")


def list_to_str(value: Any) -> str:
  """A list joined with ", " (nested lists flattened the same way); None -> ""; other scalars `str()`."""
  if isinstance(value, list):
    return ", ".join(list_to_str(v) for v in value)
  if value is None:
    return ""
  return value if isinstance(value, str) else str(value)


def clean_text(value: Any) -> str:
  """The seed's cleaning of one value (see the module docstring); the non-ASCII step comes last."""
  text = html.unescape(list_to_str(value)).strip()
  text = _TAG.sub("", text)
  text = _TAB_NL.sub(" ", text)
  text = _SPACES.sub(" ", text)
  return _NON_ASCII.sub(" ", text)


def feature_process(value: Any) -> str:
  """One field's part of the item text, with its trailing space."""
  if isinstance(value, float):
    return str(value) + ". "
  if isinstance(value, list) and value:
    return ", ".join(clean_text(v) for v in value) + ". "
  return clean_text(value) + " "


def clean_metadata(item: Mapping[str, Any]) -> str:
  """The item text: `feature_process` of title, features, categories, description, concatenated."""
  return "".join(feature_process(item.get(k)) for k in META_FIELDS)


# ---------------------------------------------------------------------------
# Counters
# ---------------------------------------------------------------------------
SUMMARY: tuple[tuple[str, str], ...] = (
    ("meta_lines", "meta lines read"),
    ("meta_malformed", "  malformed (skipped)"),
    ("meta_duplicate", "  repeated asin (last text kept)"),
    ("meta_items", "  items mentioned by the interactions, with metadata"),
    ("meta_null_fields", "  title/features/categories/description missing or null (as \"\")"),
    ("rows_read", "interaction rows read"),
    ("rows_malformed", "  malformed (skipped)"),
    ("rows_target_no_meta", "  dropped: target item has no metadata"),
    ("rows_history_no_meta", "  dropped: no history item has metadata"),
    ("rows_history_empty", "  dropped: empty history"),
    ("rows_truncated", "  history cut to --max-his-len"),
    ("history_items_no_meta", "  history items without metadata (removed)"),
    ("rows_written", "rows written"),
)


def new_counts() -> dict[str, Any]:
  out: dict[str, Any] = dict.fromkeys((k for k, _ in SUMMARY), 0)
  out["skip_reasons"] = {}
  out["bad_lines"] = []
  return out


def _skip(counts: dict[str, Any], kind: str, why: str, where: str) -> None:
  counts[f"{kind}_malformed"] += 1
  key = f"{kind}: {why}"
  counts["skip_reasons"][key] = counts["skip_reasons"].get(key, 0) + 1
  if len(counts["bad_lines"]) < MAX_BAD_LINES:
    counts["bad_lines"].append(where)


# ---------------------------------------------------------------------------
# Input discovery
# ---------------------------------------------------------------------------
def _split_file(folder: pathlib.Path, domain: str, split: str) -> pathlib.Path | None:
  found = [folder / f"{domain}.{split}{ext}" for ext in (".csv", ".csv.gz")]
  found = [p for p in found if p.is_file()]
  if len(found) > 1:
    raise ValueError(f"--interactions: both {found[0]} and {found[1]} exist; keep one")
  return found[0] if found else None


def find_interaction_files(spec: str, domain: str) -> dict[str, pathlib.Path]:
  """`spec`: a dir (or its `{domain}/` subdir) with `{domain}.{split}.csv[.gz]`, or three comma-separated
  paths (train, valid, test) -> {split: path}."""
  p = pathlib.Path(spec)
  if p.is_dir():
    for folder in (p, p / domain):
      files = {s: _split_file(folder, domain, s) for s in SPLITS} if folder.is_dir() else {}
      if files and all(files.values()):
        return files  # type: ignore[return-value]
      if any(files.values()):
        missing = [f"{domain}.{s}.csv[.gz]" for s, f in files.items() if f is None]
        raise FileNotFoundError(f"--interactions {folder}: missing {', '.join(missing)}")
    raise FileNotFoundError(f"--interactions {spec}: no {domain}.{{train,valid,test}}.csv[.gz] there or in "
                            f"{p / domain}")
  paths = [pathlib.Path(s) for s in spec.split(",") if s.strip()]
  if len(paths) != 3:
    if len(paths) == 1 and not paths[0].exists():
      raise FileNotFoundError(f"--interactions not found: {spec}")
    raise ValueError(f"--interactions: give a directory or three comma-separated files (train,valid,test), "
                     f"got {len(paths)}")
  for split, x in zip(SPLITS, paths):
    if not x.is_file():
      raise FileNotFoundError(f"--interactions {split} file not found: {x}")
    other = [s for s in SPLITS if s != split and re.search(rf"\.{s}\.csv(\.gz)?$", x.name)]
    if other:
      raise ValueError(f"--interactions: {x} looks like the {other[0]} split but is given as {split} "
                       "(order: train,valid,test)")
  return dict(zip(SPLITS, paths))


def find_meta_file(spec: str, domain: str) -> pathlib.Path:
  """The `meta_{domain}.jsonl[.gz]` of `spec` (a dir, comma-separated files, or the file itself)."""
  p = pathlib.Path(spec)
  if p.is_file():
    return p
  files = find_files(spec, meta=True)
  if domain not in files:
    raise FileNotFoundError(f"--meta {spec}: no meta_{domain}.jsonl[.gz] (found: {', '.join(sorted(files))})")
  return files[domain]


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------
def iter_interactions(path: pathlib.Path, counts: dict[str, Any] | None = None, progress: bool = True,
                      desc: str = "") -> Iterator[tuple[str, str, list[str]]]:
  """(user_id, parent_asin, history asins) per good row of one benchmark CSV, in file order.

  Malformed rows are skipped and counted in `counts` (when given).
  """
  with open_text(path, "rt", newline="") as f, tqdm.tqdm(desc=desc or path.name, unit=" rows", unit_scale=True,
                                                         disable=not progress, mininterval=1.0) as bar:
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
      raise ValueError(f"{path}: empty file (expected a header with columns {', '.join(USED_COLUMNS)})")
    header = [h.strip() for h in header]
    missing = [c for c in USED_COLUMNS if c not in header]
    if missing:
      raise ValueError(f"{path}: no column {', '.join(missing)} in the header {header}")
    iu, ia, ih = (header.index(c) for c in USED_COLUMNS)
    n = len(header)
    done = 0
    for row in reader:
      done += 1
      if done == 10_000:
        bar.update(done)
        done = 0
      if not row:
        continue  # a blank line
      if counts is not None:
        counts["rows_read"] += 1
      if len(row) != n:
        if counts is not None:
          _skip(counts, "rows", f"{len(row)} fields, header has {n}", f"{path.name}:{reader.line_num}")
        continue
      user, asin = row[iu], row[ia]
      bad = next((what for what, v in (("user_id", user), ("parent_asin", asin))
                  if not v or any(c in v for c in "\t\n\r")), None)
      if bad is not None:
        if counts is not None:
          _skip(counts, "rows", f"empty {bad} or one with a tab / line break", f"{path.name}:{reader.line_num}")
        continue
      yield user, asin, [h for h in row[ih].split(" ") if h]
    bar.update(done)


def load_item_texts(path: pathlib.Path, wanted: set[str], counts: dict[str, Any], progress: bool = True
                    ) -> dict[str, str]:
  """asin -> `clean_metadata` text for the items of `wanted` in the meta file, in first-appearance order
  (a repeated asin: the last line's text)."""
  texts: dict[str, str] = {}
  for lineno, rec, why in iter_wanted_meta(path, wanted, counts, progress):
    if rec is None:
      _skip(counts, "meta", why, f"{path.name}:{lineno}")
      continue
    asin = rec["parent_asin"]
    if asin not in wanted:
      continue
    if asin in texts:
      counts["meta_duplicate"] += 1
    counts["meta_null_fields"] += sum(rec.get(k) is None for k in META_FIELDS)
    texts[asin] = clean_metadata(rec)
  counts["meta_items"] = len(texts)
  return texts


# ---------------------------------------------------------------------------
# Processing
# ---------------------------------------------------------------------------
class IdMap:
  """token -> id with "[PAD]" at 0, ids in first-seen order."""

  def __init__(self):
    self.to_id: dict[str, int] = {PAD: 0}
    self.tokens: list[str] = [PAD]

  def add(self, token: str) -> None:
    if token not in self.to_id:
      self.to_id[token] = len(self.tokens)
      self.tokens.append(token)

  def __len__(self) -> int:
    return len(self.tokens)


def process_split(rows: Iterator[tuple[str, str, list[str]]], texts: Mapping[str, str], max_his_len: int,
                  users: IdMap, items: IdMap, counts: dict[str, Any], out) -> dict[str, int]:
  """Filters, truncates and writes one split's rows to `out` (the header too); extends the id maps.

  Returns {"rows", "rows_history_len_1", "history_items"} of the rows written.
  """
  out.write(INTER_HEADER)
  stats = {"rows": 0, "rows_history_len_1": 0, "history_items": 0}
  for user, target, history in rows:
    if target not in texts:
      counts["rows_target_no_meta" if history else "rows_history_empty"] += 1
      continue
    kept = [h for h in history if h in texts]
    counts["history_items_no_meta"] += len(history) - len(kept)
    if not kept:
      counts["rows_history_no_meta" if history else "rows_history_empty"] += 1
      continue
    if len(kept) > max_his_len:
      counts["rows_truncated"] += 1
      kept = kept[-max_his_len:]
    out.write(f"{user}\t{' '.join(kept)}\t{target}\n")
    users.add(user)
    items.add(target)
    for h in kept:
      items.add(h)
    stats["rows"] += 1
    stats["rows_history_len_1"] += len(kept) == 1
    stats["history_items"] += len(kept)
  counts["rows_written"] += stats["rows"]
  return stats


def data_maps(users: IdMap, items: IdMap, texts: Mapping[str, str]) -> dict[str, Any]:
  """The seed's `data_maps` (id2meta keyed by int ids; `json.dump` makes them strings)."""
  id2meta: dict[int, str] = {0: PAD}
  for asin, text in texts.items():  # metadata-file order, as the seed iterates its item2meta
    i = items.to_id.get(asin)
    if i is not None:
      id2meta[i] = text
  return {"user2id": users.to_id, "id2user": users.tokens, "item2id": items.to_id, "id2item": items.tokens,
          "id2meta": id2meta}


def seed_statistics(split_stats: Mapping[str, Mapping[str, int]], n_users: int, item_texts: Sequence[str]
                    ) -> dict[str, Any]:
  """The seed's printed statistics (interactions: rows + rows whose history has one item)."""
  inter = {s: st["rows"] + st["rows_history_len_1"] for s, st in split_stats.items()}
  n_rows = sum(st["rows"] for st in split_stats.values())
  return {"users": n_users, "items": len(item_texts), "interactions_total": sum(inter.values()),
          "interactions": inter,
          "avg_history_length": sum(st["history_items"] for st in split_stats.values()) / max(n_rows, 1),
          "avg_metadata_chars": float(np.mean([len(t) for t in item_texts])) if item_texts else 0.0}


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = cli.ArgumentParser(prog="python -m mmret_jax.data.prepare_seqrec", description=__doc__)
  p.add_argument("--domain", required=True, help="category, e.g. All_Beauty (file names use it)")
  p.add_argument("--interactions", required=True,
                 help="dir with {domain}.{train,valid,test}.csv[.gz] (or its {domain}/ subdir), or the three "
                      "files comma-separated (train,valid,test)")
  p.add_argument("--meta", required=True, help="dir with meta_{domain}.jsonl[.gz], comma-separated meta files, "
                                               "or the meta file")
  p.add_argument("--output", required=True, help="output root; files go to OUTPUT/{domain}/")
  p.add_argument("--model", default=None, help="mmret_jax / Hugging Face text model dir for the item features "
                                               "(none: no .feature file)")
  p.add_argument("--feature-name", default=None,
                 help="the feature file is {domain}.NAME.feature (default: the --model dir's name)")
  p.add_argument("--max-his-len", type=int, default=50, help="keep the last N history items")
  p.add_argument("--max-length", type=int, default=512, help="tokens per item text for the features")
  p.add_argument("--batch-size", type=int, default=16, help="item texts per encoder batch")
  p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  args = p.parse_args(argv)
  if not args.domain.strip() or any(c in args.domain for c in "/\\"):
    p.error(f"--domain must be a category name, got {args.domain!r}")
  if args.max_his_len < 1:
    p.error(f"--max-his-len must be >= 1, got {args.max_his_len}")
  if args.max_length < 2 or args.batch_size < 1:
    p.error(f"--max-length must be >= 2 and --batch-size >= 1, got {args.max_length}, {args.batch_size}")
  if args.feature_name is not None and not args.model:
    p.error("--feature-name names the features of --model; give --model too")
  if args.feature_name is not None and (not args.feature_name or any(c in args.feature_name for c in "/\\")):
    p.error(f"--feature-name must be a plain name, got {args.feature_name!r}")
  return args


def report(counts: Mapping[str, Any], stats: Mapping[str, Any], file=None) -> None:
  """Prints the seed's statistics, then every count."""
  file = file or sys.stdout
  print(f"#Users: {stats['users']}", file=file)
  print(f"#Items: {stats['items']}", file=file)
  print(f"#Interaction in total: {stats['interactions_total']}", file=file)
  print(stats["interactions"], file=file)
  print(f"Average history length: {stats['avg_history_length']}", file=file)
  print(f"Average character length of metadata: {stats['avg_metadata_chars']}", file=file)
  width = max(len(label) for _, label in SUMMARY)
  for key, label in SUMMARY:
    print(f"{label:<{width}}  {counts[key]:>12,}", file=file)
  if counts["skip_reasons"]:
    print(f"skipped as malformed: {counts['skip_reasons']} (first at {counts['bad_lines']})", file=file)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the CLI; returns the statistics and counts (also in `{output}/{domain}/prepare_seqrec_stats.json`)."""
  args = parse_args(argv)
  progress = not args.no_progress
  domain = args.domain
  inter_files = find_interaction_files(args.interactions, domain)
  meta_file = find_meta_file(args.meta, domain)
  out_dir = pathlib.Path(args.output) / domain
  if out_dir.exists() and not out_dir.is_dir():
    raise NotADirectoryError(f"{out_dir} exists and is not a directory")
  feature_name = None
  if args.model:
    feature_name = args.feature_name or pathlib.Path(os.path.normpath(args.model)).name
  targets = {s: out_dir / f"{domain}.{s}.inter" for s in SPLITS}
  targets["data_maps"] = out_dir / f"{domain}.data_maps"
  if feature_name:
    targets["feature"] = out_dir / f"{domain}.{feature_name}.feature"
  existing = [str(t) for t in targets.values() if t.exists()]
  if existing and not args.overwrite:
    raise FileExistsError(f"{', '.join(existing)} exist; remove them or pass --overwrite.")

  encoder = None
  if args.model:  # load first: a bad model dir fails before the long passes
    from mmret_jax import embed  # pylint: disable=import-outside-toplevel
    encoder = embed.load(args.model)
    if args.max_length > encoder.max_positions:
      raise ValueError(f"--max-length {args.max_length} exceeds what {args.model} supports "
                       f"({encoder.max_positions} tokens); pass --max-length {encoder.max_positions} or less")

  counts = new_counts()
  wanted: set[str] = set()
  for split in SPLITS:  # pass 1: the asins the interactions mention
    for _, target, history in iter_interactions(inter_files[split], None, progress, f"scan {split}"):
      wanted.add(target)
      wanted.update(history)
  texts = load_item_texts(meta_file, wanted, counts, progress)
  del wanted

  out_dir.mkdir(parents=True, exist_ok=True)
  users, items = IdMap(), IdMap()
  split_stats: dict[str, dict[str, int]] = {}
  with storage.replaced_together(targets.values()) as twins:  # all outputs complete, or none replaced
    for split in SPLITS:
      with open(twins[targets[split]], "w", encoding="utf-8", newline="") as f:
        rows = iter_interactions(inter_files[split], counts, progress, split)
        split_stats[split] = process_split(rows, texts, args.max_his_len, users, items, counts, f)
    if not counts["rows_written"]:
      raise ValueError(f"No interaction row kept (every row was dropped or malformed): "
                       f"{ {k: counts[k] for k, _ in SUMMARY if k.startswith('rows') and counts[k]} }")
    maps = data_maps(users, items, texts)
    with open(twins[targets["data_maps"]], "w", encoding="utf-8") as f:
      json.dump(maps, f)
    item_texts = [maps["id2meta"][i] for i in range(1, len(items))]
    del texts
    dim = None
    if encoder is not None:
      emb = encoder.encode_text(item_texts, pooling="cls", max_length=args.max_length, normalize=False,
                                batch_size=args.batch_size, progress=progress)
      emb = np.ascontiguousarray(emb, dtype=np.float32)
      dim = int(emb.shape[1])
      emb.tofile(twins[targets["feature"]])
      del emb

  stats = seed_statistics(split_stats, len(users) - 1, item_texts)
  result = {"statistics": stats, "counts": counts, "splits": split_stats, "output": str(out_dir),
            "files": {k: str(v) for k, v in targets.items()}, "max_his_len": args.max_his_len,
            "interactions": {s: str(p) for s, p in inter_files.items()}, "meta": str(meta_file)}
  if encoder is not None:
    result["feature"] = {"model": args.model, "name": feature_name, "shape": [len(item_texts), dim],
                         "max_length": args.max_length, "pooling": "cls", "normalize": False,
                         "truncated_texts": encoder.num_truncated}
  (out_dir / STATS_FILE).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
  report(counts, stats)
  print(f"Wrote {', '.join(str(targets[s].name) for s in SPLITS)} and {targets['data_maps'].name} to {out_dir}")
  if encoder is not None:
    print(f"Wrote item features {targets['feature'].name}: float32 [{len(item_texts)}, {dim}] "
          f"(RecBole: plm_suffix: {feature_name}.feature, plm_size: {dim}); "
          f"{encoder.num_truncated} texts cut to {args.max_length} tokens")
  else:
    print("No --model: item features (.feature) not written")
  return result


def cli_main(argv: Sequence[str] | None = None) -> int:
  """`python -m mmret_jax.data.prepare_seqrec`: `main` with one-line errors and an exit status."""
  return cli.run(lambda: (main(argv), 0)[1])


if __name__ == "__main__":
  sys.exit(cli_main())
