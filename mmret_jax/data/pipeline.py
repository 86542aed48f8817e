"""Grain pipeline stages of our own.

`CountedFilter` drops rows like `IterDataset.filter` but keeps the number it dropped in the
iterator's state, so the count is saved in the checkpoint with the data position (one state per
process, as grain saves it) and a resumed run reports the same total as an uninterrupted one.

`epoch_batches` is the seed trainers' DataLoader (shuffle, drop_last) as a checkpointable grain
iterator: batch i of the endless stream is cut from the permutation of its epoch.
"""

from __future__ import annotations

from typing import Any, Callable

import grain


class SkipCounter:
  """The running count of rows a `CountedFilter` dropped on this process."""

  def __init__(self):
    self.count = 0


class _CountedFilterIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, keep: Callable[[Any], bool], counter: SkipCounter,
               drop: bool = True):
    super().__init__(parent)
    self._keep, self._counter, self._drop = keep, counter, drop

  def __next__(self):
    while True:
      row = next(self._parent)  # StopIteration ends this iterator too
      if self._keep(row):
        return row
      self._counter.count += 1
      if not self._drop:
        return row

  def get_state(self):
    return {"parent": self._parent.get_state(), "skipped": self._counter.count}

  def set_state(self, state):
    if isinstance(state, dict) and set(state) == {"parent", "skipped"}:
      self._parent.set_state(state["parent"])
      self._counter.count = int(state["skipped"])
    else:  # a checkpoint written by grain's plain filter (no count saved): the parent's state
      self._parent.set_state(state)
      self._counter.count = 0


class CountedFilter(grain.IterDataset):
  """`parent` without the rows where `keep(row)` is false; `counter.count` is how many were dropped.
  `drop=False` counts those rows and passes them on (e.g. rows given a stand-in image)."""

  def __init__(self, parent: grain.IterDataset, keep: Callable[[Any], bool], counter: SkipCounter,
               drop: bool = True):
    super().__init__(parent)
    self._keep, self.counter, self._drop = keep, counter, drop

  def __iter__(self) -> _CountedFilterIterator:
    return _CountedFilterIterator(self._parent.__iter__(), self._keep, self.counter, self._drop)


class EpochBatches(grain.transforms.Map):
  """Global batch number -> this process's part of it, built by `make_batch(rows, epoch)`.

  Batch i belongs to epoch e = i // (num_rows // global_batch); each epoch is the permutation
  `numpy.random.default_rng([seed, e])` of the rows, cut into global batches, the last partial one
  dropped (a PyTorch DataLoader with shuffle and drop_last). With `drop_last=False` (RecBole's loader) an
  epoch has ceil(num_rows / global_batch) batches and the rows of the last one may be fewer than
  `process_batch` (none at all on a later process): `make_batch` pads them. Per-row randomness should be
  drawn from (seed, epoch, row) by `make_batch`, so a resumed run replays the same batches.
  `process_index` defaults to `jax.process_index()`.
  """

  def __init__(self, num_rows: int, seed: int, global_batch: int, process_batch: int,
               make_batch: Callable[[Any, int], Any], drop_last: bool = True, process_index: int | None = None):
    import numpy as np  # pylint: disable=import-outside-toplevel
    if num_rows < (global_batch if drop_last else 1):
      raise ValueError(f"batch_size {global_batch} exceeds the {num_rows} training rows")
    if process_batch < 1 or global_batch % process_batch:
      raise ValueError(f"batch_size {global_batch} must be a multiple of the per-process batch {process_batch}")
    self._np, self.num_rows, self.seed = np, num_rows, seed
    self.global_batch, self.process_batch, self.make_batch = global_batch, process_batch, make_batch
    self.steps_per_epoch = num_rows // global_batch if drop_last else -(-num_rows // global_batch)
    self.process_index = process_index

  def map(self, i):
    if self.process_index is None:
      import jax  # pylint: disable=import-outside-toplevel
      self.process_index = jax.process_index()
    epoch, b = divmod(int(i), self.steps_per_epoch)
    perm = self._np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
    start = b * self.global_batch + self.process_index * self.process_batch
    return self.make_batch(perm[start:start + self.process_batch], epoch)


def epoch_batches(num_rows: int, seed: int, global_batch: int, process_batch: int, make_batch,
                  num_threads: int = 1, prefetch: int = 2, drop_last: bool = True, process_index: int | None = None):
  """A checkpointable iterator over `EpochBatches` (grain: its state is the batch number)."""
  ds = grain.MapDataset.range(1 << 40).map(EpochBatches(num_rows, seed, global_batch, process_batch, make_batch,
                                                        drop_last, process_index))
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)))
