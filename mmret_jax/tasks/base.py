"""What the generic loop needs from a task (one subclass per seed system)."""

from __future__ import annotations

import pathlib
from typing import Any, Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from mmret_jax import storage


def fill_from(params: Any, pretrained: Any, what: str = "init_from") -> Any:
  """`params` (host, boxed or not) with every leaf taken from the same path of `pretrained` (a nested
  dict), cast to the leaf's dtype; a missing path or another shape is a ValueError naming it."""
  def take(path, leaf):
    node = pretrained
    for k in path:
      key = getattr(k, "key", getattr(k, "name", k))
      if not isinstance(node, dict) or key not in node:
        raise ValueError(f"{what}: no weights for {'/'.join(str(getattr(p, 'key', p)) for p in path)}")
      node = node[key]
    if node.shape != leaf.shape:
      raise ValueError(f"{what}: {'/'.join(str(getattr(p, 'key', p)) for p in path)} has shape {node.shape}, "
                       f"expected {leaf.shape}")
    return np.asarray(node, leaf.dtype)
  return jax.tree_util.tree_map_with_path(take, params)


def load_family_dir(path: pathlib.Path, family: str, what: str, how: str) -> tuple[pathlib.Path, dict, Any]:
  """(the dir, its HF-style config dict, params) of a converted `family` dir or a training workdir
  (its `model/`); another family is a ValueError ending with `how` (the conversion command)."""
  from mmret_jax import convert  # pylint: disable=import-outside-toplevel
  if (path / "model").is_dir() and not convert.is_converted_dir(path):
    path = path / "model"
  meta, hf_config, params, _ = convert.load_any(path)
  if meta.get("family") != family:
    raise ValueError(f"{what} is a {meta.get('family')} model, not a {family} one ({how})")
  return path, hf_config, params


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

  # True: `load_init` runs before step 0 even without `config.init_from` (a task whose params hold data, e.g.
  # seqrec's frozen feature table, that `init_params` cannot make without baking it into a compiled program).
  load_init_always = False

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

  def ring_mesh(self) -> Mesh | None:
    """`config.loss.impl`: "dense" (default: the [B, B] logits) -> None; "ring" -> the mesh over whose data x fsdp
    devices the contrastive loss passes candidate blocks (`losses.ring_cross_entropy`: same values, no [B, B]
    matrix). Another value is a ValueError."""
    impl = str((self.config.get("loss") or {}).get("impl", "dense"))
    if impl not in ("dense", "ring"):
      raise ValueError(f"loss.impl must be dense or ring, got {impl!r}")
    return self.mesh if impl == "ring" else None

  # How to use the exported model; `{workdir}` is filled in (printed at the end of training).
  usage = "python -m mmret_jax.embed --model {workdir} ..."

  def export(self, params: Any, dst: pathlib.Path) -> None:
    """Writes an inference model at the end of training into the local dir `dst` (the loop uploads
    it when the workdir is remote; default: nothing)."""
