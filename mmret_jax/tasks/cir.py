"""Bi-BLIP4CIR (Liu et al., WACV 2024, arXiv 2303.16604): composed image retrieval with BLIP, in two stages.

Stage I (`cir.stage = 1`) fine-tunes BLIP's text encoder + `text_proj` with the element-wise-sum
fusion q = n(ref + text); stage II (`cir.stage = 2`) trains the CLIP4Cir Combiner on frozen BLIP
features. Both add the reversed query (target + `[BACKWARD]` caption -> reference) with weight
`loss.reversed_weight` (seed: 0.4 / 0.1 stage I, 0.5 / 0.1 stage II for FashionIQ / CIRR; 0 = the
BLIP4CIR baseline); logits are scaled by 100 (shared/reference/bi_blip4cir.md, `losses.cir_*`).

The image tower is frozen in both stages, so image features (`vision_proj(CLS)`, raw, 256-d) are
extracted once, batched and sharded over the mesh, and cached on disk keyed by the weights,
the image transform and the files (`data/feature_cache.py`): the same numbers the seed computes
per batch under `no_grad`. Stage II caches the frozen text features of every caption variant too
(FashionIQ: the 4 compositions x 2 directions of each triplet), so its step is the Combiner alone.

Batches follow the seed's epochs exactly in structure: each epoch is a fresh permutation
(seed, epoch) of the training triplets, cut into `batch_size` batches, the last partial one dropped;
FashionIQ captions are re-drawn every epoch from a per-(epoch, triplet) generator. Text is tokenised
to at most `data.max_seq_length` (77) and, in one process, padded to the batch's bucket of
`data.length_buckets` (one compiled step per bucket).

Export (`workdir/model/`): a converted BLIP dir (stage I: the fine-tuned text tower merged into the
initial weights) plus `cir.json` (fusion, image transform, prompts) and, in stage II, `combiner/`.
`python -m mmret_jax.eval.cir --model WORKDIR` evaluates it.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmret_jax import convert, losses, storage
from mmret_jax.data import feature_cache, image as image_lib
from mmret_jax.data.pipeline import epoch_batches
from mmret_jax.data.sources import cir as cir_data
from mmret_jax.models import bert, blip, combiner as combiner_lib, vit
from mmret_jax.tasks.base import Task

CIR_FILE = "cir.json"
COMBINER_DIR = "combiner"


# ----------------------------------------------------------------------------- model loading
def tiny_blip_config(vocab_size: int, c) -> blip.BlipConfig:
  """A from-scratch BLIP for `:smoke` runs (`config.model` sizes)."""
  m = c.model
  vision = vit.ViTConfig(hidden_size=int(m.vision_width), intermediate_size=4 * int(m.vision_width),
                         num_hidden_layers=int(m.vision_layers), num_attention_heads=int(m.heads),
                         image_size=int(c.data.image_size), patch_size=int(m.patch_size), hidden_act="gelu",
                         layer_norm_eps=1e-6, initializer_range=0.02, **blip.BLIP_VIT_LAYOUT)
  text = bert.BertConfig(vocab_size=vocab_size, hidden_size=int(m.text_width), num_hidden_layers=int(m.text_layers),
                         num_attention_heads=int(m.heads), intermediate_size=4 * int(m.text_width),
                         max_position_embeddings=int(c.data.max_seq_length) + 3, type_vocab_size=0,
                         add_cross_attention=True, encoder_width=int(m.vision_width), pad_token_id=0,
                         hidden_dropout_prob=float(m.dropout), attention_probs_dropout_prob=float(m.dropout))
  return blip.BlipConfig(vision=vision, text=text, image_text_hidden_size=int(m.embed_dim))


def load_blip(init_from: str, image_size: int):
  """(BlipConfig, host params, meta, model dir or None) from a converted / HF BLIP dir, a training
  workdir (its `model/`), or an original BLIP `.pth` (converted in memory at `image_size`)."""
  path = pathlib.Path(str(init_from)).expanduser()
  if path.suffix in (".pth", ".pt") and path.is_file():
    meta, hf_config, params = convert.convert_in_memory(path, family="blip", image_size=image_size)
    model_dir = None
  else:
    path = convert.resolve_pretrained(str(init_from))
    if (path / "model").is_dir() and not convert.is_converted_dir(path):
      path = path / "model"
    meta, hf_config, params, _ = convert.load_any(path)
    model_dir = path
  if meta.get("family") != "blip":
    raise ValueError(f"init_from {init_from} is a {meta.get('family')} model; Bi-BLIP4CIR needs BLIP")
  return blip.BlipConfig.from_dict(hf_config), params, meta, model_dir


def blip_tokenizer(source):
  """A BLIP tokenizer from a dir; `[DEC]` / `[ENC]` are added when missing (BLIP `init_tokenizer`)."""
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  tok = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
  if "[ENC]" not in tok.get_vocab():
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
  return tok


# ----------------------------------------------------------------------------- data
class CirTask(Task):
  """`config.task = "cir"` (both stages; `config.cir.stage`)."""

  def __init__(self, config, mesh, workdir):
    super().__init__(config, mesh, workdir)
    c = config
    self.stage = int(c.cir.stage)
    if self.stage not in (1, 2):
      raise ValueError(f"cir.stage must be 1 or 2, got {c.cir.stage!r}")
    if self.ring_mesh() is not None and self.stage != 1:
      raise ValueError("loss.impl=ring needs cir.stage = 1: stage II's reversed term runs the Combiner on every "
                       "(target, caption) pair of the batch; set loss.impl=dense")
    self.is_main = jax.process_index() == 0
    self.dataset = str(c.data.dataset).lower()
    if self.dataset not in ("cirr", "fashioniq"):
      raise ValueError(f"data.dataset must be cirr or fashioniq, got {c.data.dataset!r}")
    self.quirk = bool(c.data.prompt_quirk)
    self._eval_fns = {}
    self.train_data = self._load_split(c.data.train_split, int(c.data.max_train_queries))
    self.eval_data = self._load_split(c.data.eval_split, int(c.data.max_eval_queries))
    if c.data.synthetic_images:
      from mmret_jax.data.samples import make_cir_images  # pylint: disable=import-outside-toplevel
      for src in (self.train_data, self.eval_data):
        make_cir_images.write_synthetic_images(src, self._needed_images(src))
    self._setup_model()
    size = int(c.data.image_size)
    pad = str(c.data.transform)
    self.image_config = image_lib.ImageConfig.clip_default(
        size, pad_mode=pad, target_ratio=float(c.data.target_ratio), crop_offsets="torchvision", alpha="drop")
    self._setup_features()
    self._setup_rows()
    if self.stage == 2:
      self._setup_text_features()

  # --------------------------------------------------------------------------- setup
  def _print(self, msg: str) -> None:
    if self.is_main:
      print(msg, file=sys.stderr)

  def _load_split(self, split: str, max_queries: int):
    c = self.config
    root = c.data.root or cir_data.sample_root(self.dataset)
    image_root = c.data.image_root or None
    if image_root is None and c.data.synthetic_images:  # never write into the installed package
      image_root = storage.CACHE_DIR.parent / "cir_synthetic" / self.dataset
    elif image_root is None and not c.data.root:
      raise ValueError("the bundled annotations have no images: set config.data.root (and data.image_root) to "
                       "the dataset, or config.data.synthetic_images=True for generated ones")
    kw = {"image_root": image_root}
    if self.dataset == "fashioniq":
      kw["categories"] = tuple(c.data.categories)
    src = cir_data.load(self.dataset, root, split=split, **kw)
    if src.stats["skipped"]:
      self._print(f"note: {src.stats['skipped']} malformed rows skipped in {self.dataset} {split} "
                  f"({src.stats['skip_reasons']})")
    if max_queries > 0:  # the first `max_queries` (FashionIQ: of each category)
      if self.dataset == "fashioniq":
        src.queries = tuple(q for cat in src.categories for q in src.category_queries(cat)[:max_queries])
      else:
        src.queries = src.queries[:max_queries]
    return src

  def _needed_images(self, src) -> list[str]:
    names = {q.reference for q in src.queries} | {q.target for q in src.queries if q.target}
    if src is self.eval_data:
      names |= {n for g in src.eval_groups() for n in g.index_names}
    return sorted(names)

  def _setup_model(self):
    c = self.config
    m = c.model
    dtype = jnp.dtype(m.dtype)
    if c.init_from:
      self.blip_config, params, meta, model_dir = load_blip(c.init_from, int(c.data.image_size))
      self.itm_head = bool(meta.get("itm_head", True))
      tok_src = c.tokenizer or model_dir
      if tok_src is None:
        raise ValueError(f"init_from {c.init_from} has no tokenizer: set config.tokenizer to a "
                         "bert-base-uncased dir")
      self.tokenizer = blip_tokenizer(tok_src)
    else:
      self.tokenizer = self._scratch_tokenizer()
      self.blip_config = tiny_blip_config(len(self.tokenizer), c)
      self.itm_head = True
      init = blip.BlipRetrieval(self.blip_config)
      params = jax.device_get(nn.unbox(jax.jit(lambda r: blip.init_params(init, r))(
          jax.random.PRNGKey(int(c.seed) + 1))))
    dropout = float(m.dropout) if self.stage == 1 else 0.0  # stage II: the text encoder is frozen (eval)
    text = dataclasses.replace(self.blip_config.text, hidden_dropout_prob=dropout,
                               attention_probs_dropout_prob=dropout)
    self.blip_config = dataclasses.replace(self.blip_config, text=text)
    self.blip_params = params  # host numpy: every BLIP weight (the frozen parts and the init of the rest)
    if len(self.tokenizer) > self.blip_config.text.vocab_size:
      raise ValueError(f"the tokenizer has {len(self.tokenizer)} tokens, the text encoder "
                       f"{self.blip_config.text.vocab_size}")
    # Frozen features are extracted in float32, as the seed does (outside its autocast): the image
    # features always, the stage-II text features too; stage I trains the text tower in `model.dtype`.
    self.text_tower = blip.BlipTextTower(self.blip_config, dtype=dtype if self.stage == 1 else jnp.float32,
                                         remat=bool(m.remat))
    self.vision_model = blip.BlipRetrieval(self.blip_config, add_itm_head=self.itm_head, dtype=jnp.float32)
    self.combiner = combiner_lib.Combiner(combiner_lib.CombinerConfig(
        feature_dim=self.blip_config.image_text_hidden_size, projection_dim=int(c.cir.projection_dim),
        hidden_dim=int(c.cir.hidden_dim), dropout=float(c.cir.combiner_dropout)), dtype=dtype)

  def _scratch_tokenizer(self):
    """A WordPiece vocabulary from the captions (`:smoke`), saved in workdir/tokenizer and reused."""
    from mmret_jax.data.text import build_wordpiece_tokenizer  # pylint: disable=import-outside-toplevel
    saved = self.workdir / "tokenizer"
    if (saved / "tokenizer.json").exists():
      return blip_tokenizer(storage.local_copy(saved, refresh=True))
    texts = [cir_data.query_text(q, d, None, self.quirk) for src in (self.train_data, self.eval_data)
             for q in src.queries for d in ("forward", "backward")]
    tok = build_wordpiece_tokenizer(texts, vocab_size=int(self.config.model.vocab_size))
    if self.is_main:
      with storage.staged_dir(saved) as local:
        tok.save_pretrained(local)
    return tok

  def _cache_root(self) -> pathlib.Path:
    """`data.feature_cache`, else the user cache ($MMRET_JAX_CACHE/features, default
    ~/.cache/mmret_jax/features): entries are keyed by weights and settings, so runs share them."""
    if self.config.data.feature_cache:
      return pathlib.Path(str(self.config.data.feature_cache)).expanduser()
    return storage.CACHE_DIR.parent / "features"

  def _vision_params(self) -> dict:
    return {k: v for k, v in self.blip_params.items() if k in ("vision_model", "vision_proj")}

  def _setup_features(self):
    """Raw `vision_proj(CLS)` of every image the run needs, from the cache or extracted now."""
    c = self.config
    names = sorted(set(self._needed_images(self.train_data)) | set(self._needed_images(self.eval_data)))
    paths = [str(self._image_path(n)) for n in names]
    desc = {"weights": feature_cache.params_digest(self._vision_params()),
            "model": self.blip_config.vision.to_dict(), "image": dataclasses.asdict(self.image_config),
            "dtype": "float32", "files": feature_cache.files_fingerprint(paths)}
    root = self._cache_root()
    self.img_names = names
    self.img_index = {n: i for i, n in enumerate(names)}
    self.img_feats, self.img_ok, _ = feature_cache.cached_features(
        root, f"{self.dataset}-image", desc, names,
        lambda: extract_image_features(self.vision_model, self._vision_params(), paths, self.image_config,
                                       self.mesh, int(c.data.extract_batch_size), log=self._print),
        log=self._print)
    missing = int((~self.img_ok).sum())
    self.images_skipped = missing
    if missing:
      self._print(f"note: {missing} of {len(names)} images are missing or unreadable; their queries are skipped")

  def _image_path(self, name: str) -> pathlib.Path:
    try:
      return self.train_data.image_path(name)
    except KeyError:
      return self.eval_data.image_path(name)

  def _ok(self, name: str | None) -> bool:
    return name is not None and name in self.img_index and bool(self.img_ok[self.img_index[name]])

  def _setup_rows(self):
    """Training triplets whose reference and target images both read: [query, ref, target]."""
    rows = [(i, self.img_index[q.reference], self.img_index[q.target]) for i, q in enumerate(self.train_data.queries)
            if self._ok(q.reference) and self._ok(q.target)]
    self.train_skipped = len(self.train_data.queries) - len(rows)
    if self.train_skipped:
      self._print(f"note: {self.train_skipped} training triplets skipped (missing images)")
    if not rows:
      raise ValueError(f"no usable training triplets in {self.dataset} {self.config.data.train_split}")
    self.rows = np.asarray(rows, np.int64)

  def _setup_text_features(self):
    """Stage II: frozen text features of every training caption variant and every eval text."""
    q = self.train_data.queries
    fiq = self.dataset == "fashioniq"
    texts, table = {}, np.zeros((len(q), 2, 4 if fiq else 1), np.int64)
    for i, query in enumerate(q):
      for d, direction in enumerate(("forward", "backward")):
        caps = tuple(cir_data.prepend_direction(x, direction, self.quirk) for x in query.captions)
        variants = [cir_data.compose_fiq(caps[0], caps[1], k) for k in range(4)] if fiq else [caps[0]]
        for k, text in enumerate(variants):
          table[i, d, k] = texts.setdefault(text, len(texts))
    eval_texts = [cir_data.eval_text(x, self.quirk) for x in self.eval_data.queries]
    for text in eval_texts:
      texts.setdefault(text, len(texts))
    names = list(texts)
    params = {k: self.blip_params[k] for k in ("text_encoder", "text_proj")}
    params = {"text_encoder": _drop_cross_attention(params["text_encoder"]), "text_proj": params["text_proj"]}
    desc = {"weights": feature_cache.params_digest(params), "tokenizer": _tokenizer_digest(self.tokenizer),
            "max_length": int(self.config.data.max_seq_length), "model": dataclasses.asdict(self.blip_config.text),
            "dtype": "float32"}
    root = self._cache_root()
    feats, _, _ = feature_cache.cached_features(
        root, f"{self.dataset}-text", desc, names,
        lambda: (self.text_features(params, names), np.ones(len(names), bool)), log=self._print)
    self.text_feats, self.text_table, self.text_index = feats, table, texts

  # --------------------------------------------------------------------------- Task API
  @property
  def num_train_examples(self) -> int:
    return len(self.rows)

  def steps_per_epoch(self, global_batch: int) -> int:
    n = len(self.rows) // global_batch
    if n == 0:
      raise ValueError(f"batch_size {global_batch} exceeds the {len(self.rows)} training triplets")
    return n

  def init_params(self, rng):
    if self.stage == 1:
      ids = jnp.ones((1, 8), jnp.int32)
      return self.text_tower.init(rng, ids)["params"]
    return combiner_lib.init_params(self.combiner, rng)

  def load_init(self, params):
    """Stage I: the text tower starts from the BLIP weights (strict shapes)."""
    if self.stage != 1:
      return params
    src = {"text_encoder": _drop_cross_attention(self.blip_params["text_encoder"]),
           "text_proj": self.blip_params["text_proj"]}

    def take(path, leaf):
      node = src
      for k in path:
        node = node[k.key]
      if node.shape != leaf.shape:
        raise ValueError(f"init_from: {'/'.join(p.key for p in path)} has shape {node.shape}, "
                         f"the text tower expects {leaf.shape}")
      return np.asarray(node, leaf.dtype)
    return jax.tree_util.tree_map_with_path(take, params)

  def train_iterator(self, per_process_batch: int):
    d = self.config.data
    return epoch_batches(len(self.rows), int(self.config.seed), per_process_batch * jax.process_count(),
                         per_process_batch, lambda sel, epoch: self.make_batch(sel, epoch),
                         int(d.num_threads), int(d.prefetch))

  def make_batch(self, sel: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
    rows = self.rows[sel]
    out = {"index": rows[:, 0].copy(), "ref": self.img_feats[rows[:, 1]], "tgt": self.img_feats[rows[:, 2]]}
    seed = int(self.config.seed)
    if self.stage == 1:
      fwd, bwd = [], []
      for q in rows[:, 0]:
        f, b = cir_data.train_texts(self.train_data.queries[int(q)], np.random.default_rng([seed, 1, epoch, int(q)]),
                                    self.quirk)
        fwd.append(f)
        bwd.append(b)
      length = self._pad_length(fwd + bwd)
      out["fwd_ids"], out["fwd_mask"] = self.tokenize(fwd, length)
      out["bwd_ids"], out["bwd_mask"] = self.tokenize(bwd, length)
    else:
      pick = []
      for q in rows[:, 0]:
        rng = np.random.default_rng([seed, 1, epoch, int(q)])
        k = self.text_table.shape[2]
        choices = [cir_data.fiq_choice(rng.random()) if k == 4 else 0 for _ in range(2)]
        pick.append([self.text_table[int(q), d, choices[d]] for d in range(2)])
      pick = np.asarray(pick)
      out["txt_f"], out["txt_b"] = self.text_feats[pick[:, 0]], self.text_feats[pick[:, 1]]
    return out

  def _pad_length(self, texts) -> int:
    """The batch's padded length: the smallest bucket >= its longest text (one process), else max."""
    max_len = int(self.config.data.max_seq_length)
    if jax.process_count() > 1:
      return max_len  # every process must build the same shapes
    longest = max(len(x) for x in self.tokenizer(list(texts), truncation=True, max_length=max_len)["input_ids"])
    buckets = sorted(int(b) for b in self.config.data.length_buckets if int(b) < max_len) + [max_len]
    return next(b for b in buckets if b >= longest)

  def tokenize(self, texts, length: int) -> tuple[np.ndarray, np.ndarray]:
    return tokenize(self.tokenizer, texts, length, int(self.config.data.max_seq_length))

  def combine(self, params, image, text, rng=None, train=False):
    return self.combiner.apply({"params": params}, image, text, deterministic=not train,
                               rngs={"dropout": rng} if train else None)

  def loss_fn(self, params, batch, rng, train: bool = True):
    c = self.config
    scale, weight = float(c.cir.logit_scale), float(c.loss.reversed_weight)
    if self.stage == 1:
      return stage1_loss(self.text_tower, params, batch, rng, train, scale, weight, self.ring_mesh())
    return stage2_loss(self.combiner, params, batch, rng, train, scale, weight)

  def grad_cache_parts(self):
    """`train/grad_cache.Parts` of stage I's `loss_fn` (train=True): a chunk encodes its forward and backward
    captions (`txt_f` / `txt_b` [c, D]); the sum-fusion losses over the whole batch read the cached image features
    `ref` / `tgt` from the batch. Stage II has no encoder to chunk (the Combiner runs on cached features): an
    error naming `cir.stage`."""
    if self.stage != 1:
      raise ValueError(f"grad_cache.chunk_size > 0 needs cir.stage = 1 (got cir.stage = {self.stage}): stage II "
                       "trains the Combiner on cached features, with no encoder activations to chunk; set "
                       "grad_cache.chunk_size=0")
    from mmret_jax.train import grad_cache  # pylint: disable=import-outside-toplevel
    c = self.config
    scale, weight = float(c.cir.logit_scale), float(c.loss.reversed_weight)

    def encode(params, chunk, rng):
      txt_f, txt_b = stage1_text(self.text_tower, params, chunk, rng, True)
      return {"rows": {"txt_f": txt_f, "txt_b": txt_b}, "sums": {}}

    def loss(params, reps, batch, rng):
      del params, rng
      return stage1_sum_loss(batch, reps["rows"]["txt_f"], reps["rows"]["txt_b"], scale, weight, self.ring_mesh())
    return grad_cache.Parts(encode, loss)

  # --------------------------------------------------------------------------- eval
  def text_features(self, tower_params, texts, batch_size: int | None = None) -> np.ndarray:
    """Raw text features [N, D] of `texts` (eval mode), in fixed-shape batches."""
    return encode_texts(self.text_tower, tower_params, self.tokenizer, texts, int(self.config.data.max_seq_length),
                        int(batch_size or self.config.data.eval_batch_size), self._eval_fns)

  def query_features(self, params, queries) -> np.ndarray:
    """Composed query features for eval `queries` (raw; the metrics normalise)."""
    refs = self.img_feats[[self.img_index[q.reference] for q in queries]]
    if self.stage == 1:
      txt = self.text_features(params, [cir_data.eval_text(q, self.quirk) for q in queries])
      return np.asarray(losses.element_wise_sum(refs, txt))
    txt = self.text_feats[[self.text_index[cir_data.eval_text(q, self.quirk)] for q in queries]]
    if "combine" not in self._eval_fns:
      self._eval_fns["combine"] = jax.jit(lambda p, i, t: self.combine(p, i, t))
    return np.asarray(self._eval_fns["combine"](params, refs, txt))

  def evaluate(self, params) -> dict[str, float]:
    return evaluate_cir(self.eval_data, lambda qs: self.query_features(params, qs), self._ok,
                        lambda names: self.img_feats[[self.img_index[n] for n in names]])

  # --------------------------------------------------------------------------- export
  usage = "python -m mmret_jax.eval.cir --model {workdir} ..."

  def export(self, params, dst) -> None:
    """A converted BLIP dir (+ `cir.json`, + `combiner/` in stage II) that `eval.cir` and `load` read."""
    from mmret_jax.convert.core import save_params, write_converted  # pylint: disable=import-outside-toplevel
    params = jax.device_get(params)
    full = dict(self.blip_params)
    if self.stage == 1:
      full["text_encoder"] = _merge(full["text_encoder"], params["text_encoder"])
      full["text_proj"] = params["text_proj"]
    dst = pathlib.Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    self.tokenizer.save_pretrained(dst)
    cfg = self.blip_config
    text = dataclasses.replace(cfg.text, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    write_converted(dst, family="blip", hf_config=dataclasses.replace(cfg, text=text).to_dict(), params=full,
                    meta={"itm_head": self.itm_head}, tokenizer_src=None)
    info = {"stage": self.stage, "dataset": self.dataset, "fusion": "sum" if self.stage == 1 else "combiner",
            "image": {"size": int(self.config.data.image_size), "transform": str(self.config.data.transform),
                      "target_ratio": float(self.config.data.target_ratio)},
            "max_length": int(self.config.data.max_seq_length), "prompt_quirk": self.quirk}
    if self.stage == 2:
      save_params(dst / COMBINER_DIR, params)
      info["combiner"] = dataclasses.asdict(self.combiner.config)
    (dst / CIR_FILE).write_text(json.dumps(info, indent=1, sort_keys=True))


# ----------------------------------------------------------------------------- helpers
def stage1_text(tower: blip.BlipTextTower, params, batch, rng, train: bool) -> tuple[jax.Array, jax.Array]:
  """Raw text features (txt_f, txt_b) [B, D] of the forward / backward captions `fwd_*` / `bwd_*` [B, L]: one
  text-encoder pass over both (dropout from `rng` when `train`)."""
  ids = jnp.concatenate([batch["fwd_ids"], batch["bwd_ids"]], 0)
  mask = jnp.concatenate([batch["fwd_mask"], batch["bwd_mask"]], 0)
  txt = tower.apply({"params": params}, ids, mask, deterministic=not train, rngs={"dropout": rng} if train else None)
  b = batch["fwd_ids"].shape[0]
  return txt[:b], txt[b:]


def stage1_sum_loss(batch, txt_f, txt_b, scale: float = 100.0, weight: float = 0.1, mesh=None):
  """Forward + weight x reversed loss (element-wise-sum fusion) of the text features txt_f / txt_b [B, D] with the
  batch's raw image features `ref` / `tgt` [B, D]; with a `mesh`, through the ring loss over its devices."""
  loss_f, loss_r = losses.cir_sum_losses(batch["ref"], batch["tgt"], txt_f, txt_b, scale, mesh)
  return loss_f + weight * loss_r, {"loss_forward": loss_f, "loss_reversed": loss_r}


def stage1_loss(tower: blip.BlipTextTower, params, batch, rng, train: bool, scale: float = 100.0,
                weight: float = 0.1, mesh=None):
  """Stage I: forward + weight x reversed loss with the element-wise-sum fusion. `batch`: raw image
  features `ref` / `tgt` [B, D], caption ids / masks `fwd_*` / `bwd_*` [B, L] (one text-encoder pass
  over both)."""
  txt_f, txt_b = stage1_text(tower, params, batch, rng, train)
  return stage1_sum_loss(batch, txt_f, txt_b, scale, weight, mesh)


def stage2_loss(model: combiner_lib.Combiner, params, batch, rng, train: bool, scale: float = 100.0,
                weight: float = 0.1):
  """Stage II: the same with the Combiner on cached features `ref`, `tgt`, `txt_f`, `txt_b` [B, D]."""
  keys = iter(jax.random.split(rng))
  combine = lambda i, t: model.apply({"params": params}, i, t, deterministic=not train,
                                     rngs={"dropout": next(keys)} if train else None)
  loss_f, loss_r = losses.cir_combiner_losses(combine, batch["ref"], batch["tgt"], batch["txt_f"], batch["txt_b"],
                                              scale)
  return loss_f + weight * loss_r, {"loss_forward": loss_f, "loss_reversed": loss_r}


def tokenize(tokenizer, texts, length: int, max_length: int) -> tuple[np.ndarray, np.ndarray]:
  """int32 ids / masks [N, length] of texts tokenised to at most `max_length` (the seed's 77)."""
  enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding="max_length")
  ids = np.asarray(enc["input_ids"], np.int32)[:, :length]
  mask = np.asarray(enc["attention_mask"], np.int32)[:, :length]
  if ids.shape[1] < length:
    pad = length - ids.shape[1]
    ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=tokenizer.pad_token_id)
    mask = np.pad(mask, ((0, 0), (0, pad)))
  return ids, mask


def encode_texts(tower: blip.BlipTextTower, params, tokenizer, texts, max_length: int, batch_size: int,
                 fns: dict | None = None) -> np.ndarray:
  """Raw `text_proj(CLS)` [N, D] of `texts` (eval mode), in fixed-shape batches (one compilation;
  `fns` keeps the jitted function between calls)."""
  fns = {} if fns is None else fns
  if "text" not in fns:
    fns["text"] = jax.jit(lambda p, i, m: tower.apply({"params": p}, i, m))
  out = []
  for s in range(0, len(texts), batch_size):
    chunk = list(texts[s:s + batch_size])
    ids, mask = tokenize(tokenizer, chunk + [""] * (batch_size - len(chunk)), max_length, max_length)
    out.append(np.asarray(fns["text"](params, ids, mask), np.float32)[:len(chunk)])
  return np.concatenate(out) if out else np.zeros((0, tower.config.image_text_hidden_size), np.float32)


def _drop_cross_attention(text_encoder: dict) -> dict:
  """The text-mode subset of a BLIP text encoder's params (no `crossattention` blocks)."""
  enc = dict(text_encoder)
  enc["encoder"] = {k: {n: v for n, v in layer.items() if n != "crossattention"}
                    for k, layer in text_encoder["encoder"].items()}
  return enc


def _merge(base: dict, update: dict) -> dict:
  out = dict(base)
  for k, v in update.items():
    out[k] = _merge(base[k], v) if isinstance(v, dict) else v
  return out


def _tokenizer_digest(tok) -> str:
  import hashlib  # pylint: disable=import-outside-toplevel
  return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()[:20]


def extract_image_features(model: blip.BlipRetrieval, params: dict, paths: list[str], cfg, mesh, batch_size: int,
                           log=print) -> tuple[np.ndarray, np.ndarray]:
  """Raw `vision_proj(CLS)` [N, D] of images (unreadable ones: zero rows, ok False), batched and
  sharded over the mesh's batch axes."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  devices = mesh.devices.size
  batch_size = max(devices, (batch_size + devices - 1) // devices * devices)
  sharding = NamedSharding(mesh, P(("data", "fsdp")))
  fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method="get_image_features").astype(jnp.float32),
               in_shardings=(None, sharding))
  dev_params = jax.device_put(params)
  feats = np.zeros((len(paths), model.config.image_text_hidden_size), np.float32)
  ok = np.zeros(len(paths), bool)
  bad = []
  for s in tqdm(range(0, len(paths), batch_size), desc="image features", unit="batch",
                disable=jax.process_index() != 0 or len(paths) <= batch_size):
    chunk = paths[s:s + batch_size]
    pixels, kept, errors = image_lib.preprocess_batch(chunk, cfg, on_error="skip", num_threads=4)
    bad += errors
    if not len(kept):
      continue
    full = np.zeros((batch_size, *pixels.shape[1:]), np.float32)
    full[:len(kept)] = pixels
    out = np.asarray(fn(dev_params, full))[:len(kept)]
    feats[s + kept] = out
    ok[s + kept] = True
  for e in bad[:5]:
    log(f"  skipped image {e.path}: {e.reason}")
  return feats, ok


def evaluate_cir(data, query_features, image_ok, index_features) -> dict[str, float]:
  """FashionIQ (per category + averages) or CIRR (recall, subset recall, means) on `data`'s eval
  groups. Queries whose reference or target image is unreadable are skipped and counted; so are
  unreadable gallery images."""
  from mmret_jax.eval import cir as cir_eval  # pylint: disable=import-outside-toplevel
  out: dict[str, float] = {}
  per_category = {}
  skipped_q = skipped_i = 0
  for group in data.eval_groups():
    index = [n for n in group.index_names if image_ok(n)]
    skipped_i += len(group.index_names) - len(index)
    names = set(index)
    queries = [q for q in group.queries if image_ok(q.reference) and q.target in names]
    skipped_q += len(group.queries) - len(queries)
    if not queries:
      continue
    qf, idx = query_features(queries), index_features(index)
    if data.dataset == "fashioniq":
      per_category[group.name] = cir_eval.fiq_recall(qf, idx, index, [q.target for q in queries])
    else:
      # unreadable img_set members leave the subset too (counted in images_skipped)
      res = cir_eval.cirr_recall(qf, idx, index, [q.reference for q in queries], [q.target for q in queries],
                                 [[m for m in q.members if m in names] for q in queries])
      res["recall_mean"] = res.pop(cir_eval.CIRR_HEADLINE)  # (R@5 + Rs@1) / 2, a TensorBoard-safe name
      out.update(res)
  if per_category:
    out.update(cir_eval.fiq_summary(per_category))
  out["queries_skipped"], out["images_skipped"] = float(skipped_q), float(skipped_i)
  return out
