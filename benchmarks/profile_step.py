"""Where the BLaIR train step's time goes: a per-XLA-op device-time breakdown of the product's step.

    python benchmarks/profile_step.py --size tiny --batch-size 8 --steps 3          # quick (CPU)
    python benchmarks/profile_step.py --dtype bfloat16 --batch-size 384 --out DIR   # lent GPU

Builds the same jitted step as `benchmarks/train_step.py` (random-weight roberta of `--size`, the
product's BlairTask + loop.make_train_step), times `--steps` steps (median), then traces
`--trace-steps` more with `jax.profiler` and sums the device time of every XLA op (on GPU: the
kernels each HLO op launched; on CPU: the thunks of every XLA thread, i.e. thread-seconds). Prints
the share of matmuls (dot / gemm custom calls), fusions and the rest, and the `--top` ops; with
`--out` it also writes the optimised HLO (to look up what a fusion computes) and the raw trace.

`--dropout` and `--set key=value` (config overrides, e.g. `--set model.remat=True`) change the
step for what-if comparisons; the environment variable JAX_DEFAULT_PRNG_IMPL=rbg switches every
key of the process to XLA's RngBitGenerator.
"""

from __future__ import annotations

import argparse
import collections
import warnings
import glob
import gzip
import os
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

import bench_common
import train_step as ts


def _category(name: str) -> str:
  n = name.lower()
  if any(k in n for k in ("gemm", "dot", "cublas", "matmul", "convolution")):
    return "matmul"
  if "rng" in n or "threefry" in n:
    return "rng"
  if any(k in n for k in ("all-reduce", "all-gather", "reduce-scatter", "collective", "nccl")):
    return "collective"
  if "fusion" in n:
    return "fusion"
  return "other"


def op_times(xplane_file: str) -> tuple[dict[str, float], dict[str, str], str]:
  """({hlo op: summed device ns}, {hlo op: a kernel it launched}, which timeline was read).

  On GPU run with XLA_FLAGS=--xla_gpu_enable_command_buffer= : inside a CUDA graph the ops are
  not told apart (one `command_buffer` op)."""
  import jax  # pylint: disable=import-outside-toplevel
  pd = jax.profiler.ProfileData.from_file(xplane_file)
  planes = list(pd.planes)
  gpu = [p for p in planes if p.name.startswith("/device:GPU")]
  out: dict[str, float] = collections.defaultdict(float)
  kernels: dict[str, str] = {}
  if gpu:
    lines = [l for l in gpu[0].lines if l.name.startswith("Stream")]
    for line in lines:
      for ev in line.events:
        op = str(dict(ev.stats).get("hlo_op", ev.name))
        out[op] += ev.duration_ns
        kernels.setdefault(op, ev.name)
    return out, kernels, f"{gpu[0].name}: kernels on {len(lines)} streams"
  for p in planes:
    for line in p.lines:
      for ev in line.events:
        stats = dict(ev.stats)
        if "hlo_op" in stats:
          out[str(stats["hlo_op"])] += ev.duration_ns
  return out, kernels, "host XLA threads (thread time)"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  ap.add_argument("--size", choices=tuple(ts.SIZES), default="base")
  ap.add_argument("--batch-size", type=int, default=32)
  ap.add_argument("--seq-len", type=int, default=64)
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  ap.add_argument("--steps", type=int, default=10, help="timed steps (median)")
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--trace-steps", type=int, default=3)
  ap.add_argument("--top", type=int, default=30)
  ap.add_argument("--dropout", type=float, default=ts.DROPOUT)
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="config override (python literal value), repeatable")
  ap.add_argument("--no-mlm", action="store_true")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default="", help="folder for the HLO text and the trace")
  bench_common.add_xla_flags_arg(ap)
  args = ap.parse_args(argv)
  bench_common.apply_xla_flags(args.xla_flags)

  warnings.filterwarnings("ignore", category=DeprecationWarning)
  import jax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from mmret_jax.train import partitioning  # pylint: disable=import-outside-toplevel
  transformers.utils.logging.disable_progress_bar()
  overrides = ts.parse_overrides(args.set)
  ts.DROPOUT = args.dropout
  tmp = tempfile.TemporaryDirectory()
  hf_dir = pathlib.Path(tmp.name) / "hf"
  ts.write_hf_dir(torch, transformers, ts.SIZES[args.size], hf_dir, args.seed)
  print(f"== {args.size}, {args.batch_size} pairs x {args.seq_len}, {args.dtype}, dropout {args.dropout}, "
        f"prng {jax.config.jax_default_prng_impl}, overrides {overrides or '-'}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, {jax.devices()[0].device_kind}", flush=True)
  t0 = time.perf_counter()
  _, mesh, state, step_fn = ts.build_jax(args, hf_dir, pathlib.Path(tmp.name) / "work", overrides=overrides)
  batch = partitioning.make_global_batch(ts.make_batch(ts.SIZES[args.size], args.batch_size, args.seq_len,
                                                       args.seed), mesh)
  step = bench_common.CompiledStep(step_fn, state, batch, mesh)
  del state  # donated: the step holds it
  compiled = step.compiled
  print(f"  build + compile {time.perf_counter() - t0:.1f}s", flush=True)
  out = pathlib.Path(args.out) if args.out else None
  if out:
    out.mkdir(parents=True, exist_ok=True)
    with gzip.open(out / "step_hlo.txt.gz", "wt") as f:
      f.write(compiled.as_text())

  for _ in range(args.warmup):
    m = step()
  walls = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    m = step()
    walls.append(time.perf_counter() - t0)
  med = statistics.median(walls)
  print(f"  step median {med * 1e3:.2f} ms ({args.batch_size / med:.0f} pairs/s); loss {float(m['loss']):.4f}; "
        f"steps {', '.join(f'{w * 1e3:.1f}' for w in walls)}", flush=True)

  trace_dir = str(out / "trace") if out else tempfile.mkdtemp(dir=tmp.name)
  jax.profiler.start_trace(trace_dir)
  for _ in range(args.trace_steps):
    step()
  jax.profiler.stop_trace()
  files = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
  times, kernels, where = op_times(files[0])
  per_step = {k: v / args.trace_steps / 1e6 for k, v in times.items()}  # ms
  total = sum(per_step.values())
  cats = collections.Counter()
  for k, v in per_step.items():
    cats[_category(k)] += v
  print(f"== device time per step, from {where}: {total:.2f} ms (wall median {med * 1e3:.2f} ms)")
  for c, v in cats.most_common():
    print(f"  {c:10s} {v:9.2f} ms  {100 * v / total:5.1f}%")
  if out:
    import json  # pylint: disable=import-outside-toplevel
    (out / "op_ms_per_step.json").write_text(json.dumps({"ms": per_step, "kernels": kernels}, indent=0))
  print(f"== top {args.top} ops")
  for k, v in sorted(per_step.items(), key=lambda kv: -kv[1])[:args.top]:
    print(f"  {v:8.3f} ms {100 * v / total:5.1f}%  {k}  {kernels.get(k, '')[:70]}")
  tmp.cleanup()
  return 0


if __name__ == "__main__":
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
  np.set_printoptions(precision=4)
  sys.exit(main())
