"""BagFormer (Hou et al., arXiv 2212.14322) fine-tuning on MUGE (`config.task = "bagformer"`).

The seed's `train_muge.py` (shared/reference/bagformer.md): one (image, query) example per (query, item)
pair of `MR_train_queries.jsonl`, shuffled per epoch, the last partial batch dropped. Queries are
tokenised to 25 tokens (padding to max_length; truncated, where the seed's training call would fail on
a longer query), bagged on the host (data/bagging.py, `bagging.mode` faithful | fixed, per process
batch as the seed's per-GPU batch), images decoded from the base64 TSV and given the seed's training
transform (`data.augment = "bagformer"`: RandomResizedCrop(256, 0.5-1, bicubic), flip, RandomAugment(2, 7);
data/augment.py), drawn per (seed, epoch, pair) so a resumed run sees the same pixels.

Loss = ITA + ITM + TWC with unit weights (`model.interaction = "bagwise"`): ITA on the CLS features
with the learnable temperature clamped to [0.05, 0.5]; TWC, the bag-wise late-interaction contrast
(no temperature); ITM over B positives and 2B negatives drawn uniformly in the batch. The seed's
baselines: `cls_token` (ITA + ITM) and `tokenwise` (TWC over all L projected token states, unmasked) —
trained in-batch here: the seed's baselines also contrast against a never-updated random queue, which
is left out.

Evaluation (`eval.split`, default valid) is `eval/bagformer.py`: first-stage scores over the whole pool
in blocks, ITM re-ranking of the top `eval.k_test`, the three score sets and MUGE recall.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from mmret_jax import convert, losses, storage
from mmret_jax.data import augment, bagging
from mmret_jax.data import image as image_lib
from mmret_jax.data import text as text_lib
from mmret_jax.data.pipeline import epoch_batches
from mmret_jax.data.sources import muge
from mmret_jax.models import bagformer, bert, blip, vit
from mmret_jax.tasks.base import Task, fill_from, load_family_dir

SETTINGS_FILE = "bagformer.json"
INTERACTIONS = ("bagwise", "cls_token", "tokenwise")
DICT_FILE = "entity_dict.txt"


def image_config(size: int) -> image_lib.ImageConfig:
  """The seed's test transform: Resize((size, size), bicubic), CLIP mean / std."""
  return image_lib.ImageConfig(size=(size, size), crop_size=None, do_center_crop=False, alpha="drop")


class BagFormerInputs:
  """Queries -> ids / masks / bags; MUGE images -> pixels (train augmentation when keyed)."""

  def __init__(self, tokenizer, bagger: bagging.EntityBagger, image_size: int, max_length: int = 25):
    self.tokenizer, self.bagger, self.max_length = tokenizer, bagger, max_length
    self.image_cfg = image_config(image_size)
    self.bad_images = 0

  def texts(self, texts) -> dict[str, np.ndarray]:
    enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length)
    ids = np.asarray(enc["input_ids"], np.int32)
    out = {"ids": ids, "mask": np.asarray(enc["attention_mask"], np.int32)}
    bags = self.bagger(ids)
    out["bag_index"], out["bag_mask"] = bags["bag_index"], bags["bag_mask"]
    return out

  def images(self, imgs, augment_keys=None) -> np.ndarray:
    """PIL images (None = undecodable: a zeros image after normalisation, counted) -> [N, H, W, 3]."""
    h, w = self.image_cfg.output_hw
    pixels = np.zeros((len(imgs), h, w, 3), np.float32)
    idx = [i for i, im in enumerate(imgs) if im is not None]
    self.bad_images += len(imgs) - len(idx)
    if idx:
      aug = None
      if augment_keys is not None:
        aug = augment.keyed(augment.bagformer_train, [augment_keys[i] for i in idx], size=h)
      batch, kept, errors = image_lib.preprocess_batch([imgs[i] for i in idx], self.image_cfg, on_error="skip",
                                                       num_threads=4, augment=aug)
      self.bad_images += len(errors)
      for row, k in zip(batch, kept):
        pixels[idx[k]] = row
    return pixels


def scratch_config(c, vocab_size: int) -> bagformer.BagFormerConfig:
  """A from-scratch BagFormer for `:smoke` runs (`config.model` sizes)."""
  m = c.model
  width, layers, heads, size = int(m.width), int(m.layers), int(m.heads), int(c.data.image_size)
  vision = vit.ViTConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                         num_attention_heads=heads, image_size=size, patch_size=int(m.patch_size), hidden_act="gelu",
                         layer_norm_eps=1e-6, **blip.BLIP_VIT_LAYOUT)
  text = bert.BertConfig(vocab_size=vocab_size, hidden_size=width, num_hidden_layers=2 * layers,
                         num_attention_heads=heads, intermediate_size=4 * width,
                         max_position_embeddings=int(c.data.max_length) + 2, type_vocab_size=2,
                         add_cross_attention=True, fusion_layer=layers, encoder_width=width, pad_token_id=0,
                         hidden_dropout_prob=float(m.dropout), attention_probs_dropout_prob=float(m.dropout))
  return bagformer.BagFormerConfig(vision=vision, text=text, embed_dim=int(m.embed_dim))


def load_bagformer_dir(path: pathlib.Path, what: str):
  """(the dir, BagFormerConfig, params) of a converted BagFormer dir or a training workdir (`model/`)."""
  path, hf_config, params = load_family_dir(path, "bagformer", what, "convert the released checkpoint with "
                                            "`python -m mmret_jax.convert to-jax SRC DST --family bagformer "
                                            "--tokenizer DIR`")
  return path, bagformer.BagFormerConfig.from_dict(hf_config), params


class BagFormerTask(Task):
  """`config.task = "bagformer"`; `model.interaction` bagwise | cls_token | tokenwise."""

  def __init__(self, config, mesh, workdir):
    super().__init__(config, mesh, workdir)
    c = config
    self.is_main = jax.process_index() == 0
    if str(c.model.interaction) not in INTERACTIONS:
      raise ValueError(f"model.interaction must be one of {INTERACTIONS}, got {c.model.interaction!r}")
    if str(c.model.fusion_strategy) not in bagformer.FUSION_STRATEGIES:
      raise ValueError(f"model.fusion_strategy must be one of {bagformer.FUSION_STRATEGIES}, "
                       f"got {c.model.fusion_strategy!r}")
    if str(c.data.augment) not in ("none", "bagformer"):
      raise ValueError(f"data.augment must be 'none' or 'bagformer' (the seed's training transform), "
                       f"got {c.data.augment!r}")
    if str(c.bagging.mode) not in bagging.MODES:
      raise ValueError(f"bagging.mode must be one of {bagging.MODES}, got {c.bagging.mode!r}")
    self.root = pathlib.Path(str(c.data.root)) if c.data.root else muge.sample_root()
    if not c.data.root and self.is_main:
      print(f"note: data.root is empty: training on the bundled MUGE sample ({self.root})", file=sys.stderr)
    self.train = muge.MugeSplit(self.root, "train")  # logs what it skipped
    self.pairs = self.train.pairs
    if c.data.check_images:
      self.pairs = self._decodable(self.pairs)
    if not len(self.pairs):
      raise ValueError(f"no (query, image) training pair in {self.root}")
    self._setup_model()

  def _decodable(self, pairs: np.ndarray) -> np.ndarray:
    """Drops (and counts) the pairs whose image does not decode: one threaded pass over the train pool."""
    from concurrent.futures import ThreadPoolExecutor  # pylint: disable=import-outside-toplevel
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    rows = np.unique(pairs[:, 1])
    table = self.train.images
    with ThreadPoolExecutor(max(1, int(self.config.data.num_threads))) as ex:
      ok = list(tqdm(ex.map(lambda r: table.load_at(int(r)) is not None, rows), total=len(rows), unit="image",
                     desc="checking train images", disable=not self.is_main or len(rows) < 5000))
    bad = set(rows[~np.asarray(ok, bool)].tolist())
    if not bad:
      return pairs
    keep = np.asarray([int(i) not in bad for i in pairs[:, 1]], bool)
    if self.is_main:
      print(f"note: {len(bad)} training images do not decode ({table.report()}); "
            f"{int((~keep).sum())} of {len(pairs)} pairs skipped", file=sys.stderr)
    return pairs[keep]

  def _setup_model(self):
    c = self.config
    self._pretrained = None
    if c.init_from:
      path, self.model_config, self._pretrained = load_bagformer_dir(convert.resolve_pretrained(str(c.init_from)),
                                                                     f"init_from {c.init_from}")
      self.tokenizer = text_lib.load_tokenizer(str(c.tokenizer) or path)
    else:
      self.tokenizer = (text_lib.load_tokenizer(str(c.tokenizer)) if c.tokenizer
                        else muge.bert_tokenizer(self.root / "vocab.txt"))  # the bundled sample's vocab
      self.model_config = scratch_config(c, len(self.tokenizer))
    self.model = bagformer.BagFormer(self.model_config, dtype=jnp.dtype(c.model.dtype), remat=bool(c.model.remat))
    dict_path = str(c.bagging.dictionary) or str(self.root / DICT_FILE)
    self.dict_path = dict_path
    self.bagger = bagging.EntityBagger.from_tokenizer(dict_path, self.tokenizer, mode=str(c.bagging.mode))
    if self.is_main:
      print(f"note: {self.bagger.report.line()} ({dict_path}, bagging.mode={c.bagging.mode})", file=sys.stderr)
    size = int(c.data.image_size) or self.model_config.vision.image_size
    self.inputs = BagFormerInputs(self.tokenizer, self.bagger, size, int(c.data.max_length))

  # --------------------------------------------------------------------------- Task API
  @property
  def num_train_examples(self) -> int:
    return len(self.pairs)

  def steps_per_epoch(self, global_batch: int) -> int:
    return len(self.pairs) // global_batch

  def init_params(self, rng):
    return bagformer.init_params(self.model, rng, seq_len=int(self.config.data.max_length))

  def load_init(self, params):
    return params if self._pretrained is None else fill_from(params, self._pretrained)

  def post_update(self, params):
    """The seed clamps the temperature in place before every forward: here after every update."""
    c = self.config.model
    return {**params, "temp": jnp.clip(params["temp"], float(c.temp_min), float(c.temp_max))}

  def train_iterator(self, per_process_batch: int):
    d = self.config.data
    return epoch_batches(len(self.pairs), int(self.config.seed), per_process_batch * jax.process_count(),
                         per_process_batch, lambda sel, epoch: self.make_batch(sel, epoch), int(d.num_threads),
                         int(d.prefetch))

  def make_batch(self, sel: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
    pairs = self.pairs[sel]
    texts = [self.train.queries[int(q)].text for q, _ in pairs]
    imgs = [self.train.images.load_at(int(i)) for _, i in pairs]
    keys = None
    if str(self.config.data.augment) == "bagformer":
      keys = [(int(self.config.seed), epoch, int(r)) for r in sel]
    out = self.inputs.texts(texts)
    out["pixels"] = self.inputs.images(imgs, keys)
    out["index"] = np.asarray(sel, np.int64).copy()
    return out

  def text_side(self, params, batch, deterministic, rng=None):
    """(text_embeds [B, L, D], attention mask for the fusion pass, text_feat [B, E], text token features)."""
    m, c = self.model, self.config.model
    kw = dict(deterministic=deterministic, rngs={"dropout": rng} if rng is not None else None)
    if str(c.fusion_strategy) == "early_fusion":
      feat, feats, embeds = m.apply({"params": params}, batch["ids"], batch["bag_index"], batch["bag_mask"],
                                    method=m.early_fusion_text, **kw)
      return embeds, batch["bag_mask"], feat, feats * batch["bag_mask"][..., None]
    embeds = m.apply({"params": params}, batch["ids"], batch["mask"], method=m.text_embeds, **kw)
    feat = m.apply({"params": params}, embeds, method=m.text_feat)
    if str(c.interaction) == "tokenwise":  # every token projected and normalised, PAD included, unmasked
      feats = m.apply({"params": params}, embeds, method=m.token_feats)
    else:
      feats = m.apply({"params": params}, embeds, batch["bag_index"], batch["bag_mask"], method=m.bag_feats)
    return embeds, batch["mask"], feat, feats

  def loss_fn(self, params, batch, rng, train: bool = True):
    m, c = self.model, self.config.model
    r_img, r_txt, r_neg, r_itm = jax.random.split(rng, 4)
    drop = lambda r: {"dropout": r} if train else None  # noqa: E731
    image_embeds = m.apply({"params": params}, batch["pixels"], deterministic=not train, rngs=drop(r_img),
                           method=m.image_embeds)
    image_feats = m.apply({"params": params}, image_embeds, method=m.image_feats)
    text_embeds, text_mask, text_feat, text_feats = self.text_side(params, batch, not train, r_txt if train else None)
    temp = jnp.clip(params["temp"], float(c.temp_min), float(c.temp_max))
    loss_ita = losses.bagformer_ita_loss(image_feats[:, 0], text_feat, temp)
    aux = {"loss_ita": loss_ita, "temperature": temp}
    loss = loss_ita
    if str(c.interaction) != "cls_token":
      loss_twc = losses.bagformer_twc_loss(text_feats, image_feats)
      aux["loss_twc"] = loss_twc
      loss = loss + loss_twc
    neg_img, neg_txt = losses.itm_negatives(r_neg, text_embeds.shape[0])
    t_all = jnp.concatenate([text_embeds, text_embeds, text_embeds[neg_txt]], 0)
    m_all = jnp.concatenate([text_mask, text_mask, text_mask[neg_txt]], 0)
    i_all = jnp.concatenate([image_embeds, image_embeds[neg_img], image_embeds], 0)
    logits = m.apply({"params": params}, t_all, m_all, i_all, deterministic=not train, rngs=drop(r_itm),
                     method=m.itm_logits)
    loss_itm = losses.bagformer_itm_loss(logits)
    aux["loss_itm"] = loss_itm
    return loss + loss_itm, aux

  def evaluate(self, params) -> dict[str, float]:
    c = self.config.eval
    if not c.get("split"):
      return {}
    from mmret_jax.eval import bagformer as bf_eval  # pylint: disable=import-outside-toplevel
    enc = bf_eval.BagFormerEncoder(self.model, params, self.inputs, interaction=str(self.config.model.interaction),
                                   fusion_strategy=str(self.config.model.fusion_strategy))
    out = None
    if c.get("out"):
      out = pathlib.Path(str(c.out))
      if not out.is_absolute():
        if storage.is_remote(self.workdir):
          raise ValueError(f"eval.out {c.out!r} is relative and the workdir is remote; give a local path")
        out = pathlib.Path(self.workdir) / out
    split = muge.MugeSplit(self.root, str(c.split))
    result = bf_eval.evaluate_split(enc, split, k_test=int(c.k_test), batch_size=int(c.batch_size),
                                    out=out, directions=tuple(c.directions), progress=self.is_main)
    if self.is_main and result.get("table"):
      print(result["table"])
    return result.get("metrics", {})

  usage = "python -m mmret_jax.eval.bagformer --model {workdir} --muge-root ... --split valid --out ..."

  def export(self, params, dst) -> None:
    """A converted BagFormer dir + tokenizer + the entity dictionary + `bagformer.json` (input settings)."""
    from mmret_jax.convert.core import write_converted  # pylint: disable=import-outside-toplevel
    import shutil  # pylint: disable=import-outside-toplevel
    dst = pathlib.Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    self.tokenizer.save_pretrained(dst)
    write_converted(dst, family="bagformer", hf_config=self.model_config.to_dict(), params=jax.device_get(params),
                    meta={}, tokenizer_src=None)
    shutil.copyfile(self.dict_path, dst / DICT_FILE)
    c = self.config
    settings = {"max_length": int(c.data.max_length), "bagging_mode": str(c.bagging.mode),
                "image_size": int(c.data.image_size) or self.model_config.vision.image_size,
                "interaction": str(c.model.interaction), "fusion_strategy": str(c.model.fusion_strategy)}
    (dst / SETTINGS_FILE).write_text(json.dumps(settings, indent=1, sort_keys=True))
