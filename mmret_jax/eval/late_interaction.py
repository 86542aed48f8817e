"""BagFormer first-stage scoring: bag-wise late interaction over a whole pool, on device, in blocks.

BagFormer (shared/reference/bagformer.md §5) scores every (query, image) pair of the evaluation pool
with the seed's `tokenwise_similarity_martix` before ITM re-ranking:
  s_t2i[t, i] = sum_k max_p <T_t,k, V_i,p>      (query bags over image tokens)
  s_i2t[i, t] = sum_p max_k <V_i,p, T_t,k>      (image tokens over query bags; s_i2t != s_t2i^T)
Shapes: Nt queries x K bags x E (masked bags are zero vectors), Ni images x P tokens x E (257 x 256 at
MUGE settings). The seed loops over rows and computes the token-by-token products twice; here both
directions come from one [bt, bi, K, P] block of products, and the [Nt, Ni, K, P] tensor (~50 TB at
MUGE valid size) is never built.

Blocks: bt queries x bi images; the block's float32 products take at most half of
`memory_budget_bytes` (the other half is headroom for XLA's temporaries). The default budget is
`default_memory_budget`: 16 MiB on CPU (the block stays near the caches: 18 x 18 blocks at K=25,
P=257), an eighth of the accelerator's memory limit elsewhere. Explicit `text_block` /
`image_block` override it. Every block has the same static shape, so one jitted function serves the
whole pool: a ragged last block is not padded but shifted back to end at the last row, and the rows
it scores twice are dropped (no padded copy of the pool is made). Results do not depend on the block
sizes. One jitted call per query block runs a `fori_loop` over the image blocks (compiled once per
(bt, pool shape)).

`topk_first_stage` keeps only the best k per row (both directions) while scanning, so a 5k x 30k
pool needs no full matrix; ties keep the lower index first (as `retrieval.topk_device`).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Default block budget on a CPU backend, in bytes of float32 block products (x 2 for headroom).
CPU_MEMORY_BUDGET = 16 << 20
# Fraction of an accelerator's `bytes_limit` used by default; 1 GiB when the device reports none.
ACCELERATOR_BUDGET_FRACTION = 8
ACCELERATOR_FALLBACK_BUDGET = 1 << 30
# A progress bar appears from this many blocks on (when `progress=True`).
PROGRESS_MIN_BLOCKS = 64


class FirstStageTopK(NamedTuple):
  """Best k of each row in both directions, best first (ties: lower index first)."""
  t2i_scores: np.ndarray   # [Nt, min(k, Ni)] float32
  t2i_indices: np.ndarray  # [Nt, min(k, Ni)] int64 image rows
  i2t_scores: np.ndarray   # [Ni, min(k, Nt)] float32
  i2t_indices: np.ndarray  # [Ni, min(k, Nt)] int64 query rows


def default_memory_budget(device=None) -> int:
  """Bytes per block: CPU_MEMORY_BUDGET on CPU, else bytes_limit / ACCELERATOR_BUDGET_FRACTION."""
  device = device if device is not None else jax.devices()[0]
  if device.platform == "cpu":
    return CPU_MEMORY_BUDGET
  try:
    limit = (device.memory_stats() or {}).get("bytes_limit")
  except (AttributeError, NotImplementedError, RuntimeError):
    limit = None
  return int(limit) // ACCELERATOR_BUDGET_FRACTION if limit else ACCELERATOR_FALLBACK_BUDGET


def block_sizes(num_texts: int, num_images: int, bags: int, tokens: int, *, text_block: int | None = None,
                image_block: int | None = None, memory_budget_bytes: int | None = None) -> tuple[int, int]:
  """(bt, bi): explicit sizes win; the rest fill the budget, bt * bi * K * P * 4 <= budget / 2.

  With neither given the block is about square (bt ~ sqrt of the pairs the budget allows). Both are
  clamped to [1, N] of their side.
  """
  for name, v in (("text_block", text_block), ("image_block", image_block),
                  ("memory_budget_bytes", memory_budget_bytes)):
    if v is not None and int(v) < 1:
      raise ValueError(f"{name} must be >= 1, got {v}")
  budget = default_memory_budget() if memory_budget_bytes is None else int(memory_budget_bytes)
  pairs = max(1, budget // (2 * 4 * max(1, bags) * max(1, tokens)))
  nt, ni = max(1, int(num_texts)), max(1, int(num_images))
  if text_block is None and image_block is None:
    bt = min(nt, max(1, math.isqrt(pairs)))
    bi = min(ni, max(1, pairs // bt))
  elif image_block is None:
    bt = min(nt, int(text_block))
    bi = min(ni, max(1, pairs // bt))
  elif text_block is None:
    bi = min(ni, int(image_block))
    bt = min(nt, max(1, pairs // bi))
  else:
    bt, bi = min(nt, int(text_block)), min(ni, int(image_block))
  return bt, bi


def _block_scores(t: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[bt, K, E], [bi, P, E] -> (t2i [bt, bi] = sum_k max_p, i2t [bi, bt] = sum_p max_k), one GEMM."""
  (bt, k, e), (bi, p, _) = t.shape, v.shape
  s = jnp.matmul(t.reshape(bt * k, e), v.reshape(bi * p, e).T, precision=lax.Precision.HIGHEST)
  s = s.reshape(bt, k, bi, p)
  return s.max(3).sum(1), s.max(1).sum(2).T


def _window(j, block: int, n: int):
  """Start of block j, shifted back so the block ends at n at most; and the first row it adds."""
  new = j * block
  return jnp.minimum(new, n - block), new


@functools.partial(jax.jit, static_argnames="image_block")
def _row_full(t, images, *, image_block: int):
  """Both score blocks of one text block t [bt, K, E] against the whole pool: [bt, Ni], [Ni, bt]."""
  text_block, ni = t.shape[0], images.shape[0]

  def body(j, carry):
    t2i, i2t = carry
    start, _ = _window(j, image_block, ni)
    a, b = _block_scores(t, lax.dynamic_slice_in_dim(images, start, image_block))
    return lax.dynamic_update_slice(t2i, a, (0, start)), lax.dynamic_update_slice(i2t, b, (start, 0))

  init = (jnp.zeros((text_block, ni), jnp.float32), jnp.zeros((ni, text_block), jnp.float32))
  return lax.fori_loop(0, -(-ni // image_block), body, init)


def _merge(best_s, best_i, new_s, new_ids, k: int):
  """Top k of [rows, k'] running best + [rows, m] new candidates; running best first, so on equal
  scores the earlier (lower) index wins (`lax.top_k` keeps the lower position first)."""
  cat_s = jnp.concatenate([best_s, new_s], axis=1)
  cat_i = jnp.concatenate([best_i, jnp.broadcast_to(new_ids[None, :], new_s.shape)], axis=1)
  s, pos = lax.top_k(cat_s, k)
  return s, jnp.take_along_axis(cat_i, pos, axis=1)


@functools.partial(jax.jit, static_argnames=("image_block", "k_t2i"), donate_argnums=(4, 5))
def _row_topk(t, t_start, t_new, images, i2t_s, i2t_i, *, image_block: int, k_t2i: int):
  """Top-k of the text block t [bt, K, E] (rows t_start...) over the pool ([bt, k_t2i]) and the running
  image-side top-k [Ni, k_i2t] updated with these texts (those below `t_new` were merged before: skipped)."""
  text_block, ni, k_i2t = t.shape[0], images.shape[0], i2t_s.shape[1]
  t_ids = t_start + jnp.arange(text_block, dtype=jnp.int32)
  t_ok = t_ids >= t_new

  def body(j, carry):
    best_s, best_i, run_s, run_i = carry
    start, new = _window(j, image_block, ni)
    i_ids = start + jnp.arange(image_block, dtype=jnp.int32)
    i_ok = i_ids >= new  # rows of a shifted last block scored before: neither candidates nor updated
    a, b = _block_scores(t, lax.dynamic_slice_in_dim(images, start, image_block))
    best_s, best_i = _merge(best_s, best_i, jnp.where(i_ok[None, :], a, -jnp.inf), i_ids, k_t2i)
    cur_s = lax.dynamic_slice(run_s, (start, 0), (image_block, k_i2t))
    cur_i = lax.dynamic_slice(run_i, (start, 0), (image_block, k_i2t))
    m_s, m_i = _merge(cur_s, cur_i, jnp.where(t_ok[None, :], b, -jnp.inf), t_ids, k_i2t)
    m_s, m_i = jnp.where(i_ok[:, None], m_s, cur_s), jnp.where(i_ok[:, None], m_i, cur_i)
    return best_s, best_i, lax.dynamic_update_slice(run_s, m_s, (start, 0)), lax.dynamic_update_slice(
        run_i, m_i, (start, 0))

  init = (jnp.full((text_block, k_t2i), -jnp.inf, jnp.float32), jnp.full((text_block, k_t2i), -1, jnp.int32),
          i2t_s, i2t_i)
  return lax.fori_loop(0, -(-ni // image_block), body, init)


def _prepare(text_bags, image_tokens, text_block, image_block, memory_budget_bytes):
  """Device float32 arrays, shape checks, block sizes."""
  shapes = (np.shape(text_bags), np.shape(image_tokens))
  if len(shapes[0]) != 3 or len(shapes[1]) != 3 or shapes[0][2] != shapes[1][2]:
    raise ValueError(f"text_bags [Nt, K, E] and image_tokens [Ni, P, E] needed, got {shapes[0]} and {shapes[1]}")
  if 0 in shapes[0][1:] or 0 in shapes[1][1:]:
    raise ValueError(f"empty bag / token / feature axis: text_bags {shapes[0]}, image_tokens {shapes[1]}")
  (nt, k, _), (ni, p, _) = shapes
  bt, bi = block_sizes(nt, ni, k, p, text_block=text_block, image_block=image_block,
                       memory_budget_bytes=memory_budget_bytes)
  texts = jnp.asarray(text_bags, jnp.float32)
  images = jnp.asarray(image_tokens, jnp.float32)
  return texts, images, nt, ni, bt, bi


def _text_block(texts: jax.Array, start: int, size: int) -> jax.Array:
  """texts[start : start + size] on device; the start is an operand, so one compile serves all blocks."""
  return lax.dynamic_slice_in_dim(texts, jnp.int32(start), size)


def _bar(progress: bool, total: int, desc: str):
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, desc=desc, unit="block", disable=not progress or total < PROGRESS_MIN_BLOCKS)


def _check_finite(*arrays: np.ndarray) -> None:
  for a in arrays:
    if not np.isfinite(a).all():
      raise ValueError("late-interaction scores are not finite: the text or image features hold NaN or inf")


def first_stage_scores(text_bags, image_tokens, *, text_block: int | None = None, image_block: int | None = None,
                       memory_budget_bytes: int | None = None, progress: bool = True
                       ) -> tuple[np.ndarray, np.ndarray]:
  """Full first-stage score matrices of a pool (the seed's `tokenwise_similarity_martix`).

  Args:
    text_bags: [Nt, K, E] query bag features (numpy or jax; masked bags zero).
    image_tokens: [Ni, P, E] image token features; put on the default device once.
    text_block, image_block, memory_budget_bytes: block sizes (see `block_sizes`).
    progress: a tqdm bar (stderr) when there are at least PROGRESS_MIN_BLOCKS blocks.
  Returns:
    (s_t2i [Nt, Ni], s_i2t [Ni, Nt]) float32 numpy, on the host.
  """
  texts, images, nt, ni, bt, bi = _prepare(text_bags, image_tokens, text_block, image_block, memory_budget_bytes)
  s_t2i, s_i2t = np.zeros((nt, ni), np.float32), np.zeros((ni, nt), np.float32)
  if nt == 0 or ni == 0:
    return s_t2i, s_i2t
  n_tb, n_ib = -(-nt // bt), -(-ni // bi)
  with _bar(progress, n_tb * n_ib, "late interaction") as bar:
    pending = None
    for tb in range(n_tb + 1):  # one block row in flight while the previous one is copied out
      nxt = None
      if tb < n_tb:
        start = min(tb * bt, nt - bt)
        nxt = (start, _row_full(_text_block(texts, start, bt), images, image_block=bi))
      if pending is not None:
        start, (a, b) = pending
        s_t2i[start:start + bt] = np.asarray(a)
        s_i2t[:, start:start + bt] = np.asarray(b)
        bar.update(n_ib)
      pending = nxt
  _check_finite(s_t2i, s_i2t)
  return s_t2i, s_i2t


def topk_first_stage(text_bags, image_tokens, k: int, *, text_block: int | None = None,
                     image_block: int | None = None, memory_budget_bytes: int | None = None,
                     progress: bool = True) -> FirstStageTopK:
  """Best k first-stage scores per query (over images) and per image (over queries), in one scan.

  Same scores as `first_stage_scores`; only [Nt, k] + [Ni, k] results are kept (on device while
  scanning). Rows are sorted by score, highest first; equal scores keep the lower index first.
  k is clamped to the other side's size.
  """
  if int(k) < 1:
    raise ValueError(f"need k >= 1, got {k}")
  texts, images, nt, ni, bt, bi = _prepare(text_bags, image_tokens, text_block, image_block, memory_budget_bytes)
  k_t2i, k_i2t = min(int(k), ni), min(int(k), nt)
  t2i_s, t2i_i = np.zeros((nt, k_t2i), np.float32), np.zeros((nt, k_t2i), np.int64)
  if nt == 0 or ni == 0:
    return FirstStageTopK(t2i_s, t2i_i, np.zeros((ni, k_i2t), np.float32), np.zeros((ni, k_i2t), np.int64))
  run_s = jnp.full((ni, k_i2t), -jnp.inf, jnp.float32)
  run_i = jnp.full((ni, k_i2t), -1, jnp.int32)
  n_tb, n_ib = -(-nt // bt), -(-ni // bi)
  with _bar(progress, n_tb * n_ib, "late interaction top-k") as bar:
    pending = None
    for tb in range(n_tb + 1):
      nxt = None
      if tb < n_tb:
        start = min(tb * bt, nt - bt)
        best_s, best_i, run_s, run_i = _row_topk(_text_block(texts, start, bt), start, tb * bt, images, run_s,
                                                 run_i, image_block=bi, k_t2i=k_t2i)
        nxt = (start, best_s, best_i)
      if pending is not None:
        start, best_s, best_i = pending
        t2i_s[start:start + bt], t2i_i[start:start + bt] = np.asarray(best_s), np.asarray(best_i)
        bar.update(n_ib)
      pending = nxt
  out = FirstStageTopK(t2i_s, t2i_i, np.asarray(run_s), np.asarray(run_i).astype(np.int64))
  _check_finite(out.t2i_scores, out.i2t_scores)
  return out
