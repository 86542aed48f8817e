"""Key map for BLOOM / BLOOMZ: Hugging Face `BloomForCausalLM` (keys under `transformer.`, plus the tied
`lm_head.weight`) and `BloomModel` (bare keys, as the bigscience hub checkpoints store them) both ways.

Our params are `models.bloom.BloomForCausalLM`'s (the same tree as `BloomModel`'s: the LM head is the token
table). `lm_head.weight`, when present, must equal the token table and is dropped by name; the meta records
the source layout (`hf_prefix`), and the export writes it back.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from mmret_jax.convert.core import ConversionError, Rule, linear_rules, norm_rules, params_to_state_dict
from mmret_jax.convert.core import state_dict_to_params
from mmret_jax.models import bloom

MODEL_TYPES = bloom.MODEL_TYPES
CAUSAL_LM_PREFIX = "transformer."  # BloomForCausalLM's base_model_prefix
LM_HEAD_KEY = "lm_head.weight"  # HF ties it to `{prefix}word_embeddings.weight`
EMBED_KEY = "word_embeddings.weight"


def rules(config: bloom.BloomConfig, prefix: str = CAUSAL_LM_PREFIX) -> list[Rule]:
  """Every (our path, HF key) pair of a `BloomModel` under `prefix` (the tied lm_head left out)."""
  r = [Rule(("word_embeddings", "embedding"), prefix + EMBED_KEY)]
  r += norm_rules(("word_embeddings_layernorm",), prefix + "word_embeddings_layernorm")
  for i in range(config.n_layer):
    ours, theirs = (f"h_{i}",), f"{prefix}h.{i}"
    r += norm_rules(ours + ("input_layernorm",), f"{theirs}.input_layernorm")
    for proj in ("query_key_value", "dense"):
      r += linear_rules(ours + ("self_attention", proj), f"{theirs}.self_attention.{proj}")
    r += norm_rules(ours + ("post_attention_layernorm",), f"{theirs}.post_attention_layernorm")
    for proj in ("dense_h_to_4h", "dense_4h_to_h"):
      r += linear_rules(ours + ("mlp", proj), f"{theirs}.mlp.{proj}")
  return r + norm_rules(("ln_f",), prefix + "ln_f")


def config_from_hf(hf_config: dict) -> bloom.BloomConfig:
  mt = hf_config.get("model_type")
  if mt not in MODEL_TYPES:
    raise ConversionError(f"model_type {mt!r} is not BLOOM (supported: {', '.join(MODEL_TYPES)})")
  try:
    return bloom.BloomConfig.from_dict(hf_config)
  except (TypeError, ValueError) as e:
    raise ConversionError(f"Unsupported BLOOM config: {e}") from e


def build_model(hf_config: dict, meta: dict, **kw) -> bloom.BloomForCausalLM:  # pylint: disable=unused-argument
  return bloom.BloomForCausalLM(config_from_hf(hf_config), **kw)


def expected_shapes(model: bloom.BloomModel):
  return jax.eval_shape(lambda: nn.unbox(bloom.init_params(model, jax.random.PRNGKey(0))))


def source_prefix(sd: dict[str, np.ndarray]) -> str:
  """`transformer.` for a BloomForCausalLM state dict, "" for a BloomModel one (decided by the token table)."""
  if CAUSAL_LM_PREFIX + EMBED_KEY in sd:
    return CAUSAL_LM_PREFIX
  if EMBED_KEY in sd:
    return ""
  raise ConversionError(f"not a BLOOM state dict: neither {CAUSAL_LM_PREFIX + EMBED_KEY} nor {EMBED_KEY}")


def _untie(sd: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  """sd without `lm_head.weight`, after checking that it is the token table."""
  sd = dict(sd)
  head = sd.pop(LM_HEAD_KEY, None)
  if head is not None:
    table = np.asarray(sd[prefix + EMBED_KEY])
    if np.shape(head) != table.shape or not np.array_equal(np.asarray(head), table):
      raise ConversionError(f"{LM_HEAD_KEY} {tuple(np.shape(head))} is not tied to {prefix + EMBED_KEY} "
                            f"{table.shape}: untied BLOOM heads are not supported")
  return sd


def to_params(sd: dict[str, np.ndarray], hf_config: dict) -> tuple[dict, dict]:
  """HF BloomForCausalLM / BloomModel state dict -> (our params, meta). Strict; shapes checked."""
  model = build_model(hf_config, {})
  prefix = source_prefix(sd)
  params = state_dict_to_params(rules(model.config, prefix), _untie(sd, prefix), expected=expected_shapes(model))
  return params, {"hf_prefix": prefix}


def to_state_dict(params: dict, hf_config: dict, meta: dict) -> dict[str, np.ndarray]:
  """Our params -> the keys of HF `BloomForCausalLM.state_dict()` (with the tied `lm_head.weight`), or of
  `BloomModel.state_dict()` when the meta says the source had bare keys (`hf_prefix` "")."""
  prefix = meta.get("hf_prefix", CAUSAL_LM_PREFIX)
  if prefix not in (CAUSAL_LM_PREFIX, ""):
    raise ConversionError(f"hf_prefix must be {CAUSAL_LM_PREFIX!r} or '', got {prefix!r}")
  sd = params_to_state_dict(rules(config_from_hf(hf_config), prefix), params)
  if prefix:
    sd[LM_HEAD_KEY] = sd[prefix + EMBED_KEY].copy()
  return sd
