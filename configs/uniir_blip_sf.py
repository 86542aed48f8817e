r"""UniIR BLIP_SF (large) on M-BEIR, the seed's recipe; `:smoke` = a tiny model on the bundled mini M-BEIR.

  python -m mmret_jax.convert to-jax blip_sf_large.pth ckpt/uniir_blip_sf --family uniir --tokenizer TOKENIZER_DIR
  python -m mmret_jax.main --config=configs/uniir_blip_sf.py --workdir=runs/uniir_blip_sf \
      --config.data.root=/data/M-BEIR --config.init_from=ckpt/uniir_blip_sf
  python -m mmret_jax.eval.mbeir all --model runs/uniir_blip_sf --mbeir-root /data/M-BEIR --out runs/uniir_blip_sf/eval
  python -m mmret_jax.main --config=configs/uniir_blip_sf.py:smoke --workdir=runs/uniir_blip_sf_smoke   # CPU, minutes
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from uniir_common import uniir_config  # pylint: disable=wrong-import-position


def get_config(arg=None):
  return uniir_config("blip_sf", arg, per_device_batch=115, init_from="ckpt/uniir_blip_sf")
