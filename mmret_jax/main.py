r"""Train and evaluate any task: `python -m mmret_jax.main --config=configs/NAME.py[:ARG] --workdir=DIR`.

Override any config key with `--config.key=value` (unknown keys fail: the config is locked).
Rerunning the same command resumes from the newest checkpoint in `--workdir`.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from mmret_jax import xla_cpu  # pylint: disable=wrong-import-position

xla_cpu.apply_cpu_defaults()  # before any JAX backend starts (mmret_jax/xla_cpu.py)

from absl import app, flags, logging  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (file.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the final model go.")

REQUIRED_KEYS = ("task", "seed", "total_steps", "batch_size", "log_every", "eval_every",
                 "checkpoint_every", "mesh", "init_from")


def validate(config) -> None:
  """Fail fast with a clear message on bad values (unknown keys are caught by the locked config)."""
  from mmret_jax import tasks  # pylint: disable=import-outside-toplevel
  missing = [k for k in REQUIRED_KEYS if k not in config]
  if missing:
    raise ValueError(f"config lacks required keys: {missing}")
  tasks.get(config.task)  # unknown task -> error listing the known ones
  for key in ("batch_size", "log_every", "checkpoint_every"):
    if int(config[key]) <= 0:
      raise ValueError(f"config.{key} must be > 0, got {config[key]}")
  if int(config.eval_every) < -1 or int(config.total_steps) < 0:
    raise ValueError("config.eval_every must be >= -1 (0: at the end only, -1: never) and "
                     "config.total_steps >= 0")
  if config.get("on_nonfinite", "stop") not in ("stop", "skip"):
    raise ValueError(f"config.on_nonfinite must be stop|skip, got {config.on_nonfinite!r}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/blair_base.py:smoke")
  workdir = _WORKDIR.value or os.path.join("runs", config.task)
  from mmret_jax.train import loop  # pylint: disable=import-outside-toplevel
  try:
    validate(config)
    result = loop.train_and_evaluate(config, workdir)
  except (ValueError, FileNotFoundError, loop.NonFiniteLossError) as e:
    if os.environ.get("MMRET_DEBUG"):
      raise
    print(f"error: {e}  (set MMRET_DEBUG=1 for the traceback)", file=sys.stderr)
    sys.exit(1)
  ev = result.eval
  if ev:
    print("final eval: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(ev.items())))
    if "eval/recall@10" in ev and ev.get("eval/num_items"):
      print(f"held-out Recall@10 = {ev['eval/recall@10']:.4f} (chance {min(1.0, 10 / ev['eval/num_items']):.4f} "
            f"over {int(ev['eval/num_items'])} items), NDCG@10 = {ev.get('eval/ndcg@10', float('nan')):.4f}")
  from mmret_jax import storage  # pylint: disable=import-outside-toplevel
  print(f"workdir: {storage.display(workdir)}")


if __name__ == "__main__":
  app.run(main)
