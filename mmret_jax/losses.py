"""Losses: InfoNCE (one- and two-way) over the global batch, MLM cross-entropy and token masking.

Under `jax.jit` with sharded inputs every array here is the *global* batch, so
the in-batch negatives of a contrastive loss span all devices and hosts (the
seed's DDP all_gather, without the gather).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Rows scaled to unit L2 norm (torch F.normalize semantics)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def cosine_logits(a: jax.Array, b: jax.Array, scale: jax.Array | float, eps: float = 1e-8) -> jax.Array:
  """[B, D], [M, D] -> [B, M] float32: cos(a_i, b_j) * scale (torch CosineSimilarity semantics)."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  na = jnp.linalg.norm(a, axis=-1, keepdims=True)
  nb = jnp.linalg.norm(b, axis=-1, keepdims=True)
  return (a @ b.T) / jnp.maximum(na * nb.T, eps) * scale


def info_nce(logits: jax.Array, symmetric: bool = False, valid: jax.Array | None = None) -> jax.Array:
  """Cross-entropy with the diagonal as targets; `symmetric` averages both directions.

  `valid` [B] bool: rows (and the matching columns) that take part; padding rows are neither
  queries nor negatives, so a padded batch gives the loss of its valid rows alone.
  """
  labels = jnp.arange(logits.shape[0])
  if valid is None:
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    if symmetric:
      loss = 0.5 * (loss + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())
    return loss
  valid = valid.astype(bool)
  keep = valid[:, None] & valid[None, :]
  logits = jnp.where(keep, logits, -1e30)  # finite: padding rows stay NaN-free before masking
  n = jnp.maximum(valid.sum(), 1)

  def mean_ce(lg):
    return jnp.sum(jnp.where(valid, optax.softmax_cross_entropy_with_integer_labels(lg, labels), 0.0)) / n
  loss = mean_ce(logits)
  if symmetric:
    loss = 0.5 * (loss + mean_ce(logits.T))
  return loss


def _diag_ce(logits: jax.Array) -> jax.Array:
  """Mean CE of the rows of [B, B] logits with the diagonal as targets."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(logits.shape[0])).mean()


def sigmoid_loss(logits: jax.Array, bias: jax.Array | float = 0.0, valid: jax.Array | None = None) -> jax.Array:
  """SigLIP's pairwise sigmoid loss: -sum_ij log sigmoid(z_ij (logits_ij + bias)) / (valid rows), z = +1 on the
  diagonal, -1 elsewhere; pairs with an invalid row or column are left out."""
  n = logits.shape[0]
  z = 2.0 * jnp.eye(n, dtype=jnp.float32) - 1.0
  terms = jax.nn.log_sigmoid(z * (logits.astype(jnp.float32) + bias))
  if valid is None:
    return -jnp.sum(terms) / n
  valid = valid.astype(bool)
  keep = valid[:, None] & valid[None, :]
  return -jnp.sum(jnp.where(keep, terms, 0.0)) / jnp.maximum(valid.sum(), 1)


_FAR = -1e30  # a finite "minus infinity" for masked logits (as info_nce's)


def _ring_axes(mesh, axes) -> tuple[tuple[str, ...], int]:
  names = tuple(a for a in axes if a in mesh.shape)
  missing = [a for a in axes if a not in mesh.shape]
  if missing:
    raise ValueError(f"ring loss: mesh has no axis {missing} (its axes: {tuple(mesh.shape)})")
  return names, math.prod(mesh.shape[a] for a in names)


def _ring_blocks(x, travel, n, axes, step_fn, init):
  """Runs `step_fn(carry, x, *travel_block, origin)` for the n blocks of the ring: this device's `travel` block
  first (a pytree: the candidate rows and their valid mask), then each block passed on by `ppermute` (device k
  sends to k + 1, so at step t a device holds the block of device i - t). One [b, b] logits block is alive at a
  time, forward and backward."""
  i = jax.lax.axis_index(axes)
  perm = [(k, (k + 1) % n) for k in range(n)]

  # rematerialised: the backward pass recomputes each step's [b, b] block from the carry instead of storing n of
  # them, so what is kept per step is the travelling block and the [b] accumulators
  @jax.checkpoint
  def body(carry, t):
    acc, block = carry
    acc = step_fn(acc, x, *block, (i - t) % n)
    return (acc, jax.lax.ppermute(block, axes, perm)), None
  init = jax.tree.map(lambda a: jax.lax.pcast(a, axes, to="varying"), init)  # per-device accumulators
  (acc, _), _ = jax.lax.scan(body, (init, travel), jnp.arange(n))
  return acc


def _ring_rows(mesh, axes, rows) -> tuple[tuple[str, ...], int, int]:
  """(axis names, ring size n, global rows B) of the row-sharded pytree `rows`, checked."""
  names, n = _ring_axes(mesh, axes)
  sizes = {x.shape[0] for x in jax.tree.leaves(rows)}
  if len(sizes) != 1:
    raise ValueError(f"ring loss: every row input needs the same number of rows, got {sorted(sizes)}")
  (b,) = sizes
  if b % n:
    raise ValueError(f"ring loss: batch {b} does not split over the {n} devices of axes {names}")
  return names, n, b


def _ring_ce_sum(logits_fn, x, y, v, vy, consts, n, names):
  """Inside the ring: the sum over this device's valid rows a of CE(L[a, :], target a), L[a, j] =
  logits_fn(x rows, y rows, *consts) with invalid columns left out (an online log-sum-exp over the blocks)."""
  i = jax.lax.axis_index(names)
  b = v.shape[0]

  def step(acc, xb, yb, vb, origin):
    m, s, pos = acc
    lg = jnp.where(vb[None, :], logits_fn(xb, yb, *consts).astype(jnp.float32), _FAR)
    m_new = jnp.maximum(m, jnp.max(lg, axis=1))
    s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(lg - m_new[:, None]), axis=1)
    pos = jnp.where(origin == i, jnp.diagonal(lg), pos)
    return m_new, s, pos
  init = (jnp.full((b,), _FAR, jnp.float32), jnp.zeros((b,), jnp.float32), jnp.zeros((b,), jnp.float32))
  m, s, pos = _ring_blocks(x, (y, vy), n, names, step, init)
  return jnp.sum(jnp.where(v, m + jnp.log(s) - pos, 0.0))


def _dot_logits(x, y, scale):
  """scale x @ y.T in float32 (the scale applied to x first, as the dense losses always did)."""
  return (scale * x.astype(jnp.float32)) @ y.astype(jnp.float32).T


def ring_cross_entropy(logits_fn, x, y, mesh, *, consts=(), axes: tuple[str, ...] = ("data", "fsdp"),
                       valid: jax.Array | None = None) -> jax.Array:
  """Mean over the valid rows a of CE(L[a, :], target a) for any logits L[a, j] = logits_fn(x_a, y_j, *consts)
  that a block of rows can compute ([b, ...] pytree x, [b', ...] pytree y -> [b, b'] float32), without L: x and y
  are pytrees of [B, ...] arrays with rows sharded over `axes` of `mesh`; each device keeps its x rows and the y
  blocks travel around the ring (`ppermute`), one [b, b] block alive at a time, forward and backward. `consts`:
  arrays every device sees whole (a learnable scale). `valid` [B]: rows (and the matching columns) that take part.
  Equals `info_nce(L, valid=valid)` (one direction)."""
  names, n, rows = _ring_rows(mesh, axes, (x, y))
  valid = jnp.ones(rows, bool) if valid is None else valid.astype(bool)
  consts = tuple(jnp.asarray(k, jnp.float32) for k in consts)
  rep, spec = jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec(names)

  def local(x, y, v, consts):
    count = jnp.maximum(jax.lax.psum(jnp.sum(v), names), 1).astype(jnp.float32)
    return jax.lax.psum(_ring_ce_sum(logits_fn, x, y, v, v, consts, n, names), names) / count
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, rep), out_specs=rep)(x, y, valid, consts)


def ring_contrastive_loss(q: jax.Array, c: jax.Array, scale: jax.Array | float, mesh, *,
                          axes: tuple[str, ...] = ("data", "fsdp"), kind: str = "info_nce", symmetric: bool = False,
                          valid: jax.Array | None = None, bias: jax.Array | float = 0.0) -> jax.Array:
  """The contrastive loss over the global batch without a [B, B] matrix anywhere: q, c [B, D] (rows sharded over
  `axes` of `mesh`, B = n b) stay on their devices; candidate blocks [b, D] travel around the ring of the n
  devices (`ppermute`), each device computing [b, b] logits blocks (memory O(b x B) per device with the
  backward pass, never B x B).

  kind "info_nce": equals `info_nce(scale * q @ c.T, symmetric, valid)` (`ring_cross_entropy`; the column
  direction passes the queries around instead); "sigmoid": equals `sigmoid_loss(scale * q @ c.T, bias, valid)`.
  q and c are used as given (normalise them first for cosine logits)."""
  if kind not in ("info_nce", "sigmoid"):
    raise ValueError(f"ring loss kind must be info_nce or sigmoid, got {kind!r}")
  if q.shape != c.shape or q.ndim != 2:
    raise ValueError(f"ring loss wants q and c of one shape [B, D], got {q.shape} and {c.shape}")
  if kind == "info_nce":
    loss = ring_cross_entropy(_dot_logits, q, c, mesh, consts=(scale,), axes=axes, valid=valid)
    if symmetric:
      loss = 0.5 * (loss + ring_cross_entropy(_dot_logits, c, q, mesh, consts=(scale,), axes=axes, valid=valid))
    return loss
  names, n, rows = _ring_rows(mesh, axes, (q, c))
  valid = jnp.ones(rows, bool) if valid is None else valid.astype(bool)
  rep, spec = jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec(names)

  def local(q, c, v, scale, bias):
    i = jax.lax.axis_index(names)
    eye = jnp.eye(q.shape[0], dtype=bool)

    def step(acc, xb, yb, vb, origin):
      z = jnp.where((origin == i) & eye, 1.0, -1.0)
      t = jax.nn.log_sigmoid(z * (_dot_logits(xb, yb, scale) + bias))
      return acc + jnp.sum(jnp.where(v[:, None] & vb[None, :], t, 0.0))
    count = jnp.maximum(jax.lax.psum(jnp.sum(v), names), 1).astype(jnp.float32)
    return -jax.lax.psum(_ring_blocks(q, (c, v), n, names, step, jnp.zeros((), jnp.float32)), names) / count

  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, rep, rep), out_specs=rep)(
      q, c, valid, jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32))


def masked_lm_loss(logits: jax.Array, labels: jax.Array, ignore_index: int = -100) -> jax.Array:
  """Mean token cross-entropy over positions whose label != ignore_index (0 if none)."""
  valid = labels != ignore_index
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                       jnp.where(valid, labels, 0))
  return jnp.sum(ce * valid) / jnp.maximum(valid.sum(), 1)


def mlm_prediction_cap(tokens: int, probability: float, max_predictions: int = 0, rows: int = 1) -> int:
  """Static number of MLM head positions for a group of `tokens` positions (`rows` sequences).
  `max_predictions` > 0: that many per sequence (x rows, at most `tokens`); -1: every position (the
  seed's full-sequence head); 0 = auto: the binomial mean plus 6 standard deviations, so that a
  group overflows with probability < 1e-7 (one row of 64 tokens at p=0.15: 28; 4096 tokens: 753)."""
  if max_predictions == -1:
    return tokens
  if max_predictions > 0:
    return min(tokens, int(max_predictions) * rows)
  if max_predictions != 0:
    raise ValueError(f"mlm_max_predictions must be -1 (all), 0 (auto) or > 0, got {max_predictions}")
  p = float(probability)
  return min(tokens, math.ceil(p * tokens + 6.0 * math.sqrt(tokens * p * (1.0 - p))) + 1)


def select_mlm_positions(labels: jax.Array, cap: int, groups: int | None = None, ignore_index: int = -100
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The labelled positions of `labels` [B, L], for a head that runs only there.

  The B*L positions are split into `groups` equal contiguous groups (default B: one per row; use
  the number of batch shards so a group never spans devices). Per group: the first `cap` positions
  whose label != ignore_index, in order, then unlabelled ones as filler. Returns (positions
  [groups, cap] int32 into the group's flattened tokens, their labels [groups, cap] (filler =
  ignore_index), number of labelled positions that did not fit). With no overflow the MLM loss
  over the selected positions equals the loss over every position exactly."""
  groups = labels.shape[0] if groups is None else int(groups)
  if labels.size % groups:
    raise ValueError(f"{labels.shape[0]} rows do not split into {groups} MLM groups")
  flat = labels.reshape(groups, -1)
  if cap >= flat.shape[1]:
    pos = jnp.broadcast_to(jnp.arange(flat.shape[1], dtype=jnp.int32), flat.shape)
    return pos, flat, jnp.zeros((), jnp.int32)
  valid = flat != ignore_index
  # Stable sort on "not labelled": labelled positions first, in sequence order.
  pos = jnp.argsort(~valid, axis=1, stable=True)[:, :cap].astype(jnp.int32)
  sel = jnp.take_along_axis(flat, pos, axis=1)
  dropped = jnp.maximum(valid.sum(axis=1) - cap, 0).sum().astype(jnp.int32)
  return pos, sel, dropped


def mask_tokens(rng: jax.Array, input_ids: jax.Array, special: jax.Array, *, mask_token_id: int,
                vocab_size: int, probability: float = 0.15) -> tuple[jax.Array, jax.Array]:
  """BERT masking (as the seed's data collator): pick `probability` of non-special tokens; of those
  80% -> mask token, 10% -> a random id, 10% unchanged. Returns (masked ids, labels with -100)."""
  k1, k2, k3, k4 = jax.random.split(rng, 4)
  picked = jax.random.bernoulli(k1, probability, input_ids.shape) & ~special
  labels = jnp.where(picked, input_ids, -100)
  to_mask = picked & jax.random.bernoulli(k2, 0.8, input_ids.shape)
  to_random = picked & ~to_mask & jax.random.bernoulli(k3, 0.5, input_ids.shape)
  random_ids = jax.random.randint(k4, input_ids.shape, 0, vocab_size, input_ids.dtype)
  out = jnp.where(to_mask, mask_token_id, input_ids)
  return jnp.where(to_random, random_ids, out), labels


# ----------------------------------------------------------------------------- composed image retrieval
# Bi-BLIP4CIR (shared/reference/bi_blip4cir.md, seed `src/clip_fine_tune.py` and `src/combiner_train.py`).
# ref, tgt: raw image features [B, D]; txt_f / txt_b: raw text features of the forward / backward caption.
# Forward: logits[a, b] = scale * <C(ref_a, txt_f_a), n(tgt_b)>, CE with targets a.
# Reversed: logits_r[a, b] = scale * <C(T_b, txt_b_a), n(ref_a)>, CE with targets a, where T = n(tgt) in
# stage I (its targets are normalised on extraction) and the raw tgt in stage II, as the seed does.


def element_wise_sum(image: jax.Array, text: jax.Array) -> jax.Array:
  """Stage-I fusion: normalize(image + text) (seed `utils.element_wise_sum`)."""
  return l2_normalize(image.astype(jnp.float32) + text.astype(jnp.float32))


def _cir_reversed_logits(x, t_n, scale):
  """Stage-I reversed logits [a, b] = scale <n(t_b + w_a), r_a> of x = (r_n [a, D] the normalised reference
  features, w [a, D] the backward captions' raw text features) and t_n [b, D] the normalised targets, from dot
  products: (<t_b, r_a> + <w_a, r_a>) / max(|t_b + w_a|, 1e-12) with |t_b + w_a|^2 = |t_b|^2 + |w_a|^2 +
  2 <t_b, w_a>, without the [a, b, D] tensor."""
  r_n, w = x
  num = r_n @ t_n.T + jnp.sum(w * r_n, axis=-1, keepdims=True)
  sq = jnp.sum(t_n * t_n, -1)[None, :] + jnp.sum(w * w, -1, keepdims=True) + 2.0 * w @ t_n.T
  return scale * num / jnp.maximum(jnp.sqrt(jnp.maximum(sq, 0.0)), 1e-12)


def cir_sum_losses(ref: jax.Array, tgt: jax.Array, txt_f: jax.Array, txt_b: jax.Array,
                   scale: float = 100.0, mesh=None) -> tuple[jax.Array, jax.Array]:
  """Stage I (element-wise sum fusion): (forward loss, reversed loss); `_cir_reversed_logits` for the latter.
  With a `mesh`, both through the ring over its data x fsdp devices (`ring_cross_entropy`: the target blocks
  travel, no [B, B] matrix), with the same values."""
  ref, tgt, txt_f, txt_b = (x.astype(jnp.float32) for x in (ref, tgt, txt_f, txt_b))
  t_n, query, x_r = l2_normalize(tgt), element_wise_sum(ref, txt_f), (l2_normalize(ref), txt_b)
  if mesh is not None:
    return (ring_cross_entropy(_dot_logits, query, t_n, mesh, consts=(scale,)),
            ring_cross_entropy(_cir_reversed_logits, x_r, t_n, mesh, consts=(scale,)))
  return _diag_ce(_dot_logits(query, t_n, scale)), _diag_ce(_cir_reversed_logits(x_r, t_n, scale))


def cir_combiner_losses(combine, ref: jax.Array, tgt: jax.Array, txt_f: jax.Array, txt_b: jax.Array,
                        scale: float = 100.0) -> tuple[jax.Array, jax.Array]:
  """Stage II (Combiner fusion `combine(image, text) -> normalised`): (forward loss, reversed loss).
  The reversed term combines every (raw target b, backward caption a) pair: [B, B, D]."""
  ref, tgt, txt_f, txt_b = (x.astype(jnp.float32) for x in (ref, tgt, txt_f, txt_b))
  b = ref.shape[0]
  labels = jnp.arange(b)
  ce = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  loss_f = ce(scale * combine(ref, txt_f) @ l2_normalize(tgt).T)
  pairs = combine(jnp.broadcast_to(tgt[None, :, :], (b, b, tgt.shape[-1])),
                  jnp.broadcast_to(txt_b[:, None, :], (b, b, txt_b.shape[-1])))  # [a, b, D]
  logits_r = scale * jnp.einsum("abd,ad->ab", pairs, l2_normalize(ref))
  return loss_f, ce(logits_r)


# ----------------------------------------------------------------------------- UniIR
# shared/reference/uniir.md; seed `clip_sf.py::compute_inbatch_contrastive_loss` (CLIP variants) and
# `blip_sf.py::compute_contrastive_loss`, `_dequeue_and_enqueue`, `_momentum_update` (BLIP variants).


def uniir_inbatch_loss(query: jax.Array, cand: jax.Array, scale: jax.Array | float, mesh=None) -> jax.Array:
  """CLIP-SF/FF: CE(scale * n(q) n(p)^T, diagonal), query -> candidate only. Under `jit` the
  candidates are the global batch: the seed's all-gather of the positives (with gradient). With a `mesh`, through
  the ring over its data x fsdp devices (`ring_cross_entropy`), with the same value."""
  q, c = l2_normalize(query.astype(jnp.float32)), l2_normalize(cand.astype(jnp.float32))
  if mesh is not None:
    return ring_cross_entropy(_dot_logits, q, c, mesh, consts=(scale,))
  return _diag_ce(_dot_logits(q, c, scale))


def uniir_queue_loss(query: jax.Array, cand: jax.Array, query_m: jax.Array, cand_m: jax.Array, cand_ids: jax.Array,
                     query_queue: jax.Array, cand_queue: jax.Array, id_queue: jax.Array, temp: jax.Array | float,
                     alpha: jax.Array | float) -> jax.Array:
  """BLIP-SF/FF momentum + queue contrastive loss, both directions.

  Args:
    query, cand: [B, D] embeddings of the online encoder (normalised here).
    query_m, cand_m: [B, D] momentum-encoder embeddings (normalised here; no gradient).
    cand_ids: [B] int hashed id of each positive candidate; positives = equal ids, so duplicates in the
      batch or the queue count (targets row-normalised).
    query_queue, cand_queue: [D, Q] (the seed's layout); id_queue: [Q] (-100 = empty).
    temp: the (already clamped) temperature; alpha: the soft-target weight.
  Returns:
    (CE(q -> [c_m; cand_queue]) + CE(c -> [q_m; query_queue])) / 2 with soft targets
    alpha * softmax(momentum sims) + (1 - alpha) * hard targets.
  """
  q, c = l2_normalize(query.astype(jnp.float32)), l2_normalize(cand.astype(jnp.float32))
  q_m = jax.lax.stop_gradient(l2_normalize(query_m.astype(jnp.float32)))
  c_m = jax.lax.stop_gradient(l2_normalize(cand_m.astype(jnp.float32)))
  ids_all = jnp.concatenate([cand_ids, id_queue])
  pos = (cand_ids[:, None] == ids_all[None, :]).astype(jnp.float32)
  hard = pos / pos.sum(1, keepdims=True)
  q_all = jnp.concatenate([q_m, query_queue.T.astype(jnp.float32)], 0)   # [B + Q, D]
  c_all = jnp.concatenate([c_m, cand_queue.T.astype(jnp.float32)], 0)
  soft = lambda sims: jax.lax.stop_gradient(alpha * jax.nn.softmax(sims, axis=1) + (1.0 - alpha) * hard)
  t_q2c, t_c2q = soft(q_m @ c_all.T / temp), soft(c_m @ q_all.T / temp)
  ce = lambda sims, t: -jnp.sum(jax.nn.log_softmax(sims, axis=1) * t, axis=1).mean()
  return (ce(q @ c_all.T / temp, t_q2c) + ce(c @ q_all.T / temp, t_c2q)) / 2


def uniir_enqueue(query_queue: jax.Array, cand_queue: jax.Array, id_queue: jax.Array, ptr: jax.Array,
                  query_m: jax.Array, cand_m: jax.Array, cand_ids: jax.Array):
  """The seed's `_dequeue_and_enqueue` on the (global) batch: normalised momentum embeddings and ids
  written at `ptr`, `ptr` advanced by B modulo Q (Q must be a multiple of B). Returns the new
  (query_queue, cand_queue, id_queue, ptr)."""
  b, size = query_m.shape[0], id_queue.shape[0]
  if size % b:
    raise ValueError(f"queue size {size} must be a multiple of the global batch {b}")
  qm = l2_normalize(query_m.astype(jnp.float32)).T.astype(query_queue.dtype)
  cm = l2_normalize(cand_m.astype(jnp.float32)).T.astype(cand_queue.dtype)
  query_queue = jax.lax.dynamic_update_slice(query_queue, qm, (0, ptr))
  cand_queue = jax.lax.dynamic_update_slice(cand_queue, cm, (0, ptr))
  id_queue = jax.lax.dynamic_update_slice(id_queue, cand_ids.astype(id_queue.dtype), (ptr,))
  return query_queue, cand_queue, id_queue, (ptr + b) % size


def momentum_update(params_m, params, momentum: float):
  """EMA of the online weights: p_m <- p_m * m + p * (1 - m) (the seed's `_momentum_update`)."""
  return jax.tree.map(lambda a, b: a * momentum + b.astype(a.dtype) * (1.0 - momentum), params_m, params)


# ----------------------------------------------------------------------------- BagFormer
# shared/reference/bagformer.md §2; seed `models/loss.py` (`tokenwise_similarity`, `tokenwise_similarity_martix`,
# `tokenwise_similarity_loss`) and `BagFormer.forward` (ITA, ITM). B in-batch pairs, diagonal targets, no queue.
# Shapes: K text bags, P image tokens (257 with CLS), E the projection dim (256).


def tokenwise_similarity(q: jax.Array, d: jax.Array) -> jax.Array:
  """Late interaction [Nq, Lq, E], [Nd, Ld, E] -> [Nq, Nd] float32: S[a, b] = sum_i max_j <q_a,i, d_b,j>.

  Every token of q (zero vectors included) counts once; a zero d token can be the max (value 0).
  Materialises [Nq, Nd, Lq, Ld]: meant for a training batch; pools go through `eval.late_interaction`.
  """
  s = jnp.einsum("aie,bje->abij", q.astype(jnp.float32), d.astype(jnp.float32))
  return s.max(-1).sum(-1)


def bagformer_twc_loss_with_scores(text_bags: jax.Array, image_tokens: jax.Array,
                                   bag_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Token-wise contrastive (TWC) loss and its two score matrices; no temperature (seed's loss).

  Args:
    text_bags: [B, K, E] bag features (normalised; masked bags already zero, or zeroed by `bag_mask`).
    image_tokens: [B, P, E] normalised projected ViT tokens (CLS included).
    bag_mask: optional [B, K] 0/1, multiplied into `text_bags` (the seed's `text_feats * mask`).
  Returns:
    (loss, s_i2t [B_img, B_txt] = sum_p max_k, s_t2i [B_txt, B_img] = sum_k max_p); both come from
    one [B_txt, B_img, K, P] similarity tensor. loss = (CE(s_i2t rows) + CE(s_t2i rows)) / 2.
  """
  t, v = text_bags.astype(jnp.float32), image_tokens.astype(jnp.float32)
  if bag_mask is not None:
    t = t * bag_mask.astype(jnp.float32)[..., None]
  sim = jnp.einsum("tke,ipe->tikp", t, v)
  s_t2i = sim.max(3).sum(2)          # [B_txt, B_img]
  s_i2t = sim.max(2).sum(2).T        # [B_img, B_txt]
  return 0.5 * (_diag_ce(s_i2t) + _diag_ce(s_t2i)), s_i2t, s_t2i


def bagformer_twc_loss(text_bags: jax.Array, image_tokens: jax.Array, bag_mask: jax.Array | None = None) -> jax.Array:
  """[B, K, E], [B, P, E] -> scalar TWC loss (see `bagformer_twc_loss_with_scores`)."""
  return bagformer_twc_loss_with_scores(text_bags, image_tokens, bag_mask)[0]


def bagformer_ita_loss(image_cls: jax.Array, text_cls: jax.Array, temp: jax.Array | float) -> jax.Array:
  """ITA: [B, E] normalised image / text CLS features, the (clamped) temperature -> scalar
  (CE(v t^T / temp) + CE(t v^T / temp)) / 2 with diagonal targets."""
  v, t = image_cls.astype(jnp.float32), text_cls.astype(jnp.float32)
  return 0.5 * (_diag_ce(v @ t.T / temp) + _diag_ce(t @ v.T / temp))


def itm_negatives(rng: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
  """One in-batch negative per row, uniform over the other B - 1 rows (the seed's `torch.multinomial`
  over all-ones weights with a zero diagonal): i -> (i + U{1..B-1}) mod B.

  Returns (neg_image_for_text [B], neg_text_for_image [B]) int32, drawn independently.
  """
  batch = int(batch)
  if batch < 2:
    raise ValueError(f"ITM negatives need a batch of at least 2 pairs, got {batch}")
  k_img, k_txt = jax.random.split(rng)
  rows = jnp.arange(batch, dtype=jnp.int32)
  draw = lambda key: (rows + jax.random.randint(key, (batch,), 1, batch, jnp.int32)) % batch
  return draw(k_img), draw(k_txt)


def itm_pair_indices(neg_image_for_text: jax.Array, neg_text_for_image: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The seed's 3B ITM pairs as (text rows [3B], image rows [3B]), in `bagformer_itm_loss`'s order."""
  rows = jnp.arange(neg_image_for_text.shape[0], dtype=jnp.int32)
  texts = jnp.concatenate([rows, rows, neg_text_for_image.astype(jnp.int32)])
  images = jnp.concatenate([rows, neg_image_for_text.astype(jnp.int32), rows])
  return texts, images


def bagformer_itm_loss(logits: jax.Array) -> jax.Array:
  """ITM cross-entropy of `itm_head` logits [3B, 2] (class 1 = match), labels [1]*B + [0]*2B.

  Row order (the seed's `BagFormer.forward`): rows 0..B-1 the positive pairs (text_b, image_b);
  rows B..2B-1 (text_b, negative image of text b); rows 2B..3B-1 (negative text of image b, image_b).
  """
  if logits.ndim != 2 or logits.shape[1] != 2 or logits.shape[0] % 3:
    raise ValueError(f"ITM logits must be [3B, 2], got {logits.shape}")
  b = logits.shape[0] // 3
  labels = jnp.concatenate([jnp.ones((b,), jnp.int32), jnp.zeros((2 * b,), jnp.int32)])
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()
