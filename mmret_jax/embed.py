"""Embed texts with a converted (or Hugging Face) model: CLI and Python API.

    python -m mmret_jax.embed --model DIR --input texts.txt --output emb.npy
    enc = mmret_jax.load(DIR); emb = enc.encode_text(["a kettle", "gloves"])

Defaults follow the BLaIR README: CLS vector of `last_hidden_state`,
L2-normalised, `max_length` 512. Batches are padded to a fixed set of lengths
(powers of two up to `max_length`) and a fixed batch size, so the jitted
forward compiles once per length bucket, never per batch.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys
from typing import Sequence

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from mmret_jax.losses import l2_normalize  # pylint: disable=wrong-import-position

POOLINGS = ("cls", "mean")
DEFAULT_MAX_LENGTH = 512


class EmbedError(ValueError):
  """Bad user input to the embedder (message says what to change)."""


def length_buckets(max_length: int, smallest: int = 16) -> list[int]:
  """Padded lengths used for batches: powers of two from `smallest`, capped by `max_length`."""
  out, n = [], smallest
  while n < max_length:
    out.append(n)
    n *= 2
  return out + [max_length]


def pool(hidden: jax.Array, mask: jax.Array, pooling: str) -> jax.Array:
  """[B, L, D], [B, L] -> [B, D] float32. `cls`: position 0; `mean`: mean over unmasked tokens."""
  hidden = hidden.astype(jnp.float32)
  if pooling == "cls":
    return hidden[:, 0]
  if pooling == "mean":
    m = mask.astype(jnp.float32)[..., None]
    return (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
  raise EmbedError(f"Unknown pooling {pooling!r}; choose from {POOLINGS}")


class Encoder:
  """A loaded model + tokenizer. Build with `mmret_jax.load(DIR)`."""

  def __init__(self, model, params, tokenizer, *, meta: dict, hf_config: dict, path: str):
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.meta, self.hf_config, self.path = meta, hf_config, path
    self.num_truncated = 0  # texts truncated by the last encode_text call
    self.last_max_length = None

  @classmethod
  def from_dir(cls, path: str | os.PathLike, *, dtype: str = "float32", verbose: bool = False) -> "Encoder":
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
    model = convert.build_model(meta, hf_config, dtype=jnp.dtype(dtype))
    tokenizer = _load_tokenizer(path, required=meta.get("family") != "clip")
    return cls(model, jax.device_put(params), tokenizer, meta=meta, hf_config=hf_config, path=str(path))

  @property
  def family(self) -> str:
    return self.meta.get("family", "bert")

  @property
  def is_clip(self) -> bool:
    return self.family == "clip"

  @property
  def max_positions(self) -> int:
    """Longest input the position table allows (RoBERTa reserves pad_token_id + 1 slots)."""
    if self.is_clip:
      return self.model.config.text.max_position_embeddings
    c = self.model.config
    return c.max_position_embeddings - (c.pad_token_id + 1 if c.is_roberta else 0)

  @property
  def dim(self) -> int:
    return self.model.config.projection_dim if self.is_clip else self.model.config.hidden_size

  @functools.partial(jax.jit, static_argnums=(0, 4, 5))
  def _forward(self, params, ids, mask, pooling: str, normalize: bool):
    if self.is_clip:  # EOS-pooled, projected (HF get_text_features)
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
    """Preprocessing from the model dir's preprocessor_config.json, else OpenAI CLIP defaults."""
    from mmret_jax.data import image  # pylint: disable=import-outside-toplevel
    cfg_file = pathlib.Path(self.path) / "preprocessor_config.json"
    if cfg_file.exists():
      return image.ImageConfig.from_preprocessor_config(cfg_file)
    return image.ImageConfig.clip_default(self.model.config.vision.image_size)

  def encode_image(self, images: Sequence, *, batch_size: int = 32, normalize: bool = True,
                   progress: bool = False) -> np.ndarray:
    """Embeds images (paths, PIL images or HWC arrays) -> float32 [N, D] in input order.

    A missing or corrupt image is an error naming it (embedding must not drop rows).
    """
    from mmret_jax.data import image  # pylint: disable=import-outside-toplevel
    if not self.is_clip:
      raise EmbedError(f"{self.path} is a text model ({self.family}); it has no image tower")
    if isinstance(images, (str, os.PathLike)):
      raise EmbedError("encode_image takes a list of images, not one")
    cfg = self.image_config()
    out = np.zeros((len(images), self.dim), np.float32)
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    for start in tqdm(range(0, len(images), batch_size), desc="embedding images", unit="batch",
                      disable=not progress):
      chunk = list(images[start:start + batch_size])
      pixels, _, _ = image.preprocess_batch(chunk, cfg, on_error="raise", num_threads=2)
      if len(chunk) < batch_size:  # fixed shape: one compilation
        pixels = np.concatenate([pixels, np.zeros((batch_size - len(chunk), *pixels.shape[1:]), np.float32)])
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

  def encode_text(self, texts: Sequence[str], *, pooling: str | None = None, max_length: int | None = None,
                  batch_size: int = 32, normalize: bool = True, progress: bool = False) -> np.ndarray:
    """Embeds `texts` -> float32 [N, D] in input order.

    `max_length` defaults to 512 (BLaIR), or less if the model's position table is shorter.
    `pooling`: cls (default) | mean for BERT-family models; CLIP text is EOS-pooled and projected.
    """
    if self.tokenizer is None:
      raise EmbedError(f"No tokenizer in {self.path}: copy the tokenizer files there to embed text")
    if self.is_clip:
      if pooling not in (None, "eos"):
        raise EmbedError("CLIP text embeddings are EOS-pooled and projected; --pooling does not apply")
      pooling = "eos"
    pooling = pooling or "cls"
    if max_length is None:
      max_length = min(DEFAULT_MAX_LENGTH, self.max_positions)
    if isinstance(texts, str):
      raise EmbedError("encode_text takes a list of strings, not one string")
    if pooling not in POOLINGS and not self.is_clip:
      raise EmbedError(f"Unknown pooling {pooling!r}; choose from {POOLINGS}")
    if max_length < 2 or batch_size < 1:
      raise EmbedError("max_length must be >= 2 and batch_size >= 1")
    if max_length > self.max_positions:
      raise EmbedError(f"max_length {max_length} exceeds what this model supports ({self.max_positions})")
    self.last_max_length = max_length
    d = self.dim
    if len(texts) == 0:
      return np.zeros((0, d), np.float32)
    ids = self.tokenize(texts, max_length)
    pad = self.tokenizer.pad_token_id
    if pad is None:
      raise EmbedError("The tokenizer has no pad token")
    buckets = length_buckets(max_length)
    order = np.argsort([len(x) for x in ids], kind="stable")  # similar lengths share a bucket
    out = np.zeros((len(texts), d), np.float32)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    for idx in tqdm(batches, desc="embedding", unit="batch", disable=not progress):
      longest = max(len(ids[i]) for i in idx)
      length = next(b for b in buckets if b >= longest)
      arr = np.full((batch_size, length), pad, np.int32)
      mask = np.zeros((batch_size, length), np.int32)
      for row, i in enumerate(idx):
        arr[row, :len(ids[i])] = ids[i]
        mask[row, :len(ids[i])] = 1
      mask[len(idx):, 0] = 1  # filler rows: keep softmax finite; their outputs are dropped
      emb = self._forward(self.params, jnp.asarray(arr), jnp.asarray(mask), pooling, normalize)
      out[idx] = np.asarray(emb)[:len(idx)]
    return out


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
  ap = argparse.ArgumentParser(prog="python -m mmret_jax.embed",
                               description="Embed texts into an [N, D] float32 .npy (L2-normalised by default).")
  ap.add_argument("--model", required=True, help="converted mmret_jax dir or Hugging Face model dir")
  src = ap.add_mutually_exclusive_group(required=True)
  src.add_argument("--input", help=".txt (one text a line) or .jsonl (with --field)")
  src.add_argument("--images", help="a file listing image paths, one a line (relative paths are taken "
                                    "from the list file's folder); needs a model with an image tower")
  ap.add_argument("--output", required=True, help="output .npy")
  ap.add_argument("--field", help="JSONL key holding the text")
  ap.add_argument("--pooling", choices=POOLINGS, default=None,
                  help="text pooling for BERT-family models (default cls; CLIP text is EOS-pooled)")
  ap.add_argument("--max-length", type=int, default=None,
                  help="tokens per text, longer texts are truncated (default: 512 or the model's limit)")
  ap.add_argument("--batch-size", type=int, default=32)
  ap.add_argument("--no-normalize", action="store_true", help="keep raw (unnormalised) vectors")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
  args = ap.parse_args(argv)
  try:
    if args.images:
      items = read_image_list(args.images)
      enc = load(args.model, dtype=args.dtype, verbose=True)
      emb = enc.encode_image(items, batch_size=args.batch_size, normalize=not args.no_normalize, progress=True)
      what = "image embeddings"
    else:
      texts = read_texts(args.input, args.field)
      enc = load(args.model, dtype=args.dtype, verbose=True)
      emb = enc.encode_text(texts, pooling=args.pooling, max_length=args.max_length,
                            batch_size=args.batch_size, normalize=not args.no_normalize, progress=True)
      what = "text embeddings" if enc.is_clip else f"{args.pooling or 'cls'} pooling"
  except (EmbedError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if not args.images and enc.num_truncated:
    print(f"note: {enc.num_truncated} of {len(texts)} texts were longer than {enc.last_max_length} tokens "
          "and were truncated", file=sys.stderr)
  out = pathlib.Path(args.output)
  out.parent.mkdir(parents=True, exist_ok=True)
  np.save(out, emb)
  print(f"wrote {out}: {emb.shape[0]} x {emb.shape[1]} float32 ({what}, "
        f"{'raw' if args.no_normalize else 'L2-normalised'})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
