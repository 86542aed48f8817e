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
  python benchmarks/memory.py step --task cir --batches 128,256,512 --chunk 32 --budget-gb 80
      Bi-BLIP4CIR stage I (configs/cir_cirr.py:smoke's data, the BLIP-base text tower: BERT-base 12 x 768, vocab
      30,524, bf16, dropout 0.1; the image features are cached [B, 256] inputs), 77 tokens (`--seq`).
  python benchmarks/memory.py step --task uniir_clip_sf --batches 105,210,420,840 --chunk 35 --budget-gb 80
      UniIR CLIP-SF (configs/uniir_clip_sf.py:smoke's data, CLIP ViT-L/14 at 224 px + the 12 x 768 text tower,
      vocab 49,408, 77 tokens, projection 768, bf16); `--task uniir_clip_ff` adds the 2-layer T5 fusion. The
      batch counts queries (each with its positive: 2B encoder items); GradCache chunks count query/positive pairs.
  Every task takes `--size tiny` too (BLaIR: RoBERTa-tiny; cir / uniir: the :smoke config's own tiny model), for
  a fast check that the plain and the cached step compile.
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


REAL_SIZE = {"blair": "base", "blair_clip": "base", "cir": "base", "uniir_clip_sf": "large", "uniir_clip_ff": "large"}
SIZES = {"blair": ("base", "large", "tiny"), "blair_clip": ("base", "large", "tiny"), "cir": ("base", "tiny"),
         "uniir_clip_sf": ("large", "tiny"), "uniir_clip_ff": ("large", "tiny")}
DEFAULT_SEQ = {"blair": 64, "blair_clip": 64, "cir": 77}  # UniIR CLIP: always 77 (CLIP's context)


def _task(name: str, size: str, seq: int, mlm: bool, devices: int, impl: str):
  """The task `name` on its bundled smoke sample with the real model swapped in (`size` = tiny keeps the smoke
  config's model), `loss.impl` = impl, on a data mesh of `devices`: (task, config, mesh)."""
  import jax  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, str(REPO / "configs"))
  from mmret_jax.train import partitioning  # pylint: disable=import-outside-toplevel
  if size not in SIZES[name]:
    raise SystemExit(f"error: --task {name} --size {size}: sizes measured for {name}: {', '.join(SIZES[name])}")
  mesh = partitioning.make_mesh({"data": devices, "fsdp": 1, "tensor": 1}, jax.devices()[:devices])
  if name in ("blair", "blair_clip"):
    task, c = _blair_task(name, size, seq, mlm, mesh, impl)
  elif name == "cir":
    task, c = _cir_task(size, seq, mesh, impl)
  else:
    task, c = _uniir_task(name, size, mesh, impl)
  return task, c, mesh


def _set_impl(c, impl: str) -> None:
  import ml_collections  # pylint: disable=import-outside-toplevel
  if "loss" not in c:
    c.loss = ml_collections.ConfigDict()
  c.loss.impl = impl


def _blair_task(name: str, size: str, seq: int, mlm: bool, mesh, impl: str):
  """A BLaIR / BLaIR-CLIP task on its bundled smoke sample with the `size` RoBERTa at vocab 50,265 (RoBERTa's), bf16,
  dropout 0.1; BLaIR-CLIP adds the CLIP ViT-B/16 tower at 224 px, projection 512 (the fork's)."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from mmret_jax.models import bert  # pylint: disable=import-outside-toplevel
  if name == "blair":
    import blair_base as module  # pylint: disable=import-outside-toplevel
    from mmret_jax.tasks.blair import BlairTask as cls  # pylint: disable=import-outside-toplevel
  else:
    import blair_clip as module  # pylint: disable=import-outside-toplevel
    from mmret_jax.tasks.blair_clip import BlairClipTask as cls  # pylint: disable=import-outside-toplevel
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
  task = cls(c, mesh, pathlib.Path(tempfile.mkdtemp()))
  task.model_config = dataclasses.replace(task.model_config, vocab_size=50265)
  task.model = bert.BertModel(task.model_config, add_pooling_layer=False, add_mlm_head=mlm, add_cl_head=True,
                              dtype=jnp.bfloat16)
  return task, c


def _cir_task(size: str, seq: int, mesh, impl: str):
  """Bi-BLIP4CIR stage I on `configs/cir_cirr.py:smoke` (the bundled CIRR val annotations, generated images; the
  smoke BLIP extracts the cached image features) with, at `base`, the BLIP-base text tower swapped in: BERT-base
  12 x 768, 12 heads, vocab 30,524, bf16, dropout 0.1, text_proj to 256."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import cir_cirr  # pylint: disable=import-outside-toplevel
  from mmret_jax.models import blip  # pylint: disable=import-outside-toplevel
  from mmret_jax.tasks.cir import CirTask  # pylint: disable=import-outside-toplevel
  c = cir_cirr.get_config("smoke")
  c.data.max_seq_length = max(int(c.data.max_seq_length), seq)
  _set_impl(c, impl)
  task = CirTask(c, mesh, pathlib.Path(tempfile.mkdtemp()))
  if size == "base":
    cfg = blip.PRESETS["base"]
    text = dataclasses.replace(cfg.text, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    task.blip_config = dataclasses.replace(cfg, text=text)
    task.text_tower = blip.BlipTextTower(task.blip_config, dtype=jnp.bfloat16)
  return task, c


def clip_large_config(fusion: str, dropout: float = 0.1):
  """UniIR's CLIP ViT-L/14 at 224 px (vision 24 x 1024, 16 heads, patch 14; text 12 x 768, 12 heads, vocab
  49,408, 77 tokens; projection 768); FF adds the seed's 2-layer T5 fusion (d_model 768, 12 heads, d_ff 2048)."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from mmret_jax.models import clip, uniir, vit  # pylint: disable=import-outside-toplevel
  text = clip.CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, max_position_embeddings=77, projection_dim=768)
  vision = dataclasses.replace(vit.PRESETS["L/14"], image_size=224)
  t5_cfg = None
  if fusion == "ff":
    from mmret_jax.models import t5  # pylint: disable=import-outside-toplevel
    t5_cfg = dataclasses.replace(t5.PRESETS["uniir-clip-ff-l14"], dropout_rate=dropout)
  return uniir.UniIRConfig(backbone="clip", fusion=fusion, clip=clip.CLIPConfig(text, vision, 768), t5=t5_cfg,
                           embed_dim=768)


def _uniir_task(name: str, size: str, mesh, impl: str):
  """UniIR CLIP-SF / FF on `configs/uniir_<variant>.py:smoke` (the bundled mini M-BEIR, generated images) with, at
  `large`, the seed's CLIP ViT-L/14 swapped in (`clip_large_config`), bf16, at 224 px."""
  import importlib  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from mmret_jax.models import uniir  # pylint: disable=import-outside-toplevel
  from mmret_jax.tasks.uniir import UniIRTask  # pylint: disable=import-outside-toplevel
  variant = name.split("_", 1)[1]
  c = importlib.import_module(f"uniir_{variant}").get_config("smoke")
  _set_impl(c, impl)
  c.eval.sets = ()
  task = UniIRTask(c, mesh, pathlib.Path(tempfile.mkdtemp()))
  if size == "large":
    task.model_config = clip_large_config(variant.split("_")[1])
    task.model = uniir.build(task.model_config, dtype=jnp.bfloat16)
    c.data.image_size = 224
  return task, c


def abstract_batch(name: str, task, batch: int, seq: int, chunk: int) -> dict[str, tuple[tuple[int, ...], object]]:
  """{field: (shape, dtype)} of a global batch of `batch` rows (BLaIR: `seq` tokens; cir / uniir: a real small
  batch of `task.make_batch`, its leading dim scaled to the global batch, token dims set to `seq` (cir; UniIR CLIP:
  77), image dims to the model's size, cir's cached image features to the projection width). UniIR takes the
  paired layout when `chunk` > 0, as its make_batch with GradCache."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  if name in ("blair", "blair_clip"):
    ids = ((batch, seq), jnp.int32)
    bt = {"review_ids": ids, "review_mask": ids, "meta_ids": ids, "meta_mask": ids}
    if hasattr(task, "vision"):
      size = task.vision_config.image_size
      bt["image"] = ((batch, size, size, 3), jnp.float32)
    return bt
  k = 4
  if name == "cir":
    tails = {"fwd_ids": (seq,), "fwd_mask": (seq,), "bwd_ids": (seq,), "bwd_mask": (seq,),
             "ref": (task.blip_config.image_text_hidden_size,), "tgt": (task.blip_config.image_text_hidden_size,)}
  else:
    task.paired = chunk > 0
    size = int(task.config.data.image_size)
    tails = {"pixels": lambda t: (*t[:-3], size, size, 3)}
  sample = task.make_batch(np.arange(k) % task.num_train_examples, 0)
  out = {}
  for key, x in sample.items():
    tail = tails.get(key, x.shape[1:])
    tail = tail(x.shape[1:]) if callable(tail) else tuple(tail)
    if x.shape[0] % k:
      raise SystemExit(f"error: {name} batch field {key} has leading dim {x.shape[0]}, not a multiple of {k} rows")
    out[key] = ((x.shape[0] // k * batch, *tail), jax.dtypes.canonicalize_dtype(x.dtype))
  return out


def dense_logits_shapes(hlo: str, batch: int, local: int) -> list[str]:
  """The f32 buffers of the per-device HLO shaped like dense contrastive logits ([b, B], [B, b] or [B, B])."""
  want = {(local, batch), (batch, local), (batch, batch)}
  return sorted({f"f32[{m[0]},{m[1]}]" for m in re.findall(r"f32\[(\d+),(\d+)\]", hlo)
                 if (int(m[0]), int(m[1])) in want})


def step_memory(task, config, mesh, batch: int, seq: int, chunk: int, name: str = "blair",
                check_ring: bool = False) -> dict[str, float]:
  """The compiled train step's per-device memory (no arrays allocated; the batch sharded over the data axis).
  `check_ring`: an error when the compiled step still holds dense logits (the task ignores loss.impl=ring)."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from mmret_jax.train import loop, metrics, optim, partitioning  # pylint: disable=import-outside-toplevel
  tx, _ = optim.make_optimizer(config.optim, 1000, task.freeze_patterns(), steps_per_epoch=100)
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.RULES):
    state = jax.eval_shape(lambda: loop.make_state(task, tx, nn.unbox(task.init_params(jax.random.PRNGKey(0))),
                                                   jax.random.PRNGKey(1)))
    bt = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=partitioning.batch_sharding(mesh, len(shape)))
          for k, (shape, dtype) in abstract_batch(name, task, batch, seq, chunk).items()}
    dp = partitioning.data_parallel_size(mesh)
    step = jax.jit(loop.make_train_step(task, tx, 1, "stop", chunk, dp), donate_argnums=0)
    compiled = step.lower(state, bt).compile()
  if check_ring and (found := dense_logits_shapes(compiled.as_text(), batch, batch // dp)):
    raise SystemExit(f"error: --impl ring: the compiled {name} step still holds dense logits ({', '.join(found)}): "
                     f"loss.impl=ring is not wired into this task")
  return metrics.compiled_memory(compiled)


def _describe(args) -> str:
  size = args.size
  if args.task in ("blair", "blair_clip"):
    return (f"RoBERTa-{size} (vocab 50,265, bf16, dropout 0.1, MLM {'off' if args.no_mlm else 'on'})"
            + (", CLIP ViT-B/16 224 px" if args.task == "blair_clip" else "") + f", {args.seq} tokens")
  if args.task == "cir":
    return ("stage I, BLIP-base text tower (BERT-base 12 x 768, vocab 30,524, bf16, dropout 0.1), cached image "
            f"features [B, 256], {args.seq} tokens" if size == "base" else f"stage I, the :smoke tiny BLIP, "
            f"{args.seq} tokens")
  ff = args.task.endswith("ff")
  return ((f"CLIP ViT-L/14 224 px + text 12 x 768 (vocab 49,408), projection 768{', T5 fusion 2 x 768' if ff else ''}"
           ", bf16, 77 tokens" if size == "large" else "the :smoke tiny CLIP, 77 tokens")
          + "; batch = queries (2B encoder items), GradCache chunks = query/positive pairs")


def step_report(args) -> None:
  if args.devices > 1:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  args.size = args.size or REAL_SIZE[args.task]
  if args.task.startswith("uniir"):
    if args.seq not in (None, 77):
      raise SystemExit(f"error: --seq {args.seq}: UniIR CLIP always tokenises to 77 (CLIP's context)")
    args.seq = 77
  args.seq = args.seq or DEFAULT_SEQ[args.task]
  task, config, mesh = _task(args.task, args.size, args.seq, not args.no_mlm, args.devices, args.impl)
  budget = args.budget_gb * 2**30
  check_ring = args.impl == "ring" and args.devices > 1
  print(f"{args.task}: {_describe(args)}, AdamW; {args.devices} device(s), contrastive loss {args.impl}; budget "
        f"{args.budget_gb:g} GiB per device", flush=True)
  print("| global batch | mode | temp | arguments | peak | fits | compile s |")
  print("|---:|---|---:|---:|---:|---|---:|")
  rows = {}
  modes = (("plain", 0), (f"GradCache {args.chunk}", args.chunk))
  for b in [int(x) for x in args.batches.split(",")]:
    for mode, chunk in modes:
      if chunk and b % chunk:
        continue
      t0 = time.perf_counter()
      m = step_memory(task, config, mesh, b, args.seq, chunk, args.task, check_ring)
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
        if step_memory(task, config, mesh, b, args.seq, chunk, args.task)["memory/peak_bytes"] > budget:
          break
        best, b = b, b * 2
      print(f"largest batch {max(args.chunk, 32)} x 2^k within {args.budget_gb:g} GiB, {mode}: {best or 'none'}"
            + (f" (search stopped at {args.search_max})" if b > args.search_max else ""), flush=True)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = ap.add_subparsers(dest="cmd", required=True)
  s = sub.add_parser("step", help="a task's train step: plain vs GradCache")
  s.add_argument("--task", default="blair", choices=tuple(REAL_SIZE))
  s.add_argument("--impl", default="dense", choices=("dense", "ring"), help="the contrastive loss (loss.impl)")
  s.add_argument("--devices", type=int, default=1, help="simulated CPU devices of the data axis")
  s.add_argument("--size", default=None, choices=("base", "large", "tiny"),
                 help="default: the seed's (blair, blair_clip, cir: base; uniir_*: large)")
  s.add_argument("--seq", type=int, default=None, help="tokens (default: blair 64, cir 77; uniir: always 77)")
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
