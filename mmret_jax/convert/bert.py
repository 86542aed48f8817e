"""Key map for BERT / RoBERTa (HF `BertModel`, `RobertaModel`, their MLM heads, SimCSE/BLaIR `mlp`)."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from mmret_jax.convert.core import (ConversionError, Rule, linear_rules, norm_rules, params_to_state_dict,
                                    state_dict_to_params)
from mmret_jax.models import bert, layers

MODEL_TYPES = ("bert", "roberta", "xlm-roberta")

# Source keys that are consumed by nothing on purpose.
IGNORED = (
    "*position_ids",                   # buffers, not weights
    "lm_head.decoder.weight", "lm_head.decoder.bias",      # tied to word embeddings / lm_head.bias
    "cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
    "cls.seq_relationship.*",          # BERT next-sentence head: not used by any task here
)


def _attention(path, key):
  rules = []
  for n in ("query", "key", "value"):
    rules += linear_rules(path + ("self", n), f"{key}.self.{n}")
  return rules + linear_rules(path + ("output", "dense"), f"{key}.output.dense") + \
      norm_rules(path + ("output", "LayerNorm"), f"{key}.output.LayerNorm")


def rules(config: bert.BertConfig, *, prefix: str = "", pooler: bool = True, mlm: bool = False,
          cl: bool = False) -> list[Rule]:
  """Every (our path, HF key) pair of a BertModel with the given heads."""
  p = prefix
  tables = ("word_embeddings", "position_embeddings") + (("token_type_embeddings",)
                                                          if config.type_vocab_size > 0 else ())
  r = [Rule(("embeddings", n, "embedding"), f"{p}embeddings.{n}.weight") for n in tables]
  r += norm_rules(("embeddings", "LayerNorm"), f"{p}embeddings.LayerNorm")
  for i in range(config.num_hidden_layers):
    ours, theirs = ("encoder", f"layer_{i}"), f"{p}encoder.layer.{i}"
    r += _attention(ours + ("attention",), f"{theirs}.attention")
    if config.add_cross_attention:
      r += _attention(ours + ("crossattention",), f"{theirs}.crossattention")
    r += linear_rules(ours + ("intermediate", "dense"), f"{theirs}.intermediate.dense")
    r += linear_rules(ours + ("output", "dense"), f"{theirs}.output.dense")
    r += norm_rules(ours + ("output", "LayerNorm"), f"{theirs}.output.LayerNorm")
  if pooler:
    r += linear_rules(("pooler", "dense"), f"{p}pooler.dense")
  if cl:
    r += linear_rules(("mlp", "dense"), "mlp.dense")
  if mlm:
    if config.is_roberta:
      r += linear_rules(("lm_head", "dense"), "lm_head.dense")
      r += norm_rules(("lm_head", "layer_norm"), "lm_head.layer_norm")
      r += [Rule(("lm_head", "bias"), "lm_head.bias")]
    else:
      t = ("cls", "predictions")
      r += linear_rules(t + ("transform", "dense"), "cls.predictions.transform.dense")
      r += norm_rules(t + ("transform", "LayerNorm"), "cls.predictions.transform.LayerNorm")
      r += [Rule(t + ("bias",), "cls.predictions.bias")]
  return r


def normalize_keys(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Old TF-era names (`LayerNorm.gamma/beta`) -> `.weight/.bias`."""
  out = {}
  for k, v in sd.items():
    if k.endswith("LayerNorm.gamma"):
      k = k[: -len("gamma")] + "weight"
    elif k.endswith("LayerNorm.beta"):
      k = k[: -len("beta")] + "bias"
    out[k] = v
  return out


def detect(sd: dict[str, np.ndarray]) -> dict:
  """Reads the layout of a state dict: HF key prefix and which heads it carries."""
  prefix = ""
  for cand in ("roberta.", "bert."):
    if any(k.startswith(cand + "embeddings.") for k in sd):
      prefix = cand
  if not any(k.startswith(prefix + "embeddings.word_embeddings") for k in sd):
    sample = ", ".join(sorted(sd)[:5])
    raise ConversionError(f"Not a BERT/RoBERTa state dict (no embeddings.word_embeddings); keys start: {sample}")
  for tied, table in (("lm_head.decoder.weight", prefix + "embeddings.word_embeddings.weight"),
                      ("cls.predictions.decoder.weight", prefix + "embeddings.word_embeddings.weight"),
                      ("lm_head.decoder.bias", "lm_head.bias"),
                      ("cls.predictions.decoder.bias", "cls.predictions.bias")):
    if tied in sd and table in sd and not np.array_equal(sd[tied], sd[table]):
      raise ConversionError(f"{tied} is not tied to {table}: untied MLM decoders are not supported")
  return {
      "hf_prefix": prefix,
      "pooler": any(k.startswith(prefix + "pooler.") for k in sd),
      "mlm": any(k.startswith(("lm_head.", "cls.predictions.")) for k in sd),
      "cl": "mlp.dense.weight" in sd,
  }


def config_from_hf(hf_config: dict) -> bert.BertConfig:
  mt = hf_config.get("model_type")
  if mt not in MODEL_TYPES:
    raise ConversionError(f"model_type {mt!r} is not a BERT-family model (supported: {', '.join(MODEL_TYPES)})")
  try:
    config = bert.BertConfig.from_dict(hf_config)
    layers.get_activation(config.hidden_act)
    return config
  except (TypeError, ValueError) as e:
    raise ConversionError(f"Unsupported BERT-family config: {e}") from e


def build_model(hf_config: dict, meta: dict, **kw) -> bert.BertModel:
  return bert.BertModel(config_from_hf(hf_config), add_pooling_layer=meta["pooler"],
                        add_mlm_head=meta["mlm"], add_cl_head=meta["cl"], **kw)


def _rules_for(hf_config: dict, meta: dict) -> list[Rule]:
  return rules(config_from_hf(hf_config), prefix=meta["hf_prefix"], pooler=meta["pooler"],
               mlm=meta["mlm"], cl=meta["cl"])


def to_params(sd: dict[str, np.ndarray], hf_config: dict) -> tuple[dict, dict]:
  """HF state dict -> (our params, meta). Strict; shapes checked against the model."""
  sd = normalize_keys(sd)
  meta = detect(sd)
  model = build_model(hf_config, meta)
  shapes = jax.eval_shape(lambda: nn.unbox(bert.init_params(model, jax.random.PRNGKey(0))))
  params = state_dict_to_params(_rules_for(hf_config, meta), sd, expected=shapes, ignore=IGNORED)
  return params, meta


def to_state_dict(params: dict, hf_config: dict, meta: dict) -> dict[str, np.ndarray]:
  return params_to_state_dict(_rules_for(hf_config, meta), params)
