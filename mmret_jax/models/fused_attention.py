"""Fused self/cross-attention for short sequences on GPU: a Pallas (Triton) kernel per (batch, head).

One program holds a whole [L, S] score block (L, S <= 256): QK^T, the key mask, a float32 softmax,
dropout on the probabilities and the PV product happen in registers and shared memory, so neither
the scores, the probabilities nor a dropout mask ever reach device memory. The backward kernel
recomputes them from q, k, v and the saved log-sum-exp. q, k, v are read in the projections'
[B, L, N, H] layout, so no head transposes are materialised either.

Dropout draws its keep mask from a counter-based hash (`layers.hash_uint32`) of (per-(batch, head)
key, l, s), as `layers.dropout` does for other tensors, instead of
XLA's RNG: `keep_mask` computes the same mask in plain JAX, so tests compare the kernel with the
reference attention under the very same mask. The per-(batch, head) keys come from the module's
`dropout` RNG stream, so masks change every step and replay exactly on resume.

Under a multi-device mesh (the training loop's `jax.set_mesh` plus flax's logical axis rules) the
kernels run inside `shard_map` (`pallas_util.shard_kernel`), each device on its own batch / head
shard; XLA cannot partition a Pallas call itself and would gather q, k, v onto every device.

`layers.dot_product_attention` uses this path when `implementation="fused"`, or with "auto" on a
GPU for bfloat16 / float16 inputs of supported shapes (`supported`); float32 and CPU runs keep the
XLA path, whose numbers are the parity reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mmret_jax.models import layers, pallas_util

Array = jax.Array

_GOLDEN = 0x9E3779B9
_MAX_LEN = 256
_NEG = float(jnp.finfo(jnp.float32).min)


def head_keys(seed: Array, batch: int, heads: int) -> Array:
  """uint32 [B, N] per-(batch, head) dropout keys from a uint32 scalar seed."""
  bn = jnp.arange(batch * heads, dtype=jnp.uint32).reshape(batch, heads)
  return layers.hash_uint32(seed.astype(jnp.uint32) + bn * jnp.uint32(_GOLDEN))


def keep_mask(keys: Array, q_len: int, kv_len: int, rate: float) -> Array:
  """bool [B, N, L, S]: the dropout keep mask the kernels use (keys from `head_keys`); element
  (l, s) of head block (b, n) is kept by `layers.hash_keep(l * S + s, keys[b, n], rate)`."""
  rows = jnp.arange(q_len, dtype=jnp.int32)[:, None]
  cols = jnp.arange(kv_len, dtype=jnp.int32)[None, :]
  return layers.hash_keep(rows * kv_len + cols, keys[:, :, None, None], rate)


def _block_keep(keys_ref, shape: tuple[int, int], rate: float) -> Array:
  """`keep_mask` for the [L, S] block of the program's (batch, head)."""
  rows = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
  return layers.hash_keep(rows * shape[1] + cols, keys_ref[...], rate)


def supported(q: Array, k: Array) -> bool:
  """Shapes and dtypes the kernels take: [B, L, N, H] with L, S powers of two in [16, 256],
  H in {16, 32, 64, 128}, 16-bit floats."""
  pow2 = lambda n: n >= 16 and n <= _MAX_LEN and n & (n - 1) == 0
  return (q.ndim == 4 and pow2(q.shape[1]) and pow2(k.shape[1]) and q.shape[3] in (16, 32, 64, 128)
          and q.dtype in (jnp.bfloat16, jnp.float16) and k.dtype == q.dtype)


# ----------------------------------------------------------------------------- kernels
def _mm(a, b, a_contract: int, b_contract: int) -> Array:
  """2-D matmul contracting a's and b's given dims, float32 accumulation and result."""
  return jax.lax.dot_general(a, b, (((a_contract,), (b_contract,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _scores(q, k, valid, scale):
  s = _mm(q, k, 1, 1) * scale
  return jnp.where(valid[None, :], s, _NEG)


def _fwd_block(keys_ref, mask_ref, q, k, v, o_ref, lse_ref, scale, rate):
  """Forward of one (batch, head) block from its q [L, H], k, v [S, H] values."""
  s = _scores(q, k, mask_ref[...] != 0, scale)
  m = jnp.max(s, axis=1)
  p = jnp.exp(s - m[:, None])
  denom = jnp.sum(p, axis=1)
  lse_ref[...] = m + jnp.log(denom)
  p = p * (1.0 / denom)[:, None]
  if rate > 0:
    p = jnp.where(_block_keep(keys_ref, s.shape, rate), p * (1.0 / (1.0 - rate)), 0.0)
  o_ref[...] = _mm(p.astype(v.dtype), v, 1, 0).astype(o_ref.dtype)


def _bwd_block(keys_ref, mask_ref, q, k, v, lse_ref, do, scale, rate):
  """(dq, dk, dv) in float32 of one (batch, head) block, recomputing the probabilities."""
  s = _scores(q, k, mask_ref[...] != 0, scale)
  p = jnp.exp(s - lse_ref[...][:, None])
  dp = _mm(do, v, 1, 1)  # d(dropped probabilities)
  pd = p
  if rate > 0:
    keep = _block_keep(keys_ref, s.shape, rate)
    inv = 1.0 / (1.0 - rate)
    pd = jnp.where(keep, p * inv, 0.0)
    dp = jnp.where(keep, dp * inv, 0.0)
  dv = _mm(pd.astype(do.dtype), do, 0, 0)
  ds = p * (dp - jnp.sum(p * dp, axis=1)[:, None])
  return _mm(ds.astype(k.dtype), k, 1, 0) * scale, _mm(ds.astype(q.dtype), q, 0, 0) * scale, dv


def _fwd_kernel(keys_ref, mask_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, rate):
  _fwd_block(keys_ref, mask_ref, q_ref[...], k_ref[...], v_ref[...], o_ref, lse_ref, scale, rate)


def _bwd_kernel(keys_ref, mask_ref, q_ref, k_ref, v_ref, lse_ref, do_ref, dq_ref, dk_ref, dv_ref, *,
                scale, rate):
  grads = _bwd_block(keys_ref, mask_ref, q_ref[...], k_ref[...], v_ref[...], lse_ref, do_ref[...], scale, rate)
  for ref, g in zip((dq_ref, dk_ref, dv_ref), grads):
    ref[...] = g.astype(ref.dtype)


def _specs(b_l_n_h: tuple[int, ...], kv_len: int):
  from jax.experimental import pallas as pl  # pylint: disable=import-outside-toplevel
  _, q_len, _, h = b_l_n_h
  return dict(
      keys=pl.BlockSpec((None, 1), lambda b, n: (b, n)),
      mask=pl.BlockSpec((None, kv_len), lambda b, n: (b, 0)),
      q=pl.BlockSpec((None, q_len, None, h), lambda b, n: (b, 0, n, 0)),
      kv=pl.BlockSpec((None, kv_len, None, h), lambda b, n: (b, 0, n, 0)),
      lse=pl.BlockSpec((None, None, q_len), lambda b, n: (b, n, 0)))


def _forward(q, k, v, mask, keys, rate, scale, interpret):
  from jax.experimental import pallas as pl  # pylint: disable=import-outside-toplevel
  b, q_len, n, _ = q.shape
  sp = _specs(q.shape, k.shape[1])
  o, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, scale=scale, rate=rate),
      grid=(b, n),
      in_specs=[sp["keys"], sp["mask"], sp["q"], sp["kv"], sp["kv"]],
      out_specs=[sp["q"], sp["lse"]],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, q_len), jnp.float32)],
      compiler_params=pallas_util.compiler_params(interpret), interpret=interpret, name="fused_attention_fwd",
  )(keys, mask, q, k, v)
  return o, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, mask, keys, rate, scale, interpret):  # rate, scale, interpret: static
  return _forward(q, k, v, mask, keys, rate, scale, interpret)[0]


def _attention_fwd(q, k, v, mask, keys, rate, scale, interpret):
  o, lse = _forward(q, k, v, mask, keys, rate, scale, interpret)
  return o, (q, k, v, mask, keys, lse)


def _attention_bwd(rate, scale, interpret, res, do):
  from jax.experimental import pallas as pl  # pylint: disable=import-outside-toplevel
  q, k, v, mask, keys, lse = res
  b, _, n, _ = q.shape
  sp = _specs(q.shape, k.shape[1])
  dq, dk, dv = pl.pallas_call(
      functools.partial(_bwd_kernel, scale=scale, rate=rate),
      grid=(b, n),
      in_specs=[sp["keys"], sp["mask"], sp["q"], sp["kv"], sp["kv"], sp["lse"], sp["q"]],
      out_specs=[sp["q"], sp["kv"], sp["kv"]],
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)],
      compiler_params=pallas_util.compiler_params(interpret), interpret=interpret, name="fused_attention_bwd",
  )(keys, mask, q, k, v, lse, do.astype(q.dtype))
  return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _mask_and_keys(key_mask, batch: int, kv_len: int, heads: int, rate: float, seed):
  """int32 [B, S] key mask and uint32 [B, N] dropout keys for the kernels."""
  mask = jnp.ones((batch, kv_len), jnp.int32) if key_mask is None else \
      jnp.broadcast_to(key_mask, (batch, kv_len)).astype(jnp.int32)
  if rate > 0:
    if seed is None:
      raise ValueError("dropout_rate > 0 needs a dropout_seed")
    return mask, head_keys(seed, batch, heads)
  return mask, jnp.zeros((batch, heads), jnp.uint32)


def fused_attention(q: Array, k: Array, v: Array, key_mask: Array | None, *, dropout_rate: float = 0.0,
                    dropout_seed: Array | None = None, interpret: bool = False) -> Array:
  """Softmax(q k^T / sqrt(H), masked) with dropout, times v.

  Args:
    q: [B, L, N, H]; k, v: [B, S, N, H] (same dtype).
    key_mask: [B, S] (nonzero = attend) or None.
    dropout_rate: dropout on the attention probabilities (0 = none).
    dropout_seed: uint32 scalar, required when dropout_rate > 0.
    interpret: run the kernels in the Pallas interpreter (CPU tests).
  Returns:
    [B, L, N, H] in q.dtype.
  """
  b, _, n, h = q.shape
  mask, keys = _mask_and_keys(key_mask, b, k.shape[1], n, dropout_rate, dropout_seed)
  rate, scale = float(dropout_rate), float(h) ** -0.5
  fn = lambda q, k, v, mask, keys: (_attention(q, k, v, mask, keys, rate, scale, bool(interpret)),)
  # one kernel per device on its (batch, head) shard: XLA cannot split it
  fn = pallas_util.shard_kernel(fn, ("b.n.",) * 3 + ("b.", "bn"), ("b.n.",), {"b": b, "n": n})
  return fn(q, k, v, mask, keys)[0]


# ----------------------------------------------------------------------------- packed q/k/v input
# Self-attention reads q, k, v straight from the fused projection's output y [B, L, 3, N, H] and adds
# the biases itself; its backward writes dy in that packed layout and the bias gradients as
# per-batch-row partial sums. This removes the forward pass over y that added the biases and split
# q, k, v (a copy of every projection output) and the backward pass that stacked dq, dk, dv back
# together and reduced them for the bias gradient.
def supported_packed(y: Array) -> bool:
  """y [B, L, 3, N, H] the packed kernels take (see `supported`)."""
  if y.ndim != 5 or y.shape[2] != 3:
    return False
  part = jax.ShapeDtypeStruct((*y.shape[:2], *y.shape[3:]), y.dtype)
  return supported(part, part)


def _packed_specs(shape: tuple[int, ...]):
  from jax.experimental import pallas as pl  # pylint: disable=import-outside-toplevel
  _, length, _, _, h = shape
  part = lambda j: pl.BlockSpec((None, length, None, None, h), lambda b, n: (b, 0, j, n, 0))
  bias = lambda j: pl.BlockSpec((None, None, h), lambda b, n: (j, n, 0))
  return dict(qkv=[part(j) for j in range(3)], bias=[bias(j) for j in range(3)],
              bias_grad=pl.BlockSpec((None, None, h), lambda b, n: (b, n, 0)),
              whole=pl.BlockSpec(memory_space=pl.ANY))


def _packed_values(q_ref, k_ref, v_ref, bq_ref, bk_ref, bv_ref):
  """q, k, v of the block with their biases added (in the input dtype, as `y + bias` outside)."""
  return tuple(r[...] + b[...][None, :] for r, b in ((q_ref, bq_ref), (k_ref, bk_ref), (v_ref, bv_ref)))


def _fwd_packed_kernel(keys_ref, mask_ref, q_ref, k_ref, v_ref, bq_ref, bk_ref, bv_ref, o_ref, lse_ref, *,
                       scale, rate):
  q, k, v = _packed_values(q_ref, k_ref, v_ref, bq_ref, bk_ref, bv_ref)
  _fwd_block(keys_ref, mask_ref, q, k, v, o_ref, lse_ref, scale, rate)


def _bwd_packed_kernel(keys_ref, mask_ref, q_ref, k_ref, v_ref, bq_ref, bk_ref, bv_ref, lse_ref, do_ref,
                       dy_ref, dbq_ref, dbk_ref, dbv_ref, *, scale, rate):
  from jax.experimental import pallas as pl  # pylint: disable=import-outside-toplevel
  q, k, v = _packed_values(q_ref, k_ref, v_ref, bq_ref, bk_ref, bv_ref)
  grads = _bwd_block(keys_ref, mask_ref, q, k, v, lse_ref, do_ref[...], scale, rate)
  b, n = pl.program_id(0), pl.program_id(1)
  for j, (g, db_ref) in enumerate(zip(grads, (dbq_ref, dbk_ref, dbv_ref))):
    g = g.astype(dy_ref.dtype)
    dy_ref[b, :, j, n, :] = g  # dy is the whole array: three [L, H] tiles of it per program
    db_ref[...] = jnp.sum(g.astype(jnp.float32), axis=0)


def _forward_packed(y, bias, mask, keys, rate, scale, interpret):
  from jax.experimental import pallas as pl  # pylint: disable=import-outside-toplevel

  def call(y, bias, mask, keys):
    b, length, _, n, h = y.shape
    sp, base = _packed_specs(y.shape), _specs((b, length, n, h), length)
    return tuple(pl.pallas_call(
        functools.partial(_fwd_packed_kernel, scale=scale, rate=rate),
        grid=(b, n),
        in_specs=[base["keys"], base["mask"], *sp["qkv"], *sp["bias"]],
        out_specs=[base["q"], base["lse"]],
        out_shape=[jax.ShapeDtypeStruct((b, length, n, h), y.dtype),
                   jax.ShapeDtypeStruct((b, n, length), jnp.float32)],
        compiler_params=pallas_util.compiler_params(interpret), interpret=interpret, name="fused_attention_qkv_fwd",
    )(keys, mask, y, y, y, bias, bias, bias))

  b, _, _, n, _ = y.shape
  return pallas_util.shard_kernel(call, ("b..n.", ".n.", "b.", "bn"), ("b.n.", "bn."), {"b": b, "n": n})(
      y, bias, mask, keys)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention_packed(y, bias, mask, keys, rate, scale, interpret):  # rate, scale, interpret: static
  return _forward_packed(y, bias, mask, keys, rate, scale, interpret)[0]


def _attention_packed_fwd(y, bias, mask, keys, rate, scale, interpret):
  o, lse = _forward_packed(y, bias, mask, keys, rate, scale, interpret)
  return o, (y, bias, mask, keys, lse)


def _attention_packed_bwd(rate, scale, interpret, res, do):
  from jax.experimental import pallas as pl  # pylint: disable=import-outside-toplevel
  y, bias, mask, keys, lse = res

  def call(y, bias, mask, keys, lse, do):
    b, length, _, n, h = y.shape
    sp, base = _packed_specs(y.shape), _specs((b, length, n, h), length)
    return tuple(pl.pallas_call(
        functools.partial(_bwd_packed_kernel, scale=scale, rate=rate),
        grid=(b, n),
        in_specs=[base["keys"], base["mask"], *sp["qkv"], *sp["bias"], base["lse"], base["q"]],
        out_specs=[sp["whole"]] + [sp["bias_grad"]] * 3,
        out_shape=[jax.ShapeDtypeStruct(y.shape, y.dtype)] + [jax.ShapeDtypeStruct((b, n, h), jnp.float32)] * 3,
        compiler_params=pallas_util.compiler_params(interpret), interpret=interpret, name="fused_attention_qkv_bwd",
    )(keys, mask, y, y, y, bias, bias, bias, lse, do))

  b, _, _, n, _ = y.shape
  dy, *db = pallas_util.shard_kernel(call, ("b..n.", ".n.", "b.", "bn", "bn.", "b.n."),
                                     ("b..n.", "bn.", "bn.", "bn."), {"b": b, "n": n})(
                                         y, bias, mask, keys, lse, do.astype(y.dtype))
  return dy, jnp.stack([d.sum(0) for d in db]).astype(bias.dtype), None, None


_attention_packed.defvjp(_attention_packed_fwd, _attention_packed_bwd)


def fused_attention_qkv(y: Array, bias: Array | None, key_mask: Array | None, *, dropout_rate: float = 0.0,
                        dropout_seed: Array | None = None, interpret: bool = False) -> Array:
  """`fused_attention` of q, k, v = y[:, :, j] + bias[j] (j = 0, 1, 2), read from the packed y.

  Args:
    y: [B, L, 3, N, H], the fused q/k/v projection without its biases.
    bias: [3, N, H] or None.
    key_mask, dropout_rate, dropout_seed, interpret: as `fused_attention`.
  Returns:
    [B, L, N, H] in y.dtype (the same values as `fused_attention` of the biased slices).
  """
  b, length, _, n, h = y.shape
  bias = jnp.zeros((3, n, h), y.dtype) if bias is None else bias.astype(y.dtype)
  mask, keys = _mask_and_keys(key_mask, b, length, n, dropout_rate, dropout_seed)
  return _attention_packed(y, bias, mask, keys, float(dropout_rate), float(h) ** -0.5, bool(interpret))
