"""Key map for the seed's SASRecText / UniSRec (RecBole 1.2 `SASRec` subclasses) <-> `models.sasrec.SeqRecModel`.

The source is what RecBole's trainer saves (`torch.save({'state_dict': model.state_dict(), ...})`), or that
state dict alone:
  position_embedding.weight, LayerNorm.{weight,bias}
  trm_encoder.layer.{i}.multi_head_attention.{query,key,value,dense}.{weight,bias}, ...multi_head_attention.LayerNorm
  trm_encoder.layer.{i}.feed_forward.{dense_1,dense_2}.{weight,bias}, ...feed_forward.LayerNorm
  adaptor.mlp_layers.{3k+1}.{weight,bias}                        SASRecText (Sequential indices)
  moe_adaptor.experts.{e}.bias, moe_adaptor.experts.{e}.lin.weight, moe_adaptor.{w_gate,w_noise}   UniSRec
  item_embedding.weight                                           UniSRec transductive_ft
  plm_embedding.weight                                            the frozen feature table: returned apart
Every key is consumed exactly once (core.state_dict_to_params); a missing, unexpected or mis-shaped key raises
`ConversionError` (a ValueError) naming it. Not registered in `convert/__init__.py`'s family table.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from mmret_jax.convert.core import (ConversionError, Rule, linear_rules, norm_rules, params_to_state_dict,
                                    state_dict_to_params)
from mmret_jax.models import sasrec

PLM_KEY = "plm_embedding.weight"


def rules(config: sasrec.SASRecConfig) -> list[Rule]:
  """Every (our param path, RecBole key) pair of a SeqRecModel(config)."""
  r = [Rule(("position_embedding", "embedding"), "position_embedding.weight")]
  r += norm_rules(("LayerNorm",), "LayerNorm")
  for i in range(config.n_layers):
    ours, theirs = ("trm_encoder", f"layer_{i}"), f"trm_encoder.layer.{i}"
    att, ff = f"{theirs}.multi_head_attention", f"{theirs}.feed_forward"
    for n in ("query", "key", "value"):
      r += linear_rules(ours + ("attention", "self", n), f"{att}.{n}")
    r += linear_rules(ours + ("attention", "output", "dense"), f"{att}.dense")
    r += norm_rules(ours + ("attention", "output", "LayerNorm"), f"{att}.LayerNorm")
    r += linear_rules(ours + ("intermediate", "dense"), f"{ff}.dense_1")
    r += linear_rules(ours + ("output", "dense"), f"{ff}.dense_2")
    r += norm_rules(ours + ("output", "LayerNorm"), f"{ff}.LayerNorm")
  if config.adaptor == "mlp":
    for k in range(len(config.adaptor_layers) - 1):
      r += linear_rules(("adaptor", f"mlp_layers_{3 * k + 1}"), f"adaptor.mlp_layers.{3 * k + 1}")
  else:
    for e in range(config.n_exps):
      r += [Rule(("moe_adaptor", f"experts_{e}", "bias"), f"moe_adaptor.experts.{e}.bias")]
      r += linear_rules(("moe_adaptor", f"experts_{e}", "lin"), f"moe_adaptor.experts.{e}.lin", bias=False)
    r += [Rule(("moe_adaptor", n), f"moe_adaptor.{n}") for n in ("w_gate", "w_noise")]
  if config.transductive:
    r += [Rule(("item_embedding", "embedding"), "item_embedding.weight")]
  return r


def _numpy(v: Any) -> np.ndarray:
  if hasattr(v, "detach"):  # a torch tensor
    v = v.detach().cpu()
    v = v.float() if str(v.dtype) == "torch.bfloat16" else v
    return v.numpy()
  return np.asarray(v)


@functools.lru_cache(maxsize=32)
def _shapes(config: sasrec.SASRecConfig) -> dict:
  """The param shapes of SeqRecModel(config) (jax.ShapeDtypeStruct leaves; traced once per config)."""
  return jax.eval_shape(lambda: nn.unbox(sasrec.init_params(config, jax.random.PRNGKey(0))))


def _check_plm(table: np.ndarray, config: sasrec.SASRecConfig) -> None:
  rows = config.n_items or None
  if table.ndim != 2 or table.shape[1] != config.plm_size or (rows is not None and table.shape[0] != rows):
    want = f"[{rows if rows is not None else 'n_items'}, {config.plm_size}]"
    raise ConversionError(f"{PLM_KEY}: shape {tuple(table.shape)}, expected {want} (n_items, plm_size)")


def to_jax(state_dict: dict, config: sasrec.SASRecConfig) -> tuple[dict, np.ndarray]:
  """RecBole state dict (or the trainer's checkpoint dict holding it under `state_dict`) -> (params, plm_table).

  params: plain numpy pytree of SeqRecModel(config); plm_table: float32 [n_items, plm_size]."""
  if isinstance(state_dict.get("state_dict"), dict):
    state_dict = state_dict["state_dict"]
  sd = {k: _numpy(v) for k, v in state_dict.items()}
  if PLM_KEY not in sd:
    raise ConversionError(f"missing keys: {PLM_KEY} (the frozen plm feature table)")
  table = np.asarray(sd.pop(PLM_KEY), np.float32)
  _check_plm(table, config)
  return state_dict_to_params(rules(config), sd, expected=_shapes(config)), table


def to_torch(params: dict, config: sasrec.SASRecConfig, plm_table: Any) -> dict[str, np.ndarray]:
  """Inverse of `to_jax`: our params (boxed or plain) + the feature table -> RecBole state dict (float32 numpy;
  `{k: torch.from_numpy(v)}` for `load_state_dict`)."""
  table = np.asarray(plm_table, np.float32)
  _check_plm(table, config)
  params = jax.tree_util.tree_map(np.asarray, nn.unbox(params))
  shapes = _shapes(config)
  flat_p = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  flat_s = dict(jax.tree_util.tree_flatten_with_path(shapes)[0])
  bad = [f"{jax.tree_util.keystr(k)} {v.shape} expects {flat_s[k].shape}" for k, v in flat_p.items()
         if k in flat_s and v.shape != flat_s[k].shape]
  if bad:
    raise ConversionError("param shape mismatches: " + "; ".join(bad))
  sd = params_to_state_dict(rules(config), params)
  sd[PLM_KEY] = table
  return sd
