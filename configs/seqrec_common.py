"""Shared settings of BLaIR's sequential-recommendation configs (seed `seq_rec_results/config/overall.yaml` on
RecBole 1.2's defaults): see configs/seqrec_unisrec.py and configs/seqrec_sasrectext.py."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import base_config, parse_arg  # pylint: disable=wrong-import-position


def seqrec_config(arg, kind: str, **model):
  arg = parse_arg(arg, smoke=False, domain="All_Beauty", root="dataset/processed",
                  feature="blair-roberta-base.feature")
  c = base_config()
  c.task = "seqrec"
  c.seed = 2020                # RecBole's default seed
  c.num_epochs = 300.0         # RecBole `epochs`
  c.batch_size = 2048          # RecBole `train_batch_size`
  c.log_every = 50
  c.eval_every = -1
  c.eval_every_epochs = 1.0    # RecBole `eval_step` 1: every epoch
  c.checkpoint_every = 1000
  c.checkpoint.best_metric = "eval/valid/ndcg@10"  # the seed's `valid_metric: NDCG@10`
  c.checkpoint.keep = 1        # + the best valid one (BestN), saved at every improvement
  # RecBole `stopping_step` 10: stop once the valid metric has not improved for more than 10 evaluations;
  # export_best: the exported model (and the final eval) is the best valid one, as RecBole tests it
  c.early_stopping.patience, c.early_stopping.export_best = 10, True
  c.model = dict(kind=kind, dtype="float32", **model)
  # root: prepare_seqrec's --output (holding {domain}/) or "sample" (a generated sample, for smoke runs);
  # feature: the `.feature` suffix (the seed's plm_suffix) or a path
  c.data = dict(root=arg.root, domain=arg.domain, feature=arg.feature, num_threads=1, prefetch=2)
  c.eval = dict(ks=(10, 50), batch_size=2048, splits=("valid", "test"))  # overall.yaml topk, eval_batch_size
  # RecBole `learner: adam`, `learning_rate: 0.001`, `weight_decay: 0.0`, no gradient clipping, no schedule
  c.optim.learning_rate = 1e-3
  c.optim.schedule = "constant"
  c.optim.grad_clip_norm = 0.0
  c.optim.weight_decay = 0.0
  if arg.smoke:  # the generated sample (60 items on a circle, 120 users); 2-core CPU in a few minutes (2.5-3 min measured on a loaded machine)
    c.data.root, c.data.domain, c.data.feature = "sample", "Sample", "sample.feature"
    c.batch_size = 64
    c.num_epochs = 20.0
    c.log_every = 10
    c.eval.batch_size = 128
    c.early_stopping.patience = 5
    c.model.update(hidden_dropout_prob=0.1, attn_dropout_prob=0.1, adaptor_dropout_prob=0.1)
    if kind == "unisrec":
      c.model.update(hidden_size=64, inner_size=128, adaptor_layers=(768, 64))
  return c
