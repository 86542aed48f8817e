"""`embed` / `load()` on CLIP dirs: text and image embeddings equal HF PyTorch CLIPModel's."""

import numpy as np
import pytest
import torch
from PIL import Image

import mmret_jax
from mmret_jax import embed

import fixtures


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("clip")
  model, tok, proc = fixtures.make_clip_dir(d)
  rng = np.random.default_rng(0)
  imgs = []
  for i, (w, h) in enumerate([(40, 32), (64, 48), (33, 90), (32, 32), (120, 45)]):
    p = d / "imgs" / f"im{i}.png"
    p.parent.mkdir(exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
    imgs.append(p)
  return d, model, tok, proc, imgs


def _unit(x):
  x = getattr(x, "pooler_output", x)
  return (x / x.norm(dim=-1, keepdim=True)).numpy()


def test_text_and_image_embeddings_match_torch(clip_dir, tmp_path):
  d, model, tok, proc, imgs = clip_dir
  texts = fixtures.CLIP_CORPUS + ["a red lamp"]
  b = tok(texts, padding=True, return_tensors="pt")
  pix = proc([Image.open(p).convert("RGB") for p in imgs], return_tensors="pt")["pixel_values"]
  with torch.no_grad():
    want_t = _unit(model.get_text_features(input_ids=b["input_ids"], attention_mask=b["attention_mask"]))
    want_i = _unit(model.get_image_features(pixel_values=pix))
  (tmp_path / "t.txt").write_text("\n".join(texts))
  (tmp_path / "imgs.txt").write_text("\n".join(str(p) for p in imgs))
  assert embed.main(["--model", str(d), "--input", str(tmp_path / "t.txt"), "--output", str(tmp_path / "t.npy"),
                     "--batch-size", "4"]) == 0
  assert embed.main(["--model", str(d), "--images", str(tmp_path / "imgs.txt"), "--output",
                     str(tmp_path / "i.npy"), "--batch-size", "2"]) == 0
  np.testing.assert_allclose(np.load(tmp_path / "t.npy"), want_t, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.load(tmp_path / "i.npy"), want_i, atol=1e-5, rtol=0)
  enc = mmret_jax.load(d)
  np.testing.assert_allclose(enc.encode_image([Image.open(p) for p in imgs], batch_size=3), want_i,
                             atol=1e-5, rtol=0)


def test_image_errors(clip_dir, tmp_path, capsys):
  d, _, _, _, imgs = clip_dir
  lst = tmp_path / "imgs.txt"
  lst.write_text(f"{imgs[0]}\nnot_there.png\n")
  assert embed.main(["--model", str(d), "--images", str(lst), "--output", str(tmp_path / "o.npy")]) == 1
  assert "not_there.png" in capsys.readouterr().err
  (tmp_path / "bad.jpg").write_bytes(b"\x00garbage" * 10)
  lst.write_text("bad.jpg\n")  # relative to the list's folder
  assert embed.main(["--model", str(d), "--images", str(lst), "--output", str(tmp_path / "o.npy")]) == 1
  assert "bad.jpg" in capsys.readouterr().err
  enc = mmret_jax.load(d)
  with pytest.raises(embed.EmbedError, match="EOS-pooled"):
    enc.encode_text(["a mug"], pooling="mean")


def test_images_on_a_text_model_is_a_clear_error(tmp_path, capsys):
  fixtures.make_hf_dir(tmp_path / "bert", "bert")
  lst = tmp_path / "imgs.txt"
  lst.write_text("x.png\n")
  assert embed.main(["--model", str(tmp_path / "bert"), "--images", str(lst), "--output",
                     str(tmp_path / "o.npy")]) == 1
  assert "no image tower" in capsys.readouterr().err
