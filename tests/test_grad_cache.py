"""GradCache (train/grad_cache.py) for the contrastive tasks: the cached step's loss and gradients equal the plain
full-batch step's (fp32, several chunk sizes, MLM term and learnable temperature included, dropout off); with
dropout on, they equal the autodiff gradient of the same chunk-keyed computation (the two passes draw the same
masks); train steps through the loop match; bad settings are clear errors."""

from __future__ import annotations

import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import test_blair_loss as tb  # noqa: E402  (its tiny RoBERTa dir, pairs and task builders)
from fixtures import make_hf_dir  # noqa: E402

from mmret_jax.train import grad_cache, loop, optim  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module")
def blair(tmp_path_factory):
  root = tmp_path_factory.mktemp("gc")
  hf = root / "hf"
  model, _ = make_hf_dir(hf, "roberta", head="mlm", seed=3)
  with torch.no_grad():  # as test_blair_loss: spread the CLS vectors so the contrastive loss is informative
    for name, p in model.named_parameters():
      if name.startswith("roberta.encoder.") and name.endswith(".weight") and "LayerNorm" not in name:
        p.mul_(20.0)
  model.save_pretrained(hf)
  setup = types.SimpleNamespace(hf_dir=hf, tsv=tb._write_pairs(root / "pairs.tsv"), workdir=root / "work", init=None)
  task = tb._task(setup, learnable_temp=True, mlm_max_predictions=-1, symmetric=True)
  params = tb._params(setup, task)
  batch = {k: jnp.asarray(v) for k, v in tb._batch(task).items()}
  return types.SimpleNamespace(setup=setup, task=task, params=params, batch=batch)


def _maxrel(a, b) -> float:
  """max |a - b| over every leaf, relative to the largest |b| of the whole tree (fp32 rounding of the summed
  chunk gradients scales with the gradient, not with each leaf)."""
  diff = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  return diff / max(float(np.max(np.abs(np.asarray(y)))) for y in jax.tree.leaves(b))


def test_chunking_is_strided_and_inverted():
  x = jnp.arange(12).reshape(6, 2)
  ch = grad_cache.to_chunks(x, 3)
  np.testing.assert_array_equal(ch[:, :, 0], [[0, 6], [2, 8], [4, 10]])
  np.testing.assert_array_equal(grad_cache.from_chunks(ch), x)
  np.testing.assert_array_equal(grad_cache.chunk_rows(3, 6), [[0, 3], [1, 4], [2, 5]])


@pytest.mark.parametrize("chunk", [2, 3])
def test_blair_cached_grads_equal_the_plain_step(blair, chunk):
  task, params, batch = blair.task, blair.params, blair.batch
  assert task.config.loss.do_mlm and task.config.loss.learnable_temp and task.config.model.dropout == 0.0
  rng = jax.random.PRNGKey(11)
  (l0, a0), g0 = jax.jit(jax.value_and_grad(lambda p: task.loss_fn(p, batch, rng), has_aux=True))(params)
  parts = task.grad_cache_parts()
  (l1, a1), g1 = jax.jit(lambda p: grad_cache.value_and_grad(parts, p, batch, rng, chunk))(params)
  assert abs(float(l1) - float(l0)) <= TOL * max(1.0, abs(float(l0)))
  for k in ("cl_loss", "mlm_loss", "tokens", "temperature"):
    assert abs(float(a1[k]) - float(a0[k])) <= TOL * max(1.0, abs(float(a0[k]))), k
  assert float(a0["mlm_loss"]) > 0 and float(jnp.abs(g0["logit_scale"])) > 0
  assert _maxrel(g1, g0) <= TOL, _maxrel(g1, g0)


def test_blair_dropout_masks_agree_between_the_passes(blair):
  """With dropout on, the cached gradient equals autodiff through the chunked computation with the same keys."""
  c = blair.task.config
  with c.unlocked():
    c.model.dropout = 0.1
  task = tb.BlairTask(c, blair.task.mesh, blair.setup.workdir)
  parts = task.grad_cache_parts()
  rng = jax.random.PRNGKey(5)
  (l1, _), g1 = jax.jit(lambda p: grad_cache.value_and_grad(parts, p, blair.batch, rng, 2))(blair.params)
  (l2, _), g2 = jax.jit(jax.value_and_grad(
      lambda p: grad_cache.chunked_loss(parts, p, blair.batch, rng, 2), has_aux=True))(blair.params)
  assert abs(float(l1) - float(l2)) <= TOL * max(1.0, abs(float(l2)))
  assert _maxrel(g1, g2) <= TOL, _maxrel(g1, g2)
  (l0, _), _ = jax.jit(jax.value_and_grad(lambda p: task.loss_fn(p, blair.batch, rng), has_aux=True))(blair.params)
  assert float(l0) != float(l1)  # dropout really is on (other masks than the plain step's)


def test_train_steps_through_the_loop_match(blair):
  task = blair.task
  tx, _ = optim.make_optimizer(task.config.optim, 10, task.freeze_patterns())
  out = []
  for chunk in (0, 2):
    state = loop.make_state(task, tx, blair.params, jax.random.PRNGKey(1))
    step = jax.jit(loop.make_train_step(task, tx, 1, "stop", chunk))
    for _ in range(3):
      state, m = step(state, blair.batch)
    out.append((state.params, float(m["loss"])))
  assert abs(out[0][1] - out[1][1]) <= 1e-4 * max(1.0, abs(out[0][1]))
  assert _maxrel(out[1][0], out[0][0]) <= 1e-4


def test_bad_settings_are_clear_errors(blair):
  parts = blair.task.grad_cache_parts()
  with pytest.raises(ValueError, match="must divide the per-step batch"):
    grad_cache.value_and_grad(parts, blair.params, blair.batch, jax.random.PRNGKey(0), 4)
  with pytest.raises(ValueError, match="multiple of the data-parallel size"):
    grad_cache.check_chunking(8, 2, 4)
  with pytest.raises(ValueError, match="do not combine"):
    loop.make_train_step(blair.task, None, 2, "stop", 2)
  with pytest.raises(ValueError, match="has no GradCache split"):
    loop.make_train_step(object(), None, 1, "stop", 2)


@pytest.fixture(scope="module")
def clip_setup(tmp_path_factory):
  import test_train_blair_clip as tbc  # pylint: disable=import-outside-toplevel
  return tbc.setup.__wrapped__(tmp_path_factory)  # its randomised tiny twin tower and 8-row batch


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_blair_clip_cached_grads_equal_the_plain_step(clip_setup, weight):
  """BLaIR-CLIP (review / meta text tower + ViT): CLIP loss, text-text loss, MLM and both logit scales."""
  task = clip_setup.task
  task.config.mm.text_text_weight = weight
  params = jax.tree.map(jnp.asarray, clip_setup.params)
  batch = {k: jnp.asarray(v) for k, v in clip_setup.batch.items()}
  rng = jax.random.PRNGKey(3)
  (l0, a0), g0 = jax.jit(jax.value_and_grad(lambda p: task.loss_fn(p, batch, rng), has_aux=True))(params)
  parts = task.grad_cache_parts()
  for chunk in (2, 4):
    (l1, a1), g1 = jax.jit(lambda p, c=chunk: grad_cache.value_and_grad(parts, p, batch, rng, c))(params)
    assert abs(float(l1) - float(l0)) <= TOL * max(1.0, abs(float(l0))), chunk
    assert set(a1) == set(a0) and all(abs(float(a1[k]) - float(a0[k])) <= TOL * max(1.0, abs(float(a0[k])))
                                      for k in a0)
    assert _maxrel(g1, g0) <= TOL, (chunk, _maxrel(g1, g0))
  assert float(jnp.abs(g0["heads"]["logit_scale"])) > 0
