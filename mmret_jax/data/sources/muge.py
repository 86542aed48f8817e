"""MUGE Multimodal_Retrieval data (Tianchi dataset 107332) as BagFormer reads it.

BagFormer (Hou et al., arXiv 2212.14322) fine-tunes and evaluates on MUGE. Seed:
`howard-hou/BagFormer` `MUGE_helper/dataset_helper.py` (`load_query_file`, `load_item_id2image`,
`load_img_from_text`) and `MUGE_helper/dataset.py` (`MultimodalRetrievalDataset`: train pairs,
valid `txt2img` / `img2txt`, test pool).

Layout (`LAYOUT`): `<root>/MR_{train,valid,test}_queries.jsonl` and `<root>/MR_<split>_imgs.tsv`;
the released archive's `<root>/Multimodal_Retrieval/` subfolder is found too.

* Queries: one JSON object per line, `{"query_id": int, "query_text": str, "item_ids": [int, ...]}`
  (no `item_ids` in test). Ids may also be decimal strings (the seed calls `int()` on them).
* Images: `item_id<TAB>base64 JPEG` per line, decoded with `base64.urlsafe_b64decode` (which also
  reads standard base64) and `PIL.Image.open(...).convert("RGB")`.

Memory: the real train TSV holds ~129k images (GBs). `ImageTable` reads it once and keeps per image
an int64 id, int64 byte offset and int32 length of the base64 field (plus an id -> row dict);
`load` reads one field with `os.pread`, so the table is thread-safe, and picklable for grain
workers (the file is reopened per process).

Differences from the seed, all counted and reported (`Skipped`, `ImageTable.report`,
`MugeSplit.notes`) where the seed would crash or silently differ:
* Malformed query lines (bad JSON, a missing or mistyped field, empty text, a repeated query_id) are
  skipped; the seed stops at the first one. A repeated query_id would break the seed's valid maps.
* A repeated item_id in a TSV keeps its first line; the seed's dict keeps the first position but
  the last image.
* A labelled item absent from the pool is skipped; the seed raises KeyError. A valid query left with
  no item in the pool is kept (it counts as a miss in `eval.muge.itm_eval`, as an image without
  ground truth does in the seed).

Shapes: Q queries, N pool images, P (query, item) pairs.
"""

from __future__ import annotations

import array
import base64
import binascii
import dataclasses
import importlib.resources
import io
import json
import logging
import os
import pathlib
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image

SPLITS = ("train", "valid", "test")
SUBDIR = "Multimodal_Retrieval"
LAYOUT = f"<root>[/{SUBDIR}]/MR_<split>_queries.jsonl and MR_<split>_imgs.tsv, split in {SPLITS}"
MAX_EXAMPLES = 5  # line numbers / ids kept per skip reason


@dataclasses.dataclass(frozen=True)
class Query:
  """One query line; `item_ids` is () for unlabelled (test) files."""
  query_id: int
  text: str
  item_ids: tuple[int, ...] = ()


@dataclasses.dataclass
class Skipped:
  """Skipped rows per reason, with the first `MAX_EXAMPLES` line numbers (or ids) of each.

  Attributes:
    counts: reason -> number skipped (e.g. "json", "missing:query_text", "duplicate_id").
    examples: reason -> first line numbers (1-based), or ids when `unit` is "item".
    unit: what `examples` hold ("line" or "item").
  """
  counts: dict[str, int] = dataclasses.field(default_factory=dict)
  examples: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
  unit: str = "line"

  def add(self, reason: str, example: Any) -> None:
    self.counts[reason] = self.counts.get(reason, 0) + 1
    ex = self.examples.setdefault(reason, [])
    if len(ex) < MAX_EXAMPLES:
      ex.append(example)

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def summary(self) -> str:
    """"json 1 (line 17), missing:query_text 2 (lines 3, 9)"; "none" if nothing was skipped."""
    if not self.counts:
      return "none"
    parts = []
    for reason, n in self.counts.items():
      ex = self.examples.get(reason, [])
      more = ", ..." if n > len(ex) else ""
      parts.append(f"{reason} {n} ({self.unit}{'s' * (len(ex) > 1)} {', '.join(map(str, ex))}{more})")
    return ", ".join(parts)


def _plural(n: int, word: str, many: str | None = None) -> str:
  return f"{n} {word if n == 1 else many or word + 's'}"


# ---------------------------------------------------------------------------
# Queries
# ---------------------------------------------------------------------------
class _Bad(Exception):
  """A malformed row; the message is the skip reason."""


def _as_id(v: Any, key: str) -> int:
  """An int id, or a decimal string of one (the seed's `int()`); no bool, float or sign."""
  if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
    return v
  if isinstance(v, str) and v.isascii() and v.isdigit():
    return int(v)
  raise _Bad(f"type:{key}")


def _parse_query(obj: Any, labelled: bool) -> Query:
  if not isinstance(obj, dict):
    raise _Bad("not_object")
  for key in ("query_id", "query_text") + (("item_ids",) if labelled else ()):
    if key not in obj:
      raise _Bad(f"missing:{key}")
  qid = _as_id(obj["query_id"], "query_id")
  text = obj["query_text"]
  if not isinstance(text, str):
    raise _Bad("type:query_text")
  if not text.strip():
    raise _Bad("empty:query_text")
  if not labelled:
    return Query(qid, text)
  items = obj["item_ids"]
  if not isinstance(items, list):
    raise _Bad("type:item_ids")
  if not items:
    raise _Bad("empty:item_ids")
  return Query(qid, text, tuple(_as_id(v, "item_ids") for v in items))


def read_queries(path: str | os.PathLike, *, labelled: bool, log: bool = True) -> tuple[list[Query], Skipped]:
  """Reads an `MR_<split>_queries.jsonl` file (seed `load_query_file`).

  Skipped and counted per reason (first line numbers kept): "json" (bad JSON or UTF-8),
  "not_object", "missing:<key>", "type:<key>" (ids must be non-negative ints or decimal strings,
  item_ids a list), "empty:query_text" (blank), "empty:item_ids" (labelled only), "duplicate_id"
  (a repeated query_id; the first line is kept). Blank lines are not rows. When `labelled` is
  False, `item_ids` is not read (test files have none). `log`: warn once if lines were skipped.

  Returns:
    (queries in file order, skip counts).

  Raises:
    FileNotFoundError: no such file. ValueError: the file has no valid query.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"MUGE query file not found: {path}; expected the layout {LAYOUT}")
  queries, skipped, seen = [], Skipped(), set()
  with open(path, "rb") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        try:
          obj = json.loads(line)
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
          raise _Bad("json") from None
        q = _parse_query(obj, labelled)
        if q.query_id in seen:
          raise _Bad("duplicate_id")
      except _Bad as e:
        skipped.add(str(e), lineno)
        continue
      seen.add(q.query_id)
      queries.append(q)
  if not queries:
    raise ValueError(f"{path} has no valid query line (skipped: {skipped.summary()}); expected one JSON "
                     'object per line like {"query_id": 1, "query_text": "...", "item_ids": [2]}')
  if log and skipped.total:
    logging.warning("%s: skipped %s: %s", path, _plural(skipped.total, "query line"), skipped.summary())
  return queries, skipped


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------
class ImageTable:
  """Random access to the images of an `MR_<split>_imgs.tsv` file without keeping them in memory.

  One streaming pass indexes item_id -> (offset, length) of its base64 field. Lines are skipped and
  counted in `skipped` ("no_tab", "fields" for more than one tab, "bad_id" for an id that is not a
  decimal integer, "empty_image", "duplicate_id": the first line is kept). Images that fail to
  decode are counted on `load` (distinct ids in `failed_ids`) and returned as None.

  Attributes:
    path: the TSV file.
    ids: item ids in pool order (= file order of the kept lines).
    skipped: per-reason counts with first line numbers.
    failed_ids: ids whose image did not decode so far.
  """

  def __init__(self, path: str | os.PathLike, *, log: bool = True):
    self.path = pathlib.Path(path)
    if not self.path.is_file():
      raise FileNotFoundError(f"MUGE image file not found: {self.path}; expected the layout {LAYOUT}")
    self.skipped = Skipped()
    ids, offsets, lengths = array.array("q"), array.array("q"), array.array("i")
    self._row: dict[int, int] = {}
    pos = 0
    with open(self.path, "rb") as f:
      for lineno, line in enumerate(f, start=1):
        start, pos = pos, pos + len(line)
        if not line.strip():
          continue
        tab = line.find(b"\t")
        rest = line[tab + 1:]
        field, key = rest.strip(), line[:tab].strip()
        if tab < 0:
          reason = "no_tab"
        elif b"\t" in field:
          reason = "fields"
        elif not (key.isdigit() and key.isascii()):
          reason = "bad_id"
        elif not field:
          reason = "empty_image"
        elif int(key) in self._row:
          reason = "duplicate_id"
        else:
          reason = None
        if reason:
          self.skipped.add(reason, lineno)
          continue
        self._row[int(key)] = len(ids)
        ids.append(int(key))
        offsets.append(start + tab + 1 + len(rest) - len(rest.lstrip()))
        lengths.append(len(field))
    if not ids:
      raise ValueError(f"{self.path} has no valid image line (skipped: {self.skipped.summary()}); "
                       "expected `item_id<TAB>base64 JPEG` per line")
    self._ids = np.frombuffer(ids, np.int64)
    self._offsets, self._lengths = np.frombuffer(offsets, np.int64), np.frombuffer(lengths, np.int32)
    self.failed_ids: set[int] = set()
    self._lock, self._fd, self._pid = threading.Lock(), None, None
    if log and self.skipped.total:
      logging.warning("%s", self.report())

  @property
  def ids(self) -> list[int]:
    """Item ids in pool order."""
    return self._ids.tolist()

  def __len__(self) -> int:
    return len(self._ids)

  def __contains__(self, item_id: object) -> bool:
    return item_id in self._row

  def index(self, item_id: int) -> int:
    """Pool position of an item; KeyError naming the file if it is not there."""
    try:
      return self._row[item_id]
    except KeyError:
      raise KeyError(f"item {item_id} is not in {self.path}") from None

  def _read(self, row: int) -> bytes:
    with self._lock:
      if self._fd is None or self._pid != os.getpid():
        self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
      fd = self._fd
    return os.pread(fd, int(self._lengths[row]), int(self._offsets[row]))

  def raw(self, item_id: int) -> bytes:
    """The base64 field of an item, as stored (without the line break)."""
    return self._read(self.index(item_id))

  def load_at(self, row: int) -> PIL.Image.Image | None:
    """The RGB image at pool position `row`; None (and counted) if it does not decode."""
    if not -len(self) <= row < len(self):
      raise IndexError(f"image {row} out of range for {len(self)} images of {self.path}")
    row %= len(self)
    try:
      with PIL.Image.open(io.BytesIO(base64.urlsafe_b64decode(self._read(row)))) as img:
        return img.convert("RGB")
    except (binascii.Error, ValueError, OSError, PIL.Image.DecompressionBombError):
      with self._lock:
        self.failed_ids.add(int(self._ids[row]))
      return None

  def load(self, item_id: int) -> PIL.Image.Image | None:
    """The RGB image of an item (seed `load_img_from_text`); None (and counted) if it does not decode."""
    return self.load_at(self.index(item_id))

  def report(self) -> str:
    """One line: images indexed, lines skipped per reason, images that failed to decode."""
    out = f"{self.path.name}: {len(self)} images"
    if self.skipped.total:
      out += f"; skipped {_plural(self.skipped.total, 'line')}: {self.skipped.summary()}"
    if self.failed_ids:
      ex = ", ".join(map(str, sorted(self.failed_ids)[:MAX_EXAMPLES]))
      more = ", ..." if len(self.failed_ids) > MAX_EXAMPLES else ""
      n = len(self.failed_ids)
      out += f"; {_plural(n, 'image')} did not decode ({'item' if n == 1 else 'items'} {ex}{more})"
    return out

  def __getstate__(self):  # picklable: the lock and file are recreated per process
    return {**self.__dict__, "_lock": None, "_fd": None, "_pid": None}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __del__(self):
    if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
      os.close(self._fd)

  def __repr__(self) -> str:
    return f"ImageTable({str(self.path)!r}, images={len(self)})"


# ---------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------
def find_root(root: str | os.PathLike, split: str) -> pathlib.Path:
  """`root`, or `root/Multimodal_Retrieval`, whichever holds `MR_<split>_queries.jsonl`."""
  root = pathlib.Path(root)
  for d in (root, root / SUBDIR):
    if (d / f"MR_{split}_queries.jsonl").is_file():
      return d
  raise FileNotFoundError(f"MR_{split}_queries.jsonl not found in {root} or {root / SUBDIR}; expected "
                          f"the layout {LAYOUT}")


class MugeSplit:
  """One MUGE split: queries, image pool and (train / valid) the labels as index lists.

  Attributes:
    root: the folder that holds the split's files.
    split: "train", "valid" or "test".
    queries: valid queries in file order (`read_queries`); `skipped_queries` their skip counts.
    images: the pool (`ImageTable`), pool order = TSV order.
    missing: labelled items absent from the pool, counted under "missing_image" (examples are
      item ids); `queries_without_images` lists query ids left with no pooled item.
  """

  def __init__(self, root: str | os.PathLike, split: str):
    if split not in SPLITS:
      raise ValueError(f"MUGE split must be one of {SPLITS}, got {split!r}")
    self.split = split
    self.root = find_root(root, split)
    self.queries, self.skipped_queries = read_queries(self.root / f"MR_{split}_queries.jsonl",
                                                      labelled=split != "test", log=False)
    self.images = ImageTable(self.root / f"MR_{split}_imgs.tsv", log=False)
    self.missing = Skipped(unit="item")
    self.queries_without_images: list[int] = []
    self._pairs: np.ndarray | None = None
    self._txt2img: list[list[int]] | None = None
    self._img2txt: list[list[int]] | None = None
    if split != "test":
      self._index_labels()
    if notes := self.notes():
      logging.warning("MUGE %s at %s:\n  %s", split, self.root, "\n  ".join(notes))

  def _index_labels(self) -> None:
    """(query, pool) pairs in the seed's order: queries in file order, items in item_ids order."""
    pairs = array.array("q")
    txt2img: list[list[int]] = [[] for _ in self.queries]
    img2txt: list[list[int]] = [[] for _ in range(len(self.images))]
    for qi, q in enumerate(self.queries):
      for item in q.item_ids:
        if item not in self.images:
          self.missing.add("missing_image", item)
          continue
        row = self.images.index(item)
        pairs.extend((qi, row))
        txt2img[qi].append(row)
        img2txt[row].append(qi)
      if not txt2img[qi]:
        self.queries_without_images.append(q.query_id)
    self._pairs = np.frombuffer(pairs, np.int64).reshape(-1, 2)
    self._txt2img, self._img2txt = txt2img, img2txt

  def _labels(self, what: str):
    value = getattr(self, f"_{what}")
    if value is None:
      raise ValueError(f"MUGE {self.split} has no labels, so no `{what}` (test item_ids are hidden)")
    return value

  @property
  def pairs(self) -> np.ndarray:
    """[P, 2] int64 (query index, pool index), one per labelled item present in the pool."""
    return self._labels("pairs")

  @property
  def txt2img(self) -> list[list[int]]:
    """Per query, the pool indices of its items (item_ids order); [] if none is pooled."""
    return self._labels("txt2img")

  @property
  def img2txt(self) -> list[list[int]]:
    """Per pool image, the indices of the queries that list it; [] for images no query lists."""
    return self._labels("img2txt")

  @property
  def query_ids(self) -> list[int]:
    return [q.query_id for q in self.queries]

  @property
  def texts(self) -> list[str]:
    return [q.text for q in self.queries]

  @property
  def pool_ids(self) -> list[int]:
    return self.images.ids

  def notes(self) -> list[str]:
    """What was skipped or will be scored as a miss, one line each; [] when nothing was."""
    notes = []
    if self.skipped_queries.total:
      notes.append(f"MR_{self.split}_queries.jsonl: skipped {_plural(self.skipped_queries.total, 'line')}: "
                   f"{self.skipped_queries.summary()}")
    if self.images.skipped.total or self.images.failed_ids:
      notes.append(self.images.report())
    if self.missing.total:
      notes.append(f"{_plural(self.missing.total, 'labelled item')} not in MR_{self.split}_imgs.tsv, "
                   f"skipped: {self.missing.summary()}")
    if n := len(self.queries_without_images):
      ex = ", ".join(map(str, self.queries_without_images[:MAX_EXAMPLES]))
      more = ", ..." if n > MAX_EXAMPLES else ""
      miss = "; eval.muge.itm_eval counts them as misses" if self.split == "valid" else ""
      notes.append(f"{_plural(n, 'query', 'queries')} with no item in the pool (query ids {ex}{more}){miss}")
    return notes

  def __repr__(self) -> str:
    return f"MugeSplit({str(self.root)!r}, {self.split!r}, queries={len(self.queries)}, images={len(self.images)})"


def bert_tokenizer(vocab_file: str | os.PathLike, *, do_lower_case: bool = True, model_max_length: int = 512):
  """A `BertTokenizerFast` over a bert-base-chinese-style `vocab.txt` (one token per line, id = line).

  transformers 5 takes the vocabulary as `vocab=` and silently ignores `vocab_file=` (leaving a
  5-token vocab that maps every character to [UNK]); this passes it under the name the installed
  version reads and checks that every line became a token. Chinese characters are split one per
  token (`tokenize_chinese_chars=True`), as bert-base-chinese does.
  """
  import inspect  # pylint: disable=import-outside-toplevel
  from transformers import BertTokenizerFast  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(vocab_file)
  if not path.is_file():
    raise FileNotFoundError(f"WordPiece vocab not found: {path}")
  tokens = path.read_text(encoding="utf-8").split("\n")
  tokens = tokens[:-1] if tokens and tokens[-1] == "" else tokens
  vocab: dict[str, int] = {}
  for lineno, tok in enumerate(tokens, start=1):
    tok = tok.rstrip("\r")
    if tok in vocab:
      raise ValueError(f"{path}:{lineno}: token {tok!r} repeats line {vocab[tok] + 1}; ids would shift")
    vocab[tok] = lineno - 1
  if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:
    kw: dict[str, Any] = {"vocab": vocab}
  else:  # transformers 4
    kw = {"vocab_file": str(path)}
  tok = BertTokenizerFast(**kw, do_lower_case=do_lower_case, tokenize_chinese_chars=True,
                          model_max_length=model_max_length)
  if len(tok) != len(vocab):
    raise ValueError(f"{path}: the tokenizer has {len(tok)} tokens for {len(vocab)} vocab lines")
  return tok


def load_splits(root: str | os.PathLike, splits: Sequence[str] = SPLITS) -> dict[str, MugeSplit]:
  """{split: MugeSplit(root, split)} for each split."""
  return {s: MugeSplit(root, s) for s in splits}


def sample_root() -> pathlib.Path:
  """The bundled synthetic MUGE sample (`mmret_jax/data/samples/muge`): all three splits in the real
  formats, plus `entity_dict.txt` and a character-level `vocab.txt` (see `make_muge_sample`)."""
  root = pathlib.Path(str(importlib.resources.files("mmret_jax.data.samples") / "muge"))
  if not (root / "MR_train_queries.jsonl").is_file():
    raise FileNotFoundError(f"bundled MUGE sample not found at {root}; regenerate it with "
                            "`python -m mmret_jax.data.samples.make_muge_sample`")
  return root
