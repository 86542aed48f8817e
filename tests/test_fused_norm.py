"""The fused bias + dropout + residual + LayerNorm kernels (mmret_jax/models/fused_norm.py).

The Pallas kernels run in the Pallas interpreter here (CPU); on a GPU they compile through Triton.
The reference is the unfused composition (`layers.dropout`'s mask, `layers.layer_norm`) in float32:
outputs and the gradients of all five inputs must agree to 1e-5 (relative to the largest entry for
the summed parameter gradients)."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmret_jax.models import bert, fused_norm as fn, layers
from fixtures import simulated_devices  # noqa: E402

EPS = 1e-12


def _inputs(shape, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  d = shape[-1]
  y, r = (jnp.asarray(rng.normal(size=shape), dtype) for _ in range(2))
  bias = jnp.asarray(0.1 * rng.normal(size=d), dtype)
  scale = jnp.asarray(1 + 0.2 * rng.normal(size=d), jnp.float32)
  beta = jnp.asarray(0.1 * rng.normal(size=d), jnp.float32)
  return y, bias, r, scale, beta


def _reference(y, bias, r, scale, beta, key, rate):
  h = y + bias
  if rate > 0:
    h = _drop(h, key, rate)
  return layers.layer_norm(h + r, scale, beta, EPS, y.dtype)


def _drop(h, key, rate):
  idx = jnp.arange(h.size, dtype=jnp.uint32).reshape(h.shape)
  scaled = (h.astype(jnp.float32) * (1.0 / (1.0 - rate))).astype(h.dtype)
  return jnp.where(layers.hash_keep(idx, key, rate), scaled, jnp.zeros((), h.dtype))


@pytest.mark.parametrize("shape,rate", [((2, 16, 48), 0.0), ((3, 8, 96), 0.25), ((2, 24, 768), 0.1)])
def test_kernels_match_reference_forward_and_grads(shape, rate):
  args = _inputs(shape)
  key = jnp.uint32(4321)
  fused = lambda *a: fn.residual_layer_norm(*a, epsilon=EPS, dropout_rate=rate,
                                            dropout_key=key if rate else None, interpret=True)
  ref = lambda *a: _reference(*a, key, rate)
  out, want = fused(*args), ref(*args)
  assert out.shape == shape and out.dtype == jnp.float32
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=0)
  cot = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)
  g_fused = jax.grad(lambda *a: (fused(*a) * cot).sum(), argnums=range(5))(*args)
  g_ref = jax.grad(lambda *a: (ref(*a) * cot).sum(), argnums=range(5))(*args)
  for name, a, b in zip(("y", "bias", "residual", "scale", "beta"), g_fused, g_ref):
    top = float(jnp.abs(b).max())
    assert a.shape == b.shape and top > 1e-2, name
    np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, top), rtol=0, err_msg=name)
  if rate:  # dropout really acted
    assert float(jnp.abs(out - _reference(*args, key, 0.0)).max()) > 1e-2


def test_chunking_and_supported():
  assert fn.chunking(768) == (3, 256) and fn.chunking(1024) == (4, 256) and fn.chunking(48) == (3, 16)
  assert fn.chunking(60) is None  # no power-of-two block of 16+ columns divides 60
  bf = lambda d: jax.ShapeDtypeStruct((4, 64, d), jnp.bfloat16)
  assert fn.supported(bf(768)) and not fn.supported(bf(60))
  assert not fn.supported(jax.ShapeDtypeStruct((4, 64, 768), jnp.float32))  # float32 stays on XLA


def test_bert_with_fused_norm_matches_xla_path_with_dropout():
  """Model level, dropout on: same params and dropout RNG give the same outputs and gradients,
  so the kernels draw the very masks `layers.dropout` draws."""
  cfg = bert.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=40, model_type="roberta", pad_token_id=1,
                        type_vocab_size=1, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.0)
  ids = np.random.default_rng(1).integers(3, 99, size=(3, 16)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 9:] = 0
  ids[1, 9:] = 1
  outs, grads = {}, {}
  for impl in ("xla", "fused_interpret"):
    model = bert.BertModel(dataclasses.replace(cfg, norm_impl=impl), add_pooling_layer=True)
    if impl == "xla":
      params = nn.unbox(bert.init_params(model, jax.random.PRNGKey(0), seq_len=16))
      params = jax.tree_util.tree_map_with_path(  # non-trivial biases and LayerNorm params
          lambda p, x: x + 0.1 * jnp.sin(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape))
          if p[-1].key in ("bias", "scale") else x, params)
    run = lambda p, m=model: m.apply({"params": p}, ids, mask, deterministic=False,
                                     rngs={"dropout": jax.random.PRNGKey(7)})
    outs[impl] = run(params)
    grads[impl] = jax.grad(lambda p, run=run: jnp.sum(run(p)["pooler_output"] ** 2))(params)
  for key in ("last_hidden_state", "pooler_output"):
    np.testing.assert_allclose(outs["fused_interpret"][key], outs["xla"][key], atol=1e-5, rtol=0)
  no_drop = bert.BertModel(cfg, add_pooling_layer=True).apply({"params": params}, ids, mask)
  assert float(jnp.abs(no_drop["last_hidden_state"] - outs["xla"]["last_hidden_state"]).max()) > 1e-2
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads["fused_interpret"]),
                          jax.tree.leaves(grads["xla"])):
    np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(jnp.abs(b).max())), rtol=0,
                               err_msg=jax.tree_util.keystr(path))


def test_bad_norm_impl_is_a_clear_error():
  m = layers.ResidualPostLN(8, implementation="apex")
  with pytest.raises(ValueError, match="norm implementation"):
    m.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 8)), jnp.zeros((1, 2, 8)))


_MESH_SCRIPT = r'''
import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P
from mmret_jax.models import fused_norm as fn
from mmret_jax.train import partitioning
rng = np.random.default_rng(0)
y, r = (jnp.asarray(rng.normal(size=(8, 16, 48)), jnp.float32) for _ in range(2))
bias, beta = (jnp.asarray(0.1 * rng.normal(size=48), jnp.float32) for _ in range(2))
scale = jnp.asarray(1 + 0.2 * rng.normal(size=48), jnp.float32)
f = lambda y, r, b, s, be: fn.residual_layer_norm(y, b, r, s, be, epsilon=1e-12, dropout_rate=0.3,
                                                  dropout_key=jnp.uint32(11), interpret=True)
run = jax.jit(lambda *a: (f(*a), jax.grad(lambda *a: (f(*a) ** 2).sum(), argnums=range(5))(*a)))
ref = run(y, r, bias, scale, beta)
mesh = partitioning.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())
with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.RULES):
  sh = NamedSharding(mesh, P(("data", "fsdp"), None, None))
  args = (jax.device_put(y, sh), jax.device_put(r, sh), bias, scale, beta)
  out = run(*args)
  hlo = run.lower(*args).compile().as_text()
rel = max(float(jnp.abs(a - b).max() / jnp.abs(b).max()) for a, b in zip(out[1], ref[1]))
print("RESULT", float(jnp.abs(out[0] - ref[0]).max()), rel, out[0].sharding.is_equivalent_to(sh, 3),
      "all-gather" in hlo)
'''


def test_kernels_run_per_row_shard_on_a_mesh():
  """On 8 simulated devices the kernels run per batch shard under shard_map, hashing global row
  indices: same values and gradients as one device (so the same dropout mask), output left sharded,
  no gathers."""
  repo = pathlib.Path(__file__).resolve().parents[1]
  env = {**os.environ, "XLA_FLAGS": simulated_devices(8), "PYTHONPATH": str(repo)}
  r = subprocess.run([sys.executable, "-c", _MESH_SCRIPT], capture_output=True, text=True, env=env,
                     cwd=repo, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  d_out, d_grad, sharded, gathers = r.stdout.split("RESULT", 1)[1].split()
  assert float(d_out) <= 1e-6 and float(d_grad) <= 1e-5
  assert sharded == "True" and gathers == "False"
