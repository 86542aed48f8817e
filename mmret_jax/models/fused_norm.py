"""Fused `LayerNorm(dropout(y + bias) + residual)` for post-LN blocks on GPU: Pallas (Triton) kernels.

BERT's `BertSelfOutput` / `BertOutput` add the dense bias, drop out, add the residual and normalise.
Under XLA that is several passes over activation-sized tensors forward, and backward the LayerNorm
gradient was recomputed inside each of its consumers (the dropout gradient, the residual sum) with a
float32 product materialised for the scale gradient (benchmarks/RESULTS.md, GPU profile). Here one
forward kernel reads y and the residual once and writes the output and the pre-norm sum h; one
backward kernel reads the output gradient and h once and writes the residual's gradient, y's
gradient (dropout applied) and per-row-block partial sums for the LayerNorm scale / bias and the
dense bias gradients. The dropout mask is `layers.dropout`'s index hash, recomputed in both kernels
(nothing mask-sized is stored), so the fused and the unfused paths draw identical masks.

Rows are blocks of `_ROWS` tokens; the hidden size D is read as C chunks of W (W the largest power of
two dividing D, at most 256: Triton blocks are powers of two), e.g. 768 = 3 x 256.
`layers.ResidualPostLN` uses these kernels with `implementation="fused"` (or "fused_interpret", the
Pallas interpreter, for tests); the default stays XLA until the kernels are timed on a GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mmret_jax.models import layers, pallas_util

Array = jax.Array

_ROWS = 8          # rows per program
_MAX_CHUNK = 256   # widest column block


def chunking(d: int) -> tuple[int, int] | None:
  """(C, W) with D = C * W, W a power of two in [16, 256]; None when D has no such split."""
  w = min(d & -d, _MAX_CHUNK)
  return (d // w, w) if w >= 16 else None


def supported(y: Array) -> bool:
  """[..., D] 16-bit activations the kernels take (D a multiple of 16)."""
  return y.ndim >= 2 and chunking(y.shape[-1]) is not None and y.dtype in (jnp.bfloat16, jnp.float16)


def _rows_per_block(m: int) -> int:
  r = _ROWS
  while m % r:
    r //= 2
  return r


def _keep(seed_ref, row0, shape: tuple[int, int], col0: int, d: int, rate: float) -> Array:
  """`layers.dropout`'s keep mask for rows row0.. and columns col0.. of this shard's [M, D] rows;
  seed_ref holds (key, the shard's first global row)."""
  rows = (seed_ref[1] + row0 + jax.lax.broadcasted_iota(jnp.uint32, shape, 0))
  cols = col0 + jax.lax.broadcasted_iota(jnp.uint32, shape, 1)
  return layers.hash_keep(rows * jnp.uint32(d) + cols, seed_ref[0], rate)


def _row_stats(h: list[Array], d: int, eps: float) -> tuple[Array, Array]:
  """(mean, rstd) [R, 1] over the chunks, float32, two-pass variance (as `layers.layer_norm`)."""
  mean = sum(x.sum(axis=1, keepdims=True) for x in h) / d
  var = sum(jnp.square(x - mean).sum(axis=1, keepdims=True) for x in h) / d
  return mean, jax.lax.rsqrt(var + eps)


# ----------------------------------------------------------------------------- kernels
def _fwd_kernel(seed_ref, *refs, c, w, rate, eps):
  from jax.experimental import pallas as pl  # pylint: disable=import-outside-toplevel
  y_refs, r_refs = refs[:c], refs[c:2 * c]
  b_refs, g_refs, beta_refs = refs[2 * c:3 * c], refs[3 * c:4 * c], refs[4 * c:5 * c]
  out_ref, h_ref, mean_ref, rstd_ref = refs[5 * c:]
  rows = y_refs[0].shape[0]
  row0 = pl.program_id(0) * rows
  hs = []
  for j in range(c):
    t = y_refs[j][...] + b_refs[j][...][None, :]  # the dense bias, in the compute dtype
    if rate > 0:
      scaled = (t.astype(jnp.float32) * (1.0 / (1.0 - rate))).astype(t.dtype)
      t = jnp.where(_keep(seed_ref, row0, t.shape, j * w, c * w, rate), scaled, jnp.zeros((), t.dtype))
    h = t + r_refs[j][...]
    h_ref[pl.ds(row0, rows), j, :] = h
    hs.append(h.astype(jnp.float32))
  mean, rstd = _row_stats(hs, c * w, eps)
  mean_ref[...] = mean[:, 0]
  rstd_ref[...] = rstd[:, 0]
  for j in range(c):
    out = (hs[j] - mean) * rstd * g_refs[j][...].astype(jnp.float32)[None, :] \
        + beta_refs[j][...].astype(jnp.float32)[None, :]
    out_ref[pl.ds(row0, rows), j, :] = out.astype(out_ref.dtype)


def _bwd_kernel(seed_ref, *refs, c, w, rate):
  from jax.experimental import pallas as pl  # pylint: disable=import-outside-toplevel
  do_refs, h_refs, g_refs = refs[:c], refs[c:2 * c], refs[2 * c:3 * c]
  mean_ref, rstd_ref = refs[3 * c:3 * c + 2]
  dr_ref, dy_ref, dscale_ref, dbeta_ref, dbias_ref = refs[3 * c + 2:]
  rows = do_refs[0].shape[0]
  i = pl.program_id(0)
  row0 = i * rows
  mean, rstd = mean_ref[...][:, None], rstd_ref[...][:, None]
  xhat = [(h_refs[j][...].astype(jnp.float32) - mean) * rstd for j in range(c)]
  gs = [do_refs[j][...].astype(jnp.float32) for j in range(c)]
  dxhat = [gs[j] * g_refs[j][...].astype(jnp.float32)[None, :] for j in range(c)]
  d = c * w
  mean_dxhat = sum(x.sum(axis=1, keepdims=True) for x in dxhat) / d
  mean_dxhat_xhat = sum((x * xh).sum(axis=1, keepdims=True) for x, xh in zip(dxhat, xhat)) / d
  for j in range(c):
    dz = (rstd * (dxhat[j] - mean_dxhat - xhat[j] * mean_dxhat_xhat)).astype(dr_ref.dtype)
    dr_ref[pl.ds(row0, rows), j, :] = dz
    dy = dz
    if rate > 0:
      scaled = (dz.astype(jnp.float32) * (1.0 / (1.0 - rate))).astype(dz.dtype)
      dy = jnp.where(_keep(seed_ref, row0, dz.shape, j * w, d, rate), scaled, jnp.zeros((), dz.dtype))
    dy_ref[pl.ds(row0, rows), j, :] = dy
    dscale_ref[i, j, :] = (gs[j] * xhat[j]).sum(axis=0)
    dbeta_ref[i, j, :] = gs[j].sum(axis=0)
    dbias_ref[i, j, :] = dy.astype(jnp.float32).sum(axis=0)


# ----------------------------------------------------------------------------- calls
def _chunk_specs(rows: int, c: int, w: int):
  from jax.experimental import pallas as pl  # pylint: disable=import-outside-toplevel
  act_map = lambda j: (lambda i: (i, j, 0))
  vec_map = lambda j: (lambda i: (j, 0))
  act = [pl.BlockSpec((rows, None, w), act_map(j)) for j in range(c)]
  vec = [pl.BlockSpec((None, w), vec_map(j)) for j in range(c)]
  return dict(act=act, vec=vec, row=pl.BlockSpec((rows,), lambda i: (i,)),
              seed=pl.BlockSpec((None, 2), lambda i: (0, 0)), whole=pl.BlockSpec(memory_space=pl.ANY))


def _layout(m: int, d: int):
  """(C, W, rows per program, block specs) for [M, D] activations."""
  c, w = chunking(d)
  rows = _rows_per_block(m)
  return c, w, rows, _chunk_specs(rows, c, w)


def _forward(seed, y, bias, r, scale, beta, rate, eps, interpret):
  """seed [1, 2] (key, first row), y, r [M, D] -> (out [M, D], h [M, D], mean [M], rstd [M])."""
  from jax.experimental import pallas as pl  # pylint: disable=import-outside-toplevel
  m, d = y.shape
  c, w, rows, sp = _layout(m, d)
  cw = lambda x: x.reshape(m, c, w)
  vec = lambda x: x.reshape(c, w)
  out, h, mean, rstd = pl.pallas_call(
      functools.partial(_fwd_kernel, c=c, w=w, rate=rate, eps=eps),
      grid=(m // rows,),
      in_specs=[sp["seed"]] + sp["act"] * 2 + sp["vec"] * 3,
      out_specs=[sp["whole"], sp["whole"], sp["row"], sp["row"]],
      out_shape=[jax.ShapeDtypeStruct((m, c, w), y.dtype), jax.ShapeDtypeStruct((m, c, w), y.dtype),
                 jax.ShapeDtypeStruct((m,), jnp.float32), jax.ShapeDtypeStruct((m,), jnp.float32)],
      compiler_params=pallas_util.compiler_params(interpret), interpret=interpret, name="fused_residual_ln_fwd",
  )(seed, *[cw(y)] * c, *[cw(r)] * c, *[vec(bias)] * c, *[vec(scale)] * c, *[vec(beta)] * c)
  return out.reshape(m, d), h.reshape(m, d), mean, rstd


def _backward(seed, do, h, scale, mean, rstd, rate, interpret):
  """-> (d residual [M, D], d y [M, D], partial d scale, d beta, d bias [blocks, D] float32)."""
  from jax.experimental import pallas as pl  # pylint: disable=import-outside-toplevel
  m, d = h.shape
  c, w, rows, sp = _layout(m, d)
  blocks = m // rows
  act = jax.ShapeDtypeStruct((m, c, w), h.dtype)
  part = jax.ShapeDtypeStruct((blocks, c, w), jnp.float32)
  outs = pl.pallas_call(
      functools.partial(_bwd_kernel, c=c, w=w, rate=rate),
      grid=(blocks,),
      in_specs=[sp["seed"]] + sp["act"] * 2 + sp["vec"] + [sp["row"], sp["row"]],
      out_specs=[sp["whole"]] * 5,
      out_shape=[act, act, part, part, part],
      compiler_params=pallas_util.compiler_params(interpret), interpret=interpret, name="fused_residual_ln_bwd",
  )(seed, *[do.reshape(m, c, w)] * c, *[h.reshape(m, c, w)] * c, *[scale.reshape(c, w)] * c,
    mean, rstd)
  return tuple(x.reshape(x.shape[0], d) for x in outs)


def _seeds(key: Array, m: int, shards: int) -> Array:
  """uint32 [shards, 2]: the dropout key and each row shard's first global row."""
  first = jnp.arange(shards, dtype=jnp.uint32) * jnp.uint32(m // shards)
  return jnp.stack([jnp.broadcast_to(key, (shards,)), first], axis=1)


def _sharded(fn, m: int, in_specs: tuple[str, ...], out_specs: tuple[str, ...]):
  """`fn` (seeds first) per row shard under a multi-device mesh; rows split like the batch."""
  return pallas_util.shard_kernel(fn, ("b.",) + in_specs, out_specs, {"b": m})


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _fused(y, bias, r, scale, beta, key, rate, eps, interpret):
  return _fused_fwd(y, bias, r, scale, beta, key, rate, eps, interpret)[0]


def _fused_fwd(y, bias, r, scale, beta, key, rate, eps, interpret):
  m = y.shape[0]
  fwd = lambda seed, *a: _forward(seed, *a, rate=rate, eps=eps, interpret=interpret)
  seeds = _seeds(key, m, pallas_util.shard_count({"b": m}, "b"))
  out, h, mean, rstd = _sharded(fwd, m, ("b.", ".", "b.", ".", "."), ("b.", "b.", "b", "b"))(
      seeds, y, bias, r, scale, beta)
  return out, (h, scale, beta, bias, mean, rstd, seeds)


def _fused_bwd(rate, eps, interpret, res, do):
  del eps
  h, scale, beta, bias, mean, rstd, seeds = res
  bwd = lambda seed, *a: _backward(seed, *a, rate=rate, interpret=interpret)
  dr, dy, dscale, dbeta, dbias = _sharded(bwd, h.shape[0], ("b.", "b.", ".", "b", "b"), ("b.",) * 5)(
      seeds, do.astype(h.dtype), h, scale, mean, rstd)
  return (dy, dbias.sum(0).astype(bias.dtype), dr, dscale.sum(0).astype(scale.dtype),
          dbeta.sum(0).astype(beta.dtype), None)


_fused.defvjp(_fused_fwd, _fused_bwd)


def residual_layer_norm(y: Array, bias: Array, residual: Array, scale: Array, beta: Array, *,
                        epsilon: float, dropout_rate: float = 0.0, dropout_key: Array | None = None,
                        interpret: bool = False) -> Array:
  """`layer_norm(dropout(y + bias) + residual)` (the unfused path's values and dropout mask).

  Args:
    y: [..., D] the dense output without its bias; residual: same shape and dtype.
    bias, scale, beta: [D] (the dense bias, the LayerNorm scale and bias).
    epsilon: LayerNorm epsilon.
    dropout_rate, dropout_key: dropout on y + bias; the uint32 key `layers.dropout` draws.
    interpret: run the kernels in the Pallas interpreter (CPU tests).
  Returns:
    [..., D] in y.dtype.
  """
  shape = y.shape
  if residual.shape != shape:
    raise ValueError(f"residual shape {residual.shape} != {shape}")
  rate = float(dropout_rate) if dropout_key is not None else 0.0
  key = jnp.zeros((), jnp.uint32) if dropout_key is None else dropout_key.astype(jnp.uint32)
  d = shape[-1]
  out = _fused(y.reshape(-1, d), bias.astype(y.dtype), residual.astype(y.dtype).reshape(-1, d), scale, beta,
               key, rate, float(epsilon), bool(interpret))
  return out.reshape(shape)
