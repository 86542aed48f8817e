"""Gradient caching (GradCache: Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup", 2021) for the contrastive tasks: the loss sees every negative of the global batch while the encoders hold
the activations of one chunk at a time.

A task that supports it defines `grad_cache_parts()` -> `Parts(encode, loss)`:
  encode(params, chunk, rng) -> {"rows": {name: [c, ...]}, "sums": {name: scalar}}
      the representations of a chunk of c rows (e.g. CLS embeddings [c, D]) and additive per-chunk terms (e.g.
      the MLM loss's summed token NLL and its token count), from the chunk's rows of every batch field;
  loss(params, reps, batch, rng) -> (loss, aux)
      the loss from the representations of the whole batch (rows concatenated back in batch order, sums summed
      over chunks); `params` for what the loss itself reads (a learnable temperature).
The step (`value_and_grad`):
  1. every chunk is encoded with the params held constant (no activations kept across chunks: `lax.map`);
  2. the loss and its gradient with respect to the representations (and to the params the loss reads directly)
     are taken on the full batch;
  3. each chunk is encoded again and its representation gradient is pulled back through the encoder (`jax.vjp`
     inside a `lax.scan`: one chunk's activations live at a time), the parameter gradients summed.
Because the loss is a function of the representations only, and (2) is exact, the gradient equals the plain
full-batch gradient of `loss(params, encode-all(params))` (fp32 rounding aside), additive per-example terms
included. Randomness is per chunk (`fold_in(rng, chunk)`), identical in passes 1 and 3, so dropout masks agree
between the two passes; tasks key their per-row randomness (MLM masks) by row so chunking does not change it.

Chunks are strided (chunk i = rows i, i + n, i + 2n, ...), so that with the batch sharded over the data axes each
chunk still spans every device (c must be a multiple of the data-parallel size), and the representations are put
back in batch order before the loss.

Shapes: B global batch, c chunk size, n = B / c chunks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Parts:
  """A task's split of its loss: `encode` (per chunk) and `loss` (on the whole batch's representations)."""
  encode: Callable[[Any, dict, Array], dict]
  loss: Callable[[Any, dict, dict, Array], tuple[Array, dict]]


def _batch_size(batch: dict) -> int:
  sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
  if len(sizes) != 1:
    raise ValueError(f"grad_cache: every batch field needs the same leading (batch) size, got {sorted(sizes)}")
  return sizes.pop()


def check_chunking(batch_size: int, chunk_size: int, data_parallel: int = 1) -> int:
  """The number of chunks; clear errors for sizes that do not divide."""
  if chunk_size <= 0:
    raise ValueError(f"grad_cache.chunk_size must be > 0, got {chunk_size}")
  if batch_size % chunk_size:
    raise ValueError(f"grad_cache.chunk_size {chunk_size} must divide the per-step batch {batch_size}")
  if chunk_size % data_parallel:
    raise ValueError(f"grad_cache.chunk_size {chunk_size} must be a multiple of the data-parallel size "
                     f"{data_parallel} (each chunk spans every device)")
  return batch_size // chunk_size


def to_chunks(x: Array, n: int) -> Array:
  """[B, ...] -> [n, B / n, ...], chunk i = rows i, i + n, i + 2n, ..."""
  return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)


def from_chunks(x: Array) -> Array:
  """The inverse of `to_chunks`: [n, c, ...] -> [n * c, ...] in batch order."""
  return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def chunk_rows(n: int, batch_size: int) -> Array:
  """int32 [n, c]: the batch row of each chunk position (for tasks that key per-row randomness)."""
  return to_chunks(jnp.arange(batch_size, dtype=jnp.int32), n)


def _check_reps(reps: Any) -> None:
  if not isinstance(reps, dict) or set(reps) - {"rows", "sums"}:
    raise TypeError("grad_cache encode must return {'rows': {...}, 'sums': {...}}, got "
                    f"{type(reps).__name__} with keys {sorted(reps) if isinstance(reps, dict) else '-'}")


def _gather(reps_n: dict) -> dict:
  """Per-chunk outputs [n, ...] -> the whole batch's: rows in batch order, sums added."""
  return {"rows": jax.tree.map(from_chunks, reps_n.get("rows", {})),
          "sums": jax.tree.map(lambda s: jnp.sum(s, axis=0), reps_n.get("sums", {}))}


def _scatter_grads(g: dict, n: int) -> dict:
  """d loss / d reps of the whole batch -> per chunk: rows split as the chunks, each chunk's sum gets the
  total's gradient (a sum's gradient is the same for every addend)."""
  return {"rows": jax.tree.map(lambda x: to_chunks(x, n), g.get("rows", {})),
          "sums": jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), g.get("sums", {}))}


def _encode(parts: Parts, params: Any, chunk: dict, key: Array, index: Array, n: int, b: int, step_rng: Array) -> dict:
  """`parts.encode` on one chunk, its fields plus `_chunk_index` (scalar), `_rows` (int32 [c]: the chunk's batch
  rows), `_batch_size` (scalar B) and `_step_rng` (the step's key, for randomness keyed by batch row)."""
  extra = {"_chunk_index": index, "_rows": chunk_rows(n, b)[index], "_batch_size": jnp.int32(b),
           "_step_rng": step_rng}
  out = parts.encode(params, {**chunk, **extra}, key)
  _check_reps(out)
  return {"rows": out.get("rows", {}), "sums": out.get("sums", {})}


def chunked_loss(parts: Parts, params: Any, batch: dict, rng: Array, chunk_size: int) -> tuple[Array, dict]:
  """The loss exactly as the cached step computes it (chunk-keyed randomness), differentiable end to end (keeps
  every chunk's activations): the reference the cached gradient equals."""
  b = _batch_size(batch)
  n = check_chunking(b, chunk_size)
  chunks = jax.tree.map(lambda x: to_chunks(x, n), batch)
  index = jnp.arange(n, dtype=jnp.int32)
  keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(index)
  reps_n = jax.lax.map(lambda xs: _encode(parts, params, *xs, n, b, rng), (chunks, keys, index))
  return parts.loss(params, _gather(reps_n), batch, rng)


def value_and_grad(parts: Parts, params: Any, batch: dict, rng: Array, chunk_size: int,
                   data_parallel: int = 1) -> tuple[tuple[Array, dict], Any]:
  """((loss, aux), grads) of `parts.loss(params, encode-all(params))` with one chunk's activations alive at a time
  (module docstring). `batch` fields are [B, ...]; encode sees a chunk's fields [c, ...] plus the extras of
  `_encode`."""
  b = _batch_size(batch)
  n = check_chunking(b, chunk_size, data_parallel)
  chunks = jax.tree.map(lambda x: to_chunks(x, n), batch)
  index = jnp.arange(n, dtype=jnp.int32)
  keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(index)

  def encode(p, ch, k, i):
    return _encode(parts, p, ch, k, i, n, b, rng)

  # 1. representations of every chunk, no gradient (nothing is kept for a backward pass)
  frozen = jax.lax.stop_gradient(params)
  reps_n = jax.lax.map(lambda xs: encode(frozen, *xs), (chunks, keys, index))
  reps = _gather(reps_n)
  # 2. the loss on the whole batch, its gradient w.r.t. the representations (and the params it reads itself)
  (loss, aux), (g_params, g_reps) = jax.value_and_grad(
      lambda p, r: parts.loss(p, r, batch, rng), argnums=(0, 1), has_aux=True)(params, reps)
  g_n = _scatter_grads(g_reps, n)

  # 3. each chunk again, its representation gradient pulled back through the encoder
  def body(acc, xs):
    ch, k, i, g = xs
    _, pull = jax.vjp(lambda p: encode(p, ch, k, i), params)
    (gp,) = pull(g)
    return jax.tree.map(jnp.add, acc, gp), None

  grads, _ = jax.lax.scan(body, g_params, (chunks, keys, index, g_n))
  return (loss, aux), grads
