"""GradCache (train/grad_cache.py) for Bi-BLIP4CIR stage I (`tasks/cir.py`: the BLIP text tower over the forward and
reversed captions, `losses.cir_sum_losses` over the whole batch): the cached step's loss, aux and gradients equal
the plain full-batch step's (fp32, dropout off, chunk sizes 2 and 4 of an 8-row batch); with dropout on they equal
the autodiff gradient of the same chunk-keyed computation; loop steps match; stage II (the Combiner on cached
features) is a clear error naming `cir.stage`."""

from __future__ import annotations

import copy
import dataclasses
import pathlib
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import test_cir_task as tc  # noqa: E402  (its tiny smoke config over the bundled CIRR annotations)
from fixtures import override  # noqa: E402

from mmret_jax.models import blip  # noqa: E402
from mmret_jax.tasks.cir import CirTask  # noqa: E402
from mmret_jax.train import grad_cache, loop, optim  # noqa: E402
from mmret_jax.train.partitioning import make_mesh  # noqa: E402

TOL = 1e-5
BATCH = 8


def _task(tmp: pathlib.Path, **over) -> CirTask:
  c = tc.tiny(tc.cir_cirr, tmp, **over)
  mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  with jax.set_mesh(mesh):
    return CirTask(c, mesh, tmp / "work")


def _params(task: CirTask, seed: int = 0):
  """The tower's BLIP init, every weight kicked by noise so the text features differ per caption (and the bias
  and LayerNorm gradients are not degenerate)."""
  p = task.load_init(jax.device_get(nn.unbox(jax.jit(task.init_params)(jax.random.PRNGKey(0)))))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(x + 0.02 * rng.standard_normal(x.shape).astype(np.float32)), p)


@pytest.fixture(scope="module")
def cir(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("gc_cir")
  task = _task(tmp)
  params = _params(task)
  batch = {k: jnp.asarray(v) for k, v in task.make_batch(np.arange(BATCH), 0).items()}
  return types.SimpleNamespace(tmp=tmp, task=task, params=params, batch=batch)


def _maxrel(a, b) -> float:
  """max |a - b| over every leaf, relative to the largest |b| of the whole tree (as tests/test_grad_cache.py)."""
  diff = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  return diff / max(float(np.max(np.abs(np.asarray(y)))) for y in jax.tree.leaves(b))


def _close(a, b) -> bool:
  return abs(float(a) - float(b)) <= TOL * max(1.0, abs(float(b)))


def test_stage1_cached_grads_equal_the_plain_step(cir):
  task, params, batch = cir.task, cir.params, cir.batch
  c = task.config
  assert c.cir.stage == 1 and c.model.dropout == 0.0 and c.model.dtype == "float32"
  assert float(c.loss.reversed_weight) > 0
  rng = jax.random.PRNGKey(11)
  (l0, a0), g0 = jax.jit(jax.value_and_grad(lambda p: task.loss_fn(p, batch, rng), has_aux=True))(params)
  assert float(a0["loss_forward"]) > 0.1 and float(a0["loss_reversed"]) > 0.1  # an informative batch
  assert float(np.max(np.abs(np.asarray(g0["text_proj"]["kernel"])))) > 0
  parts = task.grad_cache_parts()
  for chunk in (2, 4):
    (l1, a1), g1 = jax.jit(lambda p, n=chunk: grad_cache.value_and_grad(parts, p, batch, rng, n))(params)
    assert _close(l1, l0), (chunk, float(l1), float(l0))
    assert set(a1) == set(a0) == {"loss_forward", "loss_reversed"}
    assert all(_close(a1[k], a0[k]) for k in a0), chunk
    assert jax.tree.structure(g1) == jax.tree.structure(g0)
    assert _maxrel(g1, g0) <= TOL, (chunk, _maxrel(g1, g0))


def test_stage1_dropout_masks_agree_between_the_passes(cir):
  """With dropout on, the cached gradient equals autodiff through the chunked computation with the same keys."""
  task = copy.copy(cir.task)  # the task's own tower with `model.dropout = 0.1` (as `_setup_model` builds it)
  cfg = task.blip_config
  text = dataclasses.replace(cfg.text, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
  task.text_tower = blip.BlipTextTower(dataclasses.replace(cfg, text=text), dtype=jnp.float32)
  parts = task.grad_cache_parts()
  rng = jax.random.PRNGKey(5)
  (l1, a1), g1 = jax.jit(lambda p: grad_cache.value_and_grad(parts, p, cir.batch, rng, 2))(cir.params)
  (l2, a2), g2 = jax.jit(jax.value_and_grad(
      lambda p: grad_cache.chunked_loss(parts, p, cir.batch, rng, 2), has_aux=True))(cir.params)
  assert _close(l1, l2) and all(_close(a1[k], a2[k]) for k in a2)
  assert _maxrel(g1, g2) <= TOL, _maxrel(g1, g2)
  plain = jax.jit(lambda p, train: task.loss_fn(p, cir.batch, rng, train)[0], static_argnums=1)
  assert float(plain(cir.params, True)) != float(l1) != float(plain(cir.params, False))  # dropout really is on


def test_train_steps_through_the_loop_match(cir):
  task = cir.task
  tx, _ = optim.make_optimizer(task.config.optim, 10, task.freeze_patterns(), task.steps_per_epoch(BATCH))
  out = []
  for chunk in (0, 2):
    state = loop.make_state(task, tx, cir.params, jax.random.PRNGKey(1))
    step = jax.jit(loop.make_train_step(task, tx, 1, "stop", chunk))
    losses = []
    for _ in range(3):
      state, m = step(state, cir.batch)
      losses.append(float(m["loss"]))
    out.append((state.params, losses))
  assert all(abs(a - b) <= 1e-4 * max(1.0, abs(a)) for a, b in zip(out[0][1], out[1][1])), out
  assert _maxrel(out[1][0], out[0][0]) <= 1e-4


def test_stage2_and_bad_settings_are_clear_errors(cir):
  # Stage II: the Combiner trains on cached features; the loop reports the task's error naming `cir.stage`.
  stage2 = copy.copy(cir.task)
  stage2.stage = 2
  stage2.config = override(cir.task.config, {"cir.stage": 2})
  with pytest.raises(ValueError, match=r"needs cir.stage = 1 \(got cir.stage = 2\).*grad_cache.chunk_size=0"):
    stage2.grad_cache_parts()
  with pytest.raises(ValueError, match=r"needs cir.stage = 1"):
    loop.make_train_step(stage2, None, 1, "stop", 4)
  parts = cir.task.grad_cache_parts()
  with pytest.raises(ValueError, match="must divide the per-step batch"):
    grad_cache.value_and_grad(parts, cir.params, cir.batch, jax.random.PRNGKey(0), 3)
