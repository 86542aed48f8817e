"""Key maps for UniIR checkpoints (`clip_sf_large.pth`, `clip_ff_large.pth`, `blip_sf_large.pth`,
`blip_ff_large.pth`, saved as `{"model": state_dict, ...}` by the seed's train scripts) and for a zero-shot
CLIP-SF built from any CLIP (an HF `CLIPModel` state dict or an OpenAI CLIP one).

Seed layouts (TIGER-AI-Lab/UniIR `src/models/uniir_*`):
  CLIP-SF  `clip_model.*` = an OpenAI CLIP state dict
  CLIP-FF  `clip_model.*` without `text_projection` + `t5_layers.*` (a bare HF `T5Stack`: `block.N...`,
           `final_layer_norm`)
  BLIP-SF  `visual_encoder.*` (original BLIP ViT names), `text_encoder.*` (med BERT, cross-attention
           blocks present but frozen), `vision_proj`, `text_proj` (to 768), `temp`, momentum copies `*_m`,
           queues `query_queue`, `cand_queue`, `idx_queue`, `new_ptr_queue`
  BLIP-FF  the same without projections and with `text_encoder.pooler.dense`
The momentum copies and queues are training state, ignored by name here (a training run starts its
momentum encoders as copies of the weights, as the seed's `copy_params`).

`original_to_ours` turns such a state dict into intermediate names (`clip.<HF CLIPModel key>`,
`t5_layers.<T5Stack key>`, HF BLIP names, `temp`) plus our config dict (`model_type: "uniir"`);
`to_params` maps those strictly onto `models/uniir.py` params.
"""

from __future__ import annotations

import fnmatch

import flax.linen as nn
import jax
import numpy as np

from mmret_jax.convert import bert as bert_family
from mmret_jax.convert import blip as blip_family
from mmret_jax.convert import clip as clip_family
from mmret_jax.convert.core import (ConversionError, Rule, linear_rules, params_to_state_dict,
                                    state_dict_to_params)
from mmret_jax.models import bert, blip, uniir, vit

MODEL_TYPES = ("uniir",)
IGNORED = ("*position_ids",)
TRAINING_STATE = ("visual_encoder_m.*", "vision_proj_m.*", "text_encoder_m.*", "text_proj_m.*", "query_queue",
                  "cand_queue", "idx_queue", "new_ptr_queue", "*position_ids")


def detect(sd: dict[str, np.ndarray]) -> str:
  """The variant of a UniIR (or CLIP) state dict: clip_sf | clip_ff | blip_sf | blip_ff."""
  if any(k.startswith("clip_model.") for k in sd) or "visual.conv1.weight" in sd or \
      "vision_model.embeddings.patch_embedding.weight" in sd:
    return "clip_ff" if any(k.startswith("t5_layers.") for k in sd) else "clip_sf"
  if "visual_encoder.patch_embed.proj.weight" in sd:
    return "blip_ff" if "text_encoder.pooler.dense.weight" in sd else "blip_sf"
  raise ConversionError(f"not a UniIR / CLIP state dict; keys start: {', '.join(sorted(sd)[:5])}")


def original_to_ours(sd: dict[str, np.ndarray], variant: str | None = None, hf_config: dict | None = None
                     ) -> tuple[dict[str, np.ndarray], dict]:
  """A seed checkpoint (or a CLIP state dict for a zero-shot CLIP-SF) -> (intermediate state dict,
  our config dict). `hf_config`: the HF config of an HF `CLIPModel` state dict."""
  variant = variant or detect(sd)
  if variant.startswith("clip"):
    return _clip(sd, variant, hf_config)
  return _blip(sd, variant)


def _clip(sd, variant, hf_config):
  if any(k.startswith("clip_model.") for k in sd):
    unknown = [k for k in sd if not k.startswith(("clip_model.", "t5_layers."))]
    if unknown:
      raise ConversionError(f"unexpected keys in the UniIR CLIP checkpoint: {', '.join(sorted(unknown)[:12])}")
    sd = {**{k[len("clip_model."):]: v for k, v in sd.items() if k.startswith("clip_model.")},
          **{k: v for k, v in sd.items() if k.startswith("t5_layers.")}}
  t5_sd = {k: v for k, v in sd.items() if k.startswith("t5_layers.")}
  clip_sd = {k: v for k, v in sd.items() if not k.startswith("t5_layers.")}
  if "visual.conv1.weight" in clip_sd:  # OpenAI layout
    if variant == "clip_ff" and "text_projection" not in clip_sd:  # CLIP-FF deletes it: a stand-in for the map
      width = clip_sd["ln_final.weight"].shape[0]
      clip_sd["text_projection"] = np.zeros((width, clip_sd["visual.proj"].shape[1]), np.float32)
    clip_sd, hf_config = clip_family.openai_to_hf(clip_sd)
  elif hf_config is None:
    raise ConversionError("an HF CLIPModel state dict needs its config.json (--config)")
  if variant == "clip_ff":
    clip_sd.pop("text_projection.weight", None)
  out = {f"clip.{k}": v for k, v in clip_sd.items()}
  config = {"model_type": "uniir", "backbone": "clip", "fusion": variant[-2:], "clip_config": hf_config,
            "embed_dim": int(hf_config.get("projection_dim", 768))}
  if variant == "clip_ff":
    from mmret_jax.convert import t5 as t5_family  # pylint: disable=import-outside-toplevel
    config["t5_config"] = t5_family.stack_config_from_state_dict(t5_sd, prefix="t5_layers.")
    out.update(t5_sd)
  elif t5_sd:
    raise ConversionError("t5_layers.* in a CLIP-SF checkpoint")
  return out, config


def _blip(sd, variant):
  sd = {k: v for k, v in sd.items() if not any(fnmatch.fnmatch(k, p) for p in TRAINING_STATE)}
  out, unknown = blip_family.rename_original(sd, keep=("text_encoder.", "vision_proj.", "text_proj.", "temp"))
  if unknown:
    raise ConversionError(f"unexpected keys in the UniIR BLIP checkpoint: {', '.join(sorted(unknown)[:12])}")
  patch = np.asarray(out["vision_model.embeddings.patch_embedding.weight"])
  width, patch_size = int(patch.shape[0]), int(patch.shape[-1])
  grid = int(round((np.asarray(out["vision_model.embeddings.position_embedding"]).shape[1] - 1) ** 0.5))
  layers_v = len({k.split(".")[3] for k in out if k.startswith("vision_model.encoder.layers.")})
  layers_t = len({k.split(".")[3] for k in out if k.startswith("text_encoder.encoder.layer.")})
  word = np.asarray(out["text_encoder.embeddings.word_embeddings.weight"])
  inter = out.get("text_encoder.encoder.layer.0.intermediate.dense.weight")
  fc1 = out.get("vision_model.encoder.layers.0.mlp.fc1.weight")
  cfg = blip.BlipConfig(
      vision=vit.ViTConfig(hidden_size=width, intermediate_size=int(fc1.shape[0]) if fc1 is not None else 4 * width,
                           num_hidden_layers=layers_v, num_attention_heads=max(1, width // 64),
                           image_size=grid * patch_size, patch_size=patch_size, hidden_act="gelu",
                           layer_norm_eps=1e-6, initializer_range=0.02, **blip.BLIP_VIT_LAYOUT),
      text=bert.BertConfig(vocab_size=int(word.shape[0]), hidden_size=int(word.shape[1]),
                           num_hidden_layers=layers_t, num_attention_heads=max(1, int(word.shape[1]) // 64),
                           intermediate_size=int(inter.shape[0]) if inter is not None else 4 * int(word.shape[1]),
                           max_position_embeddings=int(np.asarray(
                               out["text_encoder.embeddings.position_embeddings.weight"]).shape[0]),
                           layer_norm_eps=1e-12, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                           pad_token_id=0, type_vocab_size=0, add_cross_attention=True, encoder_width=width))
  embed = int(out["text_proj.weight"].shape[0]) if "text_proj.weight" in out else int(word.shape[1])
  return out, {"model_type": "uniir", "backbone": "blip", "fusion": variant[-2:], "embed_dim": embed,
               "blip_config": cfg.to_dict()}


def config_from_hf(hf_config: dict) -> uniir.UniIRConfig:
  try:
    return uniir.UniIRConfig.from_dict(hf_config)
  except (KeyError, TypeError, ValueError) as e:
    raise ConversionError(f"Unsupported UniIR config: {e}") from e


def build_model(hf_config: dict, meta: dict, **kw):  # pylint: disable=unused-argument
  return uniir.build(config_from_hf(hf_config), **kw)


def rules(config: uniir.UniIRConfig) -> list[Rule]:
  """Every (our path, intermediate key) pair of a UniIR model."""
  if config.backbone == "clip":
    r = [Rule(("clip",) + x.path, f"clip.{x.key}", x.kind) for x in clip_family.rules(config.clip)
         if not (config.fusion == "ff" and x.key.startswith("text_projection"))]
    if config.fusion == "ff":
      from mmret_jax.convert import t5 as t5_family  # pylint: disable=import-outside-toplevel
      r += t5_family.stack_rules(config.t5, "t5_layers.", ("t5_layers",))
    return r
  c = config.blip
  r = blip_family.vision_rules(c.vision)
  r += [Rule(("text_encoder",) + x.path, x.key, x.kind)
        for x in bert_family.rules(c.text, prefix="text_encoder.", pooler=config.fusion == "ff")]
  if config.fusion == "sf":
    r += linear_rules(("vision_proj",), "vision_proj") + linear_rules(("text_proj",), "text_proj")
  return r + [Rule(("temp",), "temp")]


def to_params(sd: dict[str, np.ndarray], hf_config: dict) -> tuple[dict, dict]:
  """Intermediate state dict (see `original_to_ours`) -> (our params, meta). Strict."""
  model = build_model(hf_config, {})
  expected = jax.eval_shape(lambda: nn.unbox(uniir.init_params(model, jax.random.PRNGKey(0))))
  sd = blip_family.split_qkv(sd) if model.config.backbone == "blip" else sd
  if model.config.backbone == "clip" and "clip.logit_scale" not in sd:
    raise ConversionError("missing keys: clip.logit_scale")
  ignore = IGNORED
  if model.config.fusion == "ff" and model.config.backbone == "clip":
    from mmret_jax.convert import t5 as t5_family  # pylint: disable=import-outside-toplevel
    ignore += t5_family.stack_ignored("t5_layers.")  # the unused token table transformers 5 creates
  params = state_dict_to_params(rules(model.config), sd, expected=expected, ignore=ignore)
  return params, {"variant": model.config.name}


def to_state_dict(params: dict, hf_config: dict, meta: dict) -> dict[str, np.ndarray]:  # pylint: disable=unused-argument
  """Our params -> the intermediate names (HF CLIP / BLIP / T5Stack keys). There is no Hugging Face
  class for UniIR, so `convert to-hf` of a UniIR dir writes these for inspection only."""
  config = config_from_hf(hf_config)
  sd = params_to_state_dict(rules(config), params)
  return blip_family.fuse_qkv(sd) if config.backbone == "blip" else sd
