"""Image-tower throughput: mmret_jax CLIP (jit) vs Hugging Face PyTorch CLIP (eager), same weights.

    python benchmarks/encode_image.py                     # ViT-B/16 vision tower, batch 16 x 224x224
    python benchmarks/encode_image.py --size tiny --iters 2 --repeats 2   # quick check

Builds a random-weight `transformers.CLIPModel` whose vision tower has ViT-B/16 shape (hidden 768,
12 layers, 12 heads, FFN 3072, 224x224 images, 16x16 patches, projection 512; the text tower is
small, it is not timed), saves it with `save_pretrained` to a temp dir, and loads those weights into
JAX via `mmret_jax.convert.load_any` + `build_model` (what `mmret_jax.load` does). Both sides get
the same random images: NHWC for JAX, the same array transposed to NCHW for PyTorch.

Timed per batch:
  PyTorch: eager `model.get_image_features(pixel_values)` under `torch.inference_mode()`
           (projected, unnormalised features).
  JAX:     `jax.jit(lambda p, x: model.apply({"params": p}, x, method="get_image_features"))`
           (params float32, compute in --dtype); compile time excluded, warmed up,
           `block_until_ready` each batch.
Each repeat times `--iters` batches; the reported time is the median over `--repeats` repeats
(PyTorch and JAX repeats are interleaved so that a change in machine load hits both).
images/s = batch_size / seconds per batch.

Before timing, the 1-minute load average is checked (`--max-load`, default 1.2): while it is
higher, the script sleeps 30 s and checks again, for at most `--max-wait` seconds (default 600),
then times anyway and says so.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=wrong-import-position

from bench_common import (add_xla_flags_arg, apply_xla_flags, machine_info,  # pylint: disable=wrong-import-position
                          print_machine, usable_cpus)

# jax is imported in main(), after --xla-flags has been put into XLA_FLAGS.
jax = jnp = None

SMALL_TEXT = dict(vocab_size=1000, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=77)

SIZES = {
    # CLIP ViT-B/16 vision tower (openai/clip-vit-base-patch16 vision_config) + a small text tower.
    "b16": dict(vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            image_size=224, patch_size=16, num_channels=3),
                text=SMALL_TEXT, projection_dim=512),
    # Same shape family, small enough for a seconds-long smoke run.
    "tiny": dict(vision=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                             image_size=64, patch_size=16, num_channels=3),
                 text=dict(SMALL_TEXT, hidden_size=64, intermediate_size=128, num_attention_heads=2),
                 projection_dim=64),
}


def uptime_line() -> str:
  try:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
  except OSError:
    return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def wait_for_quiet(max_load: float, max_wait: float, poll: float = 30.0) -> bool:
  """Sleeps while the 1-minute load average exceeds `max_load`; True when it got quiet in time."""
  t0 = time.monotonic()
  while True:
    load1 = os.getloadavg()[0]
    print(f"  uptime: {uptime_line()}")
    if load1 <= max_load:
      return True
    if time.monotonic() - t0 + poll > max_wait:
      print(f"  WARNING: 1-minute load {load1:.2f} still above {max_load} after {time.monotonic() - t0:.0f}s; "
            "timing anyway", file=sys.stderr)
      return False
    print(f"  1-minute load {load1:.2f} > {max_load}: sleeping {poll:.0f}s")
    time.sleep(poll)


def time_calls(fn, iters: int) -> float:
  """Seconds per call, averaged over `iters` calls (fn must block until its result is ready)."""
  t0 = time.perf_counter()
  for _ in range(iters):
    fn()
  return (time.perf_counter() - t0) / iters


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--batch-size", type=int, default=16)
  ap.add_argument("--iters", type=int, default=5, help="batches per timed repeat")
  ap.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
  ap.add_argument("--warmup", type=int, default=1, help="untimed batches per framework after compile")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                  help="JAX compute dtype (params stay float32; PyTorch stays float32)")
  ap.add_argument("--size", choices=tuple(SIZES), default="b16")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--max-load", type=float, default=1.2,
                  help="wait before timing while the 1-minute load average is above this")
  ap.add_argument("--max-wait", type=float, default=600.0, help="longest wait for --max-load, seconds")
  add_xla_flags_arg(ap)
  args = ap.parse_args(argv)
  apply_xla_flags(args.xla_flags)

  global jax, jnp  # pylint: disable=global-statement
  import jax  # pylint: disable=import-outside-toplevel,redefined-outer-name
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel,redefined-outer-name

  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from mmret_jax import convert  # pylint: disable=import-outside-toplevel

  transformers.utils.logging.disable_progress_bar()
  size = SIZES[args.size]
  vc = size["vision"]
  print_machine(machine_info(torch, xla_cpu_threads=f"{usable_cpus()} (one per usable core)"))
  gpu = jax.default_backend() == "gpu"
  tdev = torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")

  print(f"== model: CLIP vision ({args.size}: hidden {vc['hidden_size']}, {vc['num_hidden_layers']} layers, "
        f"{vc['num_attention_heads']} heads, FFN {vc['intermediate_size']}, image {vc['image_size']}, "
        f"patch {vc['patch_size']}, projection {size['projection_dim']}), random weights; "
        f"batch {args.batch_size}, jax dtype={args.dtype}")
  torch.manual_seed(args.seed)
  cfg = transformers.CLIPConfig(text_config=size["text"], vision_config=vc, projection_dim=size["projection_dim"])
  tmodel = transformers.CLIPModel(cfg).eval()
  print(f"  torch attn_implementation: {tmodel.config._attn_implementation}")  # pylint: disable=protected-access

  with tempfile.TemporaryDirectory() as tmp:
    tmodel.save_pretrained(tmp)
    meta, hf_config, params, _ = convert.load_any(tmp)
  tmodel = tmodel.to(tdev)
  n_vis = sum(p.numel() for p in tmodel.vision_model.parameters()) + tmodel.visual_projection.weight.numel()
  print(f"  vision tower + projection params: {n_vis / 1e6:.1f} M")

  rng = np.random.default_rng(args.seed)
  # Roughly CLIP-normalised pixel statistics.
  images_nhwc = rng.standard_normal((args.batch_size, vc["image_size"], vc["image_size"], vc["num_channels"]),
                                    dtype=np.float32)
  t_px = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))).to(tdev)

  # ---- PyTorch: eager get_image_features (transformers >= 5 returns an output whose pooler_output is
  # the projected feature; older versions return the tensor itself).
  def torch_step():
    with torch.inference_mode():
      out = tmodel.get_image_features(pixel_values=t_px)
      out = out if isinstance(out, torch.Tensor) else out.pooler_output
    if tdev.type == "cuda":
      torch.cuda.synchronize()
    return out

  # ---- JAX: jit of model.apply(..., method="get_image_features").
  def jax_forward(dtype: str):
    model = convert.build_model(meta, hf_config, dtype=jnp.dtype(dtype))
    return jax.jit(lambda p, x: model.apply({"params": p}, x, method="get_image_features"))

  j_params = jax.device_put(params)
  j_px = jnp.asarray(images_nhwc)
  dtypes = [args.dtype] + (["bfloat16"] if gpu and args.dtype != "bfloat16" else [])
  forwards = {d: jax_forward(d) for d in dtypes}

  def jax_step(fwd):
    return fwd(j_params, j_px).block_until_ready()

  print("== compile / warm-up")
  t0 = time.perf_counter()
  ref = torch_step().float().cpu().numpy()
  print(f"  torch first call: {time.perf_counter() - t0:.2f}s")
  jax_out = {}
  for d, fwd in forwards.items():
    t0 = time.perf_counter()
    jax_out[d] = np.asarray(jax_step(fwd), np.float32)
    print(f"  jax[{d}] compile + first call: {time.perf_counter() - t0:.2f}s")
  for _ in range(args.warmup):
    torch_step()
    for fwd in forwards.values():
      jax_step(fwd)

  print(f"== agreement (projected image features [{ref.shape[0]}, {ref.shape[1]}], unnormalised; "
        "PyTorch float32 is the reference)")
  scale = float(np.max(np.abs(ref)))
  for d, out in jax_out.items():
    diff = float(np.max(np.abs(out - ref)))
    cos = float(np.min(np.sum(out * ref, -1) / (np.linalg.norm(out, axis=-1) * np.linalg.norm(ref, axis=-1))))
    print(f"  jax[{d}] vs torch: max|diff| = {diff:.3e} (max|ref| = {scale:.3e}), min cosine = {cos:.6f}")
    tol = 1e-4 * max(1.0, scale) if d == "float32" else 5e-2 * max(1.0, scale)
    if diff > tol:
      print(f"  WARNING: max|diff| {diff:.3e} above {tol:.3g}", file=sys.stderr)

  print(f"== load check (max 1-minute load {args.max_load}, wait up to {args.max_wait:.0f}s)")
  wait_for_quiet(args.max_load, args.max_wait)

  print(f"== timing: {args.repeats} repeats x {args.iters} batches each")
  times = {"torch": [], **{f"jax[{d}]": [] for d in forwards}}
  for r in range(args.repeats):
    times["torch"].append(time_calls(torch_step, args.iters))
    time.sleep(0.2)  # let idle OpenMP / Eigen workers stop spinning before the other side runs
    for d, fwd in forwards.items():
      times[f"jax[{d}]"].append(time_calls(lambda fwd=fwd: jax_step(fwd), args.iters))
      time.sleep(0.2)
    print("  repeat %d: %s" % (r + 1, ", ".join(f"{k} {v[-1] * 1e3:.0f} ms/batch" for k, v in times.items())))
  print(f"  uptime after timing: {uptime_line()}")

  print("== results (median seconds per batch -> images/s)")
  ips = {}
  for k, v in times.items():
    med = statistics.median(v)
    ips[k] = args.batch_size / med
    print(f"  {k:16s} {med * 1e3:9.1f} ms/batch  {ips[k]:9.2f} images/s   "
          f"(repeats: {', '.join(f'{x * 1e3:.0f}' for x in v)} ms)")
  for d in forwards:
    print(f"  ratio JAX[{d}]/PyTorch[float32, {tdev.type}]: {ips[f'jax[{d}]'] / ips['torch']:.3f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
