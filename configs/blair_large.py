r"""BLaIR-large: RoBERTa-large, seed `blair/large.sh` (3 GPUs x 192 = global batch 576).

  python -m mmret_jax.main --config=configs/blair_large.py --workdir=runs/blair_large \
      --config.data.train_file=clean_review_meta.tsv
  python -m mmret_jax.main --config=configs/blair_large.py:smoke --workdir=runs/smoke
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import blair_base  # pylint: disable=wrong-import-position


def get_config(arg=None):
  c = blair_base.get_config(arg, preset="roberta-large", per_device_batch=192, num_devices=3)
  if "smoke" not in (arg or ""):
    c.model.remat = True  # 24 layers x batch 576 x 2 passes: trade compute for memory
  return c
