"""Embed texts with a converted (or Hugging Face) model: CLI and Python API.

    python -m mmret_jax.embed --model DIR --input texts.txt --output emb.npy
    enc = mmret_jax.load(DIR); emb = enc.encode_text(["a kettle", "gloves"])

Defaults follow the BLaIR README: CLS vector of `last_hidden_state`, L2-normalised, `max_length`
512. A sentence-transformers dir (`modules.json`, e.g. all-MiniLM-L6-v2) brings its own pooling,
normalisation and max sequence length, used unless the caller overrides them.

Speed on variable-length text: texts are sorted by length (longest first) and batched; each batch is
padded to a multiple of 8 tokens, and similar lengths share one compiled shape. Which lengths get
their own compiled program is planned from measured costs (`plan_lengths`): after the first batch,
a new shape is compiled only when the padding it saves outweighs its compile time. The batch that
is not full holds the shortest texts, so its filler rows cost little. `python -m mmret_jax.embed` also keeps compiled programs in a
persistent cache (`~/.cache/mmret_jax/xla`), so later runs skip most compiles.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import math
import os
import pathlib
import sys
import time
from typing import Iterable, Mapping, Sequence

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from mmret_jax import cli, st_config  # pylint: disable=wrong-import-position
from mmret_jax.losses import l2_normalize  # pylint: disable=wrong-import-position

POOLINGS = ("cls", "mean", "max", "mean_sqrt_len", "lasttoken")
DEFAULT_MAX_LENGTH = 512
LENGTH_STEP = 8  # padded lengths are multiples of this (or max_length)
COMPILE_CACHE = pathlib.Path(os.environ.get("MMRET_JAX_CACHE", "~/.cache/mmret_jax")).expanduser() / "xla"


class EmbedError(ValueError):
  """Bad user input to the embedder (message says what to change)."""


def round_length(n: int, max_length: int, step: int = LENGTH_STEP) -> int:
  """The padded length for a batch whose longest text has `n` tokens."""
  return min(max_length, max(step, -(-n // step) * step))


def plan_lengths(required: Mapping[int, int], compiled: Iterable[int] = (), compile_cost: float = 0.0
                 ) -> list[int]:
  """Which padded lengths to run batches at: the set minimising padding plus compiles.

  Args:
    required: {rounded length a batch needs: number of such batches}.
    compiled: lengths already compiled (free to use).
    compile_cost: the cost of compiling a new length, in units of one batch padded by one token.
  Returns:
    Sorted lengths; a batch runs at the smallest one >= its need. Cost = sum over batches of the
    length it runs at, plus `compile_cost` per length not in `compiled` (exact, by dynamic
    programming over the candidate lengths).
  """
  if not required:
    return []
  compiled = set(compiled)
  need = sorted(required)
  cands = sorted(set(need) | {c for c in compiled if c >= need[0]})
  # prefix[k]: batches needing <= cands[k-1]
  prefix = [0]
  for c in cands:
    prefix.append(prefix[-1] + required.get(c, 0))
  best, back = [math.inf] * len(cands), [-1] * len(cands)
  for j, length in enumerate(cands):
    own = 0.0 if length in compiled else float(compile_cost)
    for i in range(-1, j):  # i: the previous chosen candidate (-1: none)
      prev = best[i] if i >= 0 else 0.0
      cost = prev + own + (prefix[j + 1] - prefix[i + 1]) * length
      if cost < best[j]:
        best[j], back[j] = cost, i
  ends = [j for j, c in enumerate(cands) if c >= need[-1]]
  j = min(ends, key=lambda k: best[k])
  out = []
  while j >= 0:
    out.append(cands[j])
    j = back[j]
  return sorted(out)


def pool(hidden: jax.Array, mask: jax.Array, pooling: str) -> jax.Array:
  """[B, L, D], [B, L] -> [B, D] float32, as sentence-transformers' Pooling module does.

  `cls`: position 0; `mean`: mean over unmasked tokens; `max`: max over them; `mean_sqrt_len`: their
  sum / sqrt(count); `lasttoken`: the last unmasked token (right padding)."""
  hidden = hidden.astype(jnp.float32)
  if pooling == "cls":
    return hidden[:, 0]
  m = mask.astype(jnp.float32)[..., None]
  count = jnp.maximum(m.sum(1), 1.0)
  if pooling == "mean":
    return (hidden * m).sum(1) / count
  if pooling == "mean_sqrt_len":
    return (hidden * m).sum(1) / jnp.sqrt(count)
  if pooling == "max":
    return jnp.where(m > 0, hidden, -1e9).max(1)
  if pooling == "lasttoken":
    last = jnp.maximum(mask.astype(jnp.int32).sum(1) - 1, 0)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
  raise EmbedError(f"Unknown pooling {pooling!r}; choose from {POOLINGS}")


def enable_compile_cache(path: str | os.PathLike = COMPILE_CACHE) -> None:
  """Keeps compiled programs on disk (JAX's persistent cache) unless the user configured one;
  `MMRET_JAX_COMPILE_CACHE=0` turns this off."""
  if os.environ.get("MMRET_JAX_COMPILE_CACHE", "1") == "0" or jax.config.jax_compilation_cache_dir:
    return
  jax.config.update("jax_compilation_cache_dir", str(path))
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


class Encoder:
  """A loaded model + tokenizer. Build with `mmret_jax.load(DIR)`."""

  def __init__(self, model, params, tokenizer, *, meta: dict, hf_config: dict, path: str,
               st_settings: st_config.STSettings | None = None):
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.meta, self.hf_config, self.path = meta, hf_config, path
    self.st_settings = st_settings  # a sentence-transformers dir's pipeline settings, else None
    self.num_truncated = 0  # texts truncated by the last encode_text call
    self.last_max_length = None
    self.last_settings: dict = {}  # pooling / normalize / max_length the last encode_text used
    self._executables: dict[tuple, object] = {}  # (rows, length, pooling, normalize) -> compiled
    self._compile_s = 0.0  # longest compile seen (seconds)
    self._token_s = None  # seconds per padded token, running estimate

  @classmethod
  def from_dir(cls, path: str | os.PathLike, *, dtype: str = "float32", verbose: bool | None = None
               ) -> "Encoder":
    """`verbose`: None = say which sentence-transformers settings are used (if any); True = also
    note an in-memory conversion; False = silent."""
    from mmret_jax import convert  # pylint: disable=import-outside-toplevel
    path = convert.localize(path)  # a gs:// dir: downloaded once into the local cache
    meta, hf_config, params, on_the_fly = convert.load_any(path)
    if not convert.is_converted_dir(path) and convert.is_converted_dir(pathlib.Path(path) / "model"):
      path = pathlib.Path(path) / "model"  # a training workdir: its exported model
    if on_the_fly and verbose:
      print(f"note: {path} is a Hugging Face dir; converted in memory (save time next run with "
            f"`python -m mmret_jax.convert to-jax {path} DST`)", file=sys.stderr)
    if dtype not in ("float32", "bfloat16"):
      raise EmbedError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    if meta.get("family") not in ("bert", "clip", "blip"):
      raise EmbedError(f"{path} is a {meta.get('family')} model; embed it with its own pipeline"
                       + (" (python -m mmret_jax.eval.mbeir)" if meta.get("family") == "uniir" else ""))
    settings = st_config.read_settings(path)
    if settings is not None and meta.get("family") != "bert":
      raise EmbedError(f"{path}: sentence-transformers settings are supported for BERT-family models only")
    if settings is not None and verbose is not False:
      print(f"note: {path} is a sentence-transformers model; using its settings: {settings.describe()} "
            "(override with pooling= / normalize= / max_length=, or --pooling / --no-normalize / "
            "--max-length)", file=sys.stderr)
    model = convert.build_model(meta, hf_config, dtype=jnp.dtype(dtype))
    tokenizer = _load_tokenizer(st_config.model_dir(path), required=meta.get("family") not in ("clip", "blip"))
    return cls(model, jax.device_put(params), tokenizer, meta=meta, hf_config=hf_config, path=str(path),
               st_settings=settings)

  @property
  def family(self) -> str:
    return self.meta.get("family", "bert")

  @property
  def is_clip(self) -> bool:
    return self.family == "clip"

  @property
  def is_blip(self) -> bool:
    return self.family == "blip"

  @property
  def has_image_tower(self) -> bool:
    return self.family in ("clip", "blip")

  @property
  def max_positions(self) -> int:
    """Longest input the position table allows (RoBERTa reserves pad_token_id + 1 slots)."""
    if self.has_image_tower:
      return self.model.config.text.max_position_embeddings
    c = self.model.config
    return c.max_position_embeddings - (c.pad_token_id + 1 if c.is_roberta else 0)

  @property
  def dim(self) -> int:
    if self.is_blip:
      return self.model.config.image_text_hidden_size
    return self.model.config.projection_dim if self.is_clip else self.model.config.hidden_size

  @functools.partial(jax.jit, static_argnums=(0, 4, 5))
  def _forward(self, params, ids, mask, pooling: str, normalize: bool):
    if self.has_image_tower:  # CLIP: EOS-pooled, projected; BLIP: text-mode CLS, text_proj
      emb = self.model.apply({"params": params}, ids, mask, method="get_text_features").astype(jnp.float32)
    else:
      # CLS pooling reads position 0 of the last layer only: its other rows are not computed.
      out = self.model.apply({"params": params}, ids, mask, cls_only_last_layer=pooling == "cls")
      emb = pool(out["last_hidden_state"], mask, pooling)
    return l2_normalize(emb) if normalize else emb

  @functools.partial(jax.jit, static_argnums=(0, 3))
  def _image_forward(self, params, pixels, normalize: bool):
    emb = self.model.apply({"params": params}, pixels, method="get_image_features").astype(jnp.float32)
    return l2_normalize(emb) if normalize else emb

  def image_config(self):
    """Preprocessing from the model dir's preprocessor_config.json, else the family's default
    (CLIP: shortest edge + center crop; BLIP: `BlipImageProcessor`, resize to size x size)."""
    from mmret_jax.data import image  # pylint: disable=import-outside-toplevel
    cfg_file = pathlib.Path(self.path) / "preprocessor_config.json"
    if cfg_file.exists():
      return image.ImageConfig.from_preprocessor_config(cfg_file)
    size = self.model.config.vision.image_size
    if self.is_blip:
      return image.ImageConfig(size=(size, size), crop_size=None, do_center_crop=False)
    return image.ImageConfig.clip_default(size)

  def _pixels(self, images: Sequence, batch_size: int, cfg) -> np.ndarray:
    """Preprocessed [batch_size, H, W, 3] (zero rows appended to a fixed shape)."""
    from mmret_jax.data import image  # pylint: disable=import-outside-toplevel
    pixels, _, _ = image.preprocess_batch(list(images), cfg, on_error="raise", num_threads=2)
    if len(images) < batch_size:  # fixed shape: one compilation
      pixels = np.concatenate([pixels, np.zeros((batch_size - len(images), *pixels.shape[1:]), np.float32)])
    return pixels

  @functools.partial(jax.jit, static_argnums=(0,))
  def _itm_forward(self, params, pixels, ids, mask):
    emb = self.model.apply({"params": params}, pixels, method="image_embeds")
    logits = self.model.apply({"params": params}, ids, mask, emb, method="itm_logits")
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[:, 1]

  def itm_scores(self, images: Sequence, texts: Sequence[str], *, batch_size: int = 16,
                 max_length: int = 35, replace_cls_with_enc: bool = False, progress: bool = False) -> np.ndarray:
    """BLIP's image-text matching probability for each (image, text) pair -> float32 [N].

    The text encoder runs in multimodal mode (cross-attending the image tokens) and the ITM head's
    softmax gives p(match). The ids are used as tokenised (HF `BlipForImageTextRetrieval`);
    `replace_cls_with_enc=True` puts `[ENC]` first, as the original BLIP's ITM pass.
    """
    if not self.is_blip:
      raise EmbedError(f"{self.path} is a {self.family} model; ITM scores need a BLIP model")
    if isinstance(texts, str) or isinstance(images, (str, os.PathLike)):
      raise EmbedError("itm_scores takes a list of images and a list of texts")
    if len(images) != len(texts):
      raise EmbedError(f"itm_scores pairs images with texts: got {len(images)} images, {len(texts)} texts")
    if self.tokenizer is None:
      raise EmbedError(f"No tokenizer in {self.path}: copy the tokenizer files there to score texts")
    cfg = self.image_config()
    max_length = min(int(max_length), self.max_positions)
    out = np.zeros((len(texts),), np.float32)
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    for start in tqdm(range(0, len(texts), batch_size), desc="ITM", unit="batch", disable=not progress):
      chunk = list(texts[start:start + batch_size])
      n = len(chunk)
      ids = self.tokenize(chunk, max_length)
      length = round_length(max(len(x) for x in ids), max_length)
      arr = np.full((batch_size, length), self.tokenizer.pad_token_id, np.int32)
      mask = np.zeros((batch_size, length), np.int32)
      for row, x in enumerate(ids):
        arr[row, :len(x)] = x
        mask[row, :len(x)] = 1
      mask[n:, 0] = 1
      if replace_cls_with_enc:
        arr[:, 0] = self.model.config.enc_token_id
      pixels = self._pixels(images[start:start + batch_size], batch_size, cfg)
      out[start:start + n] = np.asarray(self._itm_forward(self.params, jnp.asarray(pixels), arr, mask))[:n]
    return out

  def encode_image(self, images: Sequence, *, batch_size: int = 32, normalize: bool = True,
                   progress: bool = False) -> np.ndarray:
    """Embeds images (paths, PIL images or HWC arrays) -> float32 [N, D] in input order.

    A missing or corrupt image is an error naming it (embedding must not drop rows).
    """
    if not self.has_image_tower:
      raise EmbedError(f"{self.path} is a text model ({self.family}); it has no image tower")
    if isinstance(images, (str, os.PathLike)):
      raise EmbedError("encode_image takes a list of images, not one")
    cfg = self.image_config()
    out = np.zeros((len(images), self.dim), np.float32)
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    for start in tqdm(range(0, len(images), batch_size), desc="embedding images", unit="batch",
                      disable=not progress):
      chunk = list(images[start:start + batch_size])
      pixels = self._pixels(chunk, batch_size, cfg)
      emb = self._image_forward(self.params, jnp.asarray(pixels), normalize)
      out[start:start + len(chunk)] = np.asarray(emb)[:len(chunk)]
    return out

  def tokenize(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated to `max_length`; sets `num_truncated`."""
    full = self.tokenizer(list(texts), truncation=False, add_special_tokens=True)["input_ids"]
    long = [i for i, ids in enumerate(full) if len(ids) > max_length]
    if long:
      cut = self.tokenizer([texts[i] for i in long], truncation=True, max_length=max_length)["input_ids"]
      for i, ids in zip(long, cut):
        full[i] = ids
    self.num_truncated = len(long)
    return full

  def resolve(self, pooling: str | None, normalize: bool | None, max_length: int | None
              ) -> tuple[str, bool, int]:
    """The settings an encode_text call uses: the caller's, else the sentence-transformers dir's,
    else the BLaIR defaults (CLS, normalised, 512 or the model's limit)."""
    st = self.st_settings
    if self.has_image_tower:
      fixed = "eos" if self.is_clip else "cls"
      if pooling not in (None, fixed):
        raise EmbedError(f"{self.family.upper()} text embeddings are {fixed.upper()}-pooled and projected; "
                         "--pooling does not apply")
      pooling = fixed
    pooling = pooling or (st.pooling if st else "cls")
    if pooling not in POOLINGS and not self.has_image_tower:
      raise EmbedError(f"Unknown pooling {pooling!r}; choose from {POOLINGS}")
    normalize = (st.normalize if st else True) if normalize is None else bool(normalize)
    if max_length is None:
      max_length = min(st.max_length if st and st.max_length else DEFAULT_MAX_LENGTH, self.max_positions)
    if max_length > self.max_positions:
      raise EmbedError(f"max_length {max_length} exceeds what this model supports ({self.max_positions})")
    return pooling, normalize, int(max_length)

  def _compile(self, key: tuple):
    rows, length, pooling, normalize = key
    spec = jax.ShapeDtypeStruct((rows, length), jnp.int32)
    t = time.perf_counter()
    out = self._forward.lower(self, self.params, spec, spec, pooling, normalize).compile()
    self._compile_s = max(self._compile_s, time.perf_counter() - t)
    return out

  def _executable(self, rows: int, length: int, pooling: str, normalize: bool):
    """The compiled forward for [rows, length] inputs (compiled and timed on first use)."""
    key = (rows, length, pooling, normalize)
    if key not in self._executables:
      self._executables[key] = self._compile(key)
    return self._executables[key]

  def encode_text(self, texts: Sequence[str], *, pooling: str | None = None, max_length: int | None = None,
                  batch_size: int = 32, normalize: bool | None = None, progress: bool = False) -> np.ndarray:
    """Embeds `texts` -> float32 [N, D] in input order.

    `pooling` (cls | mean | max | mean_sqrt_len | lasttoken), `normalize` and `max_length` default
    to a sentence-transformers dir's own settings, else CLS, normalised and 512 (BLaIR) or the
    model's limit. CLIP text is EOS-pooled and projected. `last_settings` says what was used.
    """
    if self.tokenizer is None:
      raise EmbedError(f"No tokenizer in {self.path}: copy the tokenizer files there to embed text")
    if isinstance(texts, str):
      raise EmbedError("encode_text takes a list of strings, not one string")
    pooling, normalize, max_length = self.resolve(pooling, normalize, max_length)
    if max_length < 2 or batch_size < 1:
      raise EmbedError("max_length must be >= 2 and batch_size >= 1")
    self.last_max_length = max_length
    self.last_settings = {"pooling": pooling, "normalize": normalize, "max_length": max_length}
    d = self.dim
    if len(texts) == 0:
      return np.zeros((0, d), np.float32)
    if self.st_settings is not None and self.st_settings.do_lower_case:
      texts = [t.lower() for t in texts]
    ids = self.tokenize(texts, max_length)
    pad = self.tokenizer.pad_token_id
    if pad is None:
      raise EmbedError("The tokenizer has no pad token")
    out = np.zeros((len(texts), d), np.float32)
    # Longest first (similar lengths share a batch): the first batch's run time then measures the
    # per-token cost with little fixed overhead in it. The one batch that is not full comes last,
    # with the shortest texts, so its filler rows cost little.
    order = np.argsort([-len(x) for x in ids], kind="stable")
    batches = [order[a:a + batch_size] for a in range(0, len(order), batch_size)]
    need = [round_length(max(len(ids[i]) for i in idx), max_length) for idx in batches]
    plan: list[int] = []
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    for k, idx in enumerate(tqdm(batches, desc="embedding", unit="batch", disable=not progress)):
      if self._token_s is not None and not plan:  # costs known: plan the rest
        plan = self._plan(need[k:], batch_size, pooling, normalize)
      length = next((p for p in plan if p >= need[k]), need[k])
      fn = self._executable(batch_size, length, pooling, normalize)
      arr = np.full((batch_size, length), pad, np.int32)
      mask = np.zeros((batch_size, length), np.int32)
      for row, i in enumerate(idx):
        arr[row, :len(ids[i])] = ids[i]
        mask[row, :len(ids[i])] = 1
      mask[len(idx):, 0] = 1  # filler rows: keep softmax finite; their outputs are dropped
      if self._token_s is None:  # the very first run of a program pays one-time costs: time a second
        np.asarray(fn(self.params, arr, mask))
      t = time.perf_counter()
      emb = np.asarray(fn(self.params, arr, mask))
      per_token = (time.perf_counter() - t) / (batch_size * length)
      # The lowest seen: short batches also pay a fixed per-call cost that padding does not add to.
      self._token_s = per_token if self._token_s is None else min(self._token_s, per_token)
      out[idx] = emb[:len(idx)]
    return out

  def _plan(self, need: Sequence[int], rows: int, pooling: str, normalize: bool) -> list[int]:
    compiled = [k[1] for k in self._executables if k[0] == rows and k[2:] == (pooling, normalize)]
    cost = self._compile_s / max(self._token_s * rows, 1e-12)  # in batch-tokens
    return plan_lengths(collections.Counter(need), compiled, cost)


def _load_tokenizer(path, required: bool = True):
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  if not required and not any((pathlib.Path(path) / f).exists() for f in ("tokenizer.json", "vocab.json")):
    return None  # an image-only use of a CLIP dir converted without tokenizer files
  try:
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
  except Exception as e:  # transformers raises several types for a missing/broken tokenizer
    raise EmbedError(f"No usable tokenizer in {path} ({type(e).__name__}: {e}); copy the tokenizer files "
                     "there or convert with `--tokenizer DIR`") from e


def load(path: str | os.PathLike, **kw) -> Encoder:
  """Loads a converted dir, or a Hugging Face dir (converted in memory)."""
  return Encoder.from_dir(path, **kw)


def read_texts(path: str | os.PathLike, field: str | None = None) -> list[str]:
  """`.txt`: one text a line. `.jsonl`: one JSON object a line, text under `field`."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"Input file not found: {path}")
  raw = path.read_text(encoding="utf-8")
  if path.suffix == ".jsonl":
    if not field:
      raise EmbedError(f"{path.name} is JSONL: pass --field NAME (the key holding the text)")
    texts = []
    for n, line in enumerate(raw.splitlines(), 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise EmbedError(f"{path}:{n}: not valid JSON ({e.msg})") from e
      if not isinstance(row, dict) or field not in row:
        raise EmbedError(f"{path}:{n}: no field {field!r}")
      if not isinstance(row[field], str):
        raise EmbedError(f"{path}:{n}: field {field!r} is not a string")
      texts.append(row[field])
  else:
    if field:
      raise EmbedError("--field applies to .jsonl input only")
    texts = raw.splitlines()
  if not texts:
    raise EmbedError(f"{path} holds no texts")
  return texts


def read_image_list(path: str | os.PathLike) -> list[str]:
  """One image path a line (blank lines skipped); relative paths resolve against the list's folder."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"Image list not found: {path}")
  items = [l.strip() for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
  if not items:
    raise EmbedError(f"{path} lists no images")
  return [p if os.path.isabs(p) else str(path.parent / p) for p in items]


def main(argv: Sequence[str] | None = None) -> int:
  ap = cli.ArgumentParser(prog="python -m mmret_jax.embed",
                          description="Embed texts (or images) into an [N, D] float32 .npy.")
  ap.add_argument("--model", required=True, help="converted mmret_jax dir, training workdir, Hugging Face "
                                                 "model dir or sentence-transformers dir")
  src = ap.add_mutually_exclusive_group(required=True)
  src.add_argument("--input", help=".txt (one text a line) or .jsonl (with --field)")
  src.add_argument("--images", help="a file listing image paths, one a line (relative paths are taken "
                                    "from the list file's folder); needs a model with an image tower")
  ap.add_argument("--output", required=True, help="output .npy")
  ap.add_argument("--field", help="JSONL key holding the text")
  ap.add_argument("--pooling", choices=POOLINGS, default=None,
                  help="text pooling for BERT-family models (default: a sentence-transformers dir's own, "
                       "else cls; CLIP text is EOS-pooled)")
  ap.add_argument("--max-length", type=int, default=None,
                  help="tokens per text, longer texts are truncated (default: a sentence-transformers dir's "
                       "max_seq_length, else 512, capped by the model's limit)")
  ap.add_argument("--batch-size", type=int, default=32, help="texts (or images) per batch")
  ap.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                  help="L2-normalise the vectors (default: a sentence-transformers dir's own choice, else yes)")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
  args = ap.parse_args(argv)
  return cli.run(lambda: _embed(args))


def _embed(args) -> int:
  enable_compile_cache()
  if args.images:
    items = read_image_list(args.images)
    enc = load(args.model, dtype=args.dtype, verbose=True)
    normalize = args.normalize is not False
    emb = enc.encode_image(items, batch_size=args.batch_size, normalize=normalize, progress=True)
    what = f"image embeddings, {'L2-normalised' if normalize else 'raw'}"
  else:
    texts = read_texts(args.input, args.field)
    enc = load(args.model, dtype=args.dtype, verbose=True)
    emb = enc.encode_text(texts, pooling=args.pooling, max_length=args.max_length,
                          batch_size=args.batch_size, normalize=args.normalize, progress=True)
    used = enc.last_settings
    what = (f"{'projected text embeddings' if enc.has_image_tower else used['pooling'] + ' pooling'}, "
            f"{'L2-normalised' if used['normalize'] else 'raw'}, max_length {used['max_length']}")
    if enc.num_truncated:
      print(f"note: {enc.num_truncated} of {len(texts)} texts were longer than {enc.last_max_length} tokens "
            "and were truncated", file=sys.stderr)
  out = pathlib.Path(args.output)
  out.parent.mkdir(parents=True, exist_ok=True)
  np.save(out, emb)
  print(f"wrote {out}: {emb.shape[0]} x {emb.shape[1]} float32 ({what})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
