"""HF `Blip2ForConditionalGeneration` dirs (model_type "blip-2") <-> `models/mblip.MBlip`, both ways.

A BLIP-2 state dict is the image side (`vision_model.*`, `query_tokens`, `qformer.*`,
`language_projection.*`: convert/blip2.py) plus the LLM under `language_model.` with the standalone
model's own keys (`MT5ForConditionalGeneration`: convert/t5.py; `BloomForCausalLM`: convert/bloom.py).
Each part goes through its family's strict converter; the meta records both parts' layouts so that
`to_state_dict` writes the same keys back. mBLIP's releases (`Gregor/mblip-mt0-xl`, `-bloomz-7b`) are
such dirs with the LoRA merged.
"""

from __future__ import annotations

import numpy as np

from mmret_jax.convert import blip2 as blip2_family
from mmret_jax.convert import bloom as bloom_family
from mmret_jax.convert import t5 as t5_family
from mmret_jax.convert.core import ConversionError
from mmret_jax.models import blip2, mblip

MODEL_TYPES = (blip2.MODEL_TYPE,)
LLM_PREFIX = "language_model."
_LLM_FAMILIES = {"t5": t5_family, "bloom": bloom_family}


def _llm(hf_config: dict):
  config = blip2.Blip2Config.from_dict(hf_config)
  try:
    name = mblip.llm_family(config)
  except ValueError as e:
    raise ConversionError(str(e)) from e
  return name, _LLM_FAMILIES[name], dict(config.text_config)


def build_model(hf_config: dict, meta: dict, **kw) -> mblip.MBlip:
  config = blip2_family.config_from_hf(hf_config, bool(meta.get("language_projection", True)))
  return mblip.MBlip(config, add_language_projection=bool(meta.get("language_projection", True)), **kw)


def to_params(sd: dict[str, np.ndarray], hf_config: dict) -> tuple[dict, dict]:
  """(params, meta) of a BLIP-2 state dict with its LLM; errors name the offending keys."""
  name, fam, text_config = _llm(hf_config)
  llm_sd = {k[len(LLM_PREFIX):]: v for k, v in sd.items() if k.startswith(LLM_PREFIX)}
  if not llm_sd:
    raise ConversionError(f"no {LLM_PREFIX}* keys: this is the image side of BLIP-2 only (convert it with "
                          "--family blip2)")
  image_sd = {k: v for k, v in sd.items() if not k.startswith(LLM_PREFIX)}
  params, image_meta = blip2_family.to_params(image_sd, hf_config)
  if not image_meta.get("language_projection", True):
    raise ConversionError("language_projection.* is missing: mBLIP needs the projection to the LLM")
  llm_params, llm_meta = fam.to_params(llm_sd, text_config)
  if name == "t5" and "lm_head" not in llm_params and not text_config.get("tie_word_embeddings", True):
    raise ConversionError("the mT5 LLM has tie_word_embeddings=False but no lm_head.weight")
  return {**params, "language_model": llm_params}, {**image_meta, "llm_family": name, "llm_meta": llm_meta}


def to_state_dict(params: dict, hf_config: dict, meta: dict) -> dict[str, np.ndarray]:
  _, fam, text_config = _llm(hf_config)
  image = {k: v for k, v in params.items() if k != "language_model"}
  sd = blip2_family.to_state_dict(image, hf_config, meta)
  llm = fam.to_state_dict(params["language_model"], text_config, meta.get("llm_meta", {}))
  return {**sd, **{LLM_PREFIX + k: v for k, v in llm.items()}}
