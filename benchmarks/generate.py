"""Generation speed: our jit greedy / beam search over the KV cache vs transformers `generate`, same model,
same CPU, same run (mBLIP's LLM side: a visual prefix as inputs_embeds, then the prompt).

  python benchmarks/generate.py [--family mt5|bloom] [--size small|tiny] [--batch 8] [--prefix 32]
      [--prompt 16] [--new-tokens 32] [--beams 1] [--repeats 3]

A random-weight model of the chosen size is built in transformers, converted with our converter, and both
generate from the same inputs with eos disabled (every row runs the full `--new-tokens`), so both do the same
number of decoder steps. Reported: seconds per call (median of the repeats; our first call, which compiles,
is timed apart), new tokens per second (batch x new tokens / seconds), the ratio ours / transformers, and
whether the tokens are identical. Results go to benchmarks/RESULTS.md by hand (machine, date, command).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import bench_common

SIZES = {
    # mT5-small-like widths (mT0-XL is 2048 x 24+24 layers: too slow for a CPU benchmark run)
    "mt5": {"small": dict(d_model=512, d_ff=1024, num_layers=8, num_decoder_layers=8, num_heads=6, d_kv=64,
                          vocab_size=32000),
            "tiny": dict(d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=16,
                         vocab_size=1000)},
    "bloom": {"small": dict(hidden_size=512, n_layer=8, n_head=8, vocab_size=32000),
              "tiny": dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=1000)},
}


def build(family: str, size: str):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers as tf  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  if family == "mt5":
    cfg = tf.MT5Config(**SIZES[family][size], feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                       dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    tmodel = tf.MT5ForConditionalGeneration(cfg).eval()
  else:
    cfg = tf.BloomConfig(**SIZES[family][size], hidden_dropout=0.0, attention_dropout=0.0, pad_token_id=3,
                         eos_token_id=2, bos_token_id=1)
    tmodel = tf.BloomForCausalLM(cfg).eval()
  return cfg, tmodel


def ours_from(family, cfg, tmodel):
  import jax  # pylint: disable=import-outside-toplevel
  from mmret_jax.convert import bloom as bloom_convert, t5 as t5_convert  # pylint: disable=import-outside-toplevel
  sd = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
  hf = cfg.to_dict()
  conv = t5_convert if family == "mt5" else bloom_convert
  params, meta = conv.to_params(sd, hf)
  model = conv.build_model(hf, meta)
  return model, jax.device_put(params)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--family", choices=sorted(SIZES), default="mt5")
  ap.add_argument("--size", choices=("small", "tiny"), default="small")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--prefix", type=int, default=32, help="visual prefix embeddings (mBLIP: 32)")
  ap.add_argument("--prompt", type=int, default=16, help="prompt tokens")
  ap.add_argument("--new-tokens", type=int, default=32)
  ap.add_argument("--beams", type=int, default=1)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = usable CPUs)")
  args = ap.parse_args()

  import torch  # pylint: disable=import-outside-toplevel
  from mmret_jax import generate as gen  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(args.threads or bench_common.usable_cpus())
  bench_common.print_machine(bench_common.machine_info(torch))
  cfg, tmodel = build(args.family, args.size)
  model, params = ours_from(args.family, cfg, tmodel)
  rng = np.random.default_rng(0)
  d = cfg.d_model if args.family == "mt5" else cfg.hidden_size
  ids = rng.integers(4, cfg.vocab_size, (args.batch, args.prompt))
  with torch.no_grad():
    tok = tmodel.get_input_embeddings()(torch.from_numpy(ids)).numpy()
  prefix = (0.02 * rng.standard_normal((args.batch, args.prefix, d))).astype(np.float32)
  embeds = np.concatenate([prefix, tok], 1)
  mask = np.ones(embeds.shape[:2], np.int64)
  hf_kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
               num_beams=args.beams, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
  search = gen.greedy_search if args.beams == 1 else gen.beam_search
  ours_kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, eos_token_id=cfg.eos_token_id,
                 pad_token_id=cfg.pad_token_id)
  if args.beams > 1:
    ours_kw["num_beams"] = args.beams

  def ours():
    out = search(model, params, embeds, mask, **ours_kw)
    return np.asarray(out)

  def theirs():
    with torch.no_grad():
      out = tmodel.generate(inputs_embeds=torch.from_numpy(embeds), attention_mask=torch.from_numpy(mask), **hf_kw)
    out = out.numpy()
    return out[:, 1:] if args.family == "mt5" else out  # mT5: drop the decoder start token

  t0 = time.perf_counter()
  first = ours()
  compile_s = time.perf_counter() - t0
  ref = theirs()
  times = {"ours": [], "transformers": []}
  for _ in range(args.repeats):
    for name, fn in (("ours", ours), ("transformers", theirs)):
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  med = {k: statistics.median(v) for k, v in times.items()}
  new = args.batch * args.new_tokens
  same = first.shape == ref.shape and bool((first == ref).all())
  print(f"family={args.family} size={args.size} batch={args.batch} prefix={args.prefix} prompt={args.prompt} "
        f"new_tokens={args.new_tokens} beams={args.beams} load={bench_common.load_average()}")
  print(f"ours first call (compile + run): {compile_s:.2f} s")
  for k, v in times.items():
    print(f"{k}: " + " ".join(f"{x:.3f}" for x in v) + f" s  median {med[k]:.3f} s  {new / med[k]:.1f} new tokens/s")
  print(f"ratio ours / transformers (tokens/s): {med['transformers'] / med['ours']:.2f}x; identical tokens: {same}")


if __name__ == "__main__":
  main()
