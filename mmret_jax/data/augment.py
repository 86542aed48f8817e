"""Training-time image augmentation, drawn from an explicit `np.random.Generator` so that a batch is a
function of (seed, epoch, row) and a resumed run sees the same pixels.

`blip_train` is BLIP's training transform as UniIR's BLIP variants use it (`get_blip_transform(size,
min_scale=0.5, is_train=True)`, shared/reference/uniir.md): torchvision `RandomResizedCrop(size, scale=(0.5,
1), bicubic)`, `RandomHorizontalFlip()`, then BLIP's `RandomAugment(N=2, M=5)` over Identity,
AutoContrast, Brightness, Sharpness, Equalize, ShearX/Y, TranslateX/Y, Rotate: two ops drawn with
replacement, each applied with probability 0.5; at M=5 (of 10) shear is +-0.15, translation +-5 px,
rotation +-15 degrees (sign drawn, gray 128 fill, bilinear), and the enhance factor (M/10)*1.8+0.1 is 1.0,
so Brightness and Sharpness leave the image as it is (as in the seed). The seed's OpenCV ops are the PIL
ones it states it reproduces (autocontrast, equalize, affine warps).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import PIL.Image
import PIL.ImageOps

MAX_LEVEL = 10
FILL = (128, 128, 128)
BLIP_OPS = ("Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize", "ShearX", "ShearY", "TranslateX",
            "TranslateY", "Rotate")


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator, scale=(0.5, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """torchvision `RandomResizedCrop.get_params`: (left, top, w, h); 10 tries, then the center crop
  clamped to the ratio range."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def _signed(level: float, rng: np.random.Generator) -> float:
  return -level if rng.random() > 0.5 else level


def warp(img: PIL.Image.Image, forward) -> PIL.Image.Image:
  """OpenCV `warpAffine(img, forward, borderValue=gray)`: `forward` (2 x 3) maps input pixel coordinates
  (integers at pixel centres) to output ones; bilinear. PIL wants the inverse map in coordinates whose
  pixel centres sit at +0.5, hence the shift of the offsets."""
  m = np.vstack([np.asarray(forward, np.float64), [0.0, 0.0, 1.0]])
  a, b, c, d, e, f = np.linalg.inv(m)[:2].ravel()
  c, f = c + 0.5 - 0.5 * (a + b), f + 0.5 - 0.5 * (d + e)
  return img.transform(img.size, PIL.Image.Transform.AFFINE, (a, b, c, d, e, f),
                       resample=PIL.Image.Resampling.BILINEAR, fillcolor=FILL)


def rotation_matrix(width: int, height: int, degrees: float) -> np.ndarray:
  """OpenCV `getRotationMatrix2D((w / 2, h / 2), degrees, 1)` (counter-clockwise for positive degrees)."""
  cx, cy = width / 2, height / 2
  al, be = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
  return np.asarray([[al, be, (1 - al) * cx - be * cy], [-be, al, be * cx + (1 - al) * cy]])


def apply_op(img: PIL.Image.Image, name: str, level: float, rng: np.random.Generator) -> PIL.Image.Image:
  """One RandomAugment op at `level` (0..MAX_LEVEL); signs are drawn from `rng` as the seed's."""
  if name == "Identity":
    return img
  if name == "AutoContrast":
    return PIL.ImageOps.autocontrast(img)
  if name == "Equalize":
    return PIL.ImageOps.equalize(img)
  if name in ("Brightness", "Sharpness"):
    factor = level / MAX_LEVEL * 1.8 + 0.1
    if abs(factor - 1.0) < 1e-12:
      return img
    return (brightness if name == "Brightness" else sharpness)(img, factor)
  if name in ("ShearX", "ShearY"):  # the seed's matrices [[1, s, 0], [0, 1, 0]] / [[1, 0, 0], [s, 1, 0]]
    s = _signed(level / MAX_LEVEL * 0.3, rng)
    return warp(img, [[1, s, 0], [0, 1, 0]] if name == "ShearX" else [[1, 0, 0], [s, 1, 0]])
  if name in ("TranslateX", "TranslateY"):  # [[1, 0, -t], [0, 1, 0]]: content moves by -t pixels
    t = _signed(level / MAX_LEVEL * 10.0, rng)
    return warp(img, [[1, 0, -t], [0, 1, 0]] if name == "TranslateX" else [[1, 0, 0], [0, 1, -t]])
  if name == "Rotate":
    deg = level / MAX_LEVEL * 30.0
    deg = -deg if rng.random() < 0.5 else deg
    return warp(img, rotation_matrix(img.width, img.height, deg))
  raise ValueError(f"unknown augmentation op {name!r}; known: {BLIP_OPS}")


def brightness(img: PIL.Image.Image, factor: float) -> PIL.Image.Image:
  """The seed's `brightness_func`: a lookup table value * factor, clipped, truncated to uint8."""
  table = (np.arange(256, dtype=np.float32) * np.float32(factor)).clip(0, 255).astype(np.uint8)
  return PIL.Image.fromarray(table[np.asarray(img)])


def sharpness(img: PIL.Image.Image, factor: float) -> PIL.Image.Image:
  """The seed's `sharpness_func`: blend with a 3x3 smoothing ([1 1 1; 1 5 1; 1 1 1] / 13, rounded to
  uint8 as OpenCV's filter2D) on the interior pixels only (the border rows / columns stay), float32
  blend truncated to uint8 (clipped to [0, 255] first, where the seed's cast of an out-of-range float is
  undefined)."""
  a = np.asarray(img).astype(np.float32)
  if a.shape[0] < 3 or a.shape[1] < 3:
    return img
  k = np.ones((3, 3), np.float32)
  k[1, 1] = 5
  k /= 13
  h, w = a.shape[:2]
  deg = sum(k[i, j] * a[i:h - 2 + i, j:w - 2 + j] for i in range(3) for j in range(3))
  deg = np.clip(np.rint(deg), 0, 255)
  out = a.copy()
  out[1:-1, 1:-1] = deg + np.float32(factor) * (a[1:-1, 1:-1] - deg)
  return PIL.Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def random_augment(img: PIL.Image.Image, rng: np.random.Generator, n: int = 2, m: int = 5,
                   ops: tuple[str, ...] = BLIP_OPS) -> PIL.Image.Image:
  """BLIP's `RandomAugment(N, M)`: N ops drawn with replacement, each applied with probability 0.5."""
  for name in rng.choice(np.asarray(ops), n):
    if rng.random() > 0.5:
      continue
    img = apply_op(img, str(name), m, rng)
  return img


def blip_train(img: PIL.Image.Image, rng: np.random.Generator, size: int, min_scale: float = 0.5
               ) -> PIL.Image.Image:
  """RandomResizedCrop(size, (min_scale, 1), bicubic) -> horizontal flip (p 0.5) -> RandomAugment(2, 5);
  a `size` x `size` RGB image, normalised afterwards like the eval transform."""
  img = img.convert("RGB") if img.mode != "RGB" else img
  left, top, w, h = random_resized_crop_box(img.width, img.height, rng, (min_scale, 1.0))
  img = img.resize((size, size), PIL.Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
  if rng.random() < 0.5:
    img = PIL.ImageOps.mirror(img)
  return random_augment(img, rng)


BAGFORMER_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX", "ShearY",
                 "TranslateX", "TranslateY", "Rotate")


def bagformer_train(img: PIL.Image.Image, rng: np.random.Generator, size: int) -> PIL.Image.Image:
  """BagFormer's training transform (MUGE_helper/dataset.py): RandomResizedCrop(size, (0.5, 1), bicubic)
  -> horizontal flip -> RandomAugment(2, 7) over its op list (same ops as BLIP's, another order);
  at M=7 the enhance factor is 1.36 (Brightness / Sharpness act), shear +-0.21, translation +-7 px,
  rotation +-21 degrees."""
  img = img.convert("RGB") if img.mode != "RGB" else img
  left, top, w, h = random_resized_crop_box(img.width, img.height, rng, (0.5, 1.0))
  img = img.resize((size, size), PIL.Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
  if rng.random() < 0.5:
    img = PIL.ImageOps.mirror(img)
  return random_augment(img, rng, n=2, m=7, ops=BAGFORMER_OPS)


def keyed(fn: Callable[..., PIL.Image.Image], keys, **kw) -> Callable[[int, PIL.Image.Image], PIL.Image.Image]:
  """`augment(i, img)` for `image.preprocess_batch`: item i drawn from `default_rng(keys[i])`."""
  return lambda i, img: fn(img, np.random.default_rng(keys[i]), **kw)


def mblip_train(img: PIL.Image.Image, rng: np.random.Generator, size: int, min_scale: float = 0.5
                ) -> PIL.Image.Image:
  """mBLIP's training transform (`LoadTransformImage(train=True)`): RandomResizedCrop(size, (min_scale, 1),
  bicubic) -> horizontal flip (p 0.5), no RandomAugment; normalised afterwards (CLIP mean / std)."""
  img = img.convert("RGB") if img.mode != "RGB" else img
  left, top, w, h = random_resized_crop_box(img.width, img.height, rng, (min_scale, 1.0))
  img = img.resize((size, size), PIL.Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
  return PIL.ImageOps.mirror(img) if rng.random() < 0.5 else img
