"""BagFormer objective and first-stage scoring vs PyTorch re-implementations of the seed's formulas.

Seed (howard-hou/BagFormer, shared/reference/bagformer.md §2, §5): `models/loss.py`
(`tokenwise_similarity`, `image2text_sim_martix`, `text2image_sim_martix`, `tokenwise_similarity_martix`,
`tokenwise_similarity_loss`) and the ITA / ITM blocks of `BagFormer.forward`. The torch functions
below are written from those formulas (row loops, `F.log_softmax` with one-hot diagonal targets,
`torch.multinomial`-style uniform negatives), float32, compared at <= 1e-5.
Shapes: B pairs, K bags, P image tokens, E features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmret_jax import losses
from mmret_jax.eval import late_interaction as li

TOL = 1e-5


# ----------------------------------------------------------------------------- torch references (seed formulas)
def t_tokenwise_similarity(q, d):
  """q [Lq, E], d [N, Ld, E] -> [N]: sum over q's tokens of the max over each d's tokens."""
  return (q @ d.permute(0, 2, 1)).max(2).values.sum(1)


def t_similarity_matrices(text_feats, image_feats):
  """-> (sim_i2t [Ni, Nt], sim_t2i [Nt, Ni]), one row at a time."""
  nt, ni = text_feats.shape[0], image_feats.shape[0]
  sim_i2t = torch.zeros((ni, nt))
  for i in range(ni):
    sim_i2t[i] = t_tokenwise_similarity(image_feats[i], text_feats)
  sim_t2i = torch.zeros((nt, ni))
  for t in range(nt):
    sim_t2i[t] = t_tokenwise_similarity(text_feats[t], image_feats)
  return sim_i2t, sim_t2i


def t_diag_ce(sim):
  targets = torch.zeros_like(sim)
  targets.fill_diagonal_(1)
  return -torch.sum(F.log_softmax(sim, dim=1) * targets, dim=1).mean()


def t_twc_loss(text_feats, image_feats):
  sim_i2t, sim_t2i = t_similarity_matrices(text_feats, image_feats)
  return (t_diag_ce(sim_i2t) + t_diag_ce(sim_t2i)) / 2


def t_ita_loss(image_feat, text_feat, temp):
  return (t_diag_ce(image_feat @ text_feat.t() / temp) + t_diag_ce(text_feat @ image_feat.t() / temp)) / 2


def unit(rng, *shape):
  x = rng.standard_normal(shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def bag_batch(rng, b, k, p, e):
  """Normalised bags with a 0/1 mask (some bags masked, row 0 only its first bag kept) and image tokens."""
  mask = (rng.random((b, k)) > 0.3).astype(np.float32)
  mask[:, 0] = 1.0
  mask[0, 1:] = 0.0
  return unit(rng, b, k, e) * mask[..., None], mask, unit(rng, b, p, e)


def maxdiff(a, b):
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# ----------------------------------------------------------------------------- losses
def test_tokenwise_similarity_matches_seed():
  rng = np.random.default_rng(0)
  q, d = unit(rng, 3, 5, 8), unit(rng, 4, 7, 8)
  q[1, 2:] = 0.0
  ours = losses.tokenwise_similarity(jnp.asarray(q), jnp.asarray(d))
  ref = torch.stack([t_tokenwise_similarity(torch.from_numpy(q[a]), torch.from_numpy(d)) for a in range(3)])
  assert ours.shape == (3, 4)
  assert maxdiff(ours, ref) <= TOL


def test_twc_loss_and_scores_match_seed():
  rng = np.random.default_rng(1)
  text, mask, image = bag_batch(rng, 6, 5, 9, 16)
  loss, s_i2t, s_t2i = losses.bagformer_twc_loss_with_scores(jnp.asarray(text), jnp.asarray(image))
  ref_i2t, ref_t2i = t_similarity_matrices(torch.from_numpy(text), torch.from_numpy(image))
  assert maxdiff(s_i2t, ref_i2t) <= TOL and maxdiff(s_t2i, ref_t2i) <= TOL
  assert maxdiff(loss, t_twc_loss(torch.from_numpy(text), torch.from_numpy(image))) <= TOL
  # tokenwise_similarity in both directions gives the same matrices
  assert maxdiff(losses.tokenwise_similarity(jnp.asarray(image), jnp.asarray(text)), ref_i2t) <= TOL
  # bag_mask = the seed's `text_feats * embed_bag_attn_mask`: unmasked bags in, the mask applied inside
  raw = unit(np.random.default_rng(2), 6, 5, 16)
  raw[mask > 0] = text[mask > 0]
  masked = losses.bagformer_twc_loss(jnp.asarray(raw), jnp.asarray(image), jnp.asarray(mask))
  assert maxdiff(masked, loss) <= TOL


def test_twc_gradients_match_torch_autograd():
  # Through the mask, as the seed differentiates `text_feats * mask`: a masked bag's zero vector can tie
  # with another at max 0, where torch and XLA route the max's gradient differently, but the mask zeroes it.
  rng = np.random.default_rng(3)
  raw, mask, image = unit(rng, 5, 4, 8), (rng.random((5, 4)) > 0.4).astype(np.float32), unit(rng, 5, 7, 8)
  mask[:, 0] = 1.0
  g_t, g_v = jax.grad(losses.bagformer_twc_loss, argnums=(0, 1))(jnp.asarray(raw), jnp.asarray(image),
                                                               jnp.asarray(mask))
  assert np.isfinite(np.asarray(g_t)).all() and np.isfinite(np.asarray(g_v)).all()
  tt = torch.from_numpy(raw).requires_grad_()
  tv = torch.from_numpy(image).requires_grad_()
  t_twc_loss(tt * torch.from_numpy(mask)[..., None], tv).backward()
  assert maxdiff(g_t, tt.grad) <= TOL and maxdiff(g_v, tv.grad) <= TOL
  assert float(np.abs(np.asarray(g_v)).max()) > 1e-3 and float(np.abs(np.asarray(g_t)).max()) > 1e-3


def test_ita_loss_matches_seed():
  rng = np.random.default_rng(4)
  v, t = unit(rng, 6, 16), unit(rng, 6, 16)
  for temp in (0.07, 0.05, 0.5):
    ours = losses.bagformer_ita_loss(jnp.asarray(v), jnp.asarray(t), jnp.float32(temp))
    assert maxdiff(ours, t_ita_loss(torch.from_numpy(v), torch.from_numpy(t), torch.tensor(temp))) <= TOL


def test_itm_loss_and_pair_order_match_seed():
  rng = np.random.default_rng(5)
  b = 5
  logits = rng.standard_normal((3 * b, 2)).astype(np.float32) * 3
  labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)])
  ref = F.cross_entropy(torch.from_numpy(logits), labels)
  assert maxdiff(losses.bagformer_itm_loss(jnp.asarray(logits)), ref) <= TOL
  # pair order: output_pos = (text_b, image_b); output_neg over text_embeds_all = cat[text, text_neg]
  # and image_embeds_all = cat[image_neg, image]
  neg_img, neg_txt = losses.itm_negatives(jax.random.key(0), b)
  text_ids, image_ids = torch.arange(b), torch.arange(b)
  seed_texts = torch.cat([text_ids, torch.cat([text_ids, text_ids[torch.tensor(np.array(neg_txt))]])])
  seed_images = torch.cat([image_ids, torch.cat([image_ids[torch.tensor(np.array(neg_img))], image_ids])])
  texts, images = losses.itm_pair_indices(neg_img, neg_txt)
  np.testing.assert_array_equal(np.asarray(texts), seed_texts.numpy())
  np.testing.assert_array_equal(np.asarray(images), seed_images.numpy())
  with pytest.raises(ValueError, match=r"\[3B, 2\]"):
    losses.bagformer_itm_loss(jnp.zeros((4, 2)))


def test_itm_negatives_uniform_never_diagonal_deterministic():
  b, draws = 5, 3000
  keys = jax.random.split(jax.random.key(42), draws)
  neg_img, neg_txt = jax.vmap(lambda k: losses.itm_negatives(k, b))(keys)
  rows = np.arange(b)
  for neg in (np.asarray(neg_img), np.asarray(neg_txt)):
    assert neg.dtype == np.int32 and neg.shape == (draws, b)
    assert not (neg == rows).any()
    counts = np.stack([np.bincount(neg[:, i], minlength=b) for i in range(b)])   # [row, chosen]
    off = counts[~np.eye(b, dtype=bool)].reshape(b, b - 1)
    expected = draws / (b - 1)
    chi2 = float(((off - expected) ** 2 / expected).sum())
    assert chi2 < 37.7, chi2  # chi-square, b * (b - 2) = 15 dof, p = 0.001
  assert not (np.asarray(neg_img) == np.asarray(neg_txt)).all()  # independent draws
  a = losses.itm_negatives(jax.random.key(7), 8)
  c = losses.itm_negatives(jax.random.key(7), 8)
  np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(c[0]))
  np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(c[1]))
  two = losses.itm_negatives(jax.random.key(1), 2)
  np.testing.assert_array_equal(np.asarray(two[0]), [1, 0])
  with pytest.raises(ValueError, match="at least 2"):
    losses.itm_negatives(jax.random.key(0), 1)


# ----------------------------------------------------------------------------- first-stage scoring
NT, NI, K, P, E = 7, 11, 5, 9, 16
BLOCKS = [dict(text_block=1, image_block=1), dict(text_block=2, image_block=3), dict(text_block=4, image_block=5),
          dict(text_block=7, image_block=11), dict(text_block=3, image_block=100), dict(text_block=6),
          dict(image_block=4), dict(memory_budget_bytes=1), dict(memory_budget_bytes=8 * K * P * 12), {}]


@pytest.fixture(scope="module")
def pool():
  rng = np.random.default_rng(6)
  text, _, _ = bag_batch(rng, NT, K, P, E)
  image = unit(rng, NI, P, E)
  ref_i2t, ref_t2i = t_similarity_matrices(torch.from_numpy(text), torch.from_numpy(image))
  return text, image, ref_t2i.numpy(), ref_i2t.numpy()


@pytest.mark.parametrize("blocks", BLOCKS)
def test_first_stage_scores_match_seed_for_any_blocks(pool, blocks):
  text, image, ref_t2i, ref_i2t = pool
  s_t2i, s_i2t = li.first_stage_scores(text, image, **blocks)
  assert s_t2i.shape == (NT, NI) and s_i2t.shape == (NI, NT) and s_t2i.dtype == np.float32
  assert maxdiff(s_t2i, ref_t2i) <= TOL and maxdiff(s_i2t, ref_i2t) <= TOL
  base_t2i, base_i2t = li.first_stage_scores(text, image, text_block=NT, image_block=NI)
  assert maxdiff(s_t2i, base_t2i) <= 1e-6 and maxdiff(s_i2t, base_i2t) <= 1e-6


def reference_topk(scores, k):
  """Rows sorted by score descending, ties by lower column index."""
  order = np.lexsort((np.broadcast_to(np.arange(scores.shape[1]), scores.shape), -scores), axis=-1)[:, :k]
  return np.take_along_axis(scores, order, 1), order


@pytest.mark.parametrize("blocks", [dict(text_block=2, image_block=3), dict(text_block=4, image_block=5),
                                    dict(text_block=7, image_block=11)])
@pytest.mark.parametrize("k", [1, 4, 50])
def test_topk_first_stage_equals_sorted_full_matrix(pool, blocks, k):
  text, image, _, _ = pool
  full_t2i, full_i2t = li.first_stage_scores(text, image, **blocks)
  out = li.topk_first_stage(text, image, k, **blocks)
  for scores, idx, full in ((out.t2i_scores, out.t2i_indices, full_t2i), (out.i2t_scores, out.i2t_indices, full_i2t)):
    ref_s, ref_i = reference_topk(full, min(k, full.shape[1]))
    assert idx.dtype == np.int64 and idx.shape == ref_i.shape
    np.testing.assert_array_equal(idx, ref_i)
    assert maxdiff(scores, ref_s) <= 1e-6


@pytest.mark.parametrize("blocks", [dict(text_block=2, image_block=3), dict(text_block=3, image_block=4), {}])
def test_topk_ties_keep_the_lower_index(blocks):
  # features in {-0.5, 0, 0.5}: every product and sum is exact, so equal scores are exactly equal
  rng = np.random.default_rng(7)
  text = rng.integers(-1, 2, (9, 3, 4)).astype(np.float32) * 0.5
  image = rng.integers(-1, 2, (10, 4, 4)).astype(np.float32) * 0.5
  image[5], text[6] = image[2], text[1]  # duplicated rows tie exactly
  ref_i2t, ref_t2i = (m.numpy() for m in t_similarity_matrices(torch.from_numpy(text), torch.from_numpy(image)))
  out = li.topk_first_stage(text, image, 6, **blocks)
  for scores, idx, full in ((out.t2i_scores, out.t2i_indices, ref_t2i), (out.i2t_scores, out.i2t_indices, ref_i2t)):
    ref_s, ref_i = reference_topk(full, 6)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_array_equal(scores, ref_s)


def test_block_sizes_fill_the_budget():
  assert li.block_sizes(1000, 30000, 25, 257, memory_budget_bytes=16 << 20) == (18, 18)
  bt, bi = li.block_sizes(1000, 30000, 25, 257, memory_budget_bytes=1 << 30)
  assert bt * bi * 25 * 257 * 4 * 2 <= 1 << 30 and (bt + 1) * (bi + 1) * 25 * 257 * 8 > 1 << 30
  assert li.block_sizes(3, 30000, 25, 257, memory_budget_bytes=1 << 30) == (3, (1 << 30) // (8 * 25 * 257) // 3)
  assert li.block_sizes(1000, 30000, 25, 257, text_block=64, memory_budget_bytes=16 << 20) == (64, 5)
  assert li.block_sizes(5, 7, 25, 257, text_block=64, image_block=64) == (5, 7)
  assert li.block_sizes(5, 7, 25, 257, memory_budget_bytes=1) == (1, 1)


def test_bad_inputs_raise_clear_errors(pool):
  text, image, _, _ = pool
  with pytest.raises(ValueError, match=r"\[Nt, K, E\]"):
    li.first_stage_scores(text[:, :, :8], image)
  with pytest.raises(ValueError, match=r"\[Nt, K, E\]"):
    li.first_stage_scores(text[0], image)
  with pytest.raises(ValueError, match="text_block must be >= 1"):
    li.first_stage_scores(text, image, text_block=0)
  with pytest.raises(ValueError, match="k >= 1"):
    li.topk_first_stage(text, image, 0)
  bad = image.copy()
  bad[3, 2, 1] = np.nan
  with pytest.raises(ValueError, match="not finite"):
    li.first_stage_scores(text, bad)
  with pytest.raises(ValueError, match="not finite"):
    li.topk_first_stage(text, bad, 3)
  s_t2i, s_i2t = li.first_stage_scores(text[:0], image)
  assert s_t2i.shape == (0, NI) and s_i2t.shape == (NI, 0)
