"""Compiled-memory figures of contrastive training steps: plain vs GradCache vs ring loss (issue 15).

Nothing is allocated or run: each train step is lowered and compiled for abstract inputs (`jax.ShapeDtypeStruct`)
and XLA's memory analysis of the compiled program gives the per-device bytes (`train/metrics.compiled_memory`:
temp = activations and gradients in flight, arguments = params + optimizer state + batch). So the figures hold for
the backend this runs on (CPU here; a GPU's buffer assignment differs somewhat) and sizes far beyond this machine's
memory can be asked about.

  python benchmarks/memory.py step --task blair --size base --seq 64 --batches 96,192,384,768 --chunk 32 \
      --budget-gb 80 [--impl dense|ring] [--devices N] [--search]
      BLaIR (RoBERTa-base, vocab 50,265, bf16, the seed's loss: InfoNCE + 0.1 MLM) or BLaIR-CLIP (+ CLIP ViT-B/16)
      at each global batch, plain and with GradCache chunks of `--chunk` rows, the contrastive loss dense or ring
      over `--devices` simulated devices: per-device temp / argument / peak bytes, whether the peak fits the
      budget, and with --search the largest batch that fits (a doubling search, plain and cached).
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


def _task(name: str, size: str, seq: int, mlm: bool, devices: int, impl: str):
  """A BLaIR / BLaIR-CLIP task on its bundled smoke sample with the `size` RoBERTa at vocab 50,265 (RoBERTa's), bf16,
  dropout 0.1, `loss.impl` = impl, on a data mesh of `devices`; BLaIR-CLIP adds the CLIP ViT-B/16 tower at 224 px,
  projection 512 (the fork's)."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, str(REPO / "configs"))
  from mmret_jax.models import bert  # pylint: disable=import-outside-toplevel
  from mmret_jax.train import partitioning  # pylint: disable=import-outside-toplevel
  if name == "blair":
    import blair_base as module  # pylint: disable=import-outside-toplevel
    from mmret_jax.tasks.blair import BlairTask as cls  # pylint: disable=import-outside-toplevel
  elif name == "blair_clip":
    import blair_clip as module  # pylint: disable=import-outside-toplevel
    from mmret_jax.tasks.blair_clip import BlairClipTask as cls  # pylint: disable=import-outside-toplevel
  else:
    raise SystemExit(f"error: --task {name}: measured here: blair, blair_clip")
  c = module.get_config("smoke")
  c.model.preset = f"roberta-{size}"
  c.model.dtype = "bfloat16"
  c.model.dropout = 0.1
  c.data.max_seq_length = seq
  c.loss.do_mlm = mlm
  c.loss.impl = impl
  c.tokenizer = "bpe:300"
  if name == "blair_clip":
    c.mm.vision_preset, c.mm.projection_dim = "B/16", 512
  mesh = partitioning.make_mesh({"data": devices, "fsdp": 1, "tensor": 1}, jax.devices()[:devices])
  task = cls(c, mesh, pathlib.Path(tempfile.mkdtemp()))
  task.model_config = dataclasses.replace(task.model_config, vocab_size=50265)
  task.model = bert.BertModel(task.model_config, add_pooling_layer=False, add_mlm_head=mlm, add_cl_head=True,
                              dtype=jnp.bfloat16)
  return task, c, mesh


def step_memory(task, config, mesh, batch: int, seq: int, chunk: int) -> dict[str, float]:
  """The compiled train step's per-device memory (no arrays allocated; the batch sharded over the data axis)."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from mmret_jax.train import loop, metrics, optim, partitioning  # pylint: disable=import-outside-toplevel
  tx, _ = optim.make_optimizer(config.optim, 1000, task.freeze_patterns())
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.RULES):
    state = jax.eval_shape(lambda: loop.make_state(task, tx, nn.unbox(task.init_params(jax.random.PRNGKey(0))),
                                                   jax.random.PRNGKey(1)))

    def spec(shape, dtype):
      return jax.ShapeDtypeStruct(shape, dtype, sharding=partitioning.batch_sharding(mesh, len(shape)))
    ids = spec((batch, seq), jnp.int32)
    bt = {"review_ids": ids, "review_mask": ids, "meta_ids": ids, "meta_mask": ids}
    if hasattr(task, "vision"):
      size = task.vision_config.image_size
      bt["image"] = spec((batch, size, size, 3), jnp.float32)
    dp = partitioning.data_parallel_size(mesh)
    step = jax.jit(loop.make_train_step(task, tx, 1, "stop", chunk, dp), donate_argnums=0)
    return metrics.compiled_memory(step.lower(state, bt).compile())


def step_report(args) -> None:
  if args.devices > 1:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  task, config, mesh = _task(args.task, args.size, args.seq, not args.no_mlm, args.devices, args.impl)
  budget = args.budget_gb * 2**30
  print(f"{args.task}: RoBERTa-{args.size} (vocab 50,265, bf16, dropout 0.1, MLM {'off' if args.no_mlm else 'on'})"
        + (", CLIP ViT-B/16 224 px" if args.task == "blair_clip" else "") + f", {args.seq} tokens, AdamW; "
        f"{args.devices} device(s), contrastive loss {args.impl}; budget {args.budget_gb:g} GiB per device")
  print("| global batch | mode | temp | arguments | peak | fits | compile s |")
  print("|---:|---|---:|---:|---:|---|---:|")
  rows = {}
  modes = (("plain", 0), (f"GradCache {args.chunk}", args.chunk))
  for b in [int(x) for x in args.batches.split(",")]:
    for mode, chunk in modes:
      if chunk and b % chunk:
        continue
      t0 = time.perf_counter()
      m = step_memory(task, config, mesh, b, args.seq, chunk)
      rows[b, mode] = m
      print(f"| {b} | {mode} | {_gib(m['memory/temp_bytes'])} | {_gib(m['memory/argument_bytes'])} | "
            f"{_gib(m['memory/peak_bytes'])} | {'yes' if m['memory/peak_bytes'] <= budget else 'no'} | "
            f"{time.perf_counter() - t0:.0f} |", flush=True)
    plain, cached = rows.get((b, "plain")), rows.get((b, modes[1][0]))
    if plain and cached:
      print(f"|  | temp plain / cached | {plain['memory/temp_bytes'] / cached['memory/temp_bytes']:.1f}x |  |  |"
            "  |  |", flush=True)
  if args.search:  # doubling from the chunk size: the largest power-of-two multiple that fits
    for mode, chunk in modes:
      b, best = max(args.chunk, 32), 0
      while b <= args.search_max:
        if step_memory(task, config, mesh, b, args.seq, chunk)["memory/peak_bytes"] > budget:
          break
        best, b = b, b * 2
      print(f"largest batch {max(args.chunk, 32)} x 2^k within {args.budget_gb:g} GiB, {mode}: {best or 'none'}"
            + (f" (search stopped at {args.search_max})" if b > args.search_max else ""), flush=True)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = ap.add_subparsers(dest="cmd", required=True)
  s = sub.add_parser("step", help="a task's train step: plain vs GradCache")
  s.add_argument("--task", default="blair", choices=("blair", "blair_clip"))
  s.add_argument("--impl", default="dense", choices=("dense", "ring"), help="the contrastive loss (loss.impl)")
  s.add_argument("--devices", type=int, default=1, help="simulated CPU devices of the data axis")
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
