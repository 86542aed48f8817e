"""Grain pipeline stages of our own.

`CountedFilter` drops rows like `IterDataset.filter` but keeps the number it dropped in the
iterator's state, so the count is saved in the checkpoint with the data position (one state per
process, as grain saves it) and a resumed run reports the same total as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any, Callable

import grain


class SkipCounter:
  """The running count of rows a `CountedFilter` dropped on this process."""

  def __init__(self):
    self.count = 0


class _CountedFilterIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, keep: Callable[[Any], bool], counter: SkipCounter):
    super().__init__(parent)
    self._keep, self._counter = keep, counter

  def __next__(self):
    while True:
      row = next(self._parent)  # StopIteration ends this iterator too
      if self._keep(row):
        return row
      self._counter.count += 1

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
  """`parent` without the rows where `keep(row)` is false; `counter.count` is how many were dropped."""

  def __init__(self, parent: grain.IterDataset, keep: Callable[[Any], bool], counter: SkipCounter):
    super().__init__(parent)
    self._keep, self.counter = keep, counter

  def __iter__(self) -> _CountedFilterIterator:
    return _CountedFilterIterator(self._parent.__iter__(), self._keep, self.counter)
