"""Writes the fabricated mini M-BEIR (`mbeir_mini/`) and, on demand, its synthetic images.

    python -m mmret_jax.data.samples.make_mbeir_mini                     # rewrite the bundled files
    python -m mmret_jax.data.samples.make_mbeir_mini --images /tmp/mbeir_img   # images only

A made-up M-BEIR root in the exact released schema and layout (see `mbeir.LAYOUT`): 7 eval sets
(mscoco_task0 text->image, mscoco_task3 image->text, webqa_task1 text->text, nights_task4
image->image, fashioniq_task7 and cirr_task7 image+text->image, oven_task8 image+text->image+text)
with test and val queries, local pools (MSCOCO per split), qrels, per-dataset train queries, the
up-sampled union train file, union val queries, the three global pools and our own instructions
(4 per key). Everything is built from colour and shape words: an image's file name carries its
colour and shape (`red_star_3.jpg`) and `synthetic_image(path)` draws exactly that shape, so texts
and images agree and retrieval is learnable. Images are not committed: `write_mini_images(root,
image_root)` draws them at every `img_path` / `query_img_path` (64x64 JPEG, fixed by the path).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pathlib
import random
import shutil
from collections.abc import Sequence

from PIL import Image, ImageDraw

from mmret_jax.data.sources import mbeir

SEED = 2023
IMAGE_SIZE = 64
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 220), "yellow": (240, 210, 30),
           "purple": (140, 50, 180), "orange": (245, 140, 20), "pink": (245, 120, 190),
           "cyan": (30, 200, 210)}
SHAPES = {"circle": "it is perfectly round", "square": "it has four equal sides",
          "triangle": "it has three corners", "star": "it has five points",
          "cross": "it has four arms", "diamond": "it stands on one corner"}
# eval set -> {split: (queries, candidates added to the split's pool)}. Val and test share the
# local pool except for MSCOCO (as in M-BEIR); train candidates go to the global train pool only.
SETS = {name: {"test": (6, 16), "val": (3, 8), "train": (8, 10)} for name in (
    "mscoco_task0", "mscoco_task3", "webqa_task1", "nights_task4", "fashioniq_task7", "cirr_task7",
    "oven_task8")}
UNION_SCALE = 1 / 4000  # union up-sampling targets scaled down (WebQA 100K -> 25, CIRR 50K -> 12)
INSTRUCTIONS = {  # (dataset, query modality, candidate modality) -> 4 variants, our own wording
    ("MSCOCO", "text", "image"): (
        "Show me a picture that fits this description.", "Which image matches the caption below?",
        "Retrieve the photo described here.", "Pick the image that this sentence describes."),
    ("MSCOCO", "image", "text"): (
        "Write down a caption that fits this picture.", "Which description matches the image?",
        "Retrieve a sentence describing the photo.", "Find the caption of this image."),
    ("WebQA", "text", "text"): (
        "Find a note that answers the question.", "Retrieve the passage with the answer.",
        "Which text answers this question?", "Look up a passage for the question below."),
    ("NIGHTS", "image", "image"): (
        "Find a picture that looks like this one.", "Retrieve the most similar image.",
        "Which image is closest to the given one?", "Show me a near copy of this picture."),
    ("FashionIQ", "image,text", "image"): (
        "Find the item after applying the requested change.", "Retrieve the edited version of this item.",
        "Which image shows this item changed as described?", "Show me the item with the given change."),
    ("CIRR", "image,text", "image"): (
        "Find the picture after the described edit.", "Retrieve an image like this one, changed as asked.",
        "Which photo shows the requested modification?", "Apply the change to the image and find it."),
    ("OVEN", "image,text", "image,text"): (
        "Find the encyclopedia entry with a picture for this question.",
        "Retrieve the article and image that identify the object.",
        "Which illustrated entry answers the question about the image?",
        "Look up the entry, with its picture, for this object."),
}


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------
def image_attributes(path: str) -> tuple[str, str] | None:
  """(colour, shape) named in an image file name, or None."""
  words = pathlib.PurePosixPath(path).stem.split("_")
  colour = next((w for w in words if w in COLOURS), None)
  shape = next((w for w in words if w in SHAPES), None)
  return (colour, shape) if colour and shape else None


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
  if shape == "triangle":
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in
            (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
  if shape == "star":
    return [(cx + (r if i % 2 == 0 else r * 0.45) * math.cos(-math.pi / 2 + i * math.pi / 5),
             cy + (r if i % 2 == 0 else r * 0.45) * math.sin(-math.pi / 2 + i * math.pi / 5))
            for i in range(10)]
  if shape == "diamond":
    return [(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)]
  w = r * 0.35  # cross
  return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
          (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
          (cx - r, cy - w), (cx - w, cy - w)]


def synthetic_image(path: str) -> Image.Image:
  """A 64x64 RGB image fixed by `path`: the named coloured shape on a light background.

  Position, size and background tint come from a SHA-256 of the path; names without a colour and
  a shape get a random-looking colour and shape from the same hash.
  """
  h = hashlib.sha256(path.encode("utf-8")).digest()
  colour, shape = image_attributes(path) or (list(COLOURS)[h[0] % len(COLOURS)],
                                             list(SHAPES)[h[1] % len(SHAPES)])
  img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (200 + h[2] % 56, 200 + h[3] % 56, 200 + h[4] % 56))
  draw = ImageDraw.Draw(img)
  cx, cy = 32 + h[5] % 9 - 4, 32 + h[6] % 9 - 4
  r = 18 + h[7] % 7
  fill = COLOURS[colour]
  if shape == "circle":
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
  elif shape == "square":
    draw.rectangle((cx - r * 0.8, cy - r * 0.8, cx + r * 0.8, cy + r * 0.8), fill=fill)
  else:
    draw.polygon(_shape_points(shape, cx, cy, r), fill=fill)
  return img


def image_paths(root: str | os.PathLike) -> list[str]:
  """Sorted image paths named by the query and pool files under an M-BEIR root."""
  paths = set()
  for f in sorted(pathlib.Path(root).glob("*/**/*.jsonl")):
    with open(f, encoding="utf-8") as fh:
      for line in fh:
        try:
          row = json.loads(line)
        except ValueError:
          continue
        for key in ("query_img_path", "img_path"):
          if isinstance(row, dict) and isinstance(row.get(key), str) and row[key]:
            paths.add(row[key])
  return sorted(paths)


def write_mini_images(root: str | os.PathLike, image_root: str | os.PathLike | None = None) -> dict[str, int]:
  """Draws `synthetic_image(p)` at `image_root/p` for every image path of the root's files.

  Existing files are left alone. Args: root: an M-BEIR root (e.g. `mbeir.mini_root()`);
  image_root: where to write (default `root`; pass your own folder for the bundled root).
  Returns {"written": n, "existing": n}.
  """
  out = pathlib.Path(image_root if image_root is not None else root)
  counts = {"written": 0, "existing": 0}
  for rel in image_paths(root):
    path = out / rel
    if path.exists():
      counts["existing"] += 1
      continue
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    synthetic_image(rel).save(tmp, format="JPEG", quality=90)
    os.replace(tmp, path)
    counts["written"] += 1
  return counts


def make_mini_root(dest: str | os.PathLike) -> pathlib.Path:
  """Copies the bundled mini M-BEIR to `dest` and draws its images there: a complete root."""
  dest = pathlib.Path(dest)
  shutil.copytree(mbeir.mini_root(), dest, dirs_exist_ok=True)
  write_mini_images(dest)
  return dest


# ---------------------------------------------------------------------------
# Annotations
# ---------------------------------------------------------------------------
class _Builder:
  """Assigns ids and collects records; all choices come from one seeded `random.Random`."""

  def __init__(self, seed: int):
    self.rng = random.Random(seed)
    self.next_id: dict[tuple[str, int], int] = {}
    self.pools: dict[str, list[dict]] = {}  # pool name -> candidates
    self.queries: dict[tuple[str, str], list[dict]] = {}  # (file name, split) -> queries
    self.used: dict[tuple[str, str], set] = {}  # (pool, eval set) -> (colour, shape) pairs drawn

  def combos(self, pool: str, name: str, n: int) -> list[tuple[str, str]]:
    """n new (colour, shape) pairs: never two look-alikes in one pool of one eval set."""
    used = self.used.setdefault((pool, name), set())
    picked = self.rng.sample([(c, s) for c in COLOURS for s in SHAPES if (c, s) not in used], n)
    used.update(picked)
    return picked

  def new_id(self, kind: str, dataset: str) -> str:
    d = mbeir.DATASET_IDS[dataset]
    n = self.next_id[(kind, d)] = self.next_id.get((kind, d), 0) + 1
    return f"{d}:{n}"

  def cand(self, pool: str, dataset: str, txt: str | None, img: str | None, src: dict | None) -> dict:
    modality = "image,text" if txt and img else "image" if img else "text"
    c = {"did": self.new_id("did", dataset), "txt": txt, "img_path": img, "modality": modality,
         "src_content": None if src is None else json.dumps(src)}
    self.pools.setdefault(pool, []).append(c)
    return c

  def query(self, file: str, split: str, dataset: str, txt: str | None, img: str | None,
            pos: Sequence[dict], neg: Sequence[dict] = (), src: dict | None = None) -> None:
    modality = "image,text" if txt and img else "image" if img else "text"
    task = mbeir.get_task_id(modality, pos[0]["modality"])
    self.queries.setdefault((file, split), []).append({
        "qid": self.new_id("qid", dataset), "query_txt": txt, "query_img_path": img,
        "query_modality": modality, "query_src_content": None if src is None else json.dumps(src),
        "pos_cand_list": [c["did"] for c in pos], "neg_cand_list": [c["did"] for c in neg],
        "task_id": task})


def _caption(rng: random.Random, c: str, s: str) -> str:
  return mbeir.format_string(rng.choice((
      f"a {c} {s} on a plain light background", f"one {c} {s} in the middle of the picture",
      f"a picture showing a single {c} {s}", f"a {s} painted {c}")))


def _img(dataset: str, split: str, c: str, s: str, tag: str) -> str:
  return f"mbeir_images/{dataset}_images/{split}/{c}_{s}_{tag}.jpg"


def _add_set(b: _Builder, name: str, split: str, n_queries: int, pool_size: int) -> None:
  """One eval set (or a dataset's train part, split "train") of fabricated queries and candidates."""
  spec, rng = mbeir.EVAL_SETS[name], b.rng
  ds, low = spec.dataset, spec.dataset.lower()
  pool = "union_train" if split == "train" else spec.pool_name(split)
  file = low if split == "train" else name
  pairs_needed = 2 * n_queries if name in ("fashioniq_task7", "cirr_task7") else 0
  combos = b.combos(pool, name, max(pool_size - pairs_needed, 0))
  if name == "mscoco_task0":
    cands = [b.cand(pool, ds, None, _img(low, split, c, s, str(i)), None) for i, (c, s) in enumerate(combos)]
    for cand, (c, s) in zip(cands[:n_queries], combos):
      b.query(file, split, ds, _caption(rng, c, s), None, [cand])
  elif name == "mscoco_task3":
    caps = [b.cand(pool, ds, _caption(rng, c, s), None, None) for c, s in combos]
    for i, (c, s) in enumerate(combos[:n_queries]):
      pos = [caps[i]] + ([b.cand(pool, ds, _caption(rng, c, s), None, None)] if i % 2 else [])
      b.query(file, split, ds, None, _img(low, split, c, s, f"q{i}"), pos)
  elif name == "webqa_task1":
    notes = [b.cand(pool, ds, f"Note on the {c} {s}: {SHAPES[s]}.", None, {"topic": f"{c} {s}"})
             for c, s in combos]
    for note, (c, s) in zip(notes[:n_queries], combos):
      b.query(file, split, ds, rng.choice((f"What do we know about the {c} {s}?",
                                           f"Which note describes the {c} {s}?")), None, [note])
  elif name == "nights_task4":
    imgs = [b.cand(pool, ds, None, _img(low, split, c, s, f"d{i}"), None) for i, (c, s) in enumerate(combos)]
    for i, (c, s) in enumerate(combos[:n_queries]):
      other = next((j for j, (c2, s2) in enumerate(combos) if s2 == s and c2 != c), (i + 1) % len(combos))
      b.query(file, split, ds, None, _img(low, split, c, s, f"r{i}"), [imgs[i]], [imgs[other]])
  elif name in ("fashioniq_task7", "cirr_task7"):  # FashionIQ changes the colour, CIRR the shape
    used, pairs = b.used[(pool, name)], []
    for c, s in rng.sample([(c, s) for c in COLOURS for s in SHAPES], len(COLOURS) * len(SHAPES)):
      free = [(c2, s2) for c2 in COLOURS for s2 in SHAPES if (c2, s2) not in used
              and ((s2 == s and c2 != c) if ds == "FashionIQ" else (c2 == c and s2 != s))]
      if len(pairs) < n_queries and (c, s) not in used and free:
        pairs.append(((c, s), rng.choice(free)))
        used.update(pairs[-1])
    cells = combos + [cs for p in pairs for cs in p]
    imgs = {cs: b.cand(pool, ds, None, _img(low, split, *cs, str(i)), None if ds == "FashionIQ"
                       else {"id": f"{split}-{i}"}) for i, cs in enumerate(sorted(cells))}
    for (c, s), (c2, s2) in pairs:
      txt = (f"Is {c2} instead of {c} and keeps the same cut." if ds == "FashionIQ"
             else f"Change the {s} into a {s2} of the same colour.")
      b.query(file, split, ds, txt, imgs[(c, s)]["img_path"], [imgs[(c2, s2)]])
  elif name == "oven_task8":
    entries = [b.cand(pool, ds, f"{c.title()} {s}. A {s} painted {c}; {SHAPES[s]}.",
                      _img(low, split, c, s, "wiki"), {"entity_id": f"Q{900 + i}"})
               for i, (c, s) in enumerate(combos)]
    for i, (entry, (c, s)) in enumerate(zip(entries[:n_queries], combos)):
      b.query(file, split, ds, rng.choice(("What is this object called?", "Which entry shows this shape?")),
              _img(low, split, c, s, f"q{i}"), [entry], src={"question_id": f"oven_{split}_{i}"})
  else:
    raise ValueError(f"no mini recipe for {name}")


def _dump(path: pathlib.Path, rows: Sequence[dict]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)  # the seed's save_list_as_jsonl spacing


def _did_key(row: dict) -> tuple[int, int]:
  d, n = row["did"].split(":")
  return int(d), int(n)


def _qrels(path: pathlib.Path, rows: Sequence[dict]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(f"{r['qid']} 0 {did} 1 {r['task_id']}\n" for r in rows for did in r["pos_cand_list"])


def write_mini(out: str | os.PathLike, seed: int = SEED) -> None:
  """Writes every annotation file of the mini root to `out` (deterministic for a seed)."""
  out, b = pathlib.Path(out), _Builder(seed)
  for name, splits in SETS.items():
    for split, (n_queries, pool_size) in splits.items():
      _add_set(b, name, split, n_queries, pool_size)
  for (file, split), rows in b.queries.items():
    _dump(out / "query" / split / f"mbeir_{file}_{split}.jsonl", rows)
    _qrels(out / "qrels" / split / f"mbeir_{file}_{split}_qrels.txt", rows)
  for pool, rows in b.pools.items():
    if pool != "union_train":
      _dump(out / "cand_pool" / "local" / f"mbeir_{pool}_cand_pool.jsonl", sorted(rows, key=_did_key))
  glob = "cand_pool/global/mbeir_union_{}_cand_pool.jsonl"
  _dump(out / glob.format("train"), sorted(b.pools["union_train"], key=_did_key))
  test_pools = {mbeir.EVAL_SETS[name].pool_name("test") for name in SETS}
  _dump(out / glob.format("test"), sorted((c for p in test_pools for c in b.pools[p]), key=_did_key))
  # Union val (seed --generate_union_val_data): val queries sorted by qid; the val pool trimmed to
  # the candidates they name, in order of first mention.
  val = sorted((r for (_, split), rows in b.queries.items() if split == "val" for r in rows),
               key=lambda r: tuple(map(int, r["qid"].split(":"))))
  _dump(out / "query" / "union_val" / "mbeir_union_val.jsonl", val)
  by_did = {c["did"]: c for p, rows in b.pools.items() if p != "union_train" for c in rows}
  trimmed = {d: by_did[d] for r in val for d in r["pos_cand_list"] + r["neg_cand_list"]}
  _dump(out / glob.format("val"), list(trimmed.values()))
  # Union train (seed --unify_and_upsample_train_data): per-dataset files, up-sampled, shuffled.
  union: list[dict] = []
  for ds, (target, up) in mbeir.UNION_TRAIN_TARGETS.items():
    rows = b.queries.get((ds.lower(), "train"))
    if rows:
      union.extend(mbeir.upsample(rows, round(target * UNION_SCALE), b.rng) if up else rows)
  b.rng.shuffle(union)
  _dump(out / "query" / "union_train" / "mbeir_union_up_train.jsonl", union)
  tsv = out / "instructions" / "query_instructions.tsv"
  tsv.parent.mkdir(parents=True, exist_ok=True)
  with open(tsv, "w", encoding="utf-8") as f:
    f.write("query_modality\tcand_modality\tdataset\tdataset_id\t"
            "instruction_1\tinstruction_2\tinstruction_3\tinstruction_4\n")
    for (ds, qm, cm), variants in INSTRUCTIONS.items():
      f.write("\t".join((qm, cm, ds, str(mbeir.DATASET_IDS[ds]), *variants)) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--out", default=str(pathlib.Path(__file__).parent / "mbeir_mini"),
                 help="where the annotation files go (default: the bundled mbeir_mini/)")
  p.add_argument("--images", default=None, help="only draw the images of --out's files here")
  args = p.parse_args(argv)
  if args.images:
    print(f"images under {args.images}: {write_mini_images(args.out, args.images)}")
    return
  for sub in ("query", "cand_pool", "qrels", "instructions"):  # only what write_mini writes
    shutil.rmtree(pathlib.Path(args.out) / sub, ignore_errors=True)
  write_mini(args.out)
  print(f"wrote the mini M-BEIR annotations to {args.out}")


if __name__ == "__main__":
  main()
