"""Bi-BLIP4CIR stage-I train-step throughput: mmret_jax (the product's jitted step) vs PyTorch (eager), same size.

    python benchmarks/cir_step.py                            # BLIP-base text tower, 32 triplets x 32 tokens, fp32
    python benchmarks/cir_step.py --size tiny --steps 3      # quick check (seconds)
    python benchmarks/cir_step.py --with-vit                 # + the seed's per-batch frozen ViT (PyTorch, extra line)

One step = Bi-BLIP4CIR's stage-I objective (seed `src/clip_fine_tune.py`, CIRR) on a batch of B
triplets (reference image feature, target image feature, caption as a [FORWARD] and a [BACKWARD]
token sequence), its gradient and an AdamW update of what stage I trains: BLIP's text encoder
(BERT-base "med", text mode: no cross-attention) + `text_proj` (Linear 768 -> 256) on the CLS state:
  w = text_proj(CLS(text_encoder(ids))), n = L2 normalise, sum(i, t) = n(i + t)
  L_f = CE(100 * sum(ref, w_fwd) @ n(tgt).T, diagonal)
  L_r = CE(100 * <sum(n(tgt)_b, w_bwd_a), n(ref)_a>, diagonal)          (the seed's reversed loss)
  L   = L_f + 0.1 * L_r                                                  (CIRR weight)
AdamW (betas 0.9/0.999, eps 1e-8) with weight decay 0.05 on every param, lr 5e-5 (epoch 0 of the
per-epoch cosine), `text_proj` at 100x (5e-3, constant), no gradient clipping; dropout 0.1 in the
text encoder (BLIP's med_config), train mode.

JAX: the real product path. `mmret_jax.tasks.cir.stage1_loss` (what `CirTask.loss_fn` runs in stage
I) on `models.blip.BlipTextTower(PRESETS["base"] with dropout 0.1)`, wrapped in a minimal task object;
the step is `train.loop.make_train_step(task, tx, 1, "stop")` with `tx = train.optim.make_optimizer(
get_config("stage1").optim of configs/cir_cirr.py, 4400 steps, steps_per_epoch=220)` (the stage-I
optimizer as the training run builds it), jitted as `train_and_evaluate` does (single-device mesh,
state shardings from the logical axes, `donate_argnums=0`) and AOT-compiled once (compile time
reported separately). The text encoder reads both caption sets in one pass over 2B sequences.
`--dtype` sets the tower's compute dtype (params stay float32). The product config's stage-I default
is bfloat16 (meant for GPUs); on a CPU the comparison is fp32 against fp32.

PyTorch: `transformers.BlipTextModel(BlipTextConfig(...), add_pooling_layer=False)` called in text
mode (`is_decoder=False`, no encoder states; the config keeps BLIP's cross-attention blocks, which get
no gradient in text mode, as in the seed) + `nn.Linear(768, 256)` text_proj on the CLS state, the
seed's loss code verbatim (two text-encoder passes, forward and backward captions; `element_wise_sum`;
the Tij / ti / Ri [B, B, D] construction of the reversed logits), `torch.optim.AdamW` with the
seed's two param groups (names containing `text_proj` at 100x lr; weight decay 0.05 in both),
`model.train()`, eager (no torch.compile), fp32 on CPU. Weights: one random init (HF's
`BlipTextModel` init with seed `--seed`, the torch default for text_proj) is saved by the driver and
loaded by both sides (the JAX side through the converter's BERT key map), so both start from the
same weights; the eval-mode (no dropout) loss of those weights is computed on both sides as the
agreement check. Dropout masks differ (each framework's own RNG), so the training losses differ a
little.

Both sides get the same random batch: image features ~ N(0, 0.5^2) [B, 256] (raw `vision_proj`
outputs, as the product caches them; the targets are L2-normalised inside the loss, as the seed
normalises them after its image encoder), caption ids in [5, vocab) framed by [CLS]=101 ... [SEP]=102,
ragged lengths (row 0 full, the others uniform in [L/2, L]) padded with 0 to L = `--seq-len` (the
product pads each batch to a length bucket: 16, 24, 32, 48, 64, 77; CIRR captions with the prompts
are ~15-25 tokens, bucket 32). Tokenisation is not timed on either side (the seed tokenises inside
its step; the product in its data pipeline).

`--with-vit`: the PyTorch worker also times the seed's real step, which runs the frozen BLIP image
encoder on every batch (`BlipVisionModel` ViT-B/16 at 384 px + `vision_proj` Linear 768 -> 256,
eval mode, under `torch.no_grad()`, on the B reference and B target images) before the same text
step. mmret_jax extracts those features once and caches them, so this is reported as a separate line
(what the cache saves), not in the main ratio.

Each side runs in its own subprocess: build, compile / first step, `--warmup` untimed steps, then
`--steps` timed steps; the median seconds per step gives samples/s = triplets per second.
`--rounds R` repeats the JAX / PyTorch pair R times (medians over all timed steps), so a change in
machine load hits both. Process CPU seconds per step (all threads) are reported too: they are less
sensitive to other load on a shared machine than wall time. `--xla-cpu tuned` (the default) runs the
JAX worker with the XLA:CPU flags that `python -m mmret_jax.main` applies (mmret_jax/xla_cpu.py),
`default` with XLA's defaults, `both` one worker of each.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=wrong-import-position

from bench_common import CompiledStep, machine_info, print_machine, rss_gb, run_rounds, spawn_worker, timed_steps  # pylint: disable=wrong-import-position
from mmret_jax import xla_cpu  # pylint: disable=wrong-import-position

REPO = pathlib.Path(__file__).resolve().parents[1]

# BLIP-base's text encoder (BERT-base "med": vocab 30524 = bert-base-uncased + [DEC] + [ENC]) and
# ViT-B/16 at 384 px; a seconds-long smoke size of the same family. `embed` = the ITC projection width.
SIZES = {
    "base": dict(text=dict(vocab_size=30524, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072, max_position_embeddings=512),
                 vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                             image_size=384, patch_size=16),
                 embed=256),
    "tiny": dict(text=dict(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=512, max_position_embeddings=512),
                 vision=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                             image_size=64, patch_size=16),
                 embed=256),
}
CLS_ID, SEP_ID, PAD_ID = 101, 102, 0
SCALE, REVERSED_WEIGHT, DROPOUT = 100.0, 0.1, 0.1  # seed clip_fine_tune.py (CIRR), BLIP med_config
LR, TEXT_PROJ_MULT, WEIGHT_DECAY = 5e-5, 100.0, 0.05


# ----------------------------------------------------------------------------- data
def make_batch(size: dict, triplets: int, seq_len: int, seed: int) -> dict[str, np.ndarray]:
  """ref / tgt float32 [B, D]; {fwd,bwd}_{ids,mask} int32 [B, L]: [CLS] ids [SEP], ragged, 0-padded."""
  rng = np.random.default_rng(seed)
  d = size["embed"]
  out = {"ref": rng.normal(0.0, 0.5, (triplets, d)).astype(np.float32),
         "tgt": rng.normal(0.0, 0.5, (triplets, d)).astype(np.float32)}
  for field in ("fwd", "bwd"):
    ids = rng.integers(5, size["text"]["vocab_size"], size=(triplets, seq_len))
    lengths = rng.integers(max(3, seq_len // 2), seq_len + 1, size=triplets)
    lengths[0] = seq_len  # the full length is always used
    mask = np.arange(seq_len)[None, :] < lengths[:, None]
    ids[:, 0] = CLS_ID
    ids[np.arange(triplets), lengths - 1] = SEP_ID
    ids = np.where(mask, ids, PAD_ID)
    out[f"{field}_ids"], out[f"{field}_mask"] = ids.astype(np.int32), mask.astype(np.int32)
  return out


def torch_text_model(torch, transformers, size: dict, seed: int):
  """(BlipTextModel, text_proj) with the seed's layout, HF's random init under `seed`."""
  torch.manual_seed(seed)
  cfg = transformers.BlipTextConfig(**size["text"], encoder_hidden_size=size["vision"]["hidden_size"],
                                    hidden_dropout_prob=DROPOUT, attention_probs_dropout_prob=DROPOUT,
                                    layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=PAD_ID,
                                    bos_token_id=30522 if size["text"]["vocab_size"] > 30522 else None)  # [DEC]
  text = transformers.BlipTextModel(cfg, add_pooling_layer=False)
  proj = torch.nn.Linear(size["text"]["hidden_size"], size["embed"])
  return text, proj


def write_weights(torch, transformers, size: dict, path: pathlib.Path, seed: int) -> tuple[int, int]:
  """Saves the text-mode weights (`text_encoder.*` without cross-attention, `text_proj.*`) as .npz;
  returns (params the text step trains, cross-attention params that get no gradient)."""
  text, proj = torch_text_model(torch, transformers, size, seed)
  sd = {f"text_encoder.{k}": v for k, v in text.state_dict().items()}
  sd.update({f"text_proj.{k}": v for k, v in proj.state_dict().items()})
  keep = {k: v.detach().cpu().numpy() for k, v in sd.items()
          if ".crossattention." not in k and not k.endswith("position_ids")}
  np.savez(path, **keep)
  n_cross = sum(p.numel() for n, p in text.named_parameters() if ".crossattention." in n)
  return sum(int(np.prod(v.shape)) for v in keep.values()), n_cross


# ----------------------------------------------------------------------------- JAX (product path)
class Stage1Task:
  """What `make_train_step` needs of `tasks.cir.CirTask` in stage I: `loss_fn` = `stage1_loss`."""

  def __init__(self, tower, scale: float, weight: float):
    self.tower, self.scale, self.weight = tower, scale, weight

  def loss_fn(self, params, batch, rng, train: bool = True):
    from mmret_jax.tasks.cir import stage1_loss  # pylint: disable=import-outside-toplevel
    return stage1_loss(self.tower, params, batch, rng, train, self.scale, self.weight)


def jax_tower_config(size: dict):
  from mmret_jax.models import blip  # pylint: disable=import-outside-toplevel
  base = blip.PRESETS["base"]
  text = dataclasses.replace(base.text, hidden_dropout_prob=DROPOUT, attention_probs_dropout_prob=DROPOUT)
  if size is SIZES["tiny"]:
    t = size["text"]
    text = dataclasses.replace(text, **t, encoder_width=size["vision"]["hidden_size"])
  assert all(getattr(text, k) == v for k, v in size["text"].items()), (text, size["text"])
  return dataclasses.replace(base, text=text, image_text_hidden_size=size["embed"])


def build_jax(args, weights: pathlib.Path):
  """(task, mesh, state with the saved weights, jitted step, main-group lr schedule) on a 1-device mesh."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, str(REPO / "configs"))
  import cir_cirr  # pylint: disable=import-outside-toplevel
  from mmret_jax.convert import bert as bert_conv  # pylint: disable=import-outside-toplevel
  from mmret_jax.convert.core import Rule, linear_rules, state_dict_to_params  # pylint: disable=import-outside-toplevel
  from mmret_jax.models import blip  # pylint: disable=import-outside-toplevel
  from mmret_jax.train import loop, optim, partitioning  # pylint: disable=import-outside-toplevel

  c = cir_cirr.get_config("stage1")
  o = c.optim
  assert (float(o.learning_rate), float(o.weight_decay), tuple(o.no_decay), float(o.grad_clip_norm)) == \
      (LR, WEIGHT_DECAY, (), 0.0), o
  assert tuple(o.lr_groups) == (("^text_proj/", TEXT_PROJ_MULT, "constant"),), o.lr_groups
  assert (float(c.cir.logit_scale), float(c.loss.reversed_weight)) == (SCALE, REVERSED_WEIGHT)
  steps_per_epoch = int(c.eval_every)  # cir_cirr: ~28.2k triplets / 128 = 220 steps an epoch
  total_steps = int(float(c.num_epochs) * steps_per_epoch)
  cfg = jax_tower_config(SIZES[args.size])
  tower = blip.BlipTextTower(cfg, dtype=jnp.dtype(args.dtype))
  task = Stage1Task(tower, float(c.cir.logit_scale), float(c.loss.reversed_weight))
  mesh = partitioning.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  tx, schedule = optim.make_optimizer(c.optim, total_steps, (), steps_per_epoch)
  init_rng, train_rng = loop.init_and_train_keys(c)  # as train_and_evaluate

  def boxed_state():
    params = tower.init(init_rng, jnp.ones((1, 8), jnp.int32))["params"]  # as CirTask.init_params
    return loop.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                           rng=train_rng)

  # The saved torch weights through the converter's BERT key map (text mode: no cross-attention).
  text_rules = bert_conv.rules(dataclasses.replace(cfg.text, add_cross_attention=False), prefix="text_encoder.",
                               pooler=False)
  rules = [Rule(("text_encoder",) + r.path, r.key, r.kind) for r in text_rules] + \
      linear_rules(("text_proj",), "text_proj")
  with np.load(weights) as z:
    sd = {k: z[k] for k in z.files}

  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.RULES):
    abstract_boxed = jax.eval_shape(boxed_state)
    state_sh = partitioning.logical_to_sharding(nn.get_partition_spec(abstract_boxed), mesh)
    state = jax.jit(lambda: nn.unbox(boxed_state()), out_shardings=state_sh)()
    host = state_dict_to_params(rules, sd, expected=jax.device_get(state.params), ignore=("*position_ids",))

    def take(path, leaf):  # as CirTask.load_init: into the init's tree, strict shapes
      node = host
      for k in path:
        node = node[k.key]
      assert node.shape == leaf.shape, (path, node.shape, leaf.shape)
      return np.asarray(node, leaf.dtype)
    params = jax.device_put(jax.tree_util.tree_map_with_path(take, jax.device_get(state.params)), state_sh.params)
    state = jax.jit(lambda p: loop.TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                                              rng=train_rng), out_shardings=state_sh)(params)
    step_fn = jax.jit(loop.make_train_step(task, tx, 1, "stop"),
                      out_shardings=(state_sh, partitioning.replicated(mesh)), donate_argnums=0)
  return task, mesh, state, step_fn, schedule


# ----------------------------------------------------------------------------- PyTorch baseline
def build_torch(torch, transformers, args, weights: pathlib.Path, device, amp: bool, with_vit: bool):
  """(model, step(batch) -> (loss, loss_f, loss_r), eval_loss(batch)) of the seed's stage-I step."""
  F = torch.nn.functional
  size = SIZES[args.size]
  text, proj = torch_text_model(torch, transformers, size, args.seed)

  class TorchTextEncoder(torch.nn.Module):
    """Seed BLIPTextEncoder.forward: text_proj(text_encoder(ids, mode='text').last_hidden_state[:, 0])."""

    def __init__(self):
      super().__init__()
      self.text_encoder, self.text_proj = text, proj

    def forward(self, ids, mask):
      h = self.text_encoder(input_ids=ids, attention_mask=mask, is_decoder=False).last_hidden_state
      return self.text_proj(h[:, 0, :])

  model = TorchTextEncoder()
  with np.load(weights) as z:
    sd = {k: torch.from_numpy(z[k]) for k in z.files}
  missing, unexpected = model.load_state_dict(sd, strict=False)
  assert not unexpected and all(".crossattention." in k or k.endswith("position_ids") for k in missing), \
      (unexpected, [k for k in missing if ".crossattention." not in k][:5])
  model = model.to(device).train()

  element_wise_sum = lambda image_features, text_features: F.normalize(image_features + text_features, dim=-1)
  crossentropy_criterion = torch.nn.CrossEntropyLoss()

  def seed_loss(reference_features, target_raw, captions, negated_captions):
    """src/clip_fine_tune.py (blip_text_finetune_cirr), the lines inside `autocast`, verbatim."""
    target_features = F.normalize(target_raw, dim=-1)  # the seed normalises its image encoder's output
    images_in_batch = reference_features.size(0)
    text_features = model(*captions)
    negated_text_features = model(*negated_captions)
    predicted_features = element_wise_sum(reference_features, text_features)
    logits = SCALE * predicted_features @ target_features.T
    ground_truth = torch.arange(images_in_batch, dtype=torch.long, device=reference_features.device)
    loss_f = crossentropy_criterion(logits, ground_truth)
    Tij = target_features.unsqueeze(1).repeat(1, images_in_batch, 1).transpose(0, 1)
    ti = negated_text_features.unsqueeze(1).repeat(1, images_in_batch, 1)
    Ri = F.normalize(reference_features, dim=-1).unsqueeze(1).repeat(1, images_in_batch, 1).unsqueeze(-1)
    Pi = element_wise_sum(Tij, ti).unsqueeze(-2)
    logits_r = SCALE * Pi @ Ri
    logits_r = logits_r.squeeze()  # B x B
    loss_r = crossentropy_criterion(logits_r, ground_truth)
    return loss_f + REVERSED_WEIGHT * loss_r, loss_f, loss_r

  optimizer = torch.optim.AdamW(
      [{"params": [p for n, p in model.named_parameters() if "text_proj" not in n], "lr": LR,
        "weight_decay": WEIGHT_DECAY},
       {"params": [p for n, p in model.named_parameters() if "text_proj" in n], "lr": LR * TEXT_PROJ_MULT,
        "weight_decay": WEIGHT_DECAY}])

  vit = None
  if with_vit:  # the seed's frozen BLIPImgEncoder: vision_proj(visual_encoder(images)[:, 0])
    torch.manual_seed(args.seed + 1)
    v = size["vision"]
    vcfg = transformers.BlipVisionConfig(**v, layer_norm_eps=1e-6, hidden_act="gelu", initializer_range=0.02)
    vision_model = transformers.BlipVisionModel(vcfg).to(device).eval()
    vision_proj = torch.nn.Linear(v["hidden_size"], size["embed"]).to(device).eval()
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randn((2 * args.batch_size, 3, v["image_size"], v["image_size"]), generator=gen).to(device)

    def vit(imgs):
      return vision_proj(vision_model(pixel_values=imgs).last_hidden_state[:, 0, :])

  def to_dev(batch):
    t = {k: torch.from_numpy(np.asarray(x)).to(device) for k, x in batch.items()}
    for k in ("fwd_ids", "fwd_mask", "bwd_ids", "bwd_mask"):
      t[k] = t[k].long()
    return t

  def step(b):
    optimizer.zero_grad()
    if vit is not None:
      with torch.no_grad():
        ref = vit(images[:args.batch_size])
        tgt = vit(images[args.batch_size:])
    else:
      ref, tgt = b["ref"], b["tgt"]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
      loss, lf, lr = seed_loss(ref, tgt, (b["fwd_ids"], b["fwd_mask"]), (b["bwd_ids"], b["bwd_mask"]))
    loss.backward()
    optimizer.step()
    if device.type == "cuda":
      torch.cuda.synchronize()
    return loss, lf, lr

  def eval_loss(b):
    model.eval()
    with torch.no_grad():
      out = seed_loss(b["ref"], b["tgt"], (b["fwd_ids"], b["fwd_mask"]), (b["bwd_ids"], b["bwd_mask"]))
    model.train()
    return out

  return model, step, eval_loss, to_dev


# ----------------------------------------------------------------------------- workers
def jax_worker(args) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  from mmret_jax.tasks.cir import stage1_loss  # pylint: disable=import-outside-toplevel
  from mmret_jax.train import partitioning  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  task, mesh, state, step_fn, schedule = build_jax(args, pathlib.Path(args.weights))
  build_s = time.perf_counter() - t0
  n_jax = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  print(f"  [jax] BlipTextTower + state built in {build_s:.1f}s: {n_jax / 1e6:.1f} M params; lr {float(schedule(0)):.1e} "
        f"(text_proj x{TEXT_PROJ_MULT:g}); XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; {jax.devices()[0]}",
        flush=True)
  batch = make_batch(SIZES[args.size], args.batch_size, args.seq_len, args.seed)
  gbatch = partitioning.make_global_batch(batch, mesh)
  with jax.set_mesh(mesh):  # eval-mode loss of the initial weights (the agreement check; before donation)
    ev = jax.jit(lambda p, b: stage1_loss(task.tower, p, b, jax.random.PRNGKey(0), False, task.scale,
                                          task.weight))(state.params, gbatch)
  ev = jax.device_get(ev)
  eval_loss = [float(ev[0]), float(ev[1]["loss_forward"]), float(ev[1]["loss_reversed"])]
  print(f"  [jax] eval-mode loss of the initial weights: {eval_loss[0]:.6f} (forward {eval_loss[1]:.6f}, "
        f"reversed {eval_loss[2]:.6f})", flush=True)
  step = CompiledStep(step_fn, state, gbatch, mesh)
  del state  # donated: the step holds it
  compile_s = step.compile_s
  flops, temp = step.analysis()

  t0 = time.perf_counter()
  m = jax.device_get(step())
  print(f"  [jax] first step {time.perf_counter() - t0:.2f}s: loss {float(m['loss']):.4f} (forward "
        f"{float(m['loss_forward']):.4f}, reversed {float(m['loss_reversed']):.4f}), grad_norm "
        f"{float(m['grad_norm']):.3f}; {rss_gb()}", flush=True)
  out = {"jax": timed_steps(step, args.warmup, args.steps, "jax")}
  out["jax"].update(compile_s=compile_s, build_s=build_s, flops=flops, temp_gb=temp, rss=rss_gb(),
                    loss0=float(m["loss"]), eval_loss=eval_loss, gpu=jax.default_backend() == "gpu")
  return out


def torch_worker(args) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  transformers.utils.logging.disable_progress_bar()
  gpu = torch.cuda.is_available()
  dev = torch.device("cuda" if gpu else "cpu")
  batch = make_batch(SIZES[args.size], args.batch_size, args.seq_len, args.seed)
  variants = {"torch": (False, False)}
  if gpu and args.dtype == "bfloat16":
    variants = {"torch_amp_bf16": (True, False), "torch": (False, False)}
  if args.with_vit:
    variants["torch_with_vit"] = (gpu and args.dtype == "bfloat16", True)
  out = {}
  for name, (amp, with_vit) in variants.items():
    try:
      model, step, eval_loss, to_dev = build_torch(torch, transformers, args, pathlib.Path(args.weights), dev, amp,
                                                   with_vit)
      b = to_dev(batch)
      if name == "torch":
        ev = [x.item() for x in eval_loss(b)]
        print(f"  [torch] BlipTextModel: attn_implementation={model.text_encoder.config._attn_implementation}, "  # pylint: disable=protected-access
              f"threads {torch.get_num_threads()}, device {dev}; eval-mode loss of the initial weights: "
              f"{ev[0]:.6f} (forward {ev[1]:.6f}, reversed {ev[2]:.6f})", flush=True)
      t0 = time.perf_counter()
      loss, lf, lr = step(b)
      print(f"  [{name}] first step {time.perf_counter() - t0:.2f}s: loss {loss.item():.4f} (forward {lf.item():.4f}, "
            f"reversed {lr.item():.4f}); {rss_gb()}", flush=True)
      out[name] = timed_steps(lambda step=step, b=b: step(b), args.warmup, args.steps, name)
      out[name].update(rss=rss_gb(), loss0=loss.item())
      if name == "torch":
        out[name]["eval_loss"] = ev
    except torch.OutOfMemoryError as e:  # reported, not fatal: the other variant still runs
      print(f"  [{name}] out of device memory at batch {args.batch_size}: {str(e).splitlines()[0]}", flush=True)
      out[name] = {"wall": [], "cpu": [], "rss": "OOM", "oom": True}
    model = step = None
    if gpu:
      torch.cuda.empty_cache()
  return out


# ----------------------------------------------------------------------------- driver
def run_worker(side: str, args, weights: pathlib.Path, xla_tuned: bool = False) -> dict:
  env = dict(os.environ)
  if side == "jax" and xla_tuned:
    xla_cpu.apply_cpu_defaults(env)  # exactly what `python -m mmret_jax.main` does before JAX starts
  return spawn_worker(str(pathlib.Path(__file__).resolve()), side, weights.parent,
                      ["--weights", str(weights),
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--size", args.size,
           "--dtype", args.dtype, "--seed", str(args.seed)] + (["--with-vit"] if args.with_vit else []),
                      env, tuned=side == "jax" and xla_tuned)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  ap.add_argument("--batch-size", type=int, default=32,
                  help="triplets per step (2x caption sequences per step; the seed uses 128 on a GPU)")
  ap.add_argument("--seq-len", type=int, default=32, help="padded caption length (the product's length bucket)")
  ap.add_argument("--steps", type=int, default=5, help="timed steps per side and round (median reported)")
  ap.add_argument("--warmup", type=int, default=1, help="untimed steps per side after compile / first step")
  ap.add_argument("--rounds", type=int, default=1, help="JAX, PyTorch, JAX, PyTorch, ... worker pairs")
  ap.add_argument("--size", choices=tuple(SIZES), default="base")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                  help="JAX compute dtype of the text tower (params stay float32). bfloat16 is meant for GPU; "
                       "there PyTorch AMP (bf16 autocast) is timed too")
  ap.add_argument("--xla-cpu", choices=("default", "tuned", "both"), default="tuned",
                  help="XLA:CPU flags of the JAX worker: tuned = what `python -m mmret_jax.main` applies "
                       "(mmret_jax/xla_cpu.py; the default), default = XLA's defaults, both = one JAX worker of each")
  ap.add_argument("--with-vit", action="store_true",
                  help="PyTorch also times the seed's real step with the per-batch frozen BLIP ViT (separate line)")
  ap.add_argument("--skip-torch", action="store_true", help="time only the JAX step")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)  # worker mode
  ap.add_argument("--weights", help=argparse.SUPPRESS)
  ap.add_argument("--result", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  size = SIZES[args.size]
  if not 3 <= args.seq_len <= size["text"]["max_position_embeddings"]:
    ap.error(f"--seq-len must be in [3, {size['text']['max_position_embeddings']}]")

  if args.side:  # worker
    import json  # pylint: disable=import-outside-toplevel
    out = (jax_worker if args.side == "jax" else torch_worker)(args)
    pathlib.Path(args.result).write_text(json.dumps(out))
    return 0

  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  transformers.utils.logging.disable_progress_bar()
  base_flags = os.environ.get("XLA_FLAGS", "")
  tuned_env = dict(os.environ)
  xla_cpu.apply_cpu_defaults(tuned_env)
  tuned_flags = tuned_env.get("XLA_FLAGS", "") or "(none)"
  worker_flags = {"default": base_flags or "(none)", "tuned": tuned_flags,
                  "both": f"jax: {base_flags or '(none)'}; jax_tuned: {tuned_flags}"}
  info = machine_info(torch, start_jax=False, **{"XLA_FLAGS (jax worker)": worker_flags[args.xla_cpu]})
  print_machine(info)
  print(f"  jax_default_prng_impl (JAX_DEFAULT_PRNG_IMPL): {os.environ.get('JAX_DEFAULT_PRNG_IMPL', '(default)')}")
  t = size["text"]
  print(f"== setup: BLIP text tower ({args.size}: {t['num_hidden_layers']} layers, hidden {t['hidden_size']}, "
        f"{t['num_attention_heads']} heads, vocab {t['vocab_size']}, text_proj -> {size['embed']}), random weights "
        f"(the same both sides); {args.batch_size} triplets x {args.seq_len} tokens (forward + backward captions), "
        f"jax dtype={args.dtype}, dropout {DROPOUT}, loss = L_f + {REVERSED_WEIGHT} L_r (x{SCALE:g} logits), "
        f"AdamW lr {LR:g} / text_proj {LR * TEXT_PROJ_MULT:g}, wd {WEIGHT_DECAY}, no clipping, "
        f"--xla-cpu {args.xla_cpu}" + (", --with-vit" if args.with_vit else ""))
  tmp = tempfile.TemporaryDirectory()
  weights = pathlib.Path(tmp.name) / "weights.npz"
  n_params, n_cross = write_weights(torch, transformers, size, weights, args.seed)
  batch = make_batch(size, args.batch_size, args.seq_len, args.seed)
  n_tok = int(sum(batch[f"{f}_mask"].sum() for f in ("fwd", "bwd")))
  print(f"  text encoder + text_proj: {n_params / 1e6:.1f} M trained params (PyTorch also holds {n_cross / 1e6:.1f} M "
        f"cross-attention params that get no gradient in text mode, as the seed); batch {2 * args.batch_size} "
        f"sequences, {n_tok} real tokens of {2 * args.batch_size * args.seq_len}", flush=True)

  res = run_rounds(run_worker, args, weights)

  print("== results (median seconds per step -> samples/s = triplets/s)")
  sps, cpu = {}, {}
  for k, v in list(res.items()):
    if not v["wall"]:
      print(f"  {k:15s} out of device memory at this batch size")
      del res[k]
      continue
    med = statistics.median(v["wall"])
    sps[k], cpu[k] = args.batch_size / med, statistics.median(v["cpu"])
    print(f"  {k:15s} {med:8.3f} s/step  {sps[k]:8.3f} samples/s  cpu {cpu[k]:.1f} s/step  "
          f"(steps: {', '.join(f'{x:.2f}' for x in v['wall'])}; {v['rss']})")
  for k in (k for k in res if k.startswith("jax")):
    print(f"  {k} compile time (excluded from timing): {', '.join(f'{c:.1f}s' for c in res[k]['compile_all'])}")
  if "torch" in res:
    te = res["torch"]["eval_loss"]
    for k in (k for k in res if k.startswith("jax")):
      je = res[k]["eval_loss"]
      print(f"  loss agreement (same initial weights, eval mode = no dropout): {k}[{args.dtype}] {je[0]:.6f} vs "
            f"PyTorch {te[0]:.6f}, |diff| {abs(je[0] - te[0]):.2e} (forward {abs(je[1] - te[1]):.2e}, reversed "
            f"{abs(je[2] - te[2]):.2e}); first train step (dropout, own RNGs): {res[k]['loss0']:.4f} vs "
            f"{res['torch']['loss0']:.4f}")
  gpu = any(v.get("gpu") for v in res.values())
  for k in (k for k in res if k.startswith("jax")):
    if "torch" in sps:
      print(f"  ratio {k}[{args.dtype}] / PyTorch[float32 eager, {'cuda' if gpu else 'cpu'}] samples/s: "
            f"{sps[k] / sps['torch']:.3f}  (by median CPU s/step: {cpu['torch'] / cpu[k]:.3f})")
    if "torch_amp_bf16" in sps:
      print(f"  ratio {k}[{args.dtype}] / PyTorch[AMP bf16]: {sps[k] / sps['torch_amp_bf16']:.3f}")
    if "torch_with_vit" in sps:
      print(f"  not in the ratio above: the seed's step with its per-batch frozen ViT (PyTorch, "
            f"{2 * args.batch_size} images at {size['vision']['image_size']} px) "
            f"{args.batch_size / sps['torch_with_vit']:.3f} s/step, {sps['torch_with_vit']:.3f} samples/s; "
            f"{k} on cached features is {sps[k] / sps['torch_with_vit']:.2f}x that")
  print(f"  load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  tmp.cleanup()
  return 0


if __name__ == "__main__":
  sys.exit(main())
