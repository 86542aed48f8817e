"""Key maps for the image side of BLIP-2 (`models/blip2.py`): HF `Blip2ForConditionalGeneration` /
`Blip2Model` keys `vision_model.*`, `query_tokens`, `qformer.*`, `language_projection.*`, both ways.
The LLM (`language_model.*`) has its own family's rules; pass `ignore=("language_model.*",)` to convert
the image side alone.

ViT attention comes in two layouts (shared/reference/blip_family.md):
  "qkv_bias"  transformers >= 4.28: `self_attn.qkv.weight` [3D, D] + `self_attn.qkv.bias` [3D]
              (q, k, v thirds; the k third is zero in released checkpoints, a trainable param in HF).
  "q_v_bias"  early HF BLIP-2 uploads (and EVA / LAVIS): `self_attn.qkv.weight` + `self_attn.q_bias`,
              `self_attn.v_bias` [D] each; no k bias (ours: zeros).
Both become our `q_proj` / `k_proj` / `v_proj` (kernel + bias), the fused weight split into thirds as in
`convert/blip.py`. The layout read is recorded in the meta and written back by `to_state_dict`, so
either round-trips bitwise; writing "q_v_bias" needs a zero k bias (else an error naming the key).
"""

from __future__ import annotations

import re
from typing import Iterable

import flax.linen as nn
import jax
import numpy as np

from mmret_jax.convert import blip as blip_family
from mmret_jax.convert.core import (ConversionError, Rule, linear_rules, norm_rules, params_to_state_dict,
                                    state_dict_to_params)
from mmret_jax.models import blip2

MODEL_TYPES = (blip2.MODEL_TYPE,)
IGNORED = ("*position_ids",)
LLM_KEYS = "language_model.*"
QKV_LAYOUTS = ("qkv_bias", "q_v_bias")
_LEGACY_KEY = re.compile(r"^(.*\.self_attn)\.([qv])_bias$")
_FUSED_BIAS_KEY = re.compile(r"^(.*\.self_attn)\.qkv\.bias$")


def _attention_rules(path: tuple[str, ...], key: str) -> list[Rule]:
  """HF `Blip2QFormerAttention` at `key` <-> our `QFormerAttention` at `path`."""
  r = []
  for proj in ("query", "key", "value"):
    r += linear_rules(path + ("attention", proj), f"{key}.attention.{proj}")
  return r + linear_rules(path + ("output", "dense"), f"{key}.output.dense") + \
      norm_rules(path + ("output", "LayerNorm"), f"{key}.output.LayerNorm")


def qformer_rules(config: blip2.Blip2QFormerConfig, path: tuple[str, ...] = ("qformer",),
                  prefix: str = "qformer.") -> list[Rule]:
  """HF `Blip2QFormerModel` keys under `prefix` <-> our `QFormerModel` params under `path`."""
  r = norm_rules(path + ("layernorm",), f"{prefix}layernorm")
  for i in range(config.num_hidden_layers):
    o, k = path + ("encoder", f"layer_{i}"), f"{prefix}encoder.layer.{i}"
    r += _attention_rules(o + ("attention",), f"{k}.attention")
    if config.has_cross_attention(i):
      r += _attention_rules(o + ("crossattention",), f"{k}.crossattention")
    r += linear_rules(o + ("intermediate_query", "dense"), f"{k}.intermediate_query.dense")
    r += linear_rules(o + ("output_query", "dense"), f"{k}.output_query.dense")
    r += norm_rules(o + ("output_query", "LayerNorm"), f"{k}.output_query.LayerNorm")
  return r


def rules(config: blip2.Blip2Config, language_projection: bool = True) -> list[Rule]:
  """Every (our path, HF key) pair of the image side (ViT q/k/v as virtual third keys `qkv.weight[j]`)."""
  # The ViT keys are BLIP's (`BlipVisionModel` and `Blip2VisionModel` share names and the fused qkv).
  r = blip_family.vision_rules(config.vision_config.to_vit())
  r += [Rule(("query_tokens",), "query_tokens")] + qformer_rules(config.qformer_config)
  if language_projection:
    r += linear_rules(("language_projection",), "language_projection")
  return r


def qkv_layout(sd: dict[str, np.ndarray]) -> str:
  """"q_v_bias" if the ViT has separate `q_bias` / `v_bias` params, else "qkv_bias"; mixing is an error."""
  legacy = sorted(k for k in sd if _LEGACY_KEY.match(k))
  fused = sorted(k for k in sd if _FUSED_BIAS_KEY.match(k))
  if legacy and fused:
    raise ConversionError(f"the ViT mixes the two qkv bias layouts: {legacy[0]} and {fused[0]}")
  return "q_v_bias" if legacy else "qkv_bias"


def fuse_legacy_bias(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`...self_attn.q_bias` / `.v_bias` [D] -> `...self_attn.qkv.bias` = concat(q, zeros, v) [3D]."""
  out, parts = {}, {}
  for k, x in sd.items():
    m = _LEGACY_KEY.match(k)
    if m:
      parts.setdefault(m.group(1), {})[m.group(2)] = np.asarray(x)
    else:
      out[k] = x
  for attn, p in sorted(parts.items()):
    for name in ("q", "v"):
      if name not in p:
        raise ConversionError(f"missing keys: {attn}.{name}_bias (its {'v' if name == 'q' else 'q'}_bias "
                              "is present)")
    q, v = p["q"], p["v"]
    if q.ndim != 1 or q.shape != v.shape:
      raise ConversionError(f"{attn}.q_bias {q.shape} / {attn}.v_bias {v.shape}: expected two [D] vectors")
    out[f"{attn}.qkv.bias"] = np.concatenate([q, np.zeros_like(q), v])
  return out


def split_legacy_bias(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Inverse of `fuse_legacy_bias`; the k third of each `qkv.bias` must be zero (no key to hold it)."""
  out = {}
  for k, x in sd.items():
    m = _FUSED_BIAS_KEY.match(k)
    if not m:
      out[k] = x
      continue
    q, kb, v = np.split(np.asarray(x), 3)
    if np.any(kb != 0):
      raise ConversionError(f"{k}: the k third is nonzero (max |b_k| {float(np.abs(kb).max()):.3g}); the "
                            "q_v_bias layout cannot hold it: write the qkv_bias layout")
    out[f"{m.group(1)}.q_bias"], out[f"{m.group(1)}.v_bias"] = q, v
  return out


def config_from_hf(hf_config: dict, language_projection: bool = True) -> blip2.Blip2Config:
  try:
    cfg = blip2.Blip2Config.from_dict(hf_config)
    cfg.validate()
    if language_projection:
      _ = cfg.text_hidden_size  # raises without an LLM width
  except (TypeError, ValueError) as e:
    raise ConversionError(f"Unsupported BLIP-2 config: {e}") from e
  return cfg


def build_model(hf_config: dict, meta: dict, **kw) -> blip2.Blip2VisionQFormer:
  proj = meta.get("language_projection", True)
  return blip2.Blip2VisionQFormer(config_from_hf(hf_config, proj), add_language_projection=proj, **kw)


def expected_shapes(model: blip2.Blip2VisionQFormer):
  return jax.eval_shape(lambda: nn.unbox(blip2.init_params(model, jax.random.PRNGKey(0))))


def to_params(sd: dict[str, np.ndarray], hf_config: dict, *, language_projection: bool | None = None,
              ignore: Iterable[str] = ()) -> tuple[dict, dict]:
  """HF state dict (image side) -> (our params, meta). Strict: a missing, unexpected (not matching
  `ignore`, fnmatch patterns) or mis-shaped key is an error naming it. `language_projection`: None =
  converted when `language_projection.*` is present (mBLIP re-initialises it for BLOOMZ)."""
  if language_projection is None:
    language_projection = any(k.startswith("language_projection.") for k in sd)
  meta = {"qkv_layout": qkv_layout(sd), "language_projection": bool(language_projection)}
  model = build_model(hf_config, meta)
  sd = blip_family.split_qkv(fuse_legacy_bias(sd))
  params = state_dict_to_params(rules(model.config, meta["language_projection"]), sd,
                                expected=expected_shapes(model), ignore=IGNORED + tuple(ignore))
  return params, meta


def to_state_dict(params: dict, hf_config: dict, meta: dict) -> dict[str, np.ndarray]:
  """Our params -> HF keys, in the meta's qkv layout (default "qkv_bias", transformers' own)."""
  layout = meta.get("qkv_layout", "qkv_bias")
  if layout not in QKV_LAYOUTS:
    raise ConversionError(f"qkv_layout must be one of {QKV_LAYOUTS}, got {layout!r}")
  proj = meta.get("language_projection", True)
  sd = blip_family.fuse_qkv(params_to_state_dict(rules(config_from_hf(hf_config, proj), proj), params))
  return split_legacy_bias(sd) if layout == "q_v_bias" else sd
