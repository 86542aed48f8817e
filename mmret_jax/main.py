r"""Train and evaluate any task: `python -m mmret_jax.main --config=configs/NAME.py[:ARG] --workdir=DIR`.

Override any config key with `--config.KEY=VALUE` (e.g. `--config.total_steps=1000`); a key the
config does not have is an error naming the closest ones. `--print_config` prints the resolved
config and exits; `--help --config=FILE` lists its keys. Rerunning the same command resumes from
the newest valid checkpoint in `--workdir`; the resolved config of every run is kept there as
`config.json`.

Exit status: 0 = finished (or stopped at `stop_at_step`); 75 = stopped by SIGTERM / SIGINT after
saving a checkpoint (rerun the same command to resume; `launch/slurm_gpu.sh` requeues on it);
1 = error (one `error:` line; MMRET_DEBUG=1 shows the traceback); 2 = bad command line.
"""

from __future__ import annotations

import os
import pathlib
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from mmret_jax import xla_cpu  # pylint: disable=wrong-import-position

xla_cpu.apply_cpu_defaults()  # before any JAX backend starts (mmret_jax/xla_cpu.py)

from absl import app, flags, logging  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

from mmret_jax import cli  # pylint: disable=wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (file.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the final model go "
                               "(default: runs/<task>).")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Print the resolved config (after --config.KEY "
                                  "overrides) and exit.")

REQUIRED_KEYS = ("task", "seed", "total_steps", "batch_size", "log_every", "eval_every",
                 "checkpoint_every", "mesh", "init_from")
HELP_FLAGS = ("-h", "--help", "-?", "--helpshort", "--helpfull")
DEFAULT_CONFIG = "configs/blair_base.py"


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


# ------------------------------------------------------------------------------------ command line
def _flag_value(argv, name: str) -> str | None:
  """The value of `--name=V` / `--name V` in argv (the last one wins), else None."""
  value = None
  for i, a in enumerate(argv):
    if a.startswith(f"--{name}="):
      value = a.split("=", 1)[1]
    elif a == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def config_keys(config, prefix: str = "") -> list[str]:
  """Every dotted key of a ConfigDict (inner dicts and their leaves)."""
  out = []
  for k in config.keys():
    out.append(prefix + k)
    v = config[k]
    if hasattr(v, "keys") and hasattr(v, "lock"):
      out.extend(config_keys(v, f"{prefix}{k}."))
  return out


def load_config(spec: str):
  """Loads `file.py[:arg]` as `--config` does (`get_config(arg)`, overrides not applied); errors
  are one line."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    here = sorted(str(p) for p in pathlib.Path("configs").glob("*.py") if p.name != "common.py")
    raise FileNotFoundError(f"config file not found: {path}" +
                            (f" (configs here: {', '.join(here)})" if here else ""))
  try:
    mod_spec = importlib.util.spec_from_file_location(f"mmret_config_{pathlib.Path(path).stem}", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # pylint: disable=broad-except  # the config module's own error
    raise ValueError(f"cannot load config {spec}: {cli.describe(e)}") from e


def check_overrides(config, argv) -> None:
  """Every `--config.KEY` must name a key of `config`; the error names the closest ones."""
  keys = config_keys(config)
  for a in argv[1:]:
    if not a.startswith("--config."):
      continue
    key = a[len("--config."):].split("=", 1)[0]
    if key not in keys:
      raise ValueError(f"unknown config key {key!r} (in {a}){cli.suggest(key, keys)} "
                       "(`--print_config` lists the keys)")


def print_help(argv) -> None:
  """Usage, the flags, and the keys of the config given with --config (or the default config)."""
  print(__doc__.strip())
  print("\nflags:")
  for f in (_CONFIG, _WORKDIR, _PRINT_CONFIG):
    print(f"  --{f.name}: {flags.FLAGS[f.name].help}")
  spec = _flag_value(argv, "config") or (DEFAULT_CONFIG if os.path.isfile(DEFAULT_CONFIG) else None)
  if spec is None:
    print("\nPass --config=FILE with --help to list that config's keys.")
    return
  config = load_config(spec)
  print(f"\nconfig keys of {spec} (override with --config.KEY=VALUE; value shown is the default):")
  for key in config_keys(config):
    node = config
    for part in key.split("."):
      node = node[part]
    if not (hasattr(node, "keys") and hasattr(node, "lock")):
      print(f"  {key} = {node!r}")


def parse_flags(argv):
  """absl flag parsing with one-line errors, our --help, and config-key checks before parsing."""
  try:
    if any(a in HELP_FLAGS for a in argv[1:]):
      print_help(argv)
      sys.exit(0)
    spec = _flag_value(argv, "config")
    if spec:
      check_overrides(load_config(spec), argv)
    return flags.FLAGS(argv)
  except flags.Error as e:
    if cli.debug():
      raise
    sys.exit(cli.error(f"{cli.describe(e)} (see --help)", cli.EXIT_USAGE))
  except SystemExit:
    raise
  except Exception as e:  # pylint: disable=broad-except
    if cli.debug():
      raise
    sys.exit(cli.error(cli.describe(e), cli.EXIT_USAGE))


# ------------------------------------------------------------------------------------ main
def _set_path(config, dotted: str, value) -> None:
  *parents, leaf = dotted.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value


def chained_runs(config, workdir: str) -> list[tuple[object, str]]:
  """[(config, workdir)] to run in order. A config with `then` (e.g. the CIR `:smoke`: stage I, then
  stage II) runs itself in `<workdir>/<then.first>` and then a copy with `then.overrides` applied in
  `<workdir>/<then.name>`, initialised from the previous workdir when `then.init_from_previous`."""
  import copy  # pylint: disable=import-outside-toplevel
  then = config.get("then")
  if not then:
    return [(config, workdir)]
  first = os.path.join(workdir, str(then.get("first", "stage1")))
  nxt = copy.deepcopy(config)
  with nxt.unlocked():
    nxt.then = None
    for key, value in then.overrides:
      _set_path(nxt, key, value)
    if then.get("init_from_previous"):
      nxt.init_from, nxt.tokenizer = first, ""
  with config.unlocked():
    config.then = None
  return [(config, first)] + chained_runs(nxt, os.path.join(workdir, str(then.name)))


def train(config, workdir: str) -> int:
  runs = chained_runs(config, workdir)
  for i, (cfg, wd) in enumerate(runs):
    if len(runs) > 1:
      print(f"== run {i + 1} of {len(runs)}: {wd}", file=sys.stderr)
    rc = _train_one(cfg, wd)
    if rc:
      return rc
  return 0


def _train_one(config, workdir: str) -> int:
  from mmret_jax import storage  # pylint: disable=import-outside-toplevel
  from mmret_jax.train import loop  # pylint: disable=import-outside-toplevel
  validate(config)
  result = loop.train_and_evaluate(config, workdir)
  ev = result.eval
  if ev:
    print("final eval: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(ev.items())))
    if "eval/recall@10" in ev and ev.get("eval/num_items"):
      print(f"held-out Recall@10 = {ev['eval/recall@10']:.4f} (chance {min(1.0, 10 / ev['eval/num_items']):.4f} "
            f"over {int(ev['eval/num_items'])} items), NDCG@10 = {ev.get('eval/ndcg@10', float('nan')):.4f}")
  if "eval/average_recall" in ev or "eval/recall_mean" in ev:
    from mmret_jax.eval import cir as cir_eval  # pylint: disable=import-outside-toplevel
    print(cir_eval.format_table({k[len("eval/"):]: v for k, v in ev.items() if k.startswith("eval/")}))
  print(f"workdir: {storage.display(workdir)}")
  if result.interrupted:
    print(f"interrupted at step {int(result.state.step)} of {result.total_steps} (checkpoint saved); "
          f"rerun the same command to resume", file=sys.stderr)
    return cli.EXIT_INTERRUPTED
  return 0


def main(argv):
  if len(argv) > 1:
    return cli.error(f"unexpected arguments {argv[1:]} (flags are --config, --workdir, --print_config, "
                     "--config.KEY=VALUE)", cli.EXIT_USAGE)
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  config = _CONFIG.value
  if config is None:
    return cli.error(f"--config is required, e.g. --config={DEFAULT_CONFIG}:smoke", cli.EXIT_USAGE)
  if _PRINT_CONFIG.value:
    print(config)
    return 0
  workdir = _WORKDIR.value or os.path.join("runs", config.task)
  from mmret_jax.train import loop  # pylint: disable=import-outside-toplevel
  return cli.run(lambda: train(config, workdir), user_errors=(loop.NonFiniteLossError,))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
