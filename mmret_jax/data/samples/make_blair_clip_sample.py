"""Writes the bundled BLaIR-CLIP smoke sample: `blair_clip/pairs.tsv` + `blair_clip/images/*.png`.

    python -m mmret_jax.data.samples.make_blair_clip_sample

60 synthetic products (6 colours x 5 kinds x 2 brands); each image is a 32x32 "product photo": the
product's colour as a shape of its kind on a light background, with a brand mark. Reviews mention
the colour and kind (and sometimes the brand), so text -> image retrieval is learnable in minutes.
One row points at a missing image on purpose: training skips and counts it. Deterministic.
"""

from __future__ import annotations

import pathlib
import random

from PIL import Image, ImageDraw

OUT = pathlib.Path(__file__).resolve().parent / "blair_clip"
COLOURS = {"red": (200, 30, 30), "green": (30, 160, 60), "blue": (30, 60, 200), "yellow": (230, 200, 20),
           "purple": (130, 40, 160), "black": (20, 20, 20)}
KINDS = {"mug": "ellipse", "lamp": "triangle", "box": "rectangle", "vase": "diamond", "pillow": "rounded"}
BRANDS = {"acme": "left", "zeta": "right"}
OPINIONS = ["Love it.", "Works as described.", "Would buy again.", "Arrived quickly.", "Decent quality.",
            "Not bad for the price.", "Five stars."]


def draw(colour, kind, brand) -> Image.Image:
  img = Image.new("RGB", (32, 32), (235, 235, 230))
  d = ImageDraw.Draw(img)
  c = COLOURS[colour]
  box = (6, 6, 26, 26)
  shape = KINDS[kind]
  if shape == "ellipse":
    d.ellipse(box, fill=c)
  elif shape == "triangle":
    d.polygon([(16, 4), (28, 28), (4, 28)], fill=c)
  elif shape == "rectangle":
    d.rectangle(box, fill=c)
  elif shape == "diamond":
    d.polygon([(16, 3), (29, 16), (16, 29), (3, 16)], fill=c)
  else:
    d.rounded_rectangle((4, 9, 28, 23), radius=6, fill=c)
  x = 1 if BRANDS[brand] == "left" else 27
  d.rectangle((x, 1, x + 3, 4), fill=(90, 90, 90))
  return img


def main() -> None:
  rng = random.Random(0)
  (OUT / "images").mkdir(parents=True, exist_ok=True)
  items = [(c, k, b) for c in COLOURS for k in KINDS for b in BRANDS]
  for c, k, b in items:
    draw(c, k, b).save(OUT / "images" / f"{b}_{c}_{k}.png", optimize=True)
  rows = []
  for _ in range(20):
    for c, k, b in items:
      parts = [f"my {c} {k}", f"this {k} in {c}", f"the {c} one"] + ([f"from {b}"] if rng.random() < 0.5 else [])
      review = " ".join(rng.sample(parts, k=2)) + " " + rng.choice(OPINIONS)
      meta = f"{b.title()} {k.title()} {c.title()} {b.title()} makes this {c} {k} for everyday use."
      rows.append((review, meta, f"images/{b}_{c}_{k}.png"))
  rng.shuffle(rows)
  rows.insert(50, ("my white chair broke", "Acme Chair White", "images/missing_chair.png"))
  lines = ["review\tmeta\timage_path"] + ["\t".join(r) for r in rows]
  (OUT / "pairs.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
  print(f"wrote {len(rows)} rows, {len(items)} images to {OUT}")


if __name__ == "__main__":
  main()
