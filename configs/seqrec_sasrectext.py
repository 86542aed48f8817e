r"""SASRecText over BLaIR item features, the seed's `seq_rec_results/config/SASRecText.yaml`.

  python -m mmret_jax.main --config=configs/seqrec_sasrectext.py:domain=All_Beauty --workdir=runs/sasrectext_beauty
  python -m mmret_jax.main --config=configs/seqrec_sasrectext.py:smoke --workdir=runs/seqrec_smoke   # CPU, minutes

Seed: 2 layers, 2 heads, hidden 64, inner 256, dropouts 0.5, MLP adaptor 768 -> 300 -> 64 (dropout 0.2), raw dot
logits, CE over all items; the rest as configs/seqrec_unisrec.py (data: python -m mmret_jax.data.prepare_seqrec).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from seqrec_common import seqrec_config  # pylint: disable=wrong-import-position


def get_config(arg=None):
  return seqrec_config(arg, "sasrectext", hidden_size=64, inner_size=256, adaptor_layers=(768, 300, 64))
