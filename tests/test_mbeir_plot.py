"""`python -m mmret_jax.eval.mbeir retrieve|all --plot PATH.png`: a PNG of the first queries' top candidates,
next to unchanged run files and results (the bundled mini M-BEIR, a tiny random CLIP-SF)."""

from __future__ import annotations

import json

import pytest

from mmret_jax.data.sources import mbeir
from mmret_jax.eval import mbeir as pipeline
from test_mbeir_pipeline import ROOT, _common, images, model_dir  # noqa: F401  (module fixtures)

SETS = "mscoco_task0,webqa_task1,cirr_task7"  # text -> image, text -> text, image+text -> image


def _runs(out):
  return {p.name: p.read_text() for p in sorted((out / "runs").glob("*_run.txt"))}


def test_plot_leaves_outputs_unchanged_and_writes_a_png(tmp_path, images, model_dir):  # noqa: F811
  from PIL import Image
  args = _common(tmp_path / "out", images, "--pool", "both", "--batch-size", 8, "--datasets", SETS)
  assert pipeline.main([str(a) for a in ["all", "--model", model_dir, *args]]) == 0
  out = tmp_path / "out"
  runs, results = _runs(out), json.loads((out / "results.json").read_text())["results"]
  assert len(runs) == 6
  png = tmp_path / "plots" / "topk.png"
  assert pipeline.main([str(a) for a in ["retrieve", *args, "--plot", png, "--plot-queries", 2]]) == 0
  assert _runs(out) == runs  # the same run files with and without --plot
  with Image.open(png) as im:
    assert im.format == "PNG"
    w, h = im.size
  # 3 sets x 2 pools x 2 queries = 12 rows of (query + 5 candidates) tiles of 2.3 in at 100 dpi.
  assert 5 * 230 <= w <= 7 * 230 and 10 * 230 <= h <= 14 * 230, im.size
  # `all --plot` (one set, the local pool: 2 rows) still scores: the same numbers as without the plot.
  png2 = tmp_path / "local.png"
  args2 = _common(tmp_path / "out2", images, "--batch-size", 8, "--datasets", "cirr_task7")
  assert pipeline.main([str(a) for a in ["all", "--model", model_dir, *args2, "--plot", png2]]) == 0
  local = [r for r in results if r["pool"] == "local" and r["dataset"] == "cirr_task7"]
  assert json.loads((tmp_path / "out2" / "results.json").read_text())["results"] == local
  with Image.open(png2) as im:
    assert im.format == "PNG" and 2 * 230 <= im.size[1] <= 3 * 230


def test_topk_queries_rows(tmp_path, images, model_dir):  # noqa: F811
  """Rows for viz.topk_rows: candidates as image paths / texts, relevance from the qrels."""
  data = mbeir.MBEIR(ROOT, images)
  spec = mbeir.EVAL_SETS["webqa_task1"]
  qrels = data.qrels(spec.name, "test")
  qid = next(iter(qrels.relevant))
  did = qrels.relevant[qid][0]
  other = next(c.did for c in pipeline.mbeir_pool(data, spec.pool_name("test")) if c.did != did)
  run = mbeir.RunFile(ranked={qid: (other, did)}, scores={qid: (0.9, 0.5)}, task_ids={qid: 1}, run_ids=("r",))
  (row,) = pipeline.topk_queries(data, spec, "test", run, n=3)
  assert row["relevant"] == [False, True] and row["scores"] == [0.9, 0.5]
  assert pipeline.topk_queries(data, spec, "test", run, qids=[qid]) == [row]
  assert all(isinstance(c, str) and not c.endswith(".jpg") for c in row["candidates"])  # WebQA task1: texts
  cirr = mbeir.EVAL_SETS["cirr_task7"]
  q = pipeline.mbeir_queries(data, cirr.name, "test")[0]
  run = mbeir.RunFile(ranked={q.qid: ()}, scores={q.qid: ()}, task_ids={q.qid: 7}, run_ids=("r",))
  (row,) = pipeline.topk_queries(data, cirr, "test", run)
  assert isinstance(row["query"], tuple) and str(row["query"][0]).startswith(str(images))  # (image, text)


@pytest.mark.parametrize("argv, msg", [
    (["embed", "--plot", "x.png"], "use it with `retrieve` or `all`"),
    (["retrieve", "--plot", "x.jpg"], "ending in .png"),
    (["retrieve", "--plot", "x.png", "--plot-queries", "0"], "--plot-queries must be >= 1"),
])
def test_plot_errors_one_line(tmp_path, capsys, argv, msg):
  assert pipeline.main([argv[0], "--mbeir-root", ROOT, "--out", str(tmp_path), *argv[1:]]) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith("error:") and msg in err and "\n" not in err
