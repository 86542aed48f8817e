"""Writes deterministic synthetic stand-ins for FashionIQ / CIRR images in the official layout.

    python -m mmret_jax.data.samples.make_cir_images --dataset cirr --split val --image-root /tmp/cirr
    python -m mmret_jax.data.samples.make_cir_images --dataset fashioniq --image-root /tmp/fiq

Annotations default to the bundled real ones (`cir.sample_root`), which ship without images. Each
image is drawn from a SHA-256 of its name: a background colour and 1-3 coloured rectangles or
ellipses, at one of a few sizes whose aspect ratios are on both sides of the 1.25 targetpad
threshold. CIRR images go to the split file's paths (PNG), FashionIQ ones to `images/<ASIN>.jpg`.
Existing files are never overwritten, so real images already in place are kept.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
from collections.abc import Iterable, Sequence

from PIL import Image, ImageDraw

from mmret_jax.data.sources import cir

# (width, height): ratios 1.33, 0.75, 1.0, 2.0, 0.56 and 1.2 (below the 1.25 targetpad threshold).
SIZES = ((64, 48), (48, 64), (56, 56), (80, 40), (40, 72), (60, 50))
_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}


def synthetic_image(name: str) -> Image.Image:
  """A small RGB image that depends only on `name`."""
  h = hashlib.sha256(name.encode("utf-8")).digest()
  w, ht = SIZES[h[0] % len(SIZES)]
  img = Image.new("RGB", (w, ht), (h[1], h[2], h[3]))
  draw = ImageDraw.Draw(img)
  for s in range(1 + h[4] % 3):
    b = h[5 + 7 * s:12 + 7 * s]
    x0, y0 = b[0] % (w // 2), b[1] % (ht // 2)
    x1, y1 = x0 + w // 4 + b[2] % (w // 2), y0 + ht // 4 + b[3] % (ht // 2)
    shape = draw.ellipse if b[4] % 2 else draw.rectangle
    shape((x0, y0, x1, y1), fill=(b[5], b[6], 255 - b[5]))
  return img


def write_synthetic_images(source: cir.FashionIQ | cir.CIRR,
                           names: Iterable[str] | None = None) -> dict[str, int]:
  """Writes `synthetic_image(name)` at `source.image_path(name)` for each name, skipping existing files.

  Args:
    source: a loaded `cir.FashionIQ` or `cir.CIRR` (its `image_root` decides where files go).
    names: image names (default: `source.image_names()`, every image the split mentions).

  Returns:
    {"written": files created, "existing": files left alone because they were already there}.
  """
  counts = {"written": 0, "existing": 0}
  for name in source.image_names() if names is None else names:
    path = source.image_path(name)
    if path.exists():
      counts["existing"] += 1
      continue
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
      raise ValueError(f"cannot choose an image format for {path} (suffix {path.suffix!r})")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    synthetic_image(name).save(tmp, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    os.replace(tmp, path)
    counts["written"] += 1
  return counts


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--dataset", required=True, choices=["cirr", "fashioniq"])
  p.add_argument("--split", default="val", help="CIRR: train/val/test1; FashionIQ: train/val/test")
  p.add_argument("--root", default=None, help="annotation root (default: the bundled annotations)")
  p.add_argument("--image-root", required=True, help="where the image layout is written")
  p.add_argument("--max-images", type=int, default=None, help="only the first N names (sorted)")
  args = p.parse_args(argv)
  root = args.root if args.root is not None else cir.sample_root(args.dataset)
  source = cir.load(args.dataset, root, args.split, image_root=pathlib.Path(args.image_root))
  names = source.image_names()[:args.max_images]
  counts = write_synthetic_images(source, names)
  print(f"{source}: wrote {counts['written']} images under {source.image_root} "
        f"({counts['existing']} already existed)")


if __name__ == "__main__":
  main()
