"""The CLIP4Cir Combiner (Baldrati et al. 2022) as Bi-BLIP4CIR uses it on BLIP's 256-d features.

Mirrors `Cuberick-Orion/Bi-Blip4CIR` `src/combiner.py` (shared/reference/bi_blip4cir.md):
  tp = drop1(relu(text_projection_layer(t)))          d -> p
  ip = drop2(relu(image_projection_layer(i)))         d -> p
  c  = concat[tp, ip]                                 text first
  v  = output_layer(drop3(relu(combiner_layer(c))))   2p -> h -> d
  lam = sigmoid(dynamic_scalar(c))                    Linear(2p, h), ReLU, Dropout, Linear(h, 1)
  q  = normalize(v + lam * t + (1 - lam) * i)         with the raw (unnormalised) t and i
Dropout 0.5 everywhere; the logit scale is the constant 100. Param names follow the torch module
(`dynamic_scalar/0`, `dynamic_scalar/3` are the Sequential's Linear layers).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmret_jax.losses import l2_normalize
from mmret_jax.models import layers

Array = jax.Array
Dtype = Any


@dataclasses.dataclass(frozen=True)
class CombinerConfig:
  feature_dim: int = 256
  projection_dim: int = 2560
  hidden_dim: int = 5120
  dropout: float = 0.5
  logit_scale: float = 100.0


class Combiner(nn.Module):
  """`combine(image_features [.., d], text_features [.., d]) -> normalised [.., d]`."""
  config: CombinerConfig = CombinerConfig()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image_features: Array, text_features: Array, *, deterministic: bool = True) -> Array:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    drop = lambda x: layers.Dropout(c.dropout)(x, deterministic=deterministic)
    dense = lambda n, axes, name: layers.Dense(n, axes, name=name, **kw)
    tp = drop(jax.nn.relu(dense(c.projection_dim, ("embed", "mlp"), "text_projection_layer")(text_features)))
    ip = drop(jax.nn.relu(dense(c.projection_dim, ("embed", "mlp"), "image_projection_layer")(image_features)))
    raw = jnp.concatenate([tp, ip], axis=-1)
    combined = drop(jax.nn.relu(dense(c.hidden_dim, ("mlp", "embed"), "combiner_layer")(raw)))
    out = dense(c.feature_dim, ("embed", "mlp"), "output_layer")(combined)
    lam = drop(jax.nn.relu(dense(c.hidden_dim, ("mlp", "embed"), "dynamic_scalar_0")(raw)))
    lam = jax.nn.sigmoid(dense(1, ("embed", None), "dynamic_scalar_3")(lam).astype(jnp.float32))
    t, i = text_features.astype(jnp.float32), image_features.astype(jnp.float32)
    return l2_normalize(out.astype(jnp.float32) + lam * t + (1.0 - lam) * i)


def init_params(model: Combiner, rng: Array) -> dict:
  x = jnp.zeros((1, model.config.feature_dim), jnp.float32)
  return model.init(rng, x, x)["params"]
