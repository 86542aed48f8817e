"""BLIP conversion (`convert/blip.py`) and the embed API on BLIP dirs.

- HF `BlipForImageTextRetrieval` -> ours -> HF is bitwise, and transformers loads the result.
- A missing, an unexpected and a mis-shaped key are errors that name the key.
- An original salesforce/BLIP `.pth` (keys as in model_base.pth: `visual_encoder.*`, `text_encoder.*`,
  heads, plus the momentum encoders, queues, `temp` and `text_decoder` the seed does not load) converts with
  `--family blip`; its 4x4 position grid is resized to the 6x6 of 48 px inputs exactly as torch's bicubic.
- `mmret_jax.load(DIR)`: `encode_image` / `encode_text` = normalised HF features (BlipImageProcessor
  preprocessing), `itm_scores` = softmax of HF's ITM logits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import mmret_jax  # noqa: E402
from mmret_jax import convert, embed  # noqa: E402
from mmret_jax.convert import blip as blip_family  # noqa: E402
from mmret_jax.convert.__main__ import main as convert_main  # noqa: E402

import fixtures  # noqa: E402

TEXT = dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=37,
            max_position_embeddings=40)
VISION = dict(hidden_size=48, num_attention_heads=3, num_hidden_layers=2, intermediate_size=50, image_size=32,
              patch_size=8)
TEXTS = ["a red mug", "tactical gloves for hiking", "the kettle boils fast", "shoes"]


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("blip_hf")
  model, tok, proc = fixtures.make_blip_dir(d, TEXT, VISION, width=16)
  rng = np.random.default_rng(0)
  imgs = []
  for i, (w, h) in enumerate([(40, 32), (64, 48), (33, 90), (32, 32)]):
    p = d / "imgs" / f"im{i}.png"
    p.parent.mkdir(exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
    imgs.append(p)
  return d, model, tok, proc, imgs


def _sd(model) -> dict[str, np.ndarray]:
  return {k: v.numpy() for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def test_hf_round_trip_is_bitwise(blip_dir, tmp_path):
  import transformers as tf  # pylint: disable=import-outside-toplevel
  d, model, _, _, _ = blip_dir
  assert convert_main(["to-jax", str(d), str(tmp_path / "conv")]) == 0
  meta = json.loads((tmp_path / "conv" / "mmret_jax.json").read_text())
  assert meta["family"] == "blip" and meta["itm_head"] is True
  assert convert_main(["to-hf", str(tmp_path / "conv"), str(tmp_path / "hf")]) == 0
  back = tf.BlipForImageTextRetrieval.from_pretrained(tmp_path / "hf").eval()
  want, got = _sd(model), _sd(back)
  assert sorted(want) == sorted(got)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert (tmp_path / "hf" / "preprocessor_config.json").exists() and (tmp_path / "hf" / "tokenizer.json").exists()


def test_strict_keys_are_named(blip_dir):
  d, model, _, _, _ = blip_dir
  hf_config = json.loads((d / "config.json").read_text())
  sd = _sd(model)
  missing = {k: v for k, v in sd.items() if k != "text_proj.bias"}
  with pytest.raises(convert.ConversionError, match=r"missing keys: text_proj\.bias"):
    blip_family.to_params(missing, hf_config)
  extra = {**sd, "vision_model.encoder.layers.0.self_attn.rel_pos": np.zeros(3, np.float32)}
  with pytest.raises(convert.ConversionError, match=r"unexpected keys: vision_model\.encoder\.layers\.0\.self_attn\.rel_pos"):
    blip_family.to_params(extra, hf_config)
  bad = dict(sd)
  bad["vision_model.encoder.layers.1.self_attn.qkv.weight"] = np.zeros((3 * 48, 40), np.float32)
  with pytest.raises(convert.ConversionError,
                     match=r"shape mismatches: vision_model\.encoder\.layers\.1\.self_attn\.qkv\.weight\[0\] \(48, 40\)"):
    blip_family.to_params(bad, hf_config)
  no_qkv = {k: v for k, v in sd.items() if k != "vision_model.encoder.layers.0.self_attn.qkv.bias"}
  with pytest.raises(convert.ConversionError, match=r"vision_model\.encoder\.layers\.0\.self_attn\.qkv\.bias\[0\]"):
    blip_family.to_params(no_qkv, hf_config)


# Original BLIP names (salesforce/BLIP `models/vit.py`, `models/blip_retrieval.py`) -> HF names.
_ORIGINAL = (("vision_model.embeddings.class_embedding", "visual_encoder.cls_token"),
             ("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed"),
             ("vision_model.embeddings.patch_embedding.", "visual_encoder.patch_embed.proj."),
             ("vision_model.post_layernorm.", "visual_encoder.norm."))


def to_original(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for k, v in sd.items():
    for hf, orig in _ORIGINAL:
      if k.startswith(hf):
        k = orig + k[len(hf):]
        break
    else:
      if k.startswith("vision_model.encoder.layers."):
        n, rest = k.split(".")[3], ".".join(k.split(".")[4:])
        rest = (rest.replace("layer_norm1", "norm1").replace("layer_norm2", "norm2")
                .replace("self_attn.projection", "attn.proj").replace("self_attn.qkv", "attn.qkv"))
        k = f"visual_encoder.blocks.{n}.{rest}"
    out[k] = v
  return out


def test_original_pth_converts_with_position_resize(blip_dir, tmp_path):
  d, model, tok, _, _ = blip_dir
  orig = to_original(_sd(model))
  assert {k.split(".")[0] for k in orig} == {"visual_encoder", "text_encoder", "vision_proj", "text_proj",
                                             "itm_head"}
  # what model_base.pth carries besides: momentum encoders, queues, temperature, captioning decoder
  extra = {"visual_encoder_m.cls_token": orig["visual_encoder.cls_token"], "vision_proj_m.weight": orig["vision_proj.weight"],
           "text_encoder_m.embeddings.word_embeddings.weight": orig["text_encoder.embeddings.word_embeddings.weight"],
           "text_proj_m.bias": orig["text_proj.bias"], "image_queue": np.zeros((16, 8), np.float32),
           "text_queue": np.zeros((16, 8), np.float32), "idx_queue": np.zeros((1, 8), np.float32),
           "ptr_queue": np.zeros(1, np.float32), "temp": np.array(0.07, np.float32),
           "text_decoder.cls.predictions.bias": np.zeros(5, np.float32)}
  pth = tmp_path / "model_base.pth"
  torch.save({"model": {k: torch.tensor(v) for k, v in {**orig, **extra}.items()}}, pth)
  out = tmp_path / "conv"
  assert convert_main(["to-jax", str(pth), str(out), "--family", "blip", "--config", str(d / "config.json"),
                       "--image-size", "48", "--tokenizer", str(d)]) == 0
  enc = mmret_jax.load(out)
  assert enc.model.config.vision.image_size == 48 and enc.model.config.vision.num_patches == 36
  rng = np.random.default_rng(1)
  px = rng.standard_normal((2, 48, 48, 3)).astype(np.float32)
  with torch.no_grad():
    img = model.vision_model(torch.tensor(px).permute(0, 3, 1, 2), interpolate_pos_encoding=True).last_hidden_state
    want = torch.nn.functional.normalize(model.vision_proj(img[:, 0]), dim=-1).numpy()
  got = np.asarray(enc._image_forward(enc.params, px, True))  # pylint: disable=protected-access
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  # Anything else is an error naming the key; an HF dir given with --family blip takes the HF path.
  torch.save({"model": {k: torch.tensor(v) for k, v in {**orig, "visual_encoder.blocks.0.gamma": extra["temp"]}.items()}},
             tmp_path / "bad.pth")
  assert convert_main(["to-jax", str(tmp_path / "bad.pth"), str(tmp_path / "bad"), "--family", "blip",
                       "--config", str(d / "config.json")]) == 1
  with pytest.raises(convert.ConversionError, match=r"unexpected keys in the BLIP checkpoint: visual_encoder\.blocks\.0\.gamma"):
    convert.convert_in_memory(tmp_path / "bad.pth", family="blip")
  meta, _, _ = convert.convert_in_memory(d, family="blip")
  assert meta["family"] == "blip"


def test_original_config_read_off_the_weights():
  """Without --config: widths and depths from the weights, heads = width / 64, BLIP's eps and dropout."""
  rng = np.random.default_rng(0)
  w = lambda *s: rng.standard_normal(s).astype(np.float32)
  sd = {"visual_encoder.cls_token": w(1, 1, 128), "visual_encoder.pos_embed": w(1, 1 + 4, 128),
        "visual_encoder.patch_embed.proj.weight": w(128, 3, 16, 16), "visual_encoder.patch_embed.proj.bias": w(128),
        "visual_encoder.blocks.0.mlp.fc1.weight": w(512, 128),
        "text_encoder.embeddings.word_embeddings.weight": w(30524, 64),
        "text_encoder.embeddings.position_embeddings.weight": w(512, 64),
        "text_encoder.encoder.layer.0.crossattention.self.key.weight": w(64, 128),
        "text_encoder.encoder.layer.0.intermediate.dense.weight": w(256, 64), "vision_proj.weight": w(256, 128)}
  out, cfg = blip_family.original_to_hf(sd)
  assert out["vision_model.embeddings.position_embedding"].shape == (1, 1 + 24 * 24, 128)  # 2x2 -> 24x24 at 384
  v, t = cfg["vision_config"], cfg["text_config"]
  assert (v["hidden_size"], v["num_attention_heads"], v["num_hidden_layers"], v["image_size"], v["layer_norm_eps"]) == \
      (128, 2, 1, 384, 1e-6)
  assert (t["hidden_size"], t["num_attention_heads"], t["encoder_hidden_size"], t["vocab_size"]) == (64, 1, 128, 30524)
  assert (t["layer_norm_eps"], t["hidden_dropout_prob"], cfg["image_text_hidden_size"]) == (1e-12, 0.1, 256)


def test_embed_api_matches_hf(blip_dir, tmp_path):
  d, model, tok, proc, imgs = blip_dir
  pil = [Image.open(p).convert("RGB") for p in imgs]
  b = tok(TEXTS, padding=True, return_tensors="pt")
  pix = proc(pil, return_tensors="pt")["pixel_values"]
  with torch.no_grad():
    img = model.vision_model(pix).last_hidden_state
    want_i = torch.nn.functional.normalize(model.vision_proj(img[:, 0]), dim=-1).numpy()
    txt = model.text_encoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    want_t = torch.nn.functional.normalize(model.text_proj(txt[:, 0]), dim=-1).numpy()
    itm = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=pix).itm_score
    want_itm = torch.softmax(itm, dim=-1)[:, 1].numpy()
  enc = mmret_jax.load(d, verbose=False)
  assert enc.dim == 16 and enc.is_blip
  np.testing.assert_allclose(enc.encode_image(imgs, batch_size=3), want_i, atol=1e-5, rtol=0)
  np.testing.assert_allclose(enc.encode_text(TEXTS, batch_size=3), want_t, atol=1e-5, rtol=0)
  np.testing.assert_allclose(enc.itm_scores(pil, TEXTS, batch_size=3), want_itm, atol=1e-5, rtol=0)
  with pytest.raises(embed.EmbedError, match="pairs images with texts"):
    enc.itm_scores(pil[:2], TEXTS)
  with pytest.raises(embed.EmbedError, match="--pooling does not apply"):
    enc.encode_text(TEXTS, pooling="mean")
  (tmp_path / "imgs.txt").write_text("\n".join(str(p) for p in imgs))
  r = subprocess.run([sys.executable, "-m", "mmret_jax.embed", "--model", str(d), "--images",
                      str(tmp_path / "imgs.txt"), "--output", str(tmp_path / "i.npy")], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  np.testing.assert_allclose(np.load(tmp_path / "i.npy"), want_i, atol=1e-5, rtol=0)
