"""BLIP-2 image side (`models/blip2.py`, `convert/blip2.py`) against Hugging Face (CPU, fp32, random weights).

Per case, module by module (transformers 5's `Blip2ForConditionalGeneration.forward` only takes image
placeholder tokens, so the LLM is never run here):
- `vision_model`: `last_hidden_state` and `pooler_output` of HF `Blip2VisionModel` (and, in one case,
  an input size other than the config's with `interpolate_pos_encoding`);
- `qformer`: HF `Blip2QFormerModel` on free `query_embeds` + `encoder_hidden_states` (another query count
  and image-token count than the model's, with and without an image-token mask);
- the LLM prefix: HF `get_image_features` (its `pooler_output` is `language_projection(Q-Former output)`),
  and mBLIP's multi-image path (B x n images flattened, queries reshaped to [B, n * Q, D], projected),
  written here as the reference.
Converter: HF keys -> ours -> HF is bitwise in both ViT qkv-bias layouts; strict errors name the key.
"""

from __future__ import annotations

import dataclasses
import os
import re

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mmret_jax.convert import ConversionError  # noqa: E402
from mmret_jax.convert import blip2 as blip2_family  # noqa: E402
from mmret_jax.models import blip2  # noqa: E402

import fixtures  # noqa: E402

FP32_ATOL = 1e-5
BF16_REL_TOL = 3e-2  # the bound of the other bf16 parity tests (max|diff| / max|ref|)
LLM = ("language_model.*",)

# name -> (vision config, Q-Former config, text (LLM) config, num_query_tokens, extra input size or None)
CASES = {
    "v48h3l2-img28p7_q32h4l3f2-Q5_t5d24": (
        dict(hidden_size=48, num_attention_heads=3, num_hidden_layers=2, intermediate_size=50, image_size=28,
             patch_size=7),
        dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=3, intermediate_size=37),
        dict(model_type="t5", d_model=24, d_kv=8, num_heads=3, d_ff=30, num_layers=1, num_decoder_layers=1,
             vocab_size=50),
        5, 42),
    "v40h5l1-img24p8-eps1e-5_q36h6l4f3-Q4_mt5d20": (
        dict(hidden_size=40, num_attention_heads=5, num_hidden_layers=1, intermediate_size=30, image_size=24,
             patch_size=8, layer_norm_eps=1e-5),
        dict(hidden_size=36, num_attention_heads=6, num_hidden_layers=4, intermediate_size=20,
             cross_attention_frequency=3, layer_norm_eps=1e-6),
        dict(model_type="mt5", d_model=20, d_kv=5, num_heads=4, d_ff=22, num_layers=1, num_decoder_layers=1,
             vocab_size=40, feed_forward_proj="gated-gelu"),
        4, None),
    "v24h2l1-img16p8_q16h2l2f1-Q3_bloom16": (
        dict(hidden_size=24, num_attention_heads=2, num_hidden_layers=1, intermediate_size=28, image_size=16,
             patch_size=8),
        dict(hidden_size=16, num_attention_heads=2, num_hidden_layers=2, intermediate_size=24,
             cross_attention_frequency=1),
        dict(model_type="bloom", hidden_size=16, n_layer=1, n_head=2, vocab_size=40),
        3, None),
}


def _maxdiff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _close(got, want, what) -> float:
  want = np.asarray(want)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  assert float(np.abs(want).max()) > 0.05, (what, "vacuous comparison")
  diff = _maxdiff(got, want)
  assert diff <= FP32_ATOL, (what, diff)
  return diff


def _hf_config(case: str):
  import transformers as tf  # pylint: disable=import-outside-toplevel
  v, q, t, n, _ = CASES[case]
  return tf.Blip2Config(vision_config=v, qformer_config=q, text_config=t, num_query_tokens=n)


def _sd(model) -> dict[str, np.ndarray]:
  return {k: v.numpy() for k, v in model.state_dict().items()}


def _pixels(b: int, size: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((b, size, size, 3)).astype(np.float32)


def _nchw(px: np.ndarray) -> torch.Tensor:
  return torch.tensor(px).permute(0, 3, 1, 2)


@dataclasses.dataclass
class Case:
  tmodel: object  # HF Blip2ForConditionalGeneration, random weights
  hf_config: dict
  sd: dict  # its state dict (numpy, LLM keys included)
  model: blip2.Blip2VisionQFormer
  params: dict
  inputs: dict  # numpy: px [3, H, W, 3]; queries [2, 7, D], image [2, 11, Dv], mask [2, 11]; (case 0) pair
  outputs: dict  # ours on `inputs` (one compiled program): `Blip2VisionQFormer.__call__`'s, "qformer", "pair"


def _inputs(case: str, multi_image: bool) -> dict:
  """3 images; free Q-Former inputs (7 queries, not the model's Q; 11 image tokens, the second example
  masking 5); with `multi_image` 2 pairs [2, 2, H, W, 3] whose right images are images 0 and 1."""
  v, q = CASES[case][0], CASES[case][1]
  rng = np.random.default_rng(3)
  out = {"px": _pixels(3, v["image_size"], seed=1),
         "queries": rng.standard_normal((2, 7, q["hidden_size"])).astype(np.float32),
         "image": rng.standard_normal((2, 11, v["hidden_size"])).astype(np.float32),
         "mask": np.ones((2, 11), np.int64)}
  out["mask"][1, 6:] = 0
  if multi_image:
    out["pair"] = np.stack([_pixels(2, v["image_size"], seed=5), out["px"][:2]], axis=1)
  return out


@pytest.fixture(scope="module")
def cases():
  import transformers as tf  # pylint: disable=import-outside-toplevel
  made = {}

  def get(case: str) -> Case:
    if case not in made:
      cfg = _hf_config(case)
      tmodel = fixtures.randomize_(tf.Blip2ForConditionalGeneration(cfg), seed=len(made))
      sd, hf_config = _sd(tmodel), cfg.to_dict()
      params, meta = blip2_family.to_params(sd, hf_config, ignore=LLM)
      assert meta == {"qkv_layout": "qkv_bias", "language_projection": True}
      model = blip2_family.build_model(hf_config, meta)

      @jax.jit
      def everything(p, x):  # one program per case: XLA:CPU compiles dominate this file's time
        out = model.apply({"params": p}, x["px"])
        out["qformer"] = model.apply({"params": p}, x["queries"], x["image"], x["mask"],
                                     method=lambda m, *a: m.qformer(*a)["last_hidden_state"])
        if "pair" in x:
          out["pair"] = model.apply({"params": p}, x["pair"])
        return out

      inputs = _inputs(case, multi_image=case == next(iter(CASES)))
      params = jax.device_put(params)
      outputs = everything(params, jax.tree.map(jnp.asarray, inputs))
      made[case] = Case(tmodel, hf_config, sd, model, params, inputs, outputs)
    return made[case]
  return get


@pytest.mark.parametrize("case", list(CASES))
def test_vision_model_parity(cases, case):
  c = cases(case)
  with torch.no_grad():
    ref = c.tmodel.vision_model(_nchw(c.inputs["px"]))
  _close(c.outputs["image_embeds"], ref.last_hidden_state, "last_hidden_state")
  _close(c.outputs["vision_pooler_output"], ref.pooler_output, "pooler_output")
  extra = CASES[case][4]
  if extra is not None:  # another input size: the position grid resized (HF interpolate_pos_encoding)
    vcfg = dataclasses.replace(c.model.config.vision_config, interpolate_pos_encoding=True)
    model = c.model.clone(config=dataclasses.replace(c.model.config, vision_config=vcfg))
    px = _pixels(2, extra, seed=2)
    got = jax.jit(lambda p, x: model.apply({"params": p}, x, method="image_embeds"))(c.params, jnp.asarray(px))
    with torch.no_grad():
      ref = c.tmodel.vision_model(_nchw(px), interpolate_pos_encoding=True)
    _close(got, ref.last_hidden_state, "last_hidden_state (interpolated)")
    with pytest.raises(ValueError, match="expected 28x28 images"):
      c.model.apply({"params": c.params}, jnp.asarray(px), method="image_embeds")


@pytest.mark.parametrize("case", list(CASES))
def test_qformer_parity(cases, case):
  """HF Blip2QFormerModel on free query embeddings and image tokens, with an image-token mask (the
  unmasked path, with the learned queries, runs in `test_query_embeds_parity`)."""
  c = cases(case)
  with torch.no_grad():
    t = dict(query_embeds=torch.tensor(c.inputs["queries"]), encoder_hidden_states=torch.tensor(c.inputs["image"]))
    ref = c.tmodel.qformer(**t, encoder_attention_mask=torch.tensor(c.inputs["mask"])).last_hidden_state
    unmasked = c.tmodel.qformer(**t).last_hidden_state
  _close(c.outputs["qformer"], ref, "qformer last_hidden_state")
  assert _maxdiff(unmasked[1], ref[1]) > 1e-3  # the mask matters


@pytest.mark.parametrize("case", list(CASES))
def test_query_embeds_parity(cases, case):
  """The LLM prefix: HF `get_image_features` for one image per example; mBLIP's reshape for two."""
  c = cases(case)
  px = c.inputs["px"]
  with torch.no_grad():
    ref = c.tmodel.get_image_features(_nchw(px))
  _close(c.outputs["qformer_last_hidden_state"], ref.qformer_outputs.last_hidden_state, "qformer last_hidden_state")
  _close(c.outputs["query_embeds"], ref.pooler_output, "query_embeds")
  if "pair" not in c.inputs:
    return
  pair, out2 = c.inputs["pair"], c.outputs["pair"]  # [B, 2, H, W, 3]: left and right image (MaRVL / NLVR2)
  with torch.no_grad():  # mBLIP `forward`: flatten to 2B images, view the queries as [B, 2Q, D], project
    q = c.tmodel.get_image_features(_nchw(pair.reshape(-1, *pair.shape[2:]))).qformer_outputs.last_hidden_state
    ref2 = c.tmodel.language_projection(q.view(2, -1, q.shape[-1]))
  n_q = c.model.config.num_query_tokens
  assert out2["query_embeds"].shape == (2, 2 * n_q, c.model.config.text_hidden_size)
  assert out2["image_embeds"].shape[:2] == out2["qformer_last_hidden_state"].shape[:2] == (2, 2)
  _close(out2["query_embeds"], ref2, "query_embeds (2 images)")
  right = c.outputs["query_embeds"][:2]  # the right images are images 0 and 1: their queries come second
  assert _maxdiff(out2["query_embeds"][:, n_q:], right) <= FP32_ATOL


def _image_side(sd: dict) -> dict:
  return {k: v for k, v in sd.items() if not k.startswith("language_model.")}


def _legacy(sd: dict) -> dict:
  """The early-HF / LAVIS layout: `q_bias`, `v_bias` in place of `qkv.bias` (k third dropped)."""
  out = {}
  for k, x in sd.items():
    if k.endswith(".self_attn.qkv.bias"):
      q, _, v = np.split(x, 3)
      out[k.replace(".qkv.bias", ".q_bias")], out[k.replace(".qkv.bias", ".v_bias")] = q, v
    else:
      out[k] = x
  return out


def test_round_trip_is_bitwise_in_both_layouts(cases):
  import transformers as tf  # pylint: disable=import-outside-toplevel
  c = cases("v48h3l2-img28p7_q32h4l3f2-Q5_t5d24")
  want = _image_side(c.sd)
  assert any(np.any(np.split(x, 3)[1] != 0) for k, x in want.items() if k.endswith("qkv.bias"))
  params, meta = blip2_family.to_params(want, c.hf_config)  # no LLM keys: nothing to ignore
  back = blip2_family.to_state_dict(params, c.hf_config, meta)
  assert sorted(back) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(back[k], want[k], err_msg=k)
  # transformers loads the result (plus its own LLM weights) strictly
  again = tf.Blip2ForConditionalGeneration(_hf_config("v48h3l2-img28p7_q32h4l3f2-Q5_t5d24"))
  again.load_state_dict({**c.tmodel.state_dict(), **{k: torch.tensor(v) for k, v in back.items()}}, strict=True)

  # legacy q_bias / v_bias: the same weights with a zero k bias
  zero_k = {k: (np.concatenate([np.split(x, 3)[0], np.zeros_like(np.split(x, 3)[1]), np.split(x, 3)[2]])
                if k.endswith("qkv.bias") else x) for k, x in want.items()}
  legacy = _legacy(zero_k)
  assert not any(k.endswith("qkv.bias") for k in legacy) and any(k.endswith("self_attn.q_bias") for k in legacy)
  p_legacy, meta_legacy = blip2_family.to_params(legacy, c.hf_config)
  assert meta_legacy["qkv_layout"] == "q_v_bias"
  fixtures.assert_params_equal(p_legacy, blip2_family.to_params(zero_k, c.hf_config)[0])
  back = blip2_family.to_state_dict(p_legacy, c.hf_config, meta_legacy)
  assert sorted(back) == sorted(legacy)
  for k in legacy:
    np.testing.assert_array_equal(back[k], legacy[k], err_msg=k)
  # a nonzero k bias has no key in the legacy layout
  with pytest.raises(ConversionError, match=r"vision_model\.encoder\.layers\.0\.self_attn\.qkv\.bias: the k third"):
    blip2_family.to_state_dict(params, c.hf_config, meta_legacy)


def test_strict_errors_name_the_key(cases):
  c = cases("v48h3l2-img28p7_q32h4l3f2-Q5_t5d24")
  sd, cfg = _image_side(c.sd), c.hf_config
  key = "qformer.encoder.layer.2.crossattention.attention.key.bias"
  with pytest.raises(ConversionError, match=f"missing keys: {re.escape(key)}"):
    blip2_family.to_params({k: v for k, v in sd.items() if k != key}, cfg)
  odd = "qformer.encoder.layer.1.crossattention.attention.query.weight"  # no cross-attention in layer 1
  with pytest.raises(ConversionError, match=f"unexpected keys: {re.escape(odd)}"):
    blip2_family.to_params({**sd, odd: np.zeros((32, 32), np.float32)}, cfg)
  with pytest.raises(ConversionError, match=r"unexpected keys: language_model\."):
    blip2_family.to_params(c.sd, cfg)  # the LLM keys are another family's: ignore them by name
  with pytest.raises(ConversionError, match=r"query_tokens \(1, 6, 32\) -> query_tokens expects \(1, 5, 32\)"):
    blip2_family.to_params({**sd, "query_tokens": np.zeros((1, 6, 32), np.float32)}, cfg)
  w = "qformer.encoder.layer.0.crossattention.attention.value.weight"
  with pytest.raises(ConversionError, match=re.escape(f"{w} (32, 40)")):
    blip2_family.to_params({**sd, w: np.zeros((32, 40), np.float32)}, cfg)
  legacy = _legacy(sd)
  half = {k: v for k, v in legacy.items() if k != "vision_model.encoder.layers.1.self_attn.v_bias"}
  with pytest.raises(ConversionError, match=r"missing keys: vision_model\.encoder\.layers\.1\.self_attn\.v_bias"):
    blip2_family.to_params(half, cfg)
  fused = "vision_model.encoder.layers.1.self_attn.qkv.bias"
  mixed = {**legacy, fused: sd[fused]}
  with pytest.raises(ConversionError, match="mixes the two qkv bias layouts"):
    blip2_family.to_params(mixed, cfg)
  # without the projection: converted when told (or when absent), and query_embeds says why it cannot run
  no_proj = {k: v for k, v in sd.items() if not k.startswith("language_projection.")}
  params, meta = blip2_family.to_params(no_proj, cfg)
  assert meta["language_projection"] is False and "language_projection" not in params
  model = blip2_family.build_model(cfg, meta)
  with pytest.raises(ValueError, match="no language_projection"):
    model.apply({"params": params}, jnp.zeros((1, 28, 28, 3)), method="query_embeds")
  with pytest.raises(ConversionError, match=r"missing keys: language_projection\.bias, language_projection\.weight"):
    blip2_family.to_params(no_proj, cfg, language_projection=True)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(model_type="blip"), "Not a BLIP-2 config"),
    (lambda d: d["vision_config"].update(qkv_bias=False), "qkv_bias=False"),
    (lambda d: d["vision_config"].update(num_attention_heads=5), "not a multiple of num_attention_heads"),
    (lambda d: d["qformer_config"].update(use_qformer_text_input=True), "use_qformer_text_input"),
    (lambda d: d["qformer_config"].update(hidden_act="geluu"), "Unsupported activation 'geluu'"),
    (lambda d: d.update(text_config={"model_type": "t5"}), "text_config has no LLM width"),
    (lambda d: d["vision_config"].update(image_size=[28, 21]), "only square images"),
])
def test_bad_configs_are_clear_errors(change, message):
  d = _hf_config("v48h3l2-img28p7_q32h4l3f2-Q5_t5d24").to_dict()
  change(d)
  with pytest.raises(ConversionError, match=message):
    blip2_family.build_model(d, {"language_projection": True})


def test_config_round_trips_through_transformers():
  import transformers as tf  # pylint: disable=import-outside-toplevel
  for case in CASES:
    hf = _hf_config(case)
    ours = blip2.Blip2Config.from_dict(hf.to_dict())
    ours.validate()
    assert blip2.Blip2Config.from_dict(ours.to_dict()) == ours
    again = tf.Blip2Config.from_dict(ours.to_dict())
    for sub in ("vision_config", "qformer_config"):
      want, got = getattr(hf, sub).to_dict(), getattr(again, sub).to_dict()
      for f in dataclasses.fields(getattr(ours, sub)):
        if f.name != "interpolate_pos_encoding":
          assert got[f.name] == want[f.name], (case, sub, f.name)
    for f in ("num_query_tokens", "image_text_hidden_size", "image_token_index", "initializer_range"):
      assert getattr(again, f) == getattr(hf, f), f
    assert again.text_config.to_dict() == hf.text_config.to_dict()
    assert again.use_decoder_only_language_model == hf.use_decoder_only_language_model
    assert ours.text_hidden_size == hf.text_config.hidden_size
  # HF's defaults are ours; a (h, w) image size pair of equal sides is read as one int
  hf = tf.Blip2Config(text_config=dict(model_type="mt5", d_model=2048)).to_dict()
  assert blip2.Blip2Config.from_dict(hf) == blip2.Blip2Config(text_config=hf["text_config"])
  assert blip2.Blip2VisionConfig.from_dict({"image_size": [224, 224]}).image_size == 224
  for preset in blip2.PRESETS.values():
    preset.validate()


def test_every_param_has_logical_axis_names():
  for case in CASES:
    hf = _hf_config(case).to_dict()
    for proj in (True, False):
      model = blip2_family.build_model(hf, {"language_projection": proj})
      boxed = jax.eval_shape(lambda m=model: blip2.init_params(m, jax.random.PRNGKey(0)))
      assert ("language_projection" in boxed) == proj and boxed["query_tokens"].value.shape[0] == 1
      leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
      assert leaves and all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves)


def test_qformer_dropout_in_training(cases):
  """Train mode: Q-Former dropout (0.1 on the query embeddings, attention probabilities and sub-layer
  outputs) is on, reproducible per key; remat draws the same masks."""
  c = cases("v24h2l1-img16p8_q16h2l2f1-Q3_bloom16")
  px = jnp.asarray(c.inputs["px"])

  @jax.jit
  def train(k1, k2):
    kw = dict(deterministic=False, method="query_embeds")
    return (c.model.apply({"params": c.params}, px, rngs={"dropout": k1}, **kw),
            c.model.apply({"params": c.params}, px, rngs={"dropout": k2}, **kw),
            c.model.clone(remat=True).apply({"params": c.params}, px, rngs={"dropout": k1}, **kw))

  k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  a, b, a_remat = train(k1, k2)
  np.testing.assert_array_equal(a, train(k1, jax.random.PRNGKey(3))[0])
  np.testing.assert_array_equal(a_remat, a)  # remat draws the same masks
  assert _maxdiff(a, b) > 1e-2 and _maxdiff(a, c.outputs["query_embeds"]) > 1e-2


def test_bf16_compute_close_to_torch_fp32(cases):
  c = cases("v48h3l2-img28p7_q32h4l3f2-Q5_t5d24")
  model = c.model.clone(dtype=jnp.bfloat16)
  px = _pixels(2, 28, seed=7)
  out = jax.jit(lambda p, x: model.apply({"params": p}, x))(c.params, jnp.asarray(px))
  assert out["query_embeds"].dtype == jnp.bfloat16
  with torch.no_grad():
    ref = c.tmodel.get_image_features(_nchw(px))
  for got, want in ((out["image_embeds"], ref.last_hidden_state), (out["query_embeds"], ref.pooler_output)):
    rel = _maxdiff(got, want) / float(np.abs(want.numpy()).max())
    assert 1e-4 < rel <= BF16_REL_TOL, rel
