"""BLIP-2 (Li et al. 2023, arXiv 2301.12597) image side: EVA ViT-g + Q-Former + query tokens + projection.

Mirrors the non-LLM modules of Hugging Face `Blip2ForConditionalGeneration` (as mBLIP, Geigle et al. 2023,
uses them to feed mT0 / BLOOMZ):
  vision_model         `vit.VisionTransformer` in BLIP's layout (HF `Blip2VisionModel`): patch conv with
                       bias, class token, learned positions, no pre-LN, pre-LN blocks with exact GELU,
                       `post_layernorm` on every token = `last_hidden_state` [B, 1 + N, Dv]; `pooler_output`
                       applies it once more to token 0 (HF does so too).
  query_tokens         param [1, Q, D] (Q = num_query_tokens, 32), broadcast over the batch.
  qformer              HF `Blip2QFormerModel`: `layernorm` + dropout on the query embeddings (no positions),
                       then BERT post-LN layers: self-attention over the queries, cross-attention to the
                       image tokens (keys / values Dv -> D) in layers i % cross_attention_frequency == 0, the
                       query FFN `intermediate_query` / `output_query`. Output [B, Q, D], no final norm.
  language_projection  Linear(D -> D_llm) with bias -> the LLM's visual prefix [B, Q, D_llm].

ViT attention: HF fuses q/k/v into `self_attn.qkv` ([3Dv, Dv]) whose bias is `concat(q_bias, k, v_bias)`;
EVA / LAVIS has no k bias at all (early HF checkpoints: `q_bias` / `v_bias` params), transformers >= 4.28
stores the full `qkv.bias` with a k third that starts at zero and is a trainable parameter. We keep
CLIP-style `q_proj` / `k_proj` / `v_proj` (+ `out_proj` = HF `projection`) each with a bias, as BLIP's ViT
(`models/blip.py`): the k bias is HF's k third, zero for LAVIS-layout checkpoints. A k bias adds q . b_k
to every logit of a query row, which the softmax cancels: it never changes an output.

Multi-image input (mBLIP's MaRVL / NLVR2 path): pixels [B, n, H, W, 3] run as B*n images; the prefix is
[B, n*Q, D_llm], image 0's Q queries first.

`dtype` is the compute dtype of every part; params stay float32 (`param_dtype`), which covers HF's
`_keep_in_fp32_modules` (query tokens, Q-Former) for their storage. Sizes at the defaults: ViT-g 985.95 M,
Q-Former + queries 105.16 M, projection 768 -> 2048 1.57 M.

Param paths mirror HF keys with `.` -> `/` and `layers.{i}` / `layer.{i}` -> `layers_{i}` / `layer_{i}`
(ViT attention aside, see above; `mmret_jax/convert/blip2.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmret_jax.models import blip, layers, vit

Array = jax.Array
Dtype = Any
MODEL_TYPE = "blip-2"
# Keys of an LLM config that give its width (T5 / mT5: d_model; BLOOM: hidden_size, older files n_embed).
_LLM_WIDTH_KEYS = ("hidden_size", "d_model", "n_embed", "n_embd")


def _image_size(v: Any) -> int:
  """HF allows an int or a (h, w) pair; we take square sizes only."""
  if isinstance(v, (list, tuple)):
    if len(v) != 2 or v[0] != v[1]:
      raise ValueError(f"only square images are supported, got image_size={v!r}")
    v = v[0]
  return int(v)


@dataclasses.dataclass(frozen=True)
class Blip2VisionConfig:
  """HF `Blip2VisionConfig` fields (EVA ViT-g/14 defaults)."""
  hidden_size: int = 1408
  intermediate_size: int = 6144
  num_hidden_layers: int = 39
  num_attention_heads: int = 16
  image_size: int = 224
  patch_size: int = 14
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-6
  attention_dropout: float = 0.0
  initializer_range: float = 1e-10  # HF's default; pretrained weights replace it
  qkv_bias: bool = True
  # Not a model property (never exported): other input sizes resize the position grid bicubically (HF
  # `interpolate_pos_encoding=True`); False = an error for any size but image_size.
  interpolate_pos_encoding: bool = False

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Blip2VisionConfig":
    kw = layers.fields_from_hf(cls, d)
    if "image_size" in kw:
      kw["image_size"] = _image_size(kw["image_size"])
    return cls(**kw)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d.pop("interpolate_pos_encoding")
    return {**d, "model_type": "blip_2_vision_model"}

  def to_vit(self) -> vit.ViTConfig:
    """Our ViT config in BLIP's layout (no pre-LN, patch bias, post-LN on every token)."""
    if not self.qkv_bias:
      raise ValueError("vision_config.qkv_bias=False (a ViT without q / v biases) is not supported")
    layout = {**blip.BLIP_VIT_LAYOUT, "interpolate_pos_encoding": self.interpolate_pos_encoding}
    return vit.ViTConfig(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                         num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                         image_size=self.image_size, patch_size=self.patch_size, hidden_act=self.hidden_act,
                         layer_norm_eps=self.layer_norm_eps, attention_dropout=self.attention_dropout,
                         initializer_range=self.initializer_range, **layout)


@dataclasses.dataclass(frozen=True)
class Blip2QFormerConfig:
  """HF `Blip2QFormerConfig` fields. vocab / positions / pad only matter with text input (not modelled)."""
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  initializer_range: float = 0.02
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  cross_attention_frequency: int = 2
  encoder_hidden_size: int = 1408
  use_qformer_text_input: bool = False

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Blip2QFormerConfig":
    return cls(**layers.fields_from_hf(cls, d))

  def to_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "model_type": "blip_2_qformer"}

  def has_cross_attention(self, layer: int) -> bool:
    """HF `Blip2QFormerLayer`: a cross-attention block in layers 0, f, 2f, ..."""
    return layer % self.cross_attention_frequency == 0


@dataclasses.dataclass(frozen=True)
class Blip2Config:
  """HF `Blip2Config` (model_type "blip-2"); `text_config` is the LLM's config dict, kept as given."""
  vision_config: Blip2VisionConfig = Blip2VisionConfig()
  qformer_config: Blip2QFormerConfig = Blip2QFormerConfig()
  num_query_tokens: int = 32
  text_config: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)
  image_text_hidden_size: int = 256
  image_token_index: int | None = None
  initializer_factor: float = 1.0
  initializer_range: float = 0.02

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Blip2Config":
    """From an HF `Blip2Config` dict (config.json). As HF, the Q-Former's encoder_hidden_size is set to
    the vision width."""
    mt = d.get("model_type", MODEL_TYPE)
    if mt != MODEL_TYPE:
      raise ValueError(f"Not a BLIP-2 config: model_type={mt!r} (expected {MODEL_TYPE!r})")
    vision = Blip2VisionConfig.from_dict(d.get("vision_config") or {})
    qformer = Blip2QFormerConfig.from_dict({**(d.get("qformer_config") or {}),
                                            "encoder_hidden_size": vision.hidden_size})
    top = {k: d[k] for k in ("num_query_tokens", "image_text_hidden_size", "image_token_index",
                             "initializer_factor", "initializer_range") if k in d}
    return cls(vision_config=vision, qformer_config=qformer, text_config=dict(d.get("text_config") or {}), **top)

  def to_dict(self) -> dict[str, Any]:
    """An HF `Blip2Config` dict (transformers' `Blip2Config.from_dict` reads it)."""
    return {"model_type": MODEL_TYPE, "vision_config": self.vision_config.to_dict(),
            "qformer_config": self.qformer_config.to_dict(), "text_config": dict(self.text_config),
            "num_query_tokens": self.num_query_tokens, "image_text_hidden_size": self.image_text_hidden_size,
            "image_token_index": self.image_token_index, "initializer_factor": self.initializer_factor,
            "initializer_range": self.initializer_range}

  @property
  def text_hidden_size(self) -> int:
    """The LLM width D_llm (the language projection's output size)."""
    for k in _LLM_WIDTH_KEYS:
      if self.text_config.get(k):
        return int(self.text_config[k])
    raise ValueError(f"text_config has no LLM width (none of {', '.join(_LLM_WIDTH_KEYS)}); "
                     f"keys: {sorted(self.text_config)[:12]}")

  def validate(self) -> None:
    """Clear errors for configs the modules cannot build."""
    v, q = self.vision_config, self.qformer_config
    for name, hidden, heads in (("vision_config", v.hidden_size, v.num_attention_heads),
                                ("qformer_config", q.hidden_size, q.num_attention_heads)):
      if heads < 1 or hidden % heads:
        raise ValueError(f"{name}.hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    v.to_vit()  # qkv_bias
    if v.image_size % v.patch_size:
      raise ValueError(f"vision_config.image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
    if q.use_qformer_text_input:
      raise ValueError("qformer_config.use_qformer_text_input=True (Q-Former text input, the retrieval "
                       "model) is not supported: only the query path of the generation model")
    if q.cross_attention_frequency < 1:
      raise ValueError(f"qformer_config.cross_attention_frequency must be >= 1, got {q.cross_attention_frequency}")
    if q.encoder_hidden_size != v.hidden_size:
      raise ValueError(f"qformer_config.encoder_hidden_size {q.encoder_hidden_size} != vision_config.hidden_size "
                       f"{v.hidden_size}")
    if self.num_query_tokens < 1:
      raise ValueError(f"num_query_tokens must be >= 1, got {self.num_query_tokens}")
    for name, act in (("vision_config", v.hidden_act), ("qformer_config", q.hidden_act)):
      layers.get_activation(act)


PRESETS = {
    # Salesforce/blip2-flan-t5-xl's vision + Q-Former with the mT0-XL / flan-t5-xl width (mBLIP mT0).
    "blip2-mt0-xl": Blip2Config(text_config={"model_type": "mt5", "d_model": 2048}),
    "blip2-bloomz-7b1": Blip2Config(text_config={"model_type": "bloom", "hidden_size": 4096}),
}


class QFormerAttention(nn.Module):
  """HF `Blip2QFormerAttention`: `attention` (query / key / value, softmax) then `output` (dense, dropout,
  LayerNorm(. + x)). Cross-attention: keys / values from `kv` [B, S, Dkv]."""
  config: Blip2QFormerConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, kv: Array | None = None, mask: Array | None = None,
               deterministic: bool = True) -> Array:
    """x: [B, L, D]; kv: [B, S, Dkv] or None (self-attention); mask: bool [B|1, 1, 1, S] -> [B, L, D]."""
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, init_std=c.initializer_range)
    ctx = layers.Attention(c.num_attention_heads, c.hidden_size, dropout_rate=c.attention_probs_dropout_prob,
                           name="attention", **kw)(x, kv, mask, deterministic)
    return layers.ResidualPostLN(c.hidden_size, epsilon=c.layer_norm_eps, dropout_rate=c.hidden_dropout_prob,
                                 name="output", **kw)(ctx, x, deterministic)


class QFormerLayer(nn.Module):
  """HF `Blip2QFormerLayer` on query tokens only: self-attention, cross-attention (if `cross_attention`),
  then the query FFN `intermediate_query` (dense + act) / `output_query` (dense, dropout, residual LN)."""
  config: Blip2QFormerConfig
  cross_attention: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: Array, image: Array, image_mask: Array | None, deterministic: bool = True) -> Array:
    """h: [B, Q, D]; image: [B, S, Dv]; image_mask: bool [B|1, 1, 1, S] or None -> [B, Q, D]."""
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.constrain(h, ("batch", "length", "embed"))
    h = QFormerAttention(c, name="attention", **kw)(h, None, None, deterministic)
    if self.cross_attention:
      h = QFormerAttention(c, name="crossattention", **kw)(h, image, image_mask, deterministic)
    inter = layers.DenseAct(c.intermediate_size, c.hidden_act, name="intermediate_query",
                            init_std=c.initializer_range, **kw)(h)
    out = layers.ResidualPostLN(c.hidden_size, in_axis="mlp", epsilon=c.layer_norm_eps,
                                dropout_rate=c.hidden_dropout_prob, init_std=c.initializer_range,
                                name="output_query", **kw)(inter, h, deterministic)
    return layers.constrain(out, ("batch", "length", "embed"))


class QFormerEncoder(nn.Module):
  """HF `Blip2QFormerEncoder`: `layer_{i}` blocks; returns the state after each block."""
  config: Blip2QFormerConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, h: Array, image: Array, image_mask: Array | None, deterministic: bool = True) -> list[Array]:
    c = self.config
    # static_argnums counts `self` as 0: argument 4 is `deterministic`.
    block = nn.remat(QFormerLayer, static_argnums=(4,)) if self.remat else QFormerLayer
    states = []
    for i in range(c.num_hidden_layers):
      h = block(c, c.has_cross_attention(i), self.dtype, self.param_dtype, name=f"layer_{i}")(
          h, image, image_mask, deterministic)
      states.append(h)
    return states


class QFormerModel(nn.Module):
  """HF `Blip2QFormerModel` (query path). Returns `last_hidden_state` [B, Q, D], `pooler_output` [B, D]
  (token 0, as HF), and with `output_hidden_states` the embedding output and every layer's."""
  config: Blip2QFormerConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, query_embeds: Array, encoder_hidden_states: Array, encoder_attention_mask: Array | None = None,
               *, deterministic: bool = True, output_hidden_states: bool = False) -> dict[str, Array]:
    """query_embeds: [B, Q, D]; encoder_hidden_states: [B, S, Dv]; encoder_attention_mask: [B, S] (1 =
    attend; None = all)."""
    c = self.config
    if query_embeds.ndim != 3 or query_embeds.shape[-1] != c.hidden_size:
      raise ValueError(f"query_embeds must be [B, Q, {c.hidden_size}], got {query_embeds.shape}")
    if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != c.encoder_hidden_size:
      raise ValueError(f"encoder_hidden_states must be [B, S, {c.encoder_hidden_size}], "
                       f"got {encoder_hidden_states.shape}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h0 = layers.LayerNorm(c.layer_norm_eps, name="layernorm", **kw)(query_embeds)
    h0 = layers.Dropout(c.hidden_dropout_prob)(h0, deterministic)
    mask = None if encoder_attention_mask is None else layers.attention_bias_from_mask(encoder_attention_mask)
    states = QFormerEncoder(c, remat=self.remat, name="encoder", **kw)(
        h0, encoder_hidden_states.astype(self.dtype), mask, deterministic)
    h = states[-1] if states else h0
    out = {"last_hidden_state": h, "pooler_output": h[:, 0]}
    if output_hidden_states:
      out["hidden_states"] = (h0, *states)
    return out


class Blip2VisionQFormer(nn.Module):
  """The image side of `Blip2ForConditionalGeneration`: `vision_model`, `query_tokens`, `qformer`,
  `language_projection` (left out with `add_language_projection=False`).

  Methods: `image_embeds`, `qformer_outputs`, `query_embeds`; `__call__` returns every intermediate
  output (and initialises every param). Pixels are NHWC [B, H, W, 3] or [B, n, H, W, 3] (n images per
  example)."""
  config: Blip2Config
  add_language_projection: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.vision_model = vit.VisionTransformer(c.vision_config.to_vit(), remat=self.remat, **kw)
    q = c.qformer_config
    self.query_tokens = layers.logical_param(self, "query_tokens", (1, c.num_query_tokens, q.hidden_size),
                                             (None, None, "embed"), nn.initializers.normal(q.initializer_range),
                                             self.param_dtype)
    self.qformer = QFormerModel(q, remat=self.remat, **kw)
    if self.add_language_projection:
      # Output axis "embed": the LLM's embedding sharding; input axis "mlp" keeps the two apart.
      self.language_projection = layers.Dense(c.text_hidden_size, ("mlp", "embed"), init_std=c.initializer_range,
                                              **kw)

  def _flat_images(self, pixel_values: Array) -> tuple[Array, tuple[int, ...]]:
    """[B, H, W, C] or [B, n, H, W, C] -> ([B * n, H, W, C], leading dims (B,) or (B, n))."""
    if pixel_values.ndim == 4:
      return pixel_values, pixel_values.shape[:1]
    if pixel_values.ndim == 5:
      return pixel_values.reshape(-1, *pixel_values.shape[2:]), pixel_values.shape[:2]
    raise ValueError(f"pixel_values must be [B, H, W, C] or [B, n_images, H, W, C], got {pixel_values.shape}")

  def image_embeds(self, pixel_values: Array, *, deterministic: bool = True) -> Array:
    """[B, (n,) H, W, 3] -> vision `last_hidden_state` [B, (n,) 1 + N, Dv]."""
    px, lead = self._flat_images(pixel_values)
    h = self.vision_model(px, deterministic=deterministic)["last_hidden_state"]
    return h.reshape(*lead, *h.shape[1:])

  def qformer_outputs(self, image_embeds: Array, *, deterministic: bool = True) -> Array:
    """Image tokens [B, (n,) S, Dv] -> Q-Former `last_hidden_state` [B, (n,) Q, D] (learned queries, image
    mask all ones, as HF `get_image_features`)."""
    lead = image_embeds.shape[:-2]
    img = image_embeds.reshape(-1, *image_embeds.shape[-2:])
    queries = jnp.broadcast_to(self.query_tokens.astype(self.dtype), (img.shape[0], *self.query_tokens.shape[1:]))
    h = self.qformer(queries, img, deterministic=deterministic)["last_hidden_state"]
    return h.reshape(*lead, *h.shape[1:])

  def project(self, query_output: Array) -> Array:
    """Q-Former states [B, (n,) Q, D] -> the LLM prefix [B, n * Q, D_llm] (images in order)."""
    self._check_projection()
    b, d = query_output.shape[0], query_output.shape[-1]
    return self.language_projection(query_output.reshape(b, -1, d))

  def _check_projection(self) -> None:
    if not self.add_language_projection:
      raise ValueError("this model has no language_projection (built with add_language_projection=False)")

  def query_embeds(self, pixel_values: Array, *, deterministic: bool = True) -> Array:
    """[B, H, W, 3] -> [B, Q, D_llm]; [B, n, H, W, 3] -> [B, n * Q, D_llm] (mBLIP's visual prefix)."""
    self._check_projection()
    img = self.image_embeds(pixel_values, deterministic=deterministic)
    return self.project(self.qformer_outputs(img, deterministic=deterministic))

  def __call__(self, pixel_values: Array, *, deterministic: bool = True) -> dict[str, Array]:
    """Every output: `image_embeds` [B, (n,) S, Dv], `vision_pooler_output` [B, (n,) Dv] (HF pooler: the
    post-LN applied twice to token 0), `qformer_last_hidden_state` [B, (n,) Q, D], and `query_embeds`
    [B, n * Q, D_llm] when the model has the projection."""
    px, lead = self._flat_images(pixel_values)
    vis = self.vision_model(px, deterministic=deterministic)
    img = vis["last_hidden_state"]
    q = self.qformer_outputs(img, deterministic=deterministic)
    out = {"image_embeds": img.reshape(*lead, *img.shape[1:]),
           "vision_pooler_output": vis["pooler_output"].reshape(*lead, -1),
           "qformer_last_hidden_state": q.reshape(*lead, *q.shape[1:])}
    if self.add_language_projection:
      out["query_embeds"] = self.project(out["qformer_last_hidden_state"])
    return out


def init_params(model: Blip2VisionQFormer, rng: Array) -> dict:
  """Every param of `model` (boxed) from `rng`."""
  v = model.config.vision_config
  return model.init(rng, jnp.zeros((1, v.image_size, v.image_size, 3), jnp.float32))["params"]
