"""Numerical parity of `mmret_jax.models.clip.CLIPModel` against Hugging Face `CLIPModel` (CPU, fp32).

Every model has random weights (LayerNorms and all biases randomised too), is written with
`save_pretrained` and reaches our side through `convert.load_any` + `convert.build_model`, so these
tests also exercise the CLIP key map (conv patch kernel included). Widths, head counts and MLP sizes
are deliberately odd; text batches are right-padded with the EOS token right before the padding.
"""

from __future__ import annotations

import os

os.environ["TRANSFORMERS_VERBOSITY"] = "error"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mmret_jax import convert  # noqa: E402
from mmret_jax.models import clip  # noqa: E402

FP32_ATOL = 1e-5  # measured fp32 max|diff|: <= 1.3e-6 on states and features, 2.9e-6 on logits_per_text
# bf16 compute (params fp32, matmuls bf16, softmax / LayerNorm fp32) vs the torch fp32 reference.
# Measured on these tiny random models (outputs up to ~4.5 in magnitude): max|diff| / max|ref| over every
# hidden state, pooled output and projected feature is 1.0e-2 .. 1.5e-2 per case (abs 2.7e-2 .. 3.4e-2).
# Asserted: max|diff| <= 3e-2 * max|ref| (the BERT parity tests' bound; ~2x headroom).
BF16_REL_TOL = 3e-2

# name -> (text config, vision config, projection_dim, text lengths)
CASES = {
    # legacy eos_token_id=2: HF (and OpenAI) pool at argmax(input_ids)
    "t40h5-v48h3-img32p8-eos2": (
        dict(vocab_size=99, hidden_size=40, num_attention_heads=5, num_hidden_layers=2, intermediate_size=67,
             max_position_embeddings=20, eos_token_id=2, bos_token_id=0, pad_token_id=1),
        dict(hidden_size=48, num_attention_heads=3, num_hidden_layers=2, intermediate_size=83, image_size=32,
             patch_size=8),
        24, (13, 9, 4)),
    # modern eos id: the first occurrence of the EOS id is pooled (pad id == eos id, as HF's CLIP tokenizer)
    "t36h3x3-v60h5-img28p7-eos97": (
        dict(vocab_size=99, hidden_size=36, num_attention_heads=3, num_hidden_layers=3, intermediate_size=50,
             max_position_embeddings=16, eos_token_id=97, bos_token_id=96, pad_token_id=97),
        dict(hidden_size=60, num_attention_heads=5, num_hidden_layers=2, intermediate_size=97, image_size=28,
             patch_size=7),
        20, (16, 11, 5, 3)),
    # exact gelu, eps 1e-6, head dims 4 and 9, a 1-channel 30x30 image with 5x5 patches
    "t44h11-v54h6-img30p5c1-gelu": (
        dict(vocab_size=71, hidden_size=44, num_attention_heads=11, num_hidden_layers=2, intermediate_size=45,
             max_position_embeddings=12, eos_token_id=69, bos_token_id=68, pad_token_id=0, hidden_act="gelu",
             layer_norm_eps=1e-6),
        dict(hidden_size=54, num_attention_heads=6, num_hidden_layers=1, intermediate_size=101, image_size=30,
             patch_size=5, num_channels=1, hidden_act="gelu", layer_norm_eps=1e-6),
        17, (12, 3, 7)),
}


def _maxdiff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _np(x) -> np.ndarray:
  return x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)


def make_clip(path, text: dict, vision: dict, projection_dim: int, seed: int = 0):
  """A random HF CLIPModel (LayerNorms and biases randomised), written with save_pretrained."""
  import transformers as tf  # pylint: disable=import-outside-toplevel
  cfg = tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim,
                      logit_scale_init_value=2.3)
  torch.manual_seed(seed)
  model = tf.CLIPModel(cfg)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name or "layrnorm" in name or "layernorm" in name:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.05 * torch.randn_like(p))
      elif name == "vision_model.embeddings.class_embedding":
        p.copy_(torch.randn_like(p))
  model.eval()
  model.save_pretrained(path)
  return model


def text_inputs(cfg, lengths, seed: int = 0) -> dict:
  """Right-padded ids with the EOS right before the padding (mask 0 on the padding).

  eos_token_id == 2 (legacy): the EOS is written as the largest id of the vocabulary (OpenAI's EOT),
  so argmax(ids) finds it. Otherwise the configured EOS id is used, the padding holds pad_token_id,
  and every row also holds ids larger than the EOS id, so argmax pooling would pick a wrong token.
  """
  rng = np.random.default_rng(seed)
  b, n = len(lengths), max(lengths)
  legacy = cfg.eos_token_id == 2
  eos = cfg.vocab_size - 1 if legacy else cfg.eos_token_id
  specials = {cfg.bos_token_id, cfg.pad_token_id, cfg.eos_token_id, eos}
  pool = np.array([i for i in range(cfg.vocab_size) if i not in specials and (not legacy or i < eos)])
  ids = rng.choice(pool, size=(b, n))
  lengths = np.asarray(lengths)
  mask = (np.arange(n)[None, :] < lengths[:, None]).astype(np.int64)
  assert lengths.min() >= 3
  ids[:, 0] = cfg.bos_token_id
  if not legacy:
    high = pool[pool > eos]
    assert len(high)
    ids[:, 1] = rng.choice(high, size=b)  # a larger id than the EOS in every row
  ids = np.where(mask == 1, ids, cfg.pad_token_id)
  ids[np.arange(b), lengths - 1] = eos
  if not legacy:
    assert (ids.argmax(-1) != lengths - 1).all()
  else:
    assert (ids.argmax(-1) == lengths - 1).all()
  assert (mask[:, -1] == 0).any()  # there is padding
  return {"input_ids": ids, "attention_mask": mask, "eos_positions": lengths - 1}


def image_inputs(vcfg, batch: int = 3, seed: int = 0) -> np.ndarray:
  """Random NHWC float images."""
  rng = np.random.default_rng(seed + 100)
  return rng.standard_normal((batch, vcfg.image_size, vcfg.image_size, vcfg.num_channels)).astype(np.float32)


def _features(out) -> torch.Tensor:
  """get_text/image_features: a tensor (transformers 4.x) or an output whose pooler_output is projected (5.x)."""
  return out if isinstance(out, torch.Tensor) else out.pooler_output


def torch_outputs(tmodel, text: dict, images: np.ndarray) -> dict[str, np.ndarray]:
  ids, mask = torch.as_tensor(text["input_ids"]), torch.as_tensor(text["attention_mask"])
  px = torch.as_tensor(images.transpose(0, 3, 1, 2).copy())  # NHWC -> NCHW
  with torch.no_grad():
    t = tmodel.text_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    v = tmodel.vision_model(pixel_values=px, output_hidden_states=True)
    full = tmodel(input_ids=ids, attention_mask=mask, pixel_values=px)
    out = {"text_features": _features(tmodel.get_text_features(input_ids=ids, attention_mask=mask)),
           "image_features": _features(tmodel.get_image_features(pixel_values=px)),
           "text_last_hidden_state": t.last_hidden_state, "text_pooler_output": t.pooler_output,
           "vision_last_hidden_state": v.last_hidden_state, "vision_pooler_output": v.pooler_output,
           "logits_per_text": full.logits_per_text, "logit_scale": tmodel.logit_scale}
    for name, o in (("text", t), ("vision", v)):  # embeddings (vision: after pre_layrnorm), then each block
      out.update({f"{name}_hidden_states_{i}": h for i, h in enumerate(o.hidden_states)})
  return {k: _np(v) for k, v in out.items()}


def _all_outputs(m: clip.CLIPModel, ids, mask, px) -> dict:
  t, vis = m.text_model(ids, mask, output_hidden_states=True), m.vision_model(px, output_hidden_states=True)
  tf, vf = m.get_text_features(ids, mask), m.get_image_features(px)
  te, ie = (x.astype(jnp.float32) for x in (tf, vf))
  te, ie = te / jnp.linalg.norm(te, axis=-1, keepdims=True), ie / jnp.linalg.norm(ie, axis=-1, keepdims=True)
  return {**{f"text_hidden_states_{i}": h for i, h in enumerate(t["hidden_states"])},
          **{f"vision_hidden_states_{i}": h for i, h in enumerate(vis["hidden_states"])},
          "text_features": tf, "image_features": vf,
          "text_last_hidden_state": t["last_hidden_state"], "text_pooler_output": t["pooler_output"],
          "vision_last_hidden_state": vis["last_hidden_state"], "vision_pooler_output": vis["pooler_output"],
          "logits_per_text": jnp.exp(m.logit_scale) * te @ ie.T, "logit_scale": m.logit_scale}


def our_outputs(model, params, text: dict, images: np.ndarray, *, raw: bool = False) -> dict:
  """Every compared output of ours, from one jitted apply (NHWC images); float32 numpy unless `raw`."""
  run = jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=_all_outputs))
  out = run(params, jnp.asarray(text["input_ids"]), jnp.asarray(text["attention_mask"]), jnp.asarray(images))
  return out if raw else {k: np.asarray(x.astype(jnp.float32)) for k, x in out.items()}


def _load(path, **model_kw):
  meta, hf_config, params, on_the_fly = convert.load_any(path)
  assert on_the_fly and meta["family"] == "clip"
  return convert.build_model(meta, hf_config, **model_kw), params


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
  """Lazily built HF CLIP dirs: case -> (path, torch model)."""
  built = {}

  def get(case: str):
    if case not in built:
      text, vision, proj, _ = CASES[case]
      path = tmp_path_factory.mktemp(case)
      built[case] = (path, make_clip(path, text, vision, proj, seed=len(built)))
    return built[case]

  return get


@pytest.mark.parametrize("case", list(CASES))
def test_clip_parity_fp32(clip_dirs, case):
  path, tmodel = clip_dirs(case)
  tc, vc = tmodel.config.text_config, tmodel.config.vision_config
  model, params = _load(path)
  assert isinstance(model, clip.CLIPModel)
  assert model.config.text.eos_token_id == tc.eos_token_id
  assert (model.config.vision.num_channels, model.config.vision.patch_size) == (vc.num_channels, vc.patch_size)
  text = text_inputs(tc, CASES[case][3], seed=1)
  images = image_inputs(vc, seed=2)
  ref = torch_outputs(tmodel, text, images)
  out = our_outputs(model, params, text, images)
  diffs = {k: _maxdiff(out[k], ref[k]) for k in ref}
  assert sorted(out) == sorted(ref)  # hidden states: one per block + the embeddings, both towers
  assert f"text_hidden_states_{tc.num_hidden_layers}" in ref and f"vision_hidden_states_{vc.num_hidden_layers}" in ref
  for k in ref:
    assert out[k].shape == ref[k].shape, k
  assert max(diffs.values()) <= FP32_ATOL, diffs
  # pooled at the EOS right before the padding (first EOS / argmax(ids), depending on the config)
  b = np.arange(len(text["eos_positions"]))
  np.testing.assert_array_equal(out["text_pooler_output"], out["text_last_hidden_state"][b, text["eos_positions"]])
  # __call__ gives the per-tower features and the logit scale
  call = jax.jit(lambda p, i, x, a: model.apply({"params": p}, i, x, a))(
      params, jnp.asarray(text["input_ids"]), jnp.asarray(images), jnp.asarray(text["attention_mask"]))
  np.testing.assert_allclose(np.asarray(call["text_embeds"]), out["text_features"], rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(call["image_embeds"]), out["image_features"], rtol=0, atol=1e-6)
  assert float(call["logit_scale"]) == float(ref["logit_scale"])
  # the outputs are not trivially small: the tolerance means something
  for k in ("text_features", "image_features", "text_last_hidden_state", "vision_last_hidden_state"):
    assert np.abs(ref[k]).max() > 0.3, k


def test_text_padding_does_not_change_real_tokens(clip_dirs):
  """A row alone (unpadded) = the same row padded inside a longer batch, on its real tokens."""
  path, tmodel = clip_dirs("t36h3x3-v60h5-img28p7-eos97")
  model, params = _load(path)
  text = text_inputs(tmodel.config.text_config, (16, 11, 5, 3), seed=3)
  run = jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=lambda m, *b: m.text_model(*b)))
  full = run(params, jnp.asarray(text["input_ids"]), jnp.asarray(text["attention_mask"]))
  alone = run(params, jnp.asarray(text["input_ids"][1:2, :11]), jnp.ones((1, 11), jnp.int32))
  assert _maxdiff(np.asarray(full["last_hidden_state"])[1, :11], alone["last_hidden_state"][0]) <= FP32_ATOL
  assert _maxdiff(np.asarray(full["pooler_output"])[1], alone["pooler_output"][0]) <= FP32_ATOL


@pytest.mark.parametrize("case", ["t36h3x3-v60h5-img28p7-eos97"])  # all three cases measured: see BF16_REL_TOL
def test_bf16_compute_close_to_torch_fp32(clip_dirs, case):
  path, tmodel = clip_dirs(case)
  tc, vc = tmodel.config.text_config, tmodel.config.vision_config
  model, params = _load(path, dtype=jnp.bfloat16)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x: x.dtype == np.float32, params))
  text = text_inputs(tc, CASES[case][3], seed=4)
  images = image_inputs(vc, seed=5)
  ref = torch_outputs(tmodel, text, images)
  raw = our_outputs(model, params, text, images, raw=True)
  assert raw["text_features"].dtype == raw["image_features"].dtype == jnp.bfloat16
  assert raw["vision_last_hidden_state"].dtype == raw["text_last_hidden_state"].dtype == jnp.bfloat16
  out = {k: np.asarray(x.astype(jnp.float32)) for k, x in raw.items()}
  rels = {k: _maxdiff(out[k], ref[k]) / float(np.abs(ref[k]).max())
          for k in ref if k not in ("logit_scale", "logits_per_text")}
  assert max(rels.values()) <= BF16_REL_TOL, rels
  # bf16 is really in use: not bit-identical to fp32
  assert _maxdiff(out["text_features"], ref["text_features"]) > 1e-4
  assert _maxdiff(out["image_features"], ref["image_features"]) > 1e-4


def test_remat_gives_identical_outputs_and_grads(clip_dirs):
  case = "t44h11-v54h6-img30p5c1-gelu"
  path, tmodel = clip_dirs(case)
  tc, vc = tmodel.config.text_config, tmodel.config.vision_config
  plain, params = _load(path)
  remat, params2 = _load(path, remat=True)
  assert remat.remat and not plain.remat
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)
  text = text_inputs(tc, CASES[case][3], seed=6)
  images = image_inputs(vc, seed=7)
  ids, mask, px = (jnp.asarray(text["input_ids"]), jnp.asarray(text["attention_mask"]), jnp.asarray(images))

  def loss(p, m):
    out = m.apply({"params": p}, ids, px, mask)
    return jnp.sum(jnp.square(out["text_embeds"])) + jnp.sum(jnp.square(out["image_embeds"])), out

  (_, a), g1 = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, plain)
  (_, b), g2 = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, remat)
  # On CPU the forward pass is bitwise identical; allow 1e-6 for other backends.
  for k in a:
    np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=0, atol=1e-6, err_msg=k)
  ref = torch_outputs(tmodel, text, images)
  assert _maxdiff(b["text_embeds"], ref["text_features"]) <= FP32_ATOL
  assert _maxdiff(b["image_embeds"], ref["image_features"]) <= FP32_ATOL
  flat1, flat2 = jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)
  assert len(flat1) == len(flat2) > 0
  # Same math, but XLA may fuse the recomputed forward differently: fp32 rounding only. Gradients here
  # reach ~1e2 (the theoretically-zero k_proj bias grads are pure rounding noise), so the bound is
  # relative to the largest gradient (measured max|diff| / max|g|: 1.3e-7 .. 2.8e-7 over seeds).
  scale = max(float(np.abs(np.asarray(x)).max()) for x in flat1)
  assert scale > 1.0
  for x, y in zip(flat1, flat2):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6 * scale)
