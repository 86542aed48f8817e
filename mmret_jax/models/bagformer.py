"""BagFormer (Hou et al. 2022, arXiv 2212.14322): an ALBEF dual encoder with a bag-wise text side.

Mirrors the seed's `BagFormer` (howard-hou/BagFormer `models/model_retrieval_bagwise.py`, built on ALBEF):
  vision_model  `vit.VisionTransformer` in BLIP's layout (ALBEF's timm ViT == BLIP's: patch conv with bias,
                no pre-LN, final norm on every token; eps 1e-6, exact GELU); ViT-B/16 at 256 px
  text_encoder  `bert.BertModel` split as ALBEF's xbert (`fusion_layer` F, bert-base-chinese): mode "text"
                runs layers [0, F) on the ids (the unimodal text states), mode "fusion" runs [F, N) on
                given states, cross-attending the raw ViT tokens (only layers >= F own cross-attention)
  vision_proj / text_proj  Linear(D -> embed_dim)
  itm_head      Linear(D -> 2) on the fusion CLS state; index 1 = match
  temp          the learnable ITA temperature (init 0.07; the task clamps it to [0.05, 0.5])

Shapes: B batch, L text length, P image patches, K bags, D text width, Dv vision width, E embed_dim.
Features: image tokens V = L2norm(vision_proj(ViT tokens)) [B, 1 + P, E] (CLS = V[:, 0]); text CLS
t = L2norm(text_proj(H[:, 0])) [B, E]; bags T = L2norm(text_proj(sum of each bag's token states)) * bag
mask [B, K, E]. A bag is given per token: `bag_index` [B, L] (bag k of row b holds the tokens t with
bag_index[b, t] == k; any other value, e.g. -1, joins no bag), `bag_mask` [B, K] (K static). This is the
seed's `F.embedding_bag(arange(B*L), H.view(-1, D), offsets, mode="sum")` over the flattened per-row bag
starts o + b*L cut to the batch-minimum count K: bag_index[b, t] = #{first K starts of row b <= t} - 1
(starts are ascending and row-relative, the first one 0; a repeated start is an empty bag).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmret_jax.models import bert, blip, layers, vit

Array = jax.Array
Dtype = Any

_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               image_size=256, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6, initializer_range=0.02)
# configs/config_chinese_bert.json (bert-base-chinese + ALBEF's fusion_layer / encoder_width)
_TEXT = dict(vocab_size=21128, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
             intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
             max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12, initializer_range=0.02,
             pad_token_id=0, model_type="bert", add_cross_attention=True, fusion_layer=6, encoder_width=768)


@dataclasses.dataclass(frozen=True)
class BagFormerConfig:
  """The two towers (ViT in BLIP's layout, xbert-split BERT) + the shared width and temperature init."""
  vision: vit.ViTConfig = vit.ViTConfig(**_VISION, **blip.BLIP_VIT_LAYOUT)
  text: bert.BertConfig = bert.BertConfig(**_TEXT)
  embed_dim: int = 256
  temp_init: float = 0.07

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "BagFormerConfig":
    """From `to_dict`'s layout (`model_type: "bagformer"`, `vision_config`, `text_config`, ...)."""
    if d.get("model_type", "bagformer") != "bagformer":
      raise ValueError(f"Not a BagFormer config: model_type={d.get('model_type')!r}")
    v = {**_VISION, **(d.get("vision_config") or {})}
    t = {**_TEXT, **(d.get("text_config") or {})}
    config = cls(vision=vit.ViTConfig(**layers.fields_from_hf(vit.ViTConfig, v), **blip.BLIP_VIT_LAYOUT),
                 text=bert.BertConfig.from_dict(t), embed_dim=int(d.get("embed_dim", 256)),
                 temp_init=float(d.get("temp_init", 0.07)))
    config.validate()
    return config

  def to_dict(self) -> dict[str, Any]:
    v = self.vision.to_dict()
    v.pop("projection_dim", None)
    return {"model_type": "bagformer", "vision_config": v, "text_config": self.text.to_dict(),
            "embed_dim": self.embed_dim, "temp_init": self.temp_init}

  def validate(self) -> None:
    for name, hidden, heads in (("vision", self.vision.hidden_size, self.vision.num_attention_heads),
                                ("text", self.text.hidden_size, self.text.num_attention_heads)):
      if heads < 1 or hidden % heads:
        raise ValueError(f"{name} hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    t = self.text
    if t.fusion_layer is None or not t.add_cross_attention:
      raise ValueError("BagFormer's text encoder needs fusion_layer and add_cross_attention (ALBEF xbert)")
    if (t.encoder_width or t.hidden_size) != self.vision.hidden_size:
      raise ValueError(f"text encoder_width {t.encoder_width} != vision hidden_size {self.vision.hidden_size}")


# config_muge.yaml `fusion_strategy`: bags of token states (late, the released setting) or of embeddings (early)
FUSION_STRATEGIES = ("late_fusion", "early_fusion")

PRESETS = {
    # MUGE fine-tuning (configs/config_muge.yaml): ViT-B/16 at 256 px, bert-base-chinese split at layer 6.
    "base": BagFormerConfig(),
}


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  """float32 x / max(||x||, eps) over the last axis (torch F.normalize); finite gradients at x = 0."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def bag_sum(h: Array, bag_index: Array, num_bags: int) -> Array:
  """[B, L, D] states, int [B, L] bag of each token -> [B, K, D] per-bag sums (empty bags = 0).

  A one-hot segment sum (an einsum at full precision: each output is the exact sum of its tokens)."""
  onehot = (bag_index[..., None] == jnp.arange(num_bags, dtype=bag_index.dtype)).astype(h.dtype)
  return jnp.einsum("blk,bld->bkd", onehot, h, precision=jax.lax.Precision.HIGHEST)


class BagFormer(nn.Module):
  """The seed's `BagFormer` (no momentum copies or queues: its forward never uses them).

  Methods: `image_embeds`, `image_feats`, `text_embeds`, `text_feat`, `token_feats`, `bag_feats`,
  `early_fusion_text`, `itm_logits`; `__call__` runs them all (used to initialise every param)."""
  config: BagFormerConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.vision_model = vit.VisionTransformer(c.vision, remat=self.remat, **kw)
    self.text_encoder = bert.BertModel(c.text, add_pooling_layer=False, remat=self.remat, **kw)
    self.vision_proj = layers.Dense(c.embed_dim, ("embed", "mlp"), init_std=0.02, **kw)
    self.text_proj = layers.Dense(c.embed_dim, ("embed", "mlp"), init_std=0.02, **kw)
    self.itm_head = layers.Dense(2, ("embed", None), init_std=0.02, **kw)
    self.temp = layers.logical_param(self, "temp", (), (), nn.initializers.constant(c.temp_init),
                                     self.param_dtype)

  def image_embeds(self, pixel_values: Array, *, deterministic: bool = True) -> Array:
    """[B, H, W, 3] -> raw ViT `last_hidden_state` [B, 1 + P, Dv] (final norm on every token)."""
    return self.vision_model(pixel_values, deterministic=deterministic)["last_hidden_state"]

  def image_feats(self, image_embeds: Array) -> Array:
    """[B, 1 + P, Dv] -> float32 L2norm(vision_proj(every token)) [B, 1 + P, E]; CLS = [:, 0]."""
    return l2_normalize(self.vision_proj(image_embeds))

  def text_embeds(self, input_ids: Array, attention_mask: Array | None = None,
                  token_type_ids: Array | None = None, *, deterministic: bool = True) -> Array:
    """Mode "text": [B, L] ids -> token states of layer fusion_layer - 1 [B, L, D]."""
    return self.text_encoder(input_ids, attention_mask, token_type_ids, deterministic=deterministic,
                             mode="text")["last_hidden_state"]

  def text_feat(self, text_embeds: Array) -> Array:
    """[B, L, D] -> float32 L2norm(text_proj(CLS state)) [B, E]."""
    return l2_normalize(self.text_proj(text_embeds[:, 0]))

  def token_feats(self, token_states: Array) -> Array:
    """[B, L, D] -> float32 L2norm(text_proj(every token)) [B, L, E], unmasked (the seed's tokenwise
    baseline, `model_retrieval_tokenwise.py`: "w/o bagging layer")."""
    return l2_normalize(self.text_proj(token_states))

  def bag_feats(self, token_states: Array, bag_index: Array, bag_mask: Array) -> Array:
    """[B, L, D] states, int [B, L] bag index, [B, K] bag mask -> float32 [B, K, E]:
    L2norm(text_proj(bag sums)) * bag_mask (the seed's late fusion + its masking before TWC)."""
    bags = bag_sum(token_states, bag_index, bag_mask.shape[1])
    return l2_normalize(self.text_proj(bags)) * bag_mask[..., None].astype(jnp.float32)

  def early_fusion_text(self, input_ids: Array, bag_index: Array, bag_mask: Array, *,
                        deterministic: bool = True) -> tuple[Array, Array, Array]:
    """The seed's `embedbag_early_fusion`: the embedding output of the ids (word + position + token type 0,
    LayerNorm, dropout) summed per bag, then mode "text" over the K bags as `inputs_embeds` (the embedding
    block runs again: + position 0..K-1 + token type 0, LayerNorm, dropout) with `bag_mask` as attention
    mask. Returns (text_feat float32 [B, E] = L2norm(text_proj(state 0)), text_feats float32 [B, K, E] =
    L2norm(text_proj(states)) * bag_mask (masked, as the seed's forward does before TWC; text_feat is
    taken before masking), text_embeds [B, K, D] (the fusion input, with `bag_mask` as its mask))."""
    e = self.text_encoder(input_ids, deterministic=deterministic, mode="embeddings")["last_hidden_state"]
    bags = bag_sum(e, bag_index, bag_mask.shape[1])
    h = self.text_encoder(None, bag_mask, deterministic=deterministic, mode="text",
                          inputs_embeds=bags)["last_hidden_state"]
    feats = l2_normalize(self.text_proj(h))
    return feats[:, 0], feats * bag_mask[..., None].astype(jnp.float32), h

  def itm_logits(self, text_embeds: Array, text_mask: Array, image_embeds: Array, *,
                 deterministic: bool = True) -> Array:
    """Mode "fusion": text states [B, L, D] (mask [B, L]) cross-attending every image token
    [B, 1 + P, Dv] (mask all ones) -> float32 itm_head(CLS) [B, 2] (index 1 = match)."""
    h = self.text_encoder(None, text_mask, encoder_hidden_states=image_embeds, deterministic=deterministic,
                          cls_only_last_layer=True, mode="fusion",
                          encoder_embeds=text_embeds)["last_hidden_state"]
    return self.itm_head(h[:, 0]).astype(jnp.float32)

  def __call__(self, input_ids: Array, pixel_values: Array, attention_mask: Array | None = None, *,
               deterministic: bool = True) -> dict[str, Array]:
    img = self.image_embeds(pixel_values, deterministic=deterministic)
    txt = self.text_embeds(input_ids, attention_mask, deterministic=deterministic)
    mask = jnp.ones_like(input_ids) if attention_mask is None else attention_mask
    return {"image_feats": self.image_feats(img), "text_feat": self.text_feat(txt),
            "itm_logits": self.itm_logits(txt, mask, img, deterministic=deterministic),
            "temp": jnp.asarray(self.temp, jnp.float32)}


def init_params(model: BagFormer, rng: Array, seq_len: int = 8, image_size: int | None = None) -> dict:
  """Every param of `model` (boxed) from `rng`."""
  c = model.config
  size = image_size or c.vision.image_size
  ids = jnp.ones((1, seq_len), jnp.int32)
  px = jnp.zeros((1, size, size, c.vision.num_channels), jnp.float32)
  return model.init(rng, ids, px)["params"]
