r"""mBLIP mT0-XL (Geigle et al. 2023): BLIP-2 (Flan-T5-XL) ViT + Q-Former re-aligned to bigscience/mt0-xl.
ARG: warmup | instruct (default) | finetune[,ft=xgqa|xvnli|marvl], each optionally `,smoke` (configs/mblip_common.py).

  python -m mmret_jax.convert to-jax BLIP2_FLAN_T5_XL_DIR ckpt/blip2-flan-t5-xl --family blip2
  python -m mmret_jax.convert to-jax MT0_XL_DIR ckpt/mt0-xl
  python -m mmret_jax.main --config=configs/mblip_mt0.py:warmup --workdir=runs/mblip_mt0_warmup \
      --config.data.train_file=DATA/pretrain/ccs_synthetic_filtered_large_2273005_mt.json \
      --config.data.image_roots='("IMAGES",)'
  python -m mmret_jax.main --config=configs/mblip_mt0.py:instruct --workdir=runs/mblip_mt0 \
      --config.init_from=runs/mblip_mt0_warmup --config.data.train_file=DATA/pretrain/task_mix_v2_mt.json
  python -m mmret_jax.main --config=configs/mblip_mt0.py:finetune,ft=xgqa --workdir=runs/mblip_mt0_xgqa \
      --config.init_from=runs/mblip_mt0 --config.data.train_file=DATA/xgqa/xgqa_input_train.json ...
  python -m mmret_jax.main --config=configs/mblip_mt0.py:smoke --workdir=runs/mblip_smoke   # CPU, a minute
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from mblip_common import mblip_config  # pylint: disable=wrong-import-position


def get_config(arg=None):
  # instruct val_check_interval 0.2 epoch (~30.3 k steps an epoch at batch 128)
  return mblip_config("mt5", arg, instruct_eval_every=6000)
