"""Sequential-recommendation data for BLaIR's SASRecText / UniSRec, read as RecBole 1.2 reads it.

The seed (`hyp1231/AmazonReviews2023` `seq_rec_results/`: `config/overall.yaml`, `data/dataset.py`, `run.py`)
trains with RecBole on the files `python -m mmret_jax.data.prepare_seqrec` writes to `{root}/{domain}/`:

* `{domain}.{train,valid,test}.inter`: header `user_id:token<TAB>item_id_list:token_seq<TAB>item_id:token`,
  one example per row (history -> next item). The seed's config: `benchmark_filename: [train, valid, test]`,
  `alias_of_item_id: [item_id_list]`, `load_col: inter: [user_id, item_id_list, item_id]`.
* `{domain}.data_maps`: JSON with `item2id` / `id2item` ("[PAD]" at 0, items 1..N).
* `{domain}.{plm_suffix}` (e.g. `blair-roberta-base.feature`): raw float32 [N, plm_size], row i-1 = item i.

What RecBole builds from them (recbole/data/dataset/dataset.py `_load_feat`, `_load_inter_feat`, `_remap`,
`_dataframe_to_interaction`, `build`; sequential_dataset.py `_benchmark_presets`), and what we build:

* One example per row, in file order; a `token_seq` field is split on " " with empty tokens dropped.
* `item_length` = len(history). With benchmark files RecBole cuts nothing: `MAX_ITEM_LIST_LENGTH` is used
  only by its own data augmentation (not run for benchmark files), and the `seq_len` config (unset in the
  seed) would keep the FIRST tokens. The seed's SASRec then has only `MAX_ITEM_LIST_LENGTH` = 50 position
  embeddings, so a longer history would fail there. prepare_seqrec already keeps the last 50 items.
  **We** keep the last `max_seq_length` items (the most recent, as prepare_seqrec and RecBole's own
  augmentation do) and count the rows cut (`truncated`).
* Histories right-padded with 0. RecBole pads to the longest history in the three files; **we** pad to
  `max_seq_length` (a static shape; extra right padding changes nothing for a causal, padding-masked model
  read at `seq_len - 1`).
* Ids: RecBole re-numbers items by first appearance (all targets of train, valid, test, then all history
  tokens) and the seed's `UniSRecDataset` maps the feature rows to those ids. **We** use the data_maps
  `item2id` ids directly, so `plm_table[i]` = feature row i - 1 and row 0 = zeros (the seed's padding row).
  Item ids are only a permutation for the models and the metrics (ties aside: `mmret_jax.eval.seqrec`).
* `n_items` = len(id2item) (with [PAD]), RecBole's `item_num` for prepare_seqrec's files (both hold exactly
  the items the three files mention).
* Rows RecBole would take but that break it or its models are skipped and counted per split (`counts`,
  with the first `MAX_EXAMPLES` as `file:line (reason)`), never a crash: a wrong number of fields (pandas
  errors or fills NaN), an empty target, an empty history (item_length 0: the model's `gather_indexes`
  at -1 fails), an item token not in data_maps (or "[PAD]"). Blank lines are ignored (pandas skips them),
  and counted. Extra columns are ignored, as `load_col` makes RecBole do; a header without one of the three
  fields (or with one of another type, or twice) is a ValueError.
* The feature file must hold exactly N rows (`plm_size` = its size / 4 / N when not given; the seed's
  `reshape(-1, plm_size)` would accept any multiple of `plm_size` and read the first rows).

Training (`train_batches`) is RecBole's TrainDataLoader with `train_neg_sample_args: ~` (a torch DataLoader,
shuffle, `drop_last=False`): each epoch is the permutation `numpy.random.default_rng([seed, epoch])` of the
train rows (RecBole: a torch generator) cut into global batches; the last, partial one is padded to the static
batch size with rows of `weight` 0 (target 0, seq_len 1, index -1), so a loss averaged over `weight` equals
RecBole's mean over the real rows. Shapes: N rows, L = max_seq_length, B = process batch, D = plm_size.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from mmret_jax.data import pipeline

SPLITS = ("train", "valid", "test")
FIELDS = {"user_id": "token", "item_id_list": "token_seq", "item_id": "token"}
PAD = "[PAD]"
MAX_EXAMPLES = 5  # skipped rows kept per split as examples
PREPARE = ("python -m mmret_jax.data.prepare_seqrec --domain {domain} --interactions BENCHMARK_DIR "
           "--meta META_DIR --output {root}")


@dataclasses.dataclass(frozen=True)
class SeqRecSplit:
  """One split's examples: `item_seq` int32 [N, L] (right-padded with 0), `seq_len` int32 [N], `target`
  int32 [N], `user` str [N] (the file's tokens); `counts`: rows read / kept, skips by reason, examples."""
  item_seq: np.ndarray
  seq_len: np.ndarray
  target: np.ndarray
  user: np.ndarray
  counts: dict[str, Any]

  def __len__(self) -> int:
    return int(self.target.shape[0])


@dataclasses.dataclass(frozen=True)
class SeqRecData:
  """The loaded domain: `splits[name]` (also `data[name]`), `plm_table` float32 [n_items, D] (row 0 zeros) or
  None, `n_items` (with [PAD]), `id2item` (data_maps order, "[PAD]" first), `max_seq_length`, `files`."""
  domain: str
  splits: dict[str, SeqRecSplit]
  n_items: int
  id2item: list[str]
  plm_table: np.ndarray | None
  max_seq_length: int
  files: dict[str, str]

  def __getitem__(self, split: str) -> SeqRecSplit:
    return self.splits[split]

  @property
  def counts(self) -> dict[str, dict[str, Any]]:
    """Per split: the counts of `SeqRecSplit.counts`."""
    return {name: s.counts for name, s in self.splits.items()}

  @property
  def plm_size(self) -> int | None:
    return None if self.plm_table is None else int(self.plm_table.shape[1])


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------
def _domain_dir(root: pathlib.Path, domain: str) -> pathlib.Path:
  """`root/{domain}/` (prepare_seqrec's output root) or `root` itself (the domain dir)."""
  for d in (root / domain, root):
    if (d / f"{domain}.data_maps").is_file():
      return d
  raise ValueError(f"No {domain}.data_maps in {root / domain} or {root}; make the files with: "
                   + PREPARE.format(domain=domain, root=root))


def _read_item2id(path: pathlib.Path) -> tuple[dict[str, int], list[str]]:
  try:
    maps = json.loads(path.read_text(encoding="utf-8"))
  except ValueError as e:
    raise ValueError(f"{path}: not JSON ({e})") from None
  id2item = maps.get("id2item") if isinstance(maps, dict) else None
  item2id = maps.get("item2id") if isinstance(maps, dict) else None
  if not isinstance(id2item, list) or not isinstance(item2id, dict) or not id2item or id2item[0] != PAD:
    raise ValueError(f"{path}: expected prepare_seqrec's data_maps (item2id, id2item with \"{PAD}\" at 0)")
  if len(item2id) != len(id2item) or any(item2id.get(t) != i for i, t in enumerate(id2item)):
    raise ValueError(f"{path}: item2id and id2item disagree")
  return item2id, [str(t) for t in id2item]


def _parse_header(line: str, path: pathlib.Path) -> tuple[list[int], int]:
  """Column index of each of `FIELDS` (by name) and the number of columns; ValueError on a bad header."""
  cols = line.rstrip("\n").split("\t")
  want = "\t".join(f"{k}:{v}" for k, v in FIELDS.items())
  found: dict[str, int] = {}
  for i, c in enumerate(cols):
    name, sep, ftype = c.partition(":")
    if not sep:
      raise ValueError(f"{path}: header column {c!r} is not NAME:TYPE (expected {want!r})")
    if name in FIELDS:
      if ftype != FIELDS[name] or name in found:
        raise ValueError(f"{path}: header column {c!r} (twice, or of another type); expected {want!r}")
      found[name] = i
  missing = [f"{k}:{v}" for k, v in FIELDS.items() if k not in found]
  if missing:
    raise ValueError(f"{path}: header has no {', '.join(missing)} (got {cols}; expected {want!r})")
  return [found[k] for k in FIELDS], len(cols)


def _new_counts() -> dict[str, Any]:
  return {"rows_read": 0, "rows": 0, "skipped": 0, "skip_reasons": {}, "examples": [], "truncated": 0,
          "blank_lines": 0}


def _skip(counts: dict[str, Any], why: str, where: str, detail: str = "") -> None:
  counts["skipped"] += 1
  counts["skip_reasons"][why] = counts["skip_reasons"].get(why, 0) + 1
  if len(counts["examples"]) < MAX_EXAMPLES:
    counts["examples"].append(f"{where} ({why}{': ' + detail if detail else ''})")


def read_inter(path: pathlib.Path, item2id: dict[str, int], max_seq_length: int) -> SeqRecSplit:
  """One `.inter` file -> `SeqRecSplit` (see the module docstring for the rules)."""
  counts = _new_counts()
  seqs, lens, targets, users = [], [], [], []
  with open(path, encoding="utf-8") as f:
    header = f.readline()
    if not header.strip():
      raise ValueError(f"{path}: empty file (expected the header "
                       f"{chr(9).join(f'{k}:{v}' for k, v in FIELDS.items())!r})")
    (iu, ih, it), ncol = _parse_header(header, path)
    for lineno, line in enumerate(f, start=2):
      line = line.rstrip("\n")
      if not line.strip():
        counts["blank_lines"] += 1
        continue
      counts["rows_read"] += 1
      where = f"{path.name}:{lineno}"
      row = line.split("\t")
      if len(row) != ncol:
        _skip(counts, "wrong field count", where, f"{len(row)} fields, header has {ncol}")
        continue
      target = row[it]
      history = [t for t in row[ih].split(" ") if t]
      if not target:
        _skip(counts, "empty item_id", where)
        continue
      if not history:
        _skip(counts, "empty history", where)
        continue
      unknown = next((t for t in [target, *history] if item2id.get(t, 0) == 0), None)
      if unknown is not None:
        _skip(counts, "item not in data_maps", where, repr(unknown))
        continue
      if len(history) > max_seq_length:
        counts["truncated"] += 1
        history = history[-max_seq_length:]
      seqs.append([item2id[t] for t in history])
      lens.append(len(history))
      targets.append(item2id[target])
      users.append(row[iu])
  item_seq = np.zeros((len(seqs), max_seq_length), np.int32)
  for r, s in enumerate(seqs):
    item_seq[r, :len(s)] = s
  counts["rows"] = len(seqs)
  return SeqRecSplit(item_seq=item_seq, seq_len=np.asarray(lens, np.int32).reshape(-1),
                     target=np.asarray(targets, np.int32).reshape(-1), user=np.asarray(users, dtype=str),
                     counts=counts)


def _feature_path(folder: pathlib.Path, domain: str, feature: str | os.PathLike) -> pathlib.Path:
  p = pathlib.Path(feature)
  if p.is_file() or len(p.parts) > 1:
    path = p
  else:  # the seed's plm_suffix: {data_path}/{dataset}.{plm_suffix}
    path = folder / f"{domain}.{feature}"
  if not path.is_file():
    found = sorted(x.name for x in folder.glob(f"{domain}.*.feature"))
    raise ValueError(f"Item feature file {path} not found (in {folder}: {', '.join(found) or 'no .feature file'}); "
                     f"write it with: {PREPARE.format(domain=domain, root=folder.parent)} --model MODEL_DIR "
                     f"--feature-name NAME (then feature=\"NAME.feature\")")
  return path


def load_plm_table(path: pathlib.Path, n_items: int, plm_size: int | None = None) -> np.ndarray:
  """float32 [n_items, D]: row 0 zeros, row i = the file's row i - 1; D inferred from the file size."""
  nbytes = path.stat().st_size
  n_real = n_items - 1
  if nbytes % 4 or n_real < 1 or (nbytes // 4) % n_real:
    raise ValueError(f"{path}: {nbytes} bytes is not float32 [{n_real} items, plm_size] (the data_maps has "
                     f"{n_real} items); was it written for another version of the .inter / .data_maps files?")
  inferred = nbytes // 4 // n_real
  if plm_size is not None and plm_size != inferred:
    raise ValueError(f"{path}: plm_size {plm_size} given, but the file holds {n_real} items x {inferred} floats "
                     f"(plm_size {inferred})")
  table = np.zeros((n_items, inferred), np.float32)
  table[1:] = np.fromfile(path, dtype=np.float32).reshape(n_real, inferred)
  return table


def load_seqrec(root: str | os.PathLike, domain: str, *, feature: str | os.PathLike | None = None,
                plm_size: int | None = None, max_seq_length: int = 50,
                splits: Sequence[str] = SPLITS) -> SeqRecData:
  """Loads prepare_seqrec's files for `domain` from `root/{domain}/` or `root` (the domain dir itself).

  Args:
    feature: the seed's `plm_suffix` (e.g. "blair-roberta-base.feature" -> `{domain}.blair-roberta-base.feature`
      beside the .inter files), or a path; None: no `plm_table`.
    plm_size: the feature width; None infers it from the file size and the number of items.
    max_seq_length: histories keep their last `max_seq_length` items (RecBole's MAX_ITEM_LIST_LENGTH).
    splits: which of train / valid / test to read.
  """
  if max_seq_length < 1:
    raise ValueError(f"max_seq_length must be >= 1, got {max_seq_length}")
  bad = [s for s in splits if s not in SPLITS]
  if bad or not splits:
    raise ValueError(f"splits must be some of {SPLITS}, got {list(splits)}")
  root = pathlib.Path(root)
  folder = _domain_dir(root, domain)
  maps_path = folder / f"{domain}.data_maps"
  item2id, id2item = _read_item2id(maps_path)
  files = {"data_maps": str(maps_path)}
  out = {}
  for split in splits:
    path = folder / f"{domain}.{split}.inter"
    if not path.is_file():
      raise ValueError(f"{path} not found; make the files with: {PREPARE.format(domain=domain, root=folder.parent)}")
    out[split] = read_inter(path, item2id, max_seq_length)
    files[split] = str(path)
  table = None
  if feature is not None:
    fpath = _feature_path(folder, domain, feature)
    table = load_plm_table(fpath, len(id2item), plm_size)
    files["feature"] = str(fpath)
  elif plm_size is not None:
    raise ValueError("plm_size is the width of the feature file: give feature= too")
  return SeqRecData(domain=domain, splits=out, n_items=len(id2item), id2item=id2item, plm_table=table,
                    max_seq_length=max_seq_length, files=files)


# ---------------------------------------------------------------------------
# Training batches (RecBole's TrainDataLoader: shuffle, last partial batch kept)
# ---------------------------------------------------------------------------
def steps_per_epoch(num_rows: int, global_batch: int) -> int:
  """Batches per epoch with the last partial one kept: ceil(num_rows / global_batch)."""
  return math.ceil(num_rows / global_batch)


def _padded_batch(split: SeqRecSplit, process_batch: int, sel: np.ndarray) -> dict[str, np.ndarray]:
  """Rows `sel` of `split` as one batch of `process_batch` rows; the missing rows get weight 0, target 0,
  seq_len 1 and index -1."""
  n = len(sel)
  item_seq = np.zeros((process_batch, split.item_seq.shape[1]), np.int32)
  item_seq[:n] = split.item_seq[sel]
  seq_len = np.ones(process_batch, np.int32)
  seq_len[:n] = split.seq_len[sel]
  target = np.zeros(process_batch, np.int32)
  target[:n] = split.target[sel]
  weight = (np.arange(process_batch) < n).astype(np.float32)
  index = np.full(process_batch, -1, np.int32)
  index[:n] = sel
  return {"item_seq": item_seq, "seq_len": seq_len, "target": target, "weight": weight, "index": index}


def train_batches(data: SeqRecData | SeqRecSplit, seed: int, global_batch: int, process_batch: int,
                  process_index: int, num_threads: int = 1, prefetch: int = 2) -> grain.DatasetIterator:
  """The endless, checkpointable (grain `get_state` / `set_state`) stream of this process's train batches:
  dicts of `item_seq` int32 [B, L], `seq_len` int32 [B], `target` int32 [B], `weight` float32 [B] (0 for
  padding rows), `index` int32 [B] (the train row; -1 for padding). Batch i is in epoch
  i // steps_per_epoch(N, global_batch)."""
  split = data["train"] if isinstance(data, SeqRecData) else data
  if len(split) < 1:
    raise ValueError("no training rows")
  return pipeline.epoch_batches(len(split), seed, global_batch, process_batch,
                                lambda sel, epoch: _padded_batch(split, process_batch, np.asarray(sel)),
                                num_threads, prefetch, drop_last=False, process_index=process_index)


def write_sample(root: str | os.PathLike, domain: str = "Sample", *, n_items: int = 60, n_users: int = 120,
                 plm_size: int = 32, feature: str = "sample.feature", seed: int = 0) -> pathlib.Path:
  """Writes a small learnable dataset in prepare_seqrec's exact formats into `root/{domain}/` (via its own
  writers: `.inter` x 3, `.data_maps`, a float32 `.feature`) and returns that dir. Smoke runs and tests use it.

  Items sit on a circle: item k's feature holds cos / sin of 1..4 multiples of its angle 2 pi k / n_items (the
  rest is noise), and a user walks it, each step to the next item with probability 0.85 (else anywhere), so the
  next item is a rotation of the last one's feature: a linear adaptor and one attention step can learn it.
  Per user (the benchmark's leave-last-out): train rows for every prefix of the walk but the last two items,
  valid = all but the last item -> the second to last, test = the whole walk -> the last."""
  from mmret_jax.data import prepare_seqrec  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  out = pathlib.Path(root) / domain
  out.mkdir(parents=True, exist_ok=True)
  asins = [f"B{seed:02d}{k:06d}" for k in range(n_items)]
  users = prepare_seqrec.IdMap()
  items = prepare_seqrec.IdMap()
  splits: dict[str, list[tuple[str, str, list[str]]]] = {"train": [], "valid": [], "test": []}
  for u in range(n_users):
    walk = [int(rng.integers(n_items))]
    for _ in range(int(rng.integers(5, 12))):
      walk.append((walk[-1] + 1) % n_items if rng.random() < 0.85 else int(rng.integers(n_items)))
    name = [asins[k] for k in walk]
    user = f"U{seed:02d}{u:05d}"
    for t in range(1, len(walk) - 2):
      splits["train"].append((user, name[t], name[max(0, t - 50):t]))
    splits["valid"].append((user, name[-2], name[-52:-2]))
    splits["test"].append((user, name[-1], name[-51:-1]))
  texts = {a: f"sample item {a}" for a in asins}
  counts = prepare_seqrec.new_counts()
  for split, rows in splits.items():
    with open(out / f"{domain}.{split}.inter", "w", encoding="utf-8") as f:
      prepare_seqrec.process_split(iter(rows), texts, 50, users, items, counts, f)
  (out / f"{domain}.data_maps").write_text(json.dumps(prepare_seqrec.data_maps(users, items, texts)))
  angle = 2 * np.pi * np.array([int(a[3:]) for a in items.tokens[1:]]) / n_items  # feature row i-1 = item id i
  harmonics = [f(m * angle) for m in range(1, 5) for f in (np.cos, np.sin)]
  feats = 0.1 * rng.standard_normal((len(items) - 1, plm_size))
  feats[:, :min(plm_size, len(harmonics))] += np.stack(harmonics, 1)[:, :plm_size]
  feats.astype(np.float32).tofile(out / f"{domain}.{feature}")
  return out
