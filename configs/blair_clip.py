r"""BLaIR-CLIP twin tower: RoBERTa (BLaIR) text tower + CLIP ViT-B/16 vision tower (fork recipe).

  python -m mmret_jax.main --config=configs/blair_clip.py --workdir=runs/blair_clip \
      --config.data.train_file=clean_review_meta_with_images.tsv --config.data.image_root=blair_clip_images
  python -m mmret_jax.main --config=configs/blair_clip.py:smoke --workdir=runs/blair_clip_smoke  # CPU, minutes

Fork scripts (aokhader/BLAIR-MultiModal, shared/reference/blair.md §7): 8 GPUs x 256, lr 1e-4,
warmup 10%, 5 epochs, bf16, text-text weight 0.5, text tower from blair-roberta-base.
"""

import importlib.resources
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import blair_base  # pylint: disable=wrong-import-position
from common import parse_arg  # pylint: disable=wrong-import-position


def get_config(arg=None):
  arg = parse_arg(arg, smoke=False)
  c = blair_base.get_config("smoke" if arg.smoke else None)
  c.task = "blair_clip"
  c.mm = dict(clip_model_name="openai/clip-vit-base-patch16", vision_preset="B/16", projection_dim=512,
              temperature_init=0.07, text_text_weight=0.5, freeze_clip_tower=False, freeze_text_tower=False)
  c.data.image_column = "image_path"
  c.data.image_root = ""
  c.data.missing_images = "skip"  # skip | black: a row without a readable image is dropped or (the fork) fed black
  c.checkpoint.best_metric = "eval/t2i/recall@10"
  if not arg.smoke:
    c.init_from = "hyp1231/blair-roberta-base"
    c.batch_size = 8 * 256
    c.num_epochs = 5.0
    c.optim.learning_rate = 1e-4
    c.optim.warmup_fraction = 0.1
    c.data.train_file = "clean_review_meta_with_images.tsv"
  else:  # tiny towers from scratch on the bundled 60-product image sample
    sample = importlib.resources.files("mmret_jax") / "data" / "samples" / "blair_clip"
    c.mm.clip_model_name = ""
    c.mm.vision_preset = "tiny"
    c.mm.projection_dim = 64
    c.data.train_file = str(sample / "pairs.tsv")
    c.data.image_root = str(sample)
    c.data.valid_fraction = 0.1
    c.data.max_seq_length = 24
    c.data.eval_max_pairs = 120
    c.data.eval_batch_size = 32
    c.tokenizer = "bpe:600"
    c.total_steps = 150
    c.batch_size = 32
    c.log_every = 15
    c.eval_every = 75
    c.checkpoint_every = 75
    c.eval.ks = (1, 5, 10)
  return c
