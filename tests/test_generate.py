"""Generation (`mmret_jax/generate.py`, the BLOOM KV cache in `models/bloom.py`) against Hugging Face `generate`
(transformers 5.x `_sample` / `_beam_search`), CPU, fp32: token ids must be identical.

Tiny random `MT5ForConditionalGeneration` and `BloomForCausalLM` reach our side through the converters. Both are
fed `inputs_embeds` as mBLIP does (a random "visual" prefix, then token embeddings of a padded prompt: right
padding for mT5's encoder, left padding for BLOOM). The LM heads are flattened (logits of order 1) and BLOOM's
eos logit raised (its final LayerNorm bias gets a component along the eos embedding), so that beams end with eos
at different lengths, some rows run to max_new_tokens, and min_new_tokens, the length penalty and early_stopping
each change the result; the tests assert that on HF's (identical) output. Beam search compares all 5 hypotheses
(HF num_return_sequences=5) and their scores.
Finally `generate` on a tiny mBLIP, for both LLM families, against the seed's path (the torch prefix before
the prompt's embeddings, then the torch LLM's `generate`) with mBLIP's evaluation settings.
"""

from __future__ import annotations

import os

os.environ["TRANSFORMERS_VERBOSITY"] = "error"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mmret_jax import generate as gen  # noqa: E402
from mmret_jax.convert import bloom as bloom_convert, t5 as t5_convert  # noqa: E402
from mmret_jax.models import bloom  # noqa: E402

from test_bloom_parity import make_bloom  # noqa: E402
from test_t5_decoder_parity import make_hf as make_t5  # noqa: E402

T, K = 8, 5  # max_new_tokens, num_beams
SCORE_RTOL = 1e-5  # beam scores vs HF's sequences_scores (measured <= 3.9e-7 relative over every setting)
CACHE_ATOL = 1e-5  # cached BLOOM logits vs our / HF's full forward (measured 4.8e-7 / 8.9e-7, max|logit| 3.0)
T5_FIELDS = dict(model_type="mt5", vocab_size=16, d_model=32, num_heads=4, d_kv=8, d_ff=48, num_layers=2,
                 num_decoder_layers=2, relative_attention_num_buckets=8, relative_attention_max_distance=12,
                 dropout_rate=0.0)
BLOOM_FIELDS = dict(vocab_size=16, hidden_size=32, n_layer=2, n_head=4)
PREFIX = 4  # "visual" prefix embeddings


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
  """Tiny torch models run fastest on one thread; idle OpenMP workers also slowed XLA's compiles ~2x here."""
  n = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(n)


class Family:
  """One LLM: the torch model, ours (params via the converter), the prompt (inputs_embeds, mask), the offset of
  the first new token in HF's output (1: mT5's decoder start token), and eos / pad as our search uses them."""

  def __init__(self, name: str):
    rng = np.random.default_rng(0)
    self.name = name
    if name == "t5":
      tm = make_t5(T5_FIELDS, 0)
      with torch.no_grad():
        tm.lm_head.weight.mul_(0.3)
      convert = t5_convert
      b, s = 3, 9
      embeds = rng.standard_normal((b, s, 32)).astype(np.float32)
      mask = np.ones((b, s), np.int64)
      mask[1, 6:] = 0  # right padding
      mask[2, 4:] = 0
      self.offset = 1
    else:
      tm = make_bloom(BLOOM_FIELDS, 0)
      with torch.no_grad():
        ln_f, eos_row = tm.transformer.ln_f, tm.transformer.word_embeddings.weight[2].clone()
        ln_f.weight.mul_(0.3)
        ln_f.bias.mul_(0.3).add_(2.0 * eos_row / (eos_row @ eos_row))  # eos logit + ~2
      convert = bloom_convert
      ids = rng.integers(3, 16, (3, 6))
      text_mask = np.ones((3, 6), np.int64)
      text_mask[1, :2] = 0  # left padding after the prefix, as mBLIP's BLOOM batches
      text_mask[2, :4] = 0
      with torch.no_grad():
        tok = tm.transformer.word_embeddings(torch.as_tensor(ids)).numpy()
      embeds = np.concatenate([rng.standard_normal((3, PREFIX, 32)).astype(np.float32), tok], 1)
      mask = np.concatenate([np.ones((3, PREFIX), np.int64), text_mask], 1)
      self.ids, self.offset = ids, 0
    self.tmodel = tm.eval()
    hf_config = tm.config.to_dict()
    self.params, meta = convert.to_params({k: v.numpy() for k, v in tm.state_dict().items()}, hf_config)
    self.model = convert.build_model(hf_config, meta)
    self.embeds, self.mask = embeds, mask
    self.eos = tm.config.eos_token_id
    self.pad = tm.config.pad_token_id if tm.config.pad_token_id is not None else self.eos

  def hf(self, min_new_tokens: int = 1, **kw):
    with torch.no_grad():
      return self.tmodel.generate(inputs_embeds=torch.as_tensor(self.embeds), attention_mask=torch.as_tensor(self.mask),
                                  do_sample=False, max_new_tokens=T, min_new_tokens=min_new_tokens, **kw)

  def normalise(self, sequences: np.ndarray) -> np.ndarray:
    """HF's sequences -> [N, T] new tokens with pad after the first eos (HF's beam search fills with
    `pad or eos`, i.e. eos for mT5, whose pad id 0 is falsy)."""
    new = sequences[:, self.offset:]
    out = np.full((new.shape[0], T), self.pad, np.int64)
    for r, row in enumerate(new):
      stop = int(np.argmax(row == self.eos)) + 1 if (row == self.eos).any() else len(row)
      out[r, :stop] = row[:stop]
    return out

  def eos_lengths(self, tokens: np.ndarray) -> list[int]:
    """Per row of [N, T]: the 1-based position of eos, 0 when there is none."""
    return [int(np.argmax(r == self.eos)) + 1 if (r == self.eos).any() else 0 for r in tokens]


@pytest.fixture(scope="module")
def families():
  built = {}

  def get(name: str) -> Family:
    if name not in built:
      built[name] = Family(name)
    return built[name]

  return get


def test_bloom_cached_decoding_equals_full_forward(families):
  """A prefill of the prefix and the first prompt tokens, then one position per step from a cache longer than
  the sequence (its tail masked), with the mask over the whole cache: the logits of our full forward and of HF's
  at every real position; and the positions ALiBi gives the cached keys are the mask's counts."""
  f = families("bloom")
  m, p = f.model, f.params
  b, s = f.mask.shape
  extra = 3
  cache_mask = jnp.asarray(np.concatenate([f.mask, np.ones((b, extra), np.int64)], 1))
  full = jax.jit(lambda e, a: m.apply({"params": p}, attention_mask=a, inputs_embeds=e)["logits"])(
      jnp.asarray(f.embeds), jnp.asarray(f.mask))
  with torch.no_grad():
    ref = f.tmodel(inputs_embeds=torch.as_tensor(f.embeds), attention_mask=torch.as_tensor(f.mask)).logits.numpy()
  step = jax.jit(lambda c, e: bloom.decode_step(m, p, c, cache_mask, inputs_embeds=e))
  cache = bloom.init_cache(m, b, s + extra)
  first = PREFIX + 2
  logits, cache = step(cache, jnp.asarray(f.embeds[:, :first]))
  outs = [logits]
  for i in range(first, s):
    logits, cache = step(cache, jnp.asarray(f.embeds[:, i:i + 1]))
    outs.append(logits)
  cached = np.concatenate([np.asarray(o) for o in outs], 1)
  real = f.mask[:, :, None] == 1  # padded query positions attend to nothing real: not compared
  assert float(np.abs(np.where(real, cached - np.asarray(full), 0)).max()) <= CACHE_ATOL
  assert float(np.abs(np.where(real, cached - ref, 0)).max()) <= CACHE_ATOL
  assert int(cache["h_0"]["self_attention"]["cache_index"]) == s
  np.testing.assert_array_equal(np.asarray(cache["h_1"]["self_attention"]["cached_key"][:, s:]), 0)
  # the next token from the cache equals the full forward over the sequence grown by that token (mask + one 1)
  nxt = np.argmax(cached[:, -1], -1)[:, None]
  embed = np.asarray(p["word_embeddings"]["embedding"])[nxt]  # the step's input, as the token's embedding
  logits, _ = step(cache, jnp.asarray(embed))
  with torch.no_grad():
    grown = torch.cat([torch.as_tensor(f.embeds), f.tmodel.transformer.word_embeddings(torch.as_tensor(nxt))], 1)
    want = f.tmodel(inputs_embeds=grown, attention_mask=torch.as_tensor(np.array(cache_mask[:, :s + 1]))).logits
  assert float(np.abs(np.asarray(logits[:, 0]) - want[:, -1].numpy()).max()) <= CACHE_ATOL


@pytest.mark.parametrize("min_new_tokens", [1, 0, 3])
@pytest.mark.parametrize("name", ["t5", "bloom"])
def test_greedy_matches_hf(families, name, min_new_tokens):
  """min_new_tokens is traced: one program for the three settings."""
  f = families(name)
  ref = f.normalise(f.hf(min_new_tokens, num_beams=1).numpy())
  ours = np.asarray(gen.greedy_search(f.model, f.params, jnp.asarray(f.embeds), jnp.asarray(f.mask),
                                      max_new_tokens=T, min_new_tokens=min_new_tokens))
  assert ours.shape == (3, T) and ours.dtype == np.int32
  np.testing.assert_array_equal(ours, ref)
  lengths = f.eos_lengths(ours)
  assert 0 in lengths and len(set(lengths) - {0}) >= 1, lengths  # a row stopped early, one ran to T
  assert min(n for n in lengths if n) > min_new_tokens, lengths  # eos is blocked for min_new_tokens steps


def test_greedy_from_input_ids_matches_hf(families):
  """A BLOOM prompt given as left-padded token ids (HF's output repeats the prompt first)."""
  f = families("bloom")
  mask = f.mask[:, PREFIX:]
  with torch.no_grad():
    out = f.tmodel.generate(input_ids=torch.as_tensor(f.ids), attention_mask=torch.as_tensor(mask), do_sample=False,
                            num_beams=1, max_new_tokens=T, min_new_tokens=1).numpy()
  ours = gen.greedy_search(f.model, f.params, None, jnp.asarray(mask), input_ids=jnp.asarray(f.ids),
                           max_new_tokens=T, min_new_tokens=1)
  np.testing.assert_array_equal(np.asarray(ours), f.normalise(out[:, f.ids.shape[1]:]))


@pytest.mark.parametrize("length_penalty,min_new_tokens", [(-1.0, 1), (1.0, 1), (-1.0, 0), (1.0, 3)])
@pytest.mark.parametrize("name", ["t5", "bloom"])
def test_beam_search_matches_hf(families, name, length_penalty, min_new_tokens):
  """All K finished hypotheses, best first, and their length-penalised scores (one program for every setting)."""
  f = families(name)
  out = f.hf(min_new_tokens, num_beams=K, length_penalty=length_penalty, num_return_sequences=K,
             return_dict_in_generate=True, output_scores=True)
  ref, ref_scores = f.normalise(out.sequences.numpy()), out.sequences_scores.numpy().reshape(3, K)
  seqs, scores = gen.beam_search(f.model, f.params, jnp.asarray(f.embeds), jnp.asarray(f.mask), num_beams=K,
                                 max_new_tokens=T, min_new_tokens=min_new_tokens, length_penalty=length_penalty,
                                 num_return_sequences=K, output_scores=True)
  assert seqs.shape == (3, K, T)
  np.testing.assert_array_equal(np.asarray(seqs).reshape(3 * K, T), ref)
  np.testing.assert_allclose(np.asarray(scores), ref_scores, rtol=SCORE_RTOL)
  # the test exercised early eos: hypotheses that ended with eos at >= 2 lengths below T
  lengths = f.eos_lengths(ref)
  assert len({n for n in lengths if 0 < n < T}) >= 2 and min(n for n in lengths if n) > min_new_tokens, lengths


def test_length_penalty_changes_the_choice(families):
  """Negative penalties favour short hypotheses, positive long ones: the two settings pick differently here
  (so the parity above covers both conventions)."""
  f = families("bloom")

  def run(lp):
    return np.asarray(gen.beam_search(f.model, f.params, jnp.asarray(f.embeds), jnp.asarray(f.mask), num_beams=K,
                                      max_new_tokens=T, min_new_tokens=1, length_penalty=lp, num_return_sequences=K))

  short, long = run(-1.0)[:, 0], run(1.0)[:, 0]
  n_short, n_long = f.eos_lengths(short), f.eos_lengths(long)
  assert all(0 < a for a in n_short) and any(b == 0 or b > a for a, b in zip(n_short, n_long)), (n_short, n_long)


@pytest.mark.parametrize("early_stopping", [True, "never"])
def test_early_stopping_matches_hf(families, early_stopping):
  """HF's other early_stopping modes (True: a row stops at K hypotheses; "never" with a positive penalty: the
  heuristic at max length), which here change the hypotheses; traced, so no new program."""
  f = families("bloom")
  hf = lambda es: f.hf(num_beams=K, length_penalty=1.0, early_stopping=es, num_return_sequences=K,  # noqa: E731
                       return_dict_in_generate=True, output_scores=True)
  out, default = hf(early_stopping), hf(False)
  ref = f.normalise(out.sequences.numpy())
  assert (ref != f.normalise(default.sequences.numpy())).any()
  seqs, scores = gen.beam_search(f.model, f.params, jnp.asarray(f.embeds), jnp.asarray(f.mask), num_beams=K,
                                 max_new_tokens=T, min_new_tokens=1, length_penalty=1.0,
                                 early_stopping=early_stopping, num_return_sequences=K, output_scores=True)
  np.testing.assert_array_equal(np.asarray(seqs).reshape(3 * K, T), ref)
  np.testing.assert_allclose(np.asarray(scores), out.sequences_scores.numpy().reshape(3, K), rtol=SCORE_RTOL)


# ----------------------------------------------------------------------------- mBLIP

@pytest.fixture(scope="module", params=["mt5", "bloom"])
def mblip_pair(request):
  import transformers as tf  # pylint: disable=import-outside-toplevel
  from mmret_jax.convert import mblip as mblip_convert  # pylint: disable=import-outside-toplevel
  from mmret_jax.models import blip2, mblip  # pylint: disable=import-outside-toplevel
  from test_mblip_parity import LLMS, QFORMER, VISION, Q  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  cfg = tf.Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=LLMS[request.param],
                       num_query_tokens=Q)
  tmodel = tf.Blip2ForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    for p in tmodel.parameters():
      p.add_(0.05 * torch.randn_like(p))
  params, _ = mblip_convert.to_params({k: v.numpy() for k, v in tmodel.state_dict().items()}, cfg.to_dict())
  return request.param, tmodel, mblip.MBlip(blip2.Blip2Config.from_dict(cfg.to_dict())), params


def test_mblip_generate_matches_the_seeds_path(mblip_pair):
  """`generate` with mBLIP's VQA settings (5 beams, 10 new tokens, min 1, length_penalty -1) and a 7-token prompt
  (padded to the 16-token bucket inside) against the torch LLM's generate on the torch prefix + prompt embeds."""
  from test_mblip_parity import inputs, nhwc, torch_prefix  # pylint: disable=import-outside-toplevel
  name, tmodel, model, params = mblip_pair
  px, ids, mask = inputs(np.random.default_rng(3), left_pad=name == "bloom")
  lm = tmodel.language_model
  with torch.no_grad():
    prefix = torch_prefix(tmodel, torch.from_numpy(px))
    embeds = torch.cat([prefix, lm.get_input_embeddings()(torch.from_numpy(ids))], 1)
    full_mask = torch.cat([torch.ones(prefix.shape[:2], dtype=torch.long), torch.from_numpy(mask)], 1)
    out = lm.generate(inputs_embeds=embeds, attention_mask=full_mask, do_sample=False, num_beams=5, max_new_tokens=10,
                      min_new_tokens=1, length_penalty=-1.0).numpy()
  eos = lm.config.eos_token_id
  pad = lm.config.pad_token_id if lm.config.pad_token_id is not None else eos
  new = out[:, 1:] if name == "mt5" else out
  ref = np.full((3, 10), pad, np.int64)
  for r, row in enumerate(new):
    stop = int(np.argmax(row == eos)) + 1 if (row == eos).any() else len(row)
    ref[r, :stop] = row[:stop]
  ours = gen.generate(model, params, nhwc(px), ids, mask)
  assert ours.shape == (3, 10)
  np.testing.assert_array_equal(np.asarray(ours), ref)
  if name == "bloom":
    with pytest.raises(ValueError, match="left-padded"):
      gen.generate(model, params, nhwc(px), ids, mask[:, ::-1])


def test_mblip_int8_generate_equals_float_on_the_dequantized_weights(mblip_pair):
  """Weight-only int8 LLM (qwix) through the cached greedy and beam search: the same tokens as the float search
  on the dequantized weights (q * scale), i.e. the int8 path computes what it should through the KV cache."""
  from mmret_jax.models import mblip as mblip_lib, quant  # pylint: disable=import-outside-toplevel
  from test_mblip_parity import inputs, nhwc  # pylint: disable=import-outside-toplevel
  name, _, model, params = mblip_pair
  qc = quant.llm_config(mblip_lib.llm_family(model.config), bits=8)
  qparams = quant.quantize_llm(model, params, qc)
  assert len(quant.quantized_paths(qparams["language_model"])) > 0
  deq = {**params, "language_model": quant.dequantize_params(qparams["language_model"])}
  px, ids, mask = inputs(np.random.default_rng(5), left_pad=name == "bloom")
  for beams in (1, 5):
    ours = gen.generate(model, qparams, nhwc(px), ids, mask, num_beams=beams, quant=qc)
    ref = gen.generate(model, deq, nhwc(px), ids, mask, num_beams=beams)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


# ----------------------------------------------------------------------------- errors

def test_bad_inputs_get_clear_errors(families):
  f = families("bloom")
  m, p = f.model, f.params
  e, a = jnp.asarray(f.embeds), jnp.asarray(f.mask)
  with pytest.raises(ValueError, match="exactly one of inputs_embeds and input_ids"):
    gen.greedy_search(m, p, e, a, input_ids=jnp.ones((3, 4), jnp.int32), max_new_tokens=2)
  with pytest.raises(ValueError, match=r"inputs_embeds must be \[B, S, 32\]"):
    gen.greedy_search(m, p, e[..., :8], a, max_new_tokens=2)
  with pytest.raises(ValueError, match="attention_mask must be"):
    gen.greedy_search(m, p, e, a[:, 1:], max_new_tokens=2)
  with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
    gen.greedy_search(m, p, e, a, max_new_tokens=0)
  with pytest.raises(ValueError, match="num_return_sequences"):
    gen.beam_search(m, p, e, a, num_beams=2, max_new_tokens=2, num_return_sequences=3)
  with pytest.raises(ValueError, match="early_stopping"):
    gen.beam_search(m, p, e, a, num_beams=2, max_new_tokens=2, early_stopping="sometimes")
  with pytest.raises(TypeError, match="T5ForConditionalGeneration and BloomForCausalLM"):
    gen.greedy_search(bloom.BloomModel(m.config), p, e, a, max_new_tokens=2)
  # the BLOOM cache wants its mask over every cache position
  cache = bloom.init_cache(m, 3, 12)
  with pytest.raises(ValueError, match="the cache 12"):
    jax.eval_shape(lambda: bloom.decode_step(m, p, cache, a, inputs_embeds=e))
  with pytest.raises(ValueError, match=r"attention_mask must be \[B, S\] over the cache"):
    jax.eval_shape(lambda: bloom.decode_step(m, p, cache, None, inputs_embeds=e))
  with pytest.raises(ValueError, match="without a cache"):
    jax.eval_shape(lambda: m.apply({"params": p}, None, a, e, decode=True))
