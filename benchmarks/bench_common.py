"""What every benchmark script prints about the machine, and the model sizes they share.

Imported by the scripts in this folder (`python benchmarks/NAME.py` puts the folder on sys.path).
"""

from __future__ import annotations

import os
import pathlib
import platform
import time

# transformers.RobertaConfig values of roberta-base, and a seconds-long smoke size of the same family.
ROBERTA_SIZES = {
    "base": dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
                 pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5),
    "tiny": dict(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=512, max_position_embeddings=514, type_vocab_size=1,
                 pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5),
}


def cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def usable_cpus() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def load_average() -> str:
  return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_info(torch, *, start_jax: bool = True, **extra) -> dict:
  """Host, versions and thread counts. `start_jax=False` leaves the JAX backend alone (a driver
  process must not take a GPU's memory from its workers); `extra` entries are appended."""
  import flax  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  info = {
      "platform": platform.platform(),
      "machine": platform.machine(),
      "cpu": cpu_model(),
      "cpu_count": os.cpu_count(),
      "usable_cpus": usable_cpus(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jaxlib": __import__("jaxlib").__version__,
      "flax": flax.__version__,
      "optax": optax.__version__,
      "torch": torch.__version__,
      "transformers": transformers.__version__,
      "torch_num_threads": torch.get_num_threads(),
      "torch_num_interop_threads": torch.get_num_interop_threads(),
  }
  if start_jax:
    info["jax_backend"] = jax.default_backend()
    info["jax_devices"] = ", ".join(str(d) for d in jax.devices())
  info.update(extra)
  info.setdefault("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
  info["load_average_at_start"] = load_average()
  return info


def rss_gb() -> str:
  """Current / peak resident memory of this process (Linux)."""
  try:
    st = dict(l.split(":", 1) for l in pathlib.Path("/proc/self/status").read_text().splitlines() if ":" in l)
    kb = lambda k: int(st[k].split()[0])
    return f"rss {kb('VmRSS') / 2**20:.1f} GB (peak {kb('VmHWM') / 2**20:.1f} GB)"
  except (OSError, KeyError, ValueError):
    return "rss n/a"


def add_xla_flags_arg(ap) -> None:
  ap.add_argument("--xla-flags", default="",
                  help="extra XLA_FLAGS for the JAX side (default: none, i.e. XLA's defaults)")


def apply_xla_flags(extra: str) -> None:
  """Appends `extra` to XLA_FLAGS; call before JAX starts a backend."""
  if extra:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + extra).strip()


def print_machine(info: dict) -> None:
  print("== machine")
  for k, v in info.items():
    print(f"  {k}: {v}")


def run_rounds(run_worker, args, src) -> dict[str, dict]:
  """`args.rounds` rounds of worker subprocesses (JAX per `args.xla_cpu`: default | tuned | both, then PyTorch
  unless `args.skip_torch`), `run_worker(side, args, src, tuned) -> {name: result}`; per name the results of
  the first round with every round's `wall` / `cpu` step times appended and, for JAX, `compile_all`."""
  res: dict[str, dict] = {}
  for r in range(args.rounds):
    print(f"== round {r + 1}/{args.rounds}", flush=True)
    workers = {"default": [("jax", False)], "tuned": [("jax", True)],
               "both": [("jax", False), ("jax", True)]}[args.xla_cpu]
    for side, tuned in workers + ([] if args.skip_torch else [("torch", False)]):
      for name, v in run_worker(side, args, src, tuned).items():
        if name not in res:
          res[name] = {**v, "wall": [], "cpu": []}
        res[name]["wall"] += v["wall"]
        res[name]["cpu"] += v["cpu"]
        if name.startswith("jax"):
          res[name].setdefault("compile_all", []).append(v["compile_s"])
  return res


def timed_steps(fn, warmup: int, steps: int, label: str) -> dict:
  """`warmup` untimed calls of fn, then `steps` timed ones: {"wall": [s], "cpu": [process s]}, each printed."""
  for _ in range(warmup):
    fn()
  wall, cpu = [], []
  for i in range(steps):
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    wall.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
    print(f"  {label} step {i + 1}: {wall[-1]:.2f}s (cpu {cpu[-1]:.1f}s)  [load {os.getloadavg()[0]:.2f}]",
          flush=True)
  return {"wall": wall, "cpu": cpu}


class CompiledStep:
  """A train step `step_fn` (jitted, state donated) compiled ahead of time for (state, batch) on `mesh`; each call
  runs one step on that batch, advances the held state and returns the step's metrics once they are ready.
  `compile_s`: seconds of lower + compile; `compiled`: the executable (HLO text, cost and memory analyses)."""

  def __init__(self, step_fn, state, batch, mesh):
    import jax  # pylint: disable=import-outside-toplevel
    self._jax, self.state, self.batch = jax, state, batch
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
      self.compiled = step_fn.lower(state, batch).compile()
    self.compile_s = time.perf_counter() - t0

  def __call__(self):
    self.state, m = self.compiled(self.state, self.batch)
    self._jax.block_until_ready((self.state, m))
    return m

  def analysis(self) -> tuple[float | None, float]:
    """(XLA's cost-analysis FLOPs of one step or None, its temp buffers in GiB or NaN where the backend does not
    report them), printed after the compile time."""
    from mmret_jax.train import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
    flops = metrics_lib.compiled_flops(self.compiled)
    try:
      temp = self.compiled.memory_analysis().temp_size_in_bytes / 2**30
    except Exception:  # pylint: disable=broad-except  # not every backend reports it
      temp = float("nan")
    print(f"  [jax] compile {self.compile_s:.1f}s; XLA cost analysis "
          f"{flops / 1e12 if flops else float('nan'):.3f} TFLOP/step; XLA temp buffers {temp:.2f} GB", flush=True)
    return flops, temp


def spawn_worker(script: str, side: str, result_dir, worker_args: list[str], env: dict, tuned: bool = False) -> dict:
  """Runs `python script --side SIDE --result FILE *worker_args` in a fresh process (its own JAX / torch start-up
  and flags) and returns the JSON it wrote; with `tuned`, its "jax" entry is returned as "jax_tuned"."""
  import json  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  import tempfile  # pylint: disable=import-outside-toplevel
  with tempfile.NamedTemporaryFile("r", suffix=".json", dir=result_dir) as res:
    rc = subprocess.call([sys.executable, script, "--side", side, "--result", res.name, *worker_args], env=env)
    if rc:
      raise SystemExit(f"{side} worker failed with exit status {rc}")
    out = json.load(res)
  return {"jax_tuned": out["jax"]} if tuned else out
