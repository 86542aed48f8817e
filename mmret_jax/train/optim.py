"""optax optimizer from config: AdamW, warmup + linear/cosine/constant decay, no weight decay on
norms and biases, global-norm clipping, freezing by param-path regex.

Config (`config.optim`):
  learning_rate, warmup_steps | warmup_fraction, schedule (linear|cosine|constant), end_lr_factor,
  b1, b2, eps, weight_decay, no_decay (regexes), grad_clip_norm (0 = off), freeze (regexes).
Paths are '/'-joined param paths, e.g. `encoder/encoder/layer_0/attention/self/query/kernel`.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
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


def make_schedule(cfg, total_steps: int) -> optax.Schedule:
  lr = float(cfg.learning_rate)
  warmup = int(cfg.get("warmup_steps", 0) or round(float(cfg.get("warmup_fraction", 0.0)) * total_steps))
  warmup = min(warmup, total_steps)
  decay_steps = max(total_steps - warmup, 1)
  end = lr * float(cfg.get("end_lr_factor", 0.0))
  kind = cfg.get("schedule", "linear")
  if kind == "linear":
    decay = optax.linear_schedule(lr, end, decay_steps)
  elif kind == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
  elif kind == "constant":
    decay = optax.constant_schedule(lr)
  else:
    raise ValueError(f"optim.schedule must be linear|cosine|constant, got {kind!r}")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def make_optimizer(cfg, total_steps: int, extra_freeze: Sequence[str] = ()
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (tx, schedule). Frozen params (`cfg.freeze` + `extra_freeze` regexes) get zero
  updates, so they stay bitwise unchanged."""
  schedule = make_schedule(cfg, total_steps)
  no_decay = matches(tuple(cfg.get("no_decay", NO_DECAY_DEFAULT)))
  decay_mask = lambda params: _map_paths(lambda p: not no_decay(p), params)
  parts = []
  if float(cfg.get("grad_clip_norm", 0.0)) > 0:
    parts.append(optax.clip_by_global_norm(float(cfg.grad_clip_norm)))
  parts.append(optax.adamw(schedule, b1=float(cfg.get("b1", 0.9)), b2=float(cfg.get("b2", 0.999)),
                           eps=float(cfg.get("eps", 1e-8)), weight_decay=float(cfg.get("weight_decay", 0.0)),
                           mask=decay_mask))
  tx = optax.chain(*parts)
  freeze = tuple(cfg.get("freeze", ())) + tuple(extra_freeze)
  if freeze:
    frozen = matches(freeze)
    labels = lambda params: _map_paths(lambda p: "frozen" if frozen(p) else "train", params)
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule


def count_frozen(cfg, params: Any, extra_freeze: Sequence[str] = ()) -> tuple[int, int]:
  """(number of frozen leaves, total leaves): a freeze pattern matching nothing is likely a typo."""
  freeze = tuple(cfg.get("freeze", ())) + tuple(extra_freeze)
  flags = jax.tree.leaves(_map_paths(matches(freeze), params)) if freeze else []
  return sum(flags), len(jax.tree.leaves(params))
