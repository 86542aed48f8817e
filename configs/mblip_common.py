"""What `configs/mblip_mt0.py` and `configs/mblip_bloomz.py` share: the seed's stages and recipe
(gregor-ge/mBLIP `configs/experiment/mblip_*.yaml`, README; shared/reference/mblip.md).

ARG (comma-separated): one stage of `warmup`, `instruct` (default), `finetune` (with `ft=xgqa|xvnli|marvl`,
default xgqa), and `smoke`: a tiny random BLIP-2 + a tiny LLM built from scratch, a tokenizer built from
the bundled sample's texts, trained on the bundled sample (mmret_jax/data/samples/mblip) for 80 steps on a
CPU in about a minute, then the held-out loss and the export.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(__file__))
from common import base_config, parse_arg  # pylint: disable=wrong-import-position

STAGE_ARGS = ("warmup", "instruct", "finetune")
# Fine-tuning recipes (configs/experiment/mblip_finetune_*.yaml): train file, template, label map, images per
# row, global batch (batch/GPU x GPUs x accumulation), epochs, lr, validation file.
FINETUNE = {
    # README: 64 x 4 GPUs, lr 5e-5 (the yaml: 64 x 1 x 4, lr 3e-5)
    "xgqa": dict(train_file="xgqa/xgqa_input_train.json", template="Question: {} Short answer in English:",
                 label_map=(), batch=256, epochs=5.0, lr=5e-5, val_file="xgqa/xgqa_input_val_en.json"),
    "xvnli": dict(train_file="xvnli/xvnli_input_train.json",
                  template='Is it guaranteed true that "{}"? Yes, no, or maybe? Answer in English:',
                  label_map=(), batch=128, epochs=10.0, lr=1e-5, val_file="xvnli/xvnli_input_val_fr.json"),
    "marvl": dict(train_file="marvl/nlvr_train_en.json",
                  template='Based on the two images, is it correct to say "{}"? Yes or no?',
                  label_map=(("True", "yes"), ("False", "no")), batch=128, epochs=20.0, lr=1e-5,
                  val_file="marvl/nlvr_dev_en.json"),
}


def mblip_config(llm: str, arg, *, instruct_eval_every: int):
  """`llm`: "mt5" (mT0-XL) or "bloom" (BLOOMZ-7b1)."""
  a = parse_arg(arg, smoke=False, warmup=False, instruct=False, finetune=False, ft="xgqa")
  stages = [s for s in STAGE_ARGS if a[s]]
  if len(stages) > 1:
    raise ValueError(f"give one stage of {STAGE_ARGS}, got {stages}")
  stage = stages[0] if stages else "instruct"
  if a.ft not in FINETUNE:
    raise ValueError(f"ft must be one of {sorted(FINETUNE)}, got {a.ft!r}")
  c = base_config()
  c.task = "mblip"
  c.seed = 42
  # A converted mBLIP / BLIP-2 dir. warmup: the BLIP-2 image side (`python -m mmret_jax.convert to-jax
  # Salesforce/blip2-flan-t5-xl ckpt/blip2 --family blip2`) + mblip.llm_from; instruct: the warm-up run's
  # workdir; finetune: the instruct run's workdir (its export has the LoRA merged).
  c.init_from = "ckpt/mblip-warmup" if stage == "instruct" else ("ckpt/blip2-flan-t5-xl" if stage == "warmup"
                                                                   else "ckpt/mblip-instruct")
  c.tokenizer = ""  # "" = init_from's (or llm_from's)
  c.mblip = ml_collections.ConfigDict(dict(
      stage=stage,
      llm_from="ckpt/mt0-xl" if llm == "mt5" else "ckpt/bloomz-7b1",  # the LLM (converted), warm-up only
      # random_init_projection: True for BLOOMZ (4096 wide) and the warm-up; the mT0 instruct run starts from
      # the warm-up's projection
      random_projection=stage == "warmup" or (llm == "bloom" and stage == "instruct"),
      merge_lora_from=""))  # a PEFT adapter dir merged into the LLM at init (finetune from base + adapter)
  if stage != "warmup":
    c.mblip.llm_from = ""
  # mT0: lora_all = q, k, v, o (encoder self, decoder self and cross attention) + wi_0, wi_1, wo; BLOOMZ:
  # query_key_value, dense, dense_h_to_4h, dense_4h_to_h (models/lora.py TARGETS). r 8, alpha 16, dropout 0.05.
  c.lora = ml_collections.ConfigDict(dict(targets="none" if stage == "warmup" else "lora_all", r=8, alpha=16.0,
                                          dropout=0.05))
  # The seed trains the LLM 8-bit (mT0) / 4-bit NF4 (BLOOMZ instruct) quantised and frozen under bf16 autocast.
  # mblip.quant_bits = 8 (or 4) runs the frozen LLM's block matrices weight-only int8 / int4 (qwix, models/quant.py:
  # `pip install -e '.[quant]'`); 0 = the frozen LLM in `dtype`. Export dequantizes (LoRA merged on top).
  c.mblip.quant_bits = 0
  c.model = ml_collections.ConfigDict(dict(
      dtype="bfloat16", remat=True,  # the seed: LLM gradient checkpointing
      # from-scratch sizes (only without init_from)
      llm=llm, vision_width=1408, vision_layers=39, qformer_width=768, qformer_layers=12, llm_width=2048,
      llm_layers=24, heads=16, patch_size=14, num_query_tokens=32, dropout=0.1,
      llm_init=1.0 if llm == "mt5" else 0.02))  # mT5 initializer_factor / BLOOM initializer_range (HF defaults)
  c.data = ml_collections.ConfigDict(dict(
      train_file="data/pretrain/" + ("ccs_synthetic_filtered_large_2273005_mt.json" if stage == "warmup"
                                     else "task_mix_v2_mt.json"),
      image_roots=("data/pretrain/images", "flickr30k/flickr_images", "imagenet/train"),
      val_file="", val_size=500,  # train[500:] / train[:500]
      label_map=(), template="{}", max_len=128, image_size=224, augment="mblip",
      pad_multiple=8, buckets=(),  # the seed pads to multiples of 8; buckets = fewer compiled shapes
      eval_batch_size=32, num_threads=8, prefetch=2))
  # Generation settings of the seed's evaluation (configs/evaluation/*.yaml). eval_task (vqa | classify | vqav2 |
  # maxm | caption; "" = off) adds generation metrics on the val rows to each evaluation (eval/generation.py).
  c.generation = ml_collections.ConfigDict(dict(eval_task="", num_beams=5, min_new_tokens=1, max_new_tokens=10,
                                                length_penalty=-1.0, caption_max_new_tokens=50,
                                                caption_length_penalty=1.0))
  c.batch_size = 128  # mT0: 8 x 4 GPUs x 4 accumulation; BLOOMZ instruct: 4 x 4 x 8
  c.checkpoint_every = 2000
  c.log_every = 10
  # AdamW (eps 1e-8), wd 0.1 except names containing "bias" or LayerNorm weights (qformer/layernorm and
  # T5 layer_norm ARE decayed, as in the seed); get_cosine_schedule_with_warmup(1000); clip 1.0.
  c.optim.update(learning_rate=1e-5, weight_decay=0.1, eps=1e-8, schedule="cosine", warmup_steps=1000,
                 grad_clip_norm=1.0)
  c.optim.no_decay = (r"bias", r"/LayerNorm/scale$")
  c.optim.lr_groups = ()
  if stage == "warmup":  # projection only, lr 5e-3 (README), max_steps 8000, 1 epoch
    c.optim.learning_rate = 5e-3
    c.total_steps = 8000
    c.eval_every = 800  # val_check_interval 0.1
  elif stage == "instruct":  # 2 epochs; Q-Former / queries / projection at 1e-5, LoRA at 2e-4
    c.num_epochs = 2.0
    c.optim.lr_groups = ((r"^lora/", 20.0, ""),)
    c.eval_every = instruct_eval_every
  else:
    ft = FINETUNE[a.ft]
    c.data.update(train_file=ft["train_file"], template=ft["template"], label_map=ft["label_map"],
                  val_file=ft["val_file"], val_size=0)
    c.num_epochs, c.batch_size, c.optim.learning_rate = ft["epochs"], ft["batch"], ft["lr"]
    c.eval_every = 0  # val_check_interval 1.0: every epoch (set to the steps per epoch)
  if a.smoke:
    c.init_from = ""
    c.mblip.llm_from = ""
    c.model.update(dtype="float32", remat=False, vision_width=32, vision_layers=1, qformer_width=32,
                   qformer_layers=2, llm_width=32, llm_layers=1, heads=2, patch_size=8, num_query_tokens=4,
                   dropout=0.0, llm_init=0.5 if llm == "mt5" else 0.2)  # a random frozen LLM LoRA can steer
    c.data.update(train_file="", image_roots=(), val_file="", val_size=32, label_map=(), template="{}",
                  image_size=32, num_threads=1, eval_batch_size=32)
    c.lora.update(r=8, dropout=0.0)
    c.num_epochs = 0.0
    c.total_steps = 80
    c.batch_size = 16
    c.eval_every = 0
    c.checkpoint_every = 40
    c.optim.update(learning_rate=3e-3 if stage == "warmup" else 1e-3, warmup_steps=5)  # warmup smoke: a random
    # frozen LLM leaves the projection little to learn; the path runs, the loss hardly moves
    if stage != "warmup":
      c.optim.lr_groups = ((r"^lora/", 10.0, ""),)
  return c
