"""Compiled-memory figures of contrastive training steps: plain vs GradCache vs ring loss (issue 15).

Nothing is allocated or run: each train step is lowered and compiled for abstract inputs (`jax.ShapeDtypeStruct`)
and XLA's memory analysis of the compiled program gives the per-device bytes (`train/metrics.compiled_memory`:
temp = activations and gradients in flight, arguments = params + optimizer state + batch). So the figures hold for
the backend this runs on (CPU here; a GPU's buffer assignment differs somewhat) and sizes far beyond this machine's
memory can be asked about.

  python benchmarks/memory.py step --task blair --size base --seq 64 --batches 96,192,384,768 --chunk 32 \
      --budget-gb 80
      BLaIR (RoBERTa-base, vocab 50,265, bf16, the seed's loss: InfoNCE + 0.1 MLM) at each global batch, plain and
      with GradCache chunks of `--chunk` rows: temp / argument / peak bytes, whether the peak fits the budget, and
      the largest batch that fits (a doubling search, plain and cached, with --search).
  python benchmarks/memory.py ring --batch 32768 --dim 256 --devices 8
      the contrastive loss alone (forward + backward) over B rows on `--devices` simulated CPU devices, dense
      (info_nce of the [B, B] logits) vs ring (losses.ring_contrastive_loss): whether an f32[B, B] buffer is in the
      optimised HLO, and the per-device temp bytes.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def _gib(x: float) -> str:
  return f"{x / 2**30:,.2f} GiB"


def ring_report(args) -> None:
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from mmret_jax import losses  # pylint: disable=import-outside-toplevel
  from mmret_jax.train import metrics, partitioning  # pylint: disable=import-outside-toplevel
  mesh = partitioning.make_mesh({"data": args.devices, "fsdp": 1, "tensor": 1})
  b, d = args.batch, args.dim
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  spec = jax.ShapeDtypeStruct((b, d), jnp.float32, sharding=sh)
  scale = jax.ShapeDtypeStruct((), jnp.float32)

  def dense(q, c, s):
    return losses.info_nce(s * q @ c.T, symmetric=True)

  def ring(q, c, s):
    return losses.ring_contrastive_loss(q, c, s, mesh, symmetric=True)
  print(f"contrastive loss + gradient, B = {b:,}, D = {d}, {args.devices} devices (b = {b // args.devices:,} "
        f"rows each), float32")
  for name, fn in (("dense", dense), ("ring", ring)):
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
      compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2))).lower(spec, spec, scale).compile()
    hlo = compiled.as_text()
    full = len(re.findall(rf"f32\[{b},{b}\]", hlo))
    shapes = {(int(m[0]), int(m[1])) for m in re.findall(r"f32\[(\d+),(\d+)\]", hlo)}
    big = max(shapes, key=lambda x: x[0] * x[1]) if shapes else (0, 0)
    mem = metrics.compiled_memory(compiled)
    print(f"  {name:5s}: f32[{b},{b}] buffers in the per-device HLO: {full}; largest 2-D f32 buffer "
          f"[{big[0]},{big[1]}]; per-device temp {_gib(mem['memory/temp_bytes'])}, peak "
          f"{_gib(mem['memory/peak_bytes'])} (compiled in {time.perf_counter() - t0:.1f} s)")


def _blair_task(size: str, seq: int, mlm: bool):
  """A BLaIR task on the bundled sample with the `size` RoBERTa at vocab 50,265 (RoBERTa's), bf16."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, str(REPO / "configs"))
  import blair_base  # pylint: disable=import-outside-toplevel
  from mmret_jax.models import bert  # pylint: disable=import-outside-toplevel
  from mmret_jax.tasks.blair import BlairTask  # pylint: disable=import-outside-toplevel
  from mmret_jax.train import partitioning  # pylint: disable=import-outside-toplevel
  c = blair_base.get_config("smoke")
  c.model.preset = f"roberta-{size}"
  c.model.dtype = "bfloat16"
  c.model.dropout = 0.1
  c.data.max_seq_length = seq
  c.loss.do_mlm = mlm
  c.tokenizer = "bpe:300"
  mesh = partitioning.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  task = BlairTask(c, mesh, pathlib.Path(tempfile.mkdtemp()))
  task.model_config = dataclasses.replace(task.model_config, vocab_size=50265)
  task.model = bert.BertModel(task.model_config, add_pooling_layer=False, add_mlm_head=mlm, add_cl_head=True,
                              dtype=jnp.bfloat16)
  return task, c


def step_memory(task, config, batch: int, seq: int, chunk: int) -> dict[str, float]:
  """The compiled train step's memory (no arrays allocated)."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from mmret_jax.train import loop, metrics, optim  # pylint: disable=import-outside-toplevel
  tx, _ = optim.make_optimizer(config.optim, 1000, task.freeze_patterns())
  state = jax.eval_shape(lambda: loop.make_state(task, tx, nn.unbox(task.init_params(jax.random.PRNGKey(0))),
                                                 jax.random.PRNGKey(1)))
  ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  bt = {"review_ids": ids, "review_mask": ids, "meta_ids": ids, "meta_mask": ids}
  step = jax.jit(loop.make_train_step(task, tx, 1, "stop", chunk), donate_argnums=0)
  return metrics.compiled_memory(step.lower(state, bt).compile())


def step_report(args) -> None:
  if args.task != "blair":
    raise SystemExit(f"error: --task {args.task}: only blair is measured here so far")
  task, config = _blair_task(args.size, args.seq, not args.no_mlm)
  budget = args.budget_gb * 2**30
  print(f"BLaIR RoBERTa-{args.size} (vocab 50,265, bf16, dropout 0.1, MLM {'off' if args.no_mlm else 'on'}), "
        f"{args.seq} tokens, AdamW; one device; budget {args.budget_gb:g} GiB")
  print("| global batch | mode | temp | arguments | peak | fits | compile s |")
  print("|---:|---|---:|---:|---:|---|---:|")
  rows = {}
  for b in [int(x) for x in args.batches.split(",")]:
    for mode, chunk in (("plain", 0), (f"GradCache {args.chunk}", args.chunk)):
      if chunk and b % chunk:
        continue
      t0 = time.perf_counter()
      m = step_memory(task, config, b, args.seq, chunk)
      rows[b, mode] = m
      print(f"| {b} | {mode} | {_gib(m['memory/temp_bytes'])} | {_gib(m['memory/argument_bytes'])} | "
            f"{_gib(m['memory/peak_bytes'])} | {'yes' if m['memory/peak_bytes'] <= budget else 'no'} | "
            f"{time.perf_counter() - t0:.0f} |", flush=True)
    plain, cached = rows.get((b, "plain")), rows.get((b, f"GradCache {args.chunk}"))
    if plain and cached:
      print(f"|  | temp plain / cached | {plain['memory/temp_bytes'] / cached['memory/temp_bytes']:.1f}x |  |  |"
            "  |  |", flush=True)
  if args.search:
    for mode, chunk in (("plain", 0), ("GradCache", args.chunk)):
      b, best = max(args.chunk, 32), 0
      while b <= args.search_max:
        m = step_memory(task, config, b, args.seq, chunk)
        if m["memory/peak_bytes"] > budget:
          break
        best, b = b, b * 2
      print(f"largest power-of-two batch within {args.budget_gb:g} GiB, {mode}: {best or 'none'}"
            + (f" (search stopped at {args.search_max})" if b > args.search_max else ""), flush=True)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = ap.add_subparsers(dest="cmd", required=True)
  s = sub.add_parser("step", help="a task's train step: plain vs GradCache")
  s.add_argument("--task", default="blair")
  s.add_argument("--size", default="base", choices=("base", "large", "tiny"))
  s.add_argument("--seq", type=int, default=64)
  s.add_argument("--batches", default="96,192,384,768")
  s.add_argument("--chunk", type=int, default=32)
  s.add_argument("--budget-gb", type=float, default=80.0)
  s.add_argument("--no-mlm", action="store_true")
  s.add_argument("--search", action="store_true", help="also the largest power-of-two batch within the budget")
  s.add_argument("--search-max", type=int, default=65536)
  r = sub.add_parser("ring", help="the loss alone: dense vs ring on simulated devices")
  r.add_argument("--batch", type=int, default=32768)
  r.add_argument("--dim", type=int, default=256)
  r.add_argument("--devices", type=int, default=8)
  a = ap.parse_args(argv)
  sys.path.insert(0, str(REPO / "benchmarks"))
  import bench_common  # pylint: disable=import-outside-toplevel
  print(f"machine: {bench_common.cpu_model()}, {bench_common.usable_cpus()} cpus, load {bench_common.load_average()}")
  (ring_report if a.cmd == "ring" else step_report)(a)
  return 0


if __name__ == "__main__":
  sys.exit(main())
