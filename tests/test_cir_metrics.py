"""CIR metrics and CIRR submissions (eval/cir.py) on hand-computed cases and the real test1 file."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mmret_jax.data.sources import cir as cir_data
from mmret_jax.eval import cir


def _at(degrees, norms=None):
  """[n, 2] unit vectors at the given angles, scaled by `norms` (cosine ranking ignores them)."""
  t = np.radians(np.asarray(degrees, np.float64))
  v = np.stack([np.cos(t), np.sin(t)], 1)
  return (v * (1.0 if norms is None else np.asarray(norms)[:, None])).astype(np.float32)


G = [f"g{i}" for i in range(6)]
GALLERY = _at([0, 20, 40, 60, 80, 100], norms=[1, 2, 3, 0.5, 5, 7])


# ---------------------------------------------------------------------------
# FashionIQ
# ---------------------------------------------------------------------------
def test_fiq_recall_by_hand():
  gallery = _at([0, 30, 60, 90, 120], norms=[1, 3, 2, 9, 0.1])
  names = ["a", "b", "c", "d", "e"]
  queries = _at([0, 115, 62, 31], norms=[2, 1, 4, 1])
  # rankings: q0 a b c d e; q1 e d c b a; q2 c d b e a; q3 b (the "reference") first, then a / c.
  targets = ["c", "a", "d", "b"]  # ranks 2, 4, 1, 0 (nothing is removed in FashionIQ)
  got = cir.fiq_recall(queries, gallery, names, targets, ks=(1, 2, 3, 5, 10, 50))
  assert got == pytest.approx({"recall_at1": 25.0, "recall_at2": 50.0, "recall_at3": 75.0,
                               "recall_at5": 100.0, "recall_at10": 100.0, "recall_at50": 100.0})
  assert list(cir.fiq_recall(queries, gallery, names, targets)) == ["recall_at10", "recall_at50"]
  assert cir.fiq_recall(queries, gallery, names, targets, ks=(1,), use_faiss=False) == {"recall_at1": 25.0}
  with pytest.raises(ValueError, match="not in the gallery"):
    cir.fiq_recall(queries, gallery, names, ["c", "a", "d", "zz"])
  with pytest.raises(ValueError, match="appears twice"):
    cir.fiq_recall(queries, gallery, ["a", "b", "c", "d", "a"], targets)
  with pytest.raises(ValueError, match="3 target_names for 4"):
    cir.fiq_recall(queries, gallery, names, targets[:3])


def test_fiq_summary_seed_averages():
  per = {"dress": {"recall_at10": 40.0, "recall_at50": 60.0},
         "shirt": {"recall_at10": 30.0, "recall_at50": 50.0},
         "toptee": {"recall_at10": 50.0, "recall_at50": 73.0}}
  assert cir.fiq_summary(per) == pytest.approx({
      "dress_recall_at10": 40.0, "dress_recall_at50": 60.0, "shirt_recall_at10": 30.0,
      "shirt_recall_at50": 50.0, "toptee_recall_at10": 50.0, "toptee_recall_at50": 73.0,
      "average_recall_at10": 40.0, "average_recall_at50": 61.0, "average_recall": 50.5})
  paper = {"dress": {"recall_at10": 42.09, "recall_at50": 67.33},  # BLIP4CIR+Bi, FashionIQ val
           "shirt": {"recall_at10": 41.76, "recall_at50": 64.28},
           "toptee": {"recall_at10": 46.61, "recall_at50": 70.32}}
  s = cir.fiq_summary(paper)
  assert (round(s["average_recall_at10"], 2), round(s["average_recall_at50"], 2),
          round(s["average_recall"], 2)) == (43.49, 67.31, 55.40)


# ---------------------------------------------------------------------------
# CIRR
# ---------------------------------------------------------------------------
# q0 at 0 deg: ref g0 would rank first; without it the target g1 is first.
# q1 at 100 deg: full ranking g5 g4 g3 g2 g1 g0; ref g2 removed -> g5 g4 g3 g1 g0; target g3 at 2.
# q2 at 45 deg: full ranking g2 g3 g1 g4 g0 g5; ref g2 removed -> g3 g1 g4 g0 g5; target g1 at 1;
#   its members lack g3 (and repeat g1), so the subset ranking is g1 g4 g0 g5: target first.
CIRR_Q = _at([0, 100, 45], norms=[3, 1, 0.2])
REFS = ["g0", "g2", "g2"]
TARGETS = ["g1", "g3", "g1"]
MEMBERS = [G, ["g2", "g3", "g5", "g0", "g1", "g4"], ["g2", "g1", "g0", "g5", "g4", "g1"]]


def _names(rows):
  return [[G[i] if i >= 0 else None for i in row] for row in rows]


def test_cirr_rankings_remove_reference():
  r = cir.cirr_rankings(CIRR_Q, GALLERY, G, REFS, MEMBERS)
  assert _names(r.top) == [["g1", "g2", "g3", "g4", "g5"], ["g5", "g4", "g3", "g1", "g0"],
                        ["g3", "g1", "g4", "g0", "g5"]]
  assert _names(r.subset) == [["g1", "g2", "g3", "g4", "g5"], ["g5", "g4", "g3", "g1", "g0"],
                           ["g1", "g4", "g0", "g5", None]]
  r2 = cir.cirr_rankings(CIRR_Q, GALLERY, G, REFS, MEMBERS, depth=2, chunk=2, use_faiss=True)
  assert _names(r2.top) == [["g1", "g2"], ["g5", "g4"], ["g3", "g1"]]
  assert np.array_equal(r2.subset, r.subset)
  ties = cir.cirr_rankings(_at([20]), _at([0, 30, 20, 20, 20]), list("abcde"), ["c"], [list("abcde")])
  assert ties.top.tolist() == [[3, 4, 1, 0]]  # equal scores: lower gallery index first


def test_cirr_recall_by_hand():
  got = cir.cirr_recall(CIRR_Q, GALLERY, G, REFS, TARGETS, MEMBERS)
  seven = {"group_recall_at1": 200 / 3, "group_recall_at2": 200 / 3, "group_recall_at3": 100.0,
           "recall_at1": 100 / 3, "recall_at5": 100.0, "recall_at10": 100.0, "recall_at50": 100.0}
  v = list(seven.values())
  assert list(got) == list(seven) + ["mean(R@5+R_s@1)", "arithmetic_mean", "harmonic_mean",
                                     "geometric_mean"]
  assert got == pytest.approx({**seven, "mean(R@5+R_s@1)": (100 + 200 / 3) / 2,
                               "arithmetic_mean": sum(v) / 7,
                               "harmonic_mean": 7 / sum(1 / x for x in v),
                               "geometric_mean": math.exp(sum(map(math.log, v)) / 7)})
  assert cir.cirr_recall(CIRR_Q, GALLERY, G, REFS, TARGETS, MEMBERS, ks=(2, 3),
                         subset_ks=(2,))["recall_at2"] == pytest.approx(200 / 3)


def test_cirr_summary_zero_recall():
  s = cir.cirr_summary({"group_recall_at1": 0.0, "recall_at5": 50.0, "recall_at1": 25.0})
  assert s == {"mean(R@5+R_s@1)": 25.0, "arithmetic_mean": 25.0, "harmonic_mean": 0.0,
               "geometric_mean": 0.0}


def test_cirr_recall_errors():
  with pytest.raises(ValueError, match="not among their query's img_set members"):
    cir.cirr_recall(CIRR_Q, GALLERY, G, REFS, ["g1", "g3", "g3"], MEMBERS)
  with pytest.raises(ValueError, match="target == reference"):
    cir.cirr_recall(CIRR_Q, GALLERY, G, REFS, ["g0", "g3", "g1"], MEMBERS)
  with pytest.raises(ValueError, match="reference names are not in the gallery"):
    cir.cirr_rankings(CIRR_Q, GALLERY, G, ["g0", "g2", "x"], MEMBERS)
  with pytest.raises(ValueError, match="2 members for 3"):
    cir.cirr_rankings(CIRR_Q, GALLERY, G, REFS, MEMBERS[:2])


def _seed_cirr(q, g, names, refs, targets, members):
  """The seed's `compute_cirr_val_metrics` procedure, in numpy (full argsort, mask, filter)."""
  qn = q / np.linalg.norm(q, axis=1, keepdims=True)
  gn = g / np.linalg.norm(g, axis=1, keepdims=True)
  ranked = np.asarray(names)[np.argsort(1 - qn @ gn.T, axis=1, kind="stable")]
  ranked = ranked[ranked != np.asarray(refs)[:, None]].reshape(len(q), -1)
  labels = ranked == np.asarray(targets)[:, None]
  in_group = (ranked[..., None] == np.asarray(members)[:, None, :]).any(-1)
  group_labels = labels[in_group].reshape(len(q), -1)
  out = {f"group_recall_at{k}": 100 * group_labels[:, :k].sum() / len(q) for k in (1, 2, 3)}
  out.update({f"recall_at{k}": 100 * labels[:, :k].sum() / len(q) for k in (1, 5, 10, 50)})
  return out


def test_cirr_recall_matches_seed_procedure_on_random_data():
  rng = np.random.default_rng(1)
  n, nq = 70, 300
  names = [f"img{i}" for i in range(n)]
  gallery = rng.normal(size=(n, 8)).astype(np.float32)
  queries = rng.normal(size=(nq, 8)).astype(np.float32)
  refs, targets, members = [], [], []
  for _ in range(nq):
    group = rng.choice(n, 6, replace=False)
    refs.append(names[group[0]])
    targets.append(names[group[1]])
    members.append([names[i] for i in rng.permutation(group)])
  got = cir.cirr_recall(queries, gallery, names, refs, targets, members, chunk=64)
  want = _seed_cirr(queries, gallery, names, refs, targets, members)
  assert {k: got[k] for k in want} == pytest.approx(want)
  assert 0 < got["recall_at1"] < got["recall_at50"] < 100


# ---------------------------------------------------------------------------
# Submission
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def test1_submission():
  src = cir_data.CIRR(cir_data.sample_root("cirr"), "test1")
  rng = np.random.default_rng(0)
  index = rng.normal(size=(len(src.index_names), 16)).astype(np.float32)
  queries = rng.normal(size=(len(src.queries), 16)).astype(np.float32)
  cols = ([q.pair_id for q in src.queries], [q.reference for q in src.queries],
          [q.members for q in src.queries])
  recall, subset = cir.cirr_submission(cols[0], queries, index, src.index_names, cols[1], cols[2])
  return src, queries, index, cols, recall, subset


def test_submission_on_real_test1(test1_submission, tmp_path):
  src, queries, index, (pids, refs, members), recall, subset = test1_submission
  assert cir.validate_cirr_submission(recall, subset, pids, refs, members, src.index_names) == []
  assert len(recall) == len(subset) == 4148 + 2
  assert (recall["version"], recall["metric"], subset["metric"]) == ("rc2", "recall", "recall_subset")
  assert all(len(set(recall[str(p)])) == 50 and len(subset[str(p)]) == 3 for p in pids)

  # Independent check of a few queries: full cosine ranking, reference dropped, members kept.
  qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  gn = index / np.linalg.norm(index, axis=1, keepdims=True)
  for i in (0, 1, 2000, 4147):
    ranked = [src.index_names[j] for j in np.argsort(-(gn @ qn[i]), kind="stable")]
    ranked = [n for n in ranked if n != refs[i]]
    assert recall[str(pids[i])] == ranked[:50]
    assert subset[str(pids[i])] == [n for n in ranked if n in members[i]][:3]

  paths = cir.write_cirr_submission(tmp_path / "sub", "bi", recall, subset)
  assert [p.name for p in paths] == ["recall_submission_bi.json", "recall_subset_submission_bi.json"]
  text = paths[1].read_text()
  assert text.startswith('{"12063": [') and text.endswith('"metric": "recall_subset", "version": "rc2"}')
  assert json.loads(paths[0].read_text()) == recall and json.loads(text) == subset
  assert paths[0].stat().st_size < cir.MAX_SUBMISSION_BYTES
  with pytest.raises(ValueError, match="metric 'recall'"):
    cir.write_cirr_submission(tmp_path, "x", subset, recall)


def test_validator_reports_problems(test1_submission):
  src, _, _, (pids, refs, members), recall, subset = test1_submission
  bad, bad_sub = dict(recall), dict(subset)
  first, second = str(pids[0]), str(pids[1])
  del bad[first]
  bad[second] = [refs[1]] + recall[second][:49]
  bad["1"] = []
  bad_sub["version"] = "rc1"
  outside = next(n for n in src.index_names if n not in members[2])
  bad_sub[str(pids[2])] = subset[str(pids[2])][:2] + [outside]
  bad_sub[str(pids[3])] = subset[str(pids[3])][:2]
  problems = cir.validate_cirr_submission(bad, bad_sub, pids, refs, members, src.index_names)
  assert problems == [
      "recall: 1 pair ids missing (first: 12063)",
      "recall: 1 unknown pair ids (first: 1)",
      f"recall: {second}: contains the reference {refs[1]!r}",
      "recall_subset: header is version='rc1' metric='recall_subset', expected 'rc2' / 'recall_subset'",
      f"recall_subset: {pids[2]}: names outside the img_set members",
      f"recall_subset: {pids[3]}: 2 names (2 distinct), expected 3 distinct"]


def test_cirr_eval_skips_unreadable_img_set_members():
  """A missing gallery image that is another query's img_set member: counted, left out of that subset, no error;
  the subset recall is then computed over the readable members."""
  import types  # pylint: disable=import-outside-toplevel
  from mmret_jax.tasks.cir import evaluate_cir  # pylint: disable=import-outside-toplevel
  names = [f"im{i}" for i in range(8)]
  rng = np.random.default_rng(0)
  feats = {n: rng.standard_normal(4).astype(np.float32) for n in names}
  q = types.SimpleNamespace(reference="im0", target="im1", members=("im0", "im1", "im2", "im3"))
  data = types.SimpleNamespace(dataset="cirr", eval_groups=lambda: [types.SimpleNamespace(
      name="val", index_names=names, queries=[q])])
  qf = lambda qs: np.stack([feats["im1"] + 0.01 for _ in qs])  # the target ranks first
  out = evaluate_cir(data, qf, lambda n: n != "im2", lambda idx: np.stack([feats[n] for n in idx]))
  assert out["images_skipped"] == 1.0 and out["queries_skipped"] == 0.0
  assert out["group_recall_at1"] == 100.0 and out["recall_at1"] == 100.0
