"""Key map for T5 / mT5: Hugging Face `T5EncoderModel` / `MT5EncoderModel` and `T5ForConditionalGeneration` /
`MT5ForConditionalGeneration` (detected by `decoder.` / `lm_head.` keys) both ways, and the rules (and a config
read off the weights) of a bare HF `T5Stack` under any key prefix (UniIR CLIP-FF's `t5_layers.`), for other
families' key maps.

The tied copies of `shared.weight` (`encoder.embed_tokens.weight`, `decoder.embed_tokens.weight`, and
`lm_head.weight` of a tied head) are accepted when they equal it and dropped by name. Whether the LM head
is tied is read off the weights where the config cannot say: transformers 5 writes
`tie_word_embeddings: true` for every T5 / mT5 and unties a checkpoint whose `lm_head.weight` differs from
`shared.weight`; a config with `tie_word_embeddings: false` (transformers 4, every mT5 / mT0 / Flan-T5 on
the hub) requires an own `lm_head.weight`. The answer is `meta["tied_lm_head"]`."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import numpy as np

from mmret_jax.convert.core import ConversionError, Rule, linear_rules, params_to_state_dict, state_dict_to_params
from mmret_jax.models import t5

MODEL_TYPES = t5.MODEL_TYPES
SHARED_KEY = "shared.weight"
TIED_KEY = "encoder.embed_tokens.weight"  # HF ties it to `shared.weight` (state_dict() lists both)
DECODER_TIED_KEY = "decoder.embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"
# Listed in HF's `_keys_to_ignore_on_load_unexpected` (old checkpoints carry it; the cross-attention has no bias).
STALE_KEYS = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


def stack_rules(config: t5.T5Config, prefix: str = "", path: tuple[str, ...] = (), *,
                is_decoder: bool = False) -> list[Rule]:
  """Every (our path, HF key) pair of a `T5Stack` without its token table: HF keys `{prefix}block.{i}....` /
  `{prefix}final_layer_norm.weight` <-> our `path + (block_{i}, ...)` (the params of a
  `t5.T5Encoder(embed_tokens=False)`, or with `is_decoder` of a `t5.T5Decoder`, under `path`). The stack's own
  `{prefix}embed_tokens.weight`, which transformers >= 5 always creates, is left out: see `stack_ignored`."""
  r = []
  for i in range(config.decoder_layers if is_decoder else config.num_layers):
    ours, theirs = path + (f"block_{i}",), f"{prefix}block.{i}.layer"
    for j, name in enumerate(("SelfAttention", "EncDecAttention") if is_decoder else ("SelfAttention",)):
      att = ours + (f"layer_{j}", name)
      for proj in ("q", "k", "v", "o"):
        r += linear_rules(att + (proj,), f"{theirs}.{j}.{name}.{proj}", bias=False)
      if i == 0 and j == 0:
        r.append(Rule(att + ("relative_attention_bias", "embedding"),
                      f"{theirs}.0.{name}.relative_attention_bias.weight"))
      r.append(Rule(ours + (f"layer_{j}", "layer_norm", "scale"), f"{theirs}.{j}.layer_norm.weight"))
    f = 1 + is_decoder
    for proj in (("wi_0", "wi_1", "wo") if config.is_gated_act else ("wi", "wo")):
      r += linear_rules(ours + (f"layer_{f}", "DenseReluDense", proj), f"{theirs}.{f}.DenseReluDense.{proj}",
                        bias=False)
    r.append(Rule(ours + (f"layer_{f}", "layer_norm", "scale"), f"{theirs}.{f}.layer_norm.weight"))
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


def seq2seq_rules(config: t5.T5Config) -> list[Rule]:
  """Every (our path, HF key) pair of a `T5ForConditionalGeneration` (the params of a
  `t5.T5ForConditionalGeneration(config)`) but the tied copies of `shared.weight`; `lm_head.weight` when
  `config.tie_word_embeddings` is False."""
  r = [Rule(("shared", "embedding"), SHARED_KEY)]
  r += stack_rules(config, "encoder.", ("encoder",)) + stack_rules(config, "decoder.", ("decoder",), is_decoder=True)
  return r if config.tie_word_embeddings else r + linear_rules(("lm_head",), "lm_head", bias=False)


def is_seq2seq(sd: dict) -> bool:
  """Whether a T5 state dict holds a decoder or LM head (`T5ForConditionalGeneration`)."""
  return any(k.startswith(("decoder.", "lm_head.")) for k in sd)


def config_from_hf(hf_config: dict) -> t5.T5Config:
  mt = hf_config.get("model_type")
  if mt not in MODEL_TYPES:
    raise ConversionError(f"model_type {mt!r} is not a T5 / mT5 model (supported: {', '.join(MODEL_TYPES)})")
  try:
    return t5.T5Config.from_dict(hf_config)
  except (TypeError, ValueError) as e:
    raise ConversionError(f"Unsupported T5 config: {e}") from e


def seq2seq_config(hf_config: dict, tied_lm_head: bool) -> t5.T5Config:
  """The config of a `T5ForConditionalGeneration` whose LM head is tied or not (`meta["tied_lm_head"]`), the
  output scaling resolved from `hf_config` first (it follows `tie_word_embeddings` as written there)."""
  c = config_from_hf(hf_config)
  return dataclasses.replace(c, tie_word_embeddings=tied_lm_head, scale_decoder_outputs=c.scales_decoder_outputs)


def build_model(hf_config: dict, meta: dict, **kw) -> t5.T5Encoder | t5.T5ForConditionalGeneration:
  """`T5ForConditionalGeneration` for a converted seq2seq checkpoint (`meta["seq2seq"]`), else `T5Encoder`."""
  if meta.get("seq2seq"):
    return t5.T5ForConditionalGeneration(seq2seq_config(hf_config, meta["tied_lm_head"]), **kw)
  return t5.T5Encoder(config_from_hf(hf_config), **kw)


def expected_shapes(model: t5.T5Encoder | t5.T5ForConditionalGeneration):
  return jax.eval_shape(lambda: nn.unbox(t5.init_params(model, jax.random.PRNGKey(0))))


def _untie(sd: dict[str, np.ndarray], tied_keys: tuple[str, ...]) -> dict[str, np.ndarray]:
  """Checks that each of `tied_keys` present equals `shared.weight` (which a state dict may have kept under
  one of those names only); returns sd without them."""
  sd = dict(sd)
  for key in tied_keys:
    tied = sd.pop(key, None)
    if tied is None:
      continue
    if SHARED_KEY not in sd:  # a state dict that kept only a tied name of the table
      sd[SHARED_KEY] = tied
    elif not np.array_equal(np.asarray(tied), np.asarray(sd[SHARED_KEY])):
      raise ConversionError(f"{key} is not tied to {SHARED_KEY}: untied token tables are not supported")
  return sd


def _lm_head_is_tied(sd: dict[str, np.ndarray], hf_config: dict) -> bool:
  """Tied unless the config says untied (then `lm_head.weight` is required) or `lm_head.weight` differs from
  `shared.weight` (transformers 5's rule when a config says tied)."""
  if not config_from_hf(hf_config).tie_word_embeddings:
    return False
  head, shared = sd.get(LM_HEAD_KEY), sd.get(SHARED_KEY, sd.get(TIED_KEY, sd.get(DECODER_TIED_KEY)))
  if head is None or shared is None:
    return True
  head, shared = np.asarray(head), np.asarray(shared)
  return head.shape == shared.shape and np.array_equal(head, shared)


def to_params(sd: dict[str, np.ndarray], hf_config: dict) -> tuple[dict, dict]:
  """HF T5EncoderModel / T5ForConditionalGeneration state dict -> (our params, meta). Strict; shapes checked
  against the model. meta: {} (encoder) or {seq2seq: True, tied_lm_head}."""
  if not is_seq2seq(sd):
    model = build_model(hf_config, {})
    params = state_dict_to_params(rules(model.config), _untie(sd, (TIED_KEY,)), expected=expected_shapes(model))
    return params, {}
  meta = {"seq2seq": True, "tied_lm_head": _lm_head_is_tied(sd, hf_config)}
  model = build_model(hf_config, meta)
  tied = (TIED_KEY, DECODER_TIED_KEY) + ((LM_HEAD_KEY,) if meta["tied_lm_head"] else ())
  params = state_dict_to_params(seq2seq_rules(model.config), _untie(sd, tied), expected=expected_shapes(model),
                                ignore=STALE_KEYS)
  return params, meta


def to_state_dict(params: dict, hf_config: dict, meta: dict) -> dict[str, np.ndarray]:
  """Our params -> the keys of HF `T5EncoderModel.state_dict()` / `T5ForConditionalGeneration.state_dict()`
  (the tied table under each of its names)."""
  if not meta.get("seq2seq"):
    sd = params_to_state_dict(rules(config_from_hf(hf_config)), params)
    sd[TIED_KEY] = sd[SHARED_KEY].copy()
    return sd
  sd = params_to_state_dict(seq2seq_rules(seq2seq_config(hf_config, meta["tied_lm_head"])), params)
  for key in (TIED_KEY, DECODER_TIED_KEY) + ((LM_HEAD_KEY,) if meta["tied_lm_head"] else ()):
    sd[key] = sd[SHARED_KEY].copy()
  return sd
