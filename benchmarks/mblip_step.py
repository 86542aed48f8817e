"""mBLIP instruct-stage train-step throughput: mmret_jax (the product's jitted step) vs PyTorch (eager), same model.

    python benchmarks/mblip_step.py --size small --rounds 3     # ViT 6 x 384, Q-Former 4 x 384, mT5 512 8+8, fp32
    python benchmarks/mblip_step.py --size tiny --steps 2       # quick check (seconds)

One step = the seed's instruct stage (configs/mblip_mt0.py:instruct, mmret_jax/tasks/mblip.py) on a batch of B
examples, each one image (224 px), a prompt of `--prompt` tokens and a target of `--label` tokens:
  prefix = language_projection(Q-Former(query_tokens, ViT(image)))           [B, 32, d_model], PREPENDED
  loss   = mean target CE of mT5(inputs_embeds = [prefix, embed(prompt)], labels)  (-100 ignored)
trained: Q-Former + query tokens + language projection (lr 1e-5) and LoRA (r 8, alpha 16, dropout 0.05) on the
mT5's q, k, v, o (encoder self, decoder self and cross attention) and wi_0, wi_1, wo (lr 20 x 1e-5 = 2e-4);
frozen: the ViT and every LLM weight. AdamW (eps 1e-8, weight decay 0.1 but biases and `LayerNorm` weights),
global-norm clipping 1.0, cosine schedule with 1000 warm-up steps. Dropout 0.1 in the Q-Former and the mT5
(mT0-XL's `dropout_rate`), train mode; `--no-dropout` turns every dropout off (diagnostic).

Same weights: the driver builds a random transformers `Blip2ForConditionalGeneration` (mT5 language model,
gated-GELU, untied head; ViT `initializer_range` 0.02) under `--seed`, adds PEFT LoRA (peft's init: A kaiming
uniform, B zeros) and saves the base state dict and the LoRA A matrices. The JAX worker converts the base with
our converter (family "mblip") and takes the A matrices (transposed; B = 0), the PyTorch worker loads both.

JAX: the real step. `MBlipTask.loss_fn` (tasks/mblip.py: frozen leaves under `stop_gradient`, then
`lora.apply_with_lora` on `models/mblip.MBlip`) on a task object that holds the model only (no data files),
`optim.make_optimizer(get_config("instruct").optim, total_steps, task.freeze_patterns())` (the two lr groups,
frozen leaves at zero updates), `train.loop.make_train_step(task, tx, 1, "stop")` jitted as
`train_and_evaluate` does (1-device mesh, state shardings from the logical axes, `donate_argnums=0`),
AOT-compiled once (compile time reported apart). fp32 compute, no remat (the product's instruct config has
bf16 + remat on, meant for accelerators; the PyTorch side runs no gradient checkpointing either).

PyTorch: transformers 5.x `Blip2ForConditionalGeneration.forward` with labels. Its 5.x forward writes the
projected queries into `num_query_tokens` placeholder tokens (`image_token_index`); the placeholders are put
at the start of `input_ids` (mask 1), which is exactly the seed's prepend path (shared/reference/mblip.md).
`peft.get_peft_model` with a regex over the LLM's q/k/v/o/wi_0/wi_1/wo, then `requires_grad` on the Q-Former,
query tokens and projection (ViT and LLM frozen), `torch.optim.AdamW` on the trainable params in the seed's
groups, `get_cosine_schedule_with_warmup`, `clip_grad_norm_(1.0)`, `model.train()`, eager, fp32, torch threads
= usable CPUs. Step: forward with labels, backward, clip, step, scheduler step, zero_grad.

Check before timing: the eval-mode (no dropout) loss of the initial weights on the batch, on both sides; the
driver asserts a relative difference below 1e-4. Each side runs in its own subprocess (build, compile / first
step, `--warmup` untimed steps, `--steps` timed steps); `--rounds R` repeats the JAX / PyTorch pair (medians
over all timed steps). Process CPU seconds per step are reported too (less sensitive to other load).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=wrong-import-position

from bench_common import CompiledStep, load_average, machine_info, print_machine, rss_gb, run_rounds, spawn_worker, timed_steps, usable_cpus  # pylint: disable=wrong-import-position
from mmret_jax import xla_cpu  # pylint: disable=wrong-import-position

REPO = pathlib.Path(__file__).resolve().parents[1]

# HF Blip2Config parts. "small": like benchmarks/generate.py's mT5 "small"; mBLIP itself is ViT-g (1408 x 39),
# Q-Former 768 x 12 and mT0-XL (2048, 24 + 24): far too slow for a CPU benchmark.
SIZES = {
    "small": dict(vision=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                              image_size=224, patch_size=14),
                  qformer=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6,
                               cross_attention_frequency=2),
                  text=dict(d_model=512, d_ff=1024, num_layers=8, num_decoder_layers=8, num_heads=6, d_kv=64,
                            vocab_size=32000),
                  queries=32),
    "tiny": dict(vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             image_size=64, patch_size=16),
                 qformer=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              cross_attention_frequency=2),
                 text=dict(d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=16,
                           vocab_size=1000),
                 queries=8),
}
PAD_ID, EOS_ID = 0, 1
DROPOUT, LORA_R, LORA_ALPHA, LORA_DROPOUT = 0.1, 8, 16.0, 0.05
# PEFT target regex (re.fullmatch over module names) = models/lora.py TARGETS[("mt5", "lora_all")]
PEFT_TARGETS = (r"language_model\.(encoder|decoder)\.block\.\d+\.layer\.\d+\."
                r"(SelfAttention\.(q|k|v|o)|EncDecAttention\.(q|k|v|o)|DenseReluDense\.(wi_0|wi_1|wo))")
STEPS_PER_EPOCH = 30300  # configs/mblip_mt0.py: ~30.3 k steps an epoch at batch 128 (2 epochs)
REL_TOL = 1e-4


# ----------------------------------------------------------------------------- model and data
def hf_config(transformers, size: str, dropout: bool):
  s = SIZES[size]
  p = DROPOUT if dropout else 0.0
  text = dict(model_type="mt5", **s["text"], feed_forward_proj="gated-gelu", tie_word_embeddings=False,
              dropout_rate=p, decoder_start_token_id=PAD_ID, pad_token_id=PAD_ID, eos_token_id=EOS_ID)
  return transformers.Blip2Config(
      vision_config=dict(**s["vision"], layer_norm_eps=1e-6, initializer_range=0.02),  # HF's 1e-10: a blind ViT
      qformer_config=dict(**s["qformer"], hidden_dropout_prob=p, attention_probs_dropout_prob=p),
      text_config=text, num_query_tokens=s["queries"])


def lora_config(peft, dropout: bool):
  return peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT if dropout else 0.0,
                         target_modules=PEFT_TARGETS, bias="none")


def make_batch(size: str, batch: int, prompt: int, label: int, seed: int) -> dict[str, np.ndarray]:
  """pixels float32 [B, H, W, 3] (normalised-pixel scale), input_ids / attention_mask int32 [B, prompt] (right
  padded, eos-terminated, a quarter of the rows shorter), labels int32 [B, label] (eos-terminated, -100 padded)."""
  s = SIZES[size]
  rng = np.random.default_rng(seed)
  hw = s["vision"]["image_size"]
  vocab = s["text"]["vocab_size"] - 1  # the last id is the PyTorch side's image placeholder
  px = rng.standard_normal((batch, hw, hw, 3)).astype(np.float32)

  def ragged(length, fill):
    ids = rng.integers(2, vocab, (batch, length))
    n = np.full(batch, length)
    short = rng.random(batch) < 0.25
    short[0] = False  # the full length is always used
    n[short] = rng.integers(max(2, length // 3), length, int(short.sum()))
    real = np.arange(length)[None, :] < n[:, None]
    ids[np.arange(batch), n - 1] = EOS_ID
    return np.where(real, ids, fill).astype(np.int32), real.astype(np.int32)

  ids, mask = ragged(prompt, PAD_ID)
  labels, _ = ragged(label, -100)
  return {"pixels": px, "input_ids": ids, "attention_mask": mask, "labels": labels}


def write_weights(torch, transformers, peft, args, path: pathlib.Path) -> dict:
  """Saves {path}/config.json, base.npz (the Blip2 state dict) and lora_a.npz ({HF module key: A [r, in]})."""
  torch.manual_seed(args.seed)
  cfg = hf_config(transformers, args.size, not args.no_dropout)
  model = transformers.Blip2ForConditionalGeneration(cfg)
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(cfg.to_dict()))
  np.savez(path / "base.npz", **{k: v.detach().numpy() for k, v in model.state_dict().items()})
  counts = {"total": sum(p.numel() for p in model.parameters()),
            "vision": sum(p.numel() for p in model.vision_model.parameters()),
            "llm": sum(p.numel() for p in model.language_model.parameters())}
  torch.manual_seed(args.seed + 1)
  pm = peft.get_peft_model(model, lora_config(peft, not args.no_dropout))
  a = {n[len("base_model.model."):-len(".lora_A.default.weight")]: p.detach().numpy()
       for n, p in pm.named_parameters() if n.endswith(".lora_A.default.weight")}
  np.savez(path / "lora_a.npz", **a)
  counts["lora"] = sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)
  counts["lora_modules"] = len(a)
  # the reference loss both workers check before timing (B = 0: the adapted model is the base model)
  model.config.image_token_index = cfg.text_config.vocab_size - 1
  pm.eval()
  with torch.no_grad():
    counts["ref_loss"] = float(pm(**to_torch(torch, make_batch(args.size, args.batch_size, args.prompt, args.label,
                                                                args.seed), cfg.num_query_tokens,
                                         model.config.image_token_index)).loss)
  return counts


def to_torch(torch, b: dict, queries: int, image_token: int) -> dict:
  """The batch as `Blip2ForConditionalGeneration.forward` kwargs: NCHW pixels; `queries` image placeholders
  (the last vocab id) before the prompt ids, mask 1 (= the seed's prepend path); int64 ids."""
  ids = torch.from_numpy(b["input_ids"].astype(np.int64))
  mask = torch.from_numpy(b["attention_mask"].astype(np.int64))
  return {"pixel_values": torch.from_numpy(np.ascontiguousarray(b["pixels"].transpose(0, 3, 1, 2))),
          "input_ids": torch.cat([torch.full((ids.shape[0], queries), image_token), ids], 1),
          "attention_mask": torch.cat([torch.ones((ids.shape[0], queries), dtype=torch.long), mask], 1),
          "labels": torch.from_numpy(b["labels"].astype(np.int64))}


# ----------------------------------------------------------------------------- JAX (product path)
def make_task_class():
  from mmret_jax.tasks.mblip import MBlipTask  # pylint: disable=import-outside-toplevel

  class InstructTask(MBlipTask):
    """`MBlipTask` in the instruct stage with the model only (its loss_fn, forward, freezing, init_params)."""

    def __init__(self, config, model, lora_cfg):  # pylint: disable=super-init-not-called
      from mmret_jax.train import optim  # pylint: disable=import-outside-toplevel
      self.config, self.stage, self.model, self.lora_cfg = config, "instruct", model, lora_cfg
      self.family, self.decoder_only, self._eval_fn = "t5", False, None
      self.quant_llm = self.quant_model = None  # float LLM (no mblip.quant_bits)
      self._frozen = optim.matches(tuple(config.optim.get("freeze", ())) + self.freeze_patterns())

  return InstructTask


def build_jax(args, weights: pathlib.Path):
  """(task, mesh, state with the saved weights, jitted step) on a 1-device mesh."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, str(REPO / "configs"))
  import mblip_mt0  # pylint: disable=import-outside-toplevel
  from mmret_jax.convert import mblip as mblip_convert, t5 as t5_convert  # pylint: disable=import-outside-toplevel
  from mmret_jax.models import blip2, lora as lora_lib, mblip  # pylint: disable=import-outside-toplevel
  from mmret_jax.tasks.mblip import flatten, nest  # pylint: disable=import-outside-toplevel
  from mmret_jax.train import loop, optim, partitioning  # pylint: disable=import-outside-toplevel

  c = mblip_mt0.get_config("instruct")
  o = c.optim
  assert (float(o.learning_rate), float(o.weight_decay), float(o.eps), float(o.grad_clip_norm), int(o.warmup_steps),
          str(o.schedule)) == (1e-5, 0.1, 1e-8, 1.0, 1000, "cosine"), o
  assert tuple(o.lr_groups) == ((r"^lora/", 20.0, ""),), o.lr_groups
  assert (str(c.lora.targets), int(c.lora.r), float(c.lora.alpha), float(c.lora.dropout)) == \
      ("lora_all", LORA_R, LORA_ALPHA, LORA_DROPOUT), c.lora
  total_steps = int(float(c.num_epochs) * STEPS_PER_EPOCH)
  hf = json.loads((weights / "config.json").read_text())
  with np.load(weights / "base.npz") as z:
    sd = {k: z[k] for k in z.files}
  converted, _ = mblip_convert.to_params(sd, hf)
  del sd
  model_cfg = blip2.Blip2Config.from_dict(hf)
  model = mblip.MBlip(model_cfg, dtype=jnp.float32, remat=False)
  lora_cfg = lora_lib.LoraConfig.preset("mt5", "lora_all", r=LORA_R, lora_alpha=LORA_ALPHA,
                                        lora_dropout=0.0 if args.no_dropout else LORA_DROPOUT)
  task = make_task_class()(c, model, lora_cfg)
  mesh = partitioning.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  tx, _ = optim.make_optimizer(c.optim, total_steps, task.freeze_patterns())
  init_rng, train_rng = loop.init_and_train_keys(c)

  # our LoRA module paths -> the HF module keys PEFT adapted; A [r, in] -> ours [in, r], B = 0
  hf_key = lora_lib.hf_module_keys(t5_convert.seq2seq_rules(mblip.llm_config(model_cfg)))
  with np.load(weights / "lora_a.npz") as z:
    torch_a = {k: z[k] for k in z.files}

  def boxed_state():
    params = task.init_params(init_rng)
    return loop.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=train_rng)

  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.RULES):
    abstract_boxed = jax.eval_shape(boxed_state)
    state_sh = partitioning.logical_to_sharding(nn.get_partition_spec(abstract_boxed), mesh)
    abstract = jax.tree.map(lambda x: x.value if isinstance(x, nn.LogicallyPartitioned) else x, abstract_boxed,
                            is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))  # no sharding constraints
    ours = flatten(abstract.params["lora"])
    keys = {p: "language_model." + hf_key[p[len("language_model/"):]] for p in ours}
    if sorted(keys.values()) != sorted(torch_a):
      raise SystemExit(f"LoRA targets differ: ours {len(keys)} modules, PEFT {len(torch_a)}; only ours: "
                       f"{sorted(set(keys.values()) - set(torch_a))[:4]}, only PEFT: "
                       f"{sorted(set(torch_a) - set(keys.values()))[:4]}")
    lora = nest({p: {"lora_A": torch_a[keys[p]].T.copy(), "lora_B": np.zeros(ab["lora_B"].shape, np.float32)}
                 for p, ab in ours.items()})
    host = {"model": converted, "lora": lora}

    def take(path, leaf):  # strict: the converted tree must have the init's leaves and shapes
      node = host
      for k in path:
        node = node[k.key]
      if node.shape != leaf.shape:
        raise SystemExit(f"shape mismatch at {optim.path_str(path)}: {node.shape} vs {leaf.shape}")
      return np.asarray(node, leaf.dtype)
    params = jax.tree_util.tree_map_with_path(take, abstract.params)
    params = jax.device_put(params, state_sh.params)
    state = jax.jit(lambda p: loop.TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                                              rng=train_rng), out_shardings=state_sh)(params)
    step_fn = jax.jit(loop.make_train_step(task, tx, 1, "stop"),
                      out_shardings=(state_sh, partitioning.replicated(mesh)), donate_argnums=0)
  return task, mesh, state, step_fn


# ----------------------------------------------------------------------------- PyTorch baseline
def build_torch(torch, transformers, peft, args, weights: pathlib.Path):
  """(model, step(batch) -> loss, eval_loss(batch), to_torch(batch)) of the seed's instruct step."""
  cfg = hf_config(transformers, args.size, not args.no_dropout)
  image_token = cfg.text_config.vocab_size - 1
  cfg.image_token_index = image_token  # the 5.x placeholders, all at the start = the seed's prepend
  model = transformers.Blip2ForConditionalGeneration(cfg)
  with np.load(weights / "base.npz") as z:
    model.load_state_dict({k: torch.from_numpy(z[k]) for k in z.files}, strict=True)
  model = peft.get_peft_model(model, lora_config(peft, not args.no_dropout))
  with np.load(weights / "lora_a.npz") as z, torch.no_grad():
    for n, p in model.named_parameters():
      if n.endswith(".lora_A.default.weight"):
        p.copy_(torch.from_numpy(z[n[len("base_model.model."):-len(".lora_A.default.weight")]]))
      elif n.endswith(".lora_B.default.weight"):
        p.zero_()
  base = model.base_model.model
  for part in (base.qformer, base.language_projection):
    for p in part.parameters():
      p.requires_grad_(True)
  base.query_tokens.requires_grad_(True)
  for p in list(base.vision_model.parameters()) + [p for n, p in base.language_model.named_parameters()
                                                     if "lora_" not in n]:
    assert not p.requires_grad
  model.train()
  named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
  no_decay = lambda n: "bias" in n or n.endswith("LayerNorm.weight")  # = configs/mblip_common.py optim.no_decay
  lr, lora_lr, wd = 1e-5, 2e-4, 0.1
  groups = [{"params": [p for n, p in named if "lora_" not in n and not no_decay(n)], "lr": lr, "weight_decay": wd},
            {"params": [p for n, p in named if "lora_" not in n and no_decay(n)], "lr": lr, "weight_decay": 0.0},
            {"params": [p for n, p in named if "lora_" in n], "lr": lora_lr, "weight_decay": wd}]
  opt = torch.optim.AdamW(groups, eps=1e-8)
  sched = transformers.get_cosine_schedule_with_warmup(opt, 1000, 2 * STEPS_PER_EPOCH)
  trainable = [p for _, p in named]
  def step(t):
    loss = model(**t).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss

  def eval_loss(t):
    model.eval()
    with torch.no_grad():
      out = float(model(**t).loss)
    model.train()
    return out

  n_train = sum(p.numel() for p in trainable)
  return model, step, eval_loss, n_train


# ----------------------------------------------------------------------------- workers
def check_loss(side: str, loss: float, ref: float) -> None:
  """The eval-mode loss of the initial weights against the driver's transformers reference, before timing."""
  rel = abs(loss - ref) / abs(ref)
  print(f"  [{side}] eval-mode loss of the initial weights {loss:.6f} vs the reference (transformers, driver) "
        f"{ref:.6f}: relative |diff| {rel:.2e}", flush=True)
  if not rel <= REL_TOL:
    raise SystemExit(f"{side}: the initial loss disagrees with the reference ({rel:.2e} > {REL_TOL})")

def jax_worker(args) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  from mmret_jax.train import optim, partitioning  # pylint: disable=import-outside-toplevel
  weights = pathlib.Path(args.weights)
  t0 = time.perf_counter()
  task, mesh, state, step_fn = build_jax(args, weights)
  build_s = time.perf_counter() - t0
  trainable = sum(int(np.prod(x.shape)) for p, x in jax.tree_util.tree_leaves_with_path(state.params)
                  if not task._frozen(optim.path_str(p)))  # pylint: disable=protected-access
  print(f"  [jax] converted + state built in {build_s:.1f}s: {trainable / 1e6:.2f} M trainable params; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; {jax.devices()[0]}", flush=True)
  batch = make_batch(args.size, args.batch_size, args.prompt, args.label, args.seed)
  eval_loss = float(jax.jit(lambda p, b: task.forward(p, b)["loss"])(state.params, batch))
  check_loss("jax", eval_loss, args.ref_loss)
  gbatch = partitioning.make_global_batch(batch, mesh)
  step = CompiledStep(step_fn, state, gbatch, mesh)
  del state  # donated: the step holds it
  compile_s = step.compile_s
  print(f"  [jax] step compile {compile_s:.1f}s", flush=True)

  t0 = time.perf_counter()
  m = jax.device_get(step())
  print(f"  [jax] first step {time.perf_counter() - t0:.2f}s: loss {float(m['loss']):.6f}, grad_norm "
        f"{float(m['grad_norm']):.4f}; {rss_gb()}", flush=True)
  out = {"jax": timed_steps(step, args.warmup, args.steps, "jax")}
  out["jax"].update(compile_s=compile_s, build_s=build_s, rss=rss_gb(), loss0=float(m["loss"]),
                    grad_norm0=float(m["grad_norm"]), eval_loss=eval_loss, trainable=trainable)
  return out


def torch_worker(args) -> dict:
  import peft  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  transformers.utils.logging.disable_progress_bar()
  torch.set_num_threads(usable_cpus())
  weights = pathlib.Path(args.weights)
  t0 = time.perf_counter()
  model, step, eval_loss, n_train = build_torch(torch, transformers, peft, args, weights)
  print(f"  [torch] Blip2ForConditionalGeneration + PEFT LoRA built in {time.perf_counter() - t0:.1f}s: "
        f"{n_train / 1e6:.2f} M trainable params; threads {torch.get_num_threads()}", flush=True)
  cfg = model.base_model.model.config
  t = to_torch(torch, make_batch(args.size, args.batch_size, args.prompt, args.label, args.seed),
               cfg.num_query_tokens, cfg.image_token_index)
  ev = eval_loss(t)
  check_loss("torch", ev, args.ref_loss)
  t0 = time.perf_counter()
  loss = float(step(t).detach())
  print(f"  [torch] first step {time.perf_counter() - t0:.2f}s: loss {loss:.6f}; {rss_gb()}", flush=True)
  out = {"torch": timed_steps(lambda: step(t), args.warmup, args.steps, "torch")}
  out["torch"].update(rss=rss_gb(), loss0=loss, eval_loss=ev, trainable=n_train)
  return out


# ----------------------------------------------------------------------------- driver
def wait_for_quiet(max_load: float, max_wait: float, poll: float = 15.0) -> float:
  """Waits (up to `max_wait` s) for the 1-minute load average to drop to `max_load`; returns the seconds waited."""
  t0 = time.monotonic()
  while os.getloadavg()[0] > max_load and time.monotonic() - t0 < max_wait:
    print(f"  load {load_average()} above {max_load}; waiting", flush=True)
    time.sleep(poll)
  return time.monotonic() - t0


def run_worker(side: str, args, weights: pathlib.Path, xla_tuned: bool = False) -> dict:
  waited = wait_for_quiet(args.max_load, args.max_wait)
  print(f"  [{side}] starting after {waited:.0f}s of waiting, load {load_average()}", flush=True)
  env = dict(os.environ)
  if side == "jax" and xla_tuned:
    xla_cpu.apply_cpu_defaults(env)  # exactly what `python -m mmret_jax.main` does before JAX starts
  return spawn_worker(str(pathlib.Path(__file__).resolve()), side, weights.parent,
                      ["--weights", str(weights),
           "--batch-size", str(args.batch_size), "--prompt", str(args.prompt),
           "--label", str(args.label), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--size", args.size, "--seed", str(args.seed), "--ref-loss", repr(args.ref_loss)] + (["--no-dropout"] if args.no_dropout else []),
                      env, tuned=side == "jax" and xla_tuned)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  ap.add_argument("--size", choices=tuple(SIZES), default="small")
  ap.add_argument("--batch-size", type=int, default=8, help="examples (one image each) per step")
  ap.add_argument("--prompt", type=int, default=32, help="prompt tokens (the 32 visual embeddings come on top)")
  ap.add_argument("--label", type=int, default=16, help="target tokens")
  ap.add_argument("--steps", type=int, default=3, help="timed steps per side and round (median reported)")
  ap.add_argument("--warmup", type=int, default=1, help="untimed steps per side after compile / first step")
  ap.add_argument("--rounds", type=int, default=1, help="JAX, PyTorch, JAX, PyTorch, ... worker pairs")
  ap.add_argument("--xla-cpu", choices=("default", "tuned", "both"), default="tuned",
                  help="XLA:CPU flags of the JAX worker: tuned = what `python -m mmret_jax.main` applies "
                       "(mmret_jax/xla_cpu.py; the default), default = XLA's defaults, both = one JAX worker of each")
  ap.add_argument("--max-load", type=float, default=2.5,
                  help="before each worker, wait for the 1-minute load average to drop to this (shared machines)")
  ap.add_argument("--max-wait", type=float, default=120.0, help="seconds to wait for --max-load at most")
  ap.add_argument("--skip-torch", action="store_true", help="time only the JAX step (no loss check)")
  ap.add_argument("--no-dropout", action="store_true", help="diagnostic: every dropout off on both sides")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)  # worker mode
  ap.add_argument("--weights", help=argparse.SUPPRESS)
  ap.add_argument("--result", help=argparse.SUPPRESS)
  ap.add_argument("--ref-loss", type=float, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)

  if args.side:  # worker
    out = (jax_worker if args.side == "jax" else torch_worker)(args)
    pathlib.Path(args.result).write_text(json.dumps(out))
    return 0

  import peft  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  transformers.utils.logging.disable_progress_bar()
  base_flags = os.environ.get("XLA_FLAGS", "")
  tuned_env = dict(os.environ)
  xla_cpu.apply_cpu_defaults(tuned_env)
  tuned_flags = tuned_env.get("XLA_FLAGS", "") or "(none)"
  worker_flags = {"default": base_flags or "(none)", "tuned": tuned_flags,
                  "both": f"jax: {base_flags or '(none)'}; jax_tuned: {tuned_flags}"}
  info = machine_info(torch, start_jax=False, peft=peft.__version__,
                      **{"XLA_FLAGS (jax worker)": worker_flags[args.xla_cpu]})
  print_machine(info)
  s = SIZES[args.size]
  tmp = tempfile.TemporaryDirectory()
  weights = pathlib.Path(tmp.name) / "weights"
  t0 = time.perf_counter()
  counts = write_weights(torch, transformers, peft, args, weights)
  print(f"== setup: mBLIP instruct step, size {args.size} (vision {s['vision']}, Q-Former {s['qformer']}, mT5 "
        f"{s['text']}, {s['queries']} queries), batch {args.batch_size}, prompt {args.prompt} + label {args.label} "
        f"tokens, fp32, dropout {'off' if args.no_dropout else f'{DROPOUT} (LoRA {LORA_DROPOUT})'}, "
        f"--xla-cpu {args.xla_cpu}")
  print(f"  random Blip2ForConditionalGeneration: {counts['total'] / 1e6:.1f} M params (ViT "
        f"{counts['vision'] / 1e6:.1f} M, mT5 {counts['llm'] / 1e6:.1f} M); PEFT LoRA on {counts['lora_modules']} "
        f"modules, {counts['lora'] / 1e6:.2f} M params; written in {time.perf_counter() - t0:.1f}s", flush=True)

  args.ref_loss = counts["ref_loss"]
  print(f"  reference loss (transformers forward with labels, eval mode, initial weights): {args.ref_loss:.6f}")

  res = run_rounds(run_worker, args, weights)

  print("== results (median seconds per step over all rounds -> steps/s, examples/s; best = fastest step)")
  sps, cpu, best = {}, {}, {}
  for k, v in res.items():
    med = statistics.median(v["wall"])
    sps[k], cpu[k], best[k] = 1.0 / med, statistics.median(v["cpu"]), 1.0 / min(v["wall"])
    print(f"  {k:10s} {med:8.3f} s/step  {sps[k]:7.4f} steps/s  {args.batch_size * sps[k]:8.3f} examples/s  "
          f"cpu {cpu[k]:.2f} s/step  best {1.0 / best[k]:.3f} s/step  (steps: {', '.join(f'{x:.2f}' for x in v['wall'])}; "
          f"{v['rss']})")
  rounds = {k: [statistics.median(v["wall"][i:i + args.steps]) for i in range(0, len(v["wall"]), args.steps)]
            for k, v in res.items()}
  print("  per-round medians (s/step): " + "; ".join(f"{k} " + ", ".join(f"{x:.2f}" for x in r)
                                                    for k, r in rounds.items()))
  for k in (k for k in res if k.startswith("jax")):
    print(f"  {k} compile time (excluded from timing): {', '.join(f'{c:.1f}s' for c in res[k]['compile_all'])}")
  if "torch" in res:
    te = res["torch"]["eval_loss"]
    for k in (k for k in res if k.startswith("jax")):
      je = res[k]["eval_loss"]
      rel = abs(je - te) / abs(te)
      print(f"  loss agreement (initial weights, eval mode): {k} {je:.6f} vs PyTorch {te:.6f}, relative |diff| "
            f"{rel:.2e}; first train step (dropout: own RNGs): {res[k]['loss0']:.6f} vs {res['torch']['loss0']:.6f}; "
            f"trainable params {res[k]['trainable']} vs {res['torch']['trainable']}")
      if rel > REL_TOL or res[k]["trainable"] != res["torch"]["trainable"]:
        raise SystemExit(f"the two sides disagree (relative loss diff {rel:.2e} > {REL_TOL} or trainable counts)")
      print(f"  ratio {k} / PyTorch[fp32 eager, cpu] steps/s: {sps[k] / sps['torch']:.3f}  (by median CPU s/step: "
            f"{cpu['torch'] / cpu[k]:.3f}; by best step: {best[k] / best['torch']:.3f})")
  print(f"  load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  tmp.cleanup()
  return 0


if __name__ == "__main__":
  sys.exit(main())
