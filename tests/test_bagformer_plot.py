"""`python -m mmret_jax.eval.bagformer --plot PATH.png`: a PNG of the first queries' re-ranked top-5 images
(t2i, the labelled items framed), next to the CLI's usual outputs, which stay unchanged. Fixture: the
`:smoke` BagFormer at random init, exported as a model dir (no training), on the bundled MUGE sample."""

from __future__ import annotations

import pathlib
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from mmret_jax.data.sources import muge
from mmret_jax.train.partitioning import make_mesh

from fixtures import override

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import bagformer_muge  # noqa: E402  pylint: disable=wrong-import-position


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  from mmret_jax.tasks.bagformer import BagFormerTask  # pylint: disable=import-outside-toplevel
  tmp = tmp_path_factory.mktemp("bf_plot")
  c = override(bagformer_muge.get_config("smoke"), {"checkpoint.async_save": False, "data.check_images": False})
  mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  with jax.set_mesh(mesh):
    task = BagFormerTask(c, mesh, tmp / "work")
  task.export(nn.unbox(task.init_params(jax.random.PRNGKey(0))), tmp / "model")
  return tmp / "model"


def run_cli(model_dir, out, *extra):
  from mmret_jax.eval import bagformer as bf_eval  # pylint: disable=import-outside-toplevel
  return bf_eval.main(["--model", str(model_dir), "--muge-root", str(muge.sample_root()), "--split", "valid",
                       "--out", str(out), "--k-test", "8", "--directions", "t2i", "--quiet", *extra])


def test_plot_is_a_png_and_outputs_are_unchanged(model_dir, tmp_path, capsys):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  assert run_cli(model_dir, tmp_path / "plain") == 0
  plain = capsys.readouterr().out
  png = tmp_path / "pics" / "t2i.png"
  assert run_cli(model_dir, tmp_path / "plot", "--plot", str(png), "--plot-queries", "3") == 0
  out = capsys.readouterr().out
  assert out.startswith(plain.split("wrote")[0]) and "MUGE text -> image" in out  # the same table
  assert f"wrote {png}" in out
  files = sorted(p.name for p in (tmp_path / "plain").iterdir() if p.suffix in (".json", ".jsonl"))
  assert files == ["merge_t2i.jsonl", "rank_t2i.jsonl", "recall_t2i.jsonl", "results.json"]
  for name in files:
    a, b = ((tmp_path / d / name).read_text(encoding="utf-8") for d in ("plain", "plot"))
    assert a == b, name
  with Image.open(png) as im:
    assert im.format == "PNG"
    w, h = im.size
  # 3 query rows x (query + top 5) tiles of 2.3 in at 100 dpi
  assert 1000 <= w <= 2000 and 500 <= h <= 1000, (w, h)


def test_rows_follow_the_scores_and_labels():
  from mmret_jax.eval import bagformer as bf_eval  # pylint: disable=import-outside-toplevel
  split = muge.MugeSplit(muge.sample_root(), "valid")
  scores = np.random.default_rng(0).standard_normal((len(split.queries), len(split.pool_ids))).astype(np.float32)
  gold = split.txt2img[1][0]
  scores[1, gold] = 100.0  # query 1's first labelled item ranks first
  rows = bf_eval.t2i_rows(split, scores, [0, 1], k=5, label="merge")
  assert [r["query"] for r in rows] == split.texts[:2] and rows[0]["title"] == "merge"
  assert rows[1]["names"][0] == split.pool_ids[gold] and rows[1]["relevant"][0]
  for q, r in zip([0, 1], rows):
    top = np.argsort(-scores[q], kind="stable")[:5]
    assert r["names"] == [split.pool_ids[i] for i in top]
    assert r["relevant"] == [int(i) in split.txt2img[q] for i in top]
    assert r["scores"] == pytest.approx(scores[q, top].tolist()) and len(r["candidates"]) == 5
  test = muge.MugeSplit(muge.sample_root(), "test")  # unlabelled: no frame colours
  rows = bf_eval.t2i_rows(test, np.zeros((len(test.queries), len(test.pool_ids)), np.float32), 2, k=3)
  assert len(rows) == 2 and all(r["relevant"] is None and len(r["candidates"]) == 3 for r in rows)


def test_plot_arguments_are_checked(tmp_path, capsys):
  from mmret_jax.eval import bagformer as bf_eval  # pylint: disable=import-outside-toplevel
  base = ["--model", str(tmp_path / "m"), "--muge-root", str(muge.sample_root()), "--out", str(tmp_path / "o")]
  with pytest.raises(SystemExit) as e:
    bf_eval.main(base + ["--plot", str(tmp_path / "t2i.jpg")])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: --plot writes a PNG") and "\n" not in err
  with pytest.raises(SystemExit) as e:
    bf_eval.main(base + ["--plot", str(tmp_path / "t2i.png"), "--plot-queries", "0"])
  assert e.value.code == 2 and "--plot-queries must be >= 1" in capsys.readouterr().err
