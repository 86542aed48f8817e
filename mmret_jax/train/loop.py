"""The one train / eval loop: mesh, sharded jit step, optax, Orbax checkpoints, metrics, resume.

A task (see `tasks/base.py`) supplies the model init, the loss, the data and the
evals; everything else is here and shared by every seed system.

Resume order: newest valid checkpoint in `workdir/checkpoints` -> `config.init_from`
(via the task) -> scratch. A checkpoint holds params, optimizer state, step, RNG and
the grain iterator position, so a resumed run continues bit-for-bit on CPU.

A damaged checkpoint (a truncated array file, as a full disk or a killed copy leaves it) is
reported in one line, moved aside to `checkpoints/corrupt-<step>` and the next older one is
tried; with none left the run starts exactly as in a fresh workdir. `metrics.jsonl` is cut back
to the restored step, so no step is logged twice. The resolved config is written to
`workdir/config.json`; resuming with a changed result-altering key is a warning naming it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import gc
import json
import logging
import math
import pathlib
import signal
import sys
import time
from typing import Any

import flax
import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm
from tqdm import tqdm

from mmret_jax import cli, storage, tasks
from mmret_jax.train import metrics as metrics_lib
from mmret_jax.train import grad_cache, optim, partitioning


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient went NaN/Inf (message names the step and the batch's row ids)."""


class CheckpointMismatchError(ValueError):
  """A workdir checkpoint holds another model's or optimizer's arrays than the config builds."""


@dataclasses.dataclass
class RunResult:
  """What `train_and_evaluate` returns: the last eval metrics and the final (sharded) state."""
  eval: dict[str, float]
  state: "TrainState"
  total_steps: int
  interrupted: bool = False  # stopped by SIGTERM / SIGINT after saving a checkpoint
  stopped_early: bool = False  # ended by `early_stopping` (a finished run: its model was exported)
  best_step: int | None = None  # the step of the best evaluation (`checkpoint.best_metric`), when one was watched

  @property
  def finished(self) -> bool:
    return self.stopped_early or int(jax.device_get(self.state.step)) == self.total_steps


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32[2] raw key; the step's key is fold_in(rng, step)


@flax.struct.dataclass
class TaskTrainState(TrainState):
  """A train state with the task's own state (`Task.init_task_state`: momentum encoders, queues)."""
  task_state: Any = None


def make_state(task, tx, params, rng, task_state_from=None):
  """TrainState at step 0 for `params` (TaskTrainState when the task keeps a task state, built from
  `task_state_from`, default `params`)."""
  ts = task.init_task_state(params if task_state_from is None else task_state_from)
  common = dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)
  return TrainState(**common) if ts is None else TaskTrainState(**common, task_state=ts)


def _mean_tree(trees):
  return jax.tree.map(lambda *x: sum(x) / len(x), *trees)


def _strip_boxes(tree):
  """Unboxes without sharding constraints (for abstract / host trees)."""
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.LogicallyPartitioned) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def grad_cache_parts(task, chunk_size: int, accum_steps: int = 1):
  """The task's GradCache split (train/grad_cache.py) when chunk_size > 0, else None; clear errors for tasks
  without one and for settings that do not combine."""
  if chunk_size <= 0:
    return None
  name = type(task).__name__
  if not hasattr(task, "grad_cache_parts"):
    raise ValueError(f"grad_cache.chunk_size={chunk_size}: {name} has no GradCache split (contrastive tasks "
                     "only); set grad_cache.chunk_size=0")
  if accum_steps != 1:
    raise ValueError("grad_cache.chunk_size and grad_accum_steps > 1 do not combine: GradCache already bounds "
                     "the activations, and keeps every negative of the batch")
  parts = task.grad_cache_parts()
  if parts is None:
    raise ValueError(f"grad_cache.chunk_size={chunk_size}: {name} has no GradCache split in this configuration")
  return parts


def make_train_step(task, tx, accum_steps: int, on_nonfinite: str, grad_cache_chunk: int = 0,
                    data_parallel: int = 1):
  """The pure step: (state, batch) -> (state, metrics). Microbatches when accum_steps > 1; GradCache chunks of
  `grad_cache_chunk` rows when > 0 (the task's `grad_cache_parts`)."""

  post_update = getattr(task, "post_update", lambda p: p)  # benchmark tasks may define loss_fn only
  parts = grad_cache_parts(task, grad_cache_chunk, accum_steps)

  def grads_of(params, batch, rng, task_state=None):
    if parts is not None:
      if task_state is not None:
        raise ValueError("grad_cache.chunk_size is not supported for tasks with a task state (queues, momentum)")
      return grad_cache.value_and_grad(parts, params, batch, rng, grad_cache_chunk, data_parallel)
    kw = {} if task_state is None else {"task_state": task_state}
    # allow_int: integer leaves (a frozen int8 / int4 quantized LLM, models/quant.py) get zero gradients
    out, grads = jax.value_and_grad(task.loss_fn, has_aux=True, allow_int=True)(params, batch, rng, **kw)
    return out, jax.tree.map(lambda g, p: jnp.zeros_like(p) if g.dtype == jax.dtypes.float0 else g, grads, params)

  def step(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    task_state = getattr(state, "task_state", None)
    if task_state is not None and accum_steps != 1:
      raise ValueError("grad_accum_steps > 1 is not supported for tasks with a task state (queues, momentum)")
    if accum_steps == 1:
      (loss, aux), grads = grads_of(state.params, batch, rng, task_state)
    else:  # negatives come from each microbatch only: documented in the config
      micro = jax.tree.map(lambda x: x.reshape(accum_steps, -1, *x.shape[1:]), batch)

      def body(carry, xs):
        i, mb = xs
        (l, a), g = grads_of(state.params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (l, a, g)), None
      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grads_of, state.params,
                                                          jax.tree.map(lambda x: x[0], micro), rng))
      zeros = (zeros[0][0], zeros[0][1], zeros[1])
      (loss, aux, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
      loss, aux, grads = jax.tree.map(lambda x: x / accum_steps, (loss, aux, grads))
    aux = dict(aux)
    new_task_state = aux.pop("task_state", None)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new = state.replace(step=state.step + 1, params=post_update(optax.apply_updates(state.params, updates)),
                        opt_state=opt_state)
    if new_task_state is not None:
      new = new.replace(task_state=new_task_state)
    if on_nonfinite == "skip":  # keep the old params/opt state (and task state), still advance the step
      keep = lambda n, o: jax.tree.map(lambda a, b: jnp.where(finite, a, b), n, o)
      new = new.replace(params=keep(new.params, state.params), opt_state=keep(new.opt_state, state.opt_state))
      if new_task_state is not None:
        new = new.replace(task_state=keep(new.task_state, state.task_state))
    return new, {"loss": loss, "grad_norm": grad_norm, "finite": finite, **aux}

  return step


class _Stopper:
  """SIGTERM / SIGINT -> save a checkpoint at the next step boundary and exit cleanly."""

  def __init__(self):
    self.requested = False
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self.requested:  # second signal: give up immediately
      raise KeyboardInterrupt
    self.requested = True

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


INIT_RNG_IMPLS = ("auto", "threefry2x32", "rbg")


def init_and_train_keys(config) -> tuple[jax.Array, jax.Array]:
  """(key for the random init, raw uint32 key of the train-step RNG) from `config.seed`.

  `init_rng_impl`: threefry2x32 = split(PRNGKey(seed)) as before (sharding-invariant values);
  rbg = XLA's RngBitGenerator for the init only. On GPU (XLA, jax 0.11) compiling a threefry
  init of roberta-base took 4 minutes against ~25 s with rbg, so "auto" = rbg on GPU and threefry
  elsewhere (on CPU rbg is slower, on TPU threefry is what the reference numbers used). rbg init
  values depend on the mesh; the training RNG (dropout, MLM masking) is threefry either way."""
  impl = config.get("init_rng_impl", "auto")
  if impl not in INIT_RNG_IMPLS:
    raise ValueError(f"init_rng_impl must be one of {INIT_RNG_IMPLS}, got {impl!r}")
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(int(config.seed)))
  if impl == "rbg" or (impl == "auto" and jax.default_backend() == "gpu"):
    init_rng = jax.random.key(int(config.seed), impl="rbg")
  return init_rng, train_rng


def resolve_total_steps(config, num_train_examples: int, steps_per_epoch: int | None = None) -> int:
  """`total_steps`, else `num_epochs` epochs: of `steps_per_epoch` steps when the task says (e.g. a
  pipeline that drops each epoch's last partial batch), else ceil(examples / batch) per epoch."""
  if int(config.total_steps) > 0:
    return int(config.total_steps)
  epochs = float(config.get("num_epochs", 0) or 0)
  if epochs <= 0:
    raise ValueError("Set config.total_steps > 0 or config.num_epochs > 0")
  if steps_per_epoch:
    return max(1, math.ceil(epochs * steps_per_epoch))
  return max(1, math.ceil(epochs * num_train_examples / int(config.batch_size)))


class EarlyStopping:
  """Watches `checkpoint.best_metric` (`best_mode` max | min) at each evaluation, as RecBole's trainer does
  (`stopping_step`): a value at least as good as the best so far (ties count: the later step becomes the best,
  which is also the checkpoint Orbax's BestN keeps) resets the count; otherwise the count goes up, and the run
  stops when it exceeds `early_stopping.patience`. patience 0 = never stop (the best is still tracked when a
  best_metric is set). On resume the count is replayed from the eval rows of `metrics.jsonl` up to the restored
  step, so a resumed run stops where an uninterrupted one does."""

  def __init__(self, config, workdir=None, start: int = 0):
    es = config.get("early_stopping") or {}
    self.patience = int(es.get("patience", 0) or 0)
    self.metric = str(config.checkpoint.get("best_metric", "") or "")
    self.minimize = config.checkpoint.get("best_mode", "max") == "min"
    if config.checkpoint.get("best_mode", "max") not in ("max", "min"):
      raise ValueError(f"checkpoint.best_mode must be max or min, got {config.checkpoint.best_mode!r}")
    if self.patience < 0:
      raise ValueError(f"early_stopping.patience must be >= 0, got {self.patience}")
    if (self.patience or es.get("export_best")) and not self.metric:
      raise ValueError("early_stopping needs checkpoint.best_metric: the eval metric it watches (e.g. "
                       "--config.checkpoint.best_metric=eval/valid/ndcg@10)")
    if self.metric and not self.metric.startswith("eval/"):
      raise ValueError(f"checkpoint.best_metric {self.metric!r} must name an eval metric: 'eval/<name>'")
    self.export_best = bool(es.get("export_best", False))
    self.best, self.best_step, self.best_row, self.stale, self.stopped = None, None, {}, 0, False
    self.improved = False  # the last update set a new best
    if self.metric and start and workdir is not None:
      for row in metrics_lib.read_metrics(workdir):
        if int(row.get("step", 0)) <= start and self.metric in row:
          self.stopped = self.update(int(row["step"]), {k: v for k, v in row.items() if k.startswith("eval/")})

  def update(self, step: int, evals: dict[str, float]) -> bool:
    """Records one evaluation; True = stop now."""
    if not self.metric or self.metric not in evals:
      return False
    value = float(evals[self.metric])
    self.improved = self.best is None or (value <= self.best if self.minimize else value >= self.best)
    if self.improved:
      self.best, self.best_step, self.best_row, self.stale = value, step, dict(evals), 0
    else:
      self.stale += 1
    return bool(self.patience) and self.stale > self.patience

  def describe(self) -> str:
    return (f"{self.metric} has not improved for {self.stale} evaluations (patience {self.patience}); best "
            f"{self.best:.6g} at step {self.best_step}")


def resolve_eval_every(config, steps_per_epoch: int) -> int:
  """`eval_every` in steps (0 = only at the end, -1 = never); `eval_every_epochs` > 0 wins: every that many
  epochs (rounded to whole steps, at least 1), as RecBole's `eval_step` counts them."""
  epochs = float(config.get("eval_every_epochs", 0) or 0)
  if epochs < 0:
    raise ValueError(f"eval_every_epochs must be >= 0, got {epochs}")
  if epochs > 0:
    return max(1, round(epochs * steps_per_epoch))
  return int(config.eval_every)


def _checkpoint_manager(workdir, config) -> ocp.CheckpointManager:
  ck = config.checkpoint
  policies = [cm.LatestN(n=int(ck.keep))]
  if ck.get("best_metric"):
    name, reverse = ck.best_metric, ck.get("best_mode", "max") == "min"
    policies.append(cm.BestN(get_metric_fn=lambda m: m[name], reverse=reverse, n=1,
                             keep_checkpoints_without_metrics=False))
  return ocp.CheckpointManager(
      storage.display(workdir / "checkpoints"),  # absolute path or gs:// URL
      options=ocp.CheckpointManagerOptions(
          preservation_policy=cm.AnyPreservationPolicy(policies),
          enable_async_checkpointing=async_saving(ck), create=True))


def async_saving(ck) -> bool:
  """`checkpoint.async_save` (saves run in the background). The former name `checkpoint.async` (a Python keyword,
  which `--config.checkpoint.async=...` cannot parse) still wins when a config sets it in Python."""
  if "async" in ck:
    return bool(ck["async"])
  return bool(ck.get("async_save", True))


def _console(message: str) -> None:
  """A line on stderr that does not break the progress bar."""
  tqdm.write(message, file=sys.stderr)


@contextlib.contextmanager
def _quiet_restore():
  """Silences what a failed Orbax restore prints besides its exception (which we report in one
  line): absl / asyncio log records, and the "exception ignored" / "never retrieved" reports of
  the reads still pending when the first one failed (collected here, while silenced)."""
  loggers = [logging.getLogger(n) for n in ("absl", "asyncio")]
  levels = [lg.level for lg in loggers]
  hook = sys.unraisablehook
  for lg in loggers:
    lg.setLevel(logging.CRITICAL)
  sys.unraisablehook = lambda unraisable: None
  try:
    yield
  except BaseException:
    gc.collect()
    sys.unraisablehook = _late_restore_noise_filter(hook)  # a pending read may still report later
    asyncio_logger = logging.getLogger("asyncio")  # ... or as "Task exception was never retrieved"
    if not any(isinstance(f, _LateRestoreLogFilter) for f in asyncio_logger.filters):
      asyncio_logger.addFilter(_LateRestoreLogFilter())
    raise
  finally:
    if sys.unraisablehook is not _late_restore_noise_filter.installed:
      sys.unraisablehook = hook
    for lg, level in zip(loggers, levels):
      lg.setLevel(level)


def _late_restore_noise_filter(previous):
  """An unraisable-exception hook that drops what the reads of an abandoned Orbax restore report
  after it failed ("Event loop is closed", "exception ignored in _read_array_index...") and passes
  anything else on to `previous`."""
  def hook(unraisable):
    text = f"{unraisable.exc_value!r} {unraisable.object!r}"
    if "Event loop is closed" in text or "_read_array_index" in text or "async_deserialize" in text:
      return
    previous(unraisable)
  _late_restore_noise_filter.installed = hook
  return hook


_late_restore_noise_filter.installed = None


class _LateRestoreLogFilter(logging.Filter):
  """Drops the asyncio log records ("Task exception was never retrieved") of array reads that an abandoned Orbax
  restore left pending and that fail after the restore was already reported: their text is a TensorStore error
  with its whole spec dump. Installed after the first failed restore; other asyncio records pass."""

  def filter(self, record: logging.LogRecord) -> bool:
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
      text += f" {record.exc_info[1]!r}"
    return not any(k in text for k in ("TensorStore", "tensorstore", "_read_array_index", "async_deserialize"))


def _keystr(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _layout(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """{path: (shape, dtype)} of a tree of arrays / abstract arrays / Orbax array metadata."""
  return {_keystr(p): (tuple(x.shape), str(np.dtype(x.dtype)))
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_layout(step_dir, abstract_state) -> None:
  """Raises CheckpointMismatchError if the checkpoint in `step_dir` holds other arrays than this
  config's train state (a checkpoint of another model or optimizer, not a damaged one). A checkpoint
  whose metadata cannot be read raises something else: the caller treats it as damaged."""
  tree = ocp.StandardCheckpointer().metadata(step_dir / "state").item_metadata
  if tree is None:  # Orbax's answer when the tree metadata does not read back: damage
    raise IOError("its array metadata cannot be read")
  saved = _layout(tree)
  want = _layout(abstract_state)
  if saved == want:
    return
  missing, extra = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
  shaped = sorted(k for k in set(want) & set(saved) if want[k] != saved[k])
  what = []
  if shaped:
    k = shaped[0]
    what.append(f"{len(shaped)} arrays differ in shape or dtype (e.g. {k}: saved {saved[k][0]} {saved[k][1]}, "
                f"this config {want[k][0]} {want[k][1]})")
  if missing:
    what.append(f"{len(missing)} arrays of this config are not in it (e.g. {missing[0]})")
  if extra:
    what.append(f"{len(extra)} saved arrays are not in this config (e.g. {extra[0]})")
  raise CheckpointMismatchError(
      f"the checkpoint in {storage.display(step_dir)} was written by a different model or optimizer "
      f"config: {'; '.join(what)}. Rerun with the config it was trained with (the workdir's "
      f"{CONFIG_FILE} records it) or use a new --workdir")


def _restore_newest(mngr, abstract_state, data_iter, ckpt_dir, is_main: bool):
  """Restores the newest checkpoint that reads back; (None, None) if none does.

  A damaged checkpoint (a truncated or missing array file, unreadable metadata) is reported in one
  line and moved aside to `checkpoints/corrupt-<step>` (never deleted), so that the run can write
  that step again; the next older one is tried. The data iterator is reset after a failed attempt,
  so a run left with no valid checkpoint starts exactly as in a fresh workdir. A checkpoint of
  another model or optimizer is not damage: that raises CheckpointMismatchError.
  """
  initial = data_iter.get_state()
  steps = sorted(mngr.all_steps(), reverse=True)
  for n, step in enumerate(steps):
    step_dir = storage.as_path(ckpt_dir) / str(step)
    try:
      with _quiet_restore():
        if step_dir.exists():
          _check_layout(step_dir, abstract_state)
        out = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iter)))
      return step, out.state
    except CheckpointMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # damaged / partial checkpoint
      data_iter.set_state(initial)
      reason = cli.describe(cli.root_cause(e))
      moved = None
      if is_main and step_dir.exists():
        moved = storage.move_aside(step_dir, f"corrupt-{step}")
      partitioning.sync_processes(f"mmret_move_aside_{step}")
      mngr.reload()
      then = f"trying step {steps[n + 1]}" if n + 1 < len(steps) else \
          "no valid checkpoint left: starting from scratch, as in a fresh workdir"
      where = f"moved to {storage.display(moved)}; " if moved is not None else ""
      if is_main:
        _console(f"warning: checkpoint at step {step} cannot be restored ({reason}); {where}{then}")
  return None, None


# Config keys whose change between a run and its resumption does not change the trained result:
# logging, checkpoint cadence, evaluation, input threads, kernel choices, the mesh layout.
RESULT_NEUTRAL_KEYS = ("log_every", "eval_every", "eval_every_epochs", "checkpoint_every", "checkpoint.*", "stop_at_step",
                       "on_nonfinite", "peak_flops_per_device", "init_rng_impl", "mesh.*",
                       "data.num_threads", "data.prefetch", "data.eval_*", "eval.*",
                       "model.attention", "model.norm", "model.remat")
CONFIG_FILE = "config.json"


def _flat_config(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat_config(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_json(config) -> str:
  """The resolved config as JSON (tuples as lists; non-JSON values as strings)."""
  return json.dumps(config.to_dict(), indent=1, sort_keys=True, default=str) + "\n"


def changed_result_keys(old: dict, new: dict) -> list[str]:
  """`key (old -> new)` for every result-altering key that differs between two config dicts."""
  a, b = _flat_config(old), _flat_config(new)
  out = []
  for key in sorted(set(a) | set(b)):
    if a.get(key, "<unset>") == b.get(key, "<unset>"):
      continue
    if key not in a and not b[key]:  # a key added since, at its off default (0, False, ""): nothing changed
      continue
    if any(fnmatch.fnmatchcase(key, pat) for pat in RESULT_NEUTRAL_KEYS):
      continue
    out.append(f"{key} ({a.get(key, '<unset>')!r} -> {b.get(key, '<unset>')!r})")
  return out


def _record_config(workdir, config, resumed: bool) -> None:
  """Writes `workdir/config.json`; on a resumed run first warns about changed result-altering keys."""
  text = config_json(config)
  path = workdir / CONFIG_FILE
  if resumed and path.exists():
    try:
      old = json.loads(path.read_text())
    except ValueError:
      old = None
    changed = changed_result_keys(old, json.loads(text)) if isinstance(old, dict) else []
    if changed:
      _console(f"warning: resuming with settings that change the result (the checkpoint was trained "
               f"with the earlier ones): {', '.join(changed)}")
  path.write_text(text)


@dataclasses.dataclass
class _Setup:
  task: Any
  state: Any
  state_sh: Any
  tx: Any
  schedule: Any
  data_iter: Any
  mngr: Any
  writer: Any
  start: int
  total_steps: int
  eval_every: int


def train_and_evaluate(config, workdir: str | pathlib.Path) -> RunResult:
  """Trains `config.task` in `workdir` (a local dir or a gs:// URL; resuming if possible).

  Nothing is left behind when the config, the mesh or the data turn out invalid before training
  starts: a workdir this call created is removed again."""
  partitioning.maybe_initialize_distributed()
  workdir = storage.as_path(workdir)
  if not storage.is_remote(workdir):  # Orbax's metadata reads need absolute paths (a relative one reads nothing)
    workdir = workdir.absolute()
  is_main = jax.process_index() == 0
  mesh = partitioning.make_mesh(dict(config.mesh))  # before anything is written
  dp = partitioning.data_parallel_size(mesh)
  global_batch = int(config.batch_size)
  if global_batch % dp or global_batch % jax.process_count():
    raise ValueError(f"batch_size {global_batch} must divide by the data-parallel size {dp} "
                     f"and the process count {jax.process_count()}")
  accum = int(config.get("grad_accum_steps", 1))
  if global_batch % (accum * dp):
    raise ValueError(f"batch_size {global_batch} must divide by grad_accum_steps x data-parallel size")

  EarlyStopping(config)  # its settings are checked before anything is written
  created = is_main and not workdir.exists()
  setup = None
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.RULES):
      setup = _setup(config, workdir, mesh, global_batch, is_main)
  except BaseException:
    if created:
      storage.rmtree(workdir)
    raise
  task, mngr, writer = setup.task, setup.mngr, setup.writer
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.RULES):
    step_fn = jax.jit(make_train_step(task, setup.tx, accum, config.get("on_nonfinite", "stop"),
                                      int(config.get("grad_cache", {}).get("chunk_size", 0)), dp),
                      out_shardings=(setup.state_sh, partitioning.replicated(mesh)), donate_argnums=0)
    tracker = EarlyStopping(config, workdir, setup.start)
    state, last_eval, interrupted, stopped_early = _run(
        config, task, setup.state, step_fn, setup.data_iter, mngr, writer, setup.schedule, mesh, setup.start,
        setup.total_steps, global_batch, is_main, tracker, setup.eval_every)
    mngr.wait_until_finished()
    total_steps = setup.total_steps
    finished = stopped_early or int(jax.device_get(state.step)) == total_steps
    export_params = state.params
    if finished and (config.get("early_stopping") or {}).get("export_best") and tracker.best_step is not None:
      export_params = _restore_params(mngr, state, tracker.best_step)
      last_eval = tracker.best_row
      writer.console(f"best {tracker.metric} = {tracker.best:.6g} at step {tracker.best_step}: "
                     "its params are the exported model")
  mngr.close()
  writer.close()
  if finished and is_main:
    with storage.staged_dir(workdir / "model") as model_dir:  # uploaded when remote
      task.export(export_params, model_dir)
    usage = getattr(task, "usage", "").format(workdir=workdir)
    writer.console(f"inference model: {workdir / 'model'}" + (f" ({usage})" if usage else ""))
  return RunResult(eval=last_eval, state=state, total_steps=total_steps, interrupted=interrupted,
                   stopped_early=stopped_early, best_step=tracker.best_step)


def _restore_params(mngr, state, step: int):
  """The params of the checkpoint at `step` (kept by the BestN policy), sharded like `state`'s."""
  if step not in mngr.all_steps():
    raise RuntimeError(f"the best checkpoint (step {step}) is gone from {mngr.directory}; was checkpoint."
                       "best_metric changed during the run?")
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  return restored.state.params


def _setup(config, workdir, mesh, global_batch: int, is_main: bool) -> _Setup:
  """Task, optimizer, shardings, data iterator, checkpoint restore (or init) and the metric writer."""
  task = tasks.get(config.task)(config, mesh, workdir)
  task_epoch = task.steps_per_epoch(global_batch)
  total_steps = resolve_total_steps(config, task.num_train_examples, task_epoch)
  steps_per_epoch = task_epoch or max(1, math.ceil(task.num_train_examples / global_batch))
  eval_every = resolve_eval_every(config, steps_per_epoch)
  tx, schedule = optim.make_optimizer(config.optim, total_steps, task.freeze_patterns(), steps_per_epoch)
  init_rng, train_rng = init_and_train_keys(config)

  def boxed_state():
    return make_state(task, tx, task.init_params(init_rng), train_rng)

  abstract_boxed = jax.eval_shape(boxed_state)
  partitioning.params_logical_specs(abstract_boxed.params)  # every param must carry axis names
  state_sh = partitioning.logical_to_sharding(nn.get_partition_spec(abstract_boxed), mesh)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          _strip_boxes(abstract_boxed), state_sh)
  frozen, total_leaves = optim.count_frozen(config.optim, _strip_boxes(abstract_boxed.params),
                                            task.freeze_patterns())
  if (config.optim.get("freeze") or task.freeze_patterns()) and frozen == 0:
    raise ValueError(f"optim.freeze patterns {list(config.optim.freeze)} match no param")
  for group in tuple(config.optim.get("lr_groups", ()) or ()):
    if not optim.count_matches(group[0], _strip_boxes(abstract_boxed.params)):
      raise ValueError(f"optim.lr_groups pattern {group[0]!r} matches no param")

  data_iter = task.train_iterator(global_batch // jax.process_count())
  mngr = _checkpoint_manager(workdir, config)
  try:
    start, state = _restore_newest(mngr, abstract, data_iter, workdir / "checkpoints", is_main)
    if state is None:
      state = jax.jit(lambda: nn.unbox(boxed_state()), out_shardings=state_sh)()
      if config.get("init_from") or getattr(task, "load_init_always", False):
        host = task.load_init(jax.device_get(state.params))
        params = jax.device_put(host, state_sh.params)
        state = jax.jit(lambda p: make_state(task, tx, p, train_rng), out_shardings=state_sh)(params)
      start = 0
    if is_main:
      _record_config(workdir, config, resumed=start > 0)
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main, console=tqdm.write, start_step=start)
  except BaseException:
    mngr.close()
    raise
  if start:
    writer.console(f"resumed from {workdir / 'checkpoints'} at step {start}")
  if frozen:
    writer.console(f"frozen: {frozen} of {total_leaves} param arrays")
  return _Setup(task=task, state=state, state_sh=state_sh, tx=tx, schedule=schedule, data_iter=data_iter,
                mngr=mngr, writer=writer, start=start, total_steps=total_steps, eval_every=eval_every)


def _run(config, task, state, step_fn, data_iter, mngr, writer, schedule, mesh, start, total_steps,
         global_batch, is_main, tracker: EarlyStopping, eval_every: int):
  stop_at = int(config.get("stop_at_step", 0) or 0)
  end = min(total_steps, stop_at) if stop_at else total_steps
  log_every = int(config.log_every)
  stopped_early = keep_best = False
  if tracker.stopped:  # a rerun of a run that already ended by early stopping: nothing left to train
    writer.console(f"early stopping: this run already ended at step {start} ({tracker.describe()})")
    return state, dict(tracker.best_row), False, True
  ckpt_every = int(config.checkpoint_every)
  on_nonfinite = config.get("on_nonfinite", "stop")
  peak = metrics_lib.peak_flops_per_device(float(config.get("peak_flops_per_device", 0.0)))
  compiled, flops = {}, {}  # one program (and its FLOPs) per batch shape signature (e.g. length buckets)
  last_eval: dict[str, float] = {}
  pending = None  # previous step's (step, metrics, ids): checked one step late, no host stall
  skipped = 0
  t0, window_steps, window_flops = time.perf_counter(), 0, 0.0

  def check(p):
    nonlocal skipped
    s, m, ids = p
    if not bool(m["finite"]):
      where = f"step {s}" + (f", batch rows {list(map(int, ids))}" if ids is not None else "")
      if on_nonfinite == "skip":
        skipped += 1
        writer.console(f"warning: non-finite loss at {where}; update skipped ({skipped} so far)")
      else:
        raise NonFiniteLossError(f"non-finite loss ({float(m['loss'])}) at {where}; the last "
                                 f"checkpoint is intact. Set config.on_nonfinite='skip' to skip such steps.")

  def save(step, metrics=None):
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            data=grain.checkpoint.CheckpointSave(data_iter)),
              metrics=metrics, force=True)

  done = start
  memory_row: dict[str, float] = {}
  pbar = tqdm(total=end, initial=start, disable=not is_main, desc=config.task, unit="step", dynamic_ncols=True)
  with _Stopper() as stopper:
    for step in range(start, end):
      batch = next(data_iter)
      ids = batch.pop("index", None)
      gbatch = partitioning.make_global_batch(batch, mesh)
      shapes = tuple((k, v.shape) for k, v in sorted(gbatch.items()))
      if shapes not in compiled:
        compiled[shapes] = step_fn.lower(state, gbatch).compile()
        flops[shapes] = metrics_lib.compiled_flops(compiled[shapes])
        mem = metrics_lib.compiled_memory(compiled[shapes])
        if mem and is_main:  # into the next logged row, and once to the console
          memory_row.update(mem)
          writer.console("compiled step, per device: " + ", ".join(
              f"{k.split('/')[1]} {v / 2**20:,.1f} MiB" for k, v in mem.items()))
      state, m = compiled[shapes](state, gbatch)
      window_flops = window_flops + flops[shapes] if flops[shapes] and window_flops is not None else None
      if pending is not None:
        check(pending)
      pending = (step + 1, m, ids)
      done = step + 1
      window_steps += 1
      pbar.update(1)
      if done % log_every == 0 or done == end:
        m = jax.device_get(m)
        check(pending)
        dt = time.perf_counter() - t0
        row = {k: float(v) for k, v in m.items() if k != "finite"}
        row["lr"] = float(schedule(done - 1))
        row["samples_per_s"] = window_steps * global_batch / dt
        if "tokens" in row:
          row["tokens_per_s"] = window_steps * row.pop("tokens") / dt
        if window_flops and peak:
          row["mfu"] = window_flops / dt / peak
        row.update(memory_row)
        memory_row.clear()
        writer.write(done, row)
        t0, window_steps, window_flops = time.perf_counter(), 0, 0.0
      eval_now = (eval_every > 0 and done % eval_every == 0) or (done == total_steps and eval_every >= 0)
      if eval_now:
        last_eval = {f"eval/{k}": float(v) for k, v in task.evaluate(state.params).items()}
        if last_eval:
          writer.write(done, last_eval)
        stopped_early = tracker.update(done, last_eval) and done < total_steps
        keep_best = tracker.export_best and tracker.improved  # the exported model must be on disk
        if stopped_early:
          writer.console(f"early stopping at step {done}: {tracker.describe()}")
        t0 = time.perf_counter()
      if done % ckpt_every == 0 or done == end or stopper.requested or stopped_early or keep_best:
        check(pending)
        best = config.checkpoint.get("best_metric")
        save(done, last_eval if (best and eval_now and best in last_eval) else None)
        keep_best = False
      if stopped_early:
        break
      if stopper.requested:
        writer.console(f"stop requested: saved step {done}; rerun the same command to resume "
                       f"(exit status {cli.EXIT_INTERRUPTED})")
        break
    interrupted = stopper.requested and done < total_steps and not stopped_early
  pbar.close()
  if pending is not None:
    check(pending)
  return state, last_eval, interrupted, stopped_early
