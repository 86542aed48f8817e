"""The fused attention kernel (mmret_jax/models/fused_attention.py) and the dropout it shares.

The Pallas kernels run in the Pallas interpreter here (CPU); on a GPU the same kernels compile
through Triton (GPU runs: benchmarks/RESULTS.md). The reference is plain JAX attention under the very
same keep mask (`keep_mask`), in float32: forward and q/k/v gradients must agree to 1e-5.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmret_jax.models import bert, fused_attention as fa, layers
from fixtures import simulated_devices  # noqa: E402


def _reference(q, k, v, key_mask, keys, rate):
  scale = q.shape[-1] ** -0.5
  qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
  s = jnp.einsum("bnlh,bnsh->bnls", qt, kt) * scale
  s = jnp.where(key_mask[:, None, None, :] != 0, s, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(s, -1)
  if rate > 0:
    p = jnp.where(fa.keep_mask(keys, q.shape[1], k.shape[1], rate), p / (1 - rate), 0.0)
  return jnp.einsum("bnls,bnsh->bnlh", p, vt).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("shape,rate", [((2, 16, 32, 2, 16), 0.0), ((2, 16, 32, 2, 16), 0.25),
                                        ((1, 64, 64, 2, 64), 0.1)])
def test_kernel_matches_reference_forward_and_grads(shape, rate):
  b, q_len, kv_len, n, h = shape
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32) for t in (q_len, kv_len, kv_len))
  key_mask = jnp.asarray(rng.random((b, kv_len)) < 0.7).astype(jnp.int32).at[:, 0].set(1)
  seed = jnp.uint32(2024)
  keys = fa.head_keys(seed, b, n)
  fused = lambda q, k, v: fa.fused_attention(q, k, v, key_mask, dropout_rate=rate, dropout_seed=seed,
                                             interpret=True)
  ref = lambda q, k, v: _reference(q, k, v, key_mask, keys, rate)
  out, want = fused(q, k, v), ref(q, k, v)
  assert out.shape == want.shape == q.shape
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=0)
  cot = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
  g_fused = jax.grad(lambda *a: (fused(*a) * cot).sum(), argnums=(0, 1, 2))(q, k, v)
  g_ref = jax.grad(lambda *a: (ref(*a) * cot).sum(), argnums=(0, 1, 2))(q, k, v)
  for name, a, b_ in zip("qkv", g_fused, g_ref):
    assert float(jnp.abs(b_).max()) > 1e-2, name  # a real gradient
    np.testing.assert_allclose(a, b_, atol=1e-5, rtol=0, err_msg=name)
  if rate > 0:  # dropout really acted: without it the output differs
    no_drop = _reference(q, k, v, key_mask, keys, 0.0)
    assert float(jnp.abs(out - no_drop).max()) > 1e-2


@pytest.mark.parametrize("shape,rate", [((2, 16, 2, 16), 0.0), ((2, 32, 3, 32), 0.2)])
def test_packed_kernel_matches_reference_forward_and_grads(shape, rate):
  """`fused_attention_qkv` reads q, k, v (+ biases) from the packed projection and writes the packed
  gradient and the bias gradient itself: same values and gradients as the reference on the slices."""
  b, length, n, h = shape
  rng = np.random.default_rng(1)
  y = jnp.asarray(rng.normal(size=(b, length, 3, n, h)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(3, n, h)), jnp.float32)
  key_mask = jnp.asarray(rng.random((b, length)) < 0.7).astype(jnp.int32).at[:, 0].set(1)
  seed = jnp.uint32(99)
  keys = fa.head_keys(seed, b, n)
  fused = lambda y, bias: fa.fused_attention_qkv(y, bias, key_mask, dropout_rate=rate, dropout_seed=seed,
                                                 interpret=True)
  ref = lambda y, bias: _reference(*(y[:, :, j] + bias[j] for j in range(3)), key_mask, keys, rate)
  out, want = fused(y, bias), ref(y, bias)
  assert out.shape == (b, length, n, h)
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=0)
  cot = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
  g_fused = jax.grad(lambda *a: (fused(*a) * cot).sum(), argnums=(0, 1))(y, bias)
  g_ref = jax.grad(lambda *a: (ref(*a) * cot).sum(), argnums=(0, 1))(y, bias)
  for name, a, b_ in zip(("y", "bias"), g_fused, g_ref):
    assert a.shape == b_.shape and float(jnp.abs(b_).max()) > 1e-2, name
    np.testing.assert_allclose(a, b_, atol=1e-5 * max(1.0, float(jnp.abs(b_).max())), rtol=0, err_msg=name)
  # without biases: the same as zero biases
  np.testing.assert_array_equal(fa.fused_attention_qkv(y, None, key_mask, interpret=True),
                                fa.fused_attention_qkv(y, jnp.zeros_like(bias), key_mask, interpret=True))


def test_keep_mask_statistics_and_determinism():
  rate = 0.1
  m = fa.keep_mask(fa.head_keys(jnp.uint32(7), 32, 12), 64, 64, rate)
  frac = float(m.mean())
  sd = (rate * (1 - rate) / m.size) ** 0.5
  assert abs(frac - (1 - rate)) < 5 * sd, frac
  per_head = np.asarray(m.mean((2, 3)))  # every (batch, head) block keeps ~90%, none is degenerate
  assert per_head.min() > 0.85 and per_head.max() < 0.95
  same = fa.keep_mask(fa.head_keys(jnp.uint32(7), 32, 12), 64, 64, rate)
  other = fa.keep_mask(fa.head_keys(jnp.uint32(8), 32, 12), 64, 64, rate)
  assert bool((m == same).all())
  assert 0.1 < float((m != other).mean()) < 0.25  # independent masks differ at ~2 p (1 - p)
  # neighbouring rows / heads are not copies of each other
  assert float((m[0, 0, 0] != m[0, 0, 1]).mean()) > 0.05
  assert float((m[0, 0] != m[0, 1]).mean()) > 0.1


def test_supported_shapes():
  x = lambda l, h=64, dt=jnp.bfloat16: jnp.zeros((2, l, 12, h), dt)
  assert fa.supported(x(64), x(64))
  assert fa.supported(x(16), x(256))
  assert not fa.supported(x(1), x(64))    # the CLS-only last layer: XLA path
  assert not fa.supported(x(48), x(48))   # not a power of two
  assert not fa.supported(x(512), x(512))
  assert not fa.supported(x(64, dt=jnp.float32), x(64, dt=jnp.float32))  # float32 stays on XLA
  assert not fa.supported(x(64, h=80), x(64, h=80))
  packed = lambda l, dt=jnp.bfloat16: jax.ShapeDtypeStruct((2, l, 3, 12, 64), dt)
  assert fa.supported_packed(packed(64)) and not fa.supported_packed(packed(48))
  assert not fa.supported_packed(packed(64, jnp.float32))
  assert not fa.supported_packed(jax.ShapeDtypeStruct((2, 64, 2, 12, 64), jnp.bfloat16))


def test_bert_with_fused_attention_matches_xla_path():
  """The model-level switch: same params, the kernel (interpreted) vs the XLA attention."""
  cfg = bert.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=40, model_type="roberta",
                        pad_token_id=1, type_vocab_size=1)
  ids = np.random.default_rng(1).integers(3, 99, size=(3, 16)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 9:] = 0
  ids[1, 9:] = 1
  outs, grads = {}, {}
  import dataclasses  # pylint: disable=import-outside-toplevel
  params = nn.unbox(bert.init_params(bert.BertModel(cfg, add_pooling_layer=True), jax.random.PRNGKey(0), seq_len=16))
  for impl in ("xla", "fused_interpret", "fused_qkv_interpret"):
    model = bert.BertModel(dataclasses.replace(cfg, attention_impl=impl), add_pooling_layer=True)
    outs[impl] = model.apply({"params": params}, ids, mask)
    # HF-style init zeroes the biases: shift them so the kernels' bias handling matters
    shifted = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.1 if path[-1].key == "bias" else x, params)
    grads[impl] = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, ids, mask)["pooler_output"] ** 2))(shifted)
  qkv_bias = lambda g: g["encoder"]["layer_0"]["attention"]["self"]["value"]["bias"]
  assert float(jnp.abs(qkv_bias(grads["xla"])).max()) > 1e-4
  for impl in ("fused_interpret", "fused_qkv_interpret"):
    for key in ("last_hidden_state", "pooler_output"):
      np.testing.assert_allclose(outs[impl][key], outs["xla"][key], atol=1e-5, rtol=0, err_msg=impl)
    for (path, a), b_ in zip(jax.tree_util.tree_leaves_with_path(grads[impl]), jax.tree.leaves(grads["xla"])):
      np.testing.assert_allclose(a, b_, atol=1e-5, rtol=0, err_msg=f"{impl} {jax.tree_util.keystr(path)}")


def test_bad_attention_impl_is_a_clear_error():
  q = jnp.zeros((1, 16, 2, 16))
  with pytest.raises(ValueError, match="attention implementation"):
    layers.dot_product_attention(q, q, q, None, implementation="flash")


def test_dropout_keeps_and_scales():
  x = jnp.ones((256, 256), jnp.float32)
  y = layers.dropout(jax.random.PRNGKey(0), x, 0.25)
  kept = np.asarray(y != 0)
  assert abs(kept.mean() - 0.75) < 0.01
  np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.75, rtol=1e-6)
  yb = layers.dropout(jax.random.PRNGKey(0), x.astype(jnp.bfloat16), 0.25)
  assert yb.dtype == jnp.bfloat16 and bool(((yb != 0) == (y != 0)).all())
  assert layers.dropout(jax.random.PRNGKey(0), x, 0.0) is x
  assert float(jnp.abs(layers.dropout(jax.random.PRNGKey(0), x, 1.0)).max()) == 0.0
  d = layers.Dropout(0.5)
  np.testing.assert_array_equal(d.apply({}, x, deterministic=True), x)


def test_dropout_masks_are_independent_across_keys_rows_and_columns():
  x = jnp.ones((64, 128, 96), jnp.float32)
  m1 = np.asarray(layers.dropout(jax.random.PRNGKey(1), x, 0.5) != 0)
  m2 = np.asarray(layers.dropout(jax.random.PRNGKey(2), x, 0.5) != 0)
  np.testing.assert_array_equal(m1, np.asarray(layers.dropout(jax.random.PRNGKey(1), x, 0.5) != 0))
  for a, b in ((m1, m2), (m1[1:], m1[:-1]), (m1[:, 1:], m1[:, :-1]), (m1[..., 1:], m1[..., :-1])):
    assert abs((a == b).mean() - 0.5) < 0.01  # agreement of independent fair coins
  assert abs(m1.mean() - 0.5) < 0.005


_MESH_SCRIPT = r'''
import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P
from mmret_jax.models import fused_attention as fa, layers
from mmret_jax.train import partitioning
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.normal(size=(8, 16, 4, 16)), jnp.float32) for _ in range(3))
m = np.ones((8, 16), bool); m[1, 9:] = False
mask = jnp.asarray(m)[:, None, None, :]
f = lambda q, k, v: layers.dot_product_attention(q, k, v, mask, dropout_rate=0.2, dropout_rng=jax.random.PRNGKey(3),
                                                 implementation="fused_interpret")
run = jax.jit(lambda q, k, v: (f(q, k, v), jax.grad(lambda q: (f(q, k, v) ** 2).sum())(q)))
ref = run(q, k, v)
y = jnp.stack([q, k, v], 2)  # packed [B, L, 3, N, H]
bias = jnp.asarray(rng.normal(size=(3, 4, 16)), jnp.float32)
fp = lambda y, bias: fa.fused_attention_qkv(y, bias, jnp.asarray(m), dropout_rate=0.2, dropout_seed=jnp.uint32(5),
                                            interpret=True)
run_p = jax.jit(lambda y, bias: (fp(y, bias), jax.grad(lambda y, bias: (fp(y, bias) ** 2).sum(), (0, 1))(y, bias)))
ref_p = run_p(y, bias)
mesh = partitioning.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())
with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.RULES):
  sh = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
  args = [jax.device_put(x, sh) for x in (q, k, v)]
  out = run(*args)
  hlo = run.lower(*args).compile().as_text()
  yd = jax.device_put(y, NamedSharding(mesh, P(("data", "fsdp"), None, None, "tensor", None)))
  out_p = run_p(yd, bias)
  hlo_p = run_p.lower(yd, bias).compile().as_text()
print("RESULT", float(jnp.abs(out[0] - ref[0]).max()), float(jnp.abs(out[1] - ref[1]).max()),
      out[0].sharding.spec == sh.spec, "all-gather" in hlo)
print("PACKED", float(jnp.abs(out_p[0] - ref_p[0]).max()),
      max(float(jnp.abs(a - b).max() / jnp.abs(b).max()) for a, b in zip(out_p[1], ref_p[1])),  # relative
      out_p[0].sharding.is_equivalent_to(sh, 4), "all-gather" in hlo_p)
'''


def test_kernel_runs_per_shard_on_a_mesh():
  """On a (data 2, fsdp 2, tensor 2) mesh the kernels run under shard_map on each device's
  (batch, head) block: same values and gradients as one device, output left sharded, no gathers."""
  import os, pathlib, subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  repo = pathlib.Path(__file__).resolve().parents[1]
  env = {**os.environ, "XLA_FLAGS": simulated_devices(8), "PYTHONPATH": str(repo)}
  r = subprocess.run([sys.executable, "-c", _MESH_SCRIPT], capture_output=True, text=True, env=env,
                     cwd=repo, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  # The split-input kernel (q-gradient max|diff|); the packed q/k/v one (y and bias gradients, relative
  # to their largest entry: the bias gradient sums 128 rows, so float32 summation order shows).
  for tag in ("RESULT", "PACKED"):
    d_out, d_grad, sharded, gathers = r.stdout.split(tag, 1)[1].split()[:4]
    assert float(d_out) <= 1e-6 and float(d_grad) <= 1e-5, tag
    assert sharded == "True" and gathers == "False", tag
