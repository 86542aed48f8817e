r"""BagFormer fine-tuning on MUGE, the seed's recipe (configs/config_muge.yaml); `:smoke` = a tiny model on
the bundled MUGE sample (mmret_jax/data/samples/muge), trained then evaluated on its valid split.

  python -m mmret_jax.convert to-jax bagformer_pretrained.pth ckpt/bagformer --family bagformer \
      --tokenizer BERT_BASE_CHINESE_DIR
  python -m mmret_jax.main --config=configs/bagformer_muge.py --workdir=runs/bagformer_muge \
      --config.data.root=/data/Multimodal_Retrieval --config.init_from=ckpt/bagformer \
      --config.bagging.dictionary=/data/entity_dict_20220507
  python -m mmret_jax.eval.bagformer --model runs/bagformer_muge --muge-root /data/Multimodal_Retrieval \
      --split valid --out runs/bagformer_muge/eval_valid
  python -m mmret_jax.main --config=configs/bagformer_muge.py:smoke --workdir=runs/bagformer_smoke   # CPU, a minute
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(__file__))
from common import base_config, parse_arg  # pylint: disable=wrong-import-position


def get_config(arg=None):
  a = parse_arg(arg, smoke=False)
  c = base_config()
  c.task = "bagformer"
  c.seed = 42  # the seed's 42 + rank
  c.init_from = "ckpt/bagformer"  # a converted BagFormer (or ALBEF-style pretrained) checkpoint
  c.tokenizer = ""                # default: the init_from dir's (bert-base-chinese's vocab)
  c.model = ml_collections.ConfigDict(dict(
      dtype="float32", remat=False, interaction="bagwise", fusion_strategy="late_fusion",
      temp_min=0.05, temp_max=0.5,
      # from-scratch sizes (only without init_from)
      width=768, layers=6, heads=12, patch_size=16, embed_dim=256, dropout=0.1))
  c.bagging = ml_collections.ConfigDict(dict(mode="faithful", dictionary=""))  # "" = the data root's entity_dict.txt
  c.data = ml_collections.ConfigDict(dict(root="", image_size=256, max_length=25, augment="bagformer",
                                          check_images=True, num_threads=4, prefetch=2))
  c.eval = ml_collections.ConfigDict(dict(split="valid", k_test=256, batch_size=64, directions=("t2i", "i2t"),
                                          out="eval_valid"))
  c.eval_every = 0  # at the end (the seed evaluates every epoch: set eval_every to the steps per epoch)
  c.num_epochs = 6.0
  c.batch_size = 32
  c.checkpoint_every = 2000
  c.log_every = 50
  # AdamW lr 1e-5, wd 0.02 except biases and 1-D params; timm cosine stepped per epoch over 6 epochs
  c.optim.update(learning_rate=1e-5, weight_decay=0.02, schedule="epoch_cosine", grad_clip_norm=0.0)
  c.optim.cosine_epochs = 6
  c.optim.no_decay = (r".*/bias$",)
  c.optim.no_decay_below_ndim = 2
  if a.smoke:
    c.init_from = ""
    c.model.update(width=32, layers=1, heads=2, embed_dim=32, dropout=0.0)
    c.data.update(image_size=32, num_threads=1, augment="none")
    c.eval.update(k_test=16)
    c.num_epochs = 0.0
    c.total_steps = 200
    c.batch_size = 16
    c.log_every = 10
    c.checkpoint_every = 100
    c.optim.update(learning_rate=3e-3, schedule="cosine")
  return c
