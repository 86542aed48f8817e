"""BagFormer (`models/bagformer.py`), ALBEF's split BERT (`bert.BertModel` modes) and the converter
(`convert/bagformer.py`) against PyTorch references of the seed's formulas (howard-hou/BagFormer
`models/model_retrieval_bagwise.py`, ALBEF `models/xbert.py`), written here with `transformers` modules:

- text mode = HF `BertModel` holding the first fusion_layer layers; fusion mode = HF `BertLayer`s with
  cross-attention (decoder config, called with a non-causal additive mask, as xbert) holding the rest;
  the ViT = HF `BlipVisionModel` (ALBEF's timm ViT has BLIP's layout);
- bag features = torch `F.embedding_bag(..., mode="sum")` over flattened, batch-min-truncated offsets with
  empty bags (a repeated offset, an offset equal to the row length); early fusion = the seed's
  `embedbag_early_fusion` (embeddings -> bag sums -> `inputs_embeds` through the text layers);
- the converter reads the seed layout (momentum copies, queues, MLM head ignored by name; `bert.` stripped),
  is strict, resizes `pos_embed` as ALBEF's `interpolate_pos_embed`, and round-trips bitwise.
Every comparison is fp32, max |diff| <= 1e-5.
"""

from __future__ import annotations

import dataclasses
import json
import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mmret_jax import convert  # noqa: E402
from mmret_jax.convert import bagformer as bagformer_family  # noqa: E402
from mmret_jax.convert.__main__ import main as convert_main  # noqa: E402
from mmret_jax.convert.core import read_converted  # noqa: E402
from mmret_jax.models import bagformer, bert  # noqa: E402

import fixtures  # noqa: E402
from test_blip_convert import to_original  # noqa: E402

F = torch.nn.functional
ATOL = 1e-5
# Seed checkpoints carry no config: heads are read off as width / 64 (ALBEF's ViT-B and BERT-base).
WIDTH, TEXT_LAYERS, FUSION, VOCAB, MAX_POS, EMBED = 128, 4, 2, 60, 24, 40
VISION = dict(hidden_size=WIDTH, intermediate_size=96, num_hidden_layers=2, image_size=32, patch_size=16,
              layer_norm_eps=1e-6, hidden_act="gelu")
B, L = 4, 10
MOMENTUM = ("visual_encoder.", "vision_proj.", "text_encoder.", "text_proj.")  # the seed's momentum pairs


def _maxdiff(a, b) -> float:
  return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def _np(sd) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in sd.items() if not k.endswith("position_ids")}


class SeedModel:
  """Torch BagFormer pieces (HF modules, random weights) + their state dict in the seed's key layout."""

  def __init__(self, text_heads: int = WIDTH // 64, vision_heads: int = WIDTH // 64, seed: int = 0):
    import transformers as tf  # pylint: disable=import-outside-toplevel
    self.vis = fixtures.randomize_(tf.BlipVisionModel(tf.BlipVisionConfig(**VISION, num_attention_heads=vision_heads)),
                                   seed)
    kw = dict(vocab_size=VOCAB, hidden_size=WIDTH, num_attention_heads=text_heads, intermediate_size=80,
              max_position_embeddings=MAX_POS, type_vocab_size=2, layer_norm_eps=1e-12)
    self.text = fixtures.randomize_(tf.BertModel(tf.BertConfig(**kw, num_hidden_layers=FUSION),
                                                 add_pooling_layer=False), seed + 1)
    xcfg = tf.BertConfig(**kw, num_hidden_layers=TEXT_LAYERS - FUSION, is_decoder=True, add_cross_attention=True)
    xcfg._attn_implementation = "eager"  # pylint: disable=protected-access
    self.fusion = fixtures.randomize_(torch.nn.ModuleList(
        [tf.models.bert.modeling_bert.BertLayer(xcfg, layer_idx=i) for i in range(TEXT_LAYERS - FUSION)]), seed + 2)
    torch.manual_seed(seed + 3)
    self.vision_proj, self.text_proj = torch.nn.Linear(WIDTH, EMBED), torch.nn.Linear(WIDTH, EMBED)
    self.itm_head = torch.nn.Linear(WIDTH, 2)

  def state_dict(self) -> dict[str, np.ndarray]:
    """The non-momentum weights, as `train_muge.py` saves them (timm ViT names, HF BERT names)."""
    sd = to_original({f"vision_model.{k}": v for k, v in _np(self.vis.state_dict()).items()})
    sd.update({f"text_encoder.{k}": v for k, v in _np(self.text.state_dict()).items()})
    for j, layer in enumerate(self.fusion):
      sd.update({f"text_encoder.encoder.layer.{FUSION + j}.{k}": v for k, v in _np(layer.state_dict()).items()})
    for name in ("vision_proj", "text_proj", "itm_head"):
      lin = getattr(self, name)
      sd[f"{name}.weight"], sd[f"{name}.bias"] = lin.weight.detach().numpy(), lin.bias.detach().numpy()
    sd["temp"] = np.array(0.07, np.float32)
    return sd

  def checkpoint(self, bert_prefix: bool = False) -> dict[str, np.ndarray]:
    """What a seed / ALBEF checkpoint holds: + momentum copies, queues, MLM head, position_ids buffers."""
    sd = self.state_dict()
    extra = {f"{k.split('.')[0]}_m.{k.split('.', 1)[1]}": v for k, v in sd.items()
             if k.startswith(MOMENTUM)}
    extra.update(image_queue=np.ones((EMBED, 8), np.float32), text_queue=np.ones((EMBED, 8), np.float32),
                 idx_queue=np.full((1, 8), -100), queue_ptr=np.zeros(1, np.int64),
                 **{"text_encoder.cls.predictions.bias": np.zeros(VOCAB, np.float32),
                    "text_encoder.cls.predictions.transform.dense.weight": np.zeros((WIDTH, WIDTH), np.float32),
                    "text_encoder.embeddings.position_ids": np.arange(MAX_POS)[None],
                    "text_encoder_m.embeddings.position_ids": np.arange(MAX_POS)[None]})
    sd = {**sd, **extra}
    if bert_prefix:  # ALBEF pretraining checkpoints: text_encoder.bert.embeddings...
      sd = {k.replace("text_encoder.", "text_encoder.bert.", 1) if k.startswith("text_encoder.") and
            not k.startswith("text_encoder.cls.") else
            k.replace("text_encoder_m.", "text_encoder_m.bert.", 1) if k.startswith("text_encoder_m.") else k: v
            for k, v in sd.items()}
    return sd

  # ---- the seed's formulas
  def image_embeds(self, px):
    return self.vis(torch.tensor(px).permute(0, 3, 1, 2)).last_hidden_state

  def text_embeds(self, ids, mask):
    return self.text(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state

  def fuse(self, text_embeds, text_mask, image_embeds):
    """xbert mode 'fusion': layers >= fusion_layer, additive masks (0 / -10000), image mask all ones."""
    h = text_embeds
    ext = (1.0 - torch.tensor(text_mask, dtype=torch.float32))[:, None, None, :] * -10000.0
    enc = torch.zeros(image_embeds.shape[0], 1, 1, image_embeds.shape[1])
    for layer in self.fusion:
      h = layer(h, ext, image_embeds, encoder_attention_mask=enc)
    return h

  def itm_logits(self, text_embeds, text_mask, image_embeds):
    return self.itm_head(self.fuse(text_embeds, text_mask, image_embeds)[:, 0])

  def bag_feats(self, states, offsets, bag_mask):
    """`embedbag_late_fusion` + the forward's masking."""
    b, n, d = states.shape
    bags = F.embedding_bag(torch.arange(b * n), states.reshape(-1, d), torch.tensor(offsets), mode="sum")
    return F.normalize(self.text_proj(bags.view(b, -1, d)), dim=-1) * torch.tensor(bag_mask)[..., None]

  def early_fusion(self, ids, offsets, bag_mask):
    """`embedbag_early_fusion`: (text_feat, text_feats (masked as the forward does), text_embeds)."""
    e = self.text.embeddings(input_ids=torch.tensor(ids))
    b, n, d = e.shape
    bags = F.embedding_bag(torch.arange(b * n), e.reshape(-1, d), torch.tensor(offsets), mode="sum").view(b, -1, d)
    h = self.text(inputs_embeds=bags, attention_mask=torch.tensor(bag_mask).long()).last_hidden_state
    feats = F.normalize(self.text_proj(h), dim=-1)
    return feats[:, 0], feats * torch.tensor(bag_mask)[..., None], h


def make_bags(seed: int = 0):
  """Per-row bag starts as the seed's `pad_offsets` makes them (ascending, first 0; a repeated start = an
  empty bag; one start equal to L, in the last row too), cut to the batch-minimum count K and flattened as
  o + b * L; the bag index of every token by the model's formula; a bag mask."""
  rows = [[0, 1, 3, 3, 5, 7, 8, 9], [0, 2, 4, 6, 6, 10, 10], [0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 3, 5, 8, 10, 10, 10]]
  k = min(len(r) for r in rows)
  flat = [o + b * L for b, r in enumerate(rows) for o in r[:k]]
  index = np.array([[sum(o <= t for o in r[:k]) - 1 for t in range(L)] for r in rows], np.int32)
  mask = np.random.default_rng(seed).integers(0, 2, (B, k)).astype(np.float32)
  mask[:, 1] = 1
  return flat, index, mask


def inputs(seed: int = 0, size: int = 32):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, VOCAB, (B, L))
  lengths = np.array([L, 7, 4, L - 1])
  mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int64)
  ids = np.where(mask == 1, ids, 0)
  ids[:, 0] = 2
  return ids, mask, rng.standard_normal((B, size, size, 3)).astype(np.float32)


def ours(sd, **kw):
  inter, cfg = bagformer_family.original_to_ours(sd, quiet=True, **kw)
  params, _ = bagformer_family.to_params(inter, cfg)
  return bagformer_family.build_model(cfg, {}), jax.device_put(params), cfg


def run(model, params, method, *args):
  return jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=method))(params, *args)


@pytest.fixture(scope="module")
def seed_model():
  return SeedModel()


@pytest.fixture(scope="module")
def converted(seed_model):
  return ours(seed_model.checkpoint())


# ----------------------------------------------------------------------------- model parity
def test_towers_and_itm_match_the_seed(seed_model, converted):
  model, params, cfg = converted
  assert cfg["text_config"]["fusion_layer"] == FUSION and model.config.text.num_attention_heads == 2
  ids, mask, px = inputs()
  with torch.no_grad():
    img_t = seed_model.image_embeds(px)
    txt_t = seed_model.text_embeds(ids, mask)
    want = {"image_embeds": img_t, "text_embeds": txt_t,
            "image_feats": F.normalize(seed_model.vision_proj(img_t), dim=-1),
            "text_feat": F.normalize(seed_model.text_proj(txt_t[:, 0]), dim=-1),
            "token_feats": F.normalize(seed_model.text_proj(txt_t), dim=-1),  # the tokenwise baseline
            "itm": seed_model.itm_logits(txt_t, mask, img_t),
            # every fusion state, not only CLS: the fusion layers themselves
            "fused": seed_model.fuse(txt_t, mask, img_t)}
  img = run(model, params, bagformer.BagFormer.image_embeds, px)
  txt = run(model, params, bagformer.BagFormer.text_embeds, ids, mask)
  fusion = lambda mdl, t, m, i: mdl.text_encoder(None, m, encoder_hidden_states=i, mode="fusion",
                                                  encoder_embeds=t)["last_hidden_state"]
  fused = run(model, params, fusion, txt, mask, img)
  got = {"image_embeds": img, "text_embeds": txt,
         "image_feats": run(model, params, bagformer.BagFormer.image_feats, img),
         "text_feat": run(model, params, bagformer.BagFormer.text_feat, txt),
         "token_feats": run(model, params, bagformer.BagFormer.token_feats, txt),
         "itm": run(model, params, bagformer.BagFormer.itm_logits, txt, mask, img), "fused": fused}
  for k, w in want.items():
    assert got[k].shape == tuple(w.shape), k
    assert _maxdiff(got[k], w.numpy()) <= ATOL, (k, _maxdiff(got[k], w.numpy()))
  assert got["itm"].dtype == jnp.float32 and float(np.abs(want["itm"].numpy()).max()) > 0.1
  # the full forward (what init runs) gives the same values
  out = jax.jit(lambda p: model.apply({"params": p}, ids, px, mask))(params)
  assert _maxdiff(out["itm_logits"], want["itm"].numpy()) <= ATOL and float(out["temp"]) == pytest.approx(0.07)


def test_bag_feats_equal_embedding_bag(seed_model, converted):
  model, params, _ = converted
  offsets, index, bag_mask = make_bags()
  ids, mask, _ = inputs(seed=1)
  with torch.no_grad():
    txt_t = seed_model.text_embeds(ids, mask)
    want = seed_model.bag_feats(txt_t, offsets, bag_mask).numpy()
  txt = run(model, params, bagformer.BagFormer.text_embeds, ids, mask)
  got = run(model, params, bagformer.BagFormer.bag_feats, txt, index, bag_mask)
  assert got.shape == want.shape == (B, bag_mask.shape[1], EMBED)
  assert _maxdiff(got, want) <= ATOL
  # the empty bags (repeated starts, a start at L) are text_proj(0) normalised, masked
  states = bagformer.bag_sum(jnp.asarray(txt_t.numpy()), jnp.asarray(index), bag_mask.shape[1])
  ref = F.embedding_bag(torch.arange(B * L), txt_t.reshape(-1, WIDTH), torch.tensor(offsets), mode="sum")
  assert _maxdiff(states, ref.view(B, -1, WIDTH).numpy()) <= ATOL
  assert float(np.abs(np.asarray(states)[0, 2]).max()) == 0.0 and float(np.abs(np.asarray(states)[3, 4]).max()) == 0.0


def test_early_fusion_matches_the_seed(seed_model, converted):
  model, params, _ = converted
  offsets, index, bag_mask = make_bags(seed=2)
  bag_mask[:, 0] = 0  # the CLS bag is masked, as the seed's bag mask
  ids, _, px = inputs(seed=2)
  with torch.no_grad():
    want = seed_model.early_fusion(ids, offsets, bag_mask)
    img_t = seed_model.image_embeds(px)
    itm_want = seed_model.itm_logits(want[2], bag_mask, img_t).numpy()
  got = jax.jit(lambda p: model.apply({"params": p}, ids, index, bag_mask,
                                      method=bagformer.BagFormer.early_fusion_text))(params)
  for name, g, w in zip(("text_feat", "text_feats", "text_embeds"), got, want):
    assert g.shape == tuple(w.shape) and _maxdiff(g, w.numpy()) <= ATOL, name
  img = run(model, params, bagformer.BagFormer.image_embeds, px)
  assert _maxdiff(run(model, params, bagformer.BagFormer.itm_logits, got[2], bag_mask, img), itm_want) <= ATOL


def test_every_param_has_logical_axis_names(converted):
  model = converted[0]
  boxed = jax.eval_shape(lambda: bagformer.init_params(model, jax.random.PRNGKey(0)))
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves)
  layers = nn.unbox(boxed)["text_encoder"]["encoder"]
  assert [("crossattention" in layers[f"layer_{i}"]) for i in range(TEXT_LAYERS)] == [False, False, True, True]
  preset = bagformer.PRESETS["base"]
  assert (preset.vision.image_size, preset.text.vocab_size, preset.text.fusion_layer, preset.embed_dim) == \
      (256, 21128, 6, 256)


# ----------------------------------------------------------------------------- BertModel modes / config
def test_bert_config_fusion_layer_round_trips_and_modes_check():
  c = bert.BertConfig(num_hidden_layers=4, add_cross_attention=True, fusion_layer=2, encoder_width=64)
  assert c.to_dict()["fusion_layer"] == 2 and bert.BertConfig.from_dict(c.to_dict()) == c
  assert "fusion_layer" not in bert.BertConfig().to_dict()  # configs without it are written as before
  assert (c.layer_range("text"), c.layer_range("fusion"), c.layer_range("multi_modal")) == ((0, 2), (2, 4), (0, 4))
  with pytest.raises(ValueError, match="fusion_layer 5 is outside"):
    bert.BertConfig(num_hidden_layers=4, fusion_layer=5)
  with pytest.raises(ValueError, match="needs config.fusion_layer"):
    bert.BertConfig().layer_range("text")
  with pytest.raises(ValueError, match="not one of"):
    c.layer_range("image")
  model = bert.BertModel(dataclasses.replace(c, hidden_size=32, num_attention_heads=2, intermediate_size=8,
                                             vocab_size=20, encoder_width=32), add_pooling_layer=False)
  ids = jnp.ones((1, 3), jnp.int32)
  params = jax.eval_shape(lambda: bert.init_params(model, jax.random.PRNGKey(0)))
  with pytest.raises(ValueError, match="mode 'fusion' takes encoder_embeds alone; got input_ids"):
    model.apply({"params": params}, ids, mode="fusion")
  with pytest.raises(ValueError, match="pass encoder_hidden_states"):
    model.apply({"params": params}, None, mode="fusion", encoder_embeds=jnp.zeros((1, 3, 32)))


# ----------------------------------------------------------------------------- converter
def test_checkpoint_layouts_convert_alike(seed_model, converted, tmp_path, capsys):
  """{"model": sd} through the CLI, reported ignored keys; `bert.`-prefixed keys give the same params."""
  _, params, cfg = converted
  pth = tmp_path / "checkpoint_05.pth"
  torch.save({"model": {k: torch.tensor(v) for k, v in seed_model.checkpoint(bert_prefix=True).items()},
              "epoch": 5}, pth)
  assert convert_main(["to-jax", str(pth), str(tmp_path / "out"), "--family", "bagformer"]) == 0
  err = capsys.readouterr().err
  n_momentum = len([k for k in seed_model.state_dict() if k.startswith(MOMENTUM)])
  assert f"bagformer: ignored {n_momentum + 4 + 2 + 2} keys by name ({n_momentum + 1} momentum copies, 4 queues, " \
         f"2 MLM head, 1 position_ids buffers)" in err
  meta, hf_config, got = read_converted(tmp_path / "out")
  assert meta["family"] == "bagformer" and hf_config == cfg
  fixtures.assert_params_equal(got, jax.device_get(params))
  # to-hf writes the seed's names; reading them back (model_type bagformer, no --family) is bitwise
  assert convert_main(["to-hf", str(tmp_path / "out"), str(tmp_path / "seed")]) == 0
  meta2, _, again = convert.convert_in_memory(tmp_path / "seed")
  assert meta2["family"] == "bagformer"
  fixtures.assert_params_equal(again, jax.device_get(params))


def test_to_state_dict_round_trips(seed_model, converted):
  _, params, cfg = converted
  back = bagformer_family.to_state_dict(jax.device_get(params), cfg, {})
  want = seed_model.state_dict()
  assert sorted(back) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(back[k], want[k], err_msg=k)


def test_config_from_file_sets_heads(tmp_path):
  """--config fixes what the weights cannot say (heads): parity with a 4-head torch model."""
  seed4 = SeedModel(text_heads=4, vision_heads=4, seed=5)
  cfg = bagformer.BagFormerConfig.from_dict(ours(seed4.checkpoint())[2])
  cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_attention_heads=4),
                            vision=dataclasses.replace(cfg.vision, num_attention_heads=4))
  (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
  torch.save({k: torch.tensor(v) for k, v in seed4.checkpoint().items()}, tmp_path / "bare.pth")
  _, hf_config, params = convert.convert_in_memory(tmp_path / "bare.pth", family="bagformer",
                                                   config=tmp_path / "config.json")
  model = bagformer_family.build_model(hf_config, {})
  assert model.config == cfg
  ids, mask, px = inputs(seed=4)
  with torch.no_grad():
    img_t = seed4.image_embeds(px)
    txt_t = seed4.text_embeds(ids, mask)
    want = seed4.itm_logits(txt_t, mask, img_t).numpy()
  got = jax.jit(lambda p: model.apply({"params": p}, ids, px, mask))(params)["itm_logits"]
  assert _maxdiff(got, want) <= ATOL


def test_pos_embed_resized_as_albef():
  """A 2x2 grid checkpoint converted for 48 px inputs (3x3): ALBEF's `interpolate_pos_embed` (bicubic)."""
  sd = SeedModel(seed=7).checkpoint()
  _, params, cfg = ours(sd, image_size=48)
  assert cfg["vision_config"]["image_size"] == 48
  pos = torch.tensor(sd["visual_encoder.pos_embed"])
  grid = pos[:, 1:].reshape(1, 2, 2, WIDTH).permute(0, 3, 1, 2)
  grid = F.interpolate(grid, size=(3, 3), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(1, 2)
  want = torch.cat([pos[:, :1], grid], dim=1)[0].numpy()
  got = params["vision_model"]["embeddings"]["position_embedding"]["embedding"]
  assert got.shape == (10, WIDTH) and _maxdiff(got, want) <= ATOL


def test_bad_checkpoints_are_named(seed_model):
  sd = seed_model.checkpoint()
  with pytest.raises(convert.ConversionError, match=r"unexpected keys in the BagFormer checkpoint: "
                                                    r"visual_encoder\.blocks\.0\.ls1\.gamma"):
    ours({**sd, "visual_encoder.blocks.0.ls1.gamma": np.ones(WIDTH, np.float32)})
  with pytest.raises(convert.ConversionError, match=r"unexpected keys: text_encoder\.pooler\.dense\.weight"):
    ours({**sd, "text_encoder.pooler.dense.weight": np.ones((WIDTH, WIDTH), np.float32)})
  with pytest.raises(convert.ConversionError, match=r"missing keys: itm_head\.bias"):
    ours({k: v for k, v in sd.items() if k != "itm_head.bias"})
  bad = {**sd, "text_proj.weight": np.zeros((EMBED, WIDTH + 1), np.float32)}
  with pytest.raises(convert.ConversionError, match=r"shape mismatches: text_proj\.weight \(40, 129\)"):
    ours(bad)
  with pytest.raises(convert.ConversionError, match=r"text_encoder\.bert\.embeddings\.LayerNorm\.bias and "
                                                    r"text_encoder\.embeddings\.LayerNorm\.bias both"):
    ours({**sd, "text_encoder.bert.embeddings.LayerNorm.bias": sd["text_encoder.embeddings.LayerNorm.bias"]})
  no_cross = {k: v for k, v in sd.items() if ".crossattention." not in k}
  with pytest.raises(convert.ConversionError, match="no text_encoder.encoder.layer.N.crossattention"):
    ours(no_cross)
  with pytest.raises(convert.ConversionError, match="Not a BagFormer / ALBEF state dict"):
    ours({k: v for k, v in sd.items() if not k.startswith("visual_encoder.")})
