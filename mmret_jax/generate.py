"""Greedy and beam search with static shapes for mBLIP's language models (Geigle et al., arXiv 2307.06930).

Mirrors Hugging Face `GenerationMixin.generate` (transformers 5.x `_sample` with do_sample=False, and the
vectorised `_beam_search`) for `t5.T5ForConditionalGeneration` (mT0: the encoder runs once on the prompt, the
decoder is cached and starts from `decoder_start_token_id`) and `bloom.BloomForCausalLM` (BLOOMZ: a cached
prefill of the left-padded prompt, then one token per step), both fed `inputs_embeds` (mBLIP's visual prefix
before the prompt's token embeddings) or `input_ids`. `generate` is the mBLIP entry (`mblip.MBlip`).

Semantics (HF's):
  - `min_new_tokens`: the eos logit is -inf while fewer new tokens exist (HF MinNewTokensLengthLogitsProcessor).
  - greedy: argmax; a row that emitted eos emits pad from then on; the loop ends when every row has.
  - beam search: per row, the 2K best (beam, token) continuations of the K running beams by summed log-prob;
    those ending in eos (at the last step: all) among the first K enter the row's K finished hypotheses with
    score sum / n ** length_penalty, n = the number of new tokens (eos included; HF's `cur_len + 1 -
    decoder_prompt_len`, which counts new tokens for both families: the decoder-only prompt passed as
    `inputs_embeds` has length 0, the encoder-decoder one is the start token); the K best unfinished continue.
    `early_stopping` False (HF default): a row stops accepting hypotheses once its best running score at the
    current length cannot beat its worst finished one (HF `_check_early_stop_heuristic`); the loop ends when
    every row has stopped. True: a row stops once it has K hypotheses. "never": the heuristic with
    `max_new_tokens` as the length when length_penalty > 0.
Outputs are token ids [B, max_new_tokens] (new tokens only), pad after eos. HF's beam output fills after eos
with `pad_token_id or eos_token_id` (eos for mT5, whose pad id is 0); ours always uses pad.

Static shapes: beams are flattened into the batch, [B * K] (row b, beam k at b * K + k); the first token comes
from the prefill's logits, then a `lax.while_loop` runs one cached decoder step per token (at most
max_new_tokens - 1), gathering the cache by the chosen beams each step. The prefill runs on the B rows and its
cache is repeated K times. Each search is one jitted program per (model, batch, prompt length, max_new_tokens,
num_beams, eos / pad ids, num_return_sequences) (`SearchSpec`); min_new_tokens, length_penalty and early_stopping
are traced (`Knobs`). `generate` pads prompts to a multiple of `length_bucket` so nearby lengths share one.

Shapes: B batch, K num_beams, T max_new_tokens, S prompt length (prefix + tokens), V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmret_jax.models import bloom, mblip, t5

Array = jax.Array
LanguageModel = t5.T5ForConditionalGeneration | bloom.BloomForCausalLM
NEG = -1.0e9  # HF's "very large negative" beam score
EARLY_STOPPING = {False: 0, True: 1, "never": 2}  # HF `early_stopping` values -> the traced code


@dataclasses.dataclass(frozen=True)
class SearchSpec:
  """The static settings of one compiled search (min_new_tokens, length_penalty and early_stopping are traced:
  `Knobs`)."""
  max_new_tokens: int
  num_beams: int = 1
  eos_token_id: int | None = None
  pad_token_id: int = 0
  num_return_sequences: int = 1

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.num_beams < 1:
      raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
    if not 1 <= self.num_return_sequences <= self.num_beams:
      raise ValueError(f"num_return_sequences must be in [1, num_beams={self.num_beams}], got "
                       f"{self.num_return_sequences}")


@dataclasses.dataclass(frozen=True)
class Knobs:
  """The traced settings (changing them reuses the compiled search): int32 min_new_tokens, float32
  length_penalty, int32 early_stopping (`EARLY_STOPPING` code)."""
  min_new_tokens: Array
  length_penalty: Array
  early_stopping: Array

  @classmethod
  def make(cls, min_new_tokens: int = 0, length_penalty: float = 1.0, early_stopping: bool | str = False) -> "Knobs":
    if min_new_tokens < 0:
      raise ValueError(f"min_new_tokens must be >= 0, got {min_new_tokens}")
    if not isinstance(early_stopping, (bool, str)) or early_stopping not in EARLY_STOPPING:
      raise ValueError(f"early_stopping must be False, True or 'never', got {early_stopping!r}")
    return cls(jnp.int32(min_new_tokens), jnp.float32(length_penalty), jnp.int32(EARLY_STOPPING[early_stopping]))


jax.tree_util.register_dataclass(Knobs, data_fields=["min_new_tokens", "length_penalty", "early_stopping"],
                                 meta_fields=[])


# ----------------------------------------------------------------------------- language models

Step = Callable[[Any, Array, Array], tuple[Array, Any]]  # (cache, tokens [N], context [N, ..]) -> (logits, cache)


def _special_ids(model: LanguageModel, eos_token_id: int | None, pad_token_id: int | None) -> tuple[int | None, int]:
  """eos and pad ids: given, else the config's; pad falls back to eos, then 0 (HF: pad = eos when unset)."""
  c = model.config
  eos = c.eos_token_id if eos_token_id is None else eos_token_id
  pad = c.pad_token_id if pad_token_id is None else pad_token_id
  if pad is None:
    pad = 0 if eos is None else eos
  return eos, int(pad)


def _prefill(model: LanguageModel, params: dict, inputs_embeds: Array | None, input_ids: Array | None,
             attention_mask: Array, max_new_tokens: int) -> tuple[Array, Any, Array, Step]:
  """The prompt through the model: (float32 logits of the first new token [B, V], the cache, the per-row
  context every step needs [B, ..], step). mT5: the encoder, then the decoder start token (the encoder states
  fill the cross-attention caches); context = the encoder mask [B, S]. BLOOM: the whole prompt into a cache of
  S + T - 1 positions; context = the mask over the cache, [B, S + T - 1] (ones after the prompt)."""
  b = attention_mask.shape[0]
  if isinstance(model, t5.T5ForConditionalGeneration):
    enc = model.apply({"params": params}, input_ids, attention_mask, inputs_embeds,
                      method="encode")  # by name: a qwix-quantized subclass intercepts it
    cache = t5.init_cache(model, b, max_new_tokens)
    start = jnp.full((b, 1), model.config.decoder_start_token_id, jnp.int32)
    logits, cache = t5.decode_step(model, params, cache, start, attention_mask, enc)

    def step(cache, tokens, mask):
      logits, cache = t5.decode_step(model, params, cache, tokens[:, None], mask)
      return logits[:, -1], cache
    return logits[:, -1], cache, attention_mask, step

  if isinstance(model, bloom.BloomForCausalLM):
    length = attention_mask.shape[1] + max_new_tokens - 1
    mask = jnp.concatenate([attention_mask, jnp.ones((b, max_new_tokens - 1), attention_mask.dtype)], axis=1)
    cache = bloom.init_cache(model, b, length)
    logits, cache = bloom.decode_step(model, params, cache, mask, input_ids, inputs_embeds)

    def step(cache, tokens, mask):
      logits, cache = bloom.decode_step(model, params, cache, mask, input_ids=tokens[:, None])
      return logits[:, -1], cache
    return logits[:, -1], cache, mask, step

  raise TypeError(f"generation supports T5ForConditionalGeneration and BloomForCausalLM, got {type(model).__name__}")


def _rows(tree: Any, index: Array) -> Any:
  """Every array of `tree` with a batch axis (cache keys / values, masks) indexed by `index` on axis 0; the
  scalar cache indices are left alone."""
  return jax.tree_util.tree_map(lambda x: x if x.ndim == 0 else jnp.take(x, index, axis=0), tree)


def _no_early_eos(scores: Array, i: Array, spec: SearchSpec, knobs: Knobs) -> Array:
  """scores [N, V] with eos at -inf while i < min_new_tokens (i = new tokens so far)."""
  if spec.eos_token_id is None:
    return scores
  blocked = scores.at[:, spec.eos_token_id].set(-jnp.inf)
  return jnp.where(i < knobs.min_new_tokens, blocked, scores)


# ----------------------------------------------------------------------------- greedy

def _greedy(logits: Array, cache: Any, context: Array, step: Step, spec: SearchSpec, knobs: Knobs) -> Array:
  """HF greedy decoding from the first logits [B, V] -> tokens [B, T] (pad after eos)."""
  b, t = logits.shape[0], spec.max_new_tokens
  eos = -1 if spec.eos_token_id is None else spec.eos_token_id

  def body(carry):
    i, logits, tokens, done, cache = carry
    tok = jnp.argmax(_no_early_eos(logits, i, spec, knobs), axis=-1).astype(jnp.int32)
    tok = jnp.where(done, spec.pad_token_id, tok)
    tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, i))
    done = done | (tok == eos)
    logits, cache = jax.lax.cond((i + 1 < t) & ~jnp.all(done), lambda: step(cache, tok, context),
                                 lambda: (logits, cache))
    return i + 1, logits, tokens, done, cache

  carry = (jnp.asarray(0, jnp.int32), logits.astype(jnp.float32), jnp.full((b, t), spec.pad_token_id, jnp.int32),
           jnp.zeros((b,), bool), cache)
  return jax.lax.while_loop(lambda c: (c[0] < t) & ~jnp.all(c[3]), body, carry)[2]


# ----------------------------------------------------------------------------- beam search

@dataclasses.dataclass
class _Beams:
  """Beam search state, per row b and beam k: running sequences / summed log-probs and the K finished
  hypotheses (HF `running_sequences`, `running_beam_scores`, `sequences`, `beam_scores`, `is_sent_finished`,
  `is_early_stop_heuristic_unsatisfied`)."""
  running: Array  # int32 [B, K, T]
  running_scores: Array  # float32 [B, K]
  finished: Array  # int32 [B, K, T]
  scores: Array  # float32 [B, K]
  is_finished: Array  # bool [B, K]
  open: Array  # bool [B]: may still accept better hypotheses


jax.tree_util.register_dataclass(_Beams, data_fields=[f.name for f in dataclasses.fields(_Beams)], meta_fields=[])

def _gather(x: Array, index: Array) -> Array:
  """x [B, M, ...] at index [B, M'] along axis 1 -> [B, M', ...]."""
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _beam_select(i: Array, logits: Array, beams: _Beams, spec: SearchSpec, knobs: Knobs) -> tuple[_Beams, Array]:
  """One beam search step at new-token index i from logits [B * K, V]: (the new state, the source beam of every
  new running beam [B, K], for the cache reorder). HF `_beam_search` steps b-g."""
  k, t = spec.num_beams, spec.max_new_tokens
  length_penalty, early_stopping = knobs.length_penalty, knobs.early_stopping
  b, v = logits.shape[0] // k, logits.shape[-1]
  k2 = 2 * k  # HF beams_to_keep = max(2, 1 + number of eos ids) * K
  logprobs = _no_early_eos(jax.nn.log_softmax(logits, axis=-1), i, spec, knobs)
  total = (logprobs.reshape(b, k, v) + beams.running_scores[:, :, None]).reshape(b, k * v)
  top_scores, top_index = jax.lax.top_k(total, k2)
  source, tok = top_index // v, (top_index % v).astype(jnp.int32)
  top_seqs = _gather(beams.running, source)
  top_seqs = jnp.where(jnp.arange(t) == i, tok[:, :, None], top_seqs)
  eos = -1 if spec.eos_token_id is None else spec.eos_token_id
  hits = (tok == eos) | (i == t - 1)  # HF stopping criteria: eos, or max length

  # the K best continuations that did not stop keep running
  running_top = top_scores + hits.astype(jnp.float32) * NEG
  _, keep = jax.lax.top_k(running_top, k)
  running, running_scores, parents = _gather(top_seqs, keep), _gather(running_top, keep), _gather(source, keep)

  # stopped ones among the first K join the finished hypotheses if they beat them
  just_finished = hits & (jnp.arange(k2) < k)[None, :]
  cand = top_scores / ((i + 1).astype(jnp.float32) ** length_penalty)
  full = jnp.all(beams.is_finished, axis=-1, keepdims=True) & (early_stopping == 1)
  cand = cand + full.astype(jnp.float32) * NEG
  cand = cand + (~beams.open)[:, None].astype(jnp.float32) * NEG
  cand = cand + (~just_finished).astype(jnp.float32) * NEG
  merged_scores = jnp.concatenate([beams.scores, cand], axis=1)
  _, best = jax.lax.top_k(merged_scores, k)
  finished = _gather(jnp.concatenate([beams.finished, top_seqs], axis=1), best)
  scores = _gather(merged_scores, best)
  is_finished = _gather(jnp.concatenate([beams.is_finished, just_finished], axis=1), best)

  # can a running beam still beat the worst finished hypothesis? (HF `_check_early_stop_heuristic`)
  length = jnp.where((early_stopping == 2) & (length_penalty > 0), t, i + 1).astype(jnp.float32)
  best_running = running_scores[:, :1] / (length ** length_penalty)
  worst = jnp.where(is_finished, jnp.min(scores, axis=1, keepdims=True), NEG)
  still_open = beams.open & jnp.any(best_running > worst, axis=-1)
  return _Beams(running, running_scores, finished, scores, is_finished, still_open), parents


def _beam_search(logits: Array, cache: Any, context: Array, step: Step, spec: SearchSpec, knobs: Knobs
                 ) -> tuple[Array, Array]:
  """HF beam search from the first logits [B * K, V] (rows repeated per beam) -> (the finished hypotheses
  [B, K, T] best first, their scores [B, K])."""
  k, t = spec.num_beams, spec.max_new_tokens
  b = logits.shape[0] // k
  init = _Beams(running=jnp.full((b, k, t), spec.pad_token_id, jnp.int32),
                running_scores=jnp.zeros((b, k), jnp.float32).at[:, 1:].set(NEG),
                finished=jnp.full((b, k, t), spec.pad_token_id, jnp.int32),
                scores=jnp.full((b, k), NEG, jnp.float32), is_finished=jnp.zeros((b, k), bool),
                open=jnp.ones((b,), bool))
  offsets = (jnp.arange(b) * k)[:, None]

  def unfinished(beams):  # HF `_beam_search_has_unfinished_sequences` (max length: the loop bound)
    return jnp.any(beams.open) & ~(jnp.all(beams.is_finished) & (knobs.early_stopping == 1))

  def body(carry):
    i, logits, beams, cache = carry
    beams, parents = _beam_select(i, logits, beams, spec, knobs)
    cache = _rows(cache, (offsets + parents).reshape(-1))
    last = jax.lax.dynamic_index_in_dim(beams.running, i, axis=2, keepdims=False).reshape(-1)
    logits, cache = jax.lax.cond((i + 1 < t) & unfinished(beams), lambda: step(cache, last, context),
                                 lambda: (logits, cache))
    return i + 1, logits, beams, cache

  carry = (jnp.asarray(0, jnp.int32), logits.astype(jnp.float32), init, cache)
  beams = jax.lax.while_loop(lambda c: (c[0] < t) & unfinished(c[2]), body, carry)[2]
  return beams.finished, beams.scores


# ----------------------------------------------------------------------------- entry points

def _search(model: LanguageModel, params: dict, inputs_embeds: Array | None, input_ids: Array | None,
            attention_mask: Array, knobs: Knobs, spec: SearchSpec, quant: Any = None):
  """Prefill, then greedy (num_beams 1) or beam search; traceable. `quant`: a `quant.QuantConfig` when `params`
  hold the weight-only quantized LLM of `quant.quantize_params` (the model runs qwix-wrapped)."""
  if quant is not None:
    from mmret_jax.models import quant as quant_lib  # pylint: disable=import-outside-toplevel  (qwix: optional)
    from mmret_jax.models import layers  # pylint: disable=import-outside-toplevel
    with layers.unfused_projections():
      return _search(quant_lib.quantized_model(model, quant), params, inputs_embeds, input_ids, attention_mask,
                     knobs, spec)
  logits, cache, context, step = _prefill(model, params, inputs_embeds, input_ids, attention_mask,
                                          spec.max_new_tokens)
  if spec.num_beams == 1:
    return _greedy(logits, cache, context, step, spec, knobs)
  rows = jnp.repeat(jnp.arange(logits.shape[0]), spec.num_beams)
  seqs, scores = _beam_search(logits[rows], _rows(cache, rows), context[rows], step, spec, knobs)
  n = spec.num_return_sequences
  return (seqs[:, 0], scores[:, 0]) if n == 1 else (seqs[:, :n], scores[:, :n])


@functools.partial(jax.jit, static_argnames=("model", "spec", "quant"))
def _search_jit(model, params, inputs_embeds, input_ids, attention_mask, knobs, spec, quant=None):
  return _search(model, params, inputs_embeds, input_ids, attention_mask, knobs, spec, quant)


def _prompt(model: LanguageModel, inputs_embeds: Array | None, input_ids: Array | None,
            attention_mask: Array | None) -> Array:
  """Checks the prompt; returns its int32 mask [B, S] (all ones when None)."""
  if (inputs_embeds is None) == (input_ids is None):
    raise ValueError("Give exactly one of inputs_embeds and input_ids")
  shape = tuple((input_ids if inputs_embeds is None else inputs_embeds).shape[:2])
  if inputs_embeds is not None:
    width = model.config.d_model if isinstance(model, t5.T5ForConditionalGeneration) else model.config.hidden_size
    if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != width:
      raise ValueError(f"inputs_embeds must be [B, S, {width}], got shape {inputs_embeds.shape}")
  elif input_ids.ndim != 2:
    raise ValueError(f"input_ids must be [B, S], got shape {input_ids.shape}")
  if attention_mask is None:
    return jnp.ones(shape, jnp.int32)
  if tuple(attention_mask.shape) != shape:
    raise ValueError(f"attention_mask must be [B, S] = {shape}, got shape {attention_mask.shape}")
  return jnp.asarray(attention_mask, jnp.int32)


def greedy_search(model: LanguageModel, params: dict, inputs_embeds: Array | None = None,
                  attention_mask: Array | None = None, *, input_ids: Array | None = None, max_new_tokens: int,
                  min_new_tokens: int = 0, eos_token_id: int | None = None, pad_token_id: int | None = None,
                  quant: Any = None) -> Array:
  """HF `generate(do_sample=False, num_beams=1)` -> int32 [B, max_new_tokens], pad after eos.

  Args:
    model: `t5.T5ForConditionalGeneration` or `bloom.BloomForCausalLM`; params: its (unboxed) params.
    inputs_embeds: [B, S, D] (or input_ids [B, S]); attention_mask [B, S] (1 = token; BLOOM prompts are
      left-padded, T5 ones padded anywhere).
    eos_token_id, pad_token_id: default the config's (pad: eos when the config has none, as HF).
    quant: a `models.quant.QuantConfig` (targets relative to `model`) when `params` come from
      `quant.quantize_params`: the targeted kernels are read as int8 / int4 (weight-only).
  """
  mask = _prompt(model, inputs_embeds, input_ids, attention_mask)
  eos, pad = _special_ids(model, eos_token_id, pad_token_id)
  spec = SearchSpec(max_new_tokens, 1, eos, pad)
  return _search_jit(model, params, inputs_embeds, input_ids, mask, Knobs.make(min_new_tokens), spec, quant)


def beam_search(model: LanguageModel, params: dict, inputs_embeds: Array | None = None,
                attention_mask: Array | None = None, *, input_ids: Array | None = None, num_beams: int,
                max_new_tokens: int, min_new_tokens: int = 0, length_penalty: float = 1.0,
                early_stopping: bool | str = False, num_return_sequences: int = 1, output_scores: bool = False,
                eos_token_id: int | None = None, pad_token_id: int | None = None,
                quant: Any = None) -> Array | tuple[Array, Array]:
  """HF `generate(do_sample=False, num_beams=K)` -> int32 [B, max_new_tokens] (pad after eos); with
  num_return_sequences n > 1, the n best hypotheses [B, n, max_new_tokens]; `output_scores` adds their
  length-penalised scores float32 [B] / [B, n] (HF `sequences_scores`). Arguments as `greedy_search`;
  early_stopping is HF's False, True or "never". min_new_tokens, length_penalty and early_stopping are traced:
  changing them does not recompile."""
  mask = _prompt(model, inputs_embeds, input_ids, attention_mask)
  eos, pad = _special_ids(model, eos_token_id, pad_token_id)
  spec = SearchSpec(max_new_tokens, num_beams, eos, pad, num_return_sequences)
  knobs = Knobs.make(min_new_tokens, length_penalty, early_stopping)
  out = _search_jit(model, params, inputs_embeds, input_ids, mask, knobs, spec, quant)
  if num_beams == 1:  # greedy; scores are not defined
    if output_scores:
      raise ValueError("output_scores needs num_beams > 1")
    return out
  return out if output_scores else out[0]


def language_model(model: mblip.MBlip) -> LanguageModel:
  """mBLIP's LLM as a standalone module (params: `params["language_model"]`)."""
  cfg = mblip.llm_config(model.config)
  kw = dict(dtype=model.dtype, param_dtype=model.param_dtype)
  if isinstance(cfg, t5.T5Config):
    return t5.T5ForConditionalGeneration(cfg, **kw)
  return bloom.BloomForCausalLM(cfg, **kw)


def bucket_prompt(input_ids: np.ndarray, attention_mask: np.ndarray, multiple: int, pad_token_id: int,
                  side: str) -> tuple[np.ndarray, np.ndarray]:
  """Pads ids / mask [B, L] to a multiple of `multiple` positions with pad ids and mask 0 on `side` ("left" for
  BLOOM: the extra padding goes before mBLIP's prefix, which ALiBi's mask-counted positions ignore; "right" for
  mT5)."""
  extra = -input_ids.shape[1] % max(multiple, 1)
  width = ((0, 0), (extra, 0) if side == "left" else (0, extra))
  return (np.pad(input_ids, width, constant_values=pad_token_id), np.pad(attention_mask, width, constant_values=0))


@functools.partial(jax.jit, static_argnames=("model", "spec", "quant"))
def _mblip_search(model, params, pixel_values, input_ids, attention_mask, knobs, spec, quant=None):
  embeds, mask = model.apply({"params": params}, pixel_values, input_ids, attention_mask,
                             method=mblip.MBlip.prompt_embeds)  # the LLM's embedding table only (never quantized)
  return _search(language_model(model), params["language_model"], embeds, None, mask, knobs, spec, quant)


def generate(model: mblip.MBlip, params: dict, pixel_values: Array, input_ids: Array,
             attention_mask: Array | None = None, *, num_beams: int = 5, max_new_tokens: int = 10,
             min_new_tokens: int = 1, length_penalty: float = -1.0, early_stopping: bool | str = False,
             length_bucket: int = 16, quant: Any = None) -> Array:
  """mBLIP generation (the seed's `mBLIP.generate`: the visual prefix before the prompt's token embeddings,
  then the LLM's `generate`) -> new token ids int32 [B, max_new_tokens], pad after eos. Defaults are mBLIP's
  VQA / classification protocol; captioning uses max_new_tokens=50, length_penalty=1.0.

  Args:
    pixel_values: [B, (n,) H, W, 3]; input_ids / attention_mask: the prompt [B, L] (mT5: right-padded; BLOOM:
      left-padded, as mBLIP's collator).
    length_bucket: the prompt is padded to a multiple of this many tokens, so that nearby lengths share one
      compiled program.
    quant: a `models.quant.QuantConfig` with LLM-relative targets (`quant.llm_config`) when
      `params["language_model"]` is quantized (`quant.quantize_llm`).
  """
  ids = np.asarray(input_ids)
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be [B, L], got shape {ids.shape}")
  mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
  if mask.shape != ids.shape:
    raise ValueError(f"attention_mask must be [B, L] = {ids.shape}, got shape {mask.shape}")
  lm = language_model(model)
  decoder_only = isinstance(lm, bloom.BloomForCausalLM)
  if decoder_only and not mask[:, -1].all():
    raise ValueError("BLOOM prompts must be left-padded (the last position of every row a token)")
  eos, pad = _special_ids(lm, None, None)
  ids, mask = bucket_prompt(ids, mask, length_bucket, pad, "left" if decoder_only else "right")
  spec = SearchSpec(max_new_tokens, num_beams, eos, pad)
  out = _mblip_search(model, params, jnp.asarray(pixel_values), jnp.asarray(ids), jnp.asarray(mask),
                      Knobs.make(min_new_tokens, length_penalty, early_stopping), spec, quant)
  return out if num_beams == 1 else out[0]

