"""Writes the bundled synthetic mBLIP sample (`mblip/`) in the seed's JSON formats.

    python -m mmret_jax.data.samples.make_mblip_sample            # rewrite mmret_jax/data/samples/mblip/
    python -m mmret_jax.data.samples.make_mblip_sample --out /tmp/mblip

48 x 48 PNG images of one coloured shape (red / blue / green / yellow x circle / square / triangle, 4 variants
each: position, size and background tint from a SHA-256 of the file name), and prompts in four languages
(en, de, fr, es) whose targets follow from the pixels, so a tiny model can learn them:
* `train.json` (a JSON list, `{"context", "label", "image_id"}`): per image two captions ("Caption the image
  in German." -> "Ein roter Kreis."), a colour question ("¿De qué color es la forma?" -> "rojo") and an
  English yes / no question about a colour + shape; shuffled with `SEED`. Deliberately bad, to exercise the
  counted skips: two malformed rows (no label; a numeric context) and one row whose image exists in no root
  (`missing/0000.png`: a zeros image, counted). The first 32 rows are the smoke runs' validation split.
* `marvl.json`: MaRVL-style two-image rows (`left_image`, `right_image`, `label` yes / no, `text_label`).
* images: `images/` holds most, `images_extra/` the variant-3 ones (a second image root).
PNG bytes depend on the zlib build; the JSON files are byte-for-byte reproducible.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import random

from PIL import Image, ImageDraw

SEED = 20230713
SIZE = 48
VARIANTS = 4
COLOURS = {"red": (215, 35, 35), "blue": (35, 70, 215), "green": (30, 160, 60), "yellow": (235, 205, 25)}
SHAPES = ("circle", "square", "triangle")
# per language: (caption prompt, colour question, colour words, shape words, caption template)
COLOUR_WORDS = {"en": {"red": "red", "blue": "blue", "green": "green", "yellow": "yellow"},
                "de": {"red": "rot", "blue": "blau", "green": "grün", "yellow": "gelb"},
                "fr": {"red": "rouge", "blue": "bleu", "green": "vert", "yellow": "jaune"},
                "es": {"red": "rojo", "blue": "azul", "green": "verde", "yellow": "amarillo"}}
SHAPE_WORDS = {"en": {"circle": "circle", "square": "square", "triangle": "triangle"},
               "de": {"circle": "Kreis", "square": "Quadrat", "triangle": "Dreieck"},
               "fr": {"circle": "cercle", "square": "carré", "triangle": "triangle"},
               "es": {"circle": "círculo", "square": "cuadrado", "triangle": "triángulo"}}
CAPTION_PROMPTS = {"en": "Caption the image in English.", "de": "Caption the image in German.",
                   "fr": "Caption the image in French.", "es": "Caption the image in Spanish."}
COLOUR_QUESTIONS = {"en": "What colour is the shape?", "de": "Welche Farbe hat die Form?",
                    "fr": "De quelle couleur est la forme ?", "es": "¿De qué color es la forma?"}
VAL_ROWS = 32


def caption(lang: str, colour: str, shape: str) -> str:
  c, s = COLOUR_WORDS[lang][colour], SHAPE_WORDS[lang][shape]
  if lang == "en":
    return f"A {c} {s}."
  if lang == "de":  # Kreis is masculine, Quadrat / Dreieck neuter
    return f"Ein {c}{'er' if shape == 'circle' else 'es'} {s}."
  return f"Un {s} {c}."  # fr / es: noun first, all three shapes masculine


def shape_image(colour: str, shape: str, key: str) -> Image.Image:
  h = hashlib.sha256(key.encode()).digest()
  img = Image.new("RGB", (SIZE, SIZE), (200 + h[0] % 50, 200 + h[1] % 50, 200 + h[2] % 50))
  d = ImageDraw.Draw(img)
  cx, cy, r = 24 + h[3] % 9 - 4, 24 + h[4] % 9 - 4, 12 + h[5] % 6
  fill = COLOURS[colour]
  if shape == "circle":
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
  elif shape == "square":
    d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
  else:
    d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
  return img


def build(out: pathlib.Path) -> dict[str, int]:
  rng = random.Random(SEED)
  (out / "images").mkdir(parents=True, exist_ok=True)
  (out / "images_extra").mkdir(parents=True, exist_ok=True)
  items = []
  for colour in COLOURS:
    for shape in SHAPES:
      for v in range(VARIANTS):
        name = f"{colour}_{shape}_{v}.png"
        shape_image(colour, shape, name).save(out / ("images_extra" if v == 3 else "images") / name, optimize=True)
        items.append((name, colour, shape))
  rows = []
  langs = sorted(CAPTION_PROMPTS)
  for name, colour, shape in items:
    for lang in rng.sample(langs, 2):
      rows.append({"context": CAPTION_PROMPTS[lang], "label": caption(lang, colour, shape), "image_id": name})
    lang = rng.choice(langs)
    rows.append({"context": COLOUR_QUESTIONS[lang], "label": COLOUR_WORDS[lang][colour], "image_id": name})
    ask_c, ask_s = (colour, shape) if rng.random() < 0.5 else (rng.choice(list(COLOURS)), rng.choice(SHAPES))
    rows.append({"context": f"Is there a {ask_c} {ask_s} in the image? Answer yes or no.",
                 "label": "yes" if (ask_c, ask_s) == (colour, shape) else "no", "image_id": name})
  rng.shuffle(rows)
  bad = [{"context": "Caption the image in English.", "image_id": items[0][0]},       # no label
         {"context": 7, "label": "red", "image_id": items[1][0]},                     # numeric context
         {"context": "Caption the image in English.", "label": "A red circle.", "image_id": "missing/0000.png"}]
  for i, row in zip((40, 77, 41), bad):  # after the validation rows
    rows.insert(i, row)
  (out / "train.json").write_text(json.dumps(rows, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
  marvl = []
  for _ in range(24):
    (ln, lc, _), (rn, rc, _) = rng.sample(items, 2)
    ask = rng.choice(list(COLOURS))
    truth = lc == ask and rc == ask
    marvl.append({"context": f"Based on the two images, is it correct to say \"both shapes are {ask}\"? Yes or no?",
                  "label": "yes" if truth else "no", "text_label": str(truth), "left_image": ln, "right_image": rn,
                  "concept": "shapes", "language": "en"})
  (out / "marvl.json").write_text(json.dumps(marvl, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
  return {"images": len(items), "train_rows": len(rows), "marvl_rows": len(marvl)}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=str(pathlib.Path(__file__).parent / "mblip"))
  a = p.parse_args()
  print(build(pathlib.Path(a.out)))


if __name__ == "__main__":
  main()
