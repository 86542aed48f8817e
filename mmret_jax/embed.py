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


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


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
    meta, hf_config, params, on_the_fly = convert.load_any(path)
    if not convert.is_converted_dir(path) and convert.is_converted_dir(pathlib.Path(path) / "model"):
      path = pathlib.Path(path) / "model"  # a training workdir: its exported model
    if on_the_fly and verbose:
      print(f"note: {path} is a Hugging Face dir; converted in memory (save time next run with "
            f"`python -m mmret_jax.convert to-jax {path} DST`)", file=sys.stderr)
    if dtype not in ("float32", "bfloat16"):
      raise EmbedError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    model = convert.build_model(meta, hf_config, dtype=jnp.dtype(dtype))
    return cls(model, jax.device_put(params), _load_tokenizer(path), meta=meta, hf_config=hf_config,
               path=str(path))

  @property
  def max_positions(self) -> int:
    """Longest input the position table allows (RoBERTa reserves pad_token_id + 1 slots)."""
    c = self.model.config
    return c.max_position_embeddings - (c.pad_token_id + 1 if c.is_roberta else 0)

  @functools.partial(jax.jit, static_argnums=(0, 4, 5))
  def _forward(self, params, ids, mask, pooling: str, normalize: bool):
    out = self.model.apply({"params": params}, ids, mask)
    emb = pool(out["last_hidden_state"], mask, pooling)
    return l2_normalize(emb) if normalize else emb

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

  def encode_text(self, texts: Sequence[str], *, pooling: str = "cls", max_length: int | None = None,
                  batch_size: int = 32, normalize: bool = True, progress: bool = False) -> np.ndarray:
    """Embeds `texts` -> float32 [N, D] in input order.

    `max_length` defaults to 512 (BLaIR), or less if the model's position table is shorter.
    """
    if max_length is None:
      max_length = min(DEFAULT_MAX_LENGTH, self.max_positions)
    if isinstance(texts, str):
      raise EmbedError("encode_text takes a list of strings, not one string")
    if pooling not in POOLINGS:
      raise EmbedError(f"Unknown pooling {pooling!r}; choose from {POOLINGS}")
    if max_length < 2 or batch_size < 1:
      raise EmbedError("max_length must be >= 2 and batch_size >= 1")
    if max_length > self.max_positions:
      raise EmbedError(f"max_length {max_length} exceeds what this model supports ({self.max_positions})")
    self.last_max_length = max_length
    d = self.model.config.hidden_size
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


def _load_tokenizer(path):
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
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


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m mmret_jax.embed",
                               description="Embed texts into an [N, D] float32 .npy (L2-normalised by default).")
  ap.add_argument("--model", required=True, help="converted mmret_jax dir or Hugging Face model dir")
  ap.add_argument("--input", required=True, help=".txt (one text a line) or .jsonl (with --field)")
  ap.add_argument("--output", required=True, help="output .npy")
  ap.add_argument("--field", help="JSONL key holding the text")
  ap.add_argument("--pooling", choices=POOLINGS, default="cls")
  ap.add_argument("--max-length", type=int, default=None,
                  help="tokens per text, longer texts are truncated (default: 512 or the model's limit)")
  ap.add_argument("--batch-size", type=int, default=32)
  ap.add_argument("--no-normalize", action="store_true", help="keep raw (unnormalised) vectors")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
  args = ap.parse_args(argv)
  try:
    texts = read_texts(args.input, args.field)
    enc = load(args.model, dtype=args.dtype, verbose=True)
    emb = enc.encode_text(texts, pooling=args.pooling, max_length=args.max_length,
                          batch_size=args.batch_size, normalize=not args.no_normalize, progress=True)
  except (EmbedError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if enc.num_truncated:
    print(f"note: {enc.num_truncated} of {len(texts)} texts were longer than {enc.last_max_length} tokens "
          "and were truncated", file=sys.stderr)
  out = pathlib.Path(args.output)
  out.parent.mkdir(parents=True, exist_ok=True)
  np.save(out, emb)
  print(f"wrote {out}: {emb.shape[0]} x {emb.shape[1]} float32 ({args.pooling} pooling, "
        f"{'raw' if args.no_normalize else 'L2-normalised'})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
