"""Composed image retrieval data for Bi-BLIP4CIR (Liu et al., WACV 2024, arXiv 2303.16604).

FashionIQ and CIRR annotations in their official layouts, the seed's caption prompts and the
FashionIQ caption composition. Seed: `Cuberick-Orion/Bi-Blip4CIR` `src/data_utils.py`
(`FashionIQDataset`, `CIRRDataset`, `__prepend_text__`), `src/utils.py`
(`generate_randomized_fiq_caption`) and `src/validate.py` (deterministic val captions).

Layouts (every `.json` may also be stored as `<name>.json.gz`, read when the plain file is absent):

* FashionIQ `root/`: `captions/cap.<category>.<split>.json` (list of `{"target", "candidate",
  "captions": [str, str]}`; "candidate" is the reference; test rows have no target),
  `image_splits/split.<category>.<split>.json` (list of ASINs), images `images/<ASIN>.jpg`
  (`.png` when no `.jpg` exists) under `image_root` (default `root`).
* CIRR: the annotation dir holds `captions/cap.rc2.<split>.json` and
  `image_splits/split.rc2.<split>.json` (image name -> path such as `./dev/dev-244-0-img0.png`).
  As in the seed (`cirr_dataset/cirr/captions/...`, images at `cirr_dataset/<path>`), the paths are
  relative to the folder that *contains* the annotation dir, which is the default `image_root`.
  `root` may be the annotation dir or that containing folder (then `root/cirr/` is used).

`sample_root(dataset)` gives the bundled real val (+ CIRR test1) annotations, without images.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import logging
import os
import pathlib
import random
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from mmret_jax.data.sources.amazon_reviews import open_text

FIQ_CATEGORIES = ("dress", "shirt", "toptee")
FIQ_SPLITS = ("train", "val", "test")
CIRR_SPLITS = ("train", "val", "test1")
DIRECTION_TAGS = {"forward": "[FORWARD]", "backward": "[BACKWARD]"}
MAX_BAD_ROWS = 5  # row indices kept per file in `stats["files"][...]["bad_rows"]`

Rng = random.Random | np.random.Generator
_WORD_AND = re.compile(r"\band\b")
_FIQ_STRIP = ".?, "  # characters the seed strips from both ends of a FashionIQ caption


@dataclasses.dataclass(frozen=True)
class CIRQuery:
  """One composed query: reference image + modification text -> target image.

  Attributes:
    row: 0-based position of the row in its captions file.
    reference: reference image name (FashionIQ "candidate" ASIN, CIRR "reference").
    target: target image name (CIRR "target_hard"); None where the split has no targets.
    captions: raw caption(s) as in the file: FashionIQ 2, CIRR 1.
    pair_id: CIRR "pairid"; None for FashionIQ.
    members: CIRR `img_set.members` (the subset for Recall_subset); () for FashionIQ.
    category: FashionIQ category; None for CIRR.
  """
  row: int
  reference: str
  target: str | None
  captions: tuple[str, ...]
  pair_id: int | None = None
  members: tuple[str, ...] = ()
  category: str | None = None


@dataclasses.dataclass(frozen=True)
class EvalGroup:
  """Queries ranked against one gallery (a FashionIQ category, or all of a CIRR split)."""
  name: str
  queries: tuple[CIRQuery, ...]
  index_names: tuple[str, ...]


# ---------------------------------------------------------------------------
# Direction prompts and caption composition
# ---------------------------------------------------------------------------
def _tag(direction: str) -> str:
  try:
    return DIRECTION_TAGS[direction]
  except KeyError:
    raise ValueError(f"direction must be 'forward' or 'backward', got {direction!r}") from None


def prepend_direction(text: str, direction: str, quirk: bool = True) -> str:
  """Inserts the direction tag (`[FORWARD]` / `[BACKWARD]`) before every "and"-separated chunk.

  quirk=True is the seed's `__prepend_text__` exactly: split on the raw substring "and" (also
  inside words: "standing" -> "st" + "and" + "ing"), put `" [FORWARD] "` before each chunk and join
  the chunks with "and". The result keeps the seed's spacing (leading space, doubled spaces).

  quirk=False splits only on the whole, lower-case word "and" (regex `\\band\\b`, case-sensitive
  like the seed), prefixes each chunk with the tag, joins with " and ", then collapses every run of
  whitespace to one space and strips the ends. BERT's tokenizer splits on whitespace, so the two
  variants give the same tokens unless the caption has an "and" inside a word.
  """
  tag = _tag(direction)
  if quirk:
    return "and".join(f" {tag} {chunk}" for chunk in text.split("and"))
  return " ".join(" and ".join(f"{tag} {chunk}" for chunk in _WORD_AND.split(text)).split())


def fiq_choice(u: float) -> int:
  """The seed's 4-way pick from a uniform draw `u` in [0, 1).

  0: "c1 and c2" (u < .25), 1: "c2 and c1" (.25 < u < .5), 2: c1 (.5 < u < .75), 3: c2 otherwise.
  Like the seed's chained strict comparisons, exactly .25 and .5 fall through to 3.
  """
  if u < 0.25:
    return 0
  if 0.25 < u < 0.5:
    return 1
  if 0.5 < u < 0.75:
    return 2
  return 3


def compose_fiq(first: str, second: str, choice: int = 0) -> str:
  """One FashionIQ text from two captions, as the seed writes it.

  Captions are stripped of ".?, " at both ends; the leading one is `str.capitalize()`d (which also
  lower-cases the rest, e.g. a leading "[FORWARD]" becomes "[forward]"; harmless for the uncased
  tokenizer). choice 0: "First and second", 1: "Second and first", 2: "First", 3: "Second".
  """
  a, b = first.strip(_FIQ_STRIP), second.strip(_FIQ_STRIP)
  if choice == 0:
    return f"{a.capitalize()} and {b}"
  if choice == 1:
    return f"{b.capitalize()} and {a}"
  if choice == 2:
    return a.capitalize()
  if choice == 3:
    return b.capitalize()
  raise ValueError(f"choice must be 0..3, got {choice}")


def randomize_fiq_captions(pairs: Sequence[Sequence[str]], rng: Rng) -> list[str]:
  """The seed's `generate_randomized_fiq_caption`: one `rng.random()` draw per pair, in order.

  `pairs` hold already prompted captions. The seed calls this once on the batch's forward pairs and
  then once on its backward pairs; doing the same with a `random.Random` reproduces its stream.
  """
  return [compose_fiq(c1, c2, fiq_choice(rng.random())) for c1, c2 in pairs]


def query_text(query: CIRQuery, direction: str | None = "forward", rng: Rng | None = None,
               quirk: bool = True) -> str:
  """The text the text encoder sees for `query`.

  The prompt is applied to each raw caption first, then FashionIQ captions are composed (the
  seed's dataset prompts in `__getitem__`, the training / validation loops compose afterwards).
  FashionIQ: `rng` None gives the deterministic val/test text (choice 0), otherwise one random
  draw (`fiq_choice(rng.random())`). CIRR: the single caption, prompted; `rng` is unused.

  Args:
    query: a FashionIQ (`category` set) or CIRR query.
    direction: "forward", "backward", or None for no prompt at all.
    rng: `random.Random` or `numpy.random.Generator` (anything with `.random()`).
    quirk: passed to `prepend_direction`.
  """
  caps = query.captions
  if direction is not None:
    caps = tuple(prepend_direction(c, direction, quirk) for c in caps)
  if query.category is None:
    return caps[0]
  return compose_fiq(caps[0], caps[1], 0 if rng is None else fiq_choice(rng.random()))


def train_texts(query: CIRQuery, rng: Rng, quirk: bool = True) -> tuple[str, str]:
  """(forward, backward) training texts; FashionIQ draws forward first, then backward.

  The two FashionIQ compositions are independent draws as in the seed (which draws all forward
  captions of a batch, then all backward ones; per query the distribution is the same).
  """
  return (query_text(query, "forward", rng, quirk), query_text(query, "backward", rng, quirk))


def eval_text(query: CIRQuery, quirk: bool = True) -> str:
  """The validation / test text: forward prompt, deterministic FashionIQ composition."""
  return query_text(query, "forward", None, quirk)


# ---------------------------------------------------------------------------
# File reading and row checks
# ---------------------------------------------------------------------------
class _Bad(Exception):
  """A malformed row; the message is the skip reason."""


def _file_stats() -> dict[str, Any]:
  return {"rows": 0, "skipped": 0, "skip_reasons": {}, "bad_rows": []}


def _skip(stats: dict[str, Any], reason: str, row: int) -> None:
  stats["skipped"] += 1
  stats["skip_reasons"][reason] = stats["skip_reasons"].get(reason, 0) + 1
  if len(stats["bad_rows"]) < MAX_BAD_ROWS:
    stats["bad_rows"].append(row)


def _read_json(base: pathlib.Path, rel: str, layout: str) -> Any:
  """Parses `base/rel`, or `base/rel.gz` when the plain file is absent."""
  path = base / rel
  if not path.is_file():
    gz = path.with_name(path.name + ".gz")
    if not gz.is_file():
      raise FileNotFoundError(f"{path} (or {gz.name}) not found; expected the official layout {layout}")
    path = gz
  try:
    with open_text(path) as f:
      return json.load(f)
  except (ValueError, OSError) as e:  # JSONDecodeError, UnicodeDecodeError, BadGzipFile
    raise ValueError(f"{path} is not a readable JSON file ({type(e).__name__}: {e}); "
                     "re-download or re-copy it") from None


def _expect(data: Any, kind: type, path: str) -> Any:
  if not isinstance(data, kind):
    raise ValueError(f"{path}: expected a JSON {'list' if kind is list else 'object'} at the top "
                     f"level, got {type(data).__name__}; is this the right file?")
  return data


def _get(row: dict, key: str, kind: type, required: bool = True, empty_ok: bool = False) -> Any:
  """`row[key]` if it has type `kind` (not bool; a str must be non-empty unless `empty_ok`)."""
  if key not in row:
    if required:
      raise _Bad(f"missing:{key}")
    return None
  v = row[key]
  if not isinstance(v, kind) or isinstance(v, bool) or (kind is str and not v and not empty_ok):
    raise _Bad(f"type:{key}")
  return v


def _str_list(v: Any, key: str, length: int | None = None) -> tuple[str, ...]:
  if not isinstance(v, list) or not all(isinstance(x, str) for x in v) or (
      length is not None and len(v) != length):
    raise _Bad(f"type:{key}")
  return tuple(v)


def _summarise(what: str, files: dict[str, dict[str, Any]], **counts: int) -> dict[str, Any]:
  """Merges per-file counters into the loader's `stats` (and warns once if rows were skipped)."""
  reasons: dict[str, int] = {}
  for s in files.values():
    for k, n in s["skip_reasons"].items():
      reasons[k] = reasons.get(k, 0) + n
  stats = {**counts, "skipped": sum(s["skipped"] for s in files.values()), "skip_reasons": reasons,
           "files": files}
  if stats["skipped"]:
    bad = {f: s["bad_rows"] for f, s in files.items() if s["skipped"]}
    logging.warning("%s: skipped %d malformed rows %s (first rows per file: %s).", what,
                    stats["skipped"], reasons, bad)
  return stats


def _read_name_list(base: pathlib.Path, rel: str, layout: str, stats: dict[str, Any]) -> tuple[str, ...]:
  names, seen = [], set()
  for i, v in enumerate(_expect(_read_json(base, rel, layout), list, str(base / rel))):
    if not isinstance(v, str) or not v:
      _skip(stats, "type:name", i)
    elif v in seen:
      _skip(stats, "duplicate", i)
    else:
      seen.add(v)
      names.append(v)
  stats["rows"] = len(names)
  return tuple(names)


# ---------------------------------------------------------------------------
# FashionIQ
# ---------------------------------------------------------------------------
_FIQ_LAYOUT = ("<root>/captions/cap.<category>.<split>.json, <root>/image_splits/split.<category>."
               "<split>.json, <image_root>/images/<ASIN>.jpg")


def _fiq_row(row: Any, i: int, category: str, split: str) -> CIRQuery:
  if not isinstance(row, dict):
    raise _Bad("not_object")
  reference = _get(row, "candidate", str)
  target = _get(row, "target", str, required=split != "test")
  captions = _str_list(_get(row, "captions", list), "captions", 2)
  return CIRQuery(row=i, reference=reference, target=target, captions=captions, category=category)


class FashionIQ:
  """FashionIQ queries and per-category galleries of one split (seed: `FashionIQDataset`).

  Attributes:
    queries: all queries, category by category in `categories` order, file order within each.
    index_names: category -> image names of `image_splits/split.<category>.<split>.json`.
    stats: `queries`, `index_images`, `skipped`, `skip_reasons` and per-file counters under
      `files` (`rows` kept, `skipped`, `skip_reasons`, first `bad_rows`). Malformed rows (not an
      object, a missing key, a wrong type, captions not 2 strings, a repeated image name) are
      skipped and counted here.
  """

  dataset = "fashioniq"

  def __init__(self, root: str | os.PathLike, split: str = "val",
               categories: Sequence[str] = FIQ_CATEGORIES, image_root: str | os.PathLike | None = None):
    if split not in FIQ_SPLITS:
      raise ValueError(f"FashionIQ split must be one of {FIQ_SPLITS}, got {split!r}")
    bad = [c for c in categories if c not in FIQ_CATEGORIES]
    if bad or not categories:
      raise ValueError(f"FashionIQ categories must be a non-empty subset of {FIQ_CATEGORIES}, got "
                       f"{list(categories)}")
    self.root = pathlib.Path(root)
    self.image_root = pathlib.Path(image_root) if image_root is not None else self.root
    self.split = split
    self.categories = tuple(categories)
    files: dict[str, dict[str, Any]] = {}
    queries: list[CIRQuery] = []
    self.index_names: dict[str, tuple[str, ...]] = {}
    for cat in self.categories:
      rel = f"captions/cap.{cat}.{split}.json"
      stats = files[rel] = _file_stats()
      rows = _expect(_read_json(self.root, rel, _FIQ_LAYOUT), list, str(self.root / rel))
      for i, row in enumerate(rows):
        try:
          queries.append(_fiq_row(row, i, cat, split))
          stats["rows"] += 1
        except _Bad as e:
          _skip(stats, str(e), i)
      rel = f"image_splits/split.{cat}.{split}.json"
      files[rel] = _file_stats()
      self.index_names[cat] = _read_name_list(self.root, rel, _FIQ_LAYOUT, files[rel])
    self.queries = tuple(queries)
    self.stats = _summarise(f"FashionIQ {split} at {self.root}", files, queries=len(queries),
                            index_images=sum(len(v) for v in self.index_names.values()))

  def category_queries(self, category: str) -> tuple[CIRQuery, ...]:
    """The queries of one category, in file order."""
    return tuple(q for q in self.queries if q.category == category)

  def eval_groups(self) -> list[EvalGroup]:
    """One group per category: its queries against its own gallery (reference not removed)."""
    return [EvalGroup(c, self.category_queries(c), self.index_names[c]) for c in self.categories]

  def image_names(self) -> list[str]:
    """Sorted names of every image the split mentions (galleries, references, targets)."""
    names = {n for v in self.index_names.values() for n in v}
    names.update(q.reference for q in self.queries)
    names.update(q.target for q in self.queries if q.target is not None)
    return sorted(names)

  def image_path(self, name: str) -> pathlib.Path:
    """`<image_root>/images/<name>.jpg`, or the `.png` when only that exists."""
    jpg = self.image_root / "images" / f"{name}.jpg"
    if not jpg.exists():
      png = jpg.with_suffix(".png")
      if png.exists():
        return png
    return jpg

  def __repr__(self) -> str:
    return f"FashionIQ({str(self.root)!r}, split={self.split!r}, queries={len(self.queries)})"


# ---------------------------------------------------------------------------
# CIRR
# ---------------------------------------------------------------------------
_CIRR_LAYOUT = ("<dataset>/cirr/captions/cap.rc2.<split>.json, <dataset>/cirr/image_splits/"
                "split.rc2.<split>.json, images at <dataset>/<path from the split file>")


def _cirr_row(row: Any, i: int, split: str) -> CIRQuery:
  if not isinstance(row, dict):
    raise _Bad("not_object")
  pair_id = _get(row, "pairid", int)
  reference = _get(row, "reference", str)
  target = _get(row, "target_hard", str, required=split != "test1")
  caption = _get(row, "caption", str, empty_ok=True)  # test1 has a caption " "
  members = _str_list(_get(_get(row, "img_set", dict), "members", list), "img_set.members")
  if not members:
    raise _Bad("type:img_set.members")
  return CIRQuery(row=i, reference=reference, target=target, captions=(caption,), pair_id=pair_id,
                  members=members)


class CIRR:
  """CIRR queries and gallery of one split (seed: `CIRRDataset`), version rc2.

  Attributes:
    queries: queries in file order.
    index_names: every image name of `split.rc2.<split>.json`, in file order (the gallery).
    relpaths: image name -> path relative to `image_root`, as in the split file.
    stats: `queries`, `index_images`, `skipped`, `skip_reasons`, per-file counters under `files`.
      Skipped and counted: rows that are not objects, miss a key or have a wrong type (reasons
      `missing:<key>` / `type:<key>`), a repeated pairid (`duplicate_pairid`), a reference or
      target absent from the split file (`unknown_image`); split entries whose path is not a
      string (`type:path`).
  """

  dataset = "cirr"

  def __init__(self, root: str | os.PathLike, split: str = "val",
               image_root: str | os.PathLike | None = None):
    if split not in CIRR_SPLITS:
      raise ValueError(f"CIRR split must be one of {CIRR_SPLITS}, got {split!r}")
    root = pathlib.Path(root)
    nested = root / "cirr"
    self.root = nested if (nested / "captions").is_dir() or (nested / "image_splits").is_dir() else root
    self.image_root = pathlib.Path(image_root) if image_root is not None else self.root.parent
    self.split = split
    files: dict[str, dict[str, Any]] = {}

    rel = f"image_splits/split.rc2.{split}.json"
    stats = files[rel] = _file_stats()
    self.relpaths: dict[str, str] = {}
    split_map = _expect(_read_json(self.root, rel, _CIRR_LAYOUT), dict, str(self.root / rel))
    for i, (name, path) in enumerate(split_map.items()):
      if isinstance(path, str) and path and name:
        self.relpaths[name] = path
      else:
        _skip(stats, "type:path", i)
    stats["rows"] = len(self.relpaths)
    self.index_names = tuple(self.relpaths)

    rel = f"captions/cap.rc2.{split}.json"
    stats = files[rel] = _file_stats()
    queries, seen = [], set()
    for i, row in enumerate(_expect(_read_json(self.root, rel, _CIRR_LAYOUT), list, str(self.root / rel))):
      try:
        q = _cirr_row(row, i, split)
        if q.pair_id in seen:
          raise _Bad("duplicate_pairid")
        if q.reference not in self.relpaths or (q.target is not None and q.target not in self.relpaths):
          raise _Bad("unknown_image")
      except _Bad as e:
        _skip(stats, str(e), i)
        continue
      seen.add(q.pair_id)
      queries.append(q)
    stats["rows"] = len(queries)
    self.queries = tuple(queries)
    self.stats = _summarise(f"CIRR {split} at {self.root}", files, queries=len(queries),
                            index_images=len(self.index_names))

  def eval_groups(self) -> list[EvalGroup]:
    """One group: all queries against the whole split (the reference is removed at ranking)."""
    return [EvalGroup("cirr", self.queries, self.index_names)]

  def image_names(self) -> list[str]:
    """Sorted names of the split file (references, targets and members all come from it)."""
    return sorted(self.relpaths)

  def image_path(self, name: str) -> pathlib.Path:
    """`<image_root>/<path from the split file>`; KeyError for a name the split does not list."""
    try:
      return self.image_root / self.relpaths[name]
    except KeyError:
      raise KeyError(f"CIRR {self.split}: image {name!r} is not in "
                     f"image_splits/split.rc2.{self.split}.json") from None

  def __repr__(self) -> str:
    return f"CIRR({str(self.root)!r}, split={self.split!r}, queries={len(self.queries)})"


def load(dataset: str, root: str | os.PathLike, split: str = "val", **kwargs) -> FashionIQ | CIRR:
  """`FashionIQ(root, split, **kwargs)` or `CIRR(root, split, **kwargs)` by name."""
  key = dataset.lower()
  if key == "fashioniq":
    return FashionIQ(root, split, **kwargs)
  if key == "cirr":
    return CIRR(root, split, **kwargs)
  raise ValueError(f"dataset must be 'fashioniq' or 'cirr', got {dataset!r}")


def sample_root(dataset: str) -> pathlib.Path:
  """The bundled annotation root (`mmret_jax/data/samples/cir/<dataset>`; no images).

  FashionIQ: val captions + splits; CIRR: val and test1 captions + splits. All `.json.gz`.
  """
  key = dataset.lower()
  if key not in ("fashioniq", "cirr"):
    raise ValueError(f"dataset must be 'fashioniq' or 'cirr', got {dataset!r}")
  root = pathlib.Path(str(importlib.resources.files("mmret_jax.data.samples") / "cir" / key))
  if not root.is_dir():
    raise FileNotFoundError(f"bundled CIR samples not found at {root}; reinstall mmret_jax from a "
                            "source checkout (package data data/samples/**)")
  return root
