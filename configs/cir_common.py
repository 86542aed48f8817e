"""What `cir_cirr.py` and `cir_fashioniq.py` share: Bi-BLIP4CIR's two stages (`configs/cir_*.py:ARG`).

ARG: `stage1` (fine-tune BLIP's text encoder; the default), `stage2` (train the Combiner on frozen
features; set `init_from` to the stage-I workdir), `smoke` (a tiny BLIP from scratch on the bundled
real val annotations with generated images: stage I, then stage II in `<workdir>/stage2`, on a CPU
in minutes), `baseline` (with stage1/stage2: reversed-loss weight 0, i.e. BLIP4CIR without "Bi").
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(__file__))
from common import base_config, parse_arg  # pylint: disable=wrong-import-position


def cir_config(dataset: str, arg, *, reversed_weight: tuple[float, float], epoch_steps: int,
               best_metric: str):
  """`reversed_weight`: (stage I, stage II) seed weights; `epoch_steps`: steps of one epoch at the
  seed's batch size on the full train split (evaluation / checkpoint cadence)."""
  a = parse_arg(arg, stage1=False, stage2=False, smoke=False, baseline=False)
  stage = 2 if a.stage2 else 1
  c = base_config()
  c.task = "cir"
  c.seed = 0
  c.init_from = "model_base.pth"  # BLIP `model_base.pth` (or a converted / HF BLIP dir, or a stage-I workdir)
  c.tokenizer = ""                # with a .pth: a bert-base-uncased tokenizer dir ([DEC]/[ENC] are added)
  c.cir = ml_collections.ConfigDict(dict(stage=stage, logit_scale=100.0, projection_dim=2560, hidden_dim=5120,
                                         combiner_dropout=0.5))
  # impl (stage I): dense | ring (losses.ring_cross_entropy over the data x fsdp devices: the same loss, no [B, B])
  c.loss = ml_collections.ConfigDict(dict(reversed_weight=0.0 if a.baseline else reversed_weight[stage - 1],
                                          impl="dense"))
  c.model = ml_collections.ConfigDict(dict(
      dtype="bfloat16", remat=False, dropout=0.1,  # BLIP med_config dropout (stage I text encoder)
      # sizes of a from-scratch BLIP (init_from = ""; `:smoke`)
      vision_width=768, vision_layers=12, text_width=768, text_layers=12, heads=12, patch_size=16,
      embed_dim=256, vocab_size=30524))
  c.data = ml_collections.ConfigDict(dict(
      dataset=dataset, root="", image_root="", train_split="train", eval_split="val",
      categories=("dress", "shirt", "toptee"), max_train_queries=0, max_eval_queries=0,
      synthetic_images=False, image_size=384, transform="targetpad", target_ratio=1.25,
      max_seq_length=77, length_buckets=(16, 24, 32, 48, 64), prompt_quirk=True,
      feature_cache="", extract_batch_size=32, eval_batch_size=64, num_threads=4, prefetch=2))
  c.eval_every = epoch_steps
  c.checkpoint_every = epoch_steps
  c.checkpoint.best_metric = best_metric
  c.optim.grad_clip_norm = 0.0  # the seed does not clip
  if stage == 1:  # seed clip_fine_tune.py: AdamW wd 0.05 (all params), text_proj 100x constant, cosine/epoch
    c.num_epochs = 20.0
    c.batch_size = 128
    c.optim.learning_rate = 5e-5
    c.optim.weight_decay = 0.05
    c.optim.no_decay = ()
    c.optim.schedule = "epoch_cosine"
    c.optim.cosine_epochs = 10
    c.optim.cosine_clamp = False  # the seed's lr falls to 0 at epoch 10, then rises again
    c.optim.end_lr_factor = 0.0
    c.optim.lr_groups = (("^text_proj/", 100.0, "constant"),)
  else:  # seed combiner_train.py: Adam lr 2e-5 constant, no weight decay
    c.num_epochs = 300.0
    c.batch_size = 512
    c.optim.learning_rate = 2e-5
    c.optim.schedule = "constant"
    c.model.dtype = "float32"  # the seed extracts features in fp32; the Combiner under AMP
  if a.smoke:
    c.init_from = ""
    c.model.update(dtype="float32", dropout=0.0, vision_width=32, vision_layers=2, text_width=32, text_layers=2,
                   heads=2, patch_size=16, embed_dim=16, vocab_size=1000)
    c.data.update(root="", synthetic_images=True, train_split="val", eval_split="val", image_size=64,
                  max_train_queries=96, max_eval_queries=96, categories=("dress", "shirt"),
                  extract_batch_size=32, eval_batch_size=32, num_threads=1)
    c.cir.update(projection_dim=32, hidden_dim=64, combiner_dropout=0.0)
    c.num_epochs = 0.0
    c.total_steps = 300  # 50 epochs of the 96 queries (train = val here: the bundled files have no train split)
    c.batch_size = 16
    c.log_every = 50
    c.eval_every = 0
    c.checkpoint_every = 150
    c.optim.learning_rate = 1e-3
    c.optim.cosine_epochs = 60
    # then stage II on the stage-I model, in <workdir>/stage2
    c.then = ml_collections.ConfigDict(dict(
        name="stage2", init_from_previous=True,
        overrides=(("cir.stage", 2), ("loss.reversed_weight", reversed_weight[1]), ("total_steps", 300),
                   ("optim.learning_rate", 1e-3), ("optim.schedule", "constant"), ("optim.weight_decay", 0.0),
                   ("optim.no_decay", ()), ("optim.lr_groups", ()),
                   ("grad_cache.chunk_size", 0))))  # stage II: a Combiner on cached features, nothing to chunk
  return c
