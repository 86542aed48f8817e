r"""UniIR CLIP_FF (large) on M-BEIR, the seed's recipe; `:smoke` = a tiny model on the bundled mini M-BEIR.

  python -m mmret_jax.convert to-jax clip_ff_large.pth ckpt/uniir_clip_ff --family uniir --tokenizer TOKENIZER_DIR
  python -m mmret_jax.main --config=configs/uniir_clip_ff.py --workdir=runs/uniir_clip_ff \
      --config.data.root=/data/M-BEIR --config.init_from=ckpt/uniir_clip_ff
  python -m mmret_jax.eval.mbeir all --model runs/uniir_clip_ff --mbeir-root /data/M-BEIR --out runs/uniir_clip_ff/eval
  python -m mmret_jax.main --config=configs/uniir_clip_ff.py:smoke --workdir=runs/uniir_clip_ff_smoke   # CPU, minutes
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from uniir_common import uniir_config  # pylint: disable=wrong-import-position


def get_config(arg=None):
  return uniir_config("clip_ff", arg, per_device_batch=90, init_from="ckpt/uniir_clip_ff")
