"""BagFormer first-stage scoring: `eval.late_interaction.first_stage_scores` vs the seed's torch loops, same CPU.

    python benchmarks/late_interaction.py                          # 1,000 queries x 500 images (a subset, ~5 min)
    python benchmarks/late_interaction.py --images 30000           # the full size (hours for the seed's loops)

Problem (MUGE valid settings, shared/reference/bagformer.md §5): Q queries x 25 bags x 256 and N images x
257 tokens x 256, float32, random unit rows (standard normal, L2-normalised), ~30% of the bags zeroed
(masked; each query keeps its first bag). Both sides compute both score matrices:
  s_t2i [Q, N] = sum_k max_p <T_q,k, V_n,p>,  s_i2t [N, Q] = sum_p max_k <V_n,p, T_q,k>.
  ours:  `first_stage_scores` (jitted [bt, bi] blocks, one GEMM per block for both directions; block sizes
         from the default memory budget unless --text-block / --image-block / --memory-budget).
  torch: the seed's `tokenwise_similarity_martix` formulas (one batched matmul per image row, then one per
         query row, `max`/`sum`, under `torch.no_grad()`), written here; torch.set_num_threads(cores).
The full size is 1,000 queries x 30,000 images (the MUGE valid pool; the seed's MUGE valid run scores
~5k queries). Both costs are linear in Q and N, so the full-size seconds printed are EXTRAPOLATED linearly
from the measured subset, not measured.

Each side runs in its own subprocess (same generated data, same seed): wall clock of one call (ours:
compile excluded by a warm-up on the first query block against the whole pool; the pool is generated and
written to the device chunk by chunk before timing, that time is printed apart). Memory: `resource.getrusage`
ru_maxrss of each worker (process lifetime peak: Python + framework + the input features; the pool is held
once on each side) and the peak RSS sampled with psutil
every 10 ms during the timed call, minus the RSS just before it (the scoring's own working memory,
outputs included). Agreement: max |diff| of both matrices, ours vs torch, on the measured subset.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=wrong-import-position

from bench_common import (  # pylint: disable=wrong-import-position
    add_xla_flags_arg, apply_xla_flags, load_average, machine_info, print_machine, usable_cpus)

FULL_QUERIES, FULL_IMAGES = 1000, 30000  # the full size (MUGE valid pool)
MUGE_QUERIES = 5000
CHUNK = 250  # pool rows generated at once


def features(args):
  """(text bags [Q, K, E] float32, generator of image-token chunks [<=CHUNK, P, E] float32), deterministic
  in `args.seed`; the pool is made in chunks so that no side ever holds a second pool-sized copy."""
  rng = np.random.default_rng(args.seed)
  texts = rng.standard_normal((args.queries, args.bags, args.dim), dtype=np.float32)
  texts /= np.linalg.norm(texts, axis=-1, keepdims=True)
  keep = rng.random((args.queries, args.bags)) >= args.masked_fraction
  keep[:, 0] = True
  texts *= keep[..., None]

  def chunks():
    for s in range(0, args.images, CHUNK):
      x = rng.standard_normal((min(CHUNK, args.images - s), args.tokens, args.dim), dtype=np.float32)
      x /= np.linalg.norm(x, axis=-1, keepdims=True)
      yield s, x
  return texts, chunks()


class PeakRss:
  """Samples this process's RSS every `interval` s in a thread; `.peak` bytes."""

  def __init__(self, interval: float = 0.01):
    import psutil  # pylint: disable=import-outside-toplevel
    self._proc, self._interval, self._stop = psutil.Process(), interval, threading.Event()
    self.start_rss = self.peak = self._proc.memory_info().rss
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, self._proc.memory_info().rss)
      time.sleep(self._interval)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, self._proc.memory_info().rss)


def maxrss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def seed_style_matrices(torch, text_feats, image_feats):
  """The seed's eval formulas, one row at a time: (sim_i2t [N, Q], sim_t2i [Q, N])."""
  def row(q, d):  # q [L, E] against d [M, L', E] -> [M]
    return (q @ d.permute(0, 2, 1)).max(2).values.sum(1)
  nt, ni = text_feats.shape[0], image_feats.shape[0]
  sim_i2t = torch.zeros((ni, nt))
  for i in range(ni):
    sim_i2t[i] = row(image_feats[i], text_feats)
  sim_t2i = torch.zeros((nt, ni))
  for t in range(nt):
    sim_t2i[t] = row(text_feats[t], image_feats)
  return sim_i2t, sim_t2i


def worker_ours(args, out: pathlib.Path) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  from mmret_jax.eval import late_interaction as li  # pylint: disable=import-outside-toplevel
  bt, bi = li.block_sizes(args.queries, args.images, args.bags, args.tokens, text_block=args.text_block,
                          image_block=args.image_block, memory_budget_bytes=args.memory_budget)
  texts, chunks = features(args)
  write = jax.jit(lambda buf, x, s: jax.lax.dynamic_update_slice_in_dim(buf, x, s, 0), donate_argnums=0)
  t0 = time.perf_counter()
  txt = jax.device_put(texts)
  img = jax.numpy.zeros((args.images, args.tokens, args.dim), jax.numpy.float32)
  for s, x in chunks:  # the pool is written into device memory chunk by chunk (on CPU: host memory, once)
    img = write(img, x, s)
  jax.block_until_ready((txt, img))
  put_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  li.first_stage_scores(txt[:bt], img, text_block=bt, image_block=bi, progress=False)  # compiles the row program
  warm_s = time.perf_counter() - t0
  with PeakRss() as mem:
    t0 = time.perf_counter()
    s_t2i, s_i2t = li.first_stage_scores(txt, img, text_block=bt, image_block=bi, progress=False)
    seconds = time.perf_counter() - t0
  np.save(out / "ours_t2i.npy", s_t2i)
  np.save(out / "ours_i2t.npy", s_i2t)
  return dict(side="ours", seconds=seconds, warmup_s=warm_s, device_put_s=put_s, text_block=bt, image_block=bi,
              rss_before=mem.start_rss, peak_rss_during=mem.peak, maxrss=maxrss_bytes(),
              jax_backend=jax.default_backend())


def worker_torch(args, out: pathlib.Path) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(usable_cpus())
  texts, chunks = features(args)
  images = np.empty((args.images, args.tokens, args.dim), np.float32)
  for s, x in chunks:
    images[s:s + len(x)] = x
  t, v = torch.from_numpy(texts), torch.from_numpy(images)
  with torch.no_grad():
    seed_style_matrices(torch, t[:2], v[:2])  # thread pools up
    with PeakRss() as mem:
      t0 = time.perf_counter()
      s_i2t, s_t2i = seed_style_matrices(torch, t, v)
      seconds = time.perf_counter() - t0
  np.save(out / "torch_t2i.npy", s_t2i.numpy())
  np.save(out / "torch_i2t.npy", s_i2t.numpy())
  return dict(side="torch", seconds=seconds, rss_before=mem.start_rss, peak_rss_during=mem.peak,
              maxrss=maxrss_bytes(), torch_threads=torch.get_num_threads())


def wait_for_quiet(max_load: float, max_wait: float, poll: float = 30.0) -> float:
  t0 = time.monotonic()
  while os.getloadavg()[0] > max_load and time.monotonic() - t0 < max_wait:
    print(f"  load {load_average()} above {max_load}; waiting", flush=True)
    time.sleep(poll)
  return time.monotonic() - t0


def gb(x: float) -> str:
  return f"{x / 2**30:.2f} GB"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--queries", type=int, default=1000)
  ap.add_argument("--images", type=int, default=500)
  ap.add_argument("--bags", type=int, default=25)
  ap.add_argument("--tokens", type=int, default=257)
  ap.add_argument("--dim", type=int, default=256)
  ap.add_argument("--masked-fraction", type=float, default=0.3)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--full-queries", type=int, default=FULL_QUERIES, help="size the timings are extrapolated to")
  ap.add_argument("--full-images", type=int, default=FULL_IMAGES)
  ap.add_argument("--text-block", type=int, default=None)
  ap.add_argument("--image-block", type=int, default=None)
  ap.add_argument("--memory-budget", type=int, default=None, help="bytes per block (default: the module's)")
  ap.add_argument("--rounds", type=int, default=1, help="ours / torch pairs, interleaved")
  ap.add_argument("--max-load", type=float, default=1.5, help="wait while the 1-minute load is above this")
  ap.add_argument("--max-wait", type=float, default=300.0)
  ap.add_argument("--worker", choices=("ours", "torch"), default=None, help=argparse.SUPPRESS)
  ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
  add_xla_flags_arg(ap)
  args = ap.parse_args(argv)
  apply_xla_flags(args.xla_flags)
  if min(args.queries, args.images, args.bags, args.tokens, args.dim) < 1:
    raise ValueError("--queries, --images, --bags, --tokens and --dim must be >= 1")

  if args.worker:
    fn = worker_ours if args.worker == "ours" else worker_torch
    print("RESULT " + json.dumps(fn(args, pathlib.Path(args.out))), flush=True)
    return 0

  import torch  # pylint: disable=import-outside-toplevel  # versions only; workers do the work
  print_machine(machine_info(torch, start_jax=False))
  q, n, k, p, e = args.queries, args.images, args.bags, args.tokens, args.dim
  print(f"== problem: {q} queries x {k} bags x {e} vs {n} images x {p} tokens x {e}, float32, "
        f"{args.masked_fraction:.0%} bags zeroed (seed {args.seed})")
  forwarded = [f"--{name}={getattr(args, name.replace('-', '_'))}" for name in
               ("queries", "images", "bags", "tokens", "dim", "masked-fraction", "seed")]
  forwarded += [f"--{name}={getattr(args, name.replace('-', '_'))}" for name in
                ("text-block", "image-block", "memory-budget") if getattr(args, name.replace("-", "_")) is not None]
  results = {"ours": [], "torch": []}
  with tempfile.TemporaryDirectory(prefix="late_interaction_") as tmp:
    for r in range(args.rounds):
      for side in ("ours", "torch"):
        waited = wait_for_quiet(args.max_load, args.max_wait)
        load0 = load_average()
        cmd = [sys.executable, __file__, *forwarded, "--worker", side, "--out", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
          print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
          raise RuntimeError(f"the {side} worker failed (exit {proc.returncode})")
        res = json.loads(lines[-1][len("RESULT "):])
        res.update(load_before=load0, load_after=load_average(), waited_s=round(waited))
        results[side].append(res)
        extra = ""
        if side == "ours":
          extra = (f", warm-up (compile + 1 block row) {res['warmup_s']:.1f} s, pool generated + written to device "
                   f"{res['device_put_s']:.1f} s, blocks {res['text_block']} x {res['image_block']}")
        print(f"  round {r + 1} {side}: {res['seconds']:.1f} s [load {load0} -> {res['load_after']}, waited "
              f"{res['waited_s']} s]{extra}", flush=True)
    d_t2i = np.abs(np.load(f"{tmp}/ours_t2i.npy").astype(np.float64) - np.load(f"{tmp}/torch_t2i.npy")).max()
    ref_i2t = np.load(f"{tmp}/torch_i2t.npy")
    d_i2t = np.abs(np.load(f"{tmp}/ours_i2t.npy").astype(np.float64) - ref_i2t).max()
    print(f"== agreement: max |diff| s_t2i {d_t2i:.2e}, s_i2t {d_i2t:.2e} (max |s_i2t| {np.abs(ref_i2t).max():.1f})")

  best = {s: min(results[s], key=lambda x: x["seconds"]) for s in results}
  macs = q * k * n * p * e
  print("== result (best of rounds)")
  for side, label, flops in (("torch", "torch seed loops", 4 * macs), ("ours", "ours first_stage_scores", 2 * macs)):
    res = best[side]
    print(f"  {label}: {res['seconds']:.1f} s ({flops / res['seconds'] / 1e9:.0f} GFLOP/s of its {flops / 1e12:.2f} "
          f"TFLOP); peak RSS {gb(res['maxrss'])} (ru_maxrss), during the call "
          f"+{gb(res['peak_rss_during'] - res['rss_before'])} "
          f"over {gb(res['rss_before'])} (psutil, 10 ms)")
  ratio = best["torch"]["seconds"] / best["ours"]["seconds"]
  print(f"  ratio torch / ours: {ratio:.2f}x")
  for fq, fn, what in ((args.full_queries, args.full_images, "the full size asked for"),
                       (MUGE_QUERIES, FULL_IMAGES, "MUGE valid, ~5k queries")):
    scale = (fq / q) * (fn / n)
    print(f"  EXTRAPOLATED, not measured (linear in queries and images, x{scale:.1f}) to {fq} x {fn} ({what}): "
          f"torch {best['torch']['seconds'] * scale:.0f} s, ours {best['ours']['seconds'] * scale:.0f} s")
  print(f"  load average at end: {load_average()}")
  return 0 if max(d_t2i, d_i2t) <= 1e-3 else 1


if __name__ == "__main__":
  sys.exit(main())
