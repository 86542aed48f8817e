r"""mBLIP BLOOMZ-7B (Geigle et al. 2023): BLIP-2 ViT + Q-Former re-aligned to bigscience/bloomz-7b1 (decoder-only:
prompt + target + eos in one sequence, left padded; projection randomly initialised, 4096 wide).
ARG: warmup | instruct (default) | finetune[,ft=...], each optionally `,smoke` (configs/mblip_common.py).

The seed trains BLOOMZ's instruct stage with the LLM in 4-bit NF4 (bf16 compute), batch 4 x 4 GPUs x 8
accumulation; here the frozen LLM runs unquantised in `model.dtype`. README: the BLOOMZ run starts from a random
projection without a warm-up checkpoint (open question 4), so `init_from` is the BLIP-2 image side +
`mblip.llm_from` for every stage that starts from the base models.

  python -m mmret_jax.convert to-jax BLOOMZ_7B1_DIR ckpt/bloomz-7b1
  python -m mmret_jax.main --config=configs/mblip_bloomz.py:instruct --workdir=runs/mblip_bloomz \
      --config.init_from=ckpt/blip2-flan-t5-xl --config.mblip.llm_from=ckpt/bloomz-7b1 \
      --config.data.train_file=DATA/pretrain/task_mix_v2_mt.json --config.data.image_roots='("IMAGES",)'
  python -m mmret_jax.main --config=configs/mblip_bloomz.py:smoke --workdir=runs/mblip_bloomz_smoke   # CPU
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from mblip_common import mblip_config  # pylint: disable=wrong-import-position


def get_config(arg=None):
  c = mblip_config("bloom", arg, instruct_eval_every=3000)  # val_check_interval 0.1
  if c.mblip.stage == "instruct" and c.init_from:  # no warm-up checkpoint: image side + LLM, random projection
    c.init_from = "ckpt/blip2-flan-t5-xl"
    c.mblip.llm_from = "ckpt/bloomz-7b1"
  return c
