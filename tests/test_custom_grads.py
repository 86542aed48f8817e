"""Hand-written gradients in models/layers.py against autodiff of the plain formulas (float32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmret_jax.models import layers


def _plain_layer_norm(x, scale, bias, eps):
  m = x.mean(-1, keepdims=True)
  return (x - m) * jax.lax.rsqrt(((x - m) ** 2).mean(-1, keepdims=True) + eps) * scale + bias


def _plain_gelu(z):
  return 0.5 * z * (1.0 + jax.scipy.special.erf(z / np.sqrt(2.0)))


@pytest.mark.parametrize("shape", [(4, 7, 48), (3, 64)])
def test_layer_norm_values_and_grads(shape):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape) * 3 + 1, jnp.float32)
  scale, bias = (jnp.asarray(rng.normal(size=shape[-1]), jnp.float32) for _ in range(2))
  cot = jnp.asarray(rng.normal(size=shape), jnp.float32)
  ours = lambda *a: layers.layer_norm(*a, 1e-5, jnp.float32)
  plain = lambda *a: _plain_layer_norm(*a, 1e-5)
  np.testing.assert_allclose(ours(x, scale, bias), plain(x, scale, bias), atol=1e-5, rtol=0)
  g1 = jax.grad(lambda *a: (ours(*a) * cot).sum(), (0, 1, 2))(x, scale, bias)
  g2 = jax.grad(lambda *a: (plain(*a) * cot).sum(), (0, 1, 2))(x, scale, bias)
  for name, a, b in zip(("x", "scale", "bias"), g1, g2):
    assert float(jnp.abs(b).max()) > 0.1, name
    np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(b).max()), rtol=0, err_msg=name)


def test_layer_norm_bf16_output_and_grad_dtypes():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 32)), jnp.bfloat16)
  scale, bias = jnp.ones(32), jnp.zeros(32)
  y = layers.layer_norm(x, scale, bias, 1e-5, jnp.bfloat16)
  assert y.dtype == jnp.bfloat16
  gx, gs, gb = jax.grad(lambda *a: layers.layer_norm(*a, 1e-5, jnp.bfloat16).astype(jnp.float32).sum(),
                        (0, 1, 2))(x, scale, bias)
  assert gx.dtype == jnp.bfloat16 and gs.dtype == gb.dtype == jnp.float32


def test_bias_gelu_values_and_grads():
  rng = np.random.default_rng(2)
  y = jnp.asarray(rng.normal(size=(3, 9, 40)) * 2, jnp.float32)
  b = jnp.asarray(rng.normal(size=40), jnp.float32)
  cot = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  np.testing.assert_allclose(layers.bias_gelu(y, b), _plain_gelu(y + b), atol=1e-6, rtol=0)
  np.testing.assert_allclose(layers.gelu_erf(y), _plain_gelu(y), atol=1e-6, rtol=0)
  g1 = jax.grad(lambda *a: (layers.bias_gelu(*a) * cot).sum(), (0, 1))(y, b)
  g2 = jax.grad(lambda *a: (_plain_gelu(a[0] + a[1]) * cot).sum(), (0, 1))(y, b)
  for a, c in zip(g1, g2):
    np.testing.assert_allclose(a, c, atol=1e-5 * float(jnp.abs(c).max()), rtol=0)
