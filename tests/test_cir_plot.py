"""`python -m mmret_jax.eval.cir --plot PATH.png`: the top-5 gallery images of the first queries, ranked as the
metrics rank them (CIRR without the reference, FashionIQ with it), the target framed; the printed table and the
--output JSON do not change with --plot; a path that is not .png is a one-line usage error."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mmret_jax.data.sources import cir as cir_data
from mmret_jax.eval import cir as cir_eval

import fixtures

# a tiny random HF BLIP (zero-shot CIR: element-wise sum fusion, 77 tokens, targetpad at 32 px)
TEXT = dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=37,
            max_position_embeddings=80)
VISION = dict(hidden_size=48, num_attention_heads=3, num_hidden_layers=2, intermediate_size=50, image_size=32,
              patch_size=8)


class StubModel:
  """`CirModel`'s query side: the composed query is its target's feature (queries 0, 2, ... of a batch) or noise."""

  def __init__(self, feats, index, seed=0):
    self.feats, self.index = feats, index
    self.rng = np.random.default_rng(seed)

  def texts(self, queries):
    return [q.target for q in queries]  # carries the target through to query_features

  def query_features(self, ref_features, texts, batch_size=32):
    out = self.rng.standard_normal(ref_features.shape).astype(np.float32)
    for i, target in enumerate(texts):
      if i % 2 == 0:
        out[i] = self.feats[self.index[target]]
    return out


@pytest.mark.parametrize("dataset", ["cirr", "fashioniq"])
def test_topk_rows_rank_like_the_metrics(dataset, tmp_path):
  kw = {"categories": ("dress", "shirt")} if dataset == "fashioniq" else {}
  data = cir_data.load(dataset, cir_data.sample_root(dataset), image_root=tmp_path, **kw)
  names = sorted({n for g in data.eval_groups() for n in g.index_names} | {q.reference for q in data.queries})
  index = {n: i for i, n in enumerate(names)}
  feats = np.random.default_rng(1).standard_normal((len(names), 16)).astype(np.float32)
  ok = np.ones(len(names), bool)
  first = data.eval_groups()[0].queries
  ok[index[first[1].reference]] = False  # an unreadable reference: that query is not drawn
  model = StubModel(feats, index)
  rows = cir_eval.topk_rows(data, model, feats, index, ok, queries=4)
  want = [q for q in first if q.reference != first[1].reference][:4]
  assert len(rows) == 4
  for row, q in zip(rows, want):
    image, text = row["query"]
    assert image == str(data.image_path(q.reference)) and text == cir_data.query_text(q, None)
    assert len(row["candidates"]) == 5 == len(row["scores"]) == len(row["relevant"])
    assert row["scores"] == sorted(row["scores"], reverse=True)
    cands = [pathlib.Path(c) for c in row["candidates"]]
    if dataset == "cirr":
      assert data.image_path(q.reference) not in cands  # CIRR ranks without the reference
    target = data.image_path(q.target)
    assert row["relevant"] == [c == target for c in cands]
    rank = int(row["title"].split("target #")[1])
    if target in cands:
      assert rank == cands.index(target) + 1
    else:
      assert rank > 5
  assert [r["relevant"][0] for r in rows[0::2]] == [True, True]  # the queries that are their target's feature


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("cir_plot") / "blip"
  fixtures.make_blip_dir(path, TEXT, VISION, width=16, with_processor=False)
  return path


def _cli(*args, tmp):
  env = {**os.environ, "MMRET_JAX_CACHE": str(tmp / "cache")}
  return subprocess.run([sys.executable, "-m", "mmret_jax.eval.cir", *map(str, args)], capture_output=True,
                        text=True, env=env)


def test_cli_plot_writes_a_png_and_keeps_the_metrics(blip_dir, tmp_path):
  common = ["--model", blip_dir, "--dataset", "cirr", "--synthetic-images", "--image-root", tmp_path / "images",
            "--feature-cache", tmp_path / "features", "--max-queries", 8]
  plain = _cli(*common, "--output", tmp_path / "plain.json", tmp=tmp_path)
  assert plain.returncode == 0, plain.stderr[-2000:]
  plotted = _cli(*common, "--output", tmp_path / "plot.json", "--plot", tmp_path / "figs" / "top5.png",
                 "--plot-queries", 3, tmp=tmp_path)
  assert plotted.returncode == 0, plotted.stderr[-2000:]
  assert plotted.stdout == plain.stdout and "R@1" in plain.stdout and "Rs@1" in plain.stdout
  assert json.loads((tmp_path / "plot.json").read_text()) == json.loads((tmp_path / "plain.json").read_text())
  assert "top5.png" in plotted.stderr
  with Image.open(tmp_path / "figs" / "top5.png") as im:
    assert im.format == "PNG"
    w, h = im.size
  assert 600 <= w <= 3000 and 300 <= h <= 1500 and w > h  # 3 rows of query + 5 candidates


@pytest.mark.parametrize("args, message", [
    (["--plot", "top5.jpg"], "error: --plot writes a PNG: give a path ending in .png, got top5.jpg"),
    (["--plot", "top5.png", "--plot-queries", "0"], "error: --plot-queries must be >= 1"),
])
def test_cli_plot_usage_errors(args, message, tmp_path):
  r = _cli("--model", tmp_path / "none", "--dataset", "cirr", *args, tmp=tmp_path)
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(message), r.stderr
  assert not (tmp_path / "top5.jpg").exists()
