"""Key map for CLIP: Hugging Face `CLIPModel` both ways, and OpenAI CLIP state dicts (`clip.load(...)
.state_dict()`, as UniIR loads them) to the same params via an HF-named intermediate."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import numpy as np

from mmret_jax.convert.core import (ConversionError, Rule, linear_rules, norm_rules, params_to_state_dict,
                                    state_dict_to_params)
from mmret_jax.models import clip

MODEL_TYPES = ("clip",)
IGNORED = ("*position_ids",)


def _tower_layers(ours: tuple[str, ...], theirs: str, n: int) -> list[Rule]:
  r = []
  for i in range(n):
    o, t = ours + ("encoder", f"layers_{i}"), f"{theirs}.encoder.layers.{i}"
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      r += linear_rules(o + ("self_attn", proj), f"{t}.self_attn.{proj}")
    r += norm_rules(o + ("layer_norm1",), f"{t}.layer_norm1") + norm_rules(o + ("layer_norm2",), f"{t}.layer_norm2")
    r += linear_rules(o + ("mlp", "fc1"), f"{t}.mlp.fc1") + linear_rules(o + ("mlp", "fc2"), f"{t}.mlp.fc2")
  return r


def rules(config: clip.CLIPConfig) -> list[Rule]:
  """Every (our path, HF key) pair of a CLIPModel."""
  t, v = ("text_model",), ("vision_model",)
  r = [Rule(t + ("embeddings", "token_embedding", "embedding"), "text_model.embeddings.token_embedding.weight"),
       Rule(t + ("embeddings", "position_embedding", "embedding"),
            "text_model.embeddings.position_embedding.weight")]
  r += _tower_layers(t, "text_model", config.text.num_hidden_layers)
  r += norm_rules(t + ("final_layer_norm",), "text_model.final_layer_norm")
  r += [Rule(v + ("embeddings", "class_embedding"), "vision_model.embeddings.class_embedding"),
        Rule(v + ("embeddings", "patch_embedding", "kernel"), "vision_model.embeddings.patch_embedding.weight",
             "conv"),
        Rule(v + ("embeddings", "position_embedding", "embedding"),
             "vision_model.embeddings.position_embedding.weight")]
  r += norm_rules(v + ("pre_layrnorm",), "vision_model.pre_layrnorm")
  r += _tower_layers(v, "vision_model", config.vision.num_hidden_layers)
  r += norm_rules(v + ("post_layernorm",), "vision_model.post_layernorm")
  r += linear_rules(("text_projection",), "text_projection", bias=False)
  r += linear_rules(("visual_projection",), "visual_projection", bias=False)
  return r + [Rule(("logit_scale",), "logit_scale")]


def config_from_hf(hf_config: dict) -> clip.CLIPConfig:
  try:
    cfg = clip.CLIPConfig.from_dict(hf_config)
  except ValueError as e:
    raise ConversionError(str(e)) from None
  from mmret_jax.models import layers  # pylint: disable=import-outside-toplevel
  for name, tower in (("text", cfg.text), ("vision", cfg.vision)):
    if tower.hidden_act not in layers.ACTIVATIONS:
      raise ConversionError(f"{name}_config.hidden_act {tower.hidden_act!r} is not supported")
    if tower.num_attention_heads < 1 or tower.hidden_size % tower.num_attention_heads:
      raise ConversionError(f"{name}_config.hidden_size {tower.hidden_size} is not a multiple of "
                            f"num_attention_heads {tower.num_attention_heads}")
  return cfg


def build_model(hf_config: dict, meta: dict, **kw) -> clip.CLIPModel:  # pylint: disable=unused-argument
  return clip.CLIPModel(config_from_hf(hf_config), **kw)


def expected_shapes(model: clip.CLIPModel):
  c = model.config
  ids = np.zeros((1, 4), np.int32)
  px = np.zeros((1, c.vision.image_size, c.vision.image_size, c.vision.num_channels), np.float32)
  return jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), ids, px)["params"]))


def to_params(sd: dict[str, np.ndarray], hf_config: dict) -> tuple[dict, dict]:
  """HF CLIPModel state dict -> (our params, meta). Strict."""
  model = build_model(hf_config, {})
  params = state_dict_to_params(rules(model.config), sd, expected=expected_shapes(model), ignore=IGNORED)
  return params, {}


def to_state_dict(params: dict, hf_config: dict, meta: dict) -> dict[str, np.ndarray]:  # pylint: disable=unused-argument
  return params_to_state_dict(rules(config_from_hf(hf_config)), params)


# ----------------------------------------------------------------------------- OpenAI CLIP

OPENAI_SCALARS = ("input_resolution", "context_length", "vocab_size")  # in JIT-exported state dicts


def _count_blocks(sd, prefix: str) -> int:
  pat = re.compile(re.escape(prefix) + r"(\d+)\.attn\.in_proj_weight$")
  return len([k for k in sd if pat.match(k)])


def openai_to_hf(sd: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
  """OpenAI CLIP (ViT) state dict -> (HF-named state dict, HF config dict). Every key is consumed."""
  # ResNet CLIPs (ModifiedResNet) have a `visual.conv1` stem too: look for their stages first.
  if any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in sd):
    raise ConversionError("ResNet CLIP checkpoints (RN50, ...) are not supported; use a ViT CLIP")
  if "visual.conv1.weight" not in sd:
    raise ConversionError("Not an OpenAI CLIP state dict (no visual.conv1.weight)")
  used: set[str] = set()

  def take(k):
    if k not in sd:
      raise ConversionError(f"OpenAI CLIP state dict lacks {k}")
    used.add(k)
    return np.asarray(sd[k])

  out: dict[str, np.ndarray] = {}

  def blocks(src: str, dst: str, n: int):
    for i in range(n):
      s, d = f"{src}{i}.", f"{dst}.encoder.layers.{i}."
      w, b = take(s + "attn.in_proj_weight"), take(s + "attn.in_proj_bias")
      for j, name in enumerate(("q_proj", "k_proj", "v_proj")):  # fused [3W, W] in q, k, v order
        out[d + f"self_attn.{name}.weight"] = np.split(w, 3)[j]
        out[d + f"self_attn.{name}.bias"] = np.split(b, 3)[j]
      for o, t in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                   ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
        out[d + o + ".weight"], out[d + o + ".bias"] = take(s + t + ".weight"), take(s + t + ".bias")

  conv = take("visual.conv1.weight")
  width, patch = conv.shape[0], conv.shape[-1]
  vpos = take("visual.positional_embedding")
  grid = int(round((vpos.shape[0] - 1) ** 0.5))
  vlayers = _count_blocks(sd, "visual.transformer.resblocks.")
  out["vision_model.embeddings.patch_embedding.weight"] = conv
  out["vision_model.embeddings.class_embedding"] = take("visual.class_embedding")
  out["vision_model.embeddings.position_embedding.weight"] = vpos
  for o, t in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
    out[f"vision_model.{o}.weight"], out[f"vision_model.{o}.bias"] = take(f"visual.{t}.weight"), take(f"visual.{t}.bias")
  blocks("visual.transformer.resblocks.", "vision_model", vlayers)
  out["visual_projection.weight"] = take("visual.proj").T  # OpenAI stores [in, out]

  tok = take("token_embedding.weight")
  tpos = take("positional_embedding")
  tlayers = _count_blocks(sd, "transformer.resblocks.")
  twidth = tok.shape[1]
  out["text_model.embeddings.token_embedding.weight"] = tok
  out["text_model.embeddings.position_embedding.weight"] = tpos
  blocks("transformer.resblocks.", "text_model", tlayers)
  out["text_model.final_layer_norm.weight"], out["text_model.final_layer_norm.bias"] = \
      take("ln_final.weight"), take("ln_final.bias")
  tproj = take("text_projection")
  out["text_projection.weight"] = tproj.T
  out["logit_scale"] = take("logit_scale")

  unexpected = sorted(set(sd) - used - set(OPENAI_SCALARS))
  if unexpected:
    raise ConversionError(f"unexpected keys in OpenAI CLIP state dict: {', '.join(unexpected[:12])}")
  for tower, w in (("visual", width), ("text", twidth)):  # OpenAI's head count is width // 64
    if w < 64:
      raise ConversionError(f"OpenAI CLIP {tower} width {w} < 64: its head count (width // 64) would be 0")
  mlp_v = out["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0] if vlayers else 4 * width
  mlp_t = out["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0] if tlayers else 4 * twidth
  hf_config = {
      "model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": int(tproj.shape[1]),
      "logit_scale_init_value": 2.6592,
      # OpenAI CLIP pools the text at argmax(ids) (its EOT has the largest id): HF's legacy eos id 2.
      "text_config": {"vocab_size": int(tok.shape[0]), "hidden_size": int(twidth), "intermediate_size": int(mlp_t),
                      "num_hidden_layers": tlayers, "num_attention_heads": int(twidth) // 64,
                      "max_position_embeddings": int(tpos.shape[0]), "hidden_act": "quick_gelu",
                      "layer_norm_eps": 1e-5, "eos_token_id": 2, "bos_token_id": 0, "pad_token_id": 1,
                      "projection_dim": int(tproj.shape[1])},
      "vision_config": {"hidden_size": int(width), "intermediate_size": int(mlp_v), "num_hidden_layers": vlayers,
                        "num_attention_heads": int(width) // 64, "image_size": int(patch * grid),
                        "patch_size": int(patch), "num_channels": int(conv.shape[1]), "hidden_act": "quick_gelu",
                        "layer_norm_eps": 1e-5, "projection_dim": int(tproj.shape[1])},
  }
  return out, hf_config
