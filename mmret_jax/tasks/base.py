"""What the generic loop needs from a task (one subclass per seed system)."""

from __future__ import annotations

import pathlib
from typing import Any, Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from mmret_jax import storage


class Task:
  """A task owns its model, loss, data and evaluation; `train/loop.py` owns everything else.

  Batches are dicts of numpy arrays with a leading per-process batch dim; an optional `index`
  entry (row ids, int64) is kept on the host and named when a step goes non-finite.
  """

  def __init__(self, config, mesh: Mesh, workdir: pathlib.Path):
    # pathlib.Path, or an epath.Path (same API) for a gs:// workdir; see mmret_jax/storage.py
    self.config, self.mesh, self.workdir = config, mesh, storage.as_path(workdir)

  @property
  def num_train_examples(self) -> int:
    raise NotImplementedError

  def steps_per_epoch(self, global_batch: int) -> int | None:
    """Steps in one epoch if the pipeline defines epochs exactly (e.g. drops each epoch's last partial
    batch); None = ceil(num_train_examples / global_batch)."""
    return None

  def init_params(self, rng: jax.Array) -> Any:
    """Boxed (logically partitioned) params; pure and traceable."""
    raise NotImplementedError

  def freeze_patterns(self) -> tuple[str, ...]:
    """Param-path regexes the task freezes on top of `config.optim.freeze` (default none)."""
    return ()

  def init_task_state(self, params: Any) -> Any:
    """Task-owned state the optimizer does not train (momentum encoders, queues): a pytree built from
    the params (boxed when they are), kept in the train state, saved and resumed with it, and replaced
    each step by the `task_state` entry of `loss_fn`'s aux output. None (default) = no such state."""
    return None

  def post_update(self, params: Any) -> Any:
    """Params after each optimizer update -> params (e.g. a clamped temperature). Default: as they are."""
    return params

  def load_init(self, params: Any) -> Any:
    """Host params -> host params with `config.init_from` weights put in (default: unchanged)."""
    return params

  def loss_fn(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array,
              train: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, aux scalars). A task with a task state takes `task_state=` too and returns the new one
    as `aux["task_state"]`."""
    raise NotImplementedError

  def train_iterator(self, per_process_batch: int) -> Iterator[dict[str, np.ndarray]]:
    """A grain DatasetIterator (checkpointable) over per-process batches."""
    raise NotImplementedError

  def evaluate(self, params: Any) -> dict[str, float]:
    return {}

  # How to use the exported model; `{workdir}` is filled in (printed at the end of training).
  usage = "python -m mmret_jax.embed --model {workdir} ..."

  def export(self, params: Any, dst: pathlib.Path) -> None:
    """Writes an inference model at the end of training into the local dir `dst` (the loop uploads
    it when the workdir is remote; default: nothing)."""
