"""mBLIP's training / evaluation JSON files (gregor-ge/mBLIP `src/tasks/vllm/data.py`) and their batches.

Files: a JSON list (or JSON lines, as `datasets.load_dataset("json")` also reads) of rows
  {"context": prompt, "label": target, "image_id": image path relative to an image root}
Eval files add "text_label" (the gold answer) and have "label": ""; MaRVL / NLVR2 rows name two images,
"left_image" and "right_image", instead of "image_id". A row that is not an object, lacks a field or has a
non-string one is skipped and counted (`JsonRows.report`). One file holds single- or two-image rows, not both.

Images are looked up under one or more roots, the first root holding the file wins (the seed's loop keeps
the last one; the files are meant to be in one root only). A missing or undecodable image becomes a zeros
image in normalised space, as the seed's `torch.zeros((3, 224, 224))`, and is counted (`MblipImages`).
Train transform (`augment = "mblip"`): RandomResizedCrop(size, (0.5, 1), bicubic) + horizontal flip
(data/augment.py `mblip_train`), drawn per (seed, epoch, row); eval: resize to size x size, bicubic (the
`Blip2Processor`); both then /255 and CLIP mean / std. Pixels [B, H, W, 3] or, two images a row, [B, 2, H, W, 3].

Tokenisation (`TokenizeCLM`, `DataCollatorForVisualCLM`), `max_len` (128) for context and target separately:
  encoder-decoder (mT0): input_ids = tok(template.format(context)) (the tokenizer's own </s> appended),
    labels = tok(label) (+ </s>); input_ids right padded with pad (mask 0), labels with -100.
  decoder-only (BLOOMZ): ids = ctx + tgt + [eos] (no special tokens of the tokenizer's own), labels =
    [-100] * len(ctx) + tgt + [eos]; LEFT padded (pad id, mask 0, label -100). Rows with an empty label
    (eval files) keep input_ids = ctx and labels = tgt ids as the seed does (then unused).
Lengths are padded to a multiple of 8 (the seed's collator) or up to the smallest of `buckets` that fits
(fewer distinct shapes, one compile each); a batch longer than every bucket falls back to a multiple of 8.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import pathlib
import sys
from typing import Any, Sequence

import numpy as np

from mmret_jax.data import augment
from mmret_jax.data import image as image_lib

SAMPLE_DIR = "mblip"
REQUIRED = ("context", "label")
IMAGE_FIELDS = (("image_id",), ("left_image", "right_image"))


@dataclasses.dataclass(frozen=True)
class Row:
  context: str
  label: str
  images: tuple[str, ...]  # 1 (image_id) or 2 (left_image, right_image) relative paths
  text_label: str | None = None


def _parse_row(obj: Any) -> tuple[Row | None, str]:
  """(Row, "") or (None, why it is malformed)."""
  if not isinstance(obj, dict):
    return None, f"not an object ({type(obj).__name__})"
  for k in REQUIRED:
    if not isinstance(obj.get(k), str):
      return None, f"field {k!r} missing or not a string"
  for fields in IMAGE_FIELDS:
    if all(isinstance(obj.get(f), str) and obj.get(f) for f in fields):
      tl = obj.get("text_label")
      return Row(obj["context"], obj["label"], tuple(obj[f] for f in fields),
                 None if tl is None else str(tl)), ""
  return None, "no image field (image_id, or left_image + right_image)"


class JsonRows:
  """The rows of one mBLIP JSON file, malformed ones skipped and counted (`skipped`, `report()`)."""

  def __init__(self, path: str | os.PathLike, label_map: dict[str, str] | None = None):
    """`label_map`: the seed's `target2str` (e.g. MaRVL's {"True": "yes", "False": "no"}) on non-empty labels."""
    self.path = pathlib.Path(path)
    if not self.path.is_file():
      raise FileNotFoundError(f"mBLIP data file not found: {self.path}")
    text = self.path.read_text(encoding="utf-8")
    try:
      objs = json.loads(text)
      if not isinstance(objs, list):
        raise ValueError(f"{self.path}: expected a JSON list of rows, got {type(objs).__name__}")
      where = [f"row {i}" for i in range(len(objs))]
    except json.JSONDecodeError:  # JSON lines
      objs, where = [], []
      for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
          continue
        try:
          objs.append(json.loads(line))
        except json.JSONDecodeError as e:
          objs.append(e)
        where.append(f"line {n}")
    self.rows: list[Row] = []
    self.problems: list[str] = []
    for obj, w in zip(objs, where):
      row, why = (None, f"invalid JSON ({obj.msg})") if isinstance(obj, json.JSONDecodeError) else _parse_row(obj)
      if row is None:
        self.problems.append(f"{w}: {why}")
      else:
        if label_map and row.label:
          row = dataclasses.replace(row, label=label_map.get(row.label, row.label))
        self.rows.append(row)
    counts = {len(r.images) for r in self.rows}
    if len(counts) > 1:
      raise ValueError(f"{self.path} mixes single-image (image_id) and two-image (left_image / right_image) rows")
    self.images_per_row = counts.pop() if counts else 1

  @property
  def skipped(self) -> int:
    return len(self.problems)

  def report(self) -> str:
    line = f"{len(self.rows)} rows from {self.path.name}"
    if self.problems:
      line += f", {self.skipped} malformed skipped (e.g. {'; '.join(self.problems[:3])})"
    return line


def split_train_val(rows: Sequence[Row], val_size: int) -> tuple[list[Row], list[Row]]:
  """The seed's `train[val_size:]` / `train[:val_size]` (file order, 500 by default)."""
  if val_size < 0:
    raise ValueError(f"data.val_size must be >= 0, got {val_size}")
  if val_size >= len(rows):
    raise ValueError(f"data.val_size {val_size} leaves no training row of {len(rows)}")
  return list(rows[val_size:]), list(rows[:val_size])


# ----------------------------------------------------------------------------- images

class ImageResolver:
  """Relative image path -> the path under the first root that has it (None if none); cached."""

  def __init__(self, roots: Sequence[str | os.PathLike]):
    if not roots:
      raise ValueError("data.image_roots is empty: give at least one image root")
    self.roots = [pathlib.Path(str(r)) for r in roots]
    self._cache: dict[str, str | None] = {}

  def __call__(self, rel: str) -> str | None:
    if rel not in self._cache:
      self._cache[rel] = next((str(r / rel) for r in self.roots if (r / rel).is_file()), None)
    return self._cache[rel]


def eval_image_config(size: int) -> image_lib.ImageConfig:
  """`Blip2Processor`: resize to size x size (bicubic), /255, CLIP mean / std; RGB via convert (alpha dropped)."""
  return image_lib.ImageConfig(size=(size, size), crop_size=None, do_center_crop=False, alpha="drop")


class MblipImages:
  """Image paths (relative, one or two a row) -> float32 pixels; unreadable ones are zeros, counted."""

  def __init__(self, resolver: ImageResolver, size: int, num_threads: int = 4):
    self.resolver, self.size, self.num_threads = resolver, size, num_threads
    self.cfg = eval_image_config(size)
    self.bad: set[str] = set()  # distinct paths that did not load (the seed prints each once)
    self.bad_loads = 0

  def __call__(self, rows_images: Sequence[tuple[str, ...]], augment_keys: Sequence | None = None) -> np.ndarray:
    """[B, H, W, 3] (one image a row) or [B, n, H, W, 3]; `augment_keys[b]`: mBLIP's train transform of row
    b's images, image j drawn from default_rng((*key, j))."""
    n = len(rows_images[0]) if rows_images else 1
    flat = [p for imgs in rows_images for p in imgs]
    out = np.zeros((len(flat), self.size, self.size, 3), np.float32)
    paths = [self.resolver(p) for p in flat]
    idx = [i for i, p in enumerate(paths) if p is not None]
    missing = [flat[i] for i, p in enumerate(paths) if p is None]
    failed = list(missing)
    if idx:
      aug = None
      if augment_keys is not None:
        keys = [(*augment_keys[i // n], i % n) for i in idx]
        aug = augment.keyed(augment.mblip_train, keys, size=self.size)
      batch, kept, errors = image_lib.preprocess_batch([paths[i] for i in idx], self.cfg, on_error="skip",
                                                       num_threads=self.num_threads, augment=aug)
      out[[idx[k] for k in kept]] = batch
      failed += [flat[idx[e.index]] for e in errors]
    self.bad_loads += len(failed)
    new = [p for p in failed if p not in self.bad]
    if new:
      self.bad.update(new)
      print(f"note: {len(new)} image(s) missing or unreadable, given a zeros image (e.g. {new[0]}); "
            f"{len(self.bad)} so far", file=sys.stderr)
    return out if n == 1 else out.reshape(len(rows_images), n, *out.shape[1:])


# ----------------------------------------------------------------------------- text

def tokenize_rows(tokenizer, contexts: Sequence[str], labels: Sequence[str], *, decoder_only: bool,
                  max_len: int = 128, template: str = "{}") -> tuple[list[list[int]], list[list[int]]]:
  """The seed's `TokenizeCLM`: (input ids, labels) per row (module docstring), unpadded."""
  prompts = [template.format(c) for c in contexts]
  if decoder_only:
    ctx = tokenizer(prompts, truncation=True, max_length=max_len, add_special_tokens=False)["input_ids"]
    tgt = tokenizer(list(labels), truncation=True, max_length=max_len, add_special_tokens=False)["input_ids"]
    if not all(labels):  # eval rows: the seed leaves them unmasked and without eos (never trained on)
      return [list(c) for c in ctx], [list(t) for t in tgt]
    eos = tokenizer.eos_token_id
    return ([list(c) + list(t) + [eos] for c, t in zip(ctx, tgt)],
            [[-100] * len(c) + list(t) + [eos] for c, t in zip(ctx, tgt)])
  ctx = tokenizer(prompts, truncation=True, max_length=max_len)["input_ids"]
  tgt = tokenizer(list(labels), truncation=True, max_length=max_len)["input_ids"]
  return [list(c) for c in ctx], [list(t) for t in tgt]


def padded_length(n: int, multiple_of: int = 8, buckets: Sequence[int] = ()) -> int:
  """The smallest bucket >= n, else n rounded up to a multiple of `multiple_of` (at least one of it)."""
  fit = [b for b in sorted(buckets) if b >= n]
  if fit:
    return int(fit[0])
  return max(multiple_of, -(-n // multiple_of) * multiple_of)


def _pad(seqs: Sequence[Sequence[int]], length: int, value: int, left: bool) -> np.ndarray:
  out = np.full((len(seqs), length), value, np.int32)
  for i, s in enumerate(seqs):
    s = np.asarray(s, np.int32)
    if len(s):
      if left:
        out[i, length - len(s):] = s
      else:
        out[i, :len(s)] = s
  return out


def collate(ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], *, pad_id: int, decoder_only: bool,
            multiple_of: int = 8, buckets: Sequence[int] = ()) -> dict[str, np.ndarray]:
  """`DataCollatorForVisualCLM`: {input_ids, attention_mask, labels} int32; right padding for the encoder-decoder,
  left for decoder-only (labels padded with -100 on the same side)."""
  left = decoder_only
  n_in = padded_length(max(len(s) for s in ids), multiple_of, buckets)
  n_lab = padded_length(max(len(s) for s in labels), multiple_of, buckets)
  if decoder_only:  # ids and labels are the same positions
    n_in = n_lab = max(n_in, n_lab)
  mask = _pad([[1] * len(s) for s in ids], n_in, 0, left)
  return {"input_ids": _pad(ids, n_in, pad_id, left), "attention_mask": mask,
          "labels": _pad(labels, n_lab, -100, left)}


def build_sample_tokenizer(texts: Sequence[str], style: str = "mt5", model_max_length: int = 512):
  """A word-level tokenizer over `texts` (sentencepiece-like: words split on spaces, each carrying "▁"):
  `style` "mt5" = mT5's special ids (<pad> 0, </s> 1, <unk> 2) and </s> appended to every sequence;
  "bloom" = BLOOM's (<unk> 0, <s> 1, </s> 2, <pad> 3), no tokens added, left padding. Deterministic: the
  vocabulary is the specials, then the words by frequency (ties by spelling)."""
  import collections  # pylint: disable=import-outside-toplevel
  import tokenizers  # pylint: disable=import-outside-toplevel
  from tokenizers import decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast
  if style not in ("mt5", "bloom"):
    raise ValueError(f"tokenizer style must be 'mt5' or 'bloom', got {style!r}")
  specials = ["<pad>", "</s>", "<unk>"] if style == "mt5" else ["<unk>", "<s>", "</s>", "<pad>"]
  pre = pre_tokenizers.Metaspace()
  counts = collections.Counter(w for t in texts for w, _ in pre.pre_tokenize_str(t))
  vocab = specials + [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if w not in specials]
  tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
  tok.pre_tokenizer, tok.decoder = pre, decoders.Metaspace()
  if style == "mt5":
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=model_max_length)
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                 bos_token="<s>", padding_side="left", model_max_length=model_max_length)


def sample_root() -> pathlib.Path:
  """The bundled sample (`mmret_jax/data/samples/mblip`): `train.json`, `marvl.json`, `images/`."""
  root = pathlib.Path(str(importlib.resources.files("mmret_jax.data.samples") / SAMPLE_DIR))
  if not (root / "train.json").is_file():
    raise FileNotFoundError(f"bundled mBLIP sample not found at {root}; regenerate it with "
                            "`python -m mmret_jax.data.samples.make_mblip_sample`")
  return root
