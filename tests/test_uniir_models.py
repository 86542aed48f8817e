"""UniIR models (`models/uniir.py`), their converter (`convert/uniir.py`) and losses (`losses.uniir_*`)
against PyTorch versions of the seed's formulas (TIGER-AI-Lab/UniIR `src/models/uniir_*`), written here
with `transformers` modules: fusion outputs <= 1e-5, the in-batch and momentum-queue losses, the queue
enqueue and the momentum update step by step."""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mmret_jax import convert, losses  # noqa: E402
from mmret_jax.convert import uniir as uniir_family  # noqa: E402

import fixtures  # noqa: E402
from test_blip_convert import to_original  # noqa: E402
from test_clip_convert import hf_to_openai, make_clip  # noqa: E402

F = torch.nn.functional
ATOL = 1e-5
# (query text, query image) presence for queries of every kind, and text / image candidates
FLAGS = np.array([[1, 0], [0, 1], [1, 1], [1, 0], [0, 1], [1, 1]], np.float32)


def _maxdiff(a, b) -> float:
  return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def _inputs(vocab: int, size: int, length: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  b = len(FLAGS)
  ids = rng.integers(5, vocab - 2, (b, length))
  lengths = rng.integers(3, length + 1, b)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int64)
  ids = np.where(mask == 1, ids, 0)
  return ids, mask, rng.standard_normal((b, size, size, 3)).astype(np.float32)


def _ours(sd, hf_config=None):
  inter, cfg = uniir_family.original_to_ours(sd, hf_config=hf_config)
  params, meta = uniir_family.to_params(inter, cfg)
  return uniir_family.build_model(cfg, meta), jax.device_put(params), cfg


def _embed(model, params, ids, mask, px):
  return np.asarray(jax.jit(lambda p: model.apply({"params": p}, ids, mask, px, FLAGS[:, 0], FLAGS[:, 1]))(params))


# ----------------------------------------------------------------------------- CLIP-SF
@pytest.mark.parametrize("source", ["hf", "uniir_checkpoint"])
def test_clip_sf_matches_the_seed_formula(tmp_path, source):
  """e = txt_mask * text features + img_mask * image features (unnormalised), from an HF CLIPModel dir
  (zero-shot) or from a UniIR-layout checkpoint (`clip_model.` + OpenAI keys)."""
  text = dict(hidden_size=64, num_attention_heads=1, num_hidden_layers=2, intermediate_size=96,
              max_position_embeddings=16)
  vision = dict(hidden_size=128, num_attention_heads=2, num_hidden_layers=2, intermediate_size=150, image_size=32,
                patch_size=8)
  tmodel = make_clip(None, text, vision, projection_dim=24)
  sd = {k: v.numpy() for k, v in tmodel.state_dict().items() if not k.endswith("position_ids")}
  if source == "hf":
    model, params, cfg = _ours(sd, hf_config=tmodel.config.to_dict())
  else:
    openai = {f"clip_model.{k}": v.numpy() for k, v in hf_to_openai(tmodel.state_dict()).items()}
    model, params, cfg = _ours(openai)
  assert cfg["fusion"] == "sf" and cfg["backbone"] == "clip"
  ids, mask, px = _inputs(tmodel.config.text_config.vocab_size, 32, 16)
  ids[:, 0] = 0
  # one EOS per row, also the largest id: HF pools at the first EOS, OpenAI CLIP at argmax(ids)
  ids[np.arange(len(ids)), mask.sum(1) - 1] = tmodel.config.text_config.eos_token_id
  with torch.no_grad():
    t = tmodel.get_text_features(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    i = tmodel.get_image_features(pixel_values=torch.tensor(px).permute(0, 3, 1, 2))
    t, i = (getattr(x, "pooler_output", x) for x in (t, i))
    want = (torch.tensor(FLAGS[:, :1]) * t + torch.tensor(FLAGS[:, 1:]) * i).numpy()
  got = _embed(model, params, ids, mask, px)
  assert _maxdiff(got, want) <= ATOL and float(np.abs(want).max()) > 0.1
  np.testing.assert_array_equal(got[1], _embed(model, params, ids, mask, px)[1])


# ----------------------------------------------------------------------------- CLIP-FF
def test_clip_ff_matches_the_seed_formula():
  """Text tokens after ln_final (causal, no padding mask) ; every image token through ln_post and proj ;
  a 2-layer T5Stack (no mask) ; mean over all positions. The checkpoint in the seed's layout:
  `clip_model.` + OpenAI keys without text_projection, `t5_layers.` + T5Stack keys."""
  import transformers as tf  # pylint: disable=import-outside-toplevel
  text = dict(hidden_size=64, num_attention_heads=1, num_hidden_layers=2, intermediate_size=96,
              max_position_embeddings=16)
  vision = dict(hidden_size=128, num_attention_heads=2, num_hidden_layers=1, intermediate_size=150, image_size=32,
                patch_size=8)
  tmodel = make_clip(None, text, vision, projection_dim=64)
  t5_cfg = tf.T5Config(num_layers=2, num_decoder_layers=2, num_heads=4, d_model=64, d_kv=16, d_ff=96)
  stack = fixtures.randomize_(tf.models.t5.modeling_t5.T5Stack(t5_cfg), seed=5)
  with torch.no_grad():
    for name, p in stack.named_parameters():
      if "relative_attention_bias" in name or "layer_norm" in name:
        p.copy_((1.0 if "layer_norm" in name else 0.0) + 0.3 * torch.randn_like(p))
  sd = {f"clip_model.{k}": v.numpy() for k, v in hf_to_openai(tmodel.state_dict()).items() if k != "text_projection"}
  sd.update({f"t5_layers.{k}": v.numpy() for k, v in stack.state_dict().items()})
  model, params, cfg = _ours(sd)
  assert (cfg["backbone"], cfg["fusion"]) == ("clip", "ff") and "text_projection" not in params["clip"]
  ids, _, px = _inputs(tmodel.config.text_config.vocab_size, 32, 16, seed=2)
  mask = np.ones_like(ids)
  with torch.no_grad():
    t = tmodel.text_model(input_ids=torch.tensor(ids)).last_hidden_state
    v = tmodel.vision_model(pixel_values=torch.tensor(px).permute(0, 3, 1, 2)).last_hidden_state
    v = tmodel.vision_model.post_layernorm(v) @ tmodel.visual_projection.weight.T
    want = stack(inputs_embeds=torch.cat([t, v], dim=1), attention_mask=None,
                 use_cache=False).last_hidden_state.mean(1).numpy()
  got = _embed(model, params, ids, mask, px)
  assert got.shape == (len(FLAGS), 64)
  assert _maxdiff(got, want) <= ATOL and float(np.abs(want).max()) > 0.1


# ----------------------------------------------------------------------------- BLIP-SF / FF
# Seed checkpoints carry no config: heads are read off as width / 64 (BLIP's ViT-L and BERT-base)
TEXT = dict(hidden_size=128, num_attention_heads=2, num_hidden_layers=2, intermediate_size=37,
            max_position_embeddings=24, vocab_size=60)
VISION = dict(hidden_size=64, num_attention_heads=1, num_hidden_layers=2, intermediate_size=50, image_size=32,
              patch_size=8, layer_norm_eps=1e-6)


def make_blip_uniir(fusion: str, embed_dim: int = 40, seed: int = 0):
  """Torch BLIP towers + heads of the seed's BLIP-SF / BLIP-FF, and a state dict in the seed's layout
  (visual_encoder.* original names, text_encoder.*, heads, temp, momentum copies, queues)."""
  import transformers as tf  # pylint: disable=import-outside-toplevel
  vis = fixtures.randomize_(tf.BlipVisionModel(tf.BlipVisionConfig(**VISION)), seed)
  txt_cfg = tf.BlipTextConfig(**TEXT, encoder_hidden_size=VISION["hidden_size"], layer_norm_eps=1e-12)
  txt = fixtures.randomize_(tf.BlipTextModel(txt_cfg, add_pooling_layer=fusion == "ff"), seed + 1)
  torch.manual_seed(seed + 2)
  heads = {"vision_proj": torch.nn.Linear(VISION["hidden_size"], embed_dim),
           "text_proj": torch.nn.Linear(TEXT["hidden_size"], embed_dim)} if fusion == "sf" else {}
  sd = {f"vision_model.{k}": v for k, v in vis.state_dict().items()}
  sd = to_original({k: v.numpy() for k, v in sd.items()})
  sd.update({f"text_encoder.{k}": v.numpy() for k, v in txt.state_dict().items() if not k.endswith("position_ids")})
  for name, lin in heads.items():
    sd[f"{name}.weight"], sd[f"{name}.bias"] = lin.weight.detach().numpy(), lin.bias.detach().numpy()
  sd["temp"] = np.array(0.07, np.float32)
  training_state = {f"{k.split('.')[0]}_m.{k.split('.', 1)[1]}": v for k, v in sd.items() if k != "temp"}
  training_state.update(query_queue=np.zeros((embed_dim, 8), np.float32), cand_queue=np.zeros((embed_dim, 8), np.float32),
                        idx_queue=np.full((1, 8), -100), new_ptr_queue=np.zeros(1, np.int64))
  return vis, txt, heads, {**sd, **training_state}


@pytest.mark.parametrize("fusion", ["sf", "ff"])
def test_blip_fusion_matches_the_seed_formula(fusion):
  vis, txt, heads, sd = make_blip_uniir(fusion)
  model, params, cfg = _ours(sd)
  assert (cfg["backbone"], cfg["fusion"]) == ("blip", fusion)
  assert float(params["temp"]) == pytest.approx(0.07)
  ids, mask, px = _inputs(TEXT["vocab_size"], 32, 12, seed=3)
  t_ids, t_mask = torch.tensor(ids), torch.tensor(mask)
  with torch.no_grad():
    img = vis(torch.tensor(px).permute(0, 3, 1, 2)).last_hidden_state
    if fusion == "sf":  # text mode CLS -> text_proj, ViT CLS -> vision_proj, masked sum
      t = heads["text_proj"](txt(input_ids=t_ids, attention_mask=t_mask).last_hidden_state[:, 0])
      i = heads["vision_proj"](img[:, 0])
      want = (torch.tensor(FLAGS[:, :1]) * t + torch.tensor(FLAGS[:, 1:]) * i).numpy()
    else:  # cross-attention to every image token, mask all ones; pooler output
      out = txt(input_ids=t_ids, attention_mask=t_mask, encoder_hidden_states=img,
                encoder_attention_mask=torch.ones(img.shape[:2], dtype=torch.long))
      want = out.pooler_output.numpy()
  got = _embed(model, params, ids, mask, px)
  assert _maxdiff(got, want) <= ATOL and float(np.abs(want).max()) > 0.1


def test_convert_cli_detects_the_variant(tmp_path):
  from mmret_jax.convert.__main__ import main as convert_main  # pylint: disable=import-outside-toplevel
  import json  # pylint: disable=import-outside-toplevel
  _, _, _, sd = make_blip_uniir("ff")
  torch.save({"model": {k: torch.tensor(v) for k, v in sd.items()}, "epoch": 3}, tmp_path / "blip_ff_large.pth")
  assert convert_main(["to-jax", str(tmp_path / "blip_ff_large.pth"), str(tmp_path / "out"), "--family", "uniir"]) == 0
  meta, hf_config, params, _ = convert.load_any(tmp_path / "out")
  assert meta == {**meta, "family": "uniir", "variant": "blip_ff"} and hf_config["fusion"] == "ff"
  want = uniir_family.to_params(*uniir_family.original_to_ours(sd))[0]
  fixtures.assert_params_equal(params, want)
  import mmret_jax  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="uniir model; embed it with its own pipeline"):
    mmret_jax.load(tmp_path / "out")
  assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "uniir"


def test_blip_checkpoint_keys_are_strict():
  _, _, _, sd = make_blip_uniir("sf")
  bad = {**sd, "visual_encoder.blocks.0.ls1.gamma": np.ones(64, np.float32)}
  with pytest.raises(convert.ConversionError, match=r"unexpected keys in the UniIR BLIP checkpoint: "
                                                    r"visual_encoder\.blocks\.0\.ls1\.gamma"):
    uniir_family.original_to_ours(bad)
  inter, cfg = uniir_family.original_to_ours({k: v for k, v in sd.items() if k != "text_proj.bias"})
  with pytest.raises(convert.ConversionError, match=r"missing keys: text_proj\.bias"):
    uniir_family.to_params(inter, cfg)


# ----------------------------------------------------------------------------- losses
def _emb(b, d, seed):
  return np.random.default_rng(seed).standard_normal((b, d)).astype(np.float32)


def test_inbatch_loss_matches_the_seed():
  q, p = _emb(6, 10, 0), _emb(6, 10, 1)
  scale = np.float32(np.exp(2.6592))
  want = F.cross_entropy(torch.tensor(scale) * F.normalize(torch.tensor(q), dim=-1) @
                         F.normalize(torch.tensor(p), dim=-1).T, torch.arange(6))
  assert abs(float(losses.uniir_inbatch_loss(q, p, scale)) - float(want)) <= ATOL


def seed_queue_step(q, c, q_m, c_m, ids, queues, temp, alpha):
  """The seed's loss + `_dequeue_and_enqueue`, in torch (one process: the gather is the identity)."""
  query_queue, cand_queue, idx_queue, ptr = queues
  q, c = F.normalize(q, dim=-1), F.normalize(c, dim=-1)
  pc_idx = ids.view(-1, 1)
  idx_all = torch.cat([pc_idx.t(), idx_queue.clone()], dim=1)
  pos = torch.eq(pc_idx, idx_all).float()
  sim_targets = pos / pos.sum(1, keepdim=True)
  q_m, c_m = F.normalize(q_m, dim=-1), F.normalize(c_m, dim=-1)
  q_all = torch.cat([q_m.t(), query_queue.clone()], dim=1)
  c_all = torch.cat([c_m.t(), cand_queue.clone()], dim=1)
  t_q2c = alpha * F.softmax(q_m @ c_all / temp, dim=1) + (1 - alpha) * sim_targets
  t_c2q = alpha * F.softmax(c_m @ q_all / temp, dim=1) + (1 - alpha) * sim_targets
  loss_q2c = -torch.sum(F.log_softmax(q @ c_all / temp, dim=1) * t_q2c, dim=1).mean()
  loss_c2q = -torch.sum(F.log_softmax(c @ q_all / temp, dim=1) * t_c2q, dim=1).mean()
  b = q_m.shape[0]
  query_queue[:, ptr:ptr + b], cand_queue[:, ptr:ptr + b], idx_queue[:, ptr:ptr + b] = q_m.T, c_m.T, pc_idx.T
  return (loss_q2c + loss_c2q) / 2, (query_queue, cand_queue, idx_queue, (ptr + b) % idx_queue.shape[1])


def test_queue_loss_and_enqueue_step_by_step():
  d, b, size = 12, 4, 12
  rng = np.random.default_rng(0)
  tq = torch.tensor(rng.standard_normal((d, size)).astype(np.float32))
  tq, tc = F.normalize(tq, dim=0), F.normalize(torch.tensor(rng.standard_normal((d, size)).astype(np.float32)), dim=0)
  t_queues = (tq, tc, torch.full((1, size), -100), 0)
  j_queues = (jnp.asarray(tq.numpy()), jnp.asarray(tc.numpy()), jnp.full((size,), -100, jnp.int32), 0)
  for step in range(5):  # wraps around the queue; ids repeat (duplicates are positives)
    q, c, q_m, c_m = (_emb(b, d, 10 * step + k) for k in range(4))
    ids = np.array([7, 3, 7, 100 + step], np.int32)
    alpha = 0.4 * min(1.0, step / 3)  # the seed's epoch-0 ramp
    want, t_queues = seed_queue_step(*map(torch.tensor, (q, c, q_m, c_m, ids.astype(np.int64))), t_queues, 0.05, alpha)
    got = losses.uniir_queue_loss(q, c, q_m, c_m, jnp.asarray(ids), j_queues[0], j_queues[1], j_queues[2], 0.05, alpha)
    assert abs(float(got) - float(want)) <= ATOL, (step, float(got), float(want))
    j_queues = losses.uniir_enqueue(*j_queues, q_m, c_m, jnp.asarray(ids))
    for a, w in zip(j_queues[:3], t_queues[:3]):
      np.testing.assert_allclose(np.asarray(a).reshape(np.asarray(w).shape), np.asarray(w), atol=ATOL)
    assert int(j_queues[3]) == t_queues[3]
  with pytest.raises(ValueError, match="multiple of the global batch"):
    losses.uniir_enqueue(*j_queues[:3], 0, _emb(5, d, 0), _emb(5, d, 1), jnp.zeros(5, jnp.int32))


def test_momentum_update_step_by_step():
  rng = np.random.default_rng(0)
  online = {"w": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)}
  m_jax = jax.tree.map(np.copy, online)
  m_torch = [torch.tensor(online["w"]), torch.tensor(online["b"])]
  for step in range(3):
    online = jax.tree.map(lambda x: x + 0.1 * np.float32(step + 1), online)
    m_jax = losses.momentum_update(m_jax, online, 0.995)
    m_torch = [pm * 0.995 + torch.tensor(p) * (1 - 0.995) for pm, p in zip(m_torch, (online["w"], online["b"]))]
    np.testing.assert_allclose(np.asarray(m_jax["w"]), m_torch[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(m_jax["b"]), m_torch[1].numpy(), atol=1e-6)
