"""Text-tower throughput: mmret_jax (jit) vs Hugging Face PyTorch (eager), same weights.

    python benchmarks/encode_text.py                     # roberta-base size, batch 32 x 128
    python benchmarks/encode_text.py --size tiny --iters 2 --repeats 2   # quick check

Builds a random-weight RobertaModel (roberta-base config, no pooler) in PyTorch,
saves it with `save_pretrained` to a temp dir, and loads those weights into
JAX via `mmret_jax.convert.load_any` + `build_model` (what `mmret_jax.load`
does). Both sides get the same random token ids and attention mask.

Timed per batch:
  PyTorch: eager `model(ids, mask)` under `torch.inference_mode()`, then
           last_hidden_state[:, 0], L2-normalised.
  JAX:     `mmret_jax.embed.Encoder._forward` (the jitted forward that
           `encode_text` runs: CLS of last_hidden_state, L2-normalised);
           compile time excluded, warmed up, `block_until_ready` each batch.
Each repeat times `--iters` batches; the reported time is the median over
`--repeats` repeats (PyTorch and JAX repeats are interleaved so that a change
in machine load hits both). texts/s = batch_size / seconds per batch.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=wrong-import-position

from bench_common import (ROBERTA_SIZES, add_xla_flags_arg, apply_xla_flags, machine_info,  # pylint: disable=wrong-import-position
                          print_machine, usable_cpus)

# jax is imported in main(), after --xla-flags has been put into XLA_FLAGS.
jax = jnp = None

SIZES = ROBERTA_SIZES


def make_inputs(cfg: dict, batch: int, seq_len: int, mask_kind: str, seed: int):
  """Random ids in [3, vocab) framed by <s> ... </s>; `ragged` pads rows to random lengths."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, cfg["vocab_size"], size=(batch, seq_len), dtype=np.int64)
  if mask_kind == "none":
    lengths = np.full(batch, seq_len)
  else:  # realistic: lengths spread between a quarter of the window and all of it
    lengths = rng.integers(max(2, seq_len // 4), seq_len + 1, size=batch)
    lengths[0] = seq_len  # the padded length is always used by some row
  mask = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int64)
  ids[:, 0] = cfg["bos_token_id"]
  ids[np.arange(batch), lengths - 1] = cfg["eos_token_id"]
  ids = np.where(mask == 1, ids, cfg["pad_token_id"])
  return ids, mask


def time_calls(fn, iters: int) -> tuple[float, float]:
  """(wall, process CPU) seconds per call, averaged over `iters` calls (fn must block on its result).

  CPU seconds (all threads of this process) are a side figure that other load on the
  machine inflates less than wall time; texts/s always comes from wall time.
  """
  c0, t0 = time.process_time(), time.perf_counter()
  for _ in range(iters):
    fn()
  return (time.perf_counter() - t0) / iters, (time.process_time() - c0) / iters


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--batch-size", type=int, default=32)
  ap.add_argument("--seq-len", type=int, default=128)
  ap.add_argument("--iters", type=int, default=3, help="batches per timed repeat")
  ap.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
  ap.add_argument("--warmup", type=int, default=1, help="untimed batches per framework after compile")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                  help="JAX compute dtype (params stay float32; PyTorch stays float32)")
  ap.add_argument("--size", choices=tuple(SIZES), default="base")
  ap.add_argument("--mask", choices=("none", "ragged"), default="none",
                  help="none: every token real; ragged: random lengths padded to --seq-len")
  ap.add_argument("--seed", type=int, default=0)
  add_xla_flags_arg(ap)
  args = ap.parse_args(argv)
  apply_xla_flags(args.xla_flags)

  global jax, jnp  # pylint: disable=global-statement
  import jax  # pylint: disable=import-outside-toplevel,redefined-outer-name
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel,redefined-outer-name

  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from mmret_jax import convert  # pylint: disable=import-outside-toplevel
  from mmret_jax.embed import Encoder  # pylint: disable=import-outside-toplevel

  transformers.utils.logging.disable_progress_bar()
  cfg = SIZES[args.size]
  if args.seq_len > cfg["max_position_embeddings"] - cfg["pad_token_id"] - 1:
    ap.error(f"--seq-len {args.seq_len} exceeds the position table")
  print_machine(machine_info(torch, xla_cpu_threads=f"{usable_cpus()} (one per usable core)"))
  gpu = jax.default_backend() == "gpu"
  tdev = torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")

  print(f"== model: roberta ({args.size}), random weights; batch {args.batch_size} x seq {args.seq_len}, "
        f"mask={args.mask}, jax dtype={args.dtype}")
  torch.manual_seed(args.seed)
  tmodel = transformers.RobertaModel(transformers.RobertaConfig(**cfg), add_pooling_layer=False).eval()
  print(f"  torch attn_implementation: {tmodel.config._attn_implementation}")  # pylint: disable=protected-access
  ids_np, mask_np = make_inputs(cfg, args.batch_size, args.seq_len, args.mask, args.seed)

  with tempfile.TemporaryDirectory() as tmp:
    tmodel.save_pretrained(tmp)
    meta, hf_config, params, _ = convert.load_any(tmp)
  tmodel = tmodel.to(tdev)
  n_params = sum(p.numel() for p in tmodel.parameters())
  print(f"  params: {n_params / 1e6:.1f} M (pooler: {meta['pooler']})")

  # ---- PyTorch: eager forward + the same CLS / L2 post-processing.
  t_ids, t_mask = torch.from_numpy(ids_np).to(tdev), torch.from_numpy(mask_np).to(tdev)

  def torch_step():
    with torch.inference_mode():
      h = tmodel(input_ids=t_ids, attention_mask=t_mask).last_hidden_state[:, 0]
      out = torch.nn.functional.normalize(h, dim=-1)
    if tdev.type == "cuda":
      torch.cuda.synchronize()
    return out

  # ---- JAX: the product's jitted forward (embed.Encoder._forward).
  def jax_encoder(dtype: str):
    model = convert.build_model(meta, hf_config, dtype=jnp.dtype(dtype))
    return Encoder(model, jax.device_put(params), None, meta=meta, hf_config=hf_config, path="<tmp>")

  j_ids = jnp.asarray(ids_np.astype(np.int32))
  j_mask = jnp.asarray(mask_np.astype(np.int32))
  dtypes = [args.dtype] + (["bfloat16"] if gpu and args.dtype != "bfloat16" else [])
  encoders = {d: jax_encoder(d) for d in dtypes}

  def jax_step(enc):
    return enc._forward(enc.params, j_ids, j_mask, "cls", True).block_until_ready()  # pylint: disable=protected-access

  print("== compile / warm-up")
  t0 = time.perf_counter()
  ref = torch_step().float().cpu().numpy()
  print(f"  torch first call: {time.perf_counter() - t0:.2f}s")
  jax_out = {}
  for d, enc in encoders.items():
    t0 = time.perf_counter()
    jax_out[d] = np.asarray(jax_step(enc), np.float32)
    print(f"  jax[{d}] compile + first call: {time.perf_counter() - t0:.2f}s")
  for _ in range(args.warmup):
    torch_step()
    for enc in encoders.values():
      jax_step(enc)

  print("== agreement (CLS, L2-normalised; PyTorch float32 is the reference)")
  for d, out in jax_out.items():
    diff = float(np.max(np.abs(out - ref)))
    cos = float(np.min(np.sum(out * ref, -1)))
    print(f"  jax[{d}] vs torch: max|diff| = {diff:.3e}, min cosine = {cos:.6f}")
    tol = 1e-4 if d == "float32" else 5e-2
    if diff > tol:
      print(f"  WARNING: max|diff| {diff:.3e} above {tol:g}", file=sys.stderr)

  print(f"== timing: {args.repeats} repeats x {args.iters} batches each")
  times = {"torch": [], **{f"jax[{d}]": [] for d in encoders}}
  cpu = {k: [] for k in times}
  for r in range(args.repeats):
    steps = [("torch", torch_step)] + [(f"jax[{d}]", lambda enc=enc: jax_step(enc)) for d, enc in encoders.items()]
    for k, fn in steps:
      wall, c = time_calls(fn, args.iters)
      times[k].append(wall)
      cpu[k].append(c)
      time.sleep(0.2)  # let idle OpenMP / Eigen workers stop spinning before the other side runs
    print("  repeat %d: %s" % (r + 1, ", ".join(f"{k} {v[-1] * 1e3:.0f} ms/batch" for k, v in times.items())))
  load = os.getloadavg()
  print(f"  load average after timing: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")

  print("== results (median wall seconds per batch -> texts/s)")
  tps = {}
  for k, v in times.items():
    med = statistics.median(v)
    tps[k] = args.batch_size / med
    print(f"  {k:16s} {med * 1e3:9.1f} ms/batch  {tps[k]:9.1f} texts/s   "
          f"(repeats: {', '.join(f'{x * 1e3:.0f}' for x in v)} ms; "
          f"process CPU {statistics.median(cpu[k]) * 1e3:.0f} ms/batch)")
  for d in encoders:
    print(f"  ratio JAX[{d}]/PyTorch[float32, {tdev.type}]: {tps[f'jax[{d}]'] / tps['torch']:.3f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
