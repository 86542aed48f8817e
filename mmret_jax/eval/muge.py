"""MUGE retrieval metrics and test predictions as BagFormer reports them.

Seed: `howard-hou/BagFormer` `MUGE_helper/evaluation.py` (`itm_eval`, `t2i_pred`) and
`train_muge.py` (prediction files: one JSON per query, `ensure_ascii=False`).

* `itm_eval`: the rank of a query (row) is the best 0-based rank among its ground truths; R@K is the
  percentage of rows with rank < K. `txt_r*` are image->text, `img_r*` text->image. A row with no
  ground truth (e.g. a pool image no query lists) counts as a miss, as in the seed.
* `muge_metrics`: the official MUGE numbers are text->image only: R@1, R@5, R@10 and MeanRecall
  (their mean, = `img_r_mean`).
* Ties: we rank by score descending, then index ascending (a stable descending sort). The seed uses
  `np.argsort(score)[::-1]`, whose order among equal scores is unspecified (in practice often the
  higher index first), so results differ only where a ground truth ties exactly with other scores.
  The seed's re-rank matrices fill everything outside the top k_test = 256 with -100; those ties sit
  at ranks >= 256 and cannot change R@1/5/10.

Shapes: Ni pool images, Nt queries (texts), K prediction depth.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

KS = (1, 5, 10)
_BLOCK_ELEMENTS = 1 << 24  # score elements compared at once


def _check_scores(scores: Any, name: str) -> np.ndarray:
  s = np.asarray(scores)
  if s.ndim != 2 or s.shape[0] == 0 or s.shape[1] == 0:
    raise ValueError(f"{name} must be a non-empty 2-D score matrix, got shape {s.shape}")
  if np.issubdtype(s.dtype, np.floating) and np.isnan(s).any():
    raise ValueError(f"{name} contains NaN scores; rankings would be undefined")
  return s


def _targets(gt: Sequence[Iterable[int]] | Mapping[int, Iterable[int]], rows: int, cols: int,
             name: str) -> list[list[int]]:
  """Per row, its ground-truth columns; a mapping (the seed's defaultdict) may omit rows."""
  if isinstance(gt, Mapping):
    bad = [k for k in gt if not 0 <= int(k) < rows]
    if bad:
      raise ValueError(f"{name} has keys outside [0, {rows}): {bad[:5]}")
    out = [list(gt.get(r, ())) for r in range(rows)]
  else:
    if len(gt) != rows:
      raise ValueError(f"{name} has {len(gt)} entries for {rows} score rows")
    out = [list(g) for g in gt]
  for r, g in enumerate(out):
    if any(not 0 <= int(c) < cols for c in g):
      raise ValueError(f"{name}[{r}] = {g} has an index outside [0, {cols})")
  return out


def best_ranks(scores: Any, targets: Sequence[Iterable[int]] | Mapping[int, Iterable[int]]) -> np.ndarray:
  """0-based rank of the best-ranked ground truth per row; inf for a row without any.

  Order: score descending, then column index ascending. Vectorised in row blocks: the best ground
  truth is the highest-scoring one (lowest index among equals); its rank is the number of scores
  above it plus the number of equal scores at lower indices.

  Args:
    scores: [R, C] scores.
    targets: per row, ground-truth columns (a sequence of length R, or a mapping row -> columns).

  Returns:
    [R] float64 ranks.
  """
  s = _check_scores(scores, "scores")
  rows, cols = s.shape
  gt = _targets(targets, rows, cols, "targets")
  ranks = np.full(rows, np.inf)
  has = np.fromiter((len(g) > 0 for g in gt), bool, rows)
  width = max((len(g) for g in gt), default=0)
  if not width:
    return ranks
  pad = np.full((rows, width), -1, np.int64)
  for r, g in enumerate(gt):
    pad[r, :len(g)] = sorted(g)
  block = max(1, _BLOCK_ELEMENTS // cols)
  col_idx = np.arange(cols)
  for r0 in range(0, rows, block):
    sl = slice(r0, r0 + block)
    blk, idx, ok = s[sl].astype(np.float64), pad[sl], has[sl]
    # Best ground truth: the max score, the lowest column among equals (argmax takes the first;
    # real columns are sorted and come before the -1 padding, which scores -inf).
    gs = np.where(idx >= 0, np.take_along_axis(blk, np.maximum(idx, 0), 1), -np.inf)
    best_col = idx[np.arange(len(idx)), np.argmax(gs, axis=1)]
    best = blk[np.arange(len(blk)), best_col][:, None]
    r = (blk > best).sum(1) + ((blk == best) & (col_idx < best_col[:, None])).sum(1)
    ranks[sl] = np.where(ok, r, np.inf)
  return ranks


def _recalls(ranks: np.ndarray, ks: Sequence[int] = KS) -> list[float]:
  return [100.0 * float(np.count_nonzero(ranks < k)) / len(ranks) for k in ks]


def itm_eval(scores_i2t: Any, scores_t2i: Any, txt2img: Sequence[Iterable[int]] | Mapping[int, Iterable[int]],
             img2txt: Sequence[Iterable[int]] | Mapping[int, Iterable[int]]) -> dict[str, float]:
  """The seed's `itm_eval`: image->text and text->image R@1/5/10 (percent) and their means.

  Args:
    scores_i2t: [Ni, Nt] image -> text scores.
    scores_t2i: [Nt, Ni] text -> image scores.
    txt2img: per query, its pool indices (`MugeSplit.txt2img`; a mapping may omit queries).
    img2txt: per pool image, its query indices (`MugeSplit.img2txt`); images without any are misses.

  Returns:
    {txt_r1, txt_r5, txt_r10, txt_r_mean, img_r1, img_r5, img_r10, img_r_mean, r_mean}, Python floats.
  """
  i2t, t2i = _check_scores(scores_i2t, "scores_i2t"), _check_scores(scores_t2i, "scores_t2i")
  if i2t.shape != t2i.shape[::-1]:
    raise ValueError(f"scores_i2t {i2t.shape} and scores_t2i {t2i.shape} must be [Ni, Nt] and [Nt, Ni]")
  tr = _recalls(best_ranks(i2t, img2txt))
  ir = _recalls(best_ranks(t2i, txt2img))
  tr_mean, ir_mean = sum(tr) / 3, sum(ir) / 3
  return {"txt_r1": tr[0], "txt_r5": tr[1], "txt_r10": tr[2], "txt_r_mean": tr_mean,
          "img_r1": ir[0], "img_r5": ir[1], "img_r10": ir[2], "img_r_mean": ir_mean,
          "r_mean": (tr_mean + ir_mean) / 2}


def muge_metrics(scores_t2i: Any, txt2img: Sequence[Iterable[int]] | Mapping[int, Iterable[int]]) -> dict[str, float]:
  """Official MUGE text->image numbers: {"R@1", "R@5", "R@10", "MeanRecall"} (percent).

  Equal to `itm_eval`'s img_r1, img_r5, img_r10 and img_r_mean.
  """
  r = _recalls(best_ranks(scores_t2i, txt2img))
  return {"R@1": r[0], "R@5": r[1], "R@10": r[2], "MeanRecall": sum(r) / 3}


def top_indices(scores: Any, k: int) -> np.ndarray:
  """[R, min(k, C)] column indices per row, by score descending then index ascending."""
  s = _check_scores(scores, "scores")
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  k = min(int(k), s.shape[1])
  out = np.empty((s.shape[0], k), np.int64)
  block = max(1, _BLOCK_ELEMENTS // s.shape[1])
  for r0 in range(0, s.shape[0], block):
    blk = s[r0:r0 + block].astype(np.float64)
    cols = np.broadcast_to(np.arange(s.shape[1]), blk.shape)
    if k < s.shape[1]:  # keep exactly k per row: all above the k-th score, then its ties by index
      kth = -np.partition(-blk, k - 1, axis=1)[:, k - 1:k]
      tied = blk == kth
      keep = (blk > kth) | (tied & (np.cumsum(tied, axis=1) <= k - (blk > kth).sum(1, keepdims=True)))
      blk, cols = blk[keep].reshape(-1, k), cols[keep].reshape(-1, k)
    order = np.lexsort((cols, -blk), axis=-1)  # last key primary: score descending, then index
    out[r0:r0 + len(blk)] = np.take_along_axis(cols, order, 1)
  return out


def t2i_predictions(scores_t2i: Any, query_ids: Sequence[int], query_texts: Sequence[str],
                    pool_ids: Sequence[int], k: int = 10) -> list[dict[str, Any]]:
  """Top-k item ids per query (the seed's `t2i_pred`; ties: lower pool index first).

  Args:
    scores_t2i: [Nt, Ni] text -> image scores.
    query_ids, query_texts: Nt each, in score-row order (`MugeSplit.query_ids` / `.texts`).
    pool_ids: Ni item ids in score-column order (`MugeSplit.pool_ids`).
    k: prediction depth (MUGE submissions use 10).

  Returns:
    [{"query_id": int, "query_text": str, "item_ids": [int] * min(k, Ni)}], one per query.
  """
  s = _check_scores(scores_t2i, "scores_t2i")
  if not len(query_ids) == len(query_texts) == s.shape[0]:
    raise ValueError(f"{len(query_ids)} query_ids and {len(query_texts)} query_texts for {s.shape[0]} score rows")
  if len(pool_ids) != s.shape[1]:
    raise ValueError(f"{len(pool_ids)} pool_ids for {s.shape[1]} score columns")
  pool = np.asarray(pool_ids)
  top = top_indices(s, k)
  return [{"query_id": int(qid), "query_text": text, "item_ids": [int(x) for x in pool[row]]}
          for qid, text, row in zip(query_ids, query_texts, top)]


def write_predictions(path: str | os.PathLike, preds: Iterable[Mapping[str, Any]]) -> pathlib.Path:
  """Writes predictions as JSONL (UTF-8, `ensure_ascii=False`, as the seed); returns the path."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for p in preds:
      f.write(json.dumps(dict(p), ensure_ascii=False) + "\n")
  return path


def prediction_recall(preds: Iterable[Mapping[str, Any]], labels: Mapping[int, Iterable[int]],
                      ks: Sequence[int] = KS) -> dict[str, float]:
  """MUGE R@K from a prediction list and query_id -> ground-truth item ids (a hit if any is in the top k).

  Every labelled query must have a prediction; the result matches `muge_metrics` on the same scores.
  """
  got = {int(p["query_id"]): list(p["item_ids"]) for p in preds}
  missing = [q for q in labels if q not in got]
  if missing:
    raise ValueError(f"{len(missing)} labelled queries have no prediction (first: {missing[:5]})")
  if not labels:
    raise ValueError("no labelled queries")
  hits = [[bool(set(items) & set(got[q][:k])) for k in ks] for q, items in labels.items()]
  r = [100.0 * sum(h[i] for h in hits) / len(hits) for i in range(len(ks))]
  out = {f"R@{k}": v for k, v in zip(ks, r)}
  out["MeanRecall"] = sum(r) / len(r)
  return out
