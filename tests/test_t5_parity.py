"""Numerical parity of `mmret_jax.models.t5.T5Encoder` against Hugging Face `T5EncoderModel` /
`MT5EncoderModel` and a bare `T5Stack` as UniIR's CLIP-FF builds it (CPU, fp32), plus the T5 key maps.

Every model has random weights: every param is redrawn, RMSNorm scales and the relative position
bias table included. The encoder models are written with `save_pretrained` and reach our side through
`convert.load_any` + `convert.build_model`, so these tests also exercise the converter. Sequences are
longer than max_exact (num_buckets / 4 for the bidirectional encoder), so the logarithmic buckets are
used, and in two cases longer than max_distance, so the last bucket is too.
"""

from __future__ import annotations

import dataclasses
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
from mmret_jax.convert.core import ConversionError, params_to_state_dict, state_dict_to_params  # noqa: E402
from mmret_jax.models import layers, t5  # noqa: E402

FP32_ATOL = 1e-5  # measured fp32 max|diff|: see CASES
# bf16 compute (params fp32, matmuls bf16, `wo` and softmax / RMSNorm fp32) vs the torch fp32 reference,
# over every hidden state. Measured max|diff| / max|ref|: see CASES. Asserted: <= 3e-2 (the BERT / CLIP bound).
BF16_REL_TOL = 3e-2

# name -> (HF config fields, sequence lengths; row 2 is left-padded, the others right-padded).
# Measured fp32 max|diff| (last_hidden_state / over every hidden state) and bf16 max|diff| / max|ref| (over
# every hidden state; `wo` in float32 as HF / `wo` in bf16):
CASES = {
    # t5 relu FFN; 16 bidirectional buckets of which 8 exact; lengths up to 40.
    # fp32 1.2e-6 / 1.2e-6; bf16 5.8e-3 / 7.9e-3
    "t5-d32h4kv8-ff37-relu-l2": (
        dict(model_type="t5", vocab_size=101, d_model=32, num_heads=4, d_kv=8, d_ff=37, num_layers=2,
             feed_forward_proj="relu"), (40, 23, 9)),
    # mT5: gated-gelu (-> gelu_new), num_heads * d_kv = 36 != d_model 48, one block.
    # fp32 1.4e-6 / 1.4e-6; bf16 5.9e-3 / 5.9e-3
    "mt5-d48h3kv12-ff61-gatedgelu-l1": (
        dict(model_type="mt5", vocab_size=120, d_model=48, num_heads=3, d_kv=12, d_ff=61, num_layers=1,
             feed_forward_proj="gated-gelu"), (30, 17, 5)),
    # 8 buckets, max_distance 20 < the length 45: every bucket kind; exact GELU; eps 1e-5.
    # fp32 1.8e-6 / 1.8e-6; bf16 7.0e-3 / 7.9e-3
    "t5-d40h5kv8-ff53-gelu-l3-b8md20": (
        dict(model_type="t5", vocab_size=90, d_model=40, num_heads=5, d_kv=8, d_ff=53, num_layers=3,
             relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj="gelu",
             layer_norm_epsilon=1e-5), (45, 31, 12)),
}


def _maxdiff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _randomize_(model: torch.nn.Module, config, seed: int) -> torch.nn.Module:
  """Redraws every param: RMSNorm scales 1 + 0.2 N(0, 1); the relative bias table and the token table
  N(0, 1); kernels N(0, fan_in^-1), q also divided by sqrt(d_kv) (HF's init: T5 does not scale logits)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if "layer_norm" in name:
        p.copy_(1.0 + 0.2 * noise)
      elif "relative_attention_bias" in name or "embed_tokens" in name or name == "shared.weight":
        p.copy_(noise)
      else:
        std = p.shape[1] ** -0.5 * (config.d_kv ** -0.5 if name.endswith(".q.weight") else 1.0)
        p.copy_(std * noise)
  return model.eval()


def make_t5(path, fields: dict, seed: int = 0):
  """A random HF T5EncoderModel / MT5EncoderModel, written with save_pretrained when `path` is given."""
  import transformers as tf  # pylint: disable=import-outside-toplevel
  fields = dict(fields)
  mt5 = fields.pop("model_type") == "mt5"
  cfg = (tf.MT5Config if mt5 else tf.T5Config)(**fields)
  torch.manual_seed(seed)
  model = _randomize_((tf.MT5EncoderModel if mt5 else tf.T5EncoderModel)(cfg), cfg, seed)
  if path is not None:
    model.save_pretrained(path)
  return model


def inputs(vocab_size: int, lengths, seed: int = 0) -> dict:
  """Random ids; rows right-padded with the pad id 0, except row 2, which is left-padded."""
  rng = np.random.default_rng(seed)
  b, n = len(lengths), max(lengths)
  mask = (np.arange(n)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
  mask[2] = mask[2, ::-1]
  ids = np.where(mask == 1, rng.integers(2, vocab_size, size=(b, n)), 0)
  assert (mask == 0).any(axis=1)[1:].all()
  return {"input_ids": ids, "attention_mask": mask}


def torch_outputs(tmodel, batch: dict) -> dict[str, np.ndarray]:
  with torch.no_grad():
    o = tmodel(**{k: torch.as_tensor(v) for k, v in batch.items()}, output_hidden_states=True)
  return {"last_hidden_state": o.last_hidden_state.numpy(),
          **{f"hidden_states_{i}": h.numpy() for i, h in enumerate(o.hidden_states)}}


def our_outputs(model, params, batch: dict, *, raw: bool = False) -> dict:
  run = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, output_hidden_states=True))
  o = run(params, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]))
  out = {"last_hidden_state": o["last_hidden_state"],
         **{f"hidden_states_{i}": h for i, h in enumerate(o["hidden_states"])}}
  return out if raw else {k: np.asarray(x.astype(jnp.float32)) for k, x in out.items()}


def _load(path, **model_kw):
  meta, hf_config, params, on_the_fly = convert.load_any(path)
  assert on_the_fly and meta["family"] == "t5"
  return convert.build_model(meta, hf_config, **model_kw), params


@pytest.fixture(scope="module")
def t5_dirs(tmp_path_factory):
  """Lazily built HF dirs: case -> (path, torch model)."""
  built = {}

  def get(case: str):
    if case not in built:
      path = tmp_path_factory.mktemp(case)
      built[case] = (path, make_t5(path, CASES[case][0], seed=len(built)))
    return built[case]

  return get


@pytest.mark.parametrize("case", list(CASES))
def test_t5_encoder_parity_fp32(t5_dirs, case):
  path, tmodel = t5_dirs(case)
  model, params = _load(path)
  assert isinstance(model, t5.T5Encoder) and model.embed_tokens
  c = model.config
  assert (c.model_type, c.is_gated_act, c.inner_dim) == (CASES[case][0]["model_type"], tmodel.config.is_gated_act,
                                                         tmodel.config.num_heads * tmodel.config.d_kv)
  assert c.dense_act_fn == tmodel.config.dense_act_fn
  batch = inputs(c.vocab_size, CASES[case][1], seed=1)
  ref, out = torch_outputs(tmodel, batch), our_outputs(model, params, batch)
  assert sorted(out) == sorted(ref) and f"hidden_states_{c.num_layers}" in ref
  diffs = {k: _maxdiff(out[k], ref[k]) for k in ref}
  assert max(diffs.values()) <= FP32_ATOL, diffs
  assert np.abs(ref["last_hidden_state"]).max() > 0.5  # the tolerance means something
  # inputs_embeds gives the same as input_ids
  emb = params["shared"]["embedding"][batch["input_ids"]]
  o2 = jax.jit(lambda p, e, m: model.apply({"params": p}, inputs_embeds=e, attention_mask=m))(
      params, jnp.asarray(emb), jnp.asarray(batch["attention_mask"]))
  np.testing.assert_array_equal(np.asarray(o2["last_hidden_state"]), out["last_hidden_state"])


def test_relative_bias_and_padding_matter(t5_dirs):
  """The relative bias table and the padding mask change the outputs (both are really applied)."""
  case = "t5-d40h5kv8-ff53-gelu-l3-b8md20"
  path, _ = t5_dirs(case)
  model, params = _load(path)
  batch = inputs(model.config.vocab_size, CASES[case][1], seed=2)
  base = our_outputs(model, params, batch)["last_hidden_state"]
  zeroed = jax.tree_util.tree_map(np.array, params)  # a copy
  att = zeroed["block_0"]["layer_0"]["SelfAttention"]
  att["relative_attention_bias"]["embedding"] = np.zeros_like(att["relative_attention_bias"]["embedding"])
  assert _maxdiff(our_outputs(model, zeroed, batch)["last_hidden_state"], base) > 1e-2
  unmasked = dict(batch, attention_mask=np.ones_like(batch["attention_mask"]))
  assert _maxdiff(our_outputs(model, params, unmasked)["last_hidden_state"], base) > 1e-2


def test_relative_position_bucket_matches_hf():
  from transformers.models.t5.modeling_t5 import T5Attention  # pylint: disable=import-outside-toplevel
  rel = torch.arange(-700, 701)
  for bidirectional in (True, False):
    for buckets, distance in ((32, 128), (8, 20), (16, 50), (64, 256), (6, 9), (32, 64)):
      bucket = T5Attention._relative_position_bucket  # pylint: disable=protected-access
      ref = bucket(rel, bidirectional, buckets, distance).numpy()
      ours = jax.jit(lambda r, b=bidirectional, n=buckets, d=distance: t5.relative_position_bucket(
          r, bidirectional=b, num_buckets=n, max_distance=d))(jnp.asarray(rel.numpy()))
      np.testing.assert_array_equal(np.asarray(ours), ref, err_msg=f"{bidirectional} {buckets} {distance}")


def _uniir_stack(d_model: int = 64, num_heads: int = 4, d_kv: int = 16, seed: int = 3):
  """HF `T5Stack` built as UniIR's clip_ff.py builds it (T5Config() with fields set afterwards)."""
  from transformers.models.t5 import T5Config  # pylint: disable=import-outside-toplevel
  from transformers.models.t5.modeling_t5 import T5Stack  # pylint: disable=import-outside-toplevel
  conf = T5Config()
  conf.num_layers = 2
  conf.num_decoder_layers = 2
  conf.num_heads = num_heads
  conf.d_model = d_model
  conf.d_kv = d_kv
  torch.manual_seed(seed)
  return _randomize_(T5Stack(conf), conf, seed), conf


def test_uniir_t5_stack_parity_and_prefixed_rules():
  """UniIR CLIP-FF: a bare 2-layer T5Stack (T5Config defaults: d_ff 2048, relu, 32 buckets, max_distance
  128) on inputs_embeds without a mask; keys under `t5_layers.` with stack_rules. Length 150 > 128."""
  tstack, conf = _uniir_stack()
  sd = {f"t5_layers.{k}": v.numpy() for k, v in tstack.state_dict().items()}
  config = t5.T5Config.from_dict(conf.to_dict())
  assert (config.d_ff, config.feed_forward_proj, config.relative_attention_num_buckets,
          config.relative_attention_max_distance, config.dropout_rate) == (2048, "relu", 32, 128, 0.1)
  stack = t5.T5Encoder(config, embed_tokens=False)
  rules = t5_convert.stack_rules(config, "t5_layers.")
  params = state_dict_to_params(rules, sd, expected=t5_convert.expected_shapes(stack),
                                ignore=t5_convert.stack_ignored("t5_layers."))
  x = np.random.default_rng(4).standard_normal((2, 150, 64)).astype(np.float32)
  with torch.no_grad():
    ref = tstack(inputs_embeds=torch.as_tensor(x), attention_mask=None, use_cache=False,
                 return_dict=True).last_hidden_state.numpy()
  out = jax.jit(lambda p, e: stack.apply({"params": p}, inputs_embeds=e, attention_mask=None))(params, jnp.asarray(x))
  diff = _maxdiff(out["last_hidden_state"], ref)
  assert diff <= FP32_ATOL, diff  # measured 1.8e-6
  assert np.abs(ref).max() > 0.5
  # the same rules write the keys back bitwise (the unused token table left out)
  back = params_to_state_dict(rules, params)
  assert sorted(back) == sorted(k for k in sd if not k.endswith("embed_tokens.weight"))
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k], err_msg=k)
  # the config read off the weights is the one UniIR builds (with or without the unused token table)
  for keys in (sd, back):
    assert t5.T5Config.from_dict(t5_convert.stack_config_from_state_dict(keys, "t5_layers.")) == config
  with pytest.raises(ConversionError, match="final_layer_norm"):
    t5_convert.stack_config_from_state_dict({k: v for k, v in sd.items() if "final" not in k}, "t5_layers.")
  # the rules under a path of ours, as a parent module holds the stack (e.g. UniIR's `t5_layers`)
  nested = t5_convert.stack_rules(config, "t5_layers.", ("t5_layers",))
  assert {r.path[1:] for r in nested} == {r.path for r in rules} and {r.path[0] for r in nested} == {"t5_layers"}


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_compute_close_to_torch_fp32(t5_dirs, case):
  path, tmodel = t5_dirs(case)
  ref = None
  for wo_float32 in (True, False):
    meta, hf_config, params, _ = convert.load_any(path)
    config = dataclasses.replace(t5_convert.config_from_hf(hf_config), wo_float32=wo_float32)
    model = t5.T5Encoder(config, dtype=jnp.bfloat16)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x: x.dtype == np.float32, params))
    batch = inputs(config.vocab_size, CASES[case][1], seed=5)
    ref = torch_outputs(tmodel, batch) if ref is None else ref
    raw = our_outputs(model, params, batch, raw=True)
    assert raw["last_hidden_state"].dtype == jnp.bfloat16
    # HF keeps `wo` in float32: the residual stream after the first FFN is float32 then.
    assert raw["hidden_states_1"].dtype == (jnp.float32 if wo_float32 and config.num_layers > 1 else jnp.bfloat16)
    out = {k: np.asarray(x.astype(jnp.float32)) for k, x in raw.items()}
    rels = {k: _maxdiff(out[k], ref[k]) / float(np.abs(ref[k]).max()) for k in ref}
    assert max(rels.values()) <= BF16_REL_TOL, (wo_float32, rels)
    assert _maxdiff(out["last_hidden_state"], ref["last_hidden_state"]) > 1e-4  # bf16 is really in use


def test_dropout_is_a_function_of_the_rng():
  config = t5.T5Config(vocab_size=50, d_model=24, num_heads=2, d_kv=12, d_ff=40, num_layers=2,
                       relative_attention_num_buckets=8, relative_attention_max_distance=16)
  ids = jnp.asarray(np.random.default_rng(6).integers(2, 50, (2, 12)))
  mask = jnp.asarray(np.r_[np.ones((1, 12)), np.r_[np.ones(8), np.zeros(4)][None]].astype(np.int32))

  def run(cfg, rng, remat=False):
    model = t5.T5Encoder(cfg, remat=remat)
    params = t5.init_params(model, jax.random.PRNGKey(0))
    rngs = None if rng is None else {"dropout": rng}
    f = jax.jit(lambda p: model.apply({"params": p}, ids, mask, deterministic=rng is None, rngs=rngs))
    return np.asarray(f(params)["last_hidden_state"])

  k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  a, b, again, ev = run(config, k1), run(config, k2), run(config, k1), run(config, None)
  np.testing.assert_array_equal(a, again)
  assert _maxdiff(a, b) > 1e-2 and _maxdiff(a, ev) > 1e-2
  np.testing.assert_array_equal(run(config, k1, remat=True), a)  # remat draws the same masks
  no_drop = dataclasses.replace(config, dropout_rate=0.0)
  np.testing.assert_array_equal(run(no_drop, k1), run(no_drop, None))


def test_every_param_has_logical_axis_names():
  t5_fields, mt5_fields = CASES["t5-d32h4kv8-ff37-relu-l2"][0], CASES["mt5-d48h3kv12-ff61-gatedgelu-l1"][0]
  for fields, embed in ((t5_fields, True), (mt5_fields, True), (t5_fields, False)):
    model = t5.T5Encoder(t5.T5Config.from_dict(fields), embed_tokens=embed)
    boxed = jax.eval_shape(lambda m=model: t5.init_params(m, jax.random.PRNGKey(0)))
    assert ("shared" in boxed) == embed and "final_layer_norm" in boxed
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves)
  with pytest.raises(ValueError, match="inputs_embeds"):
    model.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))


def test_converter_round_trip_is_bitwise(t5_dirs):
  """HF state_dict() (the tied table under both names) -> ours -> HF: same keys, same bits."""
  for case in ("t5-d32h4kv8-ff37-relu-l2", "mt5-d48h3kv12-ff61-gatedgelu-l1"):
    _, tmodel = t5_dirs(case)
    sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
    assert t5_convert.TIED_KEY in sd and t5_convert.SHARED_KEY in sd
    hf_config = tmodel.config.to_dict()
    params, meta = t5_convert.to_params(sd, hf_config)
    back = t5_convert.to_state_dict(params, hf_config, meta)
    assert sorted(back) == sorted(sd)
    for k in sd:
      np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_cli_to_jax_and_to_hf_round_trip(t5_dirs, tmp_path):
  """convert to-jax on a T5EncoderModel dir, then to-hf: transformers loads it with identical outputs."""
  case = "mt5-d48h3kv12-ff61-gatedgelu-l1"
  path, tmodel = t5_dirs(case)
  info = convert.to_jax(path, tmp_path / "jax")
  assert info["family"] == "t5"
  assert convert.to_hf(tmp_path / "jax", tmp_path / "hf")["family"] == "t5"
  back, report = type(tmodel).from_pretrained(tmp_path / "hf", output_loading_info=True)
  assert not any(report.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), report
  back.eval()
  batch = inputs(tmodel.config.vocab_size, CASES[case][1], seed=7)
  a, b = torch_outputs(tmodel, batch), torch_outputs(back, batch)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _expect_error(sd, hf_config, *needles):
  with pytest.raises(ConversionError) as e:
    t5_convert.to_params(sd, hf_config)
  for n in needles:
    assert n in str(e.value), str(e.value)


def test_converter_is_strict(t5_dirs):
  _, tmodel = t5_dirs("t5-d32h4kv8-ff37-relu-l2")
  sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  cfg = tmodel.config.to_dict()
  norm = "encoder.block.1.layer.1.layer_norm.weight"
  _expect_error({k: v for k, v in sd.items() if k != norm}, cfg, "missing keys", norm)
  extra = "encoder.block.0.layer.0.SelfAttention.q.bias"
  _expect_error({**sd, extra: np.zeros(32, np.float32)}, cfg, "unexpected keys", extra)
  table = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
  _expect_error({**sd, table: np.zeros((16, 4), np.float32)}, cfg, "shape mismatches", table, "(16, 4)")
  _expect_error({**sd, "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight": sd[table]}, cfg,
                "unexpected keys", "block.1.layer.0.SelfAttention.relative_attention_bias")
  _expect_error({**sd, t5_convert.TIED_KEY: sd[t5_convert.SHARED_KEY] + 1}, cfg, "not tied")
  _expect_error({**sd, "decoder.final_layer_norm.weight": np.ones(32, np.float32)}, cfg, "decoder")
  _expect_error(sd, {**cfg, "feed_forward_proj": "gated-gelu"}, "missing keys", "wi_0")  # config says gated
  _expect_error(sd, {**cfg, "model_type": "umt5"}, "umt5")
  _expect_error(sd, {**cfg, "feed_forward_proj": "gated-relu-x"}, "feed_forward_proj")
  # the tied name alone is enough
  only_tied = {k: v for k, v in sd.items() if k != t5_convert.SHARED_KEY}
  params, _ = t5_convert.to_params(only_tied, cfg)
  np.testing.assert_array_equal(params["shared"]["embedding"], sd[t5_convert.SHARED_KEY])


def test_config_from_dict():
  c = t5.T5Config.from_dict({"model_type": "mt5", "d_model": 16})
  assert (c.vocab_size, c.feed_forward_proj, c.dense_act_fn, c.is_gated_act, c.d_model) == \
      (250112, "gated-gelu", "gelu_new", True, 16)
  assert t5.T5Config.from_dict({"model_type": "t5", "feed_forward_proj": "gated-silu"}).dense_act_fn == "silu"
  assert "wo_float32" not in t5.T5Config().to_dict()
  assert t5.T5Config.from_dict(t5.T5Config().to_dict()) == t5.T5Config()
  with pytest.raises(ValueError, match="feed_forward_proj"):
    t5.T5Config(feed_forward_proj="relu-gated")
  with pytest.raises(ValueError, match="Unsupported activation"):
    t5.T5Config(feed_forward_proj="gated-nope")


def test_attention_bias_and_scale_in_layers():
  """`dot_product_attention`: a bias is added to the logits and keeps the fused kernel out (its result is
  the XLA path's, with the bias); scale=None is H^-0.5; scale=1.0 is no scaling."""
  r = np.random.default_rng(8)
  q, k, v = (jnp.asarray(r.standard_normal((2, 16, 2, 8)).astype(np.float32)) for _ in range(3))
  bias = jnp.asarray(r.standard_normal((1, 2, 16, 16)).astype(np.float32))
  mask = layers.attention_bias_from_mask(jnp.asarray(np.r_[np.ones((1, 16)), np.r_[np.ones(9), np.zeros(7)][None]]))
  xla = layers.dot_product_attention(q, k, v, mask, bias=bias, scale=1.0)
  fused = layers.dot_product_attention(q, k, v, mask, bias=bias, scale=1.0, implementation="fused_interpret")
  np.testing.assert_array_equal(np.asarray(fused), np.asarray(xla))
  logits = jnp.einsum("blnh,bsnh->bnls", q, k) + bias
  probs = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
  np.testing.assert_allclose(np.asarray(xla), np.asarray(jnp.einsum("bnls,bsnh->blnh", probs, v)), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(layers.dot_product_attention(q, k, v, mask)),
                                np.asarray(layers.dot_product_attention(q, k, v, mask, scale=8 ** -0.5)))
