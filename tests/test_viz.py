"""mmret_jax/viz.py: the PNGs open as images of the expected layout; missing images become counted tiles;
metrics files are read (bad lines named); bad arguments are clear errors."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest

from mmret_jax import viz


@pytest.fixture()
def pictures(tmp_path):
  paths = []
  for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
    p = tmp_path / f"img{i}.png"
    PIL.Image.new("RGB", (40, 30), color).save(p)
    paths.append(p)
  return paths


def test_as_image_reads_paths_pil_and_arrays(pictures):
  a = viz.as_image(pictures[0])
  assert a.dtype == np.uint8 and a.shape == (30, 40, 3) and tuple(a[0, 0]) == (255, 0, 0)
  with PIL.Image.open(pictures[1]) as im:
    assert tuple(viz.as_image(im)[5, 5]) == (0, 255, 0)
  normalised = np.stack([np.full((4, 4), -2.0), np.full((4, 4), 0.0), np.full((4, 4), 2.0)], -1)  # a model input
  out = viz.as_image(normalised)
  assert tuple(out[0, 0]) == (0, 128, 255)
  assert viz.as_image(np.zeros((1, 3, 8, 8), np.float32)).shape == (8, 8, 3)  # [1, C, H, W]
  assert viz.as_image(pictures[0].parent / "nope.png") is None and viz.as_image(np.zeros((2, 2, 5))) is None


def test_grid_png_has_the_images_and_counts_missing(pictures, tmp_path):
  items = list(pictures) + ["a text candidate about a red dress", tmp_path / "missing.jpg"]
  fig = viz.image_grid(items, titles=["a", "b", "c", "d", "e"], marks=[True, False, None, None, True], ncols=3)
  assert fig.viz_missing == 1
  out = viz.save_png(fig, tmp_path / "sub" / "grid.png")
  with PIL.Image.open(out) as im:
    assert im.format == "PNG"
    w, h = im.size
    px = np.asarray(im.convert("RGB"))
  assert w > h  # 3 columns x 2 rows of square cells
  # the three pictures' colours are drawn
  for color in ([255, 0, 0], [0, 255, 0], [0, 0, 255]):
    assert np.any(np.all(px == color, axis=-1)), color


def test_topk_rows(pictures, tmp_path):
  fig = viz.topk_rows([
      {"query": (pictures[0], "make it green"), "candidates": pictures[1:], "scores": [0.9, 0.1],
       "relevant": [True, False], "names": ["g", "b"]},
      {"query": "a blue square", "candidates": [pictures[2]], "scores": [0.5]},
  ])
  assert fig.viz_missing == 0
  with PIL.Image.open(viz.save_png(fig, tmp_path / "topk.png")) as im:
    assert im.size[0] > im.size[1]
    px = np.asarray(im.convert("RGB"))
  good = tuple(int(viz.GOOD[i:i + 2], 16) for i in (1, 3, 5))
  assert np.any(np.all(px == good, axis=-1))  # the relevant candidate's green frame


def test_loss_curve_from_a_workdir(tmp_path):
  rows = [{"step": s, "loss": 5.0 / s} for s in range(1, 6)] + [{"step": 5, "eval/val_loss": 1.2}]
  (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  fig = viz.loss_curve(tmp_path, keys=("loss", "eval/val_loss"))
  assert [line.get_label() for line in fig.axes[0].get_lines()] == ["loss", "eval/val_loss"]
  np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_ydata(), [5.0 / s for s in range(1, 6)])
  viz.save_png(fig, tmp_path / "loss.png")
  with pytest.raises(ValueError, match="none of"):
    viz.loss_curve(tmp_path, keys=("accuracy",))
  (tmp_path / "bad.jsonl").write_text('{"step": 1}\nnot json\n')
  with pytest.raises(ValueError, match="bad.jsonl:2"):
    viz.read_metrics(tmp_path / "bad.jsonl")
  with pytest.raises(FileNotFoundError):
    viz.read_metrics(tmp_path / "none")


def test_heatmap_spans_and_errors(tmp_path):
  fig = viz.similarity_heatmap([[0.9, 0.1], [0.2, 0.8], [0.3, 0.3]], ["q1", "q2", "q3"], ["i1", "i2"])
  texts = [t.get_text() for t in fig.axes[0].texts]
  assert texts[:2] == ["0.900", "0.100"]
  viz.save_png(fig, tmp_path / "h.png")
  fig = viz.token_spans([["红色", "连衣裙", "夏"]], [[0, 0, -1]], titles=["query"])
  faces = [p.get_facecolor() for p in fig.axes[0].patches]
  assert faces[0] == faces[1] != faces[2]
  viz.save_png(fig, tmp_path / "s.png")
  with pytest.raises(ValueError, match="scores"):
    viz.similarity_heatmap([[1.0]], ["a", "b"], ["c"])
  with pytest.raises(ValueError, match="no items"):
    viz.image_grid([])
  with pytest.raises(ValueError, match="2 titles for 1 items"):
    viz.image_grid(["x"], titles=["a", "b"])
  with pytest.raises(ValueError, match=".png"):
    viz.save_png(viz.image_grid(["x"]), tmp_path / "x.jpg")
  with pytest.raises(ValueError, match="row 0"):
    viz.token_spans([["a"]], [[0, 1]])
