r"""Bi-BLIP4CIR on CIRR (rc2): stage I (BLIP text encoder) and stage II (Combiner), the seed's README commands.

  python -m mmret_jax.main --config=configs/cir_cirr.py:stage1 --workdir=runs/cirr_s1 \
      --config.data.root=/data/cirr_dataset --config.init_from=model_base.pth --config.tokenizer=bert-base-uncased
  python -m mmret_jax.main --config=configs/cir_cirr.py:stage2 --workdir=runs/cirr_s2 \
      --config.data.root=/data/cirr_dataset --config.init_from=runs/cirr_s1
  python -m mmret_jax.main --config=configs/cir_cirr.py:smoke --workdir=runs/cirr_smoke    # CPU, minutes

Seed: stage I 20 epochs, batch 128, lr 5e-5 (text_proj 100x), per-epoch cosine over 10 epochs,
reversed-loss weight 0.1; stage II 300 epochs, batch 512, Adam 2e-5, weight 0.1. Selection: the
mean of R@5 and Rs@1. `data.root` = the CIRR dataset folder (holding `cirr/captions`, `cirr/image_splits`
and the image folders `train/`, `dev/`, `test1/`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from cir_common import cir_config  # pylint: disable=wrong-import-position


def get_config(arg=None):
  # ~28.2k train triplets / 128 = 220 steps an epoch (stage I)
  return cir_config("cirr", arg or "stage1", reversed_weight=(0.1, 0.1), epoch_steps=220,
                    best_metric="eval/recall_mean")
