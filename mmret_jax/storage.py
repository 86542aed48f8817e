"""Local or remote (gs://, s3://, ...) directories for workdirs and exported models.

A workdir may be a local path or a bucket URL (`--workdir=gs://bucket/run`, as TPU pods use).
Orbax checkpoints go to the URL directly. Artifacts written by libraries that only know local files
(Hugging Face tokenizers, converted model dirs, TensorBoard event files) are written to a local
staging dir and copied up (`staged_dir`, `Mirror`); reading a remote model dir downloads it once into
a local cache (`local_copy`). Remote access goes through `etils.epath`, which needs the bucket's
filesystem package (`pip install gcsfs` for gs://, `s3fs` for s3://).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import shutil
import tempfile
from typing import Callable, Iterator, Union

from etils import epath

PathLike = Union[str, os.PathLike]
REMOTE_PREFIXES = ("gs://", "s3://", "az://")
CACHE_DIR = pathlib.Path(os.environ.get("MMRET_JAX_CACHE", "~/.cache/mmret_jax")).expanduser() / "remote"


def is_remote(path: PathLike) -> bool:
  return str(path).startswith(REMOTE_PREFIXES)


def as_path(path: PathLike):
  """`pathlib.Path` for a local path, `epath.Path` (same API) for a bucket URL."""
  return epath.Path(str(path)) if is_remote(path) else pathlib.Path(path)


def display(path: PathLike) -> str:
  """Absolute local path or the URL, for messages."""
  return str(path) if is_remote(path) else str(pathlib.Path(path).absolute())


def files_under(root) -> Iterator[tuple[str, object]]:
  """(relative posix path, path) of every file under `root`, sorted; one listing per directory
  (epath refuses recursive globs on buckets)."""
  for child in sorted(root.iterdir(), key=lambda p: p.name):
    if child.is_dir():
      for rel, f in files_under(child):
        yield f"{child.name}/{rel}", f
    else:
      yield child.name, child


def copy_tree(src, dst, only: Callable[[str, object], bool] | None = None) -> int:
  """Copies every file under `src` (those `only(rel, path)` accepts, if given) to `dst`, either side
  local or remote; returns the file count."""
  src, dst = as_path(src), as_path(dst)
  n = 0
  for rel, f in files_under(src):
    if only is not None and not only(rel, f):
      continue
    target = dst / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(f.read_bytes())
    n += 1
  return n


@contextlib.contextmanager
def staged_dir(dst: PathLike) -> Iterator[pathlib.Path]:
  """A local directory to write `dst`'s contents into: `dst` itself when local; otherwise a temporary
  dir whose files are copied to `dst` when the block ends without error."""
  if not is_remote(dst):
    path = pathlib.Path(dst)
    path.mkdir(parents=True, exist_ok=True)
    yield path
    return
  with tempfile.TemporaryDirectory(prefix="mmret_stage_") as tmp:
    yield pathlib.Path(tmp)
    copy_tree(tmp, dst)


@contextlib.contextmanager
def replaced_together(paths) -> Iterator[dict]:
  """Local output files written all or none: yields {path: its `incomplete.<name>` twin} to write; when the block
  ends without an error every twin is renamed onto its path (missing twins are an error), and the twins are
  removed in any case, so a failed run leaves the previous outputs as they were."""
  twins = {pathlib.Path(p): pathlib.Path(p).with_name("incomplete." + pathlib.Path(p).name) for p in paths}
  try:
    yield twins
    for path, twin in twins.items():
      os.replace(twin, path)
  finally:
    for twin in twins.values():
      twin.unlink(missing_ok=True)


def local_copy(src: PathLike, refresh: bool = False) -> pathlib.Path:
  """`src` itself when local; a remote dir is downloaded once into the local cache
  (`$MMRET_JAX_CACHE/remote`, default ~/.cache/mmret_jax/remote) and that copy returned."""
  if not is_remote(src):
    return pathlib.Path(src)
  remote = as_path(src)
  if not remote.exists():
    raise FileNotFoundError(f"no such remote directory: {src}")
  key = hashlib.sha1(str(src).rstrip("/").encode()).hexdigest()[:16]
  dst = CACHE_DIR / f"{remote.name or 'root'}-{key}"
  if dst.exists() and not refresh:
    return dst
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=dst.name + ".", dir=_mkdir(CACHE_DIR)))
  try:
    if not copy_tree(remote, tmp):
      raise FileNotFoundError(f"remote directory {src} has no files")
    if dst.exists():
      shutil.rmtree(dst)
    tmp.rename(dst)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return dst


def rmtree(path: PathLike) -> None:
  """Removes a directory tree, local or remote (missing is fine)."""
  path = as_path(path)
  if not path.exists():
    return
  if is_remote(path):
    path.rmtree()
  else:
    shutil.rmtree(path)


def move_aside(path: PathLike, name: str):
  """Renames the directory `path` to `name` in the same parent (`name`, then `name.1`, `name.2`, ...
  if taken); returns the new path. Remote directories are copied, then removed."""
  path = as_path(path)
  target, n = path.parent / name, 0
  while target.exists():
    n += 1
    target = path.parent / f"{name}.{n}"
  if is_remote(path):
    copy_tree(path, target)
    path.rmtree()
  else:
    path.rename(target)
  return target


def _mkdir(p: pathlib.Path) -> pathlib.Path:
  p.mkdir(parents=True, exist_ok=True)
  return p


class Mirror:
  """A local dir mirrored to a remote one: files written locally are uploaded by `sync()` (only
  those whose size or mtime changed since the last sync). For a local target, the target itself."""

  def __init__(self, target: PathLike, download: tuple[str, ...] = ()):
    """`download`: names of files to fetch from the remote target first (files appended to on resume)."""
    self.target = target
    self.remote = is_remote(target)
    if not self.remote:
      self.local = pathlib.Path(target)
      self.local.mkdir(parents=True, exist_ok=True)
      return
    self._tmp = tempfile.TemporaryDirectory(prefix="mmret_mirror_")
    self.local = pathlib.Path(self._tmp.name)
    self._seen: dict[str, tuple[int, int]] = {}
    remote = as_path(target)
    remote.mkdir(parents=True, exist_ok=True)
    for name in download:
      if (remote / name).exists():
        (self.local / name).write_bytes((remote / name).read_bytes())
        self._seen[name] = self._stamp(self.local / name)

  @staticmethod
  def _stamp(f: pathlib.Path) -> tuple[int, int]:
    st = f.stat()
    return st.st_size, st.st_mtime_ns

  def sync(self) -> int:
    """Uploads new or changed files; returns how many."""
    if not self.remote:
      return 0

    def changed(rel: str, f: pathlib.Path) -> bool:
      stamp = self._stamp(f)
      if self._seen.get(rel) == stamp:
        return False
      self._seen[rel] = stamp
      return True

    return copy_tree(self.local, self.target, only=changed)

  def close(self) -> None:
    if self.remote:
      self.sync()
      self._tmp.cleanup()
