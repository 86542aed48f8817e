"""Numerical parity of `mmret_jax.models.bloom.BloomForCausalLM` against Hugging Face `BloomForCausalLM`
(CPU, fp32), and the BLOOM key maps (`mmret_jax/convert/bloom.py`).

Every torch model has random weights (LayerNorm scales and biases and the linear biases included) and
reaches our side through `convert.bloom.to_params` on its `state_dict()`. Batches are right-padded,
left-padded (mBLIP pads BLOOM batches on the left), and, for the mBLIP path, a prefix of random embeddings
(the projected visual queries, mask ones) before left-padded text, so the padding sits mid-sequence there.
"""

from __future__ import annotations

import dataclasses
import json
import os

os.environ["TRANSFORMERS_VERBOSITY"] = "error"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mmret_jax.convert import bloom as bloom_convert  # noqa: E402
from mmret_jax.convert.core import ConversionError, read_state_dict  # noqa: E402
from mmret_jax.models import bloom  # noqa: E402

FP32_ATOL = 1e-5  # logits and every hidden state; measured max|diff|: see CASES
BF16_REL_TOL = 3e-2  # bf16 compute vs torch fp32, max|diff| / max|ref| (the BERT / CLIP / T5 bound)
PREFIX = 5  # mBLIP prepends 32 projected query embeddings; a few suffice here

# name -> (HF BloomConfig fields, text lengths of the 3 rows). Measured fp32 max|diff| of the logits (max|logit|
# 8-13), equal to the max over every hidden state (right padding / left padding / embedding prefix), and the
# bf16 max|diff| / max|ref| over logits and hidden states (left padding): see the comment on each case.
CASES = {
    # 4 heads (a power of two): slopes 2^-2, 2^-4, 2^-6, 2^-8.  2.4e-6 / 2.3e-6 / 2.9e-6; bf16 8.0e-3
    "d32h4-l2": (dict(vocab_size=101, hidden_size=32, n_layer=2, n_head=4), (13, 9, 4)),
    # 6 heads: 4 slopes of the 4-series, then 2 odd terms of the 8-series; residual from the LayerNorm
    # output (apply_residual_connection_post_layernorm).  3.6e-6 / 3.6e-6 / 5.0e-6; bf16 1.1e-2
    "d48h6-l3-postln": (dict(vocab_size=90, hidden_size=48, n_layer=3, n_head=6,
                             apply_residual_connection_post_layernorm=True, layer_norm_epsilon=1e-6), (17, 11, 6)),
    # 12 heads of width 4 (8 + 4 extra slopes).  2.9e-6 / 2.6e-6 / 4.8e-6; bf16 8.0e-3
    "d48h12-l2": (dict(vocab_size=77, hidden_size=48, n_layer=2, n_head=12), (10, 15, 3)),
}


def _maxdiff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def make_bloom(fields: dict, seed: int = 0):
  """A random HF BloomForCausalLM in eval mode. LayerNorm scales 1 + 0.2 N, LayerNorm and linear biases
  0.1 N, kernels N(0, fan_in^-1), the token table 0.3 N (logits of order 10)."""
  import transformers as tf  # pylint: disable=import-outside-toplevel
  cfg = tf.BloomConfig(**fields)
  torch.manual_seed(seed)
  model = tf.BloomForCausalLM(cfg)
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if "layernorm" in name or "ln_f" in name:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + (0.2 if name.endswith("weight") else 0.1) * noise)
      elif name.endswith("bias"):
        p.copy_(0.1 * noise)
      elif "word_embeddings" in name:
        p.copy_(0.3 * noise)
      else:
        p.copy_(p.shape[1] ** -0.5 * noise)
  return model.eval()


def text_batch(vocab_size: int, lengths, padding: str, seed: int = 0) -> dict:
  """Random ids [3, max(lengths)]; each row padded on `padding` ("right" / "left") with pad id 3."""
  rng = np.random.default_rng(seed)
  n = max(lengths)
  mask = (np.arange(n)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
  if padding == "left":
    mask = mask[:, ::-1].copy()
  ids = np.where(mask == 1, rng.integers(4, vocab_size, size=mask.shape), 3)
  assert (mask == 0).any(axis=1).sum() == 2
  return {"input_ids": ids, "attention_mask": mask}


def torch_out(tmodel, **batch) -> dict[str, np.ndarray]:
  with torch.no_grad():
    o = tmodel(**{k: torch.as_tensor(v) for k, v in batch.items()}, output_hidden_states=True)
  out = {"logits": o.logits.numpy(), **{f"hidden_states_{i}": h.numpy() for i, h in enumerate(o.hidden_states)}}
  if o.loss is not None:
    out["loss"] = o.loss.numpy()
  return out


@pytest.fixture(scope="module")
def cases():
  """Lazily built case -> (torch model, our model, params, jitted forward(params, ids|None, mask, embeds|None))."""
  built = {}

  def get(case: str):
    if case not in built:
      tmodel = make_bloom(CASES[case][0], seed=len(built))
      sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
      params, meta = bloom_convert.to_params(sd, tmodel.config.to_dict())
      assert meta == {"hf_prefix": "transformer."}
      model = bloom_convert.build_model(tmodel.config.to_dict(), meta)
      fwd = jax.jit(lambda p, ids, m, e: model.apply({"params": p}, ids, m, e, output_hidden_states=True))
      built[case] = (tmodel, model, params, fwd)
    return built[case]

  return get


def our_out(fwd, params, ids=None, mask=None, embeds=None) -> dict[str, np.ndarray]:
  as_j = lambda x: None if x is None else jnp.asarray(x)
  o = fwd(params, as_j(ids), as_j(mask), as_j(embeds))
  return {"logits": np.asarray(o["logits"]), **{f"hidden_states_{i}": np.asarray(h)
                                               for i, h in enumerate(o["hidden_states"])}}


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_parity_fp32(cases, case, padding):
  tmodel, model, params, fwd = cases(case)
  batch = text_batch(model.config.vocab_size, CASES[case][1], padding, seed=1)
  ref, out = torch_out(tmodel, **batch), our_out(fwd, params, batch["input_ids"], batch["attention_mask"])
  assert sorted(out) == sorted(ref) and len(ref) == model.config.n_layer + 2
  assert out["logits"].dtype == np.float32 and out["logits"].shape == (3, max(CASES[case][1]), model.config.vocab_size)
  diffs = {k: _maxdiff(out[k], ref[k]) for k in ref}  # every position, padding included
  assert max(diffs.values()) <= FP32_ATOL, diffs
  assert np.abs(ref["logits"]).max() > 5.0  # the tolerance means something


@pytest.mark.parametrize("case", list(CASES))
def test_inputs_embeds_prefix_parity_fp32(cases, case):
  """mBLIP: [prefix embeddings; token embeddings] as inputs_embeds, mask [ones; left-padded text mask]. The
  prefix goes through word_embeddings_layernorm too; ALiBi positions skip the mid-sequence padding."""
  tmodel, model, params, fwd = cases(case)
  batch = text_batch(model.config.vocab_size, CASES[case][1], "left", seed=2)
  prefix = np.random.default_rng(3).standard_normal((3, PREFIX, model.config.hidden_size)).astype(np.float32)
  mask = np.concatenate([np.ones((3, PREFIX), np.int64), batch["attention_mask"]], 1)
  tokens = jax.jit(lambda p, i: model.apply({"params": p}, i, method="embed"))(params, batch["input_ids"])
  with torch.no_grad():
    ref_tokens = tmodel.get_input_embeddings()(torch.as_tensor(batch["input_ids"])).numpy()
  np.testing.assert_array_equal(np.asarray(tokens), ref_tokens)
  embeds = np.concatenate([prefix, ref_tokens], 1)
  ref, out = torch_out(tmodel, inputs_embeds=embeds, attention_mask=mask), our_out(fwd, params, None, mask, embeds)
  diffs = {k: _maxdiff(out[k], ref[k]) for k in ref}
  assert max(diffs.values()) <= FP32_ATOL, diffs
  # the prefix is normalised: scaling it changes nothing after word_embeddings_layernorm (eps aside)
  scaled = our_out(fwd, params, None, mask, np.concatenate([3.0 * prefix, ref_tokens], 1))["logits"]
  assert _maxdiff(scaled, out["logits"]) <= 1e-4


def test_causal_lm_loss_parity(cases):
  """HF `labels` loss (shift by one, -100 ignored, mean) on the mBLIP layout: -100 on the prefix, the
  context and the padding, labels on the target tokens."""
  tmodel, model, params, fwd = cases("d48h6-l3-postln")
  batch = text_batch(model.config.vocab_size, CASES["d48h6-l3-postln"][1], "left", seed=4)
  prefix = np.random.default_rng(5).standard_normal((3, PREFIX, model.config.hidden_size)).astype(np.float32)
  with torch.no_grad():
    embeds = np.concatenate([prefix, tmodel.get_input_embeddings()(torch.as_tensor(batch["input_ids"])).numpy()], 1)
  mask = np.concatenate([np.ones((3, PREFIX), np.int64), batch["attention_mask"]], 1)
  labels = np.concatenate([np.full((3, PREFIX), -100), np.where(batch["attention_mask"] == 1, batch["input_ids"],
                                                                 -100)], 1)
  labels[:, PREFIX:PREFIX + 8] = -100  # the context of the longest row; the shorter rows lose more
  assert ((labels != -100).sum(1) > 0).all()
  ref = torch_out(tmodel, inputs_embeds=embeds, attention_mask=mask, labels=labels)["loss"]
  logits = jnp.asarray(our_out(fwd, params, None, mask, embeds)["logits"])
  ours = float(jax.jit(bloom.causal_lm_loss)(logits, jnp.asarray(labels)))
  assert abs(ours - float(ref)) <= 1e-5 * max(1.0, abs(float(ref))), (ours, float(ref))
  assert float(bloom.causal_lm_loss(logits, jnp.full(labels.shape, -100))) == 0.0  # HF: NaN
  with pytest.raises(ValueError, match="do not match"):
    bloom.causal_lm_loss(logits, jnp.asarray(labels[:, 1:]))


def test_left_padding_keeps_positions(cases):
  """As in HF, a left-padded row's logits are those of the same tokens unpadded (ALiBi positions come
  from the mask, not the index), while the right-padded batch row equals its unpadded self trivially."""
  _, model, params, fwd = cases("d32h4-l2")
  batch = text_batch(model.config.vocab_size, (13, 9, 4), "left", seed=6)
  padded = our_out(fwd, params, batch["input_ids"], batch["attention_mask"])["logits"]
  ids = batch["input_ids"][1:2, 4:]
  alone = our_out(fwd, params, ids, np.ones_like(ids))["logits"]
  assert _maxdiff(padded[1:2, 4:], alone) <= FP32_ATOL
  no_mask = our_out(fwd, params, batch["input_ids"][1:2], np.ones((1, 13), np.int64))["logits"]
  assert _maxdiff(no_mask[:, 4:], alone) > 1e-2  # the pads really are masked out otherwise
  none = jax.jit(lambda p, i: model.apply({"params": p}, i)["logits"])(params, jnp.asarray(ids))
  np.testing.assert_array_equal(np.asarray(none), alone)  # attention_mask=None is all ones


def test_alibi_matches_hf():
  from transformers.models.bloom import modeling_bloom as mb  # pylint: disable=import-outside-toplevel
  hf_slopes = mb._get_alibi_slopes  # pylint: disable=protected-access
  for n in (*range(1, 20), 24, 32, 40, 64, 112):
    np.testing.assert_allclose(bloom.alibi_slopes(n), hf_slopes(n, "cpu").numpy(), rtol=1e-6, err_msg=str(n))
  mask = np.array([[1] * 9, [1] * 6 + [0] * 3, [0] * 4 + [1] * 5, [1, 1, 1, 0, 0, 1, 1, 1, 1]])
  for n in (4, 6, 12):
    ref = mb.build_alibi_tensor(torch.as_tensor(mask), n, torch.float32).numpy().reshape(4, n, 1, 9)
    np.testing.assert_allclose(np.asarray(bloom.alibi_bias(jnp.asarray(mask), n)), ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", ["d48h6-l3-postln"])
def test_bf16_compute_close_to_torch_fp32(cases, case):
  tmodel, model, params, _ = cases(case)
  m16 = bloom.BloomForCausalLM(model.config, dtype=jnp.bfloat16)
  batch = text_batch(model.config.vocab_size, CASES[case][1], "left", seed=7)
  ref = torch_out(tmodel, **batch)
  o = jax.jit(lambda p, i, m: m16.apply({"params": p}, i, m, output_hidden_states=True))(
      params, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]))
  assert o["logits"].dtype == jnp.float32 and o["last_hidden_state"].dtype == jnp.bfloat16
  out = {"logits": np.asarray(o["logits"]),
         **{f"hidden_states_{i}": np.asarray(h.astype(jnp.float32)) for i, h in enumerate(o["hidden_states"])}}
  rels = {k: _maxdiff(out[k], ref[k]) / float(np.abs(ref[k]).max()) for k in ref}
  assert max(rels.values()) <= BF16_REL_TOL, rels
  assert _maxdiff(out["logits"], ref["logits"]) > 1e-4  # bf16 is really in use


def test_dropout_is_a_function_of_the_rng():
  config = bloom.BloomConfig(vocab_size=40, hidden_size=24, n_layer=2, n_head=3, hidden_dropout=0.2,
                             attention_dropout=0.2)
  ids = jnp.asarray(np.random.default_rng(8).integers(0, 40, (2, 10)))

  def run(cfg, rng, remat=False):
    model = bloom.BloomForCausalLM(cfg, remat=remat)
    params = bloom.init_params(model, jax.random.PRNGKey(0))
    rngs = None if rng is None else {"dropout": rng}
    return np.asarray(jax.jit(lambda p: model.apply({"params": p}, ids, deterministic=rng is None,
                                                    rngs=rngs)["logits"])(params))

  k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  a, again, b, ev = run(config, k1), run(config, k1), run(config, k2), run(config, None)
  np.testing.assert_array_equal(a, again)
  assert _maxdiff(a, b) > 1e-3 and _maxdiff(a, ev) > 1e-3
  np.testing.assert_array_equal(run(config, k1, remat=True), a)
  for field in ("hidden_dropout", "attention_dropout"):  # each is really applied
    only = dataclasses.replace(config, **{f: 0.0 for f in ("hidden_dropout", "attention_dropout") if f != field})
    assert _maxdiff(run(only, k1), run(only, None)) > 1e-3, field
  no_drop = dataclasses.replace(config, hidden_dropout=0.0, attention_dropout=0.0)
  np.testing.assert_array_equal(run(no_drop, k1), run(no_drop, None))


def test_every_param_has_logical_axis_names():
  for fields, _ in CASES.values():
    model = bloom.BloomForCausalLM(bloom.BloomConfig.from_dict(fields))
    boxed = jax.eval_shape(lambda m=model: bloom.init_params(m, jax.random.PRNGKey(0)))
    assert sorted(boxed) == sorted(["word_embeddings", "word_embeddings_layernorm", "ln_f",
                                    *(f"h_{i}" for i in range(model.config.n_layer))])
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves)


def test_bad_inputs_get_clear_errors(cases):
  _, model, params, _ = cases("d32h4-l2")
  ids = jnp.ones((2, 5), jnp.int32)
  with pytest.raises(ValueError, match="exactly one"):
    model.apply({"params": params}, ids, None, jnp.zeros((2, 5, 32)))
  with pytest.raises(ValueError, match="attention_mask must be"):
    model.apply({"params": params}, ids, jnp.ones((2, 6), jnp.int32))
  with pytest.raises(ValueError, match=r"inputs_embeds must be \[B, L, 32\]"):
    model.apply({"params": params}, inputs_embeds=jnp.zeros((2, 5, 16)))


def test_config_from_dict_and_presets():
  import transformers as tf  # pylint: disable=import-outside-toplevel
  c = bloom.BloomConfig.from_dict({"model_type": "bloom", "n_embed": 64, "num_attention_heads": 8,
                                   "num_hidden_layers": 3, "offset_alibi": 100, "seq_length": 2048})
  assert (c.hidden_size, c.n_head, c.n_layer, c.head_dim) == (64, 8, 3, 8)
  hf = tf.BloomConfig(n_embed=64, num_attention_heads=8, num_hidden_layers=3)  # HF reads the same aliases
  assert (hf.hidden_size, hf.n_head, hf.n_layer) == (c.hidden_size, c.n_head, c.n_layer)
  assert bloom.BloomConfig.from_dict(c.to_dict()) == c
  assert bloom.BloomConfig.from_dict(tf.BloomConfig().to_dict()) == bloom.BloomConfig()
  p = bloom.PRESETS["bloomz-7b1"]
  assert (p.hidden_size, p.n_layer, p.n_head, p.vocab_size, p.head_dim) == (4096, 30, 32, 250880, 128)
  with pytest.raises(ValueError, match="n_embed=64 and hidden_size=32"):
    bloom.BloomConfig.from_dict({"n_embed": 64, "hidden_size": 32})
  with pytest.raises(ValueError, match="not a multiple of n_head"):
    bloom.BloomConfig(hidden_size=30, n_head=4)
  with pytest.raises(ValueError, match="tie_word_embeddings"):
    bloom.BloomConfig(tie_word_embeddings=False)
  with pytest.raises(TypeError):
    bloom.BloomConfig(n_heads=4)  # a typo  # pylint: disable=unexpected-keyword-arg


def test_converter_round_trip_is_bitwise(cases):
  """BloomForCausalLM.state_dict() (prefixed, tied lm_head listed) and BloomModel.state_dict() (bare keys, as
  the bigscience checkpoints) -> ours -> HF: same keys, same bits."""
  tmodel, _, params, _ = cases("d48h6-l3-postln")
  hf_config = tmodel.config.to_dict()
  causal = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  bare = {k: v.numpy() for k, v in tmodel.transformer.state_dict().items()}
  assert bloom_convert.LM_HEAD_KEY in causal and "word_embeddings.weight" in bare
  for sd, prefix in ((causal, "transformer."), (bare, "")):
    ours, meta = bloom_convert.to_params(sd, hf_config)
    assert meta == {"hf_prefix": prefix}
    jax.tree_util.tree_map(np.testing.assert_array_equal, ours, params)
    back = bloom_convert.to_state_dict(ours, hf_config, meta)
    assert sorted(back) == sorted(sd)
    for k in sd:
      np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_hf_loads_our_export(cases, tmp_path):
  """save_pretrained (lm_head dropped) -> ours -> export in both layouts -> BloomForCausalLM.from_pretrained:
  nothing missing or unexpected, identical logits."""
  import transformers as tf  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  tmodel, model, _, _ = cases("d32h4-l2")
  tmodel.save_pretrained(tmp_path / "src")
  sd = read_state_dict(tmp_path / "src")
  assert bloom_convert.LM_HEAD_KEY not in sd
  hf_config = json.loads((tmp_path / "src" / "config.json").read_text())
  params, meta = bloom_convert.to_params(sd, hf_config)
  batch = text_batch(model.config.vocab_size, CASES["d32h4-l2"][1], "left", seed=9)
  want = torch_out(tmodel, **batch)["logits"]
  for prefix in ("transformer.", ""):
    dst = tmp_path / f"out{prefix or 'bare'}"
    dst.mkdir()
    save_file(bloom_convert.to_state_dict(params, hf_config, {**meta, "hf_prefix": prefix}),
              str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(hf_config))
    back, report = tf.BloomForCausalLM.from_pretrained(dst, output_loading_info=True)
    assert not any(report.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), report
    np.testing.assert_array_equal(torch_out(back.eval(), **batch)["logits"], want, err_msg=prefix)


def _expect_error(sd, hf_config, *needles):
  with pytest.raises(ConversionError) as e:
    bloom_convert.to_params(sd, hf_config)
  for n in needles:
    assert n in str(e.value), str(e.value)


def test_converter_is_strict(cases):
  tmodel, _, _, _ = cases("d32h4-l2")
  sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  cfg = tmodel.config.to_dict()
  norm = "transformer.h.1.post_attention_layernorm.bias"
  _expect_error({k: v for k, v in sd.items() if k != norm}, cfg, "missing keys", norm)
  extra = "transformer.h.2.input_layernorm.weight"
  _expect_error({**sd, extra: np.ones(32, np.float32)}, cfg, "unexpected keys", extra)
  _expect_error({**sd, "score.weight": np.ones((2, 32), np.float32)}, cfg, "unexpected keys", "score.weight")
  qkv = "transformer.h.0.self_attention.query_key_value.weight"
  _expect_error({**sd, qkv: np.zeros((96, 48), np.float32)}, cfg, "shape mismatches", qkv, "(96, 48)")
  _expect_error({**sd, qkv: np.zeros(96, np.float32)}, cfg, qkv, "2-D")
  _expect_error({**sd, bloom_convert.LM_HEAD_KEY: sd[bloom_convert.LM_HEAD_KEY] + 1}, cfg, "not tied")
  _expect_error({**sd, bloom_convert.LM_HEAD_KEY: sd[bloom_convert.LM_HEAD_KEY][:5]}, cfg, "not tied")
  _expect_error(sd, {**cfg, "n_layer": 3}, "missing keys", "transformer.h.2.")
  _expect_error(sd, {**cfg, "vocab_size": 100}, "shape mismatches", "word_embeddings")
  _expect_error(sd, {**cfg, "model_type": "gpt2"}, "gpt2")
  _expect_error(sd, {**cfg, "tie_word_embeddings": False}, "tie_word_embeddings")
  _expect_error(sd, {**cfg, "n_head": 5}, "not a multiple of n_head")
  _expect_error({"h.0.mlp.dense_h_to_4h.weight": np.zeros((4, 4))}, cfg, "not a BLOOM state dict")
  # mixed layouts: bare keys next to prefixed ones are unexpected, not silently merged
  _expect_error({**sd, "ln_f.weight": np.ones(32, np.float32)}, cfg, "unexpected keys", "ln_f.weight")
  with pytest.raises(ConversionError, match="hf_prefix"):
    bloom_convert.to_state_dict(bloom_convert.to_params(sd, cfg)[0], cfg, {"hf_prefix": "model."})
