"""Features computed once by frozen weights and kept on disk, keyed by what they depend on.

A cache entry is a directory `<root>/<kind>-<key>/` holding `features.npy` [N, D] float32,
`ok.npy` [N] bool (False: the item could not be read, e.g. a missing image; its row is zeros),
`names.json` and `key.json`. The key is a SHA-256 over a JSON description that includes a digest of
the weights (`params_digest`), the preprocessing settings and the item list (with file sizes and
modification times for files), so an entry is reused across runs and never for other weights, other
settings or changed files. Entries are written to a temporary directory and renamed, so a killed
run leaves no half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Callable, Sequence

import numpy as np

from mmret_jax import storage


def params_digest(params: Any) -> str:
  """SHA-256 over every array of a param tree (paths, dtypes, shapes and bytes), in path order."""
  import jax  # pylint: disable=import-outside-toplevel
  h = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, x in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    x = np.ascontiguousarray(np.asarray(x))
    h.update(f"{jax.tree_util.keystr(path)}|{x.dtype}|{x.shape}".encode())
    h.update(x.tobytes())
  return h.hexdigest()


def files_fingerprint(paths: Sequence[str | os.PathLike]) -> str:
  """SHA-256 over (path, size, mtime) of each file (missing files count as such)."""
  h = hashlib.sha256()
  for p in paths:
    try:
      st = os.stat(p)
      h.update(f"{os.fspath(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    except OSError:
      h.update(f"{os.fspath(p)}|missing\n".encode())
  return h.hexdigest()


def cache_key(description: dict) -> str:
  return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cached_features(root: str | os.PathLike, kind: str, description: dict, names: Sequence[str],
                    compute: Callable[[], tuple[np.ndarray, np.ndarray]], *, log=print
                    ) -> tuple[np.ndarray, np.ndarray, pathlib.Path]:
  """Returns (features [N, D], ok [N], entry dir): loaded from the entry for `description` when it
  exists (and lists the same `names`), else `compute()`d and saved there."""
  key = cache_key({**description, "names": list(names)})
  entry = pathlib.Path(root) / f"{kind}-{key}"
  if (entry / "key.json").exists():
    try:
      saved_names = json.loads((entry / "names.json").read_text())
      if saved_names == list(names):
        feats, ok = np.load(entry / "features.npy"), np.load(entry / "ok.npy")
        if feats.shape[0] == len(names) == ok.shape[0]:
          log(f"{kind}: {len(names)} cached features from {entry}")
          return feats, ok, entry
    except (OSError, ValueError):
      pass
    log(f"{kind}: cache entry {entry} is unreadable; computing it again")
  feats, ok = compute()
  feats, ok = np.asarray(feats, np.float32), np.asarray(ok, bool)
  if feats.shape[0] != len(names) or ok.shape != (len(names),):
    raise ValueError(f"{kind}: computed {feats.shape[0]} features for {len(names)} items")
  entry.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=entry.parent))
  try:
    np.save(tmp / "features.npy", feats)
    np.save(tmp / "ok.npy", ok)
    (tmp / "names.json").write_text(json.dumps(list(names)))
    (tmp / "key.json").write_text(json.dumps({**description, "items": len(names)}, indent=1, sort_keys=True,
                                             default=str))
    if entry.exists():
      shutil.rmtree(entry)
    tmp.rename(entry)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  log(f"{kind}: {len(names)} features computed and cached in {storage.display(entry)}")
  return feats, ok, entry
