"""Config helpers shared by `configs/*.py` (keys every training config has)."""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """`"smoke"` or `"smoke,foo=3"` -> ConfigDict of flags; unknown names are an error."""
  out = dict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, _, value = part.partition("=")
    if key not in out:
      raise ValueError(f"Unknown config arg {key!r}; known: {', '.join(sorted(out))}")
    out[key] = type(out[key])(value) if value else True
  return ml_collections.ConfigDict(out)


def base_config() -> ml_collections.ConfigDict:
  """The keys every training config carries, so runs are shortened and reshaped the same way."""
  c = ml_collections.ConfigDict()
  c.task = ""
  c.seed = 0
  c.init_rng_impl = "auto"   # auto | threefry2x32 | rbg: PRNG of the random init (auto: rbg on GPU)
  c.total_steps = 0          # > 0 wins over num_epochs
  c.num_epochs = 0.0
  c.batch_size = 32          # global, over all devices and hosts
  c.grad_accum_steps = 1     # microbatches per step (contrastive negatives then come from each microbatch)
  # GradCache (train/grad_cache.py): > 0 = encode the batch in chunks of this many rows, the loss still on the
  # whole batch (every negative), activations of one chunk at a time; contrastive tasks only
  c.grad_cache = ml_collections.ConfigDict({"chunk_size": 0})
  c.log_every = 50
  c.eval_every = 1000        # 0 = only at the end, -1 = never
  c.eval_every_epochs = 0.0  # > 0 wins over eval_every: every this many epochs
  # patience > 0: stop once checkpoint.best_metric has not improved for more than this many evaluations (RecBole's
  # stopping_step); export_best: save at every improvement and export the best checkpoint's model
  c.early_stopping = ml_collections.ConfigDict({"patience": 0, "export_best": False})
  c.checkpoint_every = 1000
  c.stop_at_step = 0         # > 0: save and exit at this step (preemptible jobs, tests)
  c.on_nonfinite = "stop"    # stop | skip
  c.peak_flops_per_device = 0.0  # for MFU on unknown devices
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.init_from = ""           # HF id, HF dir or converted dir ("" = from scratch)
  c.tokenizer = ""           # dir, or "bpe:VOCAB" to build one from the training data
  c.checkpoint = ml_collections.ConfigDict({"keep": 2, "best_metric": "", "best_mode": "max",
                                                 "async_save": True})
  c.optim = ml_collections.ConfigDict({
      "learning_rate": 5e-5, "schedule": "linear", "warmup_steps": 0, "warmup_fraction": 0.0,
      "end_lr_factor": 0.0, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.0,
      "grad_clip_norm": 1.0, "freeze": ()})
  return c
