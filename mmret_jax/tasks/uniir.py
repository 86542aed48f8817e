"""UniIR (Wei et al., ECCV 2024, arXiv 2311.17136) on M-BEIR: training (`config.task = "uniir"`) and the
encoder the M-BEIR pipeline (`python -m mmret_jax.eval.mbeir`) embeds with.

Items: a query is the instruction-prefixed text `format_string(f"{instruction} {query_txt}")` and its
image; a candidate is `format_string(txt)` and its image (data/sources/mbeir.py). A missing text is ""
with txt_mask 0, a missing image a zeros image (after normalisation) with img_mask 0, as the seed's
collators; an image that cannot be read is counted and treated as missing. CLIP variants tokenise to 77
tokens padded with id 0 (OpenAI `clip.tokenize`), BLIP variants to `max_length` (100) with the BERT pad.
Images: CLIP's eval transform (shortest side, bicubic, center crop) or BLIP's (resize to size x size);
BLIP variants train with BLIP's training transform (`data.augment = "blip"`, data/augment.py: random
resized crop, flip, RandomAugment), drawn per (seed, epoch, row, query | candidate); CLIP trains without.

Training (the seed's `train.py` / `engine.py`, shared/reference/uniir.md): batches of union-train
queries with one random positive each (drawn per (epoch, row)), queries and candidates encoded in one
pass. CLIP-SF/FF: the in-batch loss, query -> candidate, scale `exp(logit_scale)`, negatives = the global
batch. BLIP-SF/FF: momentum encoders (m = 0.995, updated before the momentum pass, as the seed) and
queues of `uniir.queue_size` live in the train state's `task_state` (saved and resumed with it), soft
targets with alpha ramped over epoch 0, temperature clamped to [0.001, 0.5] after every update.

Batches: the model inputs of 2B items, queries then their positives (ids / mask [2B, L], pixels
[2B, H, W, 3], txt_mask / img_mask [2B]), cand_ids / index [B]. With GradCache (`grad_cache.chunk_size` > 0,
CLIP variants only: `grad_cache_parts`) the same inputs come paired, query and positive on axis 1 (ids / mask
[B, 2, L], pixels [B, 2, H, W, 3], txt_mask / img_mask [B, 2]) so every field is chunked by pair; `loss_fn`
takes either layout.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmret_jax import convert, losses, storage
from mmret_jax.data import augment
from mmret_jax.data import image as image_lib
from mmret_jax.data import text as text_lib
from mmret_jax.data.pipeline import epoch_batches
from mmret_jax.data.sources import mbeir
from mmret_jax.models import bert, blip, clip, uniir, vit
from mmret_jax.tasks.base import Task, fill_from, load_family_dir

SETTINGS_FILE = "uniir.json"
CLIP_CONTEXT = 77


def image_config(backbone: str, size: int) -> image_lib.ImageConfig:
  """The seed's eval transforms: CLIP (`clip.load` preprocess) or BLIP (`blip_transform`, eval)."""
  if backbone == "clip":
    return image_lib.ImageConfig.clip_default(size, crop_offsets="torchvision", alpha="drop")
  return image_lib.ImageConfig(size=(size, size), crop_size=None, do_center_crop=False, alpha="drop")


class UniIRInputs:
  """(texts, image paths or None) -> the arrays a UniIR model takes, with the seed's padding rules."""

  def __init__(self, tokenizer, backbone: str, image_cfg: image_lib.ImageConfig, max_length: int):
    self.tokenizer, self.backbone, self.image_cfg, self.max_length = tokenizer, backbone, image_cfg, max_length
    self.bad_images = 0

  def texts(self, texts: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [N, L] int32, attention mask [N, L] int32, txt_mask [N] float32)."""
    txt = [t if t else "" for t in texts]
    present = np.asarray([1.0 if t else 0.0 for t in txt], np.float32)
    if self.backbone == "clip":  # OpenAI clip.tokenize: truncate (EOT kept last), pad with 0 to 77
      enc = self.tokenizer(txt, truncation=True, max_length=CLIP_CONTEXT)["input_ids"]
      ids = np.zeros((len(txt), CLIP_CONTEXT), np.int32)
      for i, row in enumerate(enc):
        ids[i, :len(row)] = row
      mask = (np.arange(CLIP_CONTEXT)[None] < np.asarray([len(r) for r in enc])[:, None]).astype(np.int32)
      return ids, mask, present
    enc = self.tokenizer(txt, padding="max_length", truncation=True, max_length=self.max_length)
    return (np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32), present)

  def images(self, paths: Sequence[str | None], augment_keys: Sequence | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """(pixels [N, H, W, 3] float32, img_mask [N] float32); unreadable files count in `bad_images`.
    `augment_keys`: BLIP's training augmentation, item i drawn from `default_rng(augment_keys[i])`."""
    h, w = self.image_cfg.output_hw
    pixels = np.zeros((len(paths), h, w, 3), np.float32)
    present = np.zeros(len(paths), np.float32)
    idx = [i for i, p in enumerate(paths) if p]
    if idx:
      aug = None
      if augment_keys is not None:
        aug = augment.keyed(augment.blip_train, [augment_keys[i] for i in idx], size=h)
      batch, kept, errors = image_lib.preprocess_batch([paths[i] for i in idx], self.image_cfg, on_error="skip",
                                                       num_threads=4, augment=aug)
      self.bad_images += len(errors)
      for row, k in zip(batch, kept):
        pixels[idx[k]] = row
        present[idx[k]] = 1.0
    return pixels, present

  def __call__(self, texts, paths, augment_keys=None) -> dict[str, np.ndarray]:
    ids, mask, tm = self.texts(texts)
    px, im = self.images(paths, augment_keys)
    return {"ids": ids, "mask": mask, "pixels": px, "txt_mask": tm, "img_mask": im}


ITEM_FIELDS = ("ids", "mask", "pixels", "txt_mask", "img_mask")


def is_paired(batch) -> bool:
  """Whether a batch has the paired layout (ids [B, 2, L]) rather than the stacked one (ids [2B, L])."""
  return batch["ids"].ndim == 3


def to_paired(items: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Stacked model inputs [2B, ...] (queries then positives) -> paired [B, 2, ...]."""
  return {k: np.stack(np.split(v, 2), 1) for k, v in items.items()}


def model_inputs(batch) -> dict:
  """The model inputs of a batch as 2N stacked items (queries then positives), from either layout."""
  if not is_paired(batch):
    return {k: batch[k] for k in ITEM_FIELDS}
  return {k: jnp.swapaxes(batch[k], 0, 1).reshape(-1, *batch[k].shape[2:]) for k in ITEM_FIELDS}


def _image_path(root: pathlib.Path, rel: str | None) -> str | None:
  return str(root / rel) if rel else None


def load_uniir_dir(path: pathlib.Path, what: str):
  """(the dir, UniIRConfig, params) of a converted UniIR dir or a training workdir (its `model/`)."""
  path, hf_config, params = load_family_dir(
      path, "uniir", what, "convert UniIR checkpoints, or CLIP for a zero-shot CLIP-SF, with `python -m "
      "mmret_jax.convert to-jax SRC DST --family uniir --tokenizer DIR`")
  return path, uniir.UniIRConfig.from_dict(hf_config), params


class UniIREncoder:
  """A trained or converted UniIR model for inference: `encode_queries`, `encode_candidates`."""

  def __init__(self, model, params, inputs: UniIRInputs, path: str = ""):
    self.model, self.params, self.inputs, self.path = model, params, inputs, path
    self._fn = jax.jit(lambda p, b: model.apply({"params": p}, b["ids"], b["mask"], b["pixels"], b["txt_mask"],
                                                 b["img_mask"]))

  @classmethod
  def from_dir(cls, path, dtype: str = "float32") -> "UniIREncoder":
    """A converted UniIR dir (`convert to-jax ... --family uniir`) or a training workdir (`model/`)."""
    path = pathlib.Path(path)
    if not path.exists():
      raise FileNotFoundError(f"model not found: {path}")
    path, config, params = load_uniir_dir(path, str(path))
    settings = json.loads((path / SETTINGS_FILE).read_text()) if (path / SETTINGS_FILE).exists() else {}
    try:
      tok = text_lib.load_tokenizer(path)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"no usable tokenizer in {path} ({type(e).__name__}); convert with --tokenizer DIR") from e
    size = int(settings.get("image_size") or uniir.image_size(config))
    inputs = UniIRInputs(tok, config.backbone, image_config(config.backbone, size),
                         int(settings.get("max_length") or (CLIP_CONTEXT if config.backbone == "clip" else 100)))
    return cls(uniir.build(config, dtype=jnp.dtype(dtype)), jax.device_put(params), inputs, str(path))

  def _encode(self, texts, paths, batch_size: int, progress: bool, desc: str) -> np.ndarray:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    out = np.zeros((len(texts), self.model.config.embed_dim), np.float32)
    for s in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", disable=not progress):
      n = min(batch_size, len(texts) - s)
      pad = batch_size - n  # fixed shapes: one compilation
      b = self.inputs(list(texts[s:s + n]) + [""] * pad, list(paths[s:s + n]) + [None] * pad)
      out[s:s + n] = np.asarray(self._fn(self.params, b))[:n]
    return out

  def encode_queries(self, queries: Sequence[mbeir.Query], image_root, instructions: mbeir.Instructions | None,
                     mode: str = "random", seed: int = 0, batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """Raw embeddings [N, D] of queries (instruction drawn per query as `mbeir.query_text`)."""
    root = pathlib.Path(image_root)
    texts = [mbeir.query_text(q, instructions, mode, seed) for q in queries]
    return self._encode(texts, [_image_path(root, q.img_path) for q in queries], batch_size, progress, "queries")

  def encode_candidates(self, cands: Sequence[mbeir.Candidate], image_root, batch_size: int = 64,
                        progress: bool = False) -> np.ndarray:
    root = pathlib.Path(image_root)
    return self._encode([mbeir.candidate_text(c) for c in cands], [_image_path(root, c.img_path) for c in cands],
                        batch_size, progress, "candidates")


# ----------------------------------------------------------------------------- the task
def scratch_config(c, vocab_size: int) -> uniir.UniIRConfig:
  """A from-scratch UniIR model for `:smoke` runs (`config.model` sizes)."""
  m, variant = c.model, str(c.uniir.variant)
  backbone, fusion = variant.split("_")
  width, layers, heads, size = int(m.width), int(m.layers), int(m.heads), int(c.data.image_size)
  if backbone == "clip":
    text = clip.CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width,
                               num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=CLIP_CONTEXT,
                               hidden_act="quick_gelu", pad_token_id=1, bos_token_id=0, eos_token_id=1,
                               projection_dim=width)
    vision = vit.ViTConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                           num_attention_heads=heads, image_size=size, patch_size=int(m.patch_size),
                           projection_dim=width)
    t5_cfg = None
    if fusion == "ff":
      from mmret_jax.models import t5  # pylint: disable=import-outside-toplevel
      t5_cfg = t5.T5Config(d_model=width, d_kv=width // heads, d_ff=4 * width, num_layers=2, num_heads=heads,
                           dropout_rate=float(m.dropout))
    return uniir.UniIRConfig(backbone="clip", fusion=fusion, clip=clip.CLIPConfig(text, vision, width), t5=t5_cfg,
                             embed_dim=width)
  vision = vit.ViTConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                         num_attention_heads=heads, image_size=size, patch_size=int(m.patch_size), hidden_act="gelu",
                         layer_norm_eps=1e-6, **blip.BLIP_VIT_LAYOUT)
  text = bert.BertConfig(vocab_size=vocab_size, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=4 * width, max_position_embeddings=int(c.data.max_length) + 2,
                         type_vocab_size=0, add_cross_attention=True, encoder_width=width, pad_token_id=0,
                         hidden_dropout_prob=float(m.dropout), attention_probs_dropout_prob=float(m.dropout))
  return uniir.UniIRConfig(backbone="blip", fusion=fusion, blip=blip.BlipConfig(vision=vision, text=text),
                           embed_dim=width)


class UniIRTask(Task):
  """`config.task = "uniir"` (or "uniir_clip" / "uniir_blip", which also check the backbone),
  `config.uniir.variant` in clip_sf | clip_ff | blip_sf | blip_ff."""

  def __init__(self, config, mesh, workdir):
    super().__init__(config, mesh, workdir)
    c = config
    self.is_main = jax.process_index() == 0
    variant = str(c.uniir.variant)
    if variant not in uniir.MODELS:
      raise ValueError(f"uniir.variant must be one of {list(uniir.MODELS)}, got {variant!r}")
    task_name = str(c.get("task", "uniir"))
    if task_name in ("uniir_clip", "uniir_blip") and not variant.startswith(task_name.split("_")[1]):
      raise ValueError(f"task {task_name!r} trains {task_name.split('_')[1]}_sf / _ff, but uniir.variant is {variant!r}")
    self.is_blip = variant.startswith("blip")
    if self.is_blip and self.ring_mesh() is not None:
      raise ValueError(f"loss.impl=ring with uniir.variant {variant!r}: the BLIP variants' negatives come from the "
                       "momentum queue, not the batch; set loss.impl=dense")
    if str(c.data.augment) not in ("none", "blip"):
      raise ValueError(f"data.augment must be 'none' or 'blip' (BLIP's training transform), got {c.data.augment!r}")
    pools = ("local", "union", "global", "both") if c.eval.get("out") else ("local", "union", "global")
    if str(c.eval.pool) not in pools:
      raise ValueError(f"eval.pool must be one of {pools}, got {c.eval.pool!r}" +
                       (" (both needs eval.out: the command line's pipeline)" if str(c.eval.pool) == "both" else ""))
    self.paired = int(c.get("grad_cache", {}).get("chunk_size", 0)) > 0  # batches chunked by pair: module doc
    if self.is_blip and int(c.uniir.queue_size) % int(c.batch_size):
      raise ValueError(f"uniir.queue_size {c.uniir.queue_size} must be a multiple of batch_size {c.batch_size} "
                       "(the seed asserts it)")
    root = pathlib.Path(str(c.data.root)) if c.data.root else mbeir.mini_root()
    image_root = pathlib.Path(str(c.data.image_root)) if c.data.image_root else None
    if c.data.synthetic_images:
      from mmret_jax.data.samples import make_mbeir_mini  # pylint: disable=import-outside-toplevel
      image_root = image_root or storage.CACHE_DIR.parent / "mbeir_mini_images"
      make_mbeir_mini.write_mini_images(root, image_root)
    elif image_root is None and not c.data.root:
      raise ValueError("the bundled mini M-BEIR has no images: set data.synthetic_images=True, or data.root to M-BEIR")
    self.data = mbeir.MBEIR(root, image_root)
    self.instructions = self.data.instructions() if str(c.data.instructions) != "none" else None
    self.queries = self.data.queries(c.data.train_file, unique=False, check_images=True)
    self.pool = self.data.pool(c.data.train_pool, check_images=True)
    self.rows = np.asarray([i for i in range(len(self.queries))
                            if any(self.pool.index_of(d) is not None for d in self.queries[i].pos_cand_list)],
                           np.int64)
    if not len(self.rows):
      raise ValueError(f"no training query of {self.queries.path} has a positive in {self.pool.path}")
    skipped = len(self.queries) - len(self.rows)
    if self.is_main:
      if skipped:
        print(f"note: {skipped} training queries have no positive in the pool; skipped", file=sys.stderr)
      for what, recs in (("training queries", self.queries), ("pool candidates", self.pool)):
        if n := len(recs.missing_image_rows):
          print(f"note: {n} of {len(recs)} {what} have a missing image (under {self.data.image_root}); they "
                "train without it (img_mask 0)", file=sys.stderr)
    self._setup_model()

  def _setup_model(self):
    c = self.config
    dtype = jnp.dtype(c.model.dtype)
    self._pretrained = None
    if c.init_from:
      path, self.model_config, self._pretrained = load_uniir_dir(convert.resolve_pretrained(str(c.init_from)),
                                                                 f"init_from {c.init_from}")
      self.tokenizer = text_lib.load_tokenizer(c.tokenizer or path)
    else:
      self.tokenizer = self._scratch_tokenizer()
      self.model_config = scratch_config(c, len(self.tokenizer))
    if self.model_config.name != str(c.uniir.variant):
      raise ValueError(f"init_from is a {self.model_config.name} model, the config asks for {c.uniir.variant}")
    self.model = uniir.build(self.model_config, dtype=dtype, remat=bool(c.model.remat))
    size = int(c.data.image_size) or uniir.image_size(self.model_config)
    self.inputs = UniIRInputs(self.tokenizer, self.model_config.backbone,
                              image_config(self.model_config.backbone, size), int(c.data.max_length))

  def _scratch_tokenizer(self):
    saved = self.workdir / "tokenizer"
    if (saved / "tokenizer.json").exists():
      return text_lib.load_tokenizer(storage.local_copy(saved, refresh=True))
    texts = [mbeir.format_string(q.text) for q in self.queries if q.text]
    texts += [mbeir.format_string(self.pool[i].text) for i in range(len(self.pool)) if self.pool[i].text]
    if self.instructions is not None:
      texts += [v for vs in self.instructions.table.values() for v in vs]
    vocab = int(self.config.model.vocab_size)
    tok = (text_lib.build_clip_bpe_tokenizer(texts, vocab) if str(self.config.uniir.variant).startswith("clip")
           else text_lib.build_wordpiece_tokenizer(texts, vocab))
    if self.is_main:
      with storage.staged_dir(saved) as local:
        tok.save_pretrained(local)
    return tok

  # --------------------------------------------------------------------------- Task API
  @property
  def num_train_examples(self) -> int:
    return len(self.rows)

  def steps_per_epoch(self, global_batch: int) -> int:
    return len(self.rows) // global_batch

  def init_params(self, rng):
    return uniir.init_params(self.model, rng)

  def freeze_patterns(self):
    # BLIP-SF keeps the text encoder's (unused) cross-attention blocks frozen, as the seed.
    return (r"^text_encoder/.*/crossattention/",) if str(self.config.uniir.variant) == "blip_sf" else ()

  def load_init(self, params):
    return params if self._pretrained is None else fill_from(params, self._pretrained)

  def init_task_state(self, params):
    """BLIP: momentum copies of the encoder, the queues (random unit columns, ids -100), the pointer
    and the step counter of the alpha ramp. CLIP: None."""
    if not self.is_blip:
      return None
    q, d = int(self.config.uniir.queue_size), self.model_config.embed_dim
    k1, k2 = jax.random.split(jax.random.PRNGKey(int(self.config.seed) + 7))
    unit = lambda k: losses.l2_normalize(jax.random.normal(k, (d, q), jnp.float32).T).T
    box = lambda x: nn.LogicallyPartitioned(x, (None,) * x.ndim)
    return {"params_m": {k: v for k, v in params.items() if k != "temp"},
            "query_queue": box(unit(k1)), "cand_queue": box(unit(k2)),
            "id_queue": box(jnp.full((q,), -100, jnp.int32)), "ptr": box(jnp.zeros((), jnp.int32)),
            "step": box(jnp.zeros((), jnp.int32))}

  def post_update(self, params):
    """The seed clamps the temperature before every use: here after every update."""
    if not self.is_blip:
      return params
    c = self.config.uniir
    return {**params, "temp": jnp.clip(params["temp"], float(c.temp_min), float(c.temp_max))}

  def train_iterator(self, per_process_batch: int):
    d = self.config.data
    return epoch_batches(len(self.rows), int(self.config.seed), per_process_batch * jax.process_count(),
                         per_process_batch, lambda sel, epoch: self.make_batch(sel, epoch), int(d.num_threads),
                         int(d.prefetch))

  def make_batch(self, sel: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
    """Queries then their drawn positives: text / image arrays for 2B items (paired [B, 2, ...] with GradCache),
    the positives' ids."""
    c = self.config
    seed, mode = int(c.seed), str(c.data.instructions)
    root = self.data.image_root
    texts, paths, dids = [], [], []
    for row in self.rows[sel]:
      q = self.queries[int(row)]
      key = (epoch, int(row))
      did = mbeir.pick_positive(q, seed, key)
      cand = self.pool.get(did)
      if cand is None:  # a positive outside the pool: the first one inside it
        cand = next(self.pool.get(d) for d in q.pos_cand_list if self.pool.get(d) is not None)
      texts.append(mbeir.query_text(q, self.instructions, mode, seed, key, cand.modality))
      paths.append(_image_path(root, q.img_path))
      dids.append(cand)
    texts += [mbeir.candidate_text(x) for x in dids]
    paths += [_image_path(root, x.img_path) for x in dids]
    keys = None
    if str(c.data.augment) == "blip":  # (seed, epoch, row, query 0 | candidate 1): resume replays the pixels
      rows = [int(r) for r in self.rows[sel]]
      keys = [(seed, epoch, r, 0) for r in rows] + [(seed, epoch, r, 1) for r in rows]
    out = self.inputs(texts, paths, keys)
    if self.paired:
      out = to_paired(out)
    out["cand_ids"] = np.asarray([x.hashed_did for x in dids], np.int32)
    out["index"] = self.rows[sel].copy()
    return out

  def embed(self, params, items: dict, rng, train: bool):
    """Embeddings [N, D] (unnormalised) of N stacked items (`model_inputs`)."""
    return self.model.apply({"params": params}, items["ids"], items["mask"], items["pixels"], items["txt_mask"],
                            items["img_mask"], deterministic=not train, rngs={"dropout": rng} if train else None)

  def inbatch_loss(self, params, query, cand):
    """CLIP-SF/FF: (the in-batch loss of query [B, D] -> candidate [B, D] embeddings, aux); dense or ring
    (`loss.impl`)."""
    scale = jnp.exp(params["clip"]["logit_scale"])
    return losses.uniir_inbatch_loss(query, cand, scale, self.ring_mesh()), {"logit_scale": scale}

  def loss_fn(self, params, batch, rng, train: bool = True, task_state=None):
    b = batch["cand_ids"].shape[0]
    items = model_inputs(batch)
    encode = lambda p, r: self.embed(p, items, r, train)
    r1, r2 = jax.random.split(rng)
    emb = encode(params, r1)
    if not self.is_blip:
      return self.inbatch_loss(params, emb[:b], emb[b:])
    c = self.config.uniir
    temp = jnp.clip(params["temp"], float(c.temp_min), float(c.temp_max))
    ts = task_state
    params_m = losses.momentum_update(ts["params_m"], jax.lax.stop_gradient(
        {k: v for k, v in params.items() if k != "temp"}), float(c.momentum))
    emb_m = jax.lax.stop_gradient(encode({**params_m, "temp": params["temp"]}, r2))
    per_epoch = max(1, self.steps_per_epoch(int(self.config.batch_size)))
    alpha = float(c.alpha) * jnp.minimum(1.0, ts["step"].astype(jnp.float32) / per_epoch)
    loss = losses.uniir_queue_loss(emb[:b], emb[b:], emb_m[:b], emb_m[b:], batch["cand_ids"], ts["query_queue"],
                                   ts["cand_queue"], ts["id_queue"], temp, alpha)
    queues = losses.uniir_enqueue(ts["query_queue"], ts["cand_queue"], ts["id_queue"], ts["ptr"], emb_m[:b],
                                  emb_m[b:], batch["cand_ids"])
    new_ts = {"params_m": params_m, "query_queue": queues[0], "cand_queue": queues[1], "id_queue": queues[2],
              "ptr": queues[3], "step": ts["step"] + 1}
    return loss, {"temperature": temp, "alpha": alpha, "task_state": jax.lax.stop_gradient(new_ts)}

  def grad_cache_parts(self):
    """`train/grad_cache.Parts` of `loss_fn` (train=True), CLIP-SF/FF: chunks of query / positive pairs (the
    paired batch layout) encode both embeddings; the in-batch loss over the whole batch (every negative) reads
    the logit scale from the params itself. Dropout is keyed by chunk. BLIP variants: a ValueError."""
    from mmret_jax.train import grad_cache  # pylint: disable=import-outside-toplevel
    if self.is_blip:
      raise ValueError(f"grad_cache.chunk_size > 0 with uniir.variant {self.config.uniir.variant!r}: BLIP-queue "
                       "variants: negatives come from the queue, GradCache does not apply; set "
                       "grad_cache.chunk_size=0")

    def encode(params, chunk, rng):
      if not is_paired(chunk):
        raise ValueError("UniIR GradCache needs the paired batch layout (ids [B, 2, L]): make_batch gives it "
                         "when grad_cache.chunk_size > 0")
      c = chunk["ids"].shape[0]  # pairs
      emb = self.embed(params, model_inputs(chunk), rng, True)
      return {"rows": {"query": emb[:c], "cand": emb[c:]}}

    def loss(params, reps, batch, rng):
      del batch, rng
      return self.inbatch_loss(params, reps["rows"]["query"], reps["rows"]["cand"])
    return grad_cache.Parts(encode, loss)

  def evaluate(self, params) -> dict[str, float]:
    """The M-BEIR pipeline on `eval.sets` of `eval.split` (`eval.pool` local | union): in memory, or
    with `eval.out` the command line's pipeline writing its files there (relative: in the workdir)."""
    c = self.config.eval
    if not c.get("sets"):
      return {}
    from mmret_jax.eval import mbeir as mbeir_eval  # pylint: disable=import-outside-toplevel
    enc = UniIREncoder(self.model, params, self.inputs)
    if c.get("out"):  # the command line's whole pipeline: shards, index, run files, results.tsv, the table
      out = pathlib.Path(str(c.out))
      if not out.is_absolute():
        if storage.is_remote(self.workdir):
          raise ValueError(f"eval.out {c.out!r} is relative and the workdir is remote; give a local path")
        out = pathlib.Path(self.workdir) / out
      result = mbeir_eval.run_pipeline(enc, self.data, out, split=str(c.split), sets=tuple(c.sets),
                                       pool=str(c.pool), instructions=str(self.config.data.instructions),
                                       seed=int(self.config.seed), backend=str(c.get("backend", "faiss")))
      return mbeir_eval.flat_metrics(result) if result else {}
    return mbeir_eval.evaluate(enc, self.data, split=str(c.split), sets=tuple(c.sets), pool=str(c.pool),
                               instructions=str(self.config.data.instructions), seed=int(self.config.seed))

  usage = "python -m mmret_jax.eval.mbeir all --model {workdir} --mbeir-root ... --out ..."

  def export(self, params, dst) -> None:
    """A converted UniIR dir (+ tokenizer, `uniir.json` with the input settings) the pipeline reads."""
    from mmret_jax.convert.core import write_converted  # pylint: disable=import-outside-toplevel
    dst = pathlib.Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    self.tokenizer.save_pretrained(dst)
    write_converted(dst, family="uniir", hf_config=self.model_config.to_dict(), params=jax.device_get(params),
                    meta={"variant": self.model_config.name}, tokenizer_src=None)
    settings = {"variant": self.model_config.name, "max_length": int(self.config.data.max_length),
                "image_size": int(self.config.data.image_size) or uniir.image_size(self.model_config)}
    (dst / SETTINGS_FILE).write_text(json.dumps(settings, indent=1, sort_keys=True))

