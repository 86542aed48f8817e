"""Key map for T5 / mT5 encoders: Hugging Face `T5EncoderModel` / `MT5EncoderModel` both ways, and the
rules (and a config read off the weights) of a bare HF `T5Stack` under any key prefix (UniIR CLIP-FF's
`t5_layers.`), for other families' key maps."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from mmret_jax.convert.core import ConversionError, Rule, linear_rules, params_to_state_dict, state_dict_to_params
from mmret_jax.models import t5

MODEL_TYPES = t5.MODEL_TYPES
SHARED_KEY = "shared.weight"
TIED_KEY = "encoder.embed_tokens.weight"  # HF ties it to `shared.weight` (state_dict() lists both)


def stack_rules(config: t5.T5Config, prefix: str = "", path: tuple[str, ...] = ()) -> list[Rule]:
  """Every (our path, HF key) pair of an encoder `T5Stack` without its token table: HF keys
  `{prefix}block.{i}....` / `{prefix}final_layer_norm.weight` <-> our `path + (block_{i}, ...)`
  (the params of a `t5.T5Encoder(embed_tokens=False)` under `path`). The stack's own
  `{prefix}embed_tokens.weight`, which transformers >= 5 always creates, is left out: see `stack_ignored`."""
  r = []
  for i in range(config.num_layers):
    ours, theirs = path + (f"block_{i}",), f"{prefix}block.{i}.layer"
    att = ours + ("layer_0", "SelfAttention")
    for proj in ("q", "k", "v", "o"):
      r += linear_rules(att + (proj,), f"{theirs}.0.SelfAttention.{proj}", bias=False)
    if i == 0:
      r.append(Rule(att + ("relative_attention_bias", "embedding"),
                    f"{theirs}.0.SelfAttention.relative_attention_bias.weight"))
    r.append(Rule(ours + ("layer_0", "layer_norm", "scale"), f"{theirs}.0.layer_norm.weight"))
    ff = ours + ("layer_1", "DenseReluDense")
    for proj in (("wi_0", "wi_1", "wo") if config.is_gated_act else ("wi", "wo")):
      r += linear_rules(ff + (proj,), f"{theirs}.1.DenseReluDense.{proj}", bias=False)
    r.append(Rule(ours + ("layer_1", "layer_norm", "scale"), f"{theirs}.1.layer_norm.weight"))
  return r + [Rule(path + ("final_layer_norm", "scale"), f"{prefix}final_layer_norm.weight")]


def stack_ignored(prefix: str = "") -> tuple[str, ...]:
  """Source keys of a bare `T5Stack` consumed by nothing: its token table, unused with `inputs_embeds`
  (absent from checkpoints saved with transformers 4, present and random in 5)."""
  return (f"{prefix}embed_tokens.weight",)


def stack_config_from_state_dict(sd: dict[str, np.ndarray], prefix: str = "", **fields) -> dict:
  """The HF config dict of a bare encoder `T5Stack` state dict (keys `{prefix}block.N...`), read off the
  weights: d_model, num_layers, num_heads and buckets (the bias table), d_kv, d_ff, gated or not. The
  weights do not hold the activation, max_distance, epsilon or dropout: they take `T5Config()`'s
  defaults (relu; gated: gelu as T5 v1.1 / mT5, i.e. "gated-gelu"; 128; 1e-6; 0.1, as UniIR's
  `T5Config()`), or `fields`."""
  def get(key: str) -> np.ndarray:
    if prefix + key not in sd:
      raise ConversionError(f"not a T5Stack state dict: no {prefix + key}")
    return np.asarray(sd[prefix + key])

  table = get("block.0.layer.0.SelfAttention.relative_attention_bias.weight")  # [buckets, heads]
  gated = f"{prefix}block.0.layer.1.DenseReluDense.wi_0.weight" in sd
  blocks = {k[len(prefix):].split(".")[1] for k in sd if k.startswith(prefix + "block.")}
  d = dict(d_model=int(get("final_layer_norm.weight").shape[0]), num_layers=len(blocks),
           num_decoder_layers=len(blocks), num_heads=int(table.shape[1]),
           relative_attention_num_buckets=int(table.shape[0]),
           d_kv=int(get("block.0.layer.0.SelfAttention.q.weight").shape[0]) // int(table.shape[1]),
           d_ff=int(get(f"block.0.layer.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight").shape[0]),
           feed_forward_proj="gated-gelu" if gated else "relu")
  if prefix + "embed_tokens.weight" in sd:
    d["vocab_size"] = int(np.asarray(sd[prefix + "embed_tokens.weight"]).shape[0])
  try:
    return t5.T5Config(**{**d, **fields}).to_dict()
  except (TypeError, ValueError) as e:
    raise ConversionError(f"Unsupported T5Stack config: {e}") from e


def rules(config: t5.T5Config) -> list[Rule]:
  """Every (our path, HF key) pair of a `T5EncoderModel` but the tied `encoder.embed_tokens.weight`."""
  return [Rule(("shared", "embedding"), SHARED_KEY)] + stack_rules(config, "encoder.")


def config_from_hf(hf_config: dict) -> t5.T5Config:
  mt = hf_config.get("model_type")
  if mt not in MODEL_TYPES:
    raise ConversionError(f"model_type {mt!r} is not a T5 encoder (supported: {', '.join(MODEL_TYPES)})")
  try:
    return t5.T5Config.from_dict(hf_config)
  except (TypeError, ValueError) as e:
    raise ConversionError(f"Unsupported T5 config: {e}") from e


def build_model(hf_config: dict, meta: dict, **kw) -> t5.T5Encoder:  # pylint: disable=unused-argument
  return t5.T5Encoder(config_from_hf(hf_config), **kw)


def expected_shapes(model: t5.T5Encoder):
  return jax.eval_shape(lambda: nn.unbox(t5.init_params(model, jax.random.PRNGKey(0))))


def _untie(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Checks the encoder-only layout and the tie; returns sd with `shared.weight` only."""
  decoder = sorted(k for k in sd if k.startswith(("decoder.", "lm_head.")))
  if decoder:
    raise ConversionError(f"the state dict has decoder / LM-head weights ({', '.join(decoder[:3])}, ...): only "
                          "T5 / mT5 encoders (T5EncoderModel) are supported so far")
  sd = dict(sd)
  tied = sd.pop(TIED_KEY, None)
  if tied is not None:
    if SHARED_KEY not in sd:  # a state dict that kept only the encoder's name of the table
      sd[SHARED_KEY] = tied
    elif not np.array_equal(np.asarray(tied), np.asarray(sd[SHARED_KEY])):
      raise ConversionError(f"{TIED_KEY} is not tied to {SHARED_KEY}: untied encoder tables are not supported")
  return sd


def to_params(sd: dict[str, np.ndarray], hf_config: dict) -> tuple[dict, dict]:
  """HF T5EncoderModel state dict -> (our params, meta). Strict; shapes checked against the model."""
  model = build_model(hf_config, {})
  params = state_dict_to_params(rules(model.config), _untie(sd), expected=expected_shapes(model))
  return params, {}


def to_state_dict(params: dict, hf_config: dict, meta: dict) -> dict[str, np.ndarray]:  # pylint: disable=unused-argument
  """Our params -> the keys of HF `T5EncoderModel.state_dict()` (the tied table under both names)."""
  sd = params_to_state_dict(rules(config_from_hf(hf_config)), params)
  sd[TIED_KEY] = sd[SHARED_KEY].copy()
  return sd
