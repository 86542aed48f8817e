"""mBLIP (Geigle et al., arXiv 2307.06930): BLIP-2's image side re-aligned to a multilingual LLM.

`MBlip` = `blip2.Blip2VisionQFormer` (vision_model, query_tokens, qformer, language_projection) plus
`language_model`: mT0 / mT5 (`t5.T5ForConditionalGeneration`) or BLOOMZ (`bloom.BloomForCausalLM`), chosen
by `text_config["model_type"]`. Param names are HF `Blip2ForConditionalGeneration`'s.

The seed's forward (`src/modules/modeling/mblip.py`, the transformers 4.x legacy path; shared/reference/
mblip.md): the Q-Former's Q query states of each image, projected to the LLM width, are PREPENDED to the
token embeddings of the prompt (no placeholder tokens), with attention mask ones for them:
  inputs_embeds [B, n*Q + L, D] = concat(project(qformer(vit(pixels))), embed(input_ids))
Multi-image examples (MaRVL: pixels [B, 2, H, W, 3]) give n*Q prefix embeddings, first image first.
  mT5:   the encoder reads inputs_embeds; the decoder reads shift_right(labels); loss = mean CE over the
         labelled target tokens (-100 ignored).
  BLOOM: the decoder reads inputs_embeds (BLOOM's embedding LayerNorm applies to the prefix too); the
         logits are cut to the last L positions (the prefix dropped) and shifted against labels [B, L]
         (-100 on the prompt and the padding; the seed pads BLOOM batches on the left).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mmret_jax.models import blip2, bloom, t5

Array = jax.Array
DECODER_ONLY = ("bloom",)
ENCODER_DECODER = t5.MODEL_TYPES


def llm_family(config: blip2.Blip2Config) -> str:
  """"t5" (mT5 / mT0 / T5) or "bloom", from text_config's model_type; anything else is an error."""
  mt = str(config.text_config.get("model_type", ""))
  if mt in ENCODER_DECODER:
    return "t5"
  if mt in DECODER_ONLY:
    return "bloom"
  raise ValueError(f"mBLIP's language model must be one of {ENCODER_DECODER + DECODER_ONLY}, got text_config "
                   f"model_type {mt!r}")


def llm_config(config: blip2.Blip2Config) -> t5.T5Config | bloom.BloomConfig:
  if llm_family(config) == "t5":
    return t5.T5Config.from_dict(config.text_config)
  return bloom.BloomConfig.from_dict(config.text_config)


class MBlip(blip2.Blip2VisionQFormer):
  """The mBLIP model (see the module docstring). Methods: `prompt_embeds`, `__call__` (logits and loss),
  `encode` (mT5: the encoder over the prefixed prompt), and the image-side methods of
  `Blip2VisionQFormer`."""

  def setup(self):
    super().setup()
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat)
    cfg = llm_config(self.config)
    if isinstance(cfg, t5.T5Config):
      self.language_model = t5.T5ForConditionalGeneration(cfg, **kw)
    else:
      self.language_model = bloom.BloomForCausalLM(cfg, **kw)

  @property
  def decoder_only(self) -> bool:
    return llm_family(self.config) == "bloom"

  def _token_embeds(self, input_ids: Array) -> Array:
    if self.decoder_only:
      return self.language_model.embed(input_ids)
    return self.language_model.shared(input_ids)

  def prompt_embeds(self, pixel_values: Array, input_ids: Array, attention_mask: Array | None = None, *,
                    deterministic: bool = True) -> tuple[Array, Array]:
    """pixels [B, (n,) H, W, 3], prompt ids [B, L], mask [B, L] -> (inputs_embeds [B, n*Q + L, D], mask
    [B, n*Q + L]): the projected query states prepended to the token embeddings."""
    prefix = self.query_embeds(pixel_values, deterministic=deterministic)
    tok = self._token_embeds(input_ids)
    attention_mask = (jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None
                      else jnp.asarray(attention_mask, jnp.int32))
    embeds = jnp.concatenate([prefix.astype(tok.dtype), tok], axis=1)
    mask = jnp.concatenate([jnp.ones(prefix.shape[:2], attention_mask.dtype), attention_mask], axis=1)
    return embeds, mask

  def encode(self, pixel_values: Array, input_ids: Array, attention_mask: Array | None = None, *,
             deterministic: bool = True) -> tuple[Array, Array]:
    """mT5 only: (encoder states [B, n*Q + L, D], their mask [B, n*Q + L])."""
    if self.decoder_only:
      raise ValueError("encode is for encoder-decoder LLMs (mT5); BLOOM reads the prompt in its decoder")
    embeds, mask = self.prompt_embeds(pixel_values, input_ids, attention_mask, deterministic=deterministic)
    return self.language_model.encode(inputs_embeds=embeds, attention_mask=mask, deterministic=deterministic), mask

  def __call__(self, pixel_values: Array, input_ids: Array, attention_mask: Array | None = None,
               labels: Array | None = None, decoder_input_ids: Array | None = None, *,
               deterministic: bool = True) -> dict[str, Any]:
    """mT5: prompt ids [B, L] (+ mask), labels [B, T] (-100 ignored) or decoder_input_ids [B, T] -> {logits
    float32 [B, T, V], loss}. BLOOM: ids = prompt + target (+ eos) [B, L], labels [B, L] -> {logits float32
    [B, L, V] (prefix positions cut), loss}."""
    embeds, mask = self.prompt_embeds(pixel_values, input_ids, attention_mask, deterministic=deterministic)
    if not self.decoder_only:
      return self.language_model(attention_mask=mask, inputs_embeds=embeds, labels=labels,
                                 decoder_input_ids=decoder_input_ids, deterministic=deterministic)
    logits = self.language_model(attention_mask=mask, inputs_embeds=embeds, deterministic=deterministic)["logits"]
    logits = logits[:, -input_ids.shape[1]:]
    out = {"logits": logits}
    if labels is not None:
      out["loss"] = bloom.causal_lm_loss(logits, labels)
    return out


def init_params(model: MBlip, rng: Array, seq_len: int = 8) -> dict:
  """Every param of `model` (boxed), from one forward at the config's image size."""
  v = model.config.vision_config
  px = jnp.zeros((1, v.image_size, v.image_size, 3), jnp.float32)
  ids = jnp.ones((1, seq_len), jnp.int32)
  kw = {} if model.decoder_only else {"decoder_input_ids": ids}
  return model.init(rng, px, ids, **kw)["params"]
