"""Writes the bundled synthetic MUGE sample (`muge/`) in the real Multimodal_Retrieval formats.

    python -m mmret_jax.data.samples.make_muge_sample            # rewrite mmret_jax/data/samples/muge/
    python -m mmret_jax.data.samples.make_muge_sample --out /tmp/muge

Made-up Chinese product queries (style / material words + a colour + a product, sometimes a suffix
such as 女款 or 2023新款) and 64x64 JPEG "product photos" in which the colour word is the dominant
colour and the product word is a shape (dress = trapezoid, phone case = tall rounded rectangle, ...),
so a tiny model can learn the task. Everything is fixed by `SEED`.

Files (see `mmret_jax.data.sources.muge.LAYOUT`):
* `MR_train_queries.jsonl` / `MR_train_imgs.tsv`: 130 queries with 1-2 items (some items shared by
  two queries). Deliberately bad, to exercise the loaders' counted skips:
  - queries: line 18 is malformed JSON and line 61 has no `query_text` (`read_queries` skips both);
  - images: 1 line without a tab, whose item is the 2nd of a 2-item query (so `MugeSplit` counts 1
    missing image), and 1 line whose base64 is not a JPEG, also the 2nd item of a 2-item query
    (`ImageTable.load` returns None and counts it).
  JPEG bytes depend on the Pillow / libjpeg build; everything else is byte-for-byte reproducible.
* `MR_valid_*`: 40 queries with 1-3 items each, a pool of 80 images, every image listed once.
* `MR_test_*`: 20 queries without `item_ids`, a pool of 40 images.
* `entity_dict.txt`: one word per line (colours, products, style and material words). 连衣裙,
  羽绒服 and 双肩包 are there without their 2-character prefixes (BagFormer's prefix-closed matcher
  misses them), 手机壳, 运动鞋, 保温杯 and 棒球帽 with theirs; queries put dictionary words next to
  each other (韩版宽松红色连衣裙).
* `vocab.txt`: a bert-base-chinese-style WordPiece vocab: [PAD] [UNK] [CLS] [SEP] [MASK], digits,
  ascii letters (alone and as ## continuations), then every other character of the queries and the
  dictionary, so `muge.bert_tokenizer(vocab.txt)` splits the sample one token per character
  (transformers 5: `BertTokenizerFast(vocab=...)`; it silently ignores `vocab_file=`).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import pathlib
import random
import string
from collections.abc import Sequence

from PIL import Image, ImageDraw

SEED = 107332
IMAGE_SIZE = 64
MAX_QUERY_TOKENS = 23  # BagFormer's max length 25 minus [CLS] and [SEP]
COLOURS = {"红色": (210, 30, 40), "蓝色": (30, 70, 210), "黑色": (25, 25, 25), "白色": (250, 250, 250),
           "绿色": (30, 150, 60), "黄色": (240, 200, 20), "粉色": (245, 130, 180), "紫色": (130, 50, 170)}
PRODUCTS = ("连衣裙", "手机壳", "运动鞋", "羽绒服", "双肩包", "保温杯", "棒球帽", "围巾")
STYLES = ("韩版", "宽松", "修身", "复古", "加厚", "纯棉", "真皮", "羊毛", "夏季", "冬季", "新款", "百搭")
SUFFIXES = ("女款", "男款", "儿童", "大码", "2023新款", "ins风", "正品", "学生")
BRAND_PREFIX = {"手机壳": ("iphone14", "华为"), "运动鞋": ("nike", "李宁")}
# Dictionary: 2-char prefixes of 手机壳 运动鞋 保温杯 棒球帽 are words; those of the other 3-char
# products are not. Extra words never used in the queries make it look like a real dictionary.
ENTITY_WORDS = (tuple(COLOURS) + PRODUCTS + STYLES + ("手机", "运动", "保温", "棒球", "女款", "男款", "儿童",
                                                      "大码", "正品", "学生", "耳机", "电脑", "口红", "数据线"))
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Split sizes: queries, items per query (range), pool size.
TRAIN_QUERIES, VALID_QUERIES, VALID_POOL, TEST_QUERIES, TEST_POOL = 130, 40, 80, 20, 40


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------
def product_image(colour: str, product: str, key: str) -> Image.Image:
  """A 64x64 RGB image: the product's shape in the colour, on a light tinted background.

  Background tint, position and size come from a SHA-256 of `key` (the item id).
  """
  h = hashlib.sha256(key.encode("utf-8")).digest()
  bg = (60 + h[0] % 40,) * 3 if colour == "白色" else (205 + h[0] % 40, 205 + h[1] % 40, 205 + h[2] % 40)
  img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), bg)
  d = ImageDraw.Draw(img)
  fill = COLOURS[colour]
  cx, cy, r = 32 + h[3] % 7 - 3, 32 + h[4] % 7 - 3, 20 + h[5] % 6
  if product == "连衣裙":  # trapezoid: narrow shoulders, wide hem
    d.polygon([(cx - r * 0.35, cy - r), (cx + r * 0.35, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
  elif product == "手机壳":  # tall rounded rectangle with a camera hole
    d.rounded_rectangle((cx - r * 0.5, cy - r, cx + r * 0.5, cy + r), radius=6, fill=fill)
    d.ellipse((cx - r * 0.35, cy - r * 0.85, cx - r * 0.05, cy - r * 0.55), fill=bg)
  elif product == "运动鞋":  # wide and low
    d.polygon([(cx - r, cy), (cx - r * 0.2, cy - r * 0.5), (cx + r * 0.3, cy - r * 0.1), (cx + r, cy + r * 0.2),
               (cx + r, cy + r * 0.5), (cx - r, cy + r * 0.5)], fill=fill)
  elif product == "羽绒服":  # square body with quilted horizontal bands
    d.rectangle((cx - r * 0.8, cy - r * 0.8, cx + r * 0.8, cy + r * 0.8), fill=fill)
    for y in range(int(cy - r * 0.8) + 5, int(cy + r * 0.8), 7):
      d.line((cx - r * 0.8, y, cx + r * 0.8, y), fill=bg, width=1)
  elif product == "双肩包":  # circle with a handle
    d.ellipse((cx - r * 0.8, cy - r * 0.6, cx + r * 0.8, cy + r), fill=fill)
    d.arc((cx - r * 0.4, cy - r, cx + r * 0.4, cy - r * 0.2), 180, 360, fill=fill, width=3)
  elif product == "保温杯":  # tall narrow cylinder
    d.rectangle((cx - r * 0.3, cy - r, cx + r * 0.3, cy + r), fill=fill)
  elif product == "棒球帽":  # half disc with a brim
    d.pieslice((cx - r, cy - r * 0.7, cx + r, cy + r * 1.3), 180, 360, fill=fill)
    d.rectangle((cx, cy + r * 0.2, cx + r * 1.2, cy + r * 0.4), fill=fill)
  elif product == "围巾":  # diagonal band
    d.polygon([(cx - r, cy - r * 0.6), (cx - r * 0.6, cy - r), (cx + r, cy + r * 0.6), (cx + r * 0.6, cy + r)],
              fill=fill)
  else:
    raise ValueError(f"no drawing for product {product!r}")
  return img


def encode_jpeg(img: Image.Image) -> str:
  """urlsafe base64 of a JPEG (the seed decodes with `base64.urlsafe_b64decode`)."""
  buf = io.BytesIO()
  img.save(buf, format="JPEG", quality=70)
  return base64.urlsafe_b64encode(buf.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------
# Queries
# ---------------------------------------------------------------------------
def query_text(rng: random.Random, colour: str, product: str) -> str:
  """A product query: 0-2 style words, colour, product (either order), maybe a brand or a suffix."""
  words = rng.sample(STYLES, rng.choice((0, 1, 1, 2)))
  core = [colour, product] if rng.random() < 0.8 else [product, colour]
  if product in BRAND_PREFIX and rng.random() < 0.4:
    core.insert(0, rng.choice(BRAND_PREFIX[product]))
  tail = [rng.choice(SUFFIXES)] if rng.random() < 0.35 else []
  return "".join(words + core + tail)


def token_count(text: str) -> int:
  """Wordpieces of `text` under `vocab.txt`: one per CJK character, ascii words by character."""
  return sum(1 for ch in text.lower() if not ch.isspace())


class _Ids:
  """Unique 6-digit query ids and 7-digit item ids, drawn from one rng."""

  def __init__(self, rng: random.Random):
    self.rng, self.used = rng, set()

  def new(self, lo: int, hi: int) -> int:
    while (v := self.rng.randrange(lo, hi)) in self.used:
      pass
    self.used.add(v)
    return v

  def query(self) -> int:
    return self.new(100_000, 1_000_000)

  def item(self) -> int:
    return self.new(1_000_000, 10_000_000)


def _items_per_query(rng: random.Random, n: int, total: int, lo: int, hi: int) -> list[int]:
  """n counts in [lo, hi] summing to `total`."""
  counts = [lo] * n
  while sum(counts) < total:
    i = rng.randrange(n)
    if counts[i] < hi:
      counts[i] += 1
  return counts


def _combos(rng: random.Random) -> list[tuple[str, str]]:
  cells = [(c, p) for c in COLOURS for p in PRODUCTS]
  rng.shuffle(cells)
  return cells


def build(seed: int = SEED) -> dict[str, list[str]]:
  """All sample files as lists of lines (without line breaks), keyed by file name."""
  rng = random.Random(seed)
  ids = _Ids(rng)
  files: dict[str, list[str]] = {}
  texts: list[str] = []

  def q_line(qid: int, text: str, items: list[int] | None) -> str:
    row = {"query_id": qid, "query_text": text} | ({"item_ids": items} if items is not None else {})
    return json.dumps(row, ensure_ascii=False)

  def new_text(c: str, p: str) -> str:
    while token_count(t := query_text(rng, c, p)) > MAX_QUERY_TOKENS:
      pass
    texts.append(t)
    return t

  # Train: 130 queries, 1-2 items each; every 8th query (after the first 20) reuses an item of an
  # earlier query with the same colour and product (MUGE items often answer several queries).
  q_lines, img_lines, by_combo = [], [], {}
  combos = _combos(rng)
  for i in range(TRAIN_QUERIES):
    c, p = combos[i % len(combos)] if i < len(combos) else rng.choice(combos)
    items = []
    if i >= 20 and i % 8 == 0 and by_combo.get((c, p)):
      items.append(rng.choice(by_combo[(c, p)]))
    for _ in range((1 if rng.random() < 0.6 else 2) - len(items)):
      item = ids.item()
      img_lines.append(f"{item}\t{encode_jpeg(product_image(c, p, str(item)))}")
      by_combo.setdefault((c, p), []).append(item)
      items.append(item)
    q_lines.append(q_line(ids.query(), new_text(c, p), items))
  # The deliberately bad lines (see the module docstring). The lost and the broken image are each
  # listed by exactly one query, so each shows up once in the counts.
  rows = [json.loads(line)["item_ids"] for line in q_lines]
  listed = [item for items in rows for item in items]
  single = [items[-1] for items in rows if len(items) == 2 and listed.count(items[-1]) == 1]
  lost, broken = single[10], single[40]  # each from a 2-item query, which keeps its other item
  for row, line in enumerate(img_lines):
    item = int(line.split("\t", 1)[0])
    if item == lost:
      img_lines[row] = line.replace("\t", " ", 1)  # no tab: an unreadable line
    elif item == broken:
      img_lines[row] = f"{item}\t{base64.urlsafe_b64encode(b'this is not a jpeg').decode()}"
  q_lines.insert(17, '{"query_id": 999001, "query_text": "红色连衣裙", "item_ids": [1234567]')
  q_lines.insert(60, json.dumps({"query_id": 999002, "item_ids": [listed[5]]}))
  files["MR_train_queries.jsonl"], files["MR_train_imgs.tsv"] = q_lines, img_lines

  # Valid: 40 distinct (colour, product) cells, 1-3 items each, 80 pool images in shuffled order.
  q_lines, pool = [], []
  for (c, p), n in zip(_combos(rng)[:VALID_QUERIES], _items_per_query(rng, VALID_QUERIES, VALID_POOL, 1, 3)):
    items = [ids.item() for _ in range(n)]
    pool.extend(f"{item}\t{encode_jpeg(product_image(c, p, str(item)))}" for item in items)
    q_lines.append(q_line(ids.query(), new_text(c, p), items))
  rng.shuffle(pool)
  files["MR_valid_queries.jsonl"], files["MR_valid_imgs.tsv"] = q_lines, pool

  # Test: 20 queries without item_ids; a pool of 40 (2 images of each query's cell).
  q_lines, pool = [], []
  for c, p in _combos(rng)[:TEST_QUERIES]:
    pool.extend(f"{(item := ids.item())}\t{encode_jpeg(product_image(c, p, str(item)))}" for _ in range(2))
    q_lines.append(q_line(ids.query(), new_text(c, p), None))
  rng.shuffle(pool)
  files["MR_test_queries.jsonl"], files["MR_test_imgs.tsv"] = q_lines, pool

  files["entity_dict.txt"] = list(ENTITY_WORDS)
  files["vocab.txt"] = vocab(texts + list(ENTITY_WORDS))
  return files


def vocab(texts: Sequence[str]) -> list[str]:
  """Specials, digits, ascii letters (+ ## forms), then the other characters of `texts`, sorted."""
  ascii_chars = string.digits + string.ascii_lowercase
  others = sorted({ch for t in texts for ch in t.lower() if not ch.isspace() and ch not in ascii_chars})
  return [*SPECIALS, *ascii_chars, *(f"##{ch}" for ch in ascii_chars), *others]


def write_sample(out: str | os.PathLike, seed: int = SEED) -> pathlib.Path:
  """Writes every sample file to `out` (UTF-8, one line each, "\\n" line ends)."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  for name, lines in build(seed).items():
    tmp = out / f"{name}.tmp"
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, out / name)
  return out


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--out", default=str(pathlib.Path(__file__).parent / "muge"),
                 help="output folder (default: the bundled mmret_jax/data/samples/muge/)")
  p.add_argument("--seed", type=int, default=SEED)
  args = p.parse_args(argv)
  out = write_sample(args.out, args.seed)
  size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
  print(f"wrote the MUGE sample to {out} ({size / 1024:.0f} KiB)")


if __name__ == "__main__":
  main()
