r"""Bi-BLIP4CIR on FashionIQ (dress, shirt, toptee): stage I and stage II, the seed's README commands.

  python -m mmret_jax.main --config=configs/cir_fashioniq.py:stage1 --workdir=runs/fiq_s1 \
      --config.data.root=/data/fashionIQ_dataset --config.init_from=model_base.pth --config.tokenizer=bert-base-uncased
  python -m mmret_jax.main --config=configs/cir_fashioniq.py:stage2 --workdir=runs/fiq_s2 \
      --config.data.root=/data/fashionIQ_dataset --config.init_from=runs/fiq_s1
  python -m mmret_jax.main --config=configs/cir_fashioniq.py:smoke --workdir=runs/fiq_smoke  # CPU, minutes

Seed: stage I 20 epochs, batch 128, lr 5e-5 (text_proj 100x), per-epoch cosine over 10 epochs,
reversed-loss weight 0.4; stage II 300 epochs, batch 512, Adam 2e-5, weight 0.5. Selection: the
average of R@10 and R@50 over the categories. `data.root` holds `captions/`, `image_splits/`, `images/`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from cir_common import cir_config  # pylint: disable=wrong-import-position


def get_config(arg=None):
  # 18,000 train triplets / 128 = 140 steps an epoch (stage I)
  return cir_config("fashioniq", arg or "stage1", reversed_weight=(0.4, 0.5), epoch_steps=140,
                    best_metric="eval/average_recall")
