"""`data.pipeline.CountedFilter`: rows dropped and counted, the count saved and restored with the state."""

import grain

from mmret_jax.data import pipeline


def _counted(counter):
  ds = grain.MapDataset.range(20).to_iter_dataset()
  return iter(pipeline.CountedFilter(ds, lambda x: x % 3 != 0, counter))  # drops 0, 3, 6, ...


def test_counts_and_restores():
  c = pipeline.SkipCounter()
  it = _counted(c)
  first = [next(it) for _ in range(5)]
  assert first == [1, 2, 4, 5, 7] and c.count == 3  # 0, 3, 6 dropped
  state = it.get_state()
  rest = list(it)
  assert rest == [8, 10, 11, 13, 14, 16, 17, 19] and c.count == 7

  c2 = pipeline.SkipCounter()
  it2 = _counted(c2)
  it2.set_state(state)
  assert c2.count == 3 and list(it2) == rest and c2.count == 7


def test_reads_state_of_a_plain_grain_filter():
  """A checkpoint from grain's own `.filter` (no count saved) resumes at its position with count 0."""
  plain = iter(grain.MapDataset.range(20).to_iter_dataset().filter(lambda x: x % 3 != 0))
  [next(plain) for _ in range(5)]
  c = pipeline.SkipCounter()
  it = _counted(c)
  it.set_state(plain.get_state())
  assert next(it) == 8 and c.count == 0
