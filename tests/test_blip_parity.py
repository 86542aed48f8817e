"""BLIP (`models/blip.py`) reproduces Hugging Face `BlipForImageTextRetrieval` (CPU, random weights).

Compared per case: the ViT's `last_hidden_state` (the image tokens the text cross-attends), the image
feature `vision_proj(CLS)`, the text-mode states and feature `text_proj(CLS)`, the multimodal
(cross-attention) states, the ITM logits, and HF's ITC score matrix (`use_itm_head=False`). One image
size per case differs from the config's, so the position grid is resized (HF
`interpolate_pos_encoding=True`, torch bicubic), upwards and downwards.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mmret_jax import convert  # noqa: E402
from mmret_jax.models import vit  # noqa: E402

import fixtures  # noqa: E402

FP32_ATOL = 1e-5
BF16_REL_TOL = 3e-2  # the bound of the BERT / CLIP bf16 parity tests (max|diff| / max|ref|)

# name -> (text config, vision config, image_text_hidden_size, image sizes (the first = config's))
CASES = {
    "t32h4-v48h3-img32p8": (
        dict(vocab_size=101, hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=37,
             max_position_embeddings=40),
        dict(hidden_size=48, num_attention_heads=3, num_hidden_layers=2, intermediate_size=50, image_size=32,
             patch_size=8),
        16, (32, 48)),
    "t30h5-v40h5-img28p7-eps1e-6": (
        dict(vocab_size=77, hidden_size=30, num_attention_heads=5, num_hidden_layers=2, intermediate_size=41,
             max_position_embeddings=24, layer_norm_eps=1e-6),
        dict(hidden_size=40, num_attention_heads=5, num_hidden_layers=3, intermediate_size=30, image_size=28,
             patch_size=7, layer_norm_eps=1e-6),
        12, (28, 21)),
    "t36h9-v54h6-img24p6-1layer": (
        dict(vocab_size=64, hidden_size=36, num_attention_heads=9, num_hidden_layers=1, intermediate_size=20,
             max_position_embeddings=16),
        dict(hidden_size=54, num_attention_heads=6, num_hidden_layers=1, intermediate_size=44, image_size=24,
             patch_size=6),
        20, (24, 30)),
}


def make_hf_blip(path, case: str, seed: int = 0):
  """A random-weight HF BlipForImageTextRetrieval saved at `path` (fixtures.make_blip_dir)."""
  tcfg, vcfg, width, _ = CASES[case]
  return fixtures.make_blip_dir(path, tcfg, vcfg, width, seed=seed, with_processor=False)[0]


@pytest.fixture(scope="module")
def blip_dirs(tmp_path_factory):
  made = {}

  def get(case):
    if case not in made:
      path = tmp_path_factory.mktemp(case)
      made[case] = (path, make_hf_blip(path, case))
    return made[case]
  return get


def inputs(case: str, size: int, seed: int = 0):
  tcfg = CASES[case][0]
  rng = np.random.default_rng(seed)
  px = rng.standard_normal((3, size, size, 3)).astype(np.float32)
  ids = rng.integers(3, tcfg["vocab_size"], (3, 9))
  mask = np.ones_like(ids)
  mask[1, 6:] = 0
  mask[2, 3:] = 0
  return px, ids, mask


def torch_outputs(model, px, ids, mask, interpolate: bool) -> dict[str, np.ndarray]:
  t_px = torch.tensor(px).permute(0, 3, 1, 2)
  t_ids, t_mask = torch.tensor(ids), torch.tensor(mask)
  with torch.no_grad():
    img = model.vision_model(t_px, interpolate_pos_encoding=interpolate).last_hidden_state
    text = model.text_encoder(input_ids=t_ids, attention_mask=t_mask).last_hidden_state
    mm = model.text_encoder(input_ids=t_ids, attention_mask=t_mask, encoder_hidden_states=img).last_hidden_state
    itc = model(input_ids=t_ids, attention_mask=t_mask, pixel_values=t_px, use_itm_head=False,
                interpolate_pos_encoding=interpolate).itm_score
    itm = model(input_ids=t_ids, attention_mask=t_mask, pixel_values=t_px, use_itm_head=True,
                interpolate_pos_encoding=interpolate).itm_score
    out = {"image_embeds": img, "image_feat": model.vision_proj(img[:, 0]), "text_states": text,
           "text_feat": model.text_proj(text[:, 0]), "multimodal_states": mm, "itm_logits": itm, "itc": itc}
  return {k: v.numpy() for k, v in out.items()}


def our_outputs(model, params, px, ids, mask) -> dict[str, jax.Array]:
  @jax.jit
  def run(params, px, ids, mask):
    p = {"params": params}
    img = model.apply(p, px, method="image_embeds")
    text = model.apply(p, ids, mask, method=lambda m, i, a: m.text_encoder(i, a)["last_hidden_state"])
    mm = model.apply(p, ids, mask, img, method=lambda m, i, a, e: m.text_encoder(
        i, a, encoder_hidden_states=e)["last_hidden_state"])
    image_feat = model.apply(p, px, method="get_image_features")
    text_feat = model.apply(p, ids, mask, method="get_text_features")
    norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    return {"image_embeds": img, "image_feat": image_feat, "text_states": text, "text_feat": text_feat,
            "multimodal_states": mm, "itm_logits": model.apply(p, ids, mask, img, method="itm_logits"),
            "itc": norm(image_feat.astype(jnp.float32)) @ norm(text_feat.astype(jnp.float32)).T}
  return run(params, jnp.asarray(px), jnp.asarray(ids), jnp.asarray(mask))


def _load(path, dtype=jnp.float32):
  meta, hf_config, params, on_the_fly = convert.load_any(path)
  assert on_the_fly and meta["family"] == "blip" and meta["itm_head"]
  return convert.build_model(meta, hf_config, dtype=dtype), jax.device_put(params)


def _maxdiff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_parity_with_hf(blip_dirs, case):
  path, tmodel = blip_dirs(case)
  model, params = _load(path)
  base = CASES[case][3][0]
  for size in CASES[case][3]:
    px, ids, mask = inputs(case, size, seed=size)
    ref = torch_outputs(tmodel, px, ids, mask, interpolate=size != base)
    out = our_outputs(model, params, px, ids, mask)
    for k in ref:
      assert out[k].shape == ref[k].shape, (k, out[k].shape, ref[k].shape)
      diff = _maxdiff(out[k], ref[k])
      assert diff <= FP32_ATOL, (case, size, k, diff)
      assert float(np.abs(ref[k]).max()) > 0.05, (k, "vacuous comparison")


def test_position_resize_is_torch_bicubic():
  """The resize matrix equals torch.nn.functional.interpolate(bicubic, align_corners=False), both ways."""
  rng = np.random.default_rng(0)
  for g, (h, w) in ((4, (6, 6)), (4, (3, 3)), (14, (24, 24)), (5, (7, 3))):
    table = rng.standard_normal((1 + g * g, 8)).astype(np.float32)
    grid = torch.tensor(table[1:].reshape(1, g, g, 8)).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    want = want.permute(0, 2, 3, 1).reshape(h * w, 8).numpy()
    got = vit.resize_positions(table, (h, w))
    np.testing.assert_array_equal(got[0], table[0])  # the class token's position is kept
    assert _maxdiff(got[1:], want) <= FP32_ATOL  # float32 rounding only (measured <= 1.5e-6)
    got_jax = vit.resize_positions(jnp.asarray(table), (h, w))
    assert _maxdiff(got_jax[1:], want) <= FP32_ATOL


def test_bf16_compute_close_to_torch_fp32(blip_dirs):
  case = "t32h4-v48h3-img32p8"
  path, tmodel = blip_dirs(case)
  model, params = _load(path, dtype=jnp.bfloat16)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))
  px, ids, mask = inputs(case, 32, seed=7)
  ref = torch_outputs(tmodel, px, ids, mask, interpolate=False)
  out = our_outputs(model, params, px, ids, mask)
  assert out["image_embeds"].dtype == out["text_states"].dtype == jnp.bfloat16
  rels = {k: _maxdiff(out[k], ref[k]) / float(np.abs(ref[k]).max()) for k in ref}
  assert max(rels.values()) <= BF16_REL_TOL, rels
  assert _maxdiff(out["image_feat"], ref["image_feat"]) > 1e-4  # bf16 really in use


def test_enc_token_replaces_cls_for_itm(blip_dirs):
  """`replace_cls_with_enc` = the original BLIP ITM pass: HF's ITM on ids with [ENC] put first."""
  case = "t32h4-v48h3-img32p8"
  path, tmodel = blip_dirs(case)
  model, params = _load(path)
  model = model.clone(config=model.config.__class__(**{**model.config.__dict__, "enc_token_id": 99}))
  px, ids, mask = inputs(case, 32, seed=3)
  enc_ids = ids.copy()
  enc_ids[:, 0] = 99
  ref = torch_outputs(tmodel, px, enc_ids, mask, interpolate=False)["itm_logits"]
  p = {"params": params}
  img = model.apply(p, jnp.asarray(px), method="image_embeds")
  got = model.apply(p, jnp.asarray(ids), jnp.asarray(mask), img, replace_cls_with_enc=True, method="itm_logits")
  assert _maxdiff(got, ref) <= FP32_ATOL
