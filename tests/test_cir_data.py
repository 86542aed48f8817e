"""FashionIQ / CIRR sources (data/sources/cir.py), prompts, caption composition, synthetic images."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re

import numpy as np
import pytest

from mmret_jax.data.image import load_image
from mmret_jax.data.samples import make_cir_images
from mmret_jax.data.sources import cir

CIRR_ROOT = cir.sample_root("cirr")
FIQ_ROOT = cir.sample_root("fashioniq")


@pytest.fixture(scope="module")
def cirr_val():
  return cir.CIRR(CIRR_ROOT, "val")


# ---------------------------------------------------------------------------
# Bundled real annotations
# ---------------------------------------------------------------------------
def test_bundled_files_are_gzipped_byte_identical_copies():
  total = 0
  for dataset in ("cirr", "fashioniq"):
    root = cir.sample_root(dataset)
    table = dict(re.findall(r"\| (\S+\.json)\.gz \|[^|]*\|[^|]*\| ([0-9a-f]{64}) \|",
                            (root / "SOURCE.md").read_text()))
    files = sorted(p.relative_to(root).as_posix()[:-3] for p in root.rglob("*.json.gz"))
    assert sorted(table) == files and len(files) == (4 if dataset == "cirr" else 6)
    for rel, sha in table.items():
      raw = (root / (rel + ".gz")).read_bytes()
      total += len(raw)
      assert hashlib.sha256(gzip.decompress(raw)).hexdigest() == sha, rel
  assert (CIRR_ROOT / "LICENSE").read_text().startswith("MIT License")
  assert total < 700_000


def test_bundled_annotations_parse_completely(cirr_val):
  test1 = cir.CIRR(CIRR_ROOT, "test1")
  fiq = cir.FashionIQ(FIQ_ROOT, "val")
  assert (len(cirr_val.queries), len(cirr_val.index_names)) == (4181, 2297)
  assert (len(test1.queries), len(test1.index_names)) == (4148, 2315)
  assert [len(g.queries) for g in fiq.eval_groups()] == [2017, 2038, 1961]
  assert [len(g.index_names) for g in fiq.eval_groups()] == [3817, 6346, 5373]
  for src in (cirr_val, test1, fiq):
    assert src.stats["skipped"] == 0 and src.stats["skip_reasons"] == {}
  assert fiq.stats["queries"] == 6016 and fiq.stats["index_images"] == 3817 + 6346 + 5373

  q = cirr_val.queries[0]
  assert q == cir.CIRQuery(
      row=0, reference="dev-244-0-img0", target="dev-1028-1-img1",
      captions=("show three bottles of soft drink",), pair_id=12060,
      members=("dev-430-3-img0", "dev-63-0-img1", "dev-1028-1-img1", "dev-1028-2-img1",
               "dev-244-0-img0", "dev-1028-2-img0"))
  assert test1.queries[0].target is None and test1.queries[0].pair_id == 12063
  assert all(len(q.members) == 6 and q.reference in q.members for q in test1.queries)
  assert all(q.target in q.members for q in cirr_val.queries)
  f = fiq.queries[0]
  assert (f.category, f.reference, f.target, f.captions) == (
      "dress", "B005X4PL1G", "B0084Y8XIU", ("is shiny and silver with shorter sleeves", "fit and flare"))
  assert [g.name for g in fiq.eval_groups()] == ["dress", "shirt", "toptee"]
  assert fiq.eval_groups()[1].queries[0].row == 0  # rows count per file
  assert cirr_val.eval_groups()[0].index_names[0] == "dev-244-0-img0"  # split file order


# ---------------------------------------------------------------------------
# Prompt insertion
# ---------------------------------------------------------------------------
def _seed_prepend(text, tag):
  """The seed's `__prepend_text__`, written from the reference description."""
  pieces = []
  for chunk in text.split("and"):
    pieces.append(" " + tag + " " + chunk)
  return "and".join(pieces)


def test_prepend_examples():
  assert cir.prepend_direction("dog and cat", "forward") == " [FORWARD] dog and [FORWARD]  cat"
  assert cir.prepend_direction("a standing man", "backward") == " [BACKWARD] a stand [BACKWARD] ing man"
  assert cir.prepend_direction("dog and cat", "forward", quirk=False) == "[FORWARD] dog and [FORWARD] cat"
  assert (cir.prepend_direction("a standing man and  sand.", "forward", quirk=False)
          == "[FORWARD] a standing man and [FORWARD] sand.")
  assert cir.prepend_direction("", "forward") == " [FORWARD] "
  assert cir.prepend_direction("And so", "forward") == " [FORWARD] And so"  # case-sensitive, as the seed
  with pytest.raises(ValueError, match="forward"):
    cir.prepend_direction("x", "sideways")


def test_prepend_matches_seed_on_every_cirr_val_caption_and_477_quirks(cirr_val):
  captions = [q.captions[0] for q in cirr_val.queries]
  for tag, direction in (("[FORWARD]", "forward"), ("[BACKWARD]", "backward")):
    assert [cir.prepend_direction(c, direction) for c in captions] == [_seed_prepend(c, tag)
                                                                       for c in captions]
  differs = [c for c in captions
             if cir.prepend_direction(c, "forward", quirk=False)
             != " ".join(cir.prepend_direction(c, "forward").split())]
  assert len(differs) == 477
  # Exactly the captions with an "and" that is not a whole word ("stand", "hand", "sandy", ...).
  in_word = [c for c in captions if re.search(r"\Band|and\B", c)]
  assert differs == in_word
  assert sum("and" in c for c in captions) == 1756
  assert sum(bool(re.search(r"\band\b", c)) for c in captions) == 1468


# ---------------------------------------------------------------------------
# Caption composition
# ---------------------------------------------------------------------------
FIQ_Q = cir.CIRQuery(row=0, reference="R", target="T", captions=("Is red.", "has  stripes?"),
                     category="dress")
CIRR_Q = cir.CIRQuery(row=0, reference="R", target="T", captions=("make it stand up",), pair_id=1,
                      members=("R", "T"))


def _seed_compose(c1, c2, u):
  """Seed's `generate_randomized_fiq_caption` for one pair and one draw u."""
  a, b = c1.strip(".?, "), c2.strip(".?, ")
  if u < 0.25:
    return a.capitalize() + " and " + b
  if 0.25 < u < 0.5:
    return b.capitalize() + " and " + a
  if 0.5 < u < 0.75:
    return a.capitalize()
  return b.capitalize()


class _Draws:
  """An rng stub that returns fixed draws."""

  def __init__(self, *u):
    self.u = list(u)

  def random(self):
    return self.u.pop(0)


def test_fiq_eval_composition_prompts_first_then_joins():
  assert cir.eval_text(FIQ_Q) == "[forward] is red and [FORWARD] has  stripes"
  assert cir.query_text(FIQ_Q, None) == "Is red and has  stripes"
  fiq = cir.FashionIQ(FIQ_ROOT, "val", categories=["dress"])
  q = fiq.queries[0]
  assert cir.eval_text(q) == ("[forward] is shiny and [forward]  silver with shorter sleeves and "
                              "[FORWARD] fit and [FORWARD]  flare")
  for q in fiq.queries[:200]:
    fwd = [_seed_prepend(c, "[FORWARD]") for c in q.captions]
    assert cir.eval_text(q) == _seed_compose(*fwd, 0.0)
    assert cir.eval_text(q) == cir.eval_text(q)


def test_fiq_four_outcomes_and_independent_directions():
  fwd = "[forward] is red and [FORWARD] has  stripes"
  # Only the leading caption is capitalize()d; the second keeps its case ("Is red").
  assert cir.train_texts(FIQ_Q, _Draws(0.1, 0.3)) == (fwd, "[backward] has  stripes and [BACKWARD] Is red")
  assert cir.train_texts(FIQ_Q, _Draws(0.6, 0.9)) == ("[forward] is red", "[backward] has  stripes")
  draws = (0.0, 0.2499, 0.25, 0.3, 0.5, 0.6, 0.75, 0.99)
  assert [cir.fiq_choice(u) for u in draws] == [0, 0, 3, 1, 3, 2, 3, 3]

  expected = {0: "[forward] is red and [FORWARD] has  stripes",
              1: "[forward] has  stripes and [FORWARD] Is red",
              2: "[forward] is red", 3: "[forward] has  stripes"}
  to_choice = {v: k for k, v in expected.items()}
  back_to_choice = {v.replace("forward", "backward").replace("FORWARD", "BACKWARD"): k
                    for k, v in expected.items()}
  for rng in (random.Random(0), np.random.default_rng(0)):
    pairs = [cir.train_texts(FIQ_Q, rng) for _ in range(800)]
    joint = np.zeros((4, 4), int)
    for f, b in pairs:
      joint[to_choice[f], back_to_choice[b]] += 1
    assert (joint > 20).all()  # all 16 combinations: forward and backward drawn independently
    assert abs(joint.sum(1) / 800 - 0.25).max() < 0.06
    assert sum(f == fwd for f, _ in pairs) == joint[0].sum()
  assert ([cir.train_texts(FIQ_Q, np.random.default_rng(7)) for _ in range(3)]
          == [cir.train_texts(FIQ_Q, np.random.default_rng(7)) for _ in range(3)])


def test_randomize_batch_reproduces_seed_stream():
  fiq = cir.FashionIQ(FIQ_ROOT, "val", categories=["toptee"])
  fwd = [[_seed_prepend(c, "[FORWARD]") for c in q.captions] for q in fiq.queries[:64]]
  bwd = [[_seed_prepend(c, "[BACKWARD]") for c in q.captions] for q in fiq.queries[:64]]
  ours = random.Random(3)
  got = cir.randomize_fiq_captions(fwd, ours) + cir.randomize_fiq_captions(bwd, ours)
  ref = random.Random(3)
  want = [_seed_compose(a, b, ref.random()) for a, b in fwd] + [_seed_compose(a, b, ref.random())
                                                                for a, b in bwd]
  assert got == want


def test_cirr_texts():
  assert cir.eval_text(CIRR_Q) == " [FORWARD] make it stand [FORWARD]  up"
  assert cir.eval_text(CIRR_Q, quirk=False) == "[FORWARD] make it stand up"
  assert cir.train_texts(CIRR_Q, random.Random(0)) == (" [FORWARD] make it stand [FORWARD]  up",
                                                       " [BACKWARD] make it stand [BACKWARD]  up")
  assert cir.query_text(CIRR_Q, None) == "make it stand up"


# ---------------------------------------------------------------------------
# Malformed rows, missing files, .gz fallback
# ---------------------------------------------------------------------------
def _write(path, obj, gz=False):
  path.parent.mkdir(parents=True, exist_ok=True)
  data = json.dumps(obj).encode()
  if gz:
    path.with_name(path.name + ".gz").write_bytes(gzip.compress(data))
  else:
    path.write_bytes(data)


def test_fiq_malformed_rows_counted(tmp_path):
  good = {"target": "T1", "candidate": "R1", "captions": ["a", "b"]}
  _write(tmp_path / "captions/cap.dress.val.json", [
      good, "row", {"target": "T2", "captions": ["a", "b"]}, {**good, "captions": ["only one"]},
      {**good, "captions": ["a", 3]}, {**good, "target": 5}, {**good, "candidate": ""},
      {"candidate": "R9", "captions": ["x", "y"]}, {**good, "target": "T3"}])
  _write(tmp_path / "image_splits/split.dress.val.json", ["T1", "R1", 7, "T1", "T3"])
  fiq = cir.FashionIQ(tmp_path, "val", categories=["dress"])
  assert [(q.row, q.target) for q in fiq.queries] == [(0, "T1"), (8, "T3")]
  assert fiq.index_names == {"dress": ("T1", "R1", "T3")}
  caps = fiq.stats["files"]["captions/cap.dress.val.json"]
  assert caps == {"rows": 2, "skipped": 7, "skip_reasons": {
      "not_object": 1, "missing:candidate": 1, "type:captions": 2, "type:target": 1,
      "type:candidate": 1, "missing:target": 1}, "bad_rows": [1, 2, 3, 4, 5]}
  assert fiq.stats["files"]["image_splits/split.dress.val.json"]["skip_reasons"] == {
      "type:name": 1, "duplicate": 1}
  assert fiq.stats["skipped"] == 9 and fiq.stats["queries"] == 2 and fiq.stats["index_images"] == 3

  _write(tmp_path / "captions/cap.dress.test.json", [{"candidate": "R9", "captions": ["x", "y"]}])
  _write(tmp_path / "image_splits/split.dress.test.json", ["R9"])
  test = cir.FashionIQ(tmp_path, "test", categories=["dress"])
  assert test.queries[0].target is None and test.stats["skipped"] == 0


def test_cirr_malformed_rows_counted(tmp_path):
  names = {f"dev-{i}": f"./dev/dev-{i}.png" for i in range(4)}
  good = {"pairid": 1, "reference": "dev-0", "target_hard": "dev-1", "caption": "c",
          "img_set": {"id": 0, "members": ["dev-0", "dev-1"]}}
  _write(tmp_path / "cirr/image_splits/split.rc2.val.json", {**names, "dev-9": 3})
  _write(tmp_path / "cirr/captions/cap.rc2.val.json", [
      good, [1], {**good, "pairid": "2"}, {**good, "pairid": True}, {**good, "pairid": 1},
      {**good, "pairid": 3, "reference": "dev-7"}, {**good, "pairid": 4, "img_set": {"id": 1}},
      {**good, "pairid": 5, "caption": None}, {k: v for k, v in good.items() if k != "target_hard"},
      {**good, "pairid": 6, "caption": " ", "img_set": {"members": []}},
      {**good, "pairid": 8, "caption": ""}])
  src = cir.CIRR(tmp_path, "val")
  assert [q.pair_id for q in src.queries] == [1, 8]
  assert src.index_names == ("dev-0", "dev-1", "dev-2", "dev-3")
  caps = src.stats["files"]["captions/cap.rc2.val.json"]
  assert caps["skip_reasons"] == {"not_object": 1, "type:pairid": 2, "duplicate_pairid": 1,
                                  "unknown_image": 1, "missing:members": 1, "type:caption": 1,
                                  "missing:target_hard": 1, "type:img_set.members": 1}
  assert caps["rows"] == 2 and caps["skipped"] == 9 and caps["bad_rows"] == [1, 2, 3, 4, 5]
  assert src.stats["files"]["image_splits/split.rc2.val.json"] == {
      "rows": 4, "skipped": 1, "skip_reasons": {"type:path": 1}, "bad_rows": [4]}
  assert src.stats["skipped"] == 10


def test_missing_and_broken_files(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"cap\.dress\.val\.json.*official layout"):
    cir.FashionIQ(tmp_path, "val")
  with pytest.raises(FileNotFoundError, match=r"split\.rc2\.val\.json \(or split\.rc2\.val\.json\.gz\)"):
    cir.CIRR(tmp_path, "val")
  _write(tmp_path / "image_splits/split.rc2.val.json", ["not", "a", "dict"])
  with pytest.raises(ValueError, match="expected a JSON object"):
    cir.CIRR(tmp_path, "val")
  (tmp_path / "image_splits/split.rc2.val.json").write_text("{broken")
  with pytest.raises(ValueError, match="not a readable JSON file"):
    cir.CIRR(tmp_path, "val")
  with pytest.raises(ValueError, match="split must be one of"):
    cir.CIRR(tmp_path, "test")
  with pytest.raises(ValueError, match="categories"):
    cir.FashionIQ(tmp_path, "val", categories=["shoes"])
  with pytest.raises(ValueError, match="dataset must be"):
    cir.sample_root("coco")


def test_gz_fallback_and_plain_preferred(tmp_path):
  row = {"target": "T", "candidate": "R", "captions": ["a", "b"]}
  _write(tmp_path / "captions/cap.shirt.val.json", [row], gz=True)
  _write(tmp_path / "image_splits/split.shirt.val.json", ["T", "R"], gz=True)
  fiq = cir.FashionIQ(tmp_path, "val", categories=["shirt"])
  assert fiq.queries[0].target == "T" and fiq.index_names["shirt"] == ("T", "R")
  _write(tmp_path / "image_splits/split.shirt.val.json", ["X"])  # plain file wins over .gz
  assert cir.FashionIQ(tmp_path, "val", categories=["shirt"]).index_names["shirt"] == ("X",)


# ---------------------------------------------------------------------------
# Image paths and synthetic images
# ---------------------------------------------------------------------------
def test_image_paths(tmp_path):
  fiq = cir.FashionIQ(FIQ_ROOT, "val", categories=["dress"])
  assert fiq.image_path("B1") == FIQ_ROOT / "images/B1.jpg"
  fiq = cir.FashionIQ(FIQ_ROOT, "val", categories=["dress"], image_root=tmp_path)
  (tmp_path / "images").mkdir()
  (tmp_path / "images/B2.png").write_bytes(b"")
  assert fiq.image_path("B1") == tmp_path / "images/B1.jpg"
  assert fiq.image_path("B2") == tmp_path / "images/B2.png"
  (tmp_path / "images/B2.jpg").write_bytes(b"")
  assert fiq.image_path("B2") == tmp_path / "images/B2.jpg"

  src = cir.CIRR(CIRR_ROOT, "val")  # root = the annotation dir: images are relative to its parent
  assert src.image_root == CIRR_ROOT.parent
  assert src.image_path("dev-244-0-img0") == CIRR_ROOT.parent / "dev/dev-244-0-img0.png"
  dataset = tmp_path / "cirr_dataset"  # root = the folder holding cirr/ (the seed's layout)
  _write(dataset / "cirr/image_splits/split.rc2.train.json",
         {"train-1-0-img0": "./train/34/train-1-0-img0.png"})
  _write(dataset / "cirr/captions/cap.rc2.train.json", [])
  src = cir.CIRR(dataset, "train")
  assert src.root == dataset / "cirr" and src.image_root == dataset
  assert src.image_path("train-1-0-img0") == dataset / "train/34/train-1-0-img0.png"
  assert cir.CIRR(dataset, "train", image_root=tmp_path / "im").image_path(
      "train-1-0-img0") == tmp_path / "im/train/34/train-1-0-img0.png"
  with pytest.raises(KeyError, match="not in image_splits/split.rc2.train.json"):
    src.image_path("dev-1")


def test_synthetic_images_written_readable_and_never_overwritten(tmp_path):
  src = cir.CIRR(CIRR_ROOT, "test1", image_root=tmp_path / "cirr")
  names = src.image_names()[:12]
  keep = src.image_path(names[0])
  keep.parent.mkdir(parents=True)
  keep.write_bytes(b"real image")
  assert make_cir_images.write_synthetic_images(src, names) == {"written": 11, "existing": 1}
  assert keep.read_bytes() == b"real image"
  sizes = set()
  for n in names[1:]:
    path = tmp_path / "cirr/test1" / f"{n}.png"
    img = load_image(path)
    sizes.add(img.size)
    assert img.size in make_cir_images.SIZES
    assert np.array_equal(np.asarray(img), np.asarray(make_cir_images.synthetic_image(n)))
  assert len(sizes) > 1
  assert make_cir_images.write_synthetic_images(src, names) == {"written": 0, "existing": 12}

  fiq = cir.FashionIQ(FIQ_ROOT, "val", categories=["toptee"], image_root=tmp_path / "fiq")
  asins = fiq.index_names["toptee"][:3]
  assert make_cir_images.write_synthetic_images(fiq, asins) == {"written": 3, "existing": 0}
  for a in asins:
    assert load_image(tmp_path / "fiq/images" / f"{a}.jpg").size == make_cir_images.synthetic_image(a).size
  assert sorted(p.name for p in (tmp_path / "fiq/images").iterdir()) == sorted(f"{a}.jpg" for a in asins)
