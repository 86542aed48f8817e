"""Exact top-k search: on-device JAX (`retrieval.topk_sharded`) vs faiss-cpu `IndexFlatIP`, same run.

    python benchmarks/topk.py                                  # 1M x 768 pool, 1,000 queries, k = 50
    python benchmarks/topk.py --num-candidates 20000 --repeats 1   # quick check

The M-BEIR pipeline's two backends (`python -m mmret_jax.eval.mbeir --backend jax|faiss`) on a random
pool: N unit-normalised float32 candidates (standard normal rows, L2-normalised) and Q unit queries
drawn the same way, k nearest by inner product.

Timed (wall clock, median of `--repeats`, faiss and JAX interleaved):
  jax:   `topk_sharded` over a `device_pool` (the pool in device memory, split over the local
         devices; per device a full-float32 matmul + `lax.top_k`, then a merge), queries in batches
         of at most 2^28 / rows-per-device; compile (first call) excluded and reported apart.
  faiss: `IndexFlatIP.search(queries, k)` (exact; BLAS sgemm + heaps), faiss's OpenMP threads.
Building the pools (generation, faiss `add`, device upload) is not timed.

Agreement: identical rankings per query are counted; a query whose two lists differ is checked
against float64 scores of the listed rows: the lists "agree up to ties" when their float64 score
sequences match within `retrieval.score_tolerance(D)` (float32 rounding reorders near-equal scores).
With `--check-exact` (default on) both backends are also run through `retrieval.topk_exact`, the
pipeline's tie rule, whose rankings must be identical.

Memory: the pool is generated in blocks; faiss holds one float32 copy (N * D * 4 bytes) and the JAX
device pool another (on a CPU backend also host memory): ~6.3 GB at the default size, plus a
[batch, N] float32 score block on the device (1 GiB).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=wrong-import-position

from bench_common import (  # pylint: disable=wrong-import-position
    add_xla_flags_arg, apply_xla_flags, load_average, machine_info, print_machine, rss_gb)


def wait_for_quiet(max_load: float, max_wait: float, poll: float = 30.0) -> float:
  """Sleeps while the 1-minute load exceeds `max_load` (at most `max_wait` s); returns seconds waited."""
  t0 = time.monotonic()
  while os.getloadavg()[0] > max_load and time.monotonic() - t0 < max_wait:
    print(f"  load {load_average()} above {max_load}; waiting", flush=True)
    time.sleep(poll)
  return time.monotonic() - t0


def unit_rows(rng, n: int, d: int) -> np.ndarray:
  x = rng.standard_normal((n, d), dtype=np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--num-candidates", type=int, default=1_000_000)
  ap.add_argument("--num-queries", type=int, default=1000)
  ap.add_argument("--dim", type=int, default=768)
  ap.add_argument("--k", type=int, default=50)
  ap.add_argument("--repeats", type=int, default=3, help="timed searches per backend (median reported)")
  ap.add_argument("--block-rows", type=int, default=65536, help="pool rows generated / uploaded at once")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--check-exact", action=argparse.BooleanOptionalAction, default=True,
                  help="also compare the pipeline's exact tie rule (topk_exact) on both backends")
  ap.add_argument("--max-load", type=float, default=1.5, help="wait while the 1-minute load is above this")
  ap.add_argument("--max-wait", type=float, default=600.0)
  add_xla_flags_arg(ap)
  args = ap.parse_args(argv)
  apply_xla_flags(args.xla_flags)

  import faiss  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel  # only for machine_info's versions
  from mmret_jax.eval import retrieval  # pylint: disable=import-outside-toplevel

  info = machine_info(torch, faiss=faiss.__version__, faiss_omp_threads=faiss.omp_get_max_threads())
  print_machine(info)
  n, d, nq, k = args.num_candidates, args.dim, args.num_queries, args.k
  print(f"== problem: {n} candidates x {d}, {nq} queries, k = {k}, float32, unit rows (seed {args.seed})")

  rng = np.random.default_rng(args.seed)
  queries = unit_rows(rng, nq, d)
  index = faiss.IndexFlatIP(d)
  t0 = time.perf_counter()

  def blocks():
    for s in range(0, n, args.block_rows):
      x = unit_rows(rng, min(args.block_rows, n - s), d)
      index.add(x)
      yield x

  pool = retrieval.device_pool(blocks(), n, d)
  jax.block_until_ready(pool.docs)
  print(f"  pools built in {time.perf_counter() - t0:.1f} s (faiss ntotal {index.ntotal}; device pool "
        f"{pool.docs.shape} over {pool.mesh.devices.size} device(s)); {rss_gb()}")

  t0 = time.perf_counter()
  retrieval.topk_sharded(queries, pool, k)
  compile_s = time.perf_counter() - t0
  print(f"  jax first call (compile + run): {compile_s:.2f} s")

  waited = wait_for_quiet(args.max_load, args.max_wait)
  print(f"== timing (load before: {load_average()}, waited {waited:.0f} s)")
  times = {"faiss": [], "jax": []}
  res = {}
  for r in range(args.repeats):
    t0 = time.perf_counter()
    res["faiss"] = index.search(queries, k)
    times["faiss"].append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    res["jax"] = retrieval.topk_sharded(queries, pool, k)
    times["jax"].append(time.perf_counter() - t0)
    print(f"  repeat {r + 1}: faiss {times['faiss'][-1]:.2f} s, jax {times['jax'][-1]:.2f} s "
          f"[load {os.getloadavg()[0]:.2f}]", flush=True)
  med = {b: statistics.median(t) for b, t in times.items()}
  gflop = 2.0 * n * d * nq / 1e9

  (fs, fi), (js, ji) = res["faiss"], res["jax"]
  gather = lambda rows: index.reconstruct_batch(np.asarray(rows, np.int64))
  same = (fi == ji).all(1)
  tol = retrieval.score_tolerance(d)
  tie_only = bad = 0
  for q in np.flatnonzero(~same):
    a = retrieval.exact_scores(queries[q:q + 1], gather(fi[q])[None])[0]
    b = retrieval.exact_scores(queries[q:q + 1], gather(ji[q])[None])[0]
    if np.abs(np.sort(a)[::-1] - np.sort(b)[::-1]).max() <= tol and np.abs(a - b).max() <= tol:
      tie_only += 1
    else:
      bad += 1
  print(f"== agreement: {int(same.sum())} of {nq} rankings identical; {tie_only} differ only among scores within "
        f"{tol:.1e} (float32 near-ties); {bad} real disagreements; max |score diff| of identical rows "
        f"{float(np.abs(fs[same] - js[same]).max()) if same.any() else 0.0:.2e}")
  if args.check_exact:
    t0 = time.perf_counter()
    ef = retrieval.topk_exact(retrieval.FaissSearcher(_IdIndex(index), np.arange(n)),
                              gather, queries, k, n)
    tf = time.perf_counter() - t0
    t0 = time.perf_counter()
    ej = retrieval.topk_exact(retrieval.DeviceSearcher(pool), gather, queries, k, n)
    tj = time.perf_counter() - t0
    print(f"== topk_exact (pipeline tie rule): rankings identical: {bool((ef[1] == ej[1]).all())}, scores identical: "
          f"{bool((ef[0] == ej[0]).all())} (faiss {tf:.2f} s, jax {tj:.2f} s incl. re-scoring)")
  print("== result")
  print(f"  faiss IndexFlatIP: {med['faiss']:.2f} s ({gflop / med['faiss']:.0f} GFLOP/s)")
  print(f"  jax topk_sharded:  {med['jax']:.2f} s ({gflop / med['jax']:.0f} GFLOP/s); compile {compile_s:.2f} s")
  print(f"  ratio faiss / jax: {med['faiss'] / med['jax']:.2f}x  ({'jax' if med['jax'] < med['faiss'] else 'faiss'} "
        "faster)")
  print(f"  load average at end: {load_average()}; {rss_gb()}")
  return 0 if bad == 0 else 1


class _IdIndex:
  """An IndexFlatIP seen through the FaissSearcher interface (row = faiss id)."""

  def __init__(self, index):
    self.index, self.ntotal = index, index.ntotal

  def search(self, q, k):
    return self.index.search(q, k)


if __name__ == "__main__":
  sys.exit(main())
