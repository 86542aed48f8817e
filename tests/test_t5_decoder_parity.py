"""Numerical parity of `mmret_jax.models.t5.T5ForConditionalGeneration` against Hugging Face
`MT5ForConditionalGeneration` / `T5ForConditionalGeneration` (CPU, fp32): encoder states, logits from
input_ids and from inputs_embeds, the loss on labels with -100, cached incremental decoding against the
full forward; the layers.py KV cache on its own (a BLOOM-like self-attention with a padding mask and an
additive key bias); the seq2seq key map (round trip, HF loading our export, strictness).

Every HF model has random weights (every param redrawn; an untied `lm_head` is a new parameter, since
transformers 5 ties it at construction). Our params come from the HF state dict through
`convert/t5.py`, so the converter is exercised by every parity test. Decoder lengths exceed the
unidirectional max_exact (num_buckets / 2), so the logarithmic buckets are used, and in the mT5 case
max_distance too, so the last bucket is.
"""

from __future__ import annotations

import json
import os

os.environ["TRANSFORMERS_VERBOSITY"] = "error"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mmret_jax import convert  # noqa: E402
from mmret_jax.convert import t5 as t5_convert  # noqa: E402
from mmret_jax.convert.core import ConversionError  # noqa: E402
from mmret_jax.models import layers, t5  # noqa: E402

ENC_ATOL = 1e-5
LOGIT_ATOL = 1e-5  # logits and cached logits vs HF (measured <= 2.1e-6, max|logit| 3.2-4.5)
CACHE_ATOL = 1e-5  # cached steps vs our full decoder forward

# name -> (HF config fields, encoder lengths (row 2 left-padded), decoder length T, labelled lengths).
# Measured fp32 max|diff| (encoder states / logits from ids / logits from embeds / loss / cached vs full):
CASES = {
    # mT0 style: gated-gelu, untied lm_head without rescale, inner_dim 40 != d_model 48, 3 decoder blocks over
    # 2 encoder blocks, 8 buckets and max_distance 12 < T.
    # 1.3e-6 / 2.1e-6 / 2.0e-6 / 0 / 1.7e-6
    "mt5-gated-untied": (
        dict(model_type="mt5", vocab_size=97, d_model=48, num_heads=4, d_kv=10, d_ff=64, num_layers=2,
             num_decoder_layers=3, relative_attention_num_buckets=8, relative_attention_max_distance=12),
        (13, 9, 6), 15, (15, 11, 6)),
    # T5 v1.0: relu, lm_head tied to `shared` with the d_model^-0.5 rescale.
    # 1.2e-6 / 1.7e-6 / 1.3e-6 / 0 / 9.5e-7
    "t5-relu-tied": (
        dict(model_type="t5", vocab_size=83, d_model=32, num_heads=4, d_kv=8, d_ff=37, num_layers=2,
             feed_forward_proj="relu", tie_word_embeddings=True, decoder_start_token_id=0,
             relative_attention_num_buckets=16, relative_attention_max_distance=20),
        (11, 8, 5), 12, (12, 7, 3)),
    # Flan-T5 style: t5 gated-gelu with an untied head and no rescale; 3 encoder, 2 decoder blocks.
    # 2.5e-6 / 2.1e-6 / 1.9e-6 / 0 / 1.1e-6
    "t5-gated-untied": (
        dict(model_type="t5", vocab_size=64, d_model=40, num_heads=5, d_kv=8, d_ff=50, num_layers=3,
             num_decoder_layers=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
             decoder_start_token_id=0),
        (10, 7, 4), 9, (9, 5, 2)),
}


def _maxdiff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def make_hf(fields: dict, seed: int):
  """A random HF (M)T5ForConditionalGeneration: RMSNorm scales 1 + 0.2 N(0, 1), the bias tables and the token
  table N(0, 1), kernels N(0, fan_in^-1) (q also / sqrt(d_kv)); an untied head N(0, d_model^-1)."""
  import transformers as tf  # pylint: disable=import-outside-toplevel
  fields = dict(fields)
  mt5 = fields.pop("model_type") == "mt5"
  tied = fields.get("tie_word_embeddings", not mt5)
  cfg = (tf.MT5Config if mt5 else tf.T5Config)(**fields)
  torch.manual_seed(seed)
  model = (tf.MT5ForConditionalGeneration if mt5 else tf.T5ForConditionalGeneration)(cfg)
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if "layer_norm" in name:
        p.copy_(1.0 + 0.2 * noise)
      elif "relative_attention_bias" in name or name == "shared.weight":
        p.copy_(noise)
      else:
        p.copy_(p.shape[1] ** -0.5 * (cfg.d_kv ** -0.5 if name.endswith(".q.weight") else 1.0) * noise)
    if not tied:  # transformers 5 ties the head at construction
      head = torch.randn(model.lm_head.weight.shape, generator=g) * cfg.d_model ** -0.5
      model.lm_head.weight = torch.nn.Parameter(head)
  assert (model.lm_head.weight is model.shared.weight) == tied
  return model.eval()


def make_batch(vocab: int, d_model: int, enc_lengths, t: int, label_lengths, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  b, s = len(enc_lengths), max(enc_lengths)
  mask = (np.arange(s)[None] < np.asarray(enc_lengths)[:, None]).astype(np.int64)
  mask[2] = mask[2, ::-1]
  ids = np.where(mask == 1, rng.integers(2, vocab, (b, s)), 0)
  labels = np.where(np.arange(t)[None] < np.asarray(label_lengths)[:, None], rng.integers(1, vocab, (b, t)), -100)
  return {"input_ids": ids, "attention_mask": mask, "labels": labels,
          "decoder_input_ids": rng.integers(0, vocab, (b, t)),
          "inputs_embeds": rng.standard_normal((b, s, d_model)).astype(np.float32)}


def hf_outputs(tmodel, batch: dict) -> dict:
  tb = {k: torch.as_tensor(v) for k, v in batch.items()}
  with torch.no_grad():
    o = tmodel(input_ids=tb["input_ids"], attention_mask=tb["attention_mask"], labels=tb["labels"])
    e = tmodel(inputs_embeds=tb["inputs_embeds"], attention_mask=tb["attention_mask"],
               decoder_input_ids=tb["decoder_input_ids"])
    shifted = tmodel._shift_right(tb["labels"])  # pylint: disable=protected-access
  return {"encoder": o.encoder_last_hidden_state.numpy(), "logits": o.logits.numpy(), "loss": float(o.loss),
          "embeds_logits": e.logits.numpy(), "shifted": shifted.numpy()}


class Case:
  """One case: HF model, our model and params (via the converter), jitted functions and the outputs."""

  def __init__(self, name: str, seed: int):
    fields, enc_lengths, t, label_lengths = CASES[name]
    self.tmodel = make_hf(fields, seed)
    self.hf_config = self.tmodel.config.to_dict()
    self.sd = {k: v.numpy() for k, v in self.tmodel.state_dict().items()}
    self.params, self.meta = t5_convert.to_params(self.sd, self.hf_config)
    self.model = t5_convert.build_model(self.hf_config, self.meta)
    c = self.model.config
    self.batch = make_batch(c.vocab_size, c.d_model, enc_lengths, t, label_lengths, seed + 10)
    self.ref = hf_outputs(self.tmodel, self.batch)
    m = self.model
    self.forward = jax.jit(lambda p, i, a, lab: m.apply({"params": p}, i, a, labels=lab))
    self.forward_embeds = jax.jit(lambda p, e, a, d: m.apply({"params": p}, attention_mask=a, decoder_input_ids=d,
                                                             inputs_embeds=e))
    self.step = jax.jit(lambda p, cache, ids, a, enc=None: t5.decode_step(m, p, cache, ids, a, enc))
    j = {k: jnp.asarray(v) for k, v in self.batch.items()}
    self.out = self.forward(self.params, j["input_ids"], j["attention_mask"], j["labels"])
    self.out_embeds = self.forward_embeds(self.params, j["inputs_embeds"], j["attention_mask"],
                                          j["decoder_input_ids"])


@pytest.fixture(scope="module")
def cases():
  built = {}

  def get(name: str) -> Case:
    if name not in built:
      built[name] = Case(name, seed=len(built))
    return built[name]

  return get


@pytest.mark.parametrize("name", list(CASES))
def test_seq2seq_parity_fp32(cases, name):
  case = cases(name)
  c, ref, out = case.model.config, case.ref, case.out
  fields = CASES[name][0]
  assert isinstance(case.model, t5.T5ForConditionalGeneration)
  assert case.meta == {"seq2seq": True, "tied_lm_head": fields.get("tie_word_embeddings", False)}
  assert c.scales_decoder_outputs == (name == "t5-relu-tied") and ("lm_head" in case.params) != c.tie_word_embeddings
  diffs = {"encoder": _maxdiff(out["encoder_last_hidden_state"], ref["encoder"]),
           "logits": _maxdiff(out["logits"], ref["logits"]),
           "embeds_logits": _maxdiff(case.out_embeds["logits"], ref["embeds_logits"]),
           "loss": abs(float(out["loss"]) - ref["loss"])}
  assert diffs["encoder"] <= ENC_ATOL, diffs
  assert max(diffs["logits"], diffs["embeds_logits"]) <= LOGIT_ATOL, diffs
  assert diffs["loss"] <= 1e-5 * max(1.0, ref["loss"]), diffs
  assert out["logits"].dtype == jnp.float32 and np.abs(ref["logits"]).max() > 1.0
  assert (case.batch["labels"] == -100).any(axis=1)[1:].all()
  np.testing.assert_array_equal(np.asarray(t5.shift_right(jnp.asarray(case.batch["labels"]))), ref["shifted"])


@pytest.mark.parametrize("name", ["mt5-gated-untied", "t5-relu-tied"])
def test_cached_decoding_equals_full_forward(cases, name):
  """A prefill of 3 positions (with the encoder states), then one position per step from the cache, over
  padded encoder masks: the logits of the full forward on the same decoder inputs; the cache holds T + 3
  positions, so its unwritten tail is masked on every step."""
  case = cases(name)
  batch, m, p = case.batch, case.model, case.params
  t = batch["labels"].shape[1]
  ids, mask = jnp.asarray(t5.shift_right(jnp.asarray(batch["labels"]))), jnp.asarray(batch["attention_mask"])
  enc = case.out["encoder_last_hidden_state"]
  cache = t5.init_cache(m, ids.shape[0], t + 3)
  assert {x.shape[1:2] for x in jax.tree_util.tree_leaves(cache)} == {(t + 3,), ()}
  logits, cache = case.step(p, cache, ids[:, :3], mask, enc)
  steps = [logits]
  for i in range(3, t):
    logits, cache = case.step(p, cache, ids[:, i:i + 1], mask)
    steps.append(logits)
  cached = np.concatenate([np.asarray(s) for s in steps], axis=1)
  assert _maxdiff(cached, case.out["logits"]) <= CACHE_ATOL
  assert _maxdiff(cached, case.ref["logits"]) <= LOGIT_ATOL
  att = cache["decoder"]["block_0"]
  assert int(att["layer_0"]["SelfAttention"]["cache_index"]) == t
  assert att["layer_1"]["EncDecAttention"]["cached_key"].shape == (*enc.shape[:2], m.config.num_heads, m.config.d_kv)
  np.testing.assert_array_equal(np.asarray(att["layer_0"]["SelfAttention"]["cached_key"][:, t:]), 0)
  # the relative bias of a cached step puts its queries at the cache index: positions 3..5 prefilled at 0..2
  # give other logits
  moved, _ = case.step(p, t5.init_cache(m, ids.shape[0], t + 3), ids[:, 3:6], mask, enc)
  assert _maxdiff(moved, case.out["logits"][:, 3:6]) > 1e-2
  # giving the encoder states again on a later step recomputes the same cross-attention keys
  again, _ = case.step(p, cache, ids[:, :1], mask, enc)
  ref_next, _ = case.step(p, cache, ids[:, :1], mask)
  np.testing.assert_allclose(np.asarray(again), np.asarray(ref_next), atol=1e-6)


def test_cache_errors(cases):
  """Misuse of the cache and the inputs raises clear errors (while tracing: `jax.eval_shape`)."""
  case = cases("mt5-gated-untied")
  m, p = case.model, case.params
  ids, mask = jnp.asarray(case.batch["decoder_input_ids"]), jnp.asarray(case.batch["attention_mask"])
  enc = case.out["encoder_last_hidden_state"]
  trace = lambda f: jax.eval_shape(f)  # noqa: E731
  with pytest.raises(ValueError, match="encoder states on the first decoding step"):
    trace(lambda: t5.decode_step(m, p, t5.init_cache(m, ids.shape[0], 8), ids[:, :1], mask))
  with pytest.raises(ValueError, match="without a cache"):
    trace(lambda: m.apply({"params": p}, ids, enc, mask, decode=True, method=m.decode))
  with pytest.raises(ValueError, match="do not fit a cache"):
    trace(lambda: t5.decode_step(m, p, t5.init_cache(m, ids.shape[0], 4), ids[:, :5], mask, enc))
  with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
    trace(lambda: m.apply({"params": p}, method=m.encode))
  with pytest.raises(ValueError, match="decoder_input_ids or labels"):
    trace(lambda: m.apply({"params": p}, ids, mask))
  with pytest.raises(ValueError, match="needs encoder_hidden_states"):
    trace(lambda: m.apply({"params": p}, ids, method=m.decode))


def test_layers_kv_cache_bloom_like():
  """`layers.Attention(decode=True)` as a decoder-only model uses it: left-padded rows (a key-padding mask over
  all cache positions) and an additive per-key bias [B, N, 1, S] (ALiBi-like); a 4-position prefill, then
  single steps, equal the full causal forward."""
  b, t, d, n = 3, 10, 24, 4
  r = np.random.default_rng(0)
  x = jnp.asarray(r.standard_normal((b, t, d)).astype(np.float32))
  pad = np.ones((b, t), bool)
  pad[1, :3] = False  # left padding
  pad[2, :6] = False
  bias = jnp.asarray(r.standard_normal((b, n, 1, t)).astype(np.float32))
  att = layers.Attention(n, d, out_name="out")
  params = jax.jit(att.init)(jax.random.PRNGKey(0), x)["params"]
  mask = layers.attention_bias_from_mask(jnp.asarray(pad))
  full = jax.jit(lambda p: att.apply({"params": p}, x, mask=jnp.logical_and(mask, layers.cache_mask(0, t, t)),
                                     bias=bias))(params)
  cache = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(
      lambda: att.init(jax.random.PRNGKey(0), x, decode=True))[layers.CACHE])
  step = jax.jit(lambda c, xs: att.apply({"params": params, layers.CACHE: c}, xs, mask=mask, bias=bias, decode=True,
                                         mutable=[layers.CACHE]))
  out, v = step(cache, x[:, :4])
  outs = [out]
  for i in range(4, t):
    out, v = step(v[layers.CACHE], x[:, i:i + 1])
    outs.append(out)
  cached = jnp.concatenate(outs, axis=1)
  rows = pad[:, :, None]  # fully padded query rows attend to nothing valid: compare the real tokens
  assert _maxdiff(np.where(rows, cached, 0), np.where(rows, full, 0)) <= 1e-6
  assert int(v[layers.CACHE]["cache_index"]) == t


@pytest.mark.parametrize("name", ["mt5-gated-untied", "t5-relu-tied"])
def test_converter_round_trip_is_bitwise(cases, name):
  """HF state_dict() (the table under shared / encoder / decoder names, and lm_head) -> ours -> HF: the same
  keys and bits."""
  case = cases(name)
  back = t5_convert.to_state_dict(case.params, case.hf_config, case.meta)
  assert sorted(back) == sorted(case.sd)
  for k, v in case.sd.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_hf_loads_our_export(cases, tmp_path):
  """An HF dir (config.json + model.safetensors) -> convert to-jax -> to-hf -> from_pretrained: nothing
  missing or unexpected, logits bitwise those of the source model (untied head kept untied, tied kept tied)."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  for name in ("mt5-gated-untied", "t5-relu-tied"):
    case = cases(name)
    src = tmp_path / name / "src"
    src.mkdir(parents=True)
    save_file({k: np.ascontiguousarray(v) for k, v in case.sd.items()}, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(case.hf_config))
    meta, _, params, on_the_fly = convert.load_any(src)
    assert on_the_fly and meta == {"family": "t5", **case.meta}
    assert isinstance(convert.build_model(meta, case.hf_config), t5.T5ForConditionalGeneration)
    assert convert.to_jax(src, tmp_path / name / "jax")["family"] == "t5"
    assert convert.to_hf(tmp_path / name / "jax", tmp_path / name / "hf")["family"] == "t5"
    back, report = type(case.tmodel).from_pretrained(tmp_path / name / "hf", output_loading_info=True)
    assert not any(report.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), report
    back.eval()
    assert (back.lm_head.weight is back.shared.weight) == case.meta["tied_lm_head"]
    np.testing.assert_array_equal(hf_outputs(back, case.batch)["logits"], case.ref["logits"])


def _expect_error(sd, hf_config, *needles):
  with pytest.raises(ConversionError) as e:
    t5_convert.to_params(sd, hf_config)
  for needle in needles:
    assert needle in str(e.value), str(e.value)


def test_converter_is_strict(cases):
  case = cases("mt5-gated-untied")
  sd, cfg = case.sd, case.hf_config
  k = "decoder.block.1.layer.1.EncDecAttention.k.weight"
  _expect_error({key: v for key, v in sd.items() if key != k}, cfg, "missing keys", k)
  extra = "decoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"
  _expect_error({**sd, extra: np.zeros((8, 4), np.float32)}, cfg, "unexpected keys", extra)
  wo = "decoder.block.0.layer.2.DenseReluDense.wo.weight"
  _expect_error({**sd, wo: sd[wo][:, :-1]}, cfg, "shape mismatches", wo)
  _expect_error({**sd, t5_convert.DECODER_TIED_KEY: sd["shared.weight"] + 1}, cfg, "not tied",
                t5_convert.DECODER_TIED_KEY)
  _expect_error({**sd, "lm_head.weight": sd["lm_head.weight"][:-1]}, cfg, "shape mismatches", "lm_head.weight")
  # a transformers-4 config (tie_word_embeddings false, as every mT5 / mT0 on the hub) requires the head
  v4 = {**cfg, "tie_word_embeddings": False}
  _expect_error({key: v for key, v in sd.items() if key != "lm_head.weight"}, v4, "missing keys", "lm_head.weight")
  params, meta = t5_convert.to_params(sd, v4)
  assert meta["tied_lm_head"] is False and not t5_convert.build_model(v4, meta).config.scales_decoder_outputs
  # HF's ignored stale key is accepted by name; so is a table kept only under a tied name
  stale, = t5_convert.STALE_KEYS
  t5_convert.to_params({**sd, stale: np.zeros((8, 4), np.float32)}, cfg)
  only_tied = {key: v for key, v in sd.items() if key != "shared.weight"}
  np.testing.assert_array_equal(t5_convert.to_params(only_tied, cfg)[0]["shared"]["embedding"], sd["shared.weight"])
  # tied T5: a head equal to the table, or none, is the tied head
  tied = cases("t5-relu-tied")
  no_head = {key: v for key, v in tied.sd.items() if key != "lm_head.weight"}
  assert t5_convert.to_params(no_head, tied.hf_config)[1]["tied_lm_head"] is True


def test_config_scaling_rules():
  """scale_decoder_outputs: explicit (HF 5 writes it for t5) > t5 follows tie_word_embeddings > mt5 never."""
  assert t5.T5Config.from_dict({"model_type": "t5"}).scales_decoder_outputs
  assert not t5.T5Config.from_dict({"model_type": "t5", "tie_word_embeddings": False}).scales_decoder_outputs
  assert not t5.T5Config.from_dict({"model_type": "t5", "scale_decoder_outputs": False}).scales_decoder_outputs
  mt5 = t5.T5Config.from_dict({"model_type": "mt5"})
  assert not mt5.tie_word_embeddings and not mt5.scales_decoder_outputs
  assert not t5.T5Config.from_dict({"model_type": "mt5", "tie_word_embeddings": True}).scales_decoder_outputs
  c = t5.T5Config(num_layers=3)
  assert c.decoder_layers == 3 and t5.T5Config.from_dict(c.to_dict()) == c
  assert "scale_decoder_outputs" not in c.to_dict()


def test_every_param_has_logical_axis_names():
  for name in ("mt5-gated-untied", "t5-relu-tied"):
    fields = CASES[name][0]
    model = t5.T5ForConditionalGeneration(t5.T5Config.from_dict(fields))
    boxed = jax.eval_shape(lambda m=model: t5.init_params(m, jax.random.PRNGKey(0)))
    assert {"shared", "encoder", "decoder"} <= set(boxed)
    assert ("lm_head" in boxed) != model.config.tie_word_embeddings
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves)
