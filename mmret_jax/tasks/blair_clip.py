"""BLaIR-CLIP: a RoBERTa text tower (BLaIR-initialisable) beside a CLIP vision tower.

Facts from the third-party fork `aokhader/BLAIR-MultiModal`, `blair/multimodal/blair_clip.py`
(shared/reference/blair.md §7):
  t = normalize(Linear_with_bias(mlp(CLS(review))))    text side, MLP always applied in training
  v = normalize(Linear_with_bias(CLIPVision.pooler_output))   CLIP's own visual projection unused
  L_clip = (CE(s t v^T) + CE(s v t^T)) / 2, s = min(exp(logit_scale), 100), logit_scale = log(1/0.07)
  L_tt = the same symmetric CE between review and meta with its own scale, init log(1/temp)
  L = L_clip + mm_text_text_weight * L_tt + mlm_weight * MLM
Negatives span the global batch. A missing / corrupt image (or an empty image path, an image
`prepare_blair --images` could not download) skips its row, counted (`data.missing_images = "skip"`),
or, as the fork does, is fed as a black image, counted (`"black"`).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from mmret_jax import convert, losses
from mmret_jax.data import image as image_lib, pipeline
from mmret_jax.data.sources.amazon_reviews import MultimodalPairsSource
from mmret_jax.models import layers, vit
from mmret_jax.tasks.blair import BlairTask, TokenizePairs, pad_rows

VISION_PRESETS = {
    **vit.PRESETS,
    # From-scratch smoke runs: 32x32 images, 16 patches.
    "tiny": vit.ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          image_size=32, patch_size=8, initializer_range=0.1),
}


class _Heads(nn.Module):
  """Projections and scales of the twin tower (names as the fork: text_projection, image_projection)."""
  projection_dim: int
  temperature_init: float
  text_temp: float

  @nn.compact
  def __call__(self, text: jax.Array, image: jax.Array):
    t = layers.Dense(self.projection_dim, ("embed", "mlp"), name="text_projection")(text)
    v = layers.Dense(self.projection_dim, ("embed", "mlp"), name="image_projection")(image)
    scale = layers.logical_param(self, "logit_scale", (), (),
                                 nn.initializers.constant(math.log(1.0 / self.temperature_init)))
    tt_scale = layers.logical_param(self, "text_text_logit_scale", (), (),
                                    nn.initializers.constant(math.log(1.0 / self.text_temp)))
    return t, v, scale, tt_scale


class _BlackImage(grain.transforms.Map):
  """A row whose image failed (image_ok False) gets `black` (a black image after normalisation)."""

  def __init__(self, black: np.ndarray):
    self.black = black

  def map(self, row):
    return row if bool(row["image_ok"]) else {**row, "image": self.black}


class BlairClipTask(BlairTask):
  """`config.task = "blair_clip"`."""

  def __init__(self, config, mesh, workdir):
    super().__init__(config, mesh, workdir)
    mm = config.mm
    self._vision_pretrained = None
    if mm.clip_model_name:
      path = convert.resolve_pretrained(mm.clip_model_name)
      meta, hf_config, params, _ = convert.load_any(path)
      if meta.get("family") != "clip":
        raise ValueError(f"mm.clip_model_name {mm.clip_model_name} is a {meta.get('family')} model, not CLIP")
      self.vision_config = vit.ViTConfig.from_dict(hf_config.get("vision_config") or {})
      self._vision_pretrained = params["vision_model"]
      pre = pathlib.Path(path) / "preprocessor_config.json"
      self.image_config = (image_lib.ImageConfig.from_preprocessor_config(pre) if pre.exists()
                           else image_lib.ImageConfig.clip_default(self.vision_config.image_size))
    else:
      if mm.vision_preset not in VISION_PRESETS:
        raise ValueError(f"mm.vision_preset must be one of {sorted(VISION_PRESETS)}, got {mm.vision_preset!r}")
      self.vision_config = VISION_PRESETS[mm.vision_preset]
      self.image_config = image_lib.ImageConfig.clip_default(self.vision_config.image_size)
    kw = dict(dtype=jnp.dtype(config.model.dtype), remat=bool(config.model.remat))
    self.vision = vit.VisionTransformer(self.vision_config, **kw)
    self.heads = _Heads(int(mm.projection_dim), float(mm.temperature_init), float(config.loss.temp))
    self._bad_images = pipeline.SkipCounter()

  def freeze_patterns(self) -> tuple[str, ...]:
    """`mm.freeze_clip_tower` freezes the vision tower; `mm.freeze_text_tower` the RoBERTa encoder
    (embeddings + blocks; its `mlp` / `lm_head` heads and the projections keep training, as the fork)."""
    out = ()
    if self.config.mm.freeze_clip_tower:
      out += (r"^vision/",)
    if self.config.mm.freeze_text_tower:
      out += (r"^encoder/(embeddings|encoder)/",)
    return out

  def make_source(self):
    d = self.config.data
    return MultimodalPairsSource(d.train_file, d.image_column, d.image_root,
                                 keep_missing_images=self._missing_mode() == "black")

  def _missing_mode(self) -> str:
    mode = str(self.config.data.get("missing_images", "skip"))
    if mode not in ("skip", "black"):
      raise ValueError(f"data.missing_images must be 'skip' or 'black', got {mode!r}")
    return mode

  # ----------------------------------------------------------------------------- params
  def init_params(self, rng):
    r_text, r_vis, r_heads = jax.random.split(rng, 3)
    params = {"encoder": super().init_params(r_text)["encoder"]}
    c = self.vision_config
    px = jnp.zeros((1, c.image_size, c.image_size, c.num_channels), jnp.float32)
    params["vision"] = self.vision.init(r_vis, px)["params"]
    params["heads"] = self.heads.init(r_heads, jnp.zeros((1, self.model_config.hidden_size)),
                                      jnp.zeros((1, c.hidden_size)))["params"]
    return params

  def load_init(self, params):
    params = super().load_init(params)
    if self._vision_pretrained is not None:
      ours = params["vision"]
      src = self._vision_pretrained
      bad = [p for p, a, b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(ours),
                                  jax.tree.leaves(src)) if a.shape != b.shape]
      if jax.tree.structure(ours) != jax.tree.structure(src) or bad:
        raise ValueError(f"mm.clip_model_name vision tower does not match the model ({bad[:3]})")
      params = {**params, "vision": jax.tree.map(lambda a, b: np.asarray(b, a.dtype), ours, src)}
    return params

  # ----------------------------------------------------------------------------- data
  def train_iterator(self, per_process_batch: int):
    ds = self.train_rows().map(image_lib.PreprocessImage(self.image_config))
    ds = ds.map(_TokenizeKeepImage(self.tokenizer, int(self.config.data.max_seq_length)))
    it = ds.to_iter_dataset(self.read_options())  # filter before batch needs an IterDataset (grain)
    # Rows whose image failed to load are dropped ("skip") or get a black image ("black"); the count
    # travels in the iterator's checkpoint.
    black = self._missing_mode() == "black"
    if black:
      it = it.map(_BlackImage(image_lib.black_image(self.image_config)))
    it = pipeline.CountedFilter(it, lambda row: bool(row["image_ok"]), self._bad_images, drop=not black)
    return iter(it.batch(per_process_batch, drop_remainder=True))

  @property
  def images_skipped(self) -> int:
    """Training rows dropped (or, with data.missing_images=black, given a black image) so far on this
    process for a missing / unreadable image (kept across resumes: the count is part of the data
    iterator's checkpointed state)."""
    return self._bad_images.count

  # ----------------------------------------------------------------------------- loss
  def towers(self, params, batch, rng, train: bool):
    """-> (review t [B, P], meta t [B, P], image v [B, P], scale, text-text scale); t, v normalised."""
    b = batch["review_ids"].shape[0]
    r_text, r_vis = jax.random.split(rng)
    ids = jnp.concatenate([batch["review_ids"], batch["meta_ids"]], 0)
    mask = jnp.concatenate([batch["review_mask"], batch["meta_mask"]], 0)
    z = self.embed(params, ids, mask, r_text, train=train)  # MLP head on CLS, as the fork in training
    pooled = self.vision.apply({"params": params["vision"]}, batch["image"], deterministic=not train,
                               rngs={"dropout": r_vis} if train else None)["pooler_output"]
    t, v, s, s_tt = self.heads.apply({"params": params["heads"]}, z, pooled)
    t, v = losses.l2_normalize(t), losses.l2_normalize(v)
    return t[:b], t[b:], v, jnp.minimum(jnp.exp(s), 100.0), jnp.minimum(jnp.exp(s_tt), 100.0)

  def loss_fn(self, params, batch, rng, train: bool = True):
    mm, lc = self.config.mm, self.config.loss
    r_towers, r_mask, r_drop2 = jax.random.split(rng, 3)
    t, meta, v, scale, tt_scale = self.towers(params, batch, r_towers, train)
    clip = self.contrastive(t, v, scale, True, normalized=True)
    aux = {"clip_loss": clip, "temperature": 1.0 / scale,
           "tokens": (batch["review_mask"].sum() + batch["meta_mask"].sum()).astype(jnp.float32)}
    loss = clip
    if float(mm.text_text_weight) > 0:
      tt = self.contrastive(t, meta, tt_scale, True, normalized=True)
      aux["text_text_loss"] = tt
      loss = loss + float(mm.text_text_weight) * tt
    if lc.do_mlm and train and float(lc.mlm_weight) > 0:
      ids = jnp.concatenate([batch["review_ids"], batch["meta_ids"]], 0)
      mask = jnp.concatenate([batch["review_mask"], batch["meta_mask"]], 0)
      aux["mlm_loss"], extra = self.mlm_loss(params, ids, mask, r_mask, r_drop2)
      aux.update(extra)
      loss = loss + float(lc.mlm_weight) * aux["mlm_loss"]
    return loss, aux

  def grad_cache_parts(self):
    """`train/grad_cache.Parts` of `loss_fn` (train=True): chunks encode the normalised review / meta / image
    vectors (and the MLM sums); the CLIP and text-text losses over the whole batch read the two logit scales
    from the params themselves."""
    from mmret_jax.train import grad_cache  # pylint: disable=import-outside-toplevel
    mm = self.config.mm

    def encode(params, chunk, rng):
      r_towers, _, r_drop2 = jax.random.split(rng, 3)
      t, meta, v, _, _ = self.towers(params, chunk, r_towers, True)
      ids = jnp.concatenate([chunk["review_ids"], chunk["meta_ids"]], 0)
      mask = jnp.concatenate([chunk["review_mask"], chunk["meta_mask"]], 0)
      return {"rows": {"review": t, "meta": meta, "image": v},
              "sums": self.gc_text_sums(params, chunk, ids, mask, r_drop2)}

    def loss(params, reps, batch, rng):
      del batch, rng
      r, s = reps["rows"], reps["sums"]
      h = params["heads"]
      scale = jnp.minimum(jnp.exp(h["logit_scale"]), 100.0)
      clip = self.contrastive(r["review"], r["image"], scale, True, normalized=True)
      aux = {"clip_loss": clip, "temperature": 1.0 / scale, "tokens": s["tokens"]}
      out = clip
      if float(mm.text_text_weight) > 0:
        tt_scale = jnp.minimum(jnp.exp(h["text_text_logit_scale"]), 100.0)
        tt = self.contrastive(r["review"], r["meta"], tt_scale, True, normalized=True)
        aux["text_text_loss"] = tt
        out = out + float(mm.text_text_weight) * tt
      return self.gc_add_mlm(out, aux, s)
    return grad_cache.Parts(encode, loss)

  # ----------------------------------------------------------------------------- eval
  def evaluate(self, params) -> dict[str, float]:
    """Held-out review -> image retrieval (pool: the held-out rows' distinct images) and the reverse."""
    from mmret_jax.eval import retrieval  # pylint: disable=import-outside-toplevel
    c = self.config
    rows = [self.source[int(i)] for i in self.valid_idx[:int(c.data.eval_max_pairs)]]
    pixels, kept, errors = image_lib.preprocess_batch([r["image_path"] for r in rows], self.image_config,
                                                      on_error="skip")
    rows = [rows[i] for i in kept]
    if not rows:
      return {"eval_images_skipped": float(len(errors))}
    if not hasattr(self, "_eval_embed"):
      def review_and_image(p, b):
        t, _, v, _, _ = self.towers(p, b, jax.random.PRNGKey(0), train=False)
        return t, v
      self._eval_embed = jax.jit(review_and_image)
    tok = TokenizePairs(self.tokenizer, int(c.data.max_seq_length))
    bs = int(c.data.eval_batch_size)
    ts, vs = [], []
    for s in range(0, len(rows), bs):
      chunk = rows[s:s + bs]
      enc = [tok.map(r) for r in chunk]
      n = len(chunk)
      batch = {k: pad_rows(np.stack([e[k] for e in enc]), bs) for k in enc[0] if k != "index"}
      batch["image"] = pad_rows(pixels[s:s + n], bs)
      t, v = self._eval_embed(params, batch)
      ts.append(np.asarray(t)[:n])
      vs.append(np.asarray(v)[:n])
    t, v = np.concatenate(ts), np.concatenate(vs)
    paths = [r["image_path"] for r in rows]
    uniq = sorted(set(paths))
    pos = {p: i for i, p in enumerate(uniq)}
    first = [paths.index(p) for p in uniq]
    ks = tuple(int(k) for k in c.eval.ks)
    out = {f"t2i/{k}": val for k, val in retrieval.evaluate_text_retrieval(
        t, v[first], [{pos[p]} for p in paths], ks).items()}
    out["num_images"] = float(len(uniq))
    out["images_skipped"] = float(len(errors))
    out["train_images_skipped"] = float(self.images_skipped)
    return out

  def export(self, params, dst) -> None:
    """Writes the text encoder as a converted dir (as BLaIR does; `embed --model WORKDIR` reads it)
    plus the full twin-tower params (Orbax) under `twin_tower/`."""
    super().export(params, dst)
    from mmret_jax.convert.core import save_params  # pylint: disable=import-outside-toplevel
    save_params(pathlib.Path(dst) / "twin_tower", jax.device_get(params))


@dataclasses.dataclass(frozen=True)
class _TokenizeKeepImage(grain.transforms.Map):
  """TokenizePairs that keeps the image fields."""
  tokenizer: Any
  max_length: int

  def map(self, row):
    out = TokenizePairs(self.tokenizer, self.max_length).map(row)
    out["image"], out["image_ok"] = row["image"], row["image_ok"]
    return out
