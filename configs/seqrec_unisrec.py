r"""UniSRec (inductive_ft) over BLaIR item features, the seed's `seq_rec_results/config/UniSRec.yaml`.

  python -m mmret_jax.data.prepare_seqrec --domain All_Beauty --interactions benchmark/0core_timestamp_w_his \
      --meta raw/meta_categories --output dataset/processed --model ckpt/blair-base --feature-name blair-roberta-base
  python -m mmret_jax.main --config=configs/seqrec_unisrec.py:domain=All_Beauty --workdir=runs/unisrec_beauty
  python -m mmret_jax.main --config=configs/seqrec_unisrec.py:smoke --workdir=runs/seqrec_smoke   # CPU, minutes

Seed: 2 layers, 2 heads, hidden 300, inner 256, dropouts 0.5, MoE adaptor 8 experts 768 -> 300 (dropout 0.2),
cosine logits / 0.07, CE over all items; RecBole: Adam 1e-3, batch 2048, eval every epoch on valid NDCG@10,
early stopping after 10 evaluations without improvement, test on the best model. `model.train_stage=transductive_ft`
adds the ID embedding. Arg: smoke, domain=..., root=..., feature=... (configs/seqrec_common.py).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from seqrec_common import seqrec_config  # pylint: disable=wrong-import-position


def get_config(arg=None):
  return seqrec_config(arg, "unisrec", hidden_size=300, inner_size=256, train_stage="inductive_ft",
                       adaptor_layers=(768, 300), n_exps=8, temperature=0.07)
