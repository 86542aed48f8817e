"""Full-ranking Recall@K / NDCG@K for sequential recommendation, as RecBole 1.2 computes them for BLaIR's
SASRecText / UniSRec (seed `hyp1231/AmazonReviews2023` `seq_rec_results/config/overall.yaml`: `topk: [10, 50]`,
`metrics: [Recall, NDCG]`, `valid_metric: NDCG@10`, `eval_batch_size: 2048`).

RecBole (recbole/trainer/trainer.py `_full_sort_batch_eval`, `evaluate`; data/dataloader/general_dataloader.py
`FullSortEvalDataLoader`; evaluator/collector.py `eval_batch_collect`; evaluator/metrics.py `Recall`, `NDCG`):

* every row of the valid / test file is one query (history -> target); the model scores all `item_num` ids;
  `scores[:, 0] = -inf` (the padding id); the user's history is NOT masked for sequential models
  (`FullSortEvalDataLoader.collate_fn` returns `history_index = None` when `MODEL_TYPE` is sequential);
* `torch.topk(scores, max(topk))`, a 0/1 hit per position for the one positive (`pos_len` = 1), then
  Recall@K = hits in the top K / 1 and NDCG@K = 1 / log2(rank + 1) for a 1-based rank <= K (the ideal DCG of one
  positive is 1), each averaged over the rows and rounded to `metric_decimal_place` = 4.

Here the target's rank is 1 + the number of items that sort before it in (score descending, item id ascending)
order: the items with a strictly higher score, plus the items with an equal score and a lower id (pad column
excluded). Differences, on purpose:
* Ties: broken by item id, so the result is deterministic and neither the optimistic nor the pessimistic bound.
  torch.topk's order among equal scores is unspecified, and RecBole renumbers items by first appearance while we
  keep the `data_maps` ids, so tied rows can rank differently from a RecBole run (equal item texts give equal
  features, hence equal scores). Without ties the rank is the same.
* No rounding (RecBole prints 4 decimals); "count" (rows evaluated) is returned too.
* Scores are compared in float32 (RecBole: the model's dtype, float32 for the seed's models).
* A NaN target score is a ValueError (RecBole would rank it without a word: torch orders NaN above numbers).
* Batches are padded to `batch_size` rows (copies of the batch's first row, dropped afterwards) so a jitted
  `score_fn` compiles once.

CLI: the test (and valid) figures of a model `python -m mmret_jax.main --config=configs/seqrec_*.py` exported:

    python -m mmret_jax.eval.seqrec --model runs/unisrec_beauty [--data dataset/processed --domain All_Beauty
        --feature blair-roberta-base.feature] [--splits valid,test] [--out results.json]

`--data` / `--domain` / `--feature` default to what the model was trained on (its `seqrec.json`); the features
must be the same items (row count) the model's config names.

Shapes: b rows per batch, L history length, V = n_items (with the padding id 0).
"""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

KS = (10, 50)


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
  """{"recall@k", "ndcg@k"} for 1-based ranks of one positive per row (averaged over rows), + "count".

  recall@k = mean(rank <= k); ndcg@k = mean(1 / log2(rank + 1) if rank <= k else 0).
  """
  ranks = np.asarray(ranks, dtype=np.int64).reshape(-1)
  if ranks.size == 0:
    raise ValueError("no rows to evaluate")
  if ranks.min() < 1:
    raise ValueError(f"ranks are 1-based, got {ranks.min()}")
  gain = 1.0 / np.log2(ranks.astype(np.float64) + 1.0)
  out: dict[str, float] = {}
  for k in ks:
    hit = ranks <= k
    out[f"recall@{k}"] = float(hit.mean())
    out[f"ndcg@{k}"] = float(np.where(hit, gain, 0.0).mean())
  out["count"] = int(ranks.size)
  return out


@jax.jit
def _ranks(scores: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[b, V] scores, [b] targets -> (1-based ranks [b], target score is NaN [b]); column 0 = -inf; ties go to the
  lower item id."""
  scores = scores.astype(jnp.float32).at[:, 0].set(-jnp.inf)
  t = jnp.take_along_axis(scores, target[:, None], axis=1)
  before = (scores > t) | ((scores == t) & (jnp.arange(scores.shape[1])[None, :] < target[:, None]))
  return 1 + jnp.sum(before, axis=1), jnp.isnan(t[:, 0])


def _pad_rows(x: np.ndarray, size: int) -> np.ndarray:
  """[n, ...] -> [size, ...] with copies of row 0 appended."""
  if len(x) == size:
    return x
  return np.concatenate([x, np.repeat(x[:1], size - len(x), axis=0)])


def full_sort_metrics(score_fn: Callable[[np.ndarray, np.ndarray], jax.Array | np.ndarray], item_seq: np.ndarray,
                      seq_len: np.ndarray, target: np.ndarray, *, ks: Sequence[int] = KS, batch_size: int = 2048,
                      progress: bool = True, desc: str = "full-sort eval") -> dict[str, float]:
  """Recall@K and NDCG@K of `score_fn` over every item (RecBole's full-sort evaluation; module docstring).

  Args:
    score_fn: (item_seq int32 [b, L], seq_len int32 [b]) -> scores [b, V] (jax or numpy), b = `batch_size`.
    item_seq, seq_len, target: the split's arrays (`mmret_jax.data.sources.seqrec.SeqRecSplit`).
    ks: cutoffs. batch_size: rows per `score_fn` call (the last batch is padded). progress: a tqdm bar.

  Returns:
    {"recall@k", "ndcg@k" for k in ks, "count"}.
  """
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  item_seq = np.asarray(item_seq, np.int32)
  seq_len = np.asarray(seq_len, np.int32).reshape(-1)
  target = np.asarray(target, np.int32).reshape(-1)
  n = len(target)
  if n == 0:
    raise ValueError("no rows to evaluate")
  if item_seq.ndim != 2 or len(item_seq) != n or len(seq_len) != n:
    raise ValueError(f"item_seq [N, L], seq_len [N], target [N] needed, got {item_seq.shape}, {seq_len.shape}, "
                     f"{target.shape}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if target.min() < 1:
    raise ValueError(f"targets must be item ids >= 1 (0 is padding), got {target.min()}")
  ranks = np.zeros(n, np.int64)

  def collect(start, got):
    r, bad = (np.asarray(a) for a in got)
    m = min(batch_size, n - start)
    if bad[:m].any():
      raise ValueError(f"score_fn gave NaN for the target of row {start + int(np.flatnonzero(bad[:m])[0])}")
    ranks[start:start + m] = r[:m]

  pending = None
  for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress):
    end = min(start + batch_size, n)
    scores = score_fn(_pad_rows(item_seq[start:end], batch_size), _pad_rows(seq_len[start:end], batch_size))
    if scores.ndim != 2 or scores.shape[0] != batch_size:
      raise ValueError(f"score_fn must return [{batch_size}, n_items] scores, got {tuple(scores.shape)}")
    if target[start:end].max() >= scores.shape[1]:
      raise ValueError(f"target id {target[start:end].max()} is outside the {scores.shape[1]} scored items")
    got = _ranks(scores, jnp.asarray(_pad_rows(target[start:end], batch_size)))
    if pending is not None:  # read the previous batch while this one runs
      collect(*pending)
    pending = (start, got)
  collect(*pending)
  return metrics_from_ranks(ranks, ks)


def evaluate_model(model_dir: str | pathlib.Path, *, data_root: str | None = None, domain: str | None = None,
                   feature: str | None = None, splits: Sequence[str] = ("test",), ks: Sequence[int] = KS,
                   batch_size: int = 2048, progress: bool = True) -> dict[str, dict[str, float]]:
  """{split: metrics} of an exported SASRecText / UniSRec model (`tasks/seqrec.py`) on RecBole-format data."""
  from mmret_jax.data.sources import seqrec as seqrec_data  # pylint: disable=import-outside-toplevel
  from mmret_jax.models import sasrec  # pylint: disable=import-outside-toplevel
  from mmret_jax.tasks.seqrec import load_exported  # pylint: disable=import-outside-toplevel
  config, params, info = load_exported(model_dir)
  data_root = data_root or info.get("root")
  domain = domain or info.get("domain")
  feature = feature or info.get("feature")
  if not data_root or not domain or not feature:
    raise ValueError(f"{model_dir} does not say what data it was trained on: pass --data, --domain and --feature")
  data = seqrec_data.load_seqrec(data_root, domain, feature=feature, max_seq_length=config.max_seq_length,
                                 splits=tuple(splits))
  if data.n_items != config.n_items or data.plm_size != config.plm_size:
    raise ValueError(f"the data has {data.n_items} items x {data.plm_size} features; the model was trained on "
                     f"{config.n_items} x {config.plm_size} (another domain or feature file?)")
  model = sasrec.SeqRecModel(config)
  plm = jnp.asarray(data.plm_table, jnp.float32)
  # params and the feature table as arguments: jit would bake closed-over arrays into the program as constants
  scores = jax.jit(lambda p, t, s, l: model.apply({"params": p}, s, l, t, True, method=sasrec.SeqRecModel.scores))
  score = lambda s, l: scores(params, plm, s, l)  # noqa: E731
  out = {}
  for name in splits:
    split = data[name]
    out[name] = full_sort_metrics(score, split.item_seq, split.seq_len, split.target, ks=ks,
                                  batch_size=min(batch_size, len(split)), progress=progress,
                                  desc=f"{name} full-sort eval")
  return out


def main(argv: Sequence[str] | None = None) -> int:
  from mmret_jax import cli  # pylint: disable=import-outside-toplevel
  ap = cli.ArgumentParser(prog="python -m mmret_jax.eval.seqrec",
                          description="Full-ranking Recall@K / NDCG@K of a trained SASRecText / UniSRec model "
                                      "(RecBole's protocol).")
  ap.add_argument("--model", required=True, help="the model dir a seqrec run exported, or its workdir")
  ap.add_argument("--data", help="prepare_seqrec's --output (holding DOMAIN/) (default: the training data)")
  ap.add_argument("--domain", help="the domain (default: the training one)")
  ap.add_argument("--feature", help="the .feature suffix or path (default: the training one)")
  ap.add_argument("--splits", default="test", help="comma-separated: valid, test, train")
  ap.add_argument("--ks", default="10,50", help="comma-separated cutoffs")
  ap.add_argument("--batch-size", type=int, default=2048, help="rows per scoring batch (RecBole eval_batch_size)")
  ap.add_argument("--out", help="write the results as JSON")
  ap.add_argument("--no-progress", action="store_true", help="no progress bars")
  args = ap.parse_args(argv)
  splits = [s for s in args.splits.split(",") if s]
  bad = [s for s in splits if s not in ("train", "valid", "test")]
  if bad or not splits:
    ap.error(f"--splits takes train, valid, test; got {args.splits!r}")
  try:
    ks = tuple(int(k) for k in args.ks.split(","))
  except ValueError:
    ap.error(f"--ks must be comma-separated integers, got {args.ks!r}")
  if min(ks) < 1 or args.batch_size < 1:
    ap.error("--ks and --batch-size must be >= 1")
  if not pathlib.Path(args.model).is_dir():
    ap.error(f"--model {args.model}: no such directory")

  def run() -> int:
    res = evaluate_model(args.model, data_root=args.data, domain=args.domain, feature=args.feature, splits=splits,
                         ks=ks, batch_size=args.batch_size, progress=not args.no_progress)
    for name, m in res.items():
      print(f"{name}: " + ", ".join(f"{k}={v:.4f}" if k != "count" else f"{k}={v}" for k, v in m.items()))
    if args.out:
      pathlib.Path(args.out).write_text(json.dumps(res, indent=2, sort_keys=True))
    return 0
  return cli.run(run)


if __name__ == "__main__":
  sys.exit(main())
