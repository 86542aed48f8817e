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
"""

from __future__ import annotations

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


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    # HF "gelu" is the exact erf form.
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
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
  def __call__(self, x: Array) -> Array:
    init = nn.initializers.normal(self.init_std)
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes),
                        (x.shape[-1], self.features), self.param_dtype)
    y = jnp.einsum("...d,df->...f", x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.axes[1],)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class LayerNorm(nn.Module):
  """LayerNorm computed in float32 (params `scale`, `bias`), output cast to `dtype`."""
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                       (d,), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
                      (d,), self.param_dtype)
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)


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
    """[...] int -> [..., D]."""
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x: Array) -> Array:
    """[..., D] -> [..., V] (tied output projection)."""
    return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.embedding.astype(self.dtype))


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
                          dropout: nn.Dropout | None = None,
                          deterministic: bool = True) -> Array:
  """Scaled dot-product attention; softmax in float32.

  Args:
    q: [B, L, N, H]; k, v: [B, S, N, H].
    mask: boolean, broadcastable to [B, N, L, S]; True = attend.
  Returns:
    [B, L, N, H] in q.dtype.

  The two matmuls run head-major ([B, N, L, H] operands, explicit transposes):
  same math as contracting the [B, L, N, H] layout directly, but on XLA:CPU the
  direct form picked slower dot layouts (attention ~1.4x the CPU time at
  roberta-base size, benchmarks/RESULTS.md).
  """
  scale = q.shape[-1] ** -0.5
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, N, L|S, H]
  logits = jnp.einsum("bnlh,bnsh->bnls", q, k).astype(jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if dropout is not None:
    probs = dropout(probs, deterministic=deterministic)
  return jnp.einsum("bnls,bnsh->bnlh", probs.astype(v.dtype), v).transpose(0, 2, 1, 3)


class Attention(nn.Module):
  """Multi-head (self or cross) attention with HF-named projections.

  `names` are the q, k, v projection names (`query/key/value` for BERT,
  `q_proj/k_proj/v_proj` for CLIP); `out_name` adds an output projection
  (CLIP's `out_proj`); BERT keeps it in a sibling `output` module instead.
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

  @nn.compact
  def __call__(self, x: Array, kv: Array | None = None, mask: Array | None = None,
               deterministic: bool = True) -> Array:
    """x: [B, L, D]; kv: [B, S, Dkv] (defaults to x); mask: bool [B|1, 1, L|1, S] -> [B, L, D]."""
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
    kv = x if kv is None else kv
    dense = lambda name: Dense(self.hidden_size, ("embed", "heads"), use_bias=self.use_bias, dtype=self.dtype,
                               param_dtype=self.param_dtype, init_std=self.init_std, name=name)
    q = split_heads(dense(self.names[0])(x), self.num_heads)
    k = split_heads(dense(self.names[1])(kv), self.num_heads)
    v = split_heads(dense(self.names[2])(kv), self.num_heads)
    dropout = nn.Dropout(self.dropout_rate) if self.dropout_rate > 0 else None
    out = merge_heads(dot_product_attention(q, k, v, mask, dropout=dropout, deterministic=deterministic))
    if self.out_name is not None:
      out = Dense(x.shape[-1], ("heads", "embed"), use_bias=self.use_bias, dtype=self.dtype,
                  param_dtype=self.param_dtype, init_std=self.init_std, name=self.out_name)(out)
    return out


class ResidualPostLN(nn.Module):
  """dense -> dropout -> LayerNorm(. + residual): HF BertSelfOutput / BertOutput."""
  features: int
  in_axis: str = "heads"
  epsilon: float = 1e-12
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_std: float = DEFAULT_INIT_STD

  @nn.compact
  def __call__(self, x: Array, residual: Array, deterministic: bool = True) -> Array:
    h = Dense(self.features, (self.in_axis, "embed"), dtype=self.dtype, param_dtype=self.param_dtype,
              init_std=self.init_std, name="dense")(x)
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    return LayerNorm(self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="LayerNorm")(h + residual)


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
    h = Dense(self.features, self.axes, dtype=self.dtype, param_dtype=self.param_dtype,
              init_std=self.init_std, name="dense")(x)
    return get_activation(self.activation)(h)


class Mlp(nn.Module):
  """fc1 -> activation -> fc2 (CLIP / ViT MLP block)."""
  intermediate_size: int
  activation: str = "quick_gelu"
  names: tuple[str, str] = ("fc1", "fc2")
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_std: float = DEFAULT_INIT_STD

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, init_std=self.init_std)
    h = Dense(self.intermediate_size, ("embed", "mlp"), name=self.names[0], **kw)(x)
    h = get_activation(self.activation)(h)
    return Dense(x.shape[-1], ("mlp", "embed"), name=self.names[1], **kw)(h)


def constrain(x: Array, axes: Sequence[str | None]) -> Array:
  """Logical sharding constraint at block edges (no-op without a mesh and rules)."""
  return nn.with_logical_constraint(x, tuple(axes))
