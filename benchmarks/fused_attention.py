"""The fused attention kernel on a GPU: agreement with XLA attention in bf16, and its speed.

    python benchmarks/fused_attention.py                       # roberta-base attention, 768 x 64
    python benchmarks/fused_attention.py --batch 64 --seq 128

Compiles mmret_jax.models.fused_attention through Triton (what CPU tests cannot do: there the
kernels run in the Pallas interpreter), checks forward and q/k/v gradients against the XLA path
(`layers.dot_product_attention(implementation="xla")`) under the same dropout keep mask, both on
bf16 inputs, as relative L2 error against a float32 reference, and times forward + backward of both.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  ap.add_argument("--batch", type=int, default=768, help="sequences")
  ap.add_argument("--seq", type=int, default=64)
  ap.add_argument("--heads", type=int, default=12)
  ap.add_argument("--head-dim", type=int, default=64)
  ap.add_argument("--rate", type=float, default=0.1)
  ap.add_argument("--iters", type=int, default=50)
  ap.add_argument("--interpret", action="store_true", help="Pallas interpreter (a CPU smoke run)")
  args = ap.parse_args(argv)

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from mmret_jax.models import fused_attention as fa  # pylint: disable=import-outside-toplevel

  b, l, n, h, rate = args.batch, args.seq, args.heads, args.head_dim, args.rate
  print(f"== {jax.devices()[0].device_kind}, jax {jax.__version__}; q/k/v [{b}, {l}, {n}, {h}] bf16, "
        f"dropout {rate}")
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(b, l, n, h)), jnp.bfloat16) for _ in range(3))
  lengths = rng.integers(l // 4, l + 1, size=b)
  key_mask = jnp.asarray(np.arange(l)[None, :] < lengths[:, None]).astype(jnp.int32)
  cot = jnp.asarray(rng.normal(size=(b, l, n, h)), jnp.bfloat16)
  seed = jnp.uint32(99)
  keys = fa.head_keys(seed, b, n)

  def xla(q, k, v, dtype):
    qt, kt, vt = (x.astype(dtype).transpose(0, 2, 1, 3) for x in (q, k, v))
    s = jnp.einsum("bnlh,bnsh->bnls", qt, kt).astype(jnp.float32) * h ** -0.5
    s = jnp.where(key_mask[:, None, None, :] != 0, s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, -1)
    if rate > 0:
      p = jnp.where(fa.keep_mask(keys, l, l, rate), p / (1 - rate), 0.0)
    return jnp.einsum("bnls,bnsh->bnlh", p.astype(dtype), vt,
                      precision=jax.lax.Precision.HIGHEST).transpose(0, 2, 1, 3)

  fused = lambda q, k, v: fa.fused_attention(q, k, v, key_mask, dropout_rate=rate, dropout_seed=seed,
                                                 interpret=args.interpret)
  fwd_bwd = lambda f: jax.jit(lambda q, k, v: jax.vjp(lambda *a: f(*a).astype(jnp.float32), q, k, v)[1](
      cot.astype(jnp.float32)))
  ref = jax.jit(lambda q, k, v: xla(q, k, v, jnp.float32))(q, k, v)
  ref_g = fwd_bwd(lambda *a: xla(*a, jnp.float32))(q, k, v)
  rel = lambda a, r: float(jnp.linalg.norm(a.astype(jnp.float32) - r) / jnp.linalg.norm(r))
  results = {}
  for name, f in (("fused", fused), ("xla_bf16", lambda *a: xla(*a, jnp.bfloat16))):
    out = jax.jit(f)(q, k, v)
    grads = fwd_bwd(f)(q, k, v)
    errs = [rel(out, ref)] + [rel(g, r) for g, r in zip(grads, ref_g)]
    step = fwd_bwd(f)
    jax.block_until_ready(step(q, k, v))
    times = []
    for _ in range(args.iters):
      t0 = time.perf_counter()
      jax.block_until_ready(step(q, k, v))
      times.append(time.perf_counter() - t0)
    results[name] = statistics.median(times)
    print(f"  {name:9s} rel. L2 error vs float32: out {errs[0]:.2e}, dq {errs[1]:.2e}, dk {errs[2]:.2e}, "
          f"dv {errs[3]:.2e}; forward+backward {results[name] * 1e3:.3f} ms (median of {args.iters})")
    if not all(e < 2e-2 for e in errs) or not all(np.isfinite(errs)):
      print(f"FAILED: {name} errors {errs}")
      return 1
  print(f"  speed-up fused / xla: {results['xla_bf16'] / results['fused']:.2f}x")
  return 0


if __name__ == "__main__":
  sys.exit(main())
