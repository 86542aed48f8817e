"""BLaIR train-step throughput: mmret_jax (the product's jitted step) vs PyTorch (eager), same size.

    python benchmarks/train_step.py                          # roberta-base, 32 pairs x 64 tokens, fp32
    python benchmarks/train_step.py --size tiny --steps 3    # quick check (seconds)

One step = BLaIR's objective on a batch of (review, meta) pairs, its gradient, global-norm clipping
(1.0) and an AdamW update (lr 5e-5, weight decay 0):
  L = CE(cos(z_review, z_meta) / 0.05, diagonal)  +  0.1 * MLM CE on masked copies (second forward),
  z = tanh(mlp(CLS)); dropout 0.1 on both sides (train mode).

JAX: the real product path. A random-weight RobertaForMaskedLM of the chosen size is saved with
`save_pretrained` (plus a small byte-level BPE tokenizer) to a temp dir that serves as
`config.init_from` of `configs/blair_base.py`; `BlairTask` (mmret_jax/tasks/blair.py) loads it, and
the step is `train.loop.make_train_step(task, optim.make_optimizer(...))` jitted as
`train_and_evaluate` does (single-device mesh, state shardings, `donate_argnums=0`), AOT-compiled
once (compile time reported separately). MLM masking happens inside the step (BlairTask.mask_for_mlm).

PyTorch: `transformers.RobertaForMaskedLM` (roberta + lm_head, same initial weights) + an
`nn.Linear + tanh` head, the same loss (cosine / temp CE review -> meta + 0.1 * MLM CE, ignore -100,
on masked copies made in torch each step with the same 80/10/10 rule), `torch.optim.AdamW`,
`clip_grad_norm_(1.0)`, `model.train()`, eager (no torch.compile).

Both sides get the same random batch: ids in [5, vocab) framed by <s> ... </s>, a quarter of the
rows padded to random lengths. Each side runs in its own subprocess (at roberta-base size each one
peaks at ~12-13 GB; together in one process they do not fit a 23 GB machine): build, compile /
first step, `--warmup` untimed steps, then `--steps` timed steps; the median seconds per step gives
samples/s = pairs per second. `--rounds R` repeats the JAX / PyTorch pair R times (medians over all
timed steps), so a change in machine load hits both. Process CPU seconds per step (all threads) are
reported too: they are less sensitive to other load on a shared machine than wall time.

XLA:CPU (jax 0.10) sends dots and reductions to YNNPACK by default. `--xla-cpu tuned` runs the
JAX worker with the flags that `python -m mmret_jax.main` applies on CPU (mmret_jax/xla_cpu.py:
XLA's own reductions and Eigen dots), `default` with XLA's defaults, `both` (the default) one worker
of each. All are fp32 with the same math (kernel choice only).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=wrong-import-position

# `--xla-cpu tuned`: the XLA:CPU flags that `python -m mmret_jax.main` applies by default
# (mmret_jax/xla_cpu.py); `default` = XLA's own defaults.
from bench_common import ROBERTA_SIZES, CompiledStep, machine_info, print_machine, rss_gb, run_rounds, spawn_worker, timed_steps  # pylint: disable=wrong-import-position
from mmret_jax.xla_cpu import TUNED_XLA_CPU_FLAGS  # pylint: disable=wrong-import-position

REPO = pathlib.Path(__file__).resolve().parents[1]

SIZES = ROBERTA_SIZES
TEMP, MLM_WEIGHT, MLM_PROB, LR, CLIP, DROPOUT = 0.05, 0.1, 0.15, 5e-5, 1.0, 0.1
TOKENIZER_TEXTS = [
    "Great kettle boils fast and the handle stays cool.",
    "Trail runner shoe with breathable mesh upper and grippy rubber outsole.",
    "Measure rinse and strain colander for the kitchen sink, dishwasher safe, dark blue.",
    "The phone case cracked after a week; would not buy again.",
]


# ----------------------------------------------------------------------------- data
def make_batch(cfg: dict, pairs: int, seq_len: int, seed: int) -> dict[str, np.ndarray]:
  """{review,meta}_{ids,mask} int32 [pairs, seq_len]: <s> random ids in [5, vocab) </s>, pads."""
  rng = np.random.default_rng(seed)
  out = {}
  for field in ("review", "meta"):
    ids = rng.integers(5, cfg["vocab_size"], size=(pairs, seq_len))
    lengths = np.full(pairs, seq_len)
    padded = rng.random(pairs) < 0.25
    padded[0] = False  # the full length is always used
    lengths[padded] = rng.integers(max(3, seq_len // 4), seq_len, size=int(padded.sum()))
    mask = np.arange(seq_len)[None, :] < lengths[:, None]
    ids[:, 0] = cfg["bos_token_id"]
    ids[np.arange(pairs), lengths - 1] = cfg["eos_token_id"]
    ids = np.where(mask, ids, cfg["pad_token_id"])
    out[f"{field}_ids"], out[f"{field}_mask"] = ids.astype(np.int32), mask.astype(np.int32)
  return out


def write_hf_dir(torch, transformers, cfg: dict, path: pathlib.Path, seed: int):
  """Random RobertaForMaskedLM (HF init) + a small BPE tokenizer (ids 0-4 = roberta specials)."""
  from mmret_jax.data.text import build_bpe_tokenizer  # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  tcfg = transformers.RobertaConfig(**cfg, hidden_dropout_prob=DROPOUT, attention_probs_dropout_prob=DROPOUT)
  model = transformers.RobertaForMaskedLM(tcfg)
  model.save_pretrained(path)
  tok = build_bpe_tokenizer(TOKENIZER_TEXTS * 4, vocab_size=300)
  tok.save_pretrained(path)
  return model, tok


# ----------------------------------------------------------------------------- JAX (product path)
def build_jax(args, hf_dir: pathlib.Path, workdir: pathlib.Path, total_steps: int = 10_000,
              overrides: dict | None = None):
  """The product's jitted step on a 1-device mesh; `overrides` = {dotted config key: value}."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, str(REPO / "configs"))
  import blair_base  # pylint: disable=import-outside-toplevel
  from mmret_jax.tasks.blair import BlairTask  # pylint: disable=import-outside-toplevel
  from mmret_jax.train import loop, optim, partitioning  # pylint: disable=import-outside-toplevel

  c = blair_base.get_config()
  with c.unlocked():
    c.init_from = str(hf_dir)
    c.tokenizer = ""
    c.data.train_file = blair_base.sample_pairs()  # BlairTask needs a source; the batch is synthetic
    c.data.max_seq_length = args.seq_len
    c.model.dtype = args.dtype
    c.model.remat = False
    c.model.dropout = DROPOUT
    c.loss.temp, c.loss.do_mlm, c.loss.mlm_weight = TEMP, not args.no_mlm, MLM_WEIGHT
    c.loss.mlm_probability, c.loss.pooler = MLM_PROB, "cls"
    c.optim.learning_rate, c.optim.weight_decay, c.optim.grad_clip_norm = LR, 0.0, CLIP
    c.batch_size = args.batch_size
    c.total_steps = total_steps
    for key, value in (overrides or {}).items():
      *parents, leaf = key.split(".")
      node = c
      for part in parents:
        node = node[part]
      node[leaf] = value
  mesh = partitioning.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  task = BlairTask(c, mesh, workdir)
  assert task.model_config.vocab_size == SIZES[args.size]["vocab_size"], task.model_config
  tx, _ = optim.make_optimizer(c.optim, total_steps)
  init_rng, train_rng = loop.init_and_train_keys(c)  # as train_and_evaluate

  def boxed_state():
    params = task.init_params(init_rng)
    return loop.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                           rng=train_rng)

  # As train_and_evaluate: shardings from the logical axes, init, then the init_from weights.
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.RULES):
    abstract_boxed = jax.eval_shape(boxed_state)
    state_sh = partitioning.logical_to_sharding(nn.get_partition_spec(abstract_boxed), mesh)
    state = jax.jit(lambda: nn.unbox(boxed_state()), out_shardings=state_sh)()
    host = task.load_init(jax.device_get(state.params))
    params = jax.device_put(host, state_sh.params)
    state = jax.jit(lambda p: loop.TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                              opt_state=tx.init(p), rng=train_rng),
                    out_shardings=state_sh)(params)
    step_fn = jax.jit(loop.make_train_step(task, tx, 1, "stop"),
                      out_shardings=(state_sh, partitioning.replicated(mesh)), donate_argnums=0)
  return task, mesh, state, step_fn


# ----------------------------------------------------------------------------- PyTorch baseline
def build_torch(torch, mlm_model, special_ids, mask_token_id, device, dtype_amp, do_mlm=True):
  F = torch.nn.functional

  class TorchBlair(torch.nn.Module):
    """Seed RobertaForCL (pooler cls, do_mlm): roberta + lm_head + mlp(tanh)."""

    def __init__(self):
      super().__init__()
      self.roberta, self.lm_head = mlm_model.roberta, mlm_model.lm_head
      h = mlm_model.config.hidden_size
      self.mlp = torch.nn.Sequential(torch.nn.Linear(h, h), torch.nn.Tanh())
      self.vocab_size = mlm_model.config.vocab_size

    def forward(self, ids, mask, mids, labels):
      b = ids.shape[0] // 2
      h = self.roberta(ids, attention_mask=mask).last_hidden_state
      z = self.mlp(h[:, 0])
      cos = F.cosine_similarity(z[:b].unsqueeze(1).float(), z[b:].unsqueeze(0).float(), dim=-1) / TEMP
      cl = F.cross_entropy(cos, torch.arange(b, device=ids.device))
      if not do_mlm:
        return cl, cl, torch.zeros(())
      hm = self.roberta(mids, attention_mask=mask).last_hidden_state
      scores = self.lm_head(hm)
      mlm = F.cross_entropy(scores.view(-1, self.vocab_size).float(), labels.view(-1))
      return cl + MLM_WEIGHT * mlm, cl, mlm

  model = TorchBlair().to(device).train()
  opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
  special = torch.as_tensor(np.asarray(special_ids), device=device)
  gen = torch.Generator(device=device).manual_seed(0)

  def mask_tokens(ids):
    """DataCollatorForLanguageModeling.torch_mask_tokens: 15% of non-special; 80/10/10."""
    prob = torch.full(ids.shape, MLM_PROB, device=device)
    picked = torch.bernoulli(prob, generator=gen).bool() & ~torch.isin(ids, special)
    labels = torch.where(picked, ids, torch.full_like(ids, -100))
    to_mask = torch.bernoulli(torch.full(ids.shape, 0.8, device=device), generator=gen).bool() & picked
    to_rand = torch.bernoulli(torch.full(ids.shape, 0.5, device=device), generator=gen).bool() & picked & ~to_mask
    rand = torch.randint(model.vocab_size, ids.shape, device=device, generator=gen)
    out = torch.where(to_mask, torch.full_like(ids, mask_token_id), ids)
    return torch.where(to_rand, rand, out), labels

  def step(ids, mask):
    mids, labels = mask_tokens(ids)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype_amp):
      loss, cl, mlm = model(ids, mask, mids, labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    if device.type == "cuda":
      torch.cuda.synchronize()
    return loss, cl, mlm

  return model, step


# ----------------------------------------------------------------------------- workers
def parse_overrides(pairs) -> dict:
  """["model.attention=fused_qkv", "model.remat=True"] -> {key: Python literal or string}."""
  import ast  # pylint: disable=import-outside-toplevel
  out = {}
  for kv in pairs:
    k, _, v = kv.partition("=")
    try:
      out[k] = ast.literal_eval(v)
    except (ValueError, SyntaxError):
      out[k] = v
  return out


def jax_worker(args) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  from mmret_jax.train import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  from mmret_jax.train import partitioning  # pylint: disable=import-outside-toplevel
  hf_dir = pathlib.Path(args.hf_dir)
  t0 = time.perf_counter()
  task, mesh, state, step_fn = build_jax(args, hf_dir, hf_dir.parent / f"work_{os.getpid()}",
                                         overrides=parse_overrides(args.set))
  build_s = time.perf_counter() - t0
  n_jax = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  print(f"  [jax] BlairTask + state built in {build_s:.1f}s: {n_jax / 1e6:.1f} M params (incl. "
        f"mlp head); XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; {jax.devices()[0]}", flush=True)
  batch = make_batch(SIZES[args.size], args.batch_size, args.seq_len, args.seed)
  gbatch = partitioning.make_global_batch(batch, mesh)
  step = CompiledStep(step_fn, state, gbatch, mesh)
  del state  # donated: the step holds it
  compile_s = step.compile_s
  flops, temp = step.analysis()

  t0 = time.perf_counter()
  m = jax.device_get(step())
  print(f"  [jax] first step {time.perf_counter() - t0:.2f}s: loss {float(m['loss']):.4f} (cl "
        f"{float(m['cl_loss']):.4f}, mlm {float(m.get('mlm_loss', float('nan'))):.4f}), grad_norm {float(m['grad_norm']):.3f}; "
        f"{rss_gb()}", flush=True)
  out = {"jax": timed_steps(step, args.warmup, args.steps, "jax")}
  out["jax"].update(compile_s=compile_s, build_s=build_s, flops=flops, temp_gb=temp, rss=rss_gb(),
                    loss0=float(m["loss"]), gpu=jax.default_backend() == "gpu",
                    peak=metrics_lib.peak_flops_per_device())
  return out


def torch_worker(args) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  transformers.utils.logging.disable_progress_bar()
  hf_dir = pathlib.Path(args.hf_dir)
  tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
  special = sorted(set(tok.all_special_ids))
  gpu = torch.cuda.is_available()
  dev = torch.device("cuda" if gpu else "cpu")
  mlm = transformers.RobertaForMaskedLM.from_pretrained(str(hf_dir))
  print(f"  [torch] RobertaForMaskedLM loaded: attn_implementation={mlm.config._attn_implementation}, "  # pylint: disable=protected-access
        f"threads {torch.get_num_threads()}, device {dev}", flush=True)
  batch = make_batch(SIZES[args.size], args.batch_size, args.seq_len, args.seed)
  ids = torch.from_numpy(np.concatenate([batch["review_ids"], batch["meta_ids"]]).astype(np.int64)).to(dev)
  mask = torch.from_numpy(np.concatenate([batch["review_mask"], batch["meta_mask"]]).astype(np.int64)).to(dev)
  variants = {"torch": False}
  if gpu and args.dtype == "bfloat16":
    variants = {"torch_amp_bf16": True, "torch": False}  # AMP first: fp32 may not fit at large batch
  out = {}
  for name, amp in variants.items():
    try:
      _, step = build_torch(torch, mlm, special, int(tok.mask_token_id), dev, amp, do_mlm=not args.no_mlm)
      t0 = time.perf_counter()
      loss, cl, ml = step(ids, mask)
      print(f"  [{name}] first step {time.perf_counter() - t0:.2f}s: loss {loss.item():.4f} (cl {cl.item():.4f}, "
            f"mlm {ml.item():.4f}); {rss_gb()}", flush=True)
      out[name] = timed_steps(lambda step=step: step(ids, mask), args.warmup, args.steps, name)
      out[name].update(rss=rss_gb(), loss0=loss.item())
    except torch.OutOfMemoryError as e:  # reported, not fatal: the other variant still runs
      print(f"  [{name}] out of device memory at batch {args.batch_size}: {str(e).splitlines()[0]}", flush=True)
      out[name] = {"wall": [], "cpu": [], "rss": "OOM", "oom": True}
    step = None
    if gpu:
      torch.cuda.empty_cache()
  return out


# ----------------------------------------------------------------------------- driver
def run_worker(side: str, args, hf_dir: pathlib.Path, xla_tuned: bool = False) -> dict:
  env = dict(os.environ)
  if xla_tuned:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + TUNED_XLA_CPU_FLAGS).strip()
  return spawn_worker(str(pathlib.Path(__file__).resolve()), side, hf_dir.parent,
                      ["--hf-dir", str(hf_dir),
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--size", args.size,
           "--dtype", args.dtype, "--seed", str(args.seed)] + (["--no-mlm"] if args.no_mlm else []) \
        + [a for kv in args.set for a in ("--set", kv)],
                      env, tuned=side == "jax" and xla_tuned)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  ap.add_argument("--batch-size", type=int, default=32, help="pairs per step (2x sequences per forward)")
  ap.add_argument("--seq-len", type=int, default=64, help="tokens per review and per meta")
  ap.add_argument("--steps", type=int, default=5, help="timed steps per side and round (median reported)")
  ap.add_argument("--warmup", type=int, default=1, help="untimed steps per side after compile / first step")
  ap.add_argument("--rounds", type=int, default=1, help="JAX, PyTorch, JAX, PyTorch, ... worker pairs")
  ap.add_argument("--size", choices=tuple(SIZES), default="base")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                  help="JAX compute dtype (config.model.dtype; params stay float32). bfloat16 is meant "
                       "for GPU; there PyTorch AMP (bf16 autocast) is timed too")
  ap.add_argument("--xla-cpu", choices=("default", "tuned", "both"), default="both",
                  help="XLA:CPU flags of the JAX worker: default = XLA's defaults (the product as shipped), "
                       "tuned = TUNED_XLA_CPU_FLAGS appended to XLA_FLAGS, both = one JAX worker of each")
  ap.add_argument("--skip-torch", action="store_true", help="time only the JAX step")
  ap.add_argument("--no-mlm", action="store_true",
                  help="diagnostic: contrastive loss only on both sides (no MLM forward / head)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="config override for the JAX step, e.g. --set model.attention=fused_qkv (repeatable)")
  ap.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)  # worker mode
  ap.add_argument("--hf-dir", help=argparse.SUPPRESS)
  ap.add_argument("--result", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  cfg = SIZES[args.size]
  if args.seq_len > cfg["max_position_embeddings"] - cfg["pad_token_id"] - 1:
    ap.error(f"--seq-len {args.seq_len} exceeds the position table")

  if args.side:  # worker
    import json  # pylint: disable=import-outside-toplevel
    out = (jax_worker if args.side == "jax" else torch_worker)(args)
    pathlib.Path(args.result).write_text(json.dumps(out))
    return 0

  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  transformers.utils.logging.disable_progress_bar()
  base_flags = os.environ.get("XLA_FLAGS", "")
  worker_flags = {"default": base_flags or "(none)", "tuned": f"{base_flags} {TUNED_XLA_CPU_FLAGS}".strip(),
                  "both": f"jax: {base_flags or '(none)'}; jax_tuned: {base_flags} {TUNED_XLA_CPU_FLAGS}".strip()}
  info = machine_info(torch, start_jax=False, **{"XLA_FLAGS (jax worker)": worker_flags[args.xla_cpu]})
  print_machine(info)
  print(f"  jax_default_prng_impl (JAX_DEFAULT_PRNG_IMPL): {os.environ.get('JAX_DEFAULT_PRNG_IMPL', '(default)')}")
  print(f"== setup: roberta ({args.size}), random weights; {args.batch_size} pairs x {args.seq_len} tokens "
        f"(review and meta), jax dtype={args.dtype}, dropout {DROPOUT}, "
        f"{'MLM OFF (diagnostic)' if args.no_mlm else f'MLM on (weight {MLM_WEIGHT})'}, "
        f"--xla-cpu {args.xla_cpu}" + (f", JAX config overrides {parse_overrides(args.set)}" if args.set else ""))
  tmp = tempfile.TemporaryDirectory()
  hf_dir = pathlib.Path(tmp.name) / "hf"
  tmlm, _ = write_hf_dir(torch, transformers, cfg, hf_dir, args.seed)
  n_params = sum(p.numel() for p in tmlm.parameters())
  emb = tmlm.roberta.embeddings
  n_nonemb = n_params - sum(m.weight.numel() for m in (emb.word_embeddings, emb.position_embeddings,
                                                       emb.token_type_embeddings))
  del tmlm
  batch = make_batch(cfg, args.batch_size, args.seq_len, args.seed)
  n_tok = int(sum(batch[f"{f}_mask"].sum() for f in ("review", "meta")))
  print(f"  RobertaForMaskedLM {n_params / 1e6:.1f} M params (decoder tied) saved to a temp dir; batch "
        f"{2 * args.batch_size} sequences, {n_tok} real tokens of {2 * args.batch_size * args.seq_len}", flush=True)

  res = run_rounds(run_worker, args, hf_dir)

  print("== results (median seconds per step -> samples/s = pairs/s)")
  sps, cpu = {}, {}
  for k, v in list(res.items()):
    if not v["wall"]:
      print(f"  {k:15s} out of device memory at this batch size")
      del res[k]
      continue
    med = statistics.median(v["wall"])
    sps[k], cpu[k] = args.batch_size / med, statistics.median(v["cpu"])
    print(f"  {k:15s} {med:8.3f} s/step  {sps[k]:8.3f} samples/s  {sps[k] * 2 * args.seq_len:8.1f} padded tok/s  "
          f"cpu {cpu[k]:.1f} s/step  (steps: {', '.join(f'{x:.2f}' for x in v['wall'])}; {v['rss']})")
  for k in (k for k in res if k.startswith("jax")):
    print(f"  {k} compile time (excluded from timing): {', '.join(f'{c:.1f}s' for c in res[k]['compile_all'])}")
  gpu = any(v.get("gpu") for v in res.values())
  for k in (k for k in res if k.startswith("jax")):
    if "torch" in sps:
      print(f"  ratio {k}[{args.dtype}] / PyTorch[float32 eager, {'cuda' if gpu else 'cpu'}] samples/s: "
            f"{sps[k] / sps['torch']:.3f}  (by median CPU s/step: {cpu['torch'] / cpu[k]:.3f})")
    if "torch_amp_bf16" in sps:
      print(f"  ratio {k}[{args.dtype}] / PyTorch[AMP bf16]: {sps[k] / sps['torch_amp_bf16']:.3f}")
    j = res[k]
    if j["gpu"]:
      med = statistics.median(j["wall"])
      # Dense-model convention: 6 x non-embedding params x tokens, plus attention scores (12 x layers x
      # seq x hidden per token), over both encoder passes (2 x 2B sequences); the MLM vocab head is not
      # counted (our step runs it only at labelled positions). XLA's count is what the step executes.
      tokens = 2 * (2 * args.batch_size * args.seq_len)
      model_flops = tokens * (6 * n_nonemb + 12 * cfg["num_hidden_layers"] * args.seq_len * cfg["hidden_size"])
      if j["peak"]:
        print(f"  {k} MFU (6*N_nonemb*tokens + attention, both passes): {model_flops / med / j['peak']:.3f}"
              + (f"; by XLA-counted FLOPs: {j['flops'] / med / j['peak']:.3f}" if j["flops"] else "")
              + f"  [peak {j['peak'] / 1e12:.0f} TFLOP/s; achieved {(j['flops'] or model_flops) / med / 1e12:.0f} TFLOP/s]")
      else:
        print(f"  {k} MFU: unknown device peak")
  peak = next((v.get("peak") for v in res.values() if v.get("peak")), None)
  if gpu and peak:
    tokens = 2 * (2 * args.batch_size * args.seq_len)
    model_flops = tokens * (6 * n_nonemb + 12 * cfg["num_hidden_layers"] * args.seq_len * cfg["hidden_size"])
    for k in (k for k in res if k.startswith("torch")):
      print(f"  {k} MFU (same convention): {model_flops / statistics.median(res[k]['wall']) / peak:.3f}")
  print(f"  load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  tmp.cleanup()
  return 0


if __name__ == "__main__":
  sys.exit(main())
