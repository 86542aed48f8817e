"""Image loading and CLIP-style preprocessing to channels-last float32 arrays.

`preprocess` mirrors HF `CLIPImageProcessor` (PIL backend, `transformers` `PilBackend`): resize
the shortest edge (`get_resize_output_image_size(..., default_to_square=False)`), PIL resampling,
`center_crop` (zero padding when the image is smaller than the crop), rescale, normalise. Output
is `[H, W, 3]` (NHWC once batched), not HF's `[3, H, W]`.

Optional padding before the resize, from CLIP4Cir / Bi-BLIP4CIR (`src/data_utils.py`):
* `targetpad`: zero-pad the short side, on both sides, only when the aspect ratio is at least
  `target_ratio`, up to that ratio (`TargetPad`);
* `squarepad`: zero-pad to a square (`SquarePad`; equal to targetpad with ratio 1).
Those repos crop with torchvision's `CenterCrop` (offsets `round((n - c) / 2)`, half to even),
which differs by one pixel from HF's `(n - c) // 2` when `n - c` is odd: `crop_offsets` picks.

Bad inputs: a missing file raises `FileNotFoundError`, an undecodable one `BadImageError`.
`preprocess_batch(..., on_error="skip")` and `PreprocessImage(skip_bad=True)` skip such images
and report them (returned error list / an `image_ok=False` flag), never silently.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import io
import json
import logging
import math
import os
import pathlib
from typing import Any, Callable, Iterator, Literal, NamedTuple, Sequence, Union

import grain
import numpy as np
import PIL.Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# PIL resampling codes (as stored in HF `preprocessor_config.json` "resample").
RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
PAD_MODES = ("none", "targetpad", "squarepad")
CROP_OFFSETS = ("hf", "torchvision")
ALPHA_MODES = ("white", "drop")

ImageInput = Union[str, os.PathLike, bytes, PIL.Image.Image, np.ndarray]
_CH = np.arange(3)

logger = logging.getLogger(__name__)


class BadImageError(ValueError):
  """An image that exists but cannot be decoded (corrupt, truncated, unsupported)."""


class ImageError(NamedTuple):
  """One skipped image: its position in the input, its path (or a description) and why."""
  index: int
  path: str
  reason: str


def _hw(v: int | Sequence[int] | None) -> tuple[int, int] | None:
  if v is None:
    return None
  if isinstance(v, (int, np.integer)):
    return (int(v), int(v))
  h, w = v
  return (int(h), int(w))


@dataclasses.dataclass(frozen=True)
class ImageConfig:
  """Preprocessing settings; field meanings follow HF `CLIPImageProcessor`.

  Attributes:
    size: int = resize the shortest edge to it (aspect kept); (h, w) = resize to exactly that;
      None = no resize.
    crop_size: center crop (h, w) (an int means square); used when `do_center_crop`.
    mean, std: per-channel normalisation after rescaling ((0, 0, 0), (1, 1, 1) = none).
    resample: PIL filter name, one of `RESAMPLE`.
    do_center_crop: crop (or zero-pad) to `crop_size` after the resize.
    do_convert_rgb: convert any mode to RGB; if False, a non-RGB image is a `BadImageError`.
    rescale_factor: applied to the uint8 pixels (1 = none).
    pad_mode: "none", "targetpad" or "squarepad" (zero padding before the resize).
    target_ratio: aspect ratio for "targetpad".
    crop_offsets: "hf" (`(n - c) // 2`) or "torchvision" (`round((n - c) / 2)`).
    alpha: "white" composites transparency onto white (HF `convert_to_rgb`, transformers >= 5);
      "drop" discards it (`PIL.Image.convert("RGB")`: OpenAI CLIP, torchvision pipelines).
  """
  size: int | tuple[int, int] | None = 224
  crop_size: int | tuple[int, int] | None = 224
  mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
  std: tuple[float, float, float] = OPENAI_CLIP_STD
  resample: str = "bicubic"
  do_center_crop: bool = True
  do_convert_rgb: bool = True
  rescale_factor: float = 1 / 255
  pad_mode: Literal["none", "targetpad", "squarepad"] = "none"
  target_ratio: float = 1.25
  crop_offsets: Literal["hf", "torchvision"] = "hf"
  alpha: Literal["white", "drop"] = "white"

  def __post_init__(self):
    # Normalise to hashable canonical forms (frozen: via object.__setattr__).
    if self.size is not None and not isinstance(self.size, (int, np.integer)):
      object.__setattr__(self, "size", _hw(self.size))
    elif self.size is not None:
      object.__setattr__(self, "size", int(self.size))
    object.__setattr__(self, "crop_size", _hw(self.crop_size))
    object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
    object.__setattr__(self, "std", tuple(float(x) for x in self.std))
    object.__setattr__(self, "rescale_factor", float(self.rescale_factor))
    if len(self.mean) != 3 or len(self.std) != 3:
      raise ValueError(f"mean/std need 3 values, got {self.mean}, {self.std}")
    for name, value, allowed in (("resample", self.resample, tuple(RESAMPLE)),
                                 ("pad_mode", self.pad_mode, PAD_MODES),
                                 ("crop_offsets", self.crop_offsets, CROP_OFFSETS),
                                 ("alpha", self.alpha, ALPHA_MODES)):
      if value not in allowed:
        raise ValueError(f"{name}={value!r}, expected one of {allowed}")
    if self.do_center_crop and self.crop_size is None:
      raise ValueError("do_center_crop needs crop_size")
    if self.pad_mode == "targetpad" and self.target_ratio < 1:
      raise ValueError(f"target_ratio must be >= 1, got {self.target_ratio}")

  @property
  def output_hw(self) -> tuple[int, int] | None:
    """(H, W) of every output, or None when it depends on the input."""
    if self.do_center_crop:
      return self.crop_size
    if isinstance(self.size, tuple):
      return self.size
    return None

  @classmethod
  def clip_default(cls, size: int = 224, **overrides) -> "ImageConfig":
    """OpenAI CLIP eval transform: shortest edge `size`, bicubic, center crop `size`."""
    return cls(**{"size": size, "crop_size": size, "mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD,
                  **overrides})

  @classmethod
  def bi_blip4cir(cls, size: int = 384, target_ratio: float = 1.25) -> "ImageConfig":
    """Bi-BLIP4CIR / CLIP4Cir `targetpad_transform(target_ratio, size)`, torchvision crop offsets."""
    return cls.clip_default(size, pad_mode="targetpad", target_ratio=target_ratio,
                            crop_offsets="torchvision", alpha="drop")

  @classmethod
  def from_preprocessor_config(cls, path_or_dict: str | os.PathLike | dict[str, Any],
                               **overrides) -> "ImageConfig":
    """Reads an HF `preprocessor_config.json` (a dict, the file, or its directory).

    Missing (or null) keys take `CLIPImageProcessor` defaults, except that a config with neither
    `crop_size` nor `do_center_crop` (e.g. BLIP's `{"height": 384, "width": 384}`) means no crop.
    `do_resize=False` -> size None, `do_rescale=False` -> rescale_factor 1,
    `do_normalize=False` -> mean 0 / std 1. `overrides` set our extra fields (pad_mode, ...).
    """
    d = path_or_dict
    if not isinstance(d, dict):
      p = pathlib.Path(d)
      if p.is_dir():
        p = p / "preprocessor_config.json"
      d = json.loads(p.read_text())
    d = {k: v for k, v in d.items() if v is not None}
    size = d.get("size", {"shortest_edge": 224})
    if isinstance(size, dict):
      keys = {k for k, v in size.items() if v is not None}
      if keys == {"shortest_edge"}:
        size = int(size["shortest_edge"])
      elif keys == {"height", "width"}:
        size = (int(size["height"]), int(size["width"]))
      else:
        raise ValueError(f"unsupported size {size} (only shortest_edge, or height and width)")
    elif isinstance(size, (int, float)):  # CLIP's default_to_square=False: an int is the short edge
      size = int(size)
    else:
      size = _hw(size)
    if not d.get("do_resize", True):
      size = None
    do_crop = bool(d.get("do_center_crop", "crop_size" in d))
    crop = d.get("crop_size", 224 if do_crop else None)
    if isinstance(crop, dict):
      crop = (int(crop["height"]), int(crop["width"])) if crop else None
    resample = d.get("resample", RESAMPLE["bicubic"])
    if not isinstance(resample, str):
      names = {v: k for k, v in RESAMPLE.items()}
      if int(resample) not in names:
        raise ValueError(f"unsupported resample code {resample}")
      resample = names[int(resample)]
    do_normalize = d.get("do_normalize", True)
    kwargs = dict(
        size=size,
        crop_size=crop,
        mean=tuple(d.get("image_mean", OPENAI_CLIP_MEAN)) if do_normalize else (0.0, 0.0, 0.0),
        std=tuple(d.get("image_std", OPENAI_CLIP_STD)) if do_normalize else (1.0, 1.0, 1.0),
        resample=resample,
        do_center_crop=do_crop,
        do_convert_rgb=bool(d.get("do_convert_rgb", True)),
        rescale_factor=float(d.get("rescale_factor", 1 / 255)) if d.get("do_rescale", True) else 1.0)
    return cls(**{**kwargs, **overrides})

  def to_preprocessor_dict(self) -> dict[str, Any]:
    """HF `CLIPImageProcessor` kwargs for the shared fields.

    Padding and torchvision crop offsets have no HF equivalent (ValueError); `alpha` has none
    either: transformers >= 5 composites onto white, 4.x drops alpha.
    """
    if self.pad_mode != "none" or self.crop_offsets != "hf":
      raise ValueError("pad_mode / crop_offsets have no CLIPImageProcessor equivalent")
    out = {"do_resize": self.size is not None, "resample": RESAMPLE[self.resample],
           "do_center_crop": self.do_center_crop, "do_rescale": self.rescale_factor != 1.0,
           "rescale_factor": self.rescale_factor, "do_normalize": True,
           "image_mean": list(self.mean), "image_std": list(self.std),
           "do_convert_rgb": self.do_convert_rgb}
    if isinstance(self.size, int):
      out["size"] = {"shortest_edge": self.size}
    elif self.size is not None:
      out["size"] = {"height": self.size[0], "width": self.size[1]}
    if self.crop_size is not None:
      out["crop_size"] = {"height": self.crop_size[0], "width": self.crop_size[1]}
    return out


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------
def _describe(src: Any) -> str:
  if isinstance(src, (str, os.PathLike)):
    return os.fspath(src)
  if isinstance(src, bytes):
    return f"<{len(src)} bytes>"
  return f"<{type(src).__name__}>"


def _from_array(a: np.ndarray) -> PIL.Image.Image:
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
    raise BadImageError(f"array of shape {a.shape} is not [H, W], [H, W, 1|3|4]")
  if a.dtype == np.bool_:
    a = a.astype(np.uint8) * 255
  elif a.dtype == np.uint16:
    return _to_uint8_16bit(a)
  elif np.issubdtype(a.dtype, np.floating):
    if a.size and (np.nanmin(a) < 0 or np.nanmax(a) > 1):
      raise BadImageError("float image array must lie in [0, 1]")
    a = np.round(a * 255).astype(np.uint8)
  elif a.dtype != np.uint8:
    raise BadImageError(f"unsupported array dtype {a.dtype}")
  return PIL.Image.fromarray(np.ascontiguousarray(a))


def _to_uint8_16bit(a: np.ndarray) -> PIL.Image.Image:
  # 0..65535 -> 0..255. (PIL's convert("RGB") of "I;16" clips at 255, whitening most photos.)
  a = np.clip(np.round(a.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
  return PIL.Image.fromarray(a)


def _to_rgb(img: PIL.Image.Image, alpha: str) -> PIL.Image.Image:
  if img.mode == "RGB":
    return img
  if img.mode.startswith("I;16") or img.mode == "I":  # 16-bit grey (PNG); "I" read as 16-bit
    img = _to_uint8_16bit(np.asarray(img))
    return img.convert("RGB")
  has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
  if has_alpha and alpha == "white":  # HF convert_to_rgb: composite onto an opaque white canvas
    rgba = img.convert("RGBA")
    canvas = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return PIL.Image.alpha_composite(canvas, rgba).convert("RGB")
  return img.convert("RGB")  # L, LA/RGBA (alpha dropped), P, CMYK, YCbCr, 1, ...


@contextlib.contextmanager
def _decoding(path: str) -> Iterator[None]:
  """Turns any decoder failure into `BadImageError` naming `path`."""
  try:
    yield
  except MemoryError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # PIL's decoders raise many types on corrupt data (UnidentifiedImageError and truncation are
    # OSError, broken PNG chunks SyntaxError, DecompressionBombError, struct.error, EOFError, ...).
    raise BadImageError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e


def load_image(src: ImageInput, *, convert_rgb: bool = True,
               alpha: Literal["white", "drop"] = "white") -> PIL.Image.Image:
  """Opens and fully decodes an image.

  Args:
    src: a path, encoded bytes, a PIL image, or a uint8 / uint16 / bool / [0, 1]-float array
      ([H, W] or [H, W, 1|3|4]).
    convert_rgb: return RGB (see `_to_rgb` for the mode rules); if False a non-RGB image raises.
    alpha: "white" (composite transparency onto white) or "drop".

  Returns:
    A decoded `PIL.Image` (mode RGB unless `convert_rgb=False`).

  Raises:
    FileNotFoundError: `src` is a path that does not exist.
    BadImageError: the data cannot be decoded (or is not RGB with `convert_rgb=False`).
  """
  if isinstance(src, (str, os.PathLike)):
    path = os.fspath(src)
    if not os.path.exists(path):
      raise FileNotFoundError(f"image not found: {path}")
    with _decoding(path):
      with open(path, "rb") as f:
        img = PIL.Image.open(f)
        img.load()
  elif isinstance(src, bytes):
    path = _describe(src)
    with _decoding(path):
      img = PIL.Image.open(io.BytesIO(src))
      img.load()
  elif isinstance(src, PIL.Image.Image):
    path, img = _describe(src), src
    with _decoding(path):
      img.load()  # a lazily opened image decodes here
  elif isinstance(src, np.ndarray):
    path, img = _describe(src), _from_array(src)
  else:
    raise TypeError(f"unsupported image input {type(src).__name__}")
  if not convert_rgb:
    if img.mode != "RGB":
      raise BadImageError(f"image {path} has mode {img.mode} and do_convert_rgb is False")
    return img
  with _decoding(path):
    return _to_rgb(img, alpha)


# ---------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------
def resize_output_hw(h: int, w: int, size: int | tuple[int, int]) -> tuple[int, int]:
  """Output (h, w): HF `get_resize_output_image_size(default_to_square=False)` for an int."""
  if isinstance(size, tuple):
    return size
  short, long = (w, h) if w <= h else (h, w)
  new_short, new_long = size, int(size * long / short)  # truncation, as HF / torchvision
  return (new_long, new_short) if w <= h else (new_short, new_long)


def pad_amounts(w: int, h: int, target_ratio: float) -> tuple[int, int]:
  """CLIP4Cir `TargetPad` per-side zero padding (left/right hp, top/bottom vp) for a w x h image.

  No padding when max/min < target_ratio; else each side gets `int((max / ratio - side) / 2)`
  (truncated, floored at 0). `target_ratio=1` gives `SquarePad`.
  """
  if max(w, h) / min(w, h) < target_ratio:
    return 0, 0
  scaled = max(w, h) / target_ratio
  return max(int((scaled - w) / 2), 0), max(int((scaled - h) / 2), 0)


def pad_to_ratio(img: PIL.Image.Image, target_ratio: float) -> PIL.Image.Image:
  """Zero-pads `img` symmetrically by `pad_amounts` (torchvision `F.pad(img, [hp, vp, hp, vp], 0)`)."""
  w, h = img.size
  hp, vp = pad_amounts(w, h, target_ratio)
  if not hp and not vp:
    return img
  canvas = PIL.Image.new(img.mode, (w + 2 * hp, h + 2 * vp), 0)
  canvas.paste(img, (hp, vp))
  return canvas


def _crop_window(n: int, c: int, mode: str) -> tuple[int, int, int]:
  """(src_start, src_stop, dst_start) for a center crop of length c from length n, one axis."""
  if n >= c:
    start = (n - c) // 2 if mode == "hf" else int(round((n - c) / 2.0))  # round: half to even
    return start, start + c, 0
  # Too small: the image lands in a zero canvas of length c.
  dst = math.ceil((c - n) / 2) if mode == "hf" else (c - n) // 2
  return 0, n, dst


@functools.lru_cache(maxsize=32)
def _lut(rescale_factor: float, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
  """[256, 3] float32: uint8 value -> normalised value per channel, in HF's arithmetic."""
  v = (np.arange(256, dtype=np.float64) * rescale_factor).astype(np.float32)  # HF rescale
  return (v[:, None] - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _resized(img: PIL.Image.Image, cfg: ImageConfig) -> np.ndarray:
  if cfg.pad_mode == "targetpad":
    img = pad_to_ratio(img, cfg.target_ratio)
  elif cfg.pad_mode == "squarepad":
    img = pad_to_ratio(img, 1.0)
  if cfg.size is not None:
    h, w = resize_output_hw(img.height, img.width, cfg.size)
    img = img.resize((w, h), resample=RESAMPLE[cfg.resample])
  return np.asarray(img)


def _fill(arr: np.ndarray, cfg: ImageConfig, out: np.ndarray) -> None:
  """Center-crops uint8 [h, w, 3] `arr` into `out` [H, W, 3] float32 and normalises."""
  lut = _lut(cfg.rescale_factor, cfg.mean, cfg.std)
  if not cfg.do_center_crop:
    out[...] = lut[arr, _CH]
    return
  ch, cw = cfg.crop_size
  y0, y1, dy = _crop_window(arr.shape[0], ch, cfg.crop_offsets)
  x0, x1, dx = _crop_window(arr.shape[1], cw, cfg.crop_offsets)
  if dy or dx or y1 - y0 < ch or x1 - x0 < cw:
    out[...] = lut[0]  # zero pixels, normalised (HF pads before rescaling)
  out[dy:dy + y1 - y0, dx:dx + x1 - x0] = lut[arr[y0:y1, x0:x1], _CH]


def preprocess(img: ImageInput, cfg: ImageConfig) -> np.ndarray:
  """Loads (if needed), pads, resizes, center-crops, rescales, normalises -> float32 [H, W, 3]."""
  arr = _resized(load_image(img, convert_rgb=cfg.do_convert_rgb, alpha=cfg.alpha), cfg)
  hw = cfg.crop_size if cfg.do_center_crop else arr.shape[:2]
  out = np.empty((*hw, 3), np.float32)
  _fill(arr, cfg, out)
  return out


def black_image(cfg: ImageConfig) -> np.ndarray:
  """A black RGB image through `cfg` (float32 [H, W, 3], normalised): the stand-in for a missing one."""
  hw = cfg.output_hw
  if hw is None:
    raise ValueError("black_image needs a fixed output size")
  return preprocess(PIL.Image.new("RGB", (hw[1], hw[0])), cfg)


def targetpad(img: ImageInput, target_ratio: float = 1.25, size: int = 384) -> np.ndarray:
  """Bi-BLIP4CIR `targetpad_transform(target_ratio, size)` -> float32 [size, size, 3].

  Same as `preprocess(img, ImageConfig.bi_blip4cir(size, target_ratio))`; for other settings
  (e.g. HF crop offsets) use an `ImageConfig` with `pad_mode="targetpad"`.
  """
  return preprocess(img, ImageConfig.bi_blip4cir(size, target_ratio))


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------
def preprocess_batch(items: Sequence[ImageInput], cfg: ImageConfig, *,
                     on_error: Literal["raise", "skip"] = "raise", num_threads: int = 0,
                     augment: Callable[[int, PIL.Image.Image], PIL.Image.Image] | None = None
                     ) -> tuple[np.ndarray, np.ndarray, list[ImageError]]:
  """Preprocesses `items` into one preallocated float32 [N, H, W, 3] batch.

  Args:
    items: paths, bytes, PIL images or arrays.
    cfg: must give a fixed output size (`cfg.output_hw`).
    on_error: "raise" re-raises the first `FileNotFoundError` / `BadImageError`; "skip" leaves
      the item out and records it.
    num_threads: > 1 decodes in a thread pool (PIL releases the GIL while decoding / resizing).
    augment: `augment(i, image)` -> image, applied to item i after decoding, before `cfg`'s resize /
      crop / normalisation (e.g. `augment.keyed(augment.blip_train, keys, size=...)`).

  Returns:
    (batch [N_kept, H, W, 3], kept_indices int64 [N_kept] into `items`, errors as
    `ImageError(index, path, reason)`, in input order).
  """
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error={on_error!r}, expected 'raise' or 'skip'")
  hw = cfg.output_hw
  if hw is None:
    raise ValueError("preprocess_batch needs a fixed output size (do_center_crop or size=(h, w))")
  out = np.empty((len(items), *hw, 3), np.float32)

  def work(i: int) -> ImageError | None:
    try:
      img = load_image(items[i], convert_rgb=cfg.do_convert_rgb, alpha=cfg.alpha)
      _fill(_resized(augment(i, img) if augment is not None else img, cfg), cfg, out[i])
    except (FileNotFoundError, BadImageError) as e:
      if on_error == "raise":
        raise
      return ImageError(i, _describe(items[i]), f"{type(e).__name__}: {e}")
    return None

  if num_threads > 1:
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
      results = list(pool.map(work, range(len(items))))
  else:
    results = [work(i) for i in range(len(items))]
  errors = [r for r in results if r is not None]
  if not errors:
    return out, np.arange(len(items), dtype=np.int64), errors
  bad = {e.index for e in errors}
  kept = np.array([i for i in range(len(items)) if i not in bad], dtype=np.int64)
  return out[kept], kept, errors


@dataclasses.dataclass(frozen=True)
class ImageBatcher:
  """Iterates `preprocess_batch` over `items` in chunks of `batch_size` (e.g. to embed a gallery).

  Yields (batch, kept_indices, errors) per chunk; indices refer to positions in `items`.
  """
  cfg: ImageConfig
  batch_size: int = 64
  on_error: Literal["raise", "skip"] = "raise"
  num_threads: int = 0

  def __call__(self, items: Sequence[ImageInput]
               ) -> Iterator[tuple[np.ndarray, np.ndarray, list[ImageError]]]:
    for start in range(0, len(items), self.batch_size):
      batch, kept, errors = preprocess_batch(items[start:start + self.batch_size], self.cfg,
                                             on_error=self.on_error, num_threads=self.num_threads)
      yield batch, kept + start, [e._replace(index=e.index + start) for e in errors]


@dataclasses.dataclass(frozen=True)
class PreprocessImage(grain.transforms.Map):
  """grain map: record[path_key] (relative to `image_root`) -> record[output_key] float32 [H, W, 3].

  With `skip_bad` (default) a missing, empty or undecodable image gives zeros and
  `record[ok_key] = False` (logged with its reason) instead of raising; good images give
  `ok_key = True`. This transform keeps no counters (grain may run it in worker processes): the
  trainer counts the `False` flags of each batch and drops / masks those rows, so every bad row
  is skipped and counted. Other record fields pass through unchanged.
  """
  cfg: ImageConfig
  image_root: str = ""
  path_key: str = "image_path"
  output_key: str = "image"
  ok_key: str = "image_ok"
  skip_bad: bool = True

  def map(self, record: dict[str, Any]) -> dict[str, Any]:
    out = dict(record)
    rel = record.get(self.path_key)
    path = os.path.join(self.image_root, os.fspath(rel)) if rel else None
    try:
      if path is None:
        raise FileNotFoundError(f"record has no {self.path_key!r}")
      out[self.output_key] = preprocess(path, self.cfg)
      out[self.ok_key] = np.bool_(True)
    except (FileNotFoundError, BadImageError) as e:
      if not self.skip_bad:
        raise
      hw = self.cfg.output_hw
      if hw is None:
        raise ValueError("skip_bad needs a fixed output size to emit a zero image") from e
      logger.warning("skipping image %s: %s", path, e)
      out[self.output_key] = np.zeros((*hw, 3), np.float32)
      out[self.ok_key] = np.bool_(False)
    return out
