r"""BLaIR-base: RoBERTa-base, contrastive (review -> item metadata) + 0.1 MLM, seed `blair/base.sh`.

  python -m mmret_jax.main --config=configs/blair_base.py --workdir=runs/blair_base \
      --config.data.train_file=clean_review_meta.tsv
  python -m mmret_jax.main --config=configs/blair_base.py:smoke --workdir=runs/smoke   # CPU, minutes

Seed recipe: 2 GPUs x 384 = global batch 768, lr 5e-5 linear decay, no warmup, 1 epoch, max length
64, temp 0.05, fp16, eval every 1000 steps (shared/reference/blair.md §3).
"""

import importlib.resources
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import base_config, parse_arg  # pylint: disable=wrong-import-position


def sample_pairs() -> str:
  return str(importlib.resources.files("mmret_jax") / "data" / "samples" / "blair_pairs.tsv")


def get_config(arg=None, *, preset="roberta-base", per_device_batch=384, num_devices=2):
  arg = parse_arg(arg, smoke=False)
  c = base_config()
  c.task = "blair"
  c.seed = 42
  c.num_epochs = 1.0
  c.batch_size = per_device_batch * num_devices
  c.log_every = 50
  c.eval_every = 1000
  c.checkpoint_every = 1000
  c.init_from = preset  # HF id (needs the hub or its cache) or a local dir
  # attention: auto (the fused Pallas kernel on GPU for bf16, XLA elsewhere) | xla | fused |
  # fused_qkv (the kernel reading q/k/v packed from the fused projection; not yet timed on a GPU).
  # norm: xla | fused (bias + dropout + residual + LayerNorm in Pallas kernels; not yet timed on a GPU)
  c.model = dict(preset=preset, dtype="bfloat16", remat=False, dropout=0.1, attention="auto", norm="xla")
  c.data = dict(train_file="clean_review_meta.tsv", valid_fraction=0.01, max_seq_length=64,
                eval_batch_size=64, eval_max_pairs=20000, num_threads=8, prefetch=4)
  c.loss = dict(temp=0.05, pooler="cls", do_mlm=True, mlm_weight=0.1, mlm_probability=0.15,
                # MLM vocab head positions, capped per batch shard: 0 = auto (mean + 6 sd of the masked count;
                # the loss is exact unless a shard overflows, counted as mlm_overflow), -1 = all (seed), N per row.
                mlm_max_predictions=0, symmetric=False, learnable_temp=False,
                # dense: the [B, B] logits on every device; ring: losses.ring_contrastive_loss (candidate blocks
                # passed around the data x fsdp devices, O(b x B) memory per device, the same loss and gradients)
                impl="dense")
  # Held-out pairs at ks; optionally Amazon-C4 (test.csv + sampled_item_metadata_1M.jsonl), NDCG@100.
  c.eval = dict(ks=(1, 10, 50, 100), c4_queries="", c4_pool="", c4_max_length=512)
  c.optim.learning_rate = 5e-5
  c.optim.grad_clip_norm = 1.0
  c.checkpoint.best_metric = "eval/recall@10"
  if arg.smoke:  # tiny RoBERTa from scratch on the bundled sample; 2-core CPU in ~2 minutes
    c.init_from = ""
    c.tokenizer = "bpe:2000"
    # No dropout: from scratch, dropout noise on the CLS vector swamps the contrastive signal of a
    # width-64 model at init and the loss idles at log(batch) for hundreds of steps.
    c.model = dict(preset="roberta-tiny", dtype="float32", remat=False, dropout=0.0, attention="auto",
                   norm="xla")
    c.data.train_file = sample_pairs()
    c.data.valid_fraction = 0.1
    c.data.max_seq_length = 48
    c.data.eval_max_pairs = 400
    c.data.num_threads = 2
    c.num_epochs = 0.0
    c.total_steps = 200
    c.batch_size = 64
    c.log_every = 20
    c.eval_every = 100
    c.checkpoint_every = 100
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 20
    c.loss.mlm_weight = 0.1
  return c
