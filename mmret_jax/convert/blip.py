"""Key maps for BLIP retrieval models: Hugging Face `BlipForImageTextRetrieval` both ways, and the
original salesforce/BLIP `.pth` files (`model_base.pth`, `model_large.pth`, retrieval fine-tunes)
read the way Bi-BLIP4CIR loads them.

HF keys (shared/reference/blip_family.md): `vision_model.*` (ViT; fused `self_attn.qkv`
[3D, D] + `self_attn.projection`; `embeddings.class_embedding` [1, 1, D], `embeddings.position_embedding`
[1, N + 1, D]), `text_encoder.*` (BERT with `crossattention` in every layer, no token types, no
pooler), `vision_proj`, `text_proj`, `itm_head`. Our ViT keeps q/k/v apart: `qkv` is split into
thirds (q, k, v; each head-major, as `BlipAttention` reshapes it) and fused back by `to_state_dict`.

Original `.pth` keys: `visual_encoder.{cls_token, pos_embed, patch_embed.proj, blocks.N.{norm1, attn.qkv,
attn.proj, norm2, mlp.fc1, mlp.fc2}, norm}`, `text_encoder.*` (HF names already), `vision_proj`,
`text_proj`, `itm_head`. Bi-BLIP4CIR loads `visual_encoder`, `vision_proj`, `text_encoder` and
`text_proj`; we keep `itm_head` too when present (ITM scores). Momentum encoders (`*_m`), queues, `temp`
and the captioning `text_decoder` are ignored by name. The position table is resized bicubically from the
checkpoint's grid to `image_size` (default 384), as BLIP's `interpolate_pos_embed` does.
"""

from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
import jax
import numpy as np

from mmret_jax.convert import bert as bert_family
from mmret_jax.convert.core import (ConversionError, Rule, linear_rules, norm_rules, params_to_state_dict,
                                    state_dict_to_params)
from mmret_jax.models import bert, blip, vit

MODEL_TYPES = ("blip",)
IGNORED = ("*position_ids",)
QKV = ("q_proj", "k_proj", "v_proj")

# Original BLIP: what the seed (Bi-BLIP4CIR) does not load, by name.
PTH_IGNORED = ("visual_encoder_m.*", "vision_proj_m.*", "text_encoder_m.*", "text_proj_m.*", "image_queue",
               "text_queue", "idx_queue", "ptr_queue", "temp", "text_decoder.*", "*position_ids")


def vision_rules(c: vit.ViTConfig) -> list[Rule]:
  """Rules of a ViT in BLIP layout under `vision_model` (HF BlipVisionModel names; BLIP-2, UniIR, BagFormer reuse them)."""
  v, t = ("vision_model",), "vision_model"
  r = [Rule(v + ("embeddings", "class_embedding"), f"{t}.embeddings.class_embedding", "lead2"),
       Rule(v + ("embeddings", "position_embedding", "embedding"), f"{t}.embeddings.position_embedding", "lead1"),
       Rule(v + ("embeddings", "patch_embedding", "kernel"), f"{t}.embeddings.patch_embedding.weight", "conv"),
       Rule(v + ("embeddings", "patch_embedding", "bias"), f"{t}.embeddings.patch_embedding.bias")]
  for i in range(c.num_hidden_layers):
    o, k = v + ("encoder", f"layers_{i}"), f"{t}.encoder.layers.{i}"
    for j, name in enumerate(QKV):  # virtual keys: one third of the fused qkv (see split_qkv)
      r += [Rule(o + ("self_attn", name, "kernel"), f"{k}.self_attn.qkv.weight[{j}]", "linear"),
            Rule(o + ("self_attn", name, "bias"), f"{k}.self_attn.qkv.bias[{j}]")]
    r += linear_rules(o + ("self_attn", "out_proj"), f"{k}.self_attn.projection")
    r += norm_rules(o + ("layer_norm1",), f"{k}.layer_norm1") + norm_rules(o + ("layer_norm2",), f"{k}.layer_norm2")
    r += linear_rules(o + ("mlp", "fc1"), f"{k}.mlp.fc1") + linear_rules(o + ("mlp", "fc2"), f"{k}.mlp.fc2")
  return r + norm_rules(v + ("post_layernorm",), f"{t}.post_layernorm")


def rules(config: blip.BlipConfig, itm_head: bool = True) -> list[Rule]:
  """Every (our path, HF key) pair of a BlipForImageTextRetrieval (qkv as virtual third keys)."""
  text = [Rule(("text_encoder",) + r.path, r.key, r.kind)
          for r in bert_family.rules(config.text, prefix="text_encoder.", pooler=False)]
  heads = linear_rules(("vision_proj",), "vision_proj") + linear_rules(("text_proj",), "text_proj")
  if itm_head:
    heads += linear_rules(("itm_head",), "itm_head")
  return vision_rules(config.vision) + text + heads


_QKV_KEY = re.compile(r"^(.*\.self_attn\.qkv\.(weight|bias))$")


def split_qkv(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Fused `...self_attn.qkv.{weight,bias}` -> virtual keys `...qkv.weight[0|1|2]` (q, k, v thirds)."""
  out = {}
  for k, x in sd.items():
    if _QKV_KEY.match(k):
      x = np.asarray(x)
      if x.shape[0] % 3:
        raise ConversionError(f"{k}: first dim {x.shape[0]} is not 3 x hidden size")
      for j, part in enumerate(np.split(x, 3, axis=0)):
        out[f"{k}[{j}]"] = part
    else:
      out[k] = x
  return out


def fuse_qkv(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Inverse of `split_qkv`."""
  out, parts = {}, {}
  for k, x in sd.items():
    m = re.match(r"^(.*\.self_attn\.qkv\.(?:weight|bias))\[(\d)\]$", k)
    if m:
      parts.setdefault(m.group(1), {})[int(m.group(2))] = x
    else:
      out[k] = x
  for k, p in parts.items():
    out[k] = np.concatenate([p[0], p[1], p[2]], axis=0)
  return out


def config_from_hf(hf_config: dict) -> blip.BlipConfig:
  try:
    cfg = blip.BlipConfig.from_dict(hf_config)
    cfg.validate()
  except (TypeError, ValueError) as e:
    raise ConversionError(f"Unsupported BLIP config: {e}") from e
  from mmret_jax.models import layers  # pylint: disable=import-outside-toplevel
  for name, act in (("vision", cfg.vision.hidden_act), ("text", cfg.text.hidden_act)):
    if act not in layers.ACTIVATIONS:
      raise ConversionError(f"{name}_config.hidden_act {act!r} is not supported")
  return cfg


def build_model(hf_config: dict, meta: dict, **kw) -> blip.BlipRetrieval:
  return blip.BlipRetrieval(config_from_hf(hf_config), add_itm_head=meta.get("itm_head", True), **kw)


def expected_shapes(model: blip.BlipRetrieval):
  return jax.eval_shape(lambda: nn.unbox(blip.init_params(model, jax.random.PRNGKey(0))))


def to_params(sd: dict[str, np.ndarray], hf_config: dict) -> tuple[dict, dict]:
  """HF BlipForImageTextRetrieval state dict -> (our params, meta). Strict."""
  meta = {"itm_head": any(k.startswith("itm_head.") for k in sd)}
  model = build_model(hf_config, meta)
  params = state_dict_to_params(rules(model.config, meta["itm_head"]), split_qkv(sd),
                                expected=expected_shapes(model), ignore=IGNORED)
  return params, meta


def to_state_dict(params: dict, hf_config: dict, meta: dict) -> dict[str, np.ndarray]:
  return fuse_qkv(params_to_state_dict(rules(config_from_hf(hf_config), meta.get("itm_head", True)), params))


# ----------------------------------------------------------------------------- original BLIP .pth

_PTH_VISION = ((r"^visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
               (r"^visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
               (r"^visual_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
               (r"^visual_encoder\.norm\.", "vision_model.post_layernorm."),
               (r"^visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision_model.encoder.layers.\1.layer_norm1."),
               (r"^visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision_model.encoder.layers.\1.layer_norm2."),
               (r"^visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision_model.encoder.layers.\1.self_attn.qkv."),
               (r"^visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.projection."),
               (r"^visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."))


def rename_original(sd: dict[str, np.ndarray], keep: tuple[str, ...]) -> tuple[dict[str, np.ndarray], list[str]]:
  """Original BLIP ViT keys (`visual_encoder.*`) -> HF names; keys starting with `keep` pass as they
  are. Returns (renamed dict, keys that matched neither)."""
  out, unknown = {}, []
  for k, x in sd.items():
    if k.startswith(keep):
      out[k] = x
      continue
    for pat, rep in _PTH_VISION:
      if re.match(pat, k):
        out[re.sub(pat, rep, k)] = x
        break
    else:
      unknown.append(k)
  return out, unknown


def is_original(sd: dict[str, np.ndarray]) -> bool:
  """Whether a state dict has the original BLIP layout (`visual_encoder.*`), not HF's."""
  return "visual_encoder.patch_embed.proj.weight" in sd


def original_to_hf(sd: dict[str, np.ndarray], image_size: int | None = None,
                   hf_config: dict | None = None) -> tuple[dict[str, np.ndarray], dict]:
  """Original BLIP state dict -> (HF-named state dict, HF BlipConfig dict). Keys the seed does not
  load are dropped by name (`PTH_IGNORED`); any other unknown key is an error.

  The config is read off the weights (widths, depths, head count = width / 64 as in BLIP's ViT-B/L
  and med BERT, ViT eps 1e-6, med_config's eps 1e-12 and dropout 0.1) unless `hf_config` (an HF
  BlipConfig dict) is given. `image_size` (default: the config's, else 384) sets the input size the
  position table is resized to."""
  import fnmatch  # pylint: disable=import-outside-toplevel
  if not is_original(sd):
    sample = ", ".join(sorted(sd)[:5])
    raise ConversionError(f"Not an original BLIP state dict (no visual_encoder.patch_embed.proj.weight); "
                          f"keys start: {sample}")
  sd = {k: x for k, x in sd.items() if not any(fnmatch.fnmatch(k, p) for p in PTH_IGNORED)}
  out, unknown = rename_original(sd, keep=("text_encoder.", "vision_proj.", "text_proj.", "itm_head."))
  if unknown:
    raise ConversionError(f"unexpected keys in the BLIP checkpoint: {', '.join(sorted(unknown)[:12])}")
  patch = np.asarray(out["vision_model.embeddings.patch_embedding.weight"])
  width, patch_size = patch.shape[0], patch.shape[-1]
  if image_size is None:
    image_size = int((hf_config or {}).get("vision_config", {}).get("image_size") or 384)
  if image_size % patch_size:
    raise ConversionError(f"image_size {image_size} is not a multiple of the patch size {patch_size}")
  pos_key = "vision_model.embeddings.position_embedding"
  pos = np.asarray(out[pos_key], np.float32)
  grid = image_size // patch_size
  out[pos_key] = vit.resize_positions(pos[0], (grid, grid))[None]
  if hf_config is not None:
    config = blip.BlipConfig.from_dict(hf_config)
    return out, dataclasses.replace(config, vision=dataclasses.replace(config.vision, image_size=image_size)).to_dict()
  layers_v = len({k.split(".")[3] for k in out if k.startswith("vision_model.encoder.layers.")})
  layers_t = len({k.split(".")[3] for k in out if k.startswith("text_encoder.encoder.layer.")})
  word = np.asarray(out["text_encoder.embeddings.word_embeddings.weight"])
  text_width = word.shape[1]
  cross = out.get("text_encoder.encoder.layer.0.crossattention.self.key.weight")
  proj = out.get("vision_proj.weight")
  fc1 = out.get("vision_model.encoder.layers.0.mlp.fc1.weight")
  inter = out.get("text_encoder.encoder.layer.0.intermediate.dense.weight")
  config = blip.BlipConfig(
      vision=vit.ViTConfig(hidden_size=int(width), intermediate_size=int(fc1.shape[0]) if fc1 is not None else 4 * width,
                           num_hidden_layers=layers_v, num_attention_heads=max(1, int(width) // 64),
                           image_size=int(image_size), patch_size=int(patch_size), hidden_act="gelu",
                           layer_norm_eps=1e-6, initializer_range=0.02, **blip.BLIP_VIT_LAYOUT),
      # BLIP's med_config.json: BERT-base, 12 heads, eps 1e-12, dropout 0.1
      text=bert.BertConfig(
          vocab_size=int(word.shape[0]), hidden_size=int(text_width), num_hidden_layers=layers_t,
          num_attention_heads=max(1, int(text_width) // 64),
          intermediate_size=int(inter.shape[0]) if inter is not None else 4 * text_width,
          max_position_embeddings=int(np.asarray(out["text_encoder.embeddings.position_embeddings.weight"]).shape[0]),
          layer_norm_eps=1e-12, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, pad_token_id=0,
          type_vocab_size=0, add_cross_attention=True,
          encoder_width=int(cross.shape[1]) if cross is not None else int(width)),
      image_text_hidden_size=int(proj.shape[0]) if proj is not None else 256)
  return out, config.to_dict()
