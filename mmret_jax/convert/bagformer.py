"""Key map for BagFormer checkpoints (howard-hou/BagFormer, ALBEF-based; `{"model": state_dict, ...}` as the
seed's `train_muge.py` saves it, or a bare state dict).

Seed keys: `visual_encoder.*` (timm ViT: `cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.N.{norm1,
attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`, `norm`), `text_encoder.*` (HF BERT names; ALBEF pretraining
checkpoints put `bert.` after `text_encoder.`, which the seed strips on load, and so do we), `vision_proj`,
`text_proj`, `itm_head`, `temp`. Only layers >= fusion_layer carry `crossattention`. Ignored by name
(`SEED_IGNORED`, reported in one line): the momentum copies, the queues, ALBEF's MLM head
`text_encoder.cls.*` and `position_ids` buffers; any other unknown or missing key, or a wrong shape, is an
error naming the keys.

`original_to_ours` renames the ViT to HF BLIP names (`convert/blip.py`), resizes `pos_embed` bicubically
when the checkpoint's grid differs from the configured image size (the seed's `interpolate_pos_embed`) and
reads the config off the weights unless one is given (heads = width / 64, eps 1e-6 / 1e-12, dropout 0.1 as
config_chinese_bert.json, fusion_layer = the first layer with crossattention keys). `to_state_dict` writes
the seed's (non-momentum) key names back; `to_params` takes either layout.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import sys

import flax.linen as nn
import jax
import numpy as np

from mmret_jax.convert import bert as bert_family
from mmret_jax.convert import blip as blip_family
from mmret_jax.convert.core import (ConversionError, Rule, linear_rules, params_to_state_dict,
                                    state_dict_to_params)
from mmret_jax.models import bagformer, bert, blip, vit

MODEL_TYPES = ("bagformer",)
IGNORED = ("*position_ids",)
# What the seed's checkpoints carry besides the model's weights: never used by BagFormer.forward.
SEED_IGNORED = {"momentum copies": ("visual_encoder_m.*", "text_encoder_m.*", "vision_proj_m.*", "text_proj_m.*"),
                "queues": ("image_queue", "text_queue", "idx_queue", "queue_ptr"),
                "MLM head": ("text_encoder.cls.*",),
                "position_ids buffers": ("*position_ids",)}
_KEEP = ("text_encoder.", "vision_proj.", "text_proj.", "itm_head.", "temp")
_PATCH = "visual_encoder.patch_embed.proj.weight"
# HF BLIP ViT names (after fuse_qkv) -> timm names; the inverse of blip_family.rename_original.
_TO_TIMM = ((r"^vision_model\.embeddings\.class_embedding$", "visual_encoder.cls_token"),
            (r"^vision_model\.embeddings\.position_embedding$", "visual_encoder.pos_embed"),
            (r"^vision_model\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
            (r"^vision_model\.post_layernorm\.", "visual_encoder.norm."),
            (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.", r"visual_encoder.blocks.\1.norm1."),
            (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm2\.", r"visual_encoder.blocks.\1.norm2."),
            (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"visual_encoder.blocks.\1.attn.qkv."),
            (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.", r"visual_encoder.blocks.\1.attn.proj."),
            (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"visual_encoder.blocks.\1.mlp."))


def is_original(sd: dict[str, np.ndarray]) -> bool:
  """Whether a state dict has the seed's layout (timm `visual_encoder.*`)."""
  return _PATCH in sd


def _strip_bert(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`text_encoder[_m].bert.X` -> `text_encoder[_m].X` (ALBEF pretraining checkpoints; the seed strips it)."""
  out, origin = {}, {}
  for k, x in sd.items():
    new = re.sub(r"^(text_encoder(?:_m)?)\.bert\.", r"\1.", k)
    if new in out:
      a, b = sorted((origin[new], k), key=len, reverse=True)
      raise ConversionError(f"{a} and {b} both in the checkpoint (the seed strips `bert.`)")
    out[new], origin[new] = x, k
  return out


def split_ignored(sd: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
  """(the keys not ignored by name, a one-line report of the ignored ones; "" if none)."""
  kept, counts = {}, {}
  for k, x in sd.items():
    group = next((g for g, pats in SEED_IGNORED.items() if any(fnmatch.fnmatch(k, p) for p in pats)), None)
    if group is None:
      kept[k] = x
    else:
      counts[group] = counts.get(group, 0) + 1
  report = ", ".join(f"{counts[g]} {g}" for g in SEED_IGNORED if g in counts)
  return kept, (f"ignored {sum(counts.values())} keys by name ({report})" if counts else "")


def _infer_config(out: dict[str, np.ndarray], image_size: int) -> bagformer.BagFormerConfig:
  patch = np.asarray(out["vision_model.embeddings.patch_embedding.weight"])
  width, patch_size = int(patch.shape[0]), int(patch.shape[-1])
  layers_v = len({k.split(".")[3] for k in out if k.startswith("vision_model.encoder.layers.")})
  layers_t = len({k.split(".")[3] for k in out if k.startswith("text_encoder.encoder.layer.")})
  cross = sorted(int(k.split(".")[3]) for k in out
                 if re.match(r"^text_encoder\.encoder\.layer\.\d+\.crossattention\.self\.key\.weight$", k))
  if not cross:
    raise ConversionError("no text_encoder.encoder.layer.N.crossattention.* keys: BagFormer needs ALBEF's "
                          "fusion layers (a text-only BERT converts with --family bert)")
  word_key = "text_encoder.embeddings.word_embeddings.weight"
  if word_key not in out:
    raise ConversionError(f"missing keys: {word_key}")
  vocab, text_width = (int(n) for n in np.asarray(out[word_key]).shape)
  shape = lambda key, dim, default: int(np.asarray(out[key]).shape[dim]) if key in out else default
  return bagformer.BagFormerConfig(
      vision=vit.ViTConfig(hidden_size=width, intermediate_size=shape("vision_model.encoder.layers.0.mlp.fc1.weight",
                                                                      0, 4 * width),
                           num_hidden_layers=layers_v, num_attention_heads=max(1, width // 64), image_size=image_size,
                           patch_size=patch_size, hidden_act="gelu", layer_norm_eps=1e-6, initializer_range=0.02,
                           **blip.BLIP_VIT_LAYOUT),
      text=bert.BertConfig(
          vocab_size=vocab, hidden_size=text_width, num_hidden_layers=layers_t,
          num_attention_heads=max(1, text_width // 64),
          intermediate_size=shape("text_encoder.encoder.layer.0.intermediate.dense.weight", 0, 4 * text_width),
          max_position_embeddings=shape("text_encoder.embeddings.position_embeddings.weight", 0, 512),
          type_vocab_size=shape("text_encoder.embeddings.token_type_embeddings.weight", 0, 0),
          layer_norm_eps=1e-12, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, pad_token_id=0,
          add_cross_attention=True, fusion_layer=cross[0],
          encoder_width=shape(f"text_encoder.encoder.layer.{cross[0]}.crossattention.self.key.weight", 1, width)),
      embed_dim=shape("text_proj.weight", 0, 256))


def original_to_ours(sd: dict[str, np.ndarray], image_size: int | None = None, hf_config: dict | None = None,
                     *, quiet: bool = False) -> tuple[dict[str, np.ndarray], dict]:
  """A seed state dict -> (intermediate state dict: HF BLIP ViT names, `text_encoder.*`, heads, `temp`;
  our config dict). `hf_config`: a BagFormer config dict (`BagFormerConfig.to_dict`) fixing the dims;
  `image_size` (default: the config's, else the checkpoint's grid) sets the size `pos_embed` is resized to.
  The ignored keys are reported in one line on stderr unless `quiet`."""
  if not is_original(sd):
    raise ConversionError(f"Not a BagFormer / ALBEF state dict (no {_PATCH}); keys start: "
                          f"{', '.join(sorted(sd)[:5])}")
  sd, note = split_ignored(_strip_bert(sd))
  if note and not quiet:
    print(f"bagformer: {note}", file=sys.stderr)
  out, unknown = blip_family.rename_original(sd, keep=_KEEP)
  unknown += [k for k in out if k.startswith("temp") and k != "temp"]
  if unknown:
    raise ConversionError(f"unexpected keys in the BagFormer checkpoint: {', '.join(sorted(unknown)[:12])}")
  pos_key = "vision_model.embeddings.position_embedding"
  if pos_key not in out:
    raise ConversionError("missing keys: visual_encoder.pos_embed")
  pos = np.asarray(out[pos_key], np.float32)
  patch_size = int(np.asarray(out["vision_model.embeddings.patch_embedding.weight"]).shape[-1])
  config = config_from_hf(hf_config) if hf_config is not None else None
  if image_size is None:
    grid = int(round((pos.shape[-2] - 1) ** 0.5))
    image_size = config.vision.image_size if config is not None else grid * patch_size
  if image_size % patch_size:
    raise ConversionError(f"image_size {image_size} is not a multiple of the patch size {patch_size}")
  if pos.ndim != 3 or pos.shape[0] != 1:
    raise ConversionError(f"visual_encoder.pos_embed: expected [1, 1 + grid^2, D], got {pos.shape}")
  try:
    out[pos_key] = vit.resize_positions(pos[0], (image_size // patch_size,) * 2)[None]
  except ValueError as e:
    raise ConversionError(f"visual_encoder.pos_embed: {e}") from None
  if config is None:
    config = _infer_config(out, image_size)
  else:
    config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, image_size=image_size))
  return out, config.to_dict()


def config_from_hf(hf_config: dict) -> bagformer.BagFormerConfig:
  try:
    return bagformer.BagFormerConfig.from_dict(hf_config)
  except (KeyError, TypeError, ValueError) as e:
    raise ConversionError(f"Unsupported BagFormer config: {e}") from e


def build_model(hf_config: dict, meta: dict, **kw) -> bagformer.BagFormer:  # pylint: disable=unused-argument
  return bagformer.BagFormer(config_from_hf(hf_config), **kw)


def rules(config: bagformer.BagFormerConfig) -> list[Rule]:
  """Every (our path, intermediate key) pair (ViT qkv as virtual third keys, see blip_family.split_qkv)."""
  c = config.text
  text = [Rule(("text_encoder",) + r.path, r.key, r.kind)
          for r in bert_family.rules(c, prefix="text_encoder.", pooler=False)
          if not (r.path[2:3] == ("crossattention",) and not c.has_cross_attention(int(r.path[1][len("layer_"):])))]
  heads = linear_rules(("vision_proj",), "vision_proj") + linear_rules(("text_proj",), "text_proj")
  heads += linear_rules(("itm_head",), "itm_head") + [Rule(("temp",), "temp")]
  return blip_family.vision_rules(config.vision) + text + heads


def to_params(sd: dict[str, np.ndarray], hf_config: dict) -> tuple[dict, dict]:
  """Intermediate (see `original_to_ours`) or seed-layout state dict -> (our params, meta). Strict."""
  if is_original(sd):  # e.g. a `to-hf` output converted back
    sd, _ = original_to_ours(sd, hf_config=hf_config)
  model = build_model(hf_config, {})
  expected = jax.eval_shape(lambda: nn.unbox(bagformer.init_params(model, jax.random.PRNGKey(0))))
  params = state_dict_to_params(rules(model.config), blip_family.split_qkv(sd), expected=expected, ignore=IGNORED)
  return params, {}


def to_state_dict(params: dict, hf_config: dict, meta: dict) -> dict[str, np.ndarray]:
  """Our params -> the seed's key names (timm ViT, `text_encoder.*` without `bert.`, heads, `temp`); no
  momentum copies or queues. There is no Hugging Face class for BagFormer: `convert to-hf` writes these."""
  del meta
  sd = blip_family.fuse_qkv(params_to_state_dict(rules(config_from_hf(hf_config)), params))
  out = {}
  for k, x in sd.items():
    for pat, rep in _TO_TIMM:
      if re.match(pat, k):
        k = re.sub(pat, rep, k)
        break
    out[k] = x
  return out
