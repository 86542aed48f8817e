"""GradCache (train/grad_cache.py) for UniIR CLIP-SF / CLIP-FF (tasks/uniir.py `grad_cache_parts`): with the paired
batch layout the cached step's loss, logit scale and gradients equal the plain full-batch step's (fp32, two chunk
sizes, dropout off); with dropout on (CLIP-FF's T5 layers) they equal the autodiff gradient of the same chunk-keyed
computation; loop steps match the plain ones; the BLIP-queue variants refuse it with a clear error."""

from __future__ import annotations

import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import test_uniir_task as tu  # noqa: E402  (its tiny smoke configs on the mini M-BEIR, task builder)

from mmret_jax.tasks import uniir as uniir_task  # noqa: E402
from mmret_jax.train import grad_cache, loop, optim  # noqa: E402

TOL = 1e-5
B = 8


def _maxrel(a, b) -> float:
  """max |a - b| over every leaf, relative to the largest |b| of the whole tree (as tests/test_grad_cache.py)."""
  diff = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  return diff / max(float(np.max(np.abs(np.asarray(y)))) for y in jax.tree.leaves(b))


def _close(a, b, tol=TOL) -> bool:
  return abs(float(a) - float(b)) <= tol * max(1.0, abs(float(b)))


def _task(tmp, variant, dropout=0.0, chunk=2):
  """A tiny task (one workdir per variant: the scratch tokenizer is built once)."""
  c = tu.tiny(variant, tmp, **{"model.layers": 1, "model.dropout": dropout, "grad_cache.chunk_size": chunk})
  return tu.make_task(c, tmp / f"w_{variant}")


def _setup(tmp, variant):
  task = _task(tmp, variant)
  params = jax.tree.map(jnp.asarray, nn.meta.unbox(task.init_params(jax.random.PRNGKey(0))))
  batch = {k: jnp.asarray(v) for k, v in task.make_batch(np.arange(B), 0).items() if k != "index"}
  return task, params, batch


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
  return tmp_path_factory.mktemp("gc_uniir")


@pytest.fixture(scope="module")
def clip_sf(tmp):
  return _setup(tmp, "clip_sf")


@pytest.fixture(scope="module")
def clip_ff(tmp):
  return _setup(tmp, "clip_ff")


@pytest.fixture(scope="module")
def stacked(tmp, clip_sf):
  """The same rows' batch made with grad_cache off: the stacked layout."""
  return _task(tmp, "clip_sf", chunk=0).make_batch(np.arange(B), 0)


def test_paired_batches_hold_the_stacked_items(clip_sf, stacked):
  """With grad_cache on, make_batch pairs query i with its positive on axis 1; `model_inputs` (what `loss_fn`
  encodes) restacks them to the plain layout's queries-then-positives order."""
  _, _, batch = clip_sf
  assert batch["ids"].shape == (B, 2, 77) and batch["pixels"].shape == (B, 2, 32, 32, 3)
  assert batch["txt_mask"].shape == (B, 2) and stacked["ids"].shape == (2 * B, 77)
  for k in uniir_task.ITEM_FIELDS:
    np.testing.assert_array_equal(batch[k][:, 0], stacked[k][:B])
    np.testing.assert_array_equal(batch[k][:, 1], stacked[k][B:])
    np.testing.assert_array_equal(uniir_task.model_inputs(batch)[k], stacked[k])
  np.testing.assert_array_equal(batch["cand_ids"], stacked["cand_ids"])


def _check_equal_to_plain(task, params, batch, chunks):
  rng = jax.random.PRNGKey(11)
  (l0, a0), g0 = jax.jit(jax.value_and_grad(task.loss_fn, has_aux=True))(params, batch, rng)
  parts = task.grad_cache_parts()
  for chunk in chunks:
    (l1, a1), g1 = jax.jit(lambda p, b, r, c=chunk: grad_cache.value_and_grad(parts, p, b, r, c))(params, batch, rng)
    assert _close(l1, l0), (chunk, float(l1), float(l0))
    assert set(a1) == set(a0) == {"logit_scale"} and _close(a1["logit_scale"], a0["logit_scale"])
    assert _maxrel(g1, g0) <= TOL, (chunk, _maxrel(g1, g0))
  # the loss is informative: the embeddings and the logit scale get gradients
  assert float(jnp.abs(g0["clip"]["logit_scale"])) > 0 and float(l0) > 0
  return g0


def test_clip_sf_cached_grads_equal_the_plain_step(clip_sf):
  _check_equal_to_plain(*clip_sf, chunks=(2, 4))


def test_clip_ff_cached_grads_equal_the_plain_step(clip_ff):
  """(chunk 2 with dropout on: below.) The largest difference is fp32 rounding of the token-embedding gradient:
  the T5 fusion layers attend over the pad tokens too, whose gradients are summed in another order."""
  task, params, batch = clip_ff
  assert task.model_config.t5.dropout_rate == 0.0
  g0 = _check_equal_to_plain(task, params, batch, chunks=(4,))
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g0["t5_layers"])) > 0


def test_clip_ff_dropout_masks_agree_between_the_passes(tmp, clip_ff):
  """CLIP-FF's T5 layers with dropout 0.1: the cached gradient equals autodiff through the chunked computation
  with the same per-chunk keys."""
  _, params, batch = clip_ff
  task = _task(tmp, "clip_ff", dropout=0.1)
  assert task.model_config.t5.dropout_rate == 0.1
  parts = task.grad_cache_parts()
  rng = jax.random.PRNGKey(5)
  cached = jax.jit(lambda p, b, r: grad_cache.value_and_grad(parts, p, b, r, 2))
  (l1, _), g1 = cached(params, batch, rng)
  (l2, _), g2 = jax.jit(jax.value_and_grad(
      lambda p, b, r: grad_cache.chunked_loss(parts, p, b, r, 2), has_aux=True))(params, batch, rng)
  assert _close(l1, l2)
  assert _maxrel(g1, g2) <= TOL, _maxrel(g1, g2)
  (l3, _), _ = cached(params, batch, jax.random.PRNGKey(6))
  assert float(l3) != float(l1)  # dropout really is on: other keys, other masks


def test_train_steps_through_the_loop_match(clip_sf):
  task, params, batch = clip_sf
  tx, _ = optim.make_optimizer(task.config.optim, 10, task.freeze_patterns())
  out = []
  for chunk in (0, 2):
    state = loop.make_state(task, tx, params, jax.random.PRNGKey(1))
    step = jax.jit(loop.make_train_step(task, tx, 1, "stop", chunk))
    for _ in range(2):
      state, m = step(state, batch)
    out.append((state.params, float(m["loss"])))
  assert abs(out[0][1] - out[1][1]) <= 1e-4 * max(1.0, abs(out[0][1]))
  assert _maxrel(out[1][0], out[0][0]) <= 1e-4


def test_blip_variants_refuse_grad_cache(tmp):
  task = tu.make_task(tu.tiny("blip_sf", tmp, **{"model.layers": 1, "grad_cache.chunk_size": 2}), tmp / "w_blip")
  with pytest.raises(ValueError, match="BLIP-queue variants: negatives come from the queue, GradCache does not "
                                       "apply"):
    task.grad_cache_parts()
  with pytest.raises(ValueError, match="uniir.variant 'blip_sf'"):
    loop.make_train_step(task, None, 1, "stop", 2)


def test_stacked_batch_is_a_clear_error(clip_sf, stacked):
  """A stacked batch (grad_cache off when it was made) cannot be chunked by pair: the error says so."""
  task, params, _ = clip_sf
  items = {k: jnp.asarray(v) for k, v in stacked.items() if k not in ("index", "cand_ids")}
  with pytest.raises(ValueError, match="paired batch layout"):
    grad_cache.value_and_grad(task.grad_cache_parts(), params, items, jax.random.PRNGKey(0), 4)
