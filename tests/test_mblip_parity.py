"""mBLIP end to end (models/mblip.py + convert/mblip.py) against a PyTorch reference of the seed's forward,
built here from `transformers` modules: the transformers 4.x legacy BLIP-2 path that mBLIP uses (the
projected query states PREPENDED to the prompt's token embeddings, no placeholder tokens; transformers
5.x changed `Blip2ForConditionalGeneration` to placeholders, so its forward is not the reference).
Tiny random configs, fp32, an mT5 (gated-GELU, untied head) and a BLOOM language model; one and two
images per example (MaRVL)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf

from mmret_jax.convert import core, mblip as mblip_convert
from mmret_jax.models import blip2, mblip

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=16, layer_norm_eps=1e-6)
QFORMER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               cross_attention_frequency=2)
LLMS = {
    "mt5": dict(model_type="mt5", d_model=48, d_ff=96, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=12,
                vocab_size=97, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0,
                pad_token_id=0, eos_token_id=1),
    "bloom": dict(model_type="bloom", hidden_size=48, n_layer=2, n_head=6, vocab_size=97, hidden_dropout=0.0,
                  attention_dropout=0.0),
}
Q = 4


@pytest.fixture(scope="module", params=sorted(LLMS))
def pair(request):
  torch.manual_seed(0)
  cfg = tf.Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=LLMS[request.param],
                       num_query_tokens=Q)
  tmodel = tf.Blip2ForConditionalGeneration(cfg).eval()
  with torch.no_grad():  # non-trivial biases and norms everywhere
    for p in tmodel.parameters():
      p.add_(0.05 * torch.randn_like(p))
  hf_config = cfg.to_dict()
  sd = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
  params, meta = mblip_convert.to_params(sd, hf_config)
  model = mblip.MBlip(blip2.Blip2Config.from_dict(hf_config))
  return request.param, tmodel, model, params, meta, hf_config, sd


def torch_prefix(tmodel, px):
  """The seed's image side: vision -> Q-Former on the learned queries -> projection; [B, (n,) 3, H, W]."""
  lead = px.shape[:-3]
  flat = px.reshape(-1, *px.shape[-3:])
  img = tmodel.vision_model(pixel_values=flat).last_hidden_state
  queries = tmodel.query_tokens.expand(img.shape[0], -1, -1)
  q = tmodel.qformer(query_embeds=queries, encoder_hidden_states=img,
                     encoder_attention_mask=torch.ones(img.shape[:2], dtype=torch.long)).last_hidden_state
  return tmodel.language_projection(q).reshape(lead[0], -1, tmodel.language_projection.out_features)


def inputs(rng, b=3, length=7, n_images=None, left_pad=False):
  shape = (b, 3, 32, 32) if n_images is None else (b, n_images, 3, 32, 32)
  px = rng.standard_normal(shape).astype(np.float32)
  ids = rng.integers(2, 97, (b, length)).astype(np.int64)
  mask = np.ones((b, length), np.int64)
  if left_pad:
    mask[1, :3] = 0
    ids[1, :3] = 3
  else:
    mask[1, -3:] = 0
    ids[1, -3:] = 0
  return px, ids, mask


def nhwc(px):
  return np.moveaxis(px, -3, -1)


@pytest.mark.parametrize("n_images", [None, 2])
def test_logits_and_loss_match_the_seeds_prepend_path(pair, n_images):
  name, tmodel, model, params, _, _, _ = pair
  rng = np.random.default_rng(1)
  px, ids, mask = inputs(rng, n_images=n_images, left_pad=name == "bloom")
  with torch.no_grad():
    prefix = torch_prefix(tmodel, torch.from_numpy(px))
    lm = tmodel.language_model
    embeds = torch.cat([prefix, lm.get_input_embeddings()(torch.from_numpy(ids))], 1)
    full_mask = torch.cat([torch.ones(prefix.shape[:2], dtype=torch.long), torch.from_numpy(mask)], 1)
    if name == "mt5":
      labels = rng.integers(2, 97, (3, 5)).astype(np.int64)
      labels[0, -2:] = -100
      out = lm(inputs_embeds=embeds, attention_mask=full_mask, labels=torch.from_numpy(labels))
      ref_logits, ref_loss = out.logits.numpy(), float(out.loss)
    else:
      labels = np.where(mask == 1, ids, -100)
      labels[:, :2] = -100  # the prompt part
      logits = lm(inputs_embeds=embeds, attention_mask=full_mask).logits[:, -ids.shape[1]:]
      ref_logits = logits.numpy()
      lab = torch.from_numpy(labels)
      ref_loss = float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                         lab[:, 1:].reshape(-1), ignore_index=-100))
  out = model.apply({"params": params}, nhwc(px), ids, mask, labels)
  assert out["logits"].shape == ref_logits.shape
  np.testing.assert_allclose(np.asarray(out["logits"]), ref_logits, atol=1e-4)
  assert float(out["loss"]) == pytest.approx(ref_loss, rel=1e-5)
  # the prefix itself (n images x Q queries, first image first)
  ours = model.apply({"params": params}, nhwc(px), method=model.query_embeds)
  np.testing.assert_allclose(np.asarray(ours), prefix.numpy(), atol=1e-5)
  assert ours.shape[1] == Q * (n_images or 1)


def test_converter_round_trip_and_errors(pair):
  name, _, model, params, meta, hf_config, sd = pair
  back = mblip_convert.to_state_dict(params, hf_config, meta)
  dropped = {k for k in sd if k.endswith("embed_tokens.weight") or k.endswith("lm_head.weight") and name == "bloom"}
  assert set(back) | dropped >= set(sd) and set(back) <= set(sd)
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k], err_msg=k)
  assert meta["llm_family"] == ("t5" if name == "mt5" else "bloom")
  with pytest.raises(core.ConversionError, match="image side of BLIP-2 only"):
    mblip_convert.to_params({k: v for k, v in sd.items() if not k.startswith("language_model.")}, hf_config)
  bad = dict(sd)
  bad["language_model.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(core.ConversionError, match="extra"):
    mblip_convert.to_params(bad, hf_config)
  other = {**hf_config, "text_config": {**hf_config["text_config"], "model_type": "llama"}}
  with pytest.raises(core.ConversionError, match="must be one of"):
    mblip_convert.to_params(sd, other)
  # every param is in the model's tree, with the model's shapes
  shapes = {k: v.shape for k, v in core._flatten(params).items()}  # pylint: disable=protected-access
  init = mblip.init_params(model, __import__("jax").random.PRNGKey(0))
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  want = {k: v.shape for k, v in core._flatten(nn.unbox(init)).items()}  # pylint: disable=protected-access
  assert shapes == want


def test_hf_dir_through_the_command_line_converter(pair, tmp_path):
  """`python -m mmret_jax.convert to-jax` on a saved HF BLIP-2 dir detects mBLIP by model_type; `to-hf`
  writes a dir that transformers loads with the same weights."""
  from mmret_jax import convert  # pylint: disable=import-outside-toplevel
  name, tmodel, model, params, _, _, _ = pair
  src = tmp_path / "hf"
  tmodel.save_pretrained(src)
  info = convert.to_jax(src, tmp_path / "ours")
  assert info["family"] == "mblip"
  meta, hf_config, loaded, _ = convert.load_any(tmp_path / "ours")
  for k, v in core._flatten(params).items():  # pylint: disable=protected-access
    np.testing.assert_array_equal(core._flatten(loaded)[k], v, err_msg=str(k))  # pylint: disable=protected-access
  convert.to_hf(tmp_path / "ours", tmp_path / "back")
  again = tf.Blip2ForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
  for k, v in tmodel.state_dict().items():
    torch.testing.assert_close(again.state_dict()[k], v, rtol=0, atol=0, msg=k)
  assert isinstance(convert.build_model(meta, hf_config), mblip.MBlip)
