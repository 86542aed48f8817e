"""optax optimizer from config: AdamW, warmup + linear/cosine/constant decay, no weight decay on
norms and biases, global-norm clipping, freezing by param-path regex.

Config (`config.optim`):
  learning_rate, warmup_steps | warmup_fraction, schedule (linear|cosine|constant|epoch_cosine),
  end_lr_factor, b1, b2, eps, weight_decay, no_decay (regexes), no_decay_below_ndim (no decay for
  params of fewer dims, e.g. 2 as CLIP's trainers), grad_clip_norm (0 = off), freeze (regexes);
  epoch_cosine: cosine_epochs, cosine_clamp (BLIP's per-epoch `cosine_lr_schedule`);
  lr_groups: ((regex, lr multiplier, schedule), ...): params matching a regex get their own AdamW
  with learning_rate x multiplier on `schedule` ("" = the main schedule, or any kind above),
  e.g. Bi-BLIP4CIR's `text_proj` at 100x, constant.
Paths are '/'-joined param paths, e.g. `encoder/encoder/layer_0/attention/self/query/kernel`.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

NO_DECAY_DEFAULT = (r".*/bias$", r".*(LayerNorm|layer_norm|layernorm|norm[^/]*)/scale$")


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _map_paths(fn: Callable[[str], Any], params: Any) -> Any:
  """Maps a function of the param path over a (possibly boxed) param tree; boxes are leaves."""
  return jax.tree_util.tree_map_with_path(lambda p, _: fn(path_str(p)), params,
                                          is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def matches(patterns: Sequence[str]) -> Callable[[str], bool]:
  """Predicate: does any regex match (re.search) the '/'-joined path."""
  compiled = [re.compile(p) for p in patterns]
  return lambda path: any(c.search(path) for c in compiled)


SCHEDULES = ("linear", "cosine", "constant", "epoch_cosine")


def epoch_cosine_schedule(lr: float, end: float, steps_per_epoch: int, cosine_epochs: int,
                          clamp: bool = False) -> optax.Schedule:
  """BLIP's `cosine_lr_schedule`, called once per epoch: lr(e) = end + (lr - end) * (1 + cos(pi e /
  cosine_epochs)) / 2, e = the epoch of the step. Unclamped (as Bi-BLIP4CIR runs it) the lr rises
  again after `cosine_epochs`; `clamp` holds it at `end`."""
  if steps_per_epoch < 1 or cosine_epochs < 1:
    raise ValueError(f"epoch_cosine needs steps_per_epoch >= 1 and cosine_epochs >= 1, got "
                     f"{steps_per_epoch}, {cosine_epochs}")

  def schedule(step):
    epoch = jnp.floor_divide(jnp.asarray(step, jnp.int32), steps_per_epoch).astype(jnp.float32)
    if clamp:
      epoch = jnp.minimum(epoch, float(cosine_epochs))
    return end + (lr - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / cosine_epochs))
  return schedule


def make_schedule(cfg, total_steps: int, steps_per_epoch: int | None = None, kind: str | None = None,
                  scale: float = 1.0) -> optax.Schedule:
  lr = float(cfg.learning_rate) * scale
  warmup = int(cfg.get("warmup_steps", 0) or round(float(cfg.get("warmup_fraction", 0.0)) * total_steps))
  warmup = min(warmup, total_steps)
  decay_steps = max(total_steps - warmup, 1)
  end = lr * float(cfg.get("end_lr_factor", 0.0))
  kind = kind or cfg.get("schedule", "linear")
  if kind == "epoch_cosine":
    if warmup:
      raise ValueError("optim.schedule=epoch_cosine has no warmup; set warmup_steps=0")
    return epoch_cosine_schedule(lr, end, steps_per_epoch or 0, int(cfg.get("cosine_epochs", 10)),
                                 bool(cfg.get("cosine_clamp", False)))
  if kind == "linear":
    decay = optax.linear_schedule(lr, end, decay_steps)
  elif kind == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
  elif kind == "constant":
    decay = optax.constant_schedule(lr)
  else:
    raise ValueError(f"optim.schedule must be one of {'|'.join(SCHEDULES)}, got {kind!r}")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def make_optimizer(cfg, total_steps: int, extra_freeze: Sequence[str] = (), steps_per_epoch: int | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (tx, schedule of the main group). Frozen params (`cfg.freeze` + `extra_freeze` regexes)
  get zero updates, so they stay bitwise unchanged."""
  schedule = make_schedule(cfg, total_steps, steps_per_epoch)
  no_decay = matches(tuple(cfg.get("no_decay", NO_DECAY_DEFAULT)))
  below = int(cfg.get("no_decay_below_ndim", 0) or 0)  # CLIP's rule: no decay for params with ndim < 2
  ndim = lambda x: getattr(getattr(x, "value", x), "ndim", 0)
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(
      lambda p, x: not no_decay(path_str(p)) and ndim(x) >= below, params,
      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  adamw = lambda sched: optax.adamw(sched, b1=float(cfg.get("b1", 0.9)), b2=float(cfg.get("b2", 0.999)),
                                    eps=float(cfg.get("eps", 1e-8)),
                                    weight_decay=float(cfg.get("weight_decay", 0.0)), mask=decay_mask)
  parts = []
  if float(cfg.get("grad_clip_norm", 0.0)) > 0:
    parts.append(optax.clip_by_global_norm(float(cfg.grad_clip_norm)))
  groups = tuple(cfg.get("lr_groups", ()) or ())
  if groups:  # one AdamW per group (the same per-parameter math; its own learning rate)
    inner = {"main": adamw(schedule)}
    for i, group in enumerate(groups):
      if len(group) != 3:
        raise ValueError(f"optim.lr_groups entries are (regex, lr multiplier, schedule), got {group!r}")
      _, mult, kind = group
      inner[f"group{i}"] = adamw(make_schedule(cfg, total_steps, steps_per_epoch, kind or None, float(mult)))
    pats = [matches((g[0],)) for g in groups]
    group_of = lambda p: next((f"group{i}" for i, m in enumerate(pats) if m(p)), "main")
    parts.append(optax.multi_transform(inner, lambda params: _map_paths(group_of, params)))
  else:
    parts.append(adamw(schedule))
  tx = optax.chain(*parts)
  freeze = tuple(cfg.get("freeze", ())) + tuple(extra_freeze)
  if freeze:
    frozen = matches(freeze)
    labels = lambda params: _map_paths(lambda p: "frozen" if frozen(p) else "train", params)
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule


def count_matches(pattern: str, params: Any) -> int:
  """How many param leaves a regex matches."""
  return sum(jax.tree.leaves(_map_paths(matches((pattern,)), params)))


def count_frozen(cfg, params: Any, extra_freeze: Sequence[str] = ()) -> tuple[int, int]:
  """(number of frozen leaves, total leaves): a freeze pattern matching nothing is likely a typo."""
  freeze = tuple(cfg.get("freeze", ())) + tuple(extra_freeze)
  flags = jax.tree.leaves(_map_paths(matches(freeze), params)) if freeze else []
  return sum(flags), len(jax.tree.leaves(params))
