"""CIRR test-server files: `python -m mmret_jax.eval.cir_submission --model DIR --data-root ROOT --output OUT`.

Ranks the test1 gallery for every test1 query (reference removed) and writes
`recall_submission_<name>.json` (top 50) and `recall_subset_submission_<name>.json` (top 3 of the
query's img_set) in the format of the seed's `cirr_test_submission.py`, then checks them
(`validate_cirr_submission`: every pair id, 50 unique names without the reference, subset answers
from the img_set, the server's 5 MB limit).
"""

from __future__ import annotations

import sys
from typing import Sequence

from mmret_jax import cli
from mmret_jax.eval import cir as cir_eval


def main(argv: Sequence[str] | None = None) -> int:
  ap = cli.ArgumentParser(prog="python -m mmret_jax.eval.cir_submission", description=__doc__.split("\n\n")[0])
  cir_eval._dataset_args(ap)  # pylint: disable=protected-access
  ap.add_argument("--output", required=True, help="directory for the two JSON files")
  ap.add_argument("--name", default="", help="file-name part (default: the model dir's name)")
  ap.add_argument("--split", default="test1", help="CIRR split to rank (test1)")
  args = ap.parse_args(argv)
  return cli.run(lambda: _submit(args))


def _submit(args) -> int:
  import pathlib  # pylint: disable=import-outside-toplevel
  log = lambda s: print(s, file=sys.stderr)
  data = cir_eval._load_data(args, "cirr", args.split)  # pylint: disable=protected-access
  model = cir_eval.CirModel(args.model, args.dtype)
  index, feats, ok = cir_eval.features_for(model, data, args, log)
  bad = [n for n in data.index_names if not ok[index[n]]]
  if bad:
    raise ValueError(f"{len(bad)} {args.split} images are missing or unreadable (first: {bad[0]}); the "
                     "server needs a ranking for every query over the whole gallery")
  queries = data.queries
  qf = model.query_features(feats[[index[q.reference] for q in queries]], model.texts(queries), args.batch_size)
  gallery = list(data.index_names)
  recall, subset = cir_eval.cirr_submission([q.pair_id for q in queries], qf, feats[[index[n] for n in gallery]],
                                            gallery, [q.reference for q in queries], [q.members for q in queries])
  name = args.name or pathlib.Path(args.model).resolve().name
  paths = cir_eval.write_cirr_submission(args.output, name, recall, subset)
  problems = cir_eval.validate_cirr_submission(recall, subset, [q.pair_id for q in queries],
                                               [q.reference for q in queries], [q.members for q in queries],
                                               index_names=gallery)
  if problems:
    raise ValueError(f"the submission files fail validation: {'; '.join(problems[:3])}")
  for p in paths:
    print(f"wrote {p}")
  print(f"{len(queries)} queries; upload both files to the CIRR test server")
  return 0


if __name__ == "__main__":
  sys.exit(main())
