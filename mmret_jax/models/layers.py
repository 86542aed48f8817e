"""Building blocks shared by every tower: dense, norms, embeddings, attention, MLPs.

Everything that creates a parameter lives here, so that every kernel carries
logical axis names (`nn.with_logical_partitioning`) and one dtype policy:
parameters in `param_dtype` (float32), matmuls in `dtype` (float32 or
bfloat16), softmax / norms / logits in float32.

Shape letters used in docstrings across `mmret_jax.models`:
  B batch, L query length, S key length, D model width, N heads, H head dim,
  F MLP width, V vocabulary.

Logical axis names: `batch`, `length`, `embed`, `mlp`, `heads`, `kv`, `vocab`;
`train/partitioning.py` maps them onto the mesh axes `data`, `fsdp`, `tensor`.

Decoding caches (autoregressive generation with static shapes), in the flax collection `cache` (`CACHE`),
as flax `examples/lm1b` `decode=True`: the attention module that owns a cache keeps it in its own scope, so
a model's cache is a pytree mirroring its module tree, threaded by `apply(..., mutable=[CACHE])`.
  - self-attention (`self_attention_cache`): `cached_key` / `cached_value` [B, S, N, H] preallocated to the
    maximum length S, and `cache_index` int32 [] (positions written). A call with L new positions writes
    them at [index, index + L) and attends over all S keys, key j allowed for query i iff j <= index + i
    (causal; the unwritten tail masked). The query offset (`cache_position`) is the index before the write:
    T5 reads it for its relative position bias; an additive bias over the keys (BLOOM's ALiBi, [B, N, 1,
    S] from a padding mask over all S positions) and a key-padding mask [B, 1, 1, S] are passed as usual.
  - cross-attention (`cross_attention_cache`): `cached_key` / `cached_value` [B, S_enc, N, H] (no index),
    written when the call is given the encoder states and read back when it is not (`Attention(...,
    cross_attention=True)`), so the encoder keys and values are projected once per generation.
A self-attention cache is created by a first call with `decode=True` inside `init` (shapes of that call's
inputs: zeros, index 0; models build it under `jax.eval_shape`, so nothing is computed); that creating call
returns the causal attention of its input from position 0 and leaves the cache empty. A cross-attention
cache is created by its first store (in `init`, or in a step applied with the cache collection mutable). `Attention(...,
decode=True)` does all of this; a module with its own projections (BLOOM's fused `query_key_value`) calls
`self_attention_cache` with its split k, v and hands the returned mask to `dot_product_attention`.
"""

from __future__ import annotations

import contextlib
import contextvars

import functools
from typing import Any, Callable, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Array = jax.Array

DEFAULT_INIT_STD = 0.02  # HF `initializer_range`: normal(std) for kernels and embedding tables


def fields_from_hf(cls, d: dict[str, Any]) -> dict[str, Any]:
  """The entries of an HF config dict that name fields of the dataclass `cls` (None values dropped)."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  names = {f.name for f in dataclasses.fields(cls)}
  return {k: v for k, v in d.items() if k in names and v is not None}


def _act_quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


def gelu_erf(x: Array) -> Array:
  """HF / PyTorch "gelu": 0.5 x (1 + erf(x / sqrt 2)), evaluated in float32.

  The erf form is PyTorch's own; `jax.nn.gelu(approximate=False)` evaluates erfc instead, which
  XLA expands into two rational approximations, an exp and two divisions per element (the costliest
  element-wise op of the CPU train step)."""
  xf = x.astype(jnp.float32)
  return (xf * _gelu_cdf(xf)).astype(x.dtype)


def _gelu_cdf(z: Array) -> Array:
  """The standard normal CDF Phi(z) = 0.5 (1 + erf(z / sqrt 2)) (float32 in and out)."""
  return 0.5 * (1.0 + jax.lax.erf(z * 0.7071067811865476))


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    # HF "gelu" is the exact erf form.
    "gelu": gelu_erf,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": _act_quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def get_activation(name: str) -> Callable[[Array], Array]:
  """Returns the activation named as in Hugging Face configs (`hidden_act`)."""
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(
        f"Unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


def split_heads(x: Array, n: int) -> Array:
  """[B, L, D] -> [B, L, N, H]."""
  return einops.rearrange(x, "b l (n h) -> b l n h", n=n)


def merge_heads(x: Array) -> Array:
  """[B, L, N, H] -> [B, L, D]."""
  return einops.rearrange(x, "b l n h -> b l (n h)")


class Dense(nn.Module):
  """Linear layer `[.., in] -> [.., out]` with a `[in, out]` kernel; `axes` names (in, out)."""
  features: int
  axes: tuple[str | None, str | None]
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_std: float = DEFAULT_INIT_STD

  @nn.compact
  def __call__(self, x: Array, *, weights_only: bool = False):
    """x @ kernel + bias; `weights_only`: (kernel, bias or None) cast to `dtype`, for callers that
    fuse several projections of one input into one matmul or fold the bias into the activation."""
    init = nn.initializers.normal(self.init_std)
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes),
                        (x.shape[-1], self.features), self.param_dtype).astype(self.dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.axes[1],)),
                        (self.features,), self.param_dtype).astype(self.dtype)
    if weights_only:
      return kernel, bias
    y = jnp.einsum("...d,df->...f", x.astype(self.dtype), kernel)
    return y if bias is None else y + bias


@jax.custom_vjp
def bias_gelu(y: Array, b: Array) -> Array:
  """Exact (erf) GELU of `y + b`, b [F] broadcast over y [..., F].

  Same values as `gelu_erf(y + b)`; the custom gradient keeps only `y` and `b`
  for the backward pass and recomputes erf there. Autodiff of the composition keeps `y + b`, half
  of `y + b` and the erf term (three activation-sized tensors): at BERT's MLP width these saves and
  their re-reads were the largest element-wise cost of the GPU train step (benchmarks/RESULTS.md).
  """
  return gelu_erf(y + b)


def _bias_gelu_fwd(y, b):
  return bias_gelu(y, b), (y, b)


def _bias_gelu_bwd(res, g):
  y, b = res
  z = (y + b).astype(jnp.float32)
  pdf = jnp.exp(-0.5 * z * z) * 0.3989422804014327  # 1 / sqrt(2 pi)
  dz = g.astype(jnp.float32) * (_gelu_cdf(z) + z * pdf)
  db = dz.reshape(-1, dz.shape[-1]).sum(0)
  return dz.astype(y.dtype), db.astype(b.dtype)


bias_gelu.defvjp(_bias_gelu_fwd, _bias_gelu_bwd)


def dense_act(dense: "Dense", x: Array, activation: str) -> Array:
  """activation(dense(x)); exact GELU after a biased dense goes through `bias_gelu`."""
  if activation == "gelu" and dense.use_bias:
    kernel, bias = dense(x, weights_only=True)
    return bias_gelu(jnp.einsum("...d,df->...f", x.astype(dense.dtype), kernel), bias)
  return get_activation(activation)(dense(x))


class LayerNorm(nn.Module):
  """LayerNorm computed in float32 (params `scale`, `bias`), output cast to `dtype`."""
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, weights_only: bool = False):
    """LayerNorm(x); `weights_only`: (scale, bias), for callers that fuse the norm into a kernel."""
    d = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                       (d,), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
                      (d,), self.param_dtype)
    if weights_only:
      return scale, bias
    return layer_norm(x, scale, bias, float(self.epsilon), jnp.dtype(self.dtype))


def _layer_norm_stats(x: Array, epsilon: float) -> tuple[Array, Array, Array]:
  xf = x.astype(jnp.float32)
  mean = xf.mean(-1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.square(xf - mean).mean(-1, keepdims=True) + epsilon)
  return (xf - mean) * rstd, mean, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x: Array, scale: Array, bias: Array, epsilon: float, dtype: Any) -> Array:
  """LayerNorm over the last axis in float32 (two-pass variance), output in `dtype`.

  The custom gradient keeps x (in its own dtype) and the per-row mean and 1/std, and recomputes the
  normalised x in the backward pass; autodiff kept float32 activation-sized intermediates instead
  (the LayerNorm backward was ~9% of the GPU train step)."""
  return _layer_norm_fwd(x, scale, bias, epsilon, dtype)[0]


def _layer_norm_fwd(x, scale, bias, epsilon, dtype):
  xhat, mean, rstd = _layer_norm_stats(x, epsilon)
  y = (xhat * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype)
  return y, (x, mean, rstd, scale, bias)


def _layer_norm_bwd(epsilon, dtype, res, g):
  del epsilon, dtype
  x, mean, rstd, scale, bias = res
  xhat = (x.astype(jnp.float32) - mean) * rstd
  gf = g.astype(jnp.float32)
  dxhat = gf * scale.astype(jnp.float32)
  dx = rstd * (dxhat - dxhat.mean(-1, keepdims=True) - xhat * (dxhat * xhat).mean(-1, keepdims=True))
  rows = tuple(range(x.ndim - 1))
  return (dx.astype(x.dtype), (gf * xhat).sum(rows).astype(scale.dtype), gf.sum(rows).astype(bias.dtype))


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class RMSNorm(nn.Module):
  """RMSNorm (Zhang & Sennrich 2019; HF `T5LayerNorm`): x * rsqrt(mean(x^2) + eps) * scale, no mean
  subtraction, no bias; float32 inside, output in `dtype`. The param is `scale` (HF `weight`), as
  LayerNorm's, so converters map `.weight` <-> `scale` for both."""
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                       (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.epsilon)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


class Embed(nn.Module):
  """Lookup table `[num, D]` (param `embedding`); `attend` gives logits against it."""
  num_embeddings: int
  features: int
  axes: tuple[str | None, str | None] = ("vocab", "embed")
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_std: float = DEFAULT_INIT_STD

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.axes),
        (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, ids: Array) -> Array:
    """[...] int -> [..., D]. Tables of one or two rows (token types) select instead of gathering:
    the same values for valid ids, and a gradient that is a reduction rather than a scatter-add of
    every token into one or two rows (atomics all on the same addresses, ~1 ms per step on a GPU)."""
    table = self.embedding
    if self.num_embeddings == 1:
      out = jnp.broadcast_to(table[0], ids.shape + table.shape[1:])
    elif self.num_embeddings == 2:
      out = jnp.where((ids == 1)[..., None], table[1], table[0])
    else:
      # the table gathered whole over the embed axis first (as FSDP gathers every weight before use): looking up
      # rows of a table sharded on D would give D-sharded activations that SPMD can only turn into the batch
      # sharding by replicating them ("involuntary full rematerialization" on fsdp meshes)
      table = constrain(table, (self.axes[0], None))
      out = jnp.take(table, ids, axis=0)
    return out.astype(self.dtype)

  def attend(self, x: Array, dtype: Dtype | None = None) -> Array:
    """[..., D] -> float32 [..., V] (tied output projection), the matmul in `dtype` (default
    `self.dtype`; the model's compute dtype, as PyTorch autocast runs the decoder). The logits leave
    the matmul in `dtype` and are cast up after it, so the backward matmuls run in `dtype` too."""
    dt = dtype or self.dtype
    return jnp.einsum("...d,vd->...v", x.astype(dt), self.embedding.astype(dt)).astype(jnp.float32)


def logical_param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str | None, ...],
                  init: Callable | None = None, dtype: Dtype = jnp.float32) -> Array:
  """A free-standing param (class token, logit scale) with logical axis names; default normal(0.02)."""
  init = init or nn.initializers.normal(DEFAULT_INIT_STD)
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class PatchEmbed(nn.Module):
  """Non-overlapping patch projection (a stride-P conv without bias, as CLIP's `patch_embedding`).

  Kernel `[P, P, C, D]` (HWIO); [B, H, W, C] -> [B, (H/P)*(W/P), D] in row-major patch order.
  """
  features: int
  patch_size: int
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_std: float = DEFAULT_INIT_STD

  @nn.compact
  def __call__(self, x: Array) -> Array:
    p, c = self.patch_size, x.shape[-1]
    if x.shape[1] % p or x.shape[2] % p:
      raise ValueError(f"image size {x.shape[1:3]} is not a multiple of patch size {p}")
    kernel = logical_param(self, "kernel", (p, p, c, self.features), (None, None, None, "embed"),
                           nn.initializers.normal(self.init_std), self.param_dtype)
    patches = einops.rearrange(x, "b (h p1) (w p2) c -> b (h w) (p1 p2 c)", p1=p, p2=p)
    y = jnp.einsum("bnk,kd->bnd", patches.astype(self.dtype),
                   kernel.reshape(p * p * c, self.features).astype(self.dtype))
    if self.use_bias:
      y = y + logical_param(self, "bias", (self.features,), ("embed",), nn.initializers.zeros_init(),
                            self.param_dtype).astype(self.dtype)
    return y


def hash_uint32(x: Array) -> Array:
  """A 32-bit integer mixer (xor-shift-multiply, "lowbias32"); uint32 in and out."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def hash_keep(index: Array, key: Array, rate: float) -> Array:
  """Dropout keep decisions: True with probability 1 - rate, from uint32 element indices and key."""
  threshold = min(int(round(rate * 2.0 ** 32)), 2 ** 32 - 1)
  return hash_uint32(index.astype(jnp.uint32) ^ key) >= jnp.uint32(threshold)


def dropout_key(rng: Array) -> Array:
  """The uint32 key `dropout` draws from its RNG."""
  return jax.random.bits(rng, (), jnp.uint32)


def dropout(rng: Array, x: Array, rate: float) -> Array:
  """Inverted dropout: zero each element with probability `rate`, scale the rest by 1 / (1 - rate).

  One uint32 key is drawn from `rng`; element i is kept when hash_uint32(i ^ key) clears a
  threshold (`hash_keep`), i being its row-major index. The mask is a pure function of (key, index):
  XLA fuses it into the consumer (no random-bit buffers; recomputing it in the backward pass costs
  a few integer ops), it does not depend on how x is sharded, and it is much cheaper than a
  threefry draw per element (the hidden-state dropouts were ~9% of the GPU train step with one).
  The scaling is a float32 multiply (flax's `nn.Dropout` divides)."""
  if rate <= 0:
    return x
  if rate >= 1:
    return jnp.zeros_like(x)
  key = dropout_key(rng)
  idx = jnp.zeros(x.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(x.ndim)):
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride % 2 ** 32)
    stride *= x.shape[axis]
  scaled = (x.astype(jnp.float32) * (1.0 / (1.0 - rate))).astype(x.dtype)
  return jnp.where(hash_keep(idx, key, rate), scaled, jnp.zeros((), x.dtype))


class Dropout(nn.Module):
  """`dropout` with the module's `dropout` RNG stream; identity when deterministic."""
  rate: float

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True, *, key_only: bool = False):
    """dropout(x); `key_only`: the uint32 key `dropout` would hash with (None when inactive), for
    kernels that apply the same mask themselves."""
    if deterministic or self.rate <= 0:
      return None if key_only else x
    rng = self.make_rng("dropout")
    return dropout_key(rng) if key_only else dropout(rng, x, self.rate)


ATTENTION_IMPLS = ("auto", "xla", "fused", "fused_interpret", "fused_qkv", "fused_qkv_interpret")


def attention_bias_from_mask(mask: Array | None, causal_length: int | None = None) -> Array | None:
  """Boolean key mask [B, S] (True = attend) and/or causal -> boolean [B|1, 1, L|1, S]."""
  out = None
  if mask is not None:
    out = mask.astype(bool)[:, None, None, :]
  if causal_length is not None:
    c = jnp.tril(jnp.ones((causal_length, causal_length), bool))[None, None]
    out = c if out is None else jnp.logical_and(out, c)
  return out


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array | None, *,
                          dropout_rate: float = 0.0, dropout_rng: Array | None = None,
                          implementation: str = "xla", bias: Array | None = None,
                          scale: float | None = None) -> Array:
  """Scaled dot-product attention; softmax in float32.

  Args:
    q: [B, L, N, H]; k, v: [B, S, N, H].
    mask: boolean, broadcastable to [B, N, L, S]; True = attend.
    bias: additive logit bias, broadcastable to [B, N, L, S] (T5's relative position bias), added
      in float32 after the scaling and before the mask; the fused kernels take none, so a bias
      always runs the XLA path.
    scale: the logit scale; None = H^-0.5 (T5 passes 1.0: it folds the scaling into the q init).
    dropout_rate, dropout_rng: dropout on the probabilities (rate 0 or rng None = none).
    implementation: "xla"; "fused" = the Pallas kernel of `fused_attention` when it takes the
      shapes (a key-padding mask, lengths 16-256), else "xla"; "auto" = "fused" on GPU for 16-bit
      inputs; "fused_interpret" = the kernel in the Pallas interpreter (tests). "fused_qkv[_interpret]"
      is "fused[_interpret]" here; `Attention` reads q/k/v packed with it (`fused_attention_qkv`).
  Returns:
    [B, L, N, H] in q.dtype.

  The XLA path runs the two matmuls head-major ([B, N, L, H] operands, explicit transposes):
  same math as contracting the [B, L, N, H] layout directly, but on XLA:CPU the
  direct form picked slower dot layouts (attention ~1.4x the CPU time at
  roberta-base size, benchmarks/RESULTS.md).
  """
  if implementation not in ATTENTION_IMPLS:
    raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLS}, got {implementation!r}")
  rate = float(dropout_rate) if dropout_rng is not None else 0.0
  implementation = implementation.replace("fused_qkv", "fused")
  if implementation != "xla" and bias is None and is_key_padding(mask):
    from mmret_jax.models import fused_attention  # pylint: disable=import-outside-toplevel
    interpret = implementation == "fused_interpret"
    if interpret or (fused_attention.supported(q, k)
                     and (implementation == "fused" or jax.default_backend() == "gpu")):
      return fused_attention.fused_attention(
          q, k, v, None if mask is None else mask[:, 0, 0, :], dropout_rate=rate,
          dropout_seed=_kernel_seed(dropout_rng, rate), interpret=interpret)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, N, L|S, H]
  logits = jnp.einsum("bnlh,bnsh->bnls", q, k).astype(jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if rate > 0:
    probs = dropout(dropout_rng, probs, rate)
  return jnp.einsum("bnls,bnsh->bnlh", probs.astype(v.dtype), v).transpose(0, 2, 1, 3)


def is_key_padding(mask: Array | None) -> bool:
  """None or a [B|1, 1, 1, S] key-padding mask: the masks the fused kernels take."""
  return mask is None or (mask.ndim == 4 and mask.shape[1:3] == (1, 1))


def _kernel_seed(rng: Array | None, rate: float) -> Array | None:
  """The fused attention kernels' uint32 dropout seed, drawn from the module's dropout key."""
  return dropout_key(rng) if rate > 0 else None


def packed_projection(denses: Sequence["Dense"], x: Array) -> tuple[Array, Array | None]:
  """(x @ the stacked kernels [D, P, F] -> [..., P, F], the stacked biases [P, F] or None): P
  projections of one input as one matmul, biases not yet added. Stacking on a new axis keeps each
  kernel's sharding (the F axis stays where it was)."""
  ws = [d(x, weights_only=True) for d in denses]
  kernel = jnp.stack([w for w, _ in ws], axis=1)
  y = jnp.einsum("...d,dpf->...pf", x.astype(denses[0].dtype), kernel)
  return y, (jnp.stack([b for _, b in ws]) if ws[0][1] is not None else None)


_UNFUSED = contextvars.ContextVar("mmret_jax_unfused_projections", default=False)


@contextlib.contextmanager
def unfused_projections():
  """While tracing inside this context, `fused_projections` calls each Dense on its own (the same values):
  for transforms that wrap each Dense call, e.g. LoRA's adapter dropout (models/lora.py)."""
  token = _UNFUSED.set(True)
  try:
    yield
  finally:
    _UNFUSED.reset(token)


def fused_projections(denses: Sequence["Dense"], x: Array) -> list[Array]:
  """[dense(x) for dense in denses] as one matmul (`packed_projection`): one read of x and one
  larger GEMM instead of P (and one input gradient instead of P summed); inside `unfused_projections`,
  P separate calls."""
  if len(denses) == 1 or _UNFUSED.get():
    return [d(x) for d in denses]
  y, bias = packed_projection(denses, x)
  if bias is not None:
    y = y + bias
  return [y[..., i, :] for i in range(len(denses))]


class Attention(nn.Module):
  """Multi-head (self or cross) attention with HF-named projections.

  `names` are the q, k, v projection names (`query/key/value` for BERT,
  `q_proj/k_proj/v_proj` for CLIP); `out_name` adds an output projection
  (CLIP's `out_proj`); BERT keeps it in a sibling `output` module instead.
  `hidden_size` is the width of q, k, v (N * H; T5's `inner_dim` may differ from D); the output
  projection maps back to x's width. `scale`: see `dot_product_attention`. `init_stds`: per-projection
  init stds (q, k, v, out), e.g. T5's; None = `init_std` for each. `cross_attention`: with `decode` and
  no `kv`, attend over the encoder keys cached by an earlier call (else a self-attention step).
  """
  num_heads: int
  hidden_size: int
  names: tuple[str, str, str] = ("query", "key", "value")
  out_name: str | None = None
  dropout_rate: float = 0.0
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_std: float = DEFAULT_INIT_STD
  implementation: str = "xla"  # see dot_product_attention
  scale: float | None = None
  init_stds: tuple[float, float, float, float] | None = None
  cross_attention: bool = False

  @nn.compact
  def __call__(self, x: Array, kv: Array | None = None, mask: Array | None = None,
               deterministic: bool = True, *, bias: Array | None = None, decode: bool = False) -> Array:
    """x: [B, L, D]; kv: [B, S, Dkv] (defaults to x); mask: bool [B|1, 1, L|1, S]; bias: float
    [B|1, N, L, S] added to the logits -> [B, L, D].

    `decode`: attend through this module's cache (module docstring): self-attention over the cached keys
    (S = the cache length; mask and bias then span those S keys, the causal part is added here);
    cross-attention (`kv` given, or None with `cross_attention` to reuse the keys cached by an earlier call)."""
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
    dense = lambda name: Dense(self.hidden_size, ("embed", "heads"), use_bias=self.use_bias, dtype=self.dtype,
                               param_dtype=self.param_dtype, init_std=self._std(self.names.index(name)),
                               name=name)
    rng = self.make_rng("dropout") if self.dropout_rate > 0 and not deterministic else None
    if decode:
      q, k, v, mask = self._cached_qkv(dense, x, kv, mask)
      out = dot_product_attention(q, k, v, mask, dropout_rate=self.dropout_rate, dropout_rng=rng,
                                  implementation=self.implementation, bias=bias, scale=self.scale)
      return self._output(out, x)
    if kv is None and bias is None and self._packed_kernel_takes(x, mask):
      return self._output(self._packed_self_attention([dense(n) for n in self.names], x, mask, rng), x)
    if kv is None:  # self-attention: q, k, v in one matmul
      q, k, v = fused_projections([dense(n) for n in self.names], x)
    else:  # k, v of the same states in one matmul
      q, = fused_projections([dense(self.names[0])], x)
      k, v = fused_projections([dense(n) for n in self.names[1:]], kv)
    q, k, v = (split_heads(t, self.num_heads) for t in (q, k, v))
    out = dot_product_attention(q, k, v, mask, dropout_rate=self.dropout_rate, dropout_rng=rng,
                                implementation=self.implementation, bias=bias, scale=self.scale)
    return self._output(out, x)

  def _cached_qkv(self, dense, x: Array, kv: Array | None, mask: Array | None):
    """q [B, L, N, H] and the keys / values [B, S, N, H] through the cache, with the mask for them."""
    heads = self.num_heads
    if kv is not None or self.cross_attention:
      q, = fused_projections([dense(self.names[0])], x)
      if kv is None:
        k, v = cross_attention_cache(self)
      else:
        k, v = (split_heads(t, heads) for t in fused_projections([dense(n) for n in self.names[1:]], kv))
        cross_attention_cache(self, k, v)
      return split_heads(q, heads), k, v, mask
    q, k, v = (split_heads(t, heads) for t in fused_projections([dense(n) for n in self.names], x))
    k, v, causal = self_attention_cache(self, k, v)
    return q, k, v, causal if mask is None else jnp.logical_and(mask, causal)

  def _std(self, i: int) -> float:
    """Init std of projection i (q, k, v, out)."""
    return self.init_std if self.init_stds is None else self.init_stds[i]

  def _packed_kernel_takes(self, x: Array, mask: Array | None) -> bool:
    """Whether self-attention runs `fused_attention_qkv` (implementation "fused_qkv[_interpret]")."""
    if not (self.implementation.startswith("fused_qkv") and is_key_padding(mask) and x.ndim == 3):
      return False
    from mmret_jax.models import fused_attention  # pylint: disable=import-outside-toplevel
    heads = self.num_heads
    y = jax.ShapeDtypeStruct((*x.shape[:2], 3, heads, self.hidden_size // heads), self.dtype)
    return self.implementation.endswith("_interpret") or fused_attention.supported_packed(y)

  def _packed_self_attention(self, denses, x: Array, mask: Array | None, rng: Array | None) -> Array:
    """Self-attention by `fused_attention_qkv` on the packed projection -> [B, L, N, H]."""
    from mmret_jax.models import fused_attention  # pylint: disable=import-outside-toplevel
    y, bias = packed_projection(denses, x)
    heads = self.num_heads
    y = y.reshape(*y.shape[:-1], heads, y.shape[-1] // heads)  # [B, L, 3, N, H]
    interpret = self.implementation.endswith("_interpret")
    rate = float(self.dropout_rate) if rng is not None else 0.0
    return fused_attention.fused_attention_qkv(
        y, None if bias is None else bias.reshape(3, heads, -1), None if mask is None else mask[:, 0, 0, :],
        dropout_rate=rate, dropout_seed=_kernel_seed(rng, rate), interpret=interpret)

  def _output(self, out: Array, x: Array) -> Array:
    """[B, L, N, H] -> [B, L, D], through the output projection when the module has one."""
    out = merge_heads(out)
    if self.out_name is not None:
      out = Dense(x.shape[-1], ("heads", "embed"), use_bias=self.use_bias, dtype=self.dtype,
                  param_dtype=self.param_dtype, init_std=self._std(3), name=self.out_name)(out)
    return out


CACHE = "cache"  # the flax collection of decoding caches (module docstring)


def _require_cache(module: nn.Module) -> None:
  if not module.is_mutable_collection(CACHE):
    raise ValueError(f"{module.name or type(module).__name__}: decode=True without a cache. Build one with the "
                     f"model's init_cache and apply with {{'params': ..., '{CACHE}': cache}}, mutable=['{CACHE}']")


def cache_position(module: nn.Module) -> tuple[Array, int] | None:
  """(index, length) of `module`'s self-attention cache: int32 [] positions written so far (the query offset
  of the next call) and the static cache length S; None when it has none (yet)."""
  if not module.has_variable(CACHE, "cache_index"):
    return None
  return module.get_variable(CACHE, "cache_index"), module.get_variable(CACHE, "cached_key").shape[1]


def cache_mask(index: Array | int, query_length: int, cache_length: int) -> Array:
  """bool [1, 1, L, S]: query i (at position index + i) may attend to key j iff j <= index + i."""
  q = jnp.arange(query_length, dtype=jnp.int32)[:, None] + index
  return (jnp.arange(cache_length, dtype=jnp.int32)[None, :] <= q)[None, None]


def self_attention_cache(module: nn.Module, k: Array, v: Array) -> tuple[Array, Array, Array]:
  """Writes k, v [B, L, N, H] into `module`'s cache at its index; returns (keys [B, S, N, H], values,
  bool mask [1, 1, L, S] from `cache_mask`) and advances the index by L.

  Without a cache (the creating call, inside `init`): creates an empty one sized by k (zeros, index 0)
  and returns (k, v, causal mask [1, 1, L, L]), the attention of a prefill from position 0. Writing past
  the cache length is the caller's error (`lax.dynamic_update_slice` would clamp the start)."""
  fresh = not module.has_variable(CACHE, "cached_key")
  if fresh:
    _require_cache(module)
  ck = module.variable(CACHE, "cached_key", jnp.zeros, k.shape, k.dtype)
  cv = module.variable(CACHE, "cached_value", jnp.zeros, v.shape, v.dtype)
  ci = module.variable(CACHE, "cache_index", lambda: jnp.zeros((), jnp.int32))
  length = k.shape[1]
  if fresh:
    return k, v, cache_mask(0, length, length)
  if ck.value.shape[0] != k.shape[0] or length > ck.value.shape[1]:
    raise ValueError(f"{length} new positions of batch {k.shape[0]} do not fit a cache of shape {ck.value.shape}")
  index = ci.value
  ck.value = jax.lax.dynamic_update_slice(ck.value, k.astype(ck.value.dtype), (0, index, 0, 0))
  cv.value = jax.lax.dynamic_update_slice(cv.value, v.astype(cv.value.dtype), (0, index, 0, 0))
  ci.value = index + length
  return ck.value, cv.value, cache_mask(index, length, ck.value.shape[1])


def is_cross_attention_cache(module: nn.Module) -> bool:
  """Whether `module` holds a cross-attention cache (keys without an index)."""
  return module.has_variable(CACHE, "cached_key") and not module.has_variable(CACHE, "cache_index")


def cross_attention_cache(module: nn.Module, k: Array | None = None, v: Array | None = None) -> tuple[Array, Array]:
  """The encoder keys / values [B, S_enc, N, H] of `module`'s cross-attention cache: stores k, v when given,
  else returns the stored ones."""
  if k is None:
    if not is_cross_attention_cache(module):
      raise ValueError(f"{module.name or type(module).__name__}: no cached encoder keys; pass the encoder states "
                       "on the first decoding step")
    return module.get_variable(CACHE, "cached_key"), module.get_variable(CACHE, "cached_value")
  if not module.has_variable(CACHE, "cached_key"):
    _require_cache(module)
  elif module.get_variable(CACHE, "cached_key").shape != k.shape:
    raise ValueError(f"encoder keys of shape {k.shape} do not fit the cross-attention cache "
                     f"{module.get_variable(CACHE, 'cached_key').shape}")
  module.variable(CACHE, "cached_key", lambda: k).value = k
  module.variable(CACHE, "cached_value", lambda: v).value = v
  return k, v


NORM_IMPLS = ("xla", "fused", "fused_interpret")


class ResidualPostLN(nn.Module):
  """dense -> dropout -> LayerNorm(. + residual): HF BertSelfOutput / BertOutput.

  `implementation`: "xla"; "fused" = after the dense matmul, bias, dropout, residual and LayerNorm
  (and their gradients) in the Pallas kernels of `fused_norm` when they take the shapes (16-bit,
  hidden size a multiple of 16), else "xla"; "fused_interpret" = those kernels in the Pallas
  interpreter (tests). Same params, same dropout mask."""
  features: int
  in_axis: str = "heads"
  epsilon: float = 1e-12
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_std: float = DEFAULT_INIT_STD
  implementation: str = "xla"

  @nn.compact
  def __call__(self, x: Array, residual: Array, deterministic: bool = True) -> Array:
    if self.implementation not in NORM_IMPLS:
      raise ValueError(f"norm implementation must be one of {NORM_IMPLS}, got {self.implementation!r}")
    dense = Dense(self.features, (self.in_axis, "embed"), dtype=self.dtype, param_dtype=self.param_dtype,
                  init_std=self.init_std, name="dense")
    drop = Dropout(self.dropout_rate)
    norm = LayerNorm(self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype, name="LayerNorm")
    if self.implementation != "xla":
      from mmret_jax.models import fused_norm  # pylint: disable=import-outside-toplevel
      interpret = self.implementation == "fused_interpret"
      out = jax.ShapeDtypeStruct((*x.shape[:-1], self.features), self.dtype)
      if interpret or fused_norm.supported(out):
        kernel, bias = dense(x, weights_only=True)
        scale, beta = norm(residual, weights_only=True)
        return fused_norm.residual_layer_norm(
            jnp.einsum("...d,df->...f", x.astype(self.dtype), kernel), bias, residual, scale, beta,
            epsilon=self.epsilon, dropout_rate=self.dropout_rate,
            dropout_key=drop(x, deterministic, key_only=True), interpret=interpret)
    h = drop(dense(x), deterministic=deterministic)
    return norm(h + residual)


class DenseAct(nn.Module):
  """dense -> activation (HF BertIntermediate: `dense`; BERT pooler with tanh)."""
  features: int
  activation: str = "gelu"
  axes: tuple[str | None, str | None] = ("embed", "mlp")
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_std: float = DEFAULT_INIT_STD

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return dense_act(Dense(self.features, self.axes, dtype=self.dtype, param_dtype=self.param_dtype,
                           init_std=self.init_std, name="dense"), x, self.activation)


class Mlp(nn.Module):
  """fc1 -> activation -> fc2 (CLIP / ViT MLP block; HF T5DenseActDense: `wi`, `wo`, no biases).

  `gated`: activation(gate(x)) * linear(x) -> out (HF T5DenseGatedActDense: `names` = (`wi_0`,
  `wi_1`, `wo`); gate and linear run as one matmul). `dropout_rate`: dropout on the hidden
  activations before the output projection (T5). `out_dtype`: the output projection's compute dtype
  (None = `dtype`; T5 keeps `wo` in float32 as HF `_keep_in_fp32_modules`). `init_stds`: (input
  projections, output projection) init stds; None = `init_std` for both."""
  intermediate_size: int
  activation: str = "quick_gelu"
  names: tuple[str, ...] = ("fc1", "fc2")
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_std: float = DEFAULT_INIT_STD
  use_bias: bool = True
  gated: bool = False
  dropout_rate: float = 0.0
  out_dtype: Dtype | None = None
  init_stds: tuple[float, float] | None = None

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    """[..., D] -> [..., D] (in `out_dtype` or `dtype`)."""
    if len(self.names) != 2 + self.gated:
      raise ValueError(f"Mlp(gated={self.gated}) needs {2 + self.gated} names, got {self.names}")
    std_in, std_out = self.init_stds or (self.init_std, self.init_std)
    kw = dict(use_bias=self.use_bias, param_dtype=self.param_dtype)
    wi = [Dense(self.intermediate_size, ("embed", "mlp"), dtype=self.dtype, init_std=std_in, name=n, **kw)
          for n in self.names[:-1]]
    if self.gated:
      gate, linear = fused_projections(wi, x)
      h = get_activation(self.activation)(gate) * linear
    else:
      h = dense_act(wi[0], x, self.activation)
    h = Dropout(self.dropout_rate, name="dropout")(h, deterministic)
    return Dense(x.shape[-1], ("mlp", "embed"), dtype=self.out_dtype or self.dtype, init_std=std_out,
                 name=self.names[-1], **kw)(h)


def constrain(x: Array, axes: Sequence[str | None]) -> Array:
  """Logical sharding constraint at block edges (no-op without a mesh and rules)."""
  return nn.with_logical_constraint(x, tuple(axes))
