"""What the four UniIR configs share (`configs/uniir_{clip,blip}_{sf,ff}.py:ARG`).

ARG: "" (the large model, the seed's recipe), `smoke` (a tiny model from scratch on the bundled mini
M-BEIR with generated images: trains, then runs the whole M-BEIR pipeline on the mini test sets and
prints the table, on a CPU in minutes).
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(__file__))
from common import base_config, parse_arg  # pylint: disable=wrong-import-position

MINI_SETS = ("mscoco_task0", "mscoco_task3", "webqa_task1", "nights_task4", "fashioniq_task7", "cirr_task7",
             "oven_task8")


def uniir_config(variant: str, arg, *, per_device_batch: int, init_from: str):
  a = parse_arg(arg, smoke=False)
  backbone = variant.split("_")[0]
  c = base_config()
  c.task = f"uniir_{backbone}"  # the UniIR task (tasks/uniir.py) with the backbone checked
  c.seed = 2023
  c.init_from = init_from  # a converted UniIR dir: `python -m mmret_jax.convert to-jax SRC DST --family uniir`
  c.tokenizer = ""
  c.uniir = ml_collections.ConfigDict(dict(variant=variant, queue_size=57960, momentum=0.995, alpha=0.4,
                                           temp_min=0.001, temp_max=0.5))
  # impl (CLIP variants): dense | ring (losses.ring_cross_entropy over the data x fsdp devices: the same loss, no
  # [B, B] logits); the BLIP variants' negatives come from the queue (dense only)
  c.loss = ml_collections.ConfigDict(dict(impl="dense"))
  c.model = ml_collections.ConfigDict(dict(dtype="bfloat16", remat=False, dropout=0.0,
                                           width=768, layers=12, heads=12, patch_size=14, vocab_size=1000))
  c.data = ml_collections.ConfigDict(dict(
      root="", image_root="", synthetic_images=False, instructions="random",
      train_file="query/union_train/mbeir_union_up_train.jsonl",
      train_pool="cand_pool/global/mbeir_union_train_cand_pool.jsonl",
      image_size=224, max_length=77 if backbone == "clip" else 100, num_threads=8, prefetch=2,
      augment="blip" if backbone == "blip" else "none"))  # BLIP trains with its random crop + RandomAugment
  # In-training evaluation runs the M-BEIR pipeline in memory; the seed evaluates separately
  # (python -m mmret_jax.eval.mbeir all ...), so it is off in the full configs.
  c.eval = ml_collections.ConfigDict(dict(split="test", pool="local", sets=(), out="", backend="faiss"))
  c.eval_every = -1
  c.num_epochs = 20.0
  c.batch_size = 8 * per_device_batch  # the seed: 8 GPUs
  c.checkpoint_every = 2000
  c.log_every = 50
  c.optim.learning_rate = 1e-5
  c.optim.schedule = "cosine"  # per step to 0, no warmup
  c.optim.grad_clip_norm = 0.0
  if backbone == "clip":  # clip_sf/train.py create_optimizer: AdamW(0.9, 0.98, eps 1e-6), wd 0.2 except ndim<2 etc.
    c.optim.update(b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2, no_decay_below_ndim=2,
                   no_decay=(r".*/bias$", r".*(LayerNorm|layer_norm|layernorm|norm[^/]*|ln_[^/]*)/scale$",
                             r"logit_scale"))
    if variant == "clip_ff":
      c.optim.lr_groups = (("^t5_layers/", 50.0, ""),)  # the T5 layers at 5e-4 (50 x 1e-5)
  else:  # blip: AdamW default betas, wd 0.05 on every param
    c.optim.update(weight_decay=0.05, no_decay=())
  if a.smoke:
    c.init_from = ""
    c.model.update(dtype="float32", width=32, layers=2, heads=2, patch_size=16, vocab_size=500)
    c.data.update(synthetic_images=True, image_size=32, max_length=32 if backbone == "blip" else 77, num_threads=1)
    c.uniir.queue_size = 64
    c.eval.update(sets=MINI_SETS, split="test", pool="both", out="mbeir_eval")  # the CLI pipeline, table printed
    c.eval_every = 0
    c.num_epochs = 0.0
    c.total_steps = 60
    c.batch_size = 16
    c.log_every = 10
    c.checkpoint_every = 30
    c.optim.learning_rate = 1e-3
    c.optim.lr_groups = ()
  return c
