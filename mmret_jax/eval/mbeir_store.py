"""Embeddings for the M-BEIR pipeline (`mmret_jax.eval.mbeir`): the batched forward, resumable
on-disk shards, and pools read back from them (local pools, or the UNION pool as the concatenation
of the local pools' shards, as the seed's `mbeir_embedder.py` builds it).

On disk, one folder per query file or candidate pool, `<out>/embeddings/<name>/`:

    manifest.json             what was embedded, with which settings (`fingerprint`), rows, dim,
                              shard_size, num_shards, the data layer's skip / missing-image counts
    shard-00000.emb.npy       float16 [rows, D] raw (unnormalised) embeddings, as the seed saves them
    shard-00000.ids.npy       int64 [rows] hashed qids / dids (`mbeir.hash_qid` / `hash_did`)

Shard i holds rows [i * shard_size, min(N, (i + 1) * shard_size)) of the file's valid records.
Resuming: a shard counts as done when both files load, have the expected shapes and the ids equal
the records' ids; every other shard is (re)computed, each written to a temporary name and renamed,
so a killed run leaves whole shards only. A manifest whose fingerprint differs from the current
settings (model weights, input settings, instructions, seed, data file, shard size) is an error
unless `overwrite`. Host memory while embedding: one shard (its records' texts and its float16
rows) plus one batch of pixels; the data layer's per-row index (~21 bytes a row) and the ids are
the only O(N) parts.

Multi-process: each process embeds a contiguous range of shards (`jax.process_index()` of
`jax.process_count()`, as the seed's contiguous sampler splits rows); the forward runs
data-parallel over this process's local devices (batch split over the data axis of a local mesh, params replicated;
params living on other processes' devices, as in a multi-host training state, are gathered first).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np

from mmret_jax.data.sources import mbeir
from mmret_jax.eval.retrieval import l2_normalize

MANIFEST = "manifest.json"
FORMAT = 1


def _emb_path(d: pathlib.Path, i: int) -> pathlib.Path:
  return d / f"shard-{i:05d}.emb.npy"


def _ids_path(d: pathlib.Path, i: int) -> pathlib.Path:
  return d / f"shard-{i:05d}.ids.npy"


def _save_atomic(path: pathlib.Path, arr: np.ndarray) -> None:
  tmp = path.with_name(path.name + f".tmp{os.getpid()}")
  with open(tmp, "wb") as f:
    np.save(f, arr)
  os.replace(tmp, path)


def digest(*parts: Any) -> str:
  h = hashlib.sha256()
  for p in parts:
    h.update(p.tobytes() if isinstance(p, np.ndarray) else json.dumps(p, sort_keys=True, default=str).encode())
  return h.hexdigest()[:24]


# ---------------------------------------------------------------------------
# The forward
# ---------------------------------------------------------------------------
def item_inputs(rec, image_root: pathlib.Path, instructions: mbeir.Instructions | None, mode: str,
                seed: int) -> tuple[str, str | None]:
  """(text, image path or None) the model sees for a query (instruction + text, as
  `UniIREncoder.encode_queries`) or a candidate (`mbeir.candidate_text`, as `encode_candidates`)."""
  text = mbeir.query_text(rec, instructions, mode, seed) if isinstance(rec, mbeir.Query) else mbeir.candidate_text(rec)
  return text, (str(image_root / rec.img_path) if rec.img_path else None)


class Forward:
  """A `UniIREncoder`'s model on fixed-size batches, data-parallel over the local devices.

  Same inputs and outputs as `encoder.encode_queries` / `encode_candidates` (raw float32 [n, D]);
  the batch (rounded up to a multiple of the device count) is split over the data axis of a local mesh and the
  params replicated. Images are decoded for batch i + 1 while the devices run batch i.
  """

  def __init__(self, encoder, batch_size: int = 64, devices: Sequence[Any] | None = None):
    from mmret_jax.train import partitioning  # pylint: disable=import-outside-toplevel
    self.encoder, self.inputs = encoder, encoder.inputs
    devices = list(devices) if devices is not None else jax.local_devices()
    n = len(devices)
    self.batch_size = -(-max(1, int(batch_size)) // n) * n
    model = encoder.model
    self.dim = int(model.config.embed_dim)
    params = jax.tree.map(_addressable, encoder.params)
    fn = lambda p, b: model.apply({"params": p}, b["ids"], b["mask"], b["pixels"], b["txt_mask"], b["img_mask"])
    # our mesh axes (the models' logical constraints name them), set around each call: overrides a
    # caller's (training) mesh
    self.mesh = mesh = partitioning.make_mesh({"data": n, "fsdp": 1, "tensor": 1}, devices)
    if n == 1:
      self._params, self._fn = jax.device_put(params, devices[0]), jax.jit(fn)
    else:
      rep, split = partitioning.replicated(mesh), partitioning.batch_sharding(mesh, 1)
      self._params = jax.device_put(params, rep)
      self._fn = jax.jit(fn, in_shardings=(rep, split), out_shardings=rep)

  def __call__(self, texts: Sequence[str], paths: Sequence[str | None]) -> np.ndarray:
    n, bs = len(texts), self.batch_size
    out = np.zeros((n, self.dim), np.float32)
    pending = None
    for s in range(0, n + bs, bs):
      job = None
      if s < n:
        m = min(bs, n - s)
        b = self.inputs(list(texts[s:s + m]) + [""] * (bs - m), list(paths[s:s + m]) + [None] * (bs - m))
        with jax.set_mesh(self.mesh):
          job = (s, m, self._fn(self._params, b))  # dispatched asynchronously
      if pending is not None:
        ps, pm, res = pending
        out[ps:ps + pm] = np.asarray(res, np.float32)[:pm]
      pending = job
    return out

  @property
  def bad_images(self) -> int:
    return int(getattr(self.inputs, "bad_images", 0))


def _addressable(x):
  """A param spread over other processes' devices (a multi-host training state) -> a host copy."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return x


def embed_in_memory(forward: Forward, records, image_root, instructions=None, mode: str = "random", seed: int = 0,
                    chunk: int = 4096) -> np.ndarray:
  """Raw float32 [N, D] embeddings of all records (queries or candidates)."""
  root = pathlib.Path(image_root)
  out = np.zeros((len(records), forward.dim), np.float32)
  for s in range(0, len(records), chunk):
    items = [item_inputs(records[i], root, instructions, mode, seed) for i in range(s, min(len(records), s + chunk))]
    out[s:s + len(items)] = forward([t for t, _ in items], [p for _, p in items])
  return out


# ---------------------------------------------------------------------------
# Writing shards
# ---------------------------------------------------------------------------
class ShardBudget:
  """How many shards may still be computed (`--max-shards`, a debugging aid); None = unlimited."""

  def __init__(self, limit: int | None = None):
    self.left = limit

  def take(self) -> bool:
    if self.left is None:
      return True
    if self.left <= 0:
      return False
    self.left -= 1
    return True


class ShardLimitReached(Exception):
  """Raised when the `ShardBudget` is spent before all shards are done (rerun to continue)."""


def _shard_ok(d: pathlib.Path, i: int, ids: np.ndarray, dim: int) -> bool:
  try:
    got = np.load(_ids_path(d, i))
    emb = np.load(_emb_path(d, i), mmap_mode="r")
    return (got.shape == ids.shape and bool(np.array_equal(got, ids)) and emb.shape == (len(ids), dim)
            and emb.dtype == np.float16)
  except Exception:  # pylint: disable=broad-except  # missing, truncated or foreign files: recompute
    return False


def shard_ranges(rows: int, shard_size: int) -> list[tuple[int, int]]:
  return [(s, min(rows, s + shard_size)) for s in range(0, rows, shard_size)]


def process_shards(num_shards: int, index: int | None = None, count: int | None = None) -> range:
  """The contiguous shard range of process `index` of `count` (defaults: this JAX process)."""
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  return range(num_shards * index // count, num_shards * (index + 1) // count)


def embed_to_shards(forward: Forward, records: mbeir.JsonlRecords, out_dir, *, image_root, fingerprint: dict,
                    instructions=None, mode: str = "random", seed: int = 0, shard_size: int = 32768,
                    budget: ShardBudget | None = None, overwrite: bool = False, progress: bool = False,
                    process: tuple[int, int] | None = None, log=None) -> dict[str, int]:
  """Embeds `records` into resumable shards under `out_dir` (layout: module docstring).

  Returns {"rows", "shards", "computed", "reused", "unreadable_images"} for this process.
  Raises `ShardLimitReached` when `budget` runs out first, ValueError when `out_dir` holds
  embeddings made with another `fingerprint` (unless `overwrite`).
  """
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  d = pathlib.Path(out_dir)
  shard_size = int(shard_size)
  if shard_size < 1:
    raise ValueError(f"shard size must be >= 1, got {shard_size}")
  ranges = shard_ranges(len(records), shard_size)
  manifest = {"format": FORMAT, "name": d.name, "kind": records.kind, "source": str(records.path),
              "rows": len(records), "dim": forward.dim, "dtype": "float16", "shard_size": shard_size,
              "num_shards": len(ranges), "fingerprint": {**fingerprint, "ids": digest(records.ids)},
              "stats": {k: records.stats.get(k) for k in ("skipped", "skip_reasons", "missing_images")}}
  index, count = process if process is not None else (jax.process_index(), jax.process_count())
  old = read_manifest(d)
  stale = old is not None and (old.get("fingerprint") != manifest["fingerprint"] or old.get("shard_size") != shard_size)
  if stale:
    if not overwrite:
      diff = sorted(k for k in set(old.get("fingerprint", {})) | set(manifest["fingerprint"])
                    if old.get("fingerprint", {}).get(k) != manifest["fingerprint"].get(k))
      if old.get("shard_size") != shard_size:
        diff.append("shard_size")
      raise ValueError(f"{d} holds embeddings made with other settings (differ: {', '.join(diff)}); pass "
                       "--overwrite to replace them, or use another --out")
    if index == 0:
      for f in d.glob("shard-*.npy"):
        f.unlink()
  if index == 0:
    d.mkdir(parents=True, exist_ok=True)
    if old != manifest:
      (d / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
  else:
    d.mkdir(parents=True, exist_ok=True)
  if count > 1 and process is None:
    from mmret_jax.train import partitioning  # pylint: disable=import-outside-toplevel
    partitioning.sync_processes(f"mbeir-embed-{d.name}")  # process 0 has checked / reset the folder
  mine = process_shards(len(ranges), index, count)
  todo = [i for i in mine if not _shard_ok(d, i, records.ids[ranges[i][0]:ranges[i][1]], forward.dim)]
  stats = {"rows": len(records), "shards": len(ranges), "computed": 0, "reused": len(mine) - len(todo),
           "unreadable_images": 0}
  if todo and log:
    log(f"embedding {d.name}: {len(todo)} of {len(ranges)} shards to compute ({len(records)} rows)")
  root = pathlib.Path(image_root)
  bad0 = forward.bad_images
  bar = tqdm(total=sum(ranges[i][1] - ranges[i][0] for i in todo), desc=d.name, unit="row",
             disable=not progress or not todo)
  try:
    for i in todo:
      if budget is not None and not budget.take():
        raise ShardLimitReached(f"stopped before shard {i} of {d.name} (--max-shards); rerun to continue")
      start, end = ranges[i]
      emb = np.zeros((end - start, forward.dim), np.float16)
      for s in range(start, end, forward.batch_size * 8):
        e = min(end, s + forward.batch_size * 8)
        items = [item_inputs(records[j], root, instructions, mode, seed) for j in range(s, e)]
        emb[s - start:e - start] = forward([t for t, _ in items], [p for _, p in items])
        bar.update(e - s)
      _save_atomic(_emb_path(d, i), emb)
      _save_atomic(_ids_path(d, i), np.ascontiguousarray(records.ids[start:end], np.int64))
      stats["computed"] += 1
  finally:
    bar.close()
    stats["unreadable_images"] = forward.bad_images - bad0
  return stats


def write_embeddings(out_dir, raw: np.ndarray, ids: np.ndarray, *, kind: str, shard_size: int = 32768,
                     fingerprint: dict | None = None, source: str = "") -> None:
  """Writes given embeddings [N, D] (stored as float16) and hashed ids as a complete embedding folder:
  e.g. embeddings made elsewhere (the seed's `mbeir_*_embed.npy` / `_ids.npy`), or test data."""
  d = pathlib.Path(out_dir)
  d.mkdir(parents=True, exist_ok=True)
  raw, ids = np.asarray(raw), np.asarray(ids, np.int64)
  if raw.ndim != 2 or len(raw) != len(ids):
    raise ValueError(f"need embeddings [N, D] and N ids, got {raw.shape} and {ids.shape}")
  ranges = shard_ranges(len(ids), int(shard_size))
  for i, (s, e) in enumerate(ranges):
    _save_atomic(_emb_path(d, i), raw[s:e].astype(np.float16))
    _save_atomic(_ids_path(d, i), ids[s:e])
  manifest = {"format": FORMAT, "name": d.name, "kind": kind, "source": source, "rows": len(ids),
              "dim": int(raw.shape[1]), "dtype": "float16", "shard_size": int(shard_size), "num_shards": len(ranges),
              "fingerprint": {**(fingerprint or {}), "ids": digest(ids)}, "stats": {}}
  (d / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def read_manifest(d) -> dict | None:
  try:
    return json.loads((pathlib.Path(d) / MANIFEST).read_text())
  except (OSError, ValueError):
    return None


# ---------------------------------------------------------------------------
# Reading embeddings back
# ---------------------------------------------------------------------------
class Embeddings:
  """L2-normalised float32 rows with hashed ids: `ids`, `num_rows`, `dim`, `blocks()`, `gather(rows)`,
  `matrix()`. Normalisation is per row (`retrieval.l2_normalize`), so a row's vector is the same
  whichever block or gather it comes from."""

  ids: np.ndarray
  dim: int

  @property
  def num_rows(self) -> int:
    return len(self.ids)

  def blocks(self) -> Iterator[np.ndarray]:
    raise NotImplementedError

  def gather(self, rows: np.ndarray) -> np.ndarray:
    raise NotImplementedError

  def matrix(self) -> np.ndarray:
    parts = list(self.blocks())
    return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)

  def id_blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    start = 0
    for b in self.blocks():
      yield b, self.ids[start:start + len(b)]
      start += len(b)


class MemoryEmbeddings(Embeddings):
  """In-memory rows, rounded to float16 first as the stored shards are (so `evaluate` in memory and the
  CLI rank identically)."""

  def __init__(self, raw: np.ndarray, ids: np.ndarray):
    raw = np.asarray(raw).astype(np.float16)
    self.x, self.ids, self.dim = l2_normalize(raw), np.asarray(ids, np.int64), int(raw.shape[1])

  def blocks(self):
    yield self.x

  def gather(self, rows):
    return self.x[np.asarray(rows, np.int64)]

  @classmethod
  def concat(cls, parts: Sequence[MemoryEmbeddings]) -> tuple[MemoryEmbeddings, int]:
    """The union of pools: rows in order, a repeated id kept at its first occurrence; (pool, dropped)."""
    ids = np.concatenate([p.ids for p in parts])
    keep = first_occurrences(ids)
    out = cls.__new__(cls)
    out.x, out.ids, out.dim = np.concatenate([p.x for p in parts])[keep], ids[keep], parts[0].dim
    return out, int(len(ids) - keep.sum())


def first_occurrences(ids: np.ndarray) -> np.ndarray:
  """Boolean mask keeping the first row of every id."""
  _, first = np.unique(ids, return_index=True)
  keep = np.zeros(len(ids), bool)
  keep[first] = True
  return keep


class StoredEmbeddings(Embeddings):
  """Embedding folders read back (one folder, or several concatenated: the UNION pool).

  With `dedupe`, a row whose id appeared in an earlier row (of any folder) is dropped, as the seed's
  index would reject repeated ids. Every folder must be complete (all shards valid).
  """

  def __init__(self, dirs: Sequence[str | os.PathLike], dedupe: bool = False):
    self.dirs = [pathlib.Path(d) for d in dirs]
    self.manifests, self._segments, ids = [], [], []
    dims = set()
    for d in self.dirs:
      m = read_manifest(d)
      if m is None:
        raise FileNotFoundError(f"no embeddings in {d} (no {MANIFEST}); run the `embed` step first")
      ranges = shard_ranges(int(m["rows"]), int(m["shard_size"]))
      bad = []
      for i, (s, e) in enumerate(ranges):
        try:
          got = np.load(_ids_path(d, i))
          shape = np.load(_emb_path(d, i), mmap_mode="r").shape
        except Exception:  # pylint: disable=broad-except
          bad.append(i)
          continue
        if got.shape != (e - s,) or shape != (e - s, int(m["dim"])):
          bad.append(i)
          continue
        ids.append(got)
        self._segments.append([_emb_path(d, i), None, e - s])
      if bad:
        raise ValueError(f"{d} is incomplete: {len(bad)} of {len(ranges)} shards missing or damaged (first: "
                         f"{_emb_path(d, bad[0]).name}); rerun the `embed` step to finish it")
      self.manifests.append(m)
      dims.add(int(m["dim"]))
    if len(dims) > 1:
      raise ValueError(f"embedding folders {[str(d) for d in self.dirs]} have different dims {sorted(dims)}")
    self.dim = dims.pop() if dims else 0
    all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    self.dropped = 0
    if dedupe and len(all_ids):
      keep = first_occurrences(all_ids)
      self.dropped = int(len(keep) - keep.sum())
      if self.dropped:
        pos = 0
        for seg in self._segments:
          k = keep[pos:pos + seg[2]]
          pos += seg[2]
          seg[1], seg[2] = (None if k.all() else np.flatnonzero(k)), int(k.sum())
        all_ids = all_ids[keep]
    self.ids = all_ids
    self._offsets = np.cumsum([0] + [s[2] for s in self._segments])
    self._mmaps: dict[int, np.ndarray] = {}

  def fingerprint(self) -> str:
    return digest([m["fingerprint"] for m in self.manifests], self.ids)

  def _mmap(self, j: int) -> np.ndarray:
    if j not in self._mmaps:
      self._mmaps[j] = np.load(self._segments[j][0], mmap_mode="r")
    return self._mmaps[j]

  def blocks(self):
    for j, (_, keep, n) in enumerate(self._segments):
      if n:
        x = self._mmap(j)
        yield l2_normalize(x if keep is None else x[keep])

  def gather(self, rows):
    rows = np.asarray(rows, np.int64)
    out = np.zeros((len(rows), self.dim), np.float32)
    seg = np.searchsorted(self._offsets, rows, side="right") - 1
    for j in np.unique(seg):
      sel = np.flatnonzero(seg == j)
      local = rows[sel] - self._offsets[j]
      keep = self._segments[j][1]
      out[sel] = l2_normalize(self._mmap(int(j))[local if keep is None else keep[local]])
    return out
