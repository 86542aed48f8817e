"""M-BEIR data for UniIR (Wei et al., ECCV 2024, arXiv 2311.17136).

The M-BEIR root in its released layout (HF `TIGER-Lab/M-BEIR`, `LAYOUT`), its JSONL schema, query
instructions, qrels, union training data, Recall@K and run files. Seed: `TIGER-AI-Lab/UniIR`
`src/data/preprocessing/utils.py` (ids, `MBEIR_TASK`, `format_string`, hashing),
`src/data/mbeir_dataset.py` (`MBEIRMainDataset`: instruction + query text, positive draw),
`src/data/mbeir_data_generator.py` (union pools, up-sampling, qrels) and
`src/common/mbeir_retriever.py` (`load_qrel`, `compute_recall_at_k`, run files, UniRAG records).
Images live under `image_root` (default the root) at each record's `img_path` / `query_img_path`.

Memory: `JsonlRecords` reads a file once, validating every line, and keeps numpy arrays only
(per valid line: byte offset int64, length int32, hashed id int64, modality uint8 = 21 bytes, so
~120 MB for the 5.6M-line global pool, plus an int64 argsort and sorted copy if the ids are not
increasing). A record is parsed again on access (`os.pread`), so the object is a picklable grain
random-access source. The first pass costs one `json.loads` per line (~30-60 s for the global pool).
"""

from __future__ import annotations

import array
import dataclasses
import hashlib
import importlib.resources
import json
import logging
import os
import pathlib
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

DATASET_IDS = {"VisualNews": 0, "Fashion200K": 1, "WebQA": 2, "EDIS": 3, "NIGHTS": 4, "OVEN": 5,
               "INFOSEEK": 6, "FashionIQ": 7, "CIRR": 8, "MSCOCO": 9}
DATASET_NAMES = {v: k for k, v in DATASET_IDS.items()}
MODALITIES = ("text", "image", "image,text")
# task id -> (query modality, candidate modality); seed `MBEIR_TASK` (task 5 is unused).
TASKS = {0: ("text", "image"), 1: ("text", "text"), 2: ("text", "image,text"), 3: ("image", "text"),
         4: ("image", "image"), 5: ("image", "text,image"), 6: ("image,text", "text"),
         7: ("image,text", "image"), 8: ("image,text", "image,text")}
SPLITS = ("train", "val", "test")
INSTRUCTION_MODES = ("random", "first", "none")
QID_BASE = 500_000  # seed DATASET_QUERY_NUM_UPPER_BOUND
DID_BASE = 10_000_000  # seed DATASET_CAN_NUM_UPPER_BOUND
# Union training data: dataset -> (target size, up-sampled); seed `mbeir_data_generator.main`.
UNION_TRAIN_TARGETS = {"VisualNews": (100_000, False), "MSCOCO": (100_000, False),
                       "Fashion200K": (15_000, False), "WebQA": (100_000, True), "EDIS": (50_000, True),
                       "NIGHTS": (50_000, True), "OVEN": (100_000, False), "INFOSEEK": (100_000, False),
                       "FashionIQ": (50_000, True), "CIRR": (50_000, True)}
MAX_EXAMPLES = 5  # line numbers / ids kept per file in stats
LAYOUT = ("<root>/query/{train,val,test}/mbeir_<name>_<split>.jsonl, query/union_train/"
          "mbeir_union_up_train.jsonl, cand_pool/local/mbeir_<pool>_cand_pool.jsonl, cand_pool/global/"
          "mbeir_union_<split>_cand_pool.jsonl, qrels/<split>/mbeir_<name>_<split>_qrels.txt, "
          "instructions/query_instructions.tsv")


@dataclasses.dataclass(frozen=True)
class EvalSetSpec:
  """One of the 16 M-BEIR eval sets (seed eval yamls: Recall@K list and headline K)."""
  name: str
  dataset: str
  task_id: int
  recall_ks: tuple[int, ...] = (1, 5, 10)
  headline_k: int = 5

  @property
  def dataset_id(self) -> int:
    return DATASET_IDS[self.dataset]

  @property
  def metrics(self) -> tuple[str, ...]:
    return tuple(f"Recall@{k}" for k in self.recall_ks)

  def pool_name(self, split: str = "test") -> str:
    """Local pool name: MSCOCO has one per split (`mscoco_task0_test`), the others share one."""
    return f"{self.name}_{split}" if self.dataset == "MSCOCO" else self.name


def _spec(name: str, dataset: str, task: int, fashion: bool = False) -> EvalSetSpec:
  return EvalSetSpec(name, dataset, task, (10, 20, 50), 10) if fashion else EvalSetSpec(name, dataset, task)


# In the seed's report order (`dataset_order` in mbeir_retriever.py).
EVAL_SETS = {s.name: s for s in (
    _spec("visualnews_task0", "VisualNews", 0), _spec("mscoco_task0", "MSCOCO", 0),
    _spec("fashion200k_task0", "Fashion200K", 0, True), _spec("webqa_task1", "WebQA", 1),
    _spec("edis_task2", "EDIS", 2), _spec("webqa_task2", "WebQA", 2),
    _spec("visualnews_task3", "VisualNews", 3), _spec("mscoco_task3", "MSCOCO", 3),
    _spec("fashion200k_task3", "Fashion200K", 3, True), _spec("nights_task4", "NIGHTS", 4),
    _spec("oven_task6", "OVEN", 6), _spec("infoseek_task6", "INFOSEEK", 6),
    _spec("fashioniq_task7", "FashionIQ", 7, True), _spec("cirr_task7", "CIRR", 7),
    _spec("oven_task8", "OVEN", 8), _spec("infoseek_task8", "INFOSEEK", 8))}


# ---------------------------------------------------------------------------
# Seed string and id helpers, seeded draws
# ---------------------------------------------------------------------------
def format_string(s: str | None) -> str:
  """Seed `format_string`: None -> "", drop `\\r`, strip blanks then `"`, upper-case the first
  character, append "." unless it ends in . ? or !; "" stays ""."""
  s = (s or "").replace("\r", "").strip().strip('"')
  if not s:
    return s
  s = s[0].upper() + s[1:]
  return s if s[-1] in ".?!" else s + "."


def hash_qid(qid: str) -> int:
  """"d:n" -> d * 500000 + n (seed `hash_qid`, no range check)."""
  d, n = map(int, qid.split(":"))
  return d * QID_BASE + n


def unhash_qid(h: int) -> str:
  return f"{int(h) // QID_BASE}:{int(h) % QID_BASE}"


def hash_did(did: str) -> int:
  """"d:n" -> d * 10^7 + n (seed `hash_did`)."""
  d, n = map(int, did.split(":"))
  return d * DID_BASE + n


def unhash_did(h: int) -> str:
  return f"{int(h) // DID_BASE}:{int(h) % DID_BASE}"


def get_task_id(query_modality: str, cand_modality: str) -> int | None:
  """Seed `get_mbeir_task_id`: the task of a modality pair, None if there is none."""
  return next((t for t, m in TASKS.items() if m == (query_modality, cand_modality)), None)


def draw(n: int, seed: int, *key: Any) -> int:
  """A uniform index in [0, n) fixed by (seed, *key), the same in every process and run:

  `int.from_bytes(blake2b("\\x1f".join(map(str, (seed, *key))), digest_size=8), "little") % n`.
  """
  if n <= 0:
    raise ValueError(f"cannot draw from {n} items")
  msg = "\x1f".join(str(x) for x in (seed, *key)).encode("utf-8")
  return int.from_bytes(hashlib.blake2b(msg, digest_size=8).digest(), "little") % n


def upsample(rows: Sequence[Any], target: int, rng: random.Random) -> list[Any]:
  """Seed `load_and_upsample`: rows + `rng.choices(rows, k=target - len(rows))`; never shrinks."""
  out = list(rows)
  if rows and len(out) < target:
    out.extend(rng.choices(out, k=target - len(out)))
  return out


# ---------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------
class _Record:
  raw: str

  def to_json(self) -> dict[str, Any]:
    """The original line as a dict (for UniRAG output)."""
    return json.loads(self.raw)


@dataclasses.dataclass(frozen=True)
class Query(_Record):
  """A query line; `img_path` is relative to the image root as in the file, `raw` is the line."""
  qid: str
  text: str | None
  img_path: str | None
  modality: str
  pos_cand_list: tuple[str, ...]
  neg_cand_list: tuple[str, ...]
  task_id: int
  src_content: str | None
  raw: str = dataclasses.field(default="", repr=False, compare=False)

  @property
  def hashed_qid(self) -> int:
    return hash_qid(self.qid)

  @property
  def dataset_id(self) -> str:
    """The qid prefix, a string as the seed uses it in instruction keys."""
    return self.qid.split(":")[0]


@dataclasses.dataclass(frozen=True)
class Candidate(_Record):
  """A candidate-pool line (`text` = `txt`; `text`, `img_path` may be None)."""
  did: str
  text: str | None
  img_path: str | None
  modality: str
  src_content: str | None
  raw: str = dataclasses.field(default="", repr=False, compare=False)

  @property
  def hashed_did(self) -> int:
    return hash_did(self.did)


def _field(obj: dict, key: str, kind: type, required: bool) -> Any:
  """obj[key] checked against `kind` (a bool is no int); optional keys may be absent or null."""
  if key not in obj and required:
    raise ValueError(f"missing:{key}")
  v = obj.get(key)
  if (v is not None or required) and (not isinstance(v, kind) or isinstance(v, bool)):
    raise ValueError(f"type:{key}")
  return v


def _is_id(v: Any, base: int) -> bool:
  """"d:n" with decimal d, n and n < base: hashes to a unique int (seed hash_qid / hash_did)."""
  parts = v.split(":") if isinstance(v, str) else ()
  return len(parts) == 2 and all(p.isascii() and p.isdigit() for p in parts) and int(parts[1]) < base


def _id(obj: dict, key: str, base: int) -> str:
  if not _is_id(v := _field(obj, key, str, True), base):
    raise ValueError(f"bad_id:{key}")
  return v


def _ids(obj: dict, key: str, required: bool) -> tuple[str, ...]:
  v = _field(obj, key, list, required) or []
  if not all(_is_id(x, DID_BASE) for x in v):
    raise ValueError(f"bad_id:{key}")
  return tuple(v)


def _modality(obj: dict, key: str) -> str:
  if (v := _field(obj, key, str, True)) not in MODALITIES:
    raise ValueError(f"bad_modality:{key}")
  return v


def parse_query(obj: Any, raw: str = "") -> Query:
  """A `Query` from a decoded line; ValueError("<reason>:<field>") if malformed.

  Required: qid, query_modality, pos_cand_list (non-empty, the seed asserts it), task_id.
  query_txt, query_img_path, query_src_content may be null or absent; neg_cand_list absent = [].
  """
  if not isinstance(obj, dict):
    raise ValueError("not_object")
  qid, pos = _id(obj, "qid", QID_BASE), _ids(obj, "pos_cand_list", True)
  if not pos:
    raise ValueError("empty:pos_cand_list")
  if (task := _field(obj, "task_id", int, True)) not in TASKS:
    raise ValueError("bad_task:task_id")
  return Query(qid, _field(obj, "query_txt", str, False), _field(obj, "query_img_path", str, False),
               _modality(obj, "query_modality"), pos, _ids(obj, "neg_cand_list", False), task,
               _field(obj, "query_src_content", str, False), raw)


def parse_candidate(obj: Any, raw: str = "") -> Candidate:
  """A `Candidate`; required: did, modality; txt, img_path, src_content may be null or absent."""
  if not isinstance(obj, dict):
    raise ValueError("not_object")
  return Candidate(_id(obj, "did", DID_BASE), _field(obj, "txt", str, False),
                   _field(obj, "img_path", str, False), _modality(obj, "modality"),
                   _field(obj, "src_content", str, False), raw)


# ---------------------------------------------------------------------------
# Files: skip counters, JSONL records, qrels
# ---------------------------------------------------------------------------
def _missing_file(path: pathlib.Path, what: str) -> FileNotFoundError:
  return FileNotFoundError(f"{what} not found: {path}; expected the M-BEIR layout {LAYOUT}")


def _new_stats() -> dict[str, Any]:
  return {"rows": 0, "skipped": 0, "skip_reasons": {}, "bad_lines": []}


def _note(stats: dict[str, Any], why: str, lineno: int) -> None:
  stats["skipped"] += 1
  stats["skip_reasons"][why] = stats["skip_reasons"].get(why, 0) + 1
  if len(stats["bad_lines"]) < MAX_EXAMPLES:
    stats["bad_lines"].append(lineno)


def _warn(path: pathlib.Path, stats: dict[str, Any]) -> None:
  if stats["skipped"] or stats.get("missing_images"):
    logging.warning("%s: skipped %d malformed lines %s (first lines %s); %d missing images %s.", path,
                    stats["skipped"], stats["skip_reasons"], stats["bad_lines"],
                    stats.get("missing_images", 0), stats.get("missing_image_examples", []))


class JsonlRecords(Sequence):
  """Random access to the valid lines of an M-BEIR query or candidate-pool JSONL file.

  Malformed lines (bad JSON, a missing or mistyped field, an id that does not hash, a repeated id
  when `unique`: the first line is kept) are skipped and counted in `stats` (`rows`, `skipped`,
  `skip_reasons`, first `bad_lines`, `duplicate_examples`). With `check_images`, records whose
  image file is absent under `image_root` are kept but counted (`missing_images`,
  `missing_image_examples`) and listed in `missing_image_rows`; the seed would stop on them.

  Attributes:
    ids: hashed ids (int64, file order; `hash_qid` / `hash_did`).
    modalities: index into `MODALITIES` per record (uint8).
  """

  def __init__(self, path: str | os.PathLike, kind: str, *, unique: bool = True,
               image_root: str | os.PathLike | None = None, check_images: bool = False):
    if kind not in ("query", "candidate"):
      raise ValueError(f"kind must be 'query' or 'candidate', got {kind!r}")
    self.path, self.kind = pathlib.Path(path), kind
    if not self.path.is_file():
      raise _missing_file(self.path, f"M-BEIR {kind} file")
    self.image_root = pathlib.Path(image_root) if image_root is not None else None
    if check_images and self.image_root is None:
      raise ValueError("check_images needs image_root (the folder img_path values are relative to)")
    parse = parse_query if kind == "query" else parse_candidate
    stats = {**_new_stats(), "duplicate_examples": [], "missing_images": 0, "missing_image_examples": []}
    offsets, lengths, ids, mods, missing = (array.array(t) for t in ("q", "i", "q", "B", "q"))
    pos, examples = 0, []
    with open(self.path, "rb") as f:
      for lineno, line in enumerate(f, start=1):
        start, pos = pos, pos + len(line)
        if not line.strip():
          continue  # blank lines are not rows (e.g. a trailing newline)
        try:
          rec = parse(json.loads(line))  # bytes: decoded as utf-8
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError are ValueErrors too
          _note(stats, str(e) if type(e) is ValueError else "json", lineno)
          continue
        if check_images and rec.img_path and not (self.image_root / rec.img_path).is_file():
          missing.append(len(ids))
          if len(examples) < MAX_EXAMPLES:
            examples.append((len(ids), rec.img_path))
        offsets.append(start)
        lengths.append(len(line))
        ids.append(hash_qid(rec.qid) if kind == "query" else hash_did(rec.did))
        mods.append(MODALITIES.index(rec.modality))
    self._offsets, self._lengths = np.frombuffer(offsets, np.int64), np.frombuffer(lengths, np.int32)
    self.ids, self.modalities = np.frombuffer(ids, np.int64), np.frombuffer(mods, np.uint8)
    self.missing_image_rows = np.frombuffer(missing, np.int64)
    self._sort()
    keep = self._drop_duplicates(stats) if unique and self._order is not None else None
    stats["rows"], stats["missing_images"] = len(self.ids), len(self.missing_image_rows)
    stats["missing_image_examples"] = [p for row, p in examples if keep is None or keep[row]]
    self.stats, self._fh, self._pid = stats, None, None
    _warn(self.path, stats)

  def _drop_duplicates(self, stats: dict[str, Any]) -> np.ndarray:
    """Drops the later lines of repeated ids; returns the kept-row mask over the old rows."""
    dup = np.zeros(len(self.ids), bool)
    dup[self._order[1:][self._sorted_ids[1:] == self._sorted_ids[:-1]]] = True  # stable: later lines
    if not (n := int(dup.sum())):
      return ~dup
    unhash = unhash_qid if self.kind == "query" else unhash_did
    stats["skipped"] += n
    stats["skip_reasons"]["duplicate_id"] = n
    stats["duplicate_examples"] = [unhash(h) for h in self.ids[dup][:MAX_EXAMPLES]]
    keep, miss = ~dup, self.missing_image_rows
    self.missing_image_rows = (np.cumsum(keep) - 1)[miss[keep[miss]]]
    self._offsets, self._lengths = self._offsets[keep], self._lengths[keep]
    self.ids, self.modalities = self.ids[keep], self.modalities[keep]
    self._sort()
    return keep

  def _sort(self) -> None:
    """Sorted ids for lookups; none kept when the file is already in id order (the real pools are)."""
    self._order = None if np.all(np.diff(self.ids) > 0) else np.argsort(self.ids, kind="stable")
    self._sorted_ids = self.ids if self._order is None else self.ids[self._order]

  def __len__(self) -> int:
    return len(self.ids)

  def __getitem__(self, i):  # int -> Query | Candidate
    n = len(self.ids)
    if not -n <= i < n:
      raise IndexError(f"record {i} out of range for {n} records of {self.path}")
    i %= n
    if self._fh is None or self._pid != os.getpid():
      self._fh, self._pid = open(self.path, "rb", buffering=0), os.getpid()  # pylint: disable=consider-using-with
    raw = os.pread(self._fh.fileno(), int(self._lengths[i]), int(self._offsets[i])).decode("utf-8")
    try:
      return (parse_query if self.kind == "query" else parse_candidate)(json.loads(raw), raw.rstrip("\r\n"))
    except ValueError:
      raise RuntimeError(f"{self.path} changed after it was indexed (record {i}); reload it") from None

  def index_of(self, id_: str | int) -> int | None:
    """Position of a qid / did (string or hashed int; the first of repeated ids), or None."""
    h = id_ if isinstance(id_, (int, np.integer)) else (hash_qid if self.kind == "query" else hash_did)(id_)
    j = int(np.searchsorted(self._sorted_ids, h))
    if j >= len(self._sorted_ids) or self._sorted_ids[j] != h:
      return None
    return j if self._order is None else int(self._order[j])

  def get(self, id_: str | int) -> Query | Candidate | None:
    return None if (j := self.index_of(id_)) is None else self[j]

  def __getstate__(self):  # picklable for grain workers: the file is reopened per process
    return {**self.__dict__, "_fh": None, "_pid": None}

  def __repr__(self) -> str:
    return f"JsonlRecords({str(self.path)!r}, kind={self.kind!r}, rows={len(self)})"


def _split_lines(path: pathlib.Path, ncols: int, stats: dict[str, Any], what: str):
  """Yields (line number, fields) of a whitespace-separated file; other column counts are skipped."""
  if not path.is_file():
    raise _missing_file(path, what)
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if len(parts := line.split()) == ncols:
        yield lineno, parts
      elif parts:
        _note(stats, "columns", lineno)


@dataclasses.dataclass(frozen=True)
class Qrels:
  """Seed `load_qrel`: qid -> relevant dids (relevance > 0, file order) and qid -> task id."""
  relevant: dict[str, tuple[str, ...]]
  task_ids: dict[str, int]
  stats: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)


def read_qrels(path: str | os.PathLike) -> Qrels:
  """Reads `qid 0 did relevance task_id` lines; malformed lines are skipped and counted."""
  path, stats = pathlib.Path(path), _new_stats()
  rel: dict[str, list[str]] = {}
  tasks: dict[str, int] = {}
  for lineno, (qid, _, did, score, task) in _split_lines(path, 5, stats, "M-BEIR qrels file"):
    try:
      score_i, task_i = int(score), int(task)
    except ValueError:
      _note(stats, "not_int", lineno)
      continue
    stats["rows"] += 1
    if score_i > 0:  # the seed keeps positive relevance only
      rel.setdefault(qid, []).append(did)
      tasks.setdefault(qid, task_i)  # the task id of the query's first positive line
  _warn(path, stats)
  return Qrels({k: tuple(v) for k, v in rel.items()}, tasks, stats)


# ---------------------------------------------------------------------------
# Instructions, query text, positives
# ---------------------------------------------------------------------------
class Instructions:
  """Query instructions from `instructions/query_instructions.tsv` (seed `_load_query_instructions`).

  The header line is skipped; each line is `line.strip().split("\\t")`: column 0 query modality,
  1 candidate modality, 2 unused, 3 dataset id, 4.. variants (empty cells dropped). Key
  `"{dataset_id}, {query_modality}, {cand_modality}"`; a repeated key keeps the last line.

  Draws: the seed calls `random.choice(variants)` on Python's global `random` (seeded 2023 + rank,
  reseeded per DataLoader worker) at train and eval time, right after the positive's own
  `random.choice`, so its draws depend on worker scheduling. Ours: `draw(len(variants), seed,
  "instruction", qid, *key)`, fixed per (seed, qid, key): pass e.g. key=(epoch,) in training.
  """

  def __init__(self, table: Mapping[str, Sequence[str]], stats: dict[str, Any] | None = None):
    self.table = {k: tuple(v) for k, v in table.items()}
    self.stats = stats or _new_stats()

  @classmethod
  def from_tsv(cls, path: str | os.PathLike) -> Instructions:
    path, stats = pathlib.Path(path), _new_stats()
    if not path.is_file():
      raise _missing_file(path, "M-BEIR instructions TSV")
    with open(path, encoding="utf-8") as f:
      lines = f.readlines()
    if not lines:
      raise ValueError(f"{path} is empty; expected a header line and one line per instruction key")
    table: dict[str, tuple[str, ...]] = {}
    for lineno, line in enumerate(lines[1:], start=2):
      parts = line.strip().split("\t")
      variants = tuple(p for p in parts[4:] if p)
      if not line.strip():
        continue
      if len(parts) < 4:
        _note(stats, "columns", lineno)
      elif not any(format_string(v) for v in variants):  # the seed asserts when it is used
        _note(stats, "no_instructions", lineno)
      else:
        table[f"{parts[3]}, {parts[0]}, {parts[1]}"] = variants
        stats["rows"] += 1
    _warn(path, stats)
    return cls(table, stats)

  def variants(self, dataset_id: str | int, query_modality: str, cand_modality: str) -> tuple[str, ...]:
    key = f"{dataset_id}, {query_modality}, {cand_modality}"
    if key not in self.table:
      raise KeyError(f"no query instructions for key {key!r} (have {sorted(self.table)})")
    return self.table[key]

  def prompt(self, dataset_id: str | int, query_modality: str, cand_modality: str,
             mode: str = "random", seed: int = 0, key: Sequence[Any] = ()) -> str:
    """`format_string(variant)` as the seed (mode "first": variant 0); "" for mode "none"."""
    if mode not in INSTRUCTION_MODES:
      raise ValueError(f"instructions mode must be one of {INSTRUCTION_MODES}, got {mode!r}")
    if mode == "none":
      return ""
    v = self.variants(dataset_id, query_modality, cand_modality)
    return format_string(v[0] if mode == "first" else v[draw(len(v), seed, "instruction", *key)])


def query_text(query: Query, instructions: Instructions | None = None, mode: str = "random",
               seed: int = 0, key: Sequence[Any] = (), cand_modality: str | None = None) -> str:
  """The text the model sees: `format_string(f"{instruction} {query_txt}")`, as the seed.

  A None `query_txt` counts as "" (an image-only query gets the instruction alone). Mode "none"
  (the seed's NoInstruct) gives `format_string(query_txt)`, "" for image-only queries. The key
  uses the positive's modality (`cand_modality`, default the task's candidate modality, which
  all positives of a real M-BEIR query share); the draw is keyed by (seed, qid, *key).
  """
  txt = query.text or ""
  if mode == "none":
    return format_string(txt)
  if instructions is None:
    raise ValueError(f"instructions mode {mode!r} needs an Instructions table")
  cm = cand_modality or TASKS[query.task_id][1]
  prompt = instructions.prompt(query.dataset_id, query.modality, cm, mode, seed, (query.qid, *key))
  return format_string(f"{prompt} {txt}")


def candidate_text(cand: Candidate) -> str:
  """Seed `MBEIRCandidatePoolDataset`: `format_string(txt or "")`, no instruction."""
  return format_string(cand.text or "")


def pick_positive(query: Query, seed: int = 0, key: Sequence[Any] = (), shuffle: bool = True,
                  same_dataset: bool = False) -> str:
  """One positive did: seed `shuffle_cand` (`random.choice`; shuffle=False: the first).

  `same_dataset` is the seed's EVAL-mode filter (positives of the query's own dataset only, for
  OVEN/INFOSEEK). Draw `draw(n, seed, "positive", qid, *key)`: pass key=(epoch, row) in training
  so that epochs and up-sampled copies draw independently.
  """
  pos = query.pos_cand_list
  if same_dataset:
    pos = tuple(d for d in pos if d.split(":")[0] == query.dataset_id)
  if not pos:
    raise ValueError(f"query {query.qid} has no positive candidate{' from its dataset' * same_dataset}")
  return pos[draw(len(pos), seed, "positive", query.qid, *key)] if shuffle else pos[0]


# ---------------------------------------------------------------------------
# Recall@K, run files, UniRAG records
# ---------------------------------------------------------------------------
def recall_at_k(relevant: Iterable[str], retrieved: Sequence[str], k: int) -> float:
  """Seed `compute_recall_at_k`: 1.0 if a relevant did is in the top k, else 0.0 (also if none)."""
  rel = set(relevant)
  return 1.0 if rel and rel.intersection(retrieved[:k]) else 0.0


def recall_by_task(run: Mapping[str, Sequence[str]], qrels: Qrels, ks: Sequence[int] = (1, 5, 10),
                   round_to: int | None = 4) -> dict[int, dict[str, float]]:
  """Mean Recall@K per task id over the queries of `run` (qid -> ranked dids), as the seed.

  Returns {task_id: {"Recall@k": mean, ..., "queries": n}}; the seed rounds to 4 places.
  """
  per_task: dict[int, list[list[float]]] = {}
  for qid, dids in run.items():
    if qid not in qrels.relevant:
      raise KeyError(f"query {qid} has no positive in the qrels; are the run and qrels of one set?")
    per_task.setdefault(qrels.task_ids[qid], []).append(
        [recall_at_k(qrels.relevant[qid], list(dids), k) for k in ks])
  out: dict[int, dict[str, float]] = {}
  for task, rows in sorted(per_task.items()):
    means = [sum(col) / len(col) for col in zip(*rows)]
    out[task] = {f"Recall@{k}": m if round_to is None else round(m, round_to) for k, m in zip(ks, means)}
    out[task]["queries"] = len(rows)
  return out


def run_id(name: str, pool: str, split: str, k: int) -> str:
  """Seed run id: `mbeir_<name>_{union|single}_pool_<split>_k<k>`."""
  return f"mbeir_{name}_{'union' if pool.lower() == 'union' else 'single'}_pool_{split}_k{k}"


def write_run_file(path: str | os.PathLike, results: Iterable[tuple[str, Sequence[str], Sequence[Any]]],
                   run: str, task_ids: Mapping[str, int | str]) -> None:
  """Writes (qid, ranked dids, scores) as the seed: `qid Q0 did rank score run_id task_id` lines.

  Ranks start at 1; scores are formatted with str() of the value given (the pipeline passes float64
  scores, printed in full as the seed's).
  """
  with open(path, "w", encoding="utf-8") as f:
    for qid, dids, scores in results:
      f.writelines(f"{qid} Q0 {did} {rank} {score} {run} {task_ids[qid]}\n"
                   for rank, (did, score) in enumerate(zip(dids, scores), start=1))


@dataclasses.dataclass(frozen=True)
class RunFile:
  """A parsed run file: qid -> dids and scores in rank order, qid -> task id, the run ids seen."""
  ranked: dict[str, tuple[str, ...]]
  scores: dict[str, tuple[float, ...]]
  task_ids: dict[str, int]
  run_ids: tuple[str, ...]
  stats: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)


def read_run_file(path: str | os.PathLike) -> RunFile:
  """Reads a run file of the seed or `write_run_file`; malformed lines are skipped and counted."""
  path, stats = pathlib.Path(path), _new_stats()
  rows: dict[str, list[tuple[int, str, float]]] = {}
  tasks: dict[str, int] = {}
  runs: dict[str, None] = {}
  for lineno, (qid, q0, did, rank, score, run, task) in _split_lines(path, 7, stats, "run file"):
    try:
      row, task_i = (int(rank), did, float(score)), int(task)
    except ValueError:
      row = None
    if row is None or q0 != "Q0":
      _note(stats, "fields", lineno)
      continue
    rows.setdefault(qid, []).append(row)
    tasks.setdefault(qid, task_i)
    runs[run] = None
    stats["rows"] += 1
  _warn(path, stats)
  ranked = {q: sorted(r) for q, r in rows.items()}
  return RunFile({q: tuple(d for _, d, _ in r) for q, r in ranked.items()},
                 {q: tuple(x for _, _, x in r) for q, r in ranked.items()}, tasks, tuple(runs), stats)


def unirag_record(query: Query, candidates: Sequence[Candidate],
                  complements: Sequence[Candidate | None] | None = None) -> dict[str, Any]:
  """One line of `<run_id>_retrieved.jsonl` (seed `get_raw_retrieved_candidates`): the original
  query and candidate records, plus `complement_candidates` (None entries kept) when given."""
  out: dict[str, Any] = {"query": query.to_json(), "candidates": [c.to_json() for c in candidates]}
  if complements is not None:
    out["complement_candidates"] = [None if c is None else c.to_json() for c in complements]
  return out


# ---------------------------------------------------------------------------
# The M-BEIR root
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class EvalSet:
  """One eval set of a split: its queries, candidate pool (local or union) and qrels."""
  spec: EvalSetSpec
  split: str
  queries: JsonlRecords
  pool: JsonlRecords
  qrels: Qrels


class MBEIR:
  """An M-BEIR root in the released layout (`LAYOUT`); images under `image_root` (default root)."""

  def __init__(self, root: str | os.PathLike, image_root: str | os.PathLike | None = None):
    self.root = pathlib.Path(root)
    if not (self.root / "query").is_dir() and not (self.root / "cand_pool").is_dir():
      raise FileNotFoundError(f"{self.root} is not an M-BEIR root (no query/ or cand_pool/); "
                              f"expected the layout {LAYOUT}")
    self.image_root = pathlib.Path(image_root) if image_root is not None else self.root

  def query_path(self, name: str, split: str) -> pathlib.Path:
    return self.root / "query" / split / f"mbeir_{name}_{split}.jsonl"

  def local_pool_path(self, pool_name: str) -> pathlib.Path:
    return self.root / "cand_pool" / "local" / f"mbeir_{pool_name}_cand_pool.jsonl"

  def global_pool_path(self, split: str = "test") -> pathlib.Path:
    return self.root / "cand_pool" / "global" / f"mbeir_union_{split}_cand_pool.jsonl"

  def qrels_path(self, name: str, split: str) -> pathlib.Path:
    return self.root / "qrels" / split / f"mbeir_{name}_{split}_qrels.txt"

  def instructions(self) -> Instructions:
    return Instructions.from_tsv(self.root / "instructions" / "query_instructions.tsv")

  def eval_sets(self, split: str = "test") -> list[EvalSetSpec]:
    """The eval sets (seed order) whose query file exists for this split."""
    _check_split(split)
    return [s for s in EVAL_SETS.values() if self.query_path(s.name, split).is_file()]

  def _path(self, path: str | os.PathLike) -> pathlib.Path:
    """A file path relative to the root, absolute, or already joined to a relative root."""
    p = pathlib.Path(path)
    if p.is_absolute() or (self.root / p).exists() or not p.exists():
      return self.root / p  # (root / absolute = the absolute path)
    return p

  def queries(self, path: str | os.PathLike, unique: bool = True, check_images: bool = True) -> JsonlRecords:
    """The queries of a file (path relative to the root, or absolute)."""
    return JsonlRecords(self._path(path), "query", unique=unique, image_root=self.image_root,
                        check_images=check_images)

  def pool(self, path: str | os.PathLike, check_images: bool = False) -> JsonlRecords:
    """A candidate pool (path relative to the root, or absolute); ids are made unique."""
    return JsonlRecords(self._path(path), "candidate", image_root=self.image_root,
                        check_images=check_images)

  def global_pool(self, split: str = "test", check_images: bool = False) -> JsonlRecords:
    """The UNION pool of a split (test: 5.6M lines; memory: see the module docstring)."""
    _check_split(split)
    return self.pool(self.global_pool_path(split), check_images)

  def union_train(self, check_images: bool = False) -> JsonlRecords:
    """`query/union_train/mbeir_union_up_train.jsonl`; up-sampled copies repeat qids and are kept."""
    return self.queries("query/union_train/mbeir_union_up_train.jsonl", False, check_images)

  def qrels(self, name: str, split: str = "test") -> Qrels:
    return read_qrels(self.qrels_path(name, split))

  def load_eval_set(self, name: str, split: str = "test", pool: str = "local",
                    check_images: bool = True) -> EvalSet:
    """Queries, pool and qrels of one eval set; pool "local" (its own) or "union" (global pool)."""
    _check_split(split)
    if name not in EVAL_SETS:
      raise KeyError(f"unknown M-BEIR eval set {name!r}; known: {list(EVAL_SETS)}")
    if pool not in ("local", "union"):
      raise ValueError(f"pool must be 'local' or 'union', got {pool!r}")
    spec = EVAL_SETS[name]
    queries = self.queries(self.query_path(name, split), True, check_images)
    cands = (self.pool(self.local_pool_path(spec.pool_name(split)), check_images) if pool == "local"
             else self.global_pool(split, check_images))
    return EvalSet(spec, split, queries, cands, self.qrels(name, split))


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"M-BEIR split must be one of {SPLITS}, got {split!r}")


def mini_root() -> pathlib.Path:
  """The bundled fabricated mini M-BEIR (`mmret_jax/data/samples/mbeir_mini`); no images: write
  them with `mmret_jax.data.samples.make_mbeir_mini.write_mini_images(root, image_root)`."""
  root = pathlib.Path(str(importlib.resources.files("mmret_jax.data.samples") / "mbeir_mini"))
  if not root.is_dir():
    raise FileNotFoundError(f"bundled mini M-BEIR not found at {root}; reinstall mmret_jax from a "
                            "source checkout (package data data/samples/**)")
  return root
