"""mmret_jax.data.image: parity with HF CLIPImageProcessor on real photos, targetpad, bad images."""

from __future__ import annotations

import io
import pickle

import grain
import numpy as np
import PIL.Image
import pytest
import transformers

from mmret_jax.data import image as mi

skdata = pytest.importorskip("skimage.data")

# transformers >= 5: `CLIPImageProcessor` is the torchvision backend when torchvision is installed
# (different resampling); the PIL backend is the one we mirror.
HFProcessor = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
HF_ALPHA = "white" if int(transformers.__version__.split(".")[0]) >= 5 else "drop"
TOL = (1 / 255) / min(mi.OPENAI_CLIP_STD)  # one uint8 level, after normalisation


def _rgba():
  a = skdata.astronaut()
  alpha = np.tile(np.linspace(0, 255, a.shape[1]).astype(np.uint8), (a.shape[0], 1))
  return PIL.Image.fromarray(np.dstack([a, alpha]))


@pytest.fixture(scope="module")
def photos():
  coffee = PIL.Image.fromarray(skdata.coffee())
  return {
      "astronaut": PIL.Image.fromarray(skdata.astronaut()),  # 512x512
      "chelsea": PIL.Image.fromarray(skdata.chelsea()),      # 451x300 landscape
      "rocket": PIL.Image.fromarray(skdata.rocket()),        # 427x640 portrait
      "camera": PIL.Image.fromarray(skdata.camera()),        # mode L
      "rgba": _rgba(),                                       # transparency gradient
      "tiny": PIL.Image.fromarray(skdata.chelsea()[100:107, 200:210]),  # 10x7
      "wide": coffee.resize((1999, 101), PIL.Image.BICUBIC),  # ratio ~20
  }


def _hf(cfg: mi.ImageConfig, img, **kw) -> np.ndarray:
  """HF output as [H, W, 3]."""
  ref = HFProcessor(**{**cfg.to_preprocessor_dict(), **kw})
  return ref(img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)


# ---------------------------------------------------------------------------
# CLIPImageProcessor parity
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("size,crop", [(224, 224), (336, 336), (197, 197), (256, 224),
                                       (200, 224), (224, (224, 160)), (None, 224)])
def test_matches_clip_image_processor(photos, size, crop):
  cfg = mi.ImageConfig.clip_default(size, crop_size=crop, alpha=HF_ALPHA)
  worst = 0.0
  for name, img in photos.items():
    ours, ref = mi.preprocess(img, cfg), _hf(cfg, img)
    assert ours.dtype == np.float32 and ours.shape == ref.shape, name
    diff = float(np.abs(ours - ref).max())
    assert diff <= TOL, (name, diff)
    worst = max(worst, diff)
  print(f"size={size} crop={crop}: max |ours - HF| = {worst:.3g}")


def test_tiny_image_padded_like_hf(photos):
  # No resize: a 10x7 image inside a 224 crop -> zero pixels around (normalised), HF offsets.
  cfg = mi.ImageConfig(size=None, crop_size=224)
  out = mi.preprocess(photos["tiny"], cfg)
  zero = (0 - np.float32(mi.OPENAI_CLIP_MEAN)) / np.float32(mi.OPENAI_CLIP_STD)
  top, left = -(-(224 - 7) // 2), -(-(224 - 10) // 2)  # ceil, as HF center_crop
  np.testing.assert_allclose(out[0, 0], zero, rtol=1e-6)
  np.testing.assert_allclose(out[top:top + 7, left:left + 10],
                             mi.preprocess(photos["tiny"], mi.ImageConfig(size=None, do_center_crop=False)))
  assert np.all(out[top - 1] == zero) and np.all(out[top + 7] == zero)


def test_unnormalised_and_resample_from_saved_config(tmp_path, photos):
  HFProcessor(size={"shortest_edge": 240}, crop_size={"height": 200, "width": 180}, resample=2,
              do_normalize=False).save_pretrained(tmp_path)
  cfg = mi.ImageConfig.from_preprocessor_config(tmp_path)
  assert cfg == mi.ImageConfig(size=240, crop_size=(200, 180), mean=(0, 0, 0), std=(1, 1, 1),
                               resample="bilinear")
  ref = HFProcessor.from_pretrained(tmp_path)
  for img in (photos["chelsea"], photos["rocket"]):
    hf = ref(img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = mi.preprocess(img, cfg)
    np.testing.assert_allclose(ours, hf, atol=1 / 255)
    assert 0.0 <= ours.min() and ours.max() <= 1.0


def test_from_preprocessor_config_round_trip(tmp_path):
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  HFProcessor(size={"shortest_edge": 336}, crop_size=336, image_mean=list(mean),
              image_std=list(std), resample=3).save_pretrained(tmp_path)
  want = mi.ImageConfig(size=336, crop_size=336, mean=mean, std=std)
  assert mi.ImageConfig.from_preprocessor_config(tmp_path) == want
  assert mi.ImageConfig.from_preprocessor_config(tmp_path / "preprocessor_config.json") == want
  # ours -> HF -> ours
  cfg = mi.ImageConfig.clip_default(197, resample="lanczos", do_convert_rgb=False)
  HFProcessor(**cfg.to_preprocessor_dict()).save_pretrained(tmp_path / "b")
  assert mi.ImageConfig.from_preprocessor_config(tmp_path / "b") == cfg
  # Legacy CLIPFeatureExtractor layout (openai/clip-vit-*): ints, int resample.
  legacy = {"size": 224, "crop_size": 224, "do_center_crop": True, "do_normalize": True,
            "do_resize": True, "image_mean": list(mi.OPENAI_CLIP_MEAN),
            "image_std": list(mi.OPENAI_CLIP_STD), "resample": 3,
            "feature_extractor_type": "CLIPFeatureExtractor"}
  assert mi.ImageConfig.from_preprocessor_config(legacy) == mi.ImageConfig.clip_default(224)
  blip = mi.ImageConfig.from_preprocessor_config({"size": {"height": 384, "width": 384}})
  assert (blip.size, blip.do_center_crop, blip.output_hw) == ((384, 384), False, (384, 384))
  assert mi.ImageConfig.from_preprocessor_config({"do_convert_rgb": None}).do_convert_rgb
  assert mi.ImageConfig.from_preprocessor_config({"do_resize": False}).size is None
  with pytest.raises(ValueError, match="longest_edge"):
    mi.ImageConfig.from_preprocessor_config({"size": {"shortest_edge": 224, "longest_edge": 448}})
  with pytest.raises(ValueError, match="pad_mode"):
    mi.ImageConfig(pad_mode="reflect")


# ---------------------------------------------------------------------------
# targetpad / squarepad (CLIP4Cir / Bi-BLIP4CIR src/data_utils.py)
# ---------------------------------------------------------------------------
def _ref_pad(w, h, ratio):
  """TargetPad's formula, restated: (left/right, top/bottom)."""
  if max(w, h) / min(w, h) < ratio:
    return 0, 0
  s = max(w, h) / ratio
  return max(int((s - w) / 2), 0), max(int((s - h) / 2), 0)


@pytest.mark.parametrize("w,h,want", [
    (512, 512, (0, 0)),     # ratio 1 < 1.25
    (460, 400, (0, 0)),     # 1.15 < 1.25
    (500, 400, (0, 0)),     # exactly 1.25: padded by int(0) = 0
    (451, 300, (0, 30)),    # chelsea: s = 360.8, vp = int(30.4)
    (457, 300, (0, 32)),    # vp = int(32.8): truncation, not rounding
    (427, 640, (42, 0)),    # rocket (portrait): hp = int(42.5)
    (1999, 101, (0, 749)),  # very wide: s = 1599.2, vp = int(749.1)
])
def test_pad_amounts(w, h, want):
  assert mi.pad_amounts(w, h, 1.25) == _ref_pad(w, h, 1.25) == want


def test_squarepad_is_ratio_one():
  for w, h in ((451, 300), (300, 451), (7, 10), (512, 512)):
    m = max(w, h)
    assert mi.pad_amounts(w, h, 1.0) == (int((m - w) / 2), int((m - h) / 2))  # SquarePad


def _pad_np(img: PIL.Image.Image, ratio: float) -> PIL.Image.Image:
  hp, vp = _ref_pad(img.width, img.height, ratio)
  return PIL.Image.fromarray(np.pad(np.asarray(img), ((vp, vp), (hp, hp), (0, 0))))


def _torchvision_crop(resized: np.ndarray, c: int) -> np.ndarray:
  top = int(round((resized.shape[0] - c) / 2.0))
  left = int(round((resized.shape[1] - c) / 2.0))
  return resized[top:top + c, left:left + c]


@pytest.fixture(scope="module")
def cir_images(photos):
  return {
      "chelsea": photos["chelsea"],                   # ratio 1.50: padded top/bottom
      "rocket": photos["rocket"],                     # ratio 1.50 portrait: padded left/right
      "wide": photos["wide"],                         # ratio ~20
      "below": photos["astronaut"].crop((0, 0, 387, 384)),  # ratio 1.008: unpadded; odd crop slack 3
  }


def test_pad_to_ratio_pixels(cir_images):
  img = cir_images["chelsea"]
  padded = mi.pad_to_ratio(img, 1.25)
  assert padded.size == (451, 360)
  a = np.asarray(padded)
  assert not a[:30].any() and not a[330:].any()
  np.testing.assert_array_equal(a[30:330], np.asarray(img))
  assert mi.pad_to_ratio(cir_images["below"], 1.25) is cir_images["below"]


def test_targetpad_matches_reference_pipeline(cir_images):
  # Reference: pad by the formula, HF shortest-edge 384 bicubic resize (== torchvision Resize),
  # torchvision CenterCrop offsets, CLIP normalisation.
  size = 384
  for name, img in cir_images.items():
    padded = _pad_np(img, 1.25)
    resized = _hf(mi.ImageConfig.clip_default(size), padded, do_center_crop=False)
    want = _torchvision_crop(resized, size)
    got = mi.targetpad(img, 1.25, size)
    assert got.shape == (size, size, 3)
    assert float(np.abs(got - want).max()) <= TOL, name


def test_targetpad_options(cir_images):
  img = cir_images["below"]
  # Ratio below target: no padding, so plain preprocessing with the same crop offsets.
  tv = mi.ImageConfig.clip_default(384, crop_offsets="torchvision")
  np.testing.assert_array_equal(mi.targetpad(img), mi.preprocess(img, tv))
  # crop slack 3: torchvision starts at round(1.5) = 2, HF at 1.
  hf_out = mi.preprocess(img, mi.ImageConfig.clip_default(384))
  np.testing.assert_array_equal(mi.targetpad(img)[:, :-1], hf_out[:, 1:])
  # pad_mode with HF offsets == CLIPImageProcessor on the padded image.
  for name in ("chelsea", "rocket", "wide"):
    cfg = mi.ImageConfig.clip_default(224, pad_mode="targetpad", target_ratio=1.25)
    want = _hf(mi.ImageConfig.clip_default(224), _pad_np(cir_images[name], 1.25))
    assert float(np.abs(mi.preprocess(cir_images[name], cfg) - want).max()) <= TOL, name
    sq = mi.ImageConfig.clip_default(224, pad_mode="squarepad")
    want = _hf(mi.ImageConfig.clip_default(224), _pad_np(cir_images[name], 1.0))
    assert float(np.abs(mi.preprocess(cir_images[name], sq) - want).max()) <= TOL, name


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------
def test_load_image_modes(tmp_path):
  rgb = skdata.chelsea()[:40, :50]
  grey = skdata.camera()[:40, :50]
  assert np.array_equal(np.asarray(mi.load_image(PIL.Image.fromarray(grey))),
                        np.repeat(grey[..., None], 3, -1))
  # LA / RGBA: composited onto white (HF), or alpha dropped.
  alpha = np.full(grey.shape, 64, np.uint8)
  la = PIL.Image.fromarray(np.dstack([grey, alpha]))
  assert la.mode == "LA"

  def over_white(x):
    return x * (64 / 255) + 255 * (1 - 64 / 255)

  assert np.abs(np.asarray(mi.load_image(la))[..., 0] - over_white(grey)).max() <= 1
  rgba = PIL.Image.fromarray(np.dstack([rgb, alpha]))
  assert np.abs(np.asarray(mi.load_image(rgba)) - over_white(rgb)).max() <= 1
  assert np.array_equal(np.asarray(mi.load_image(rgba, alpha="drop")), rgb)
  # P, CMYK: PIL's conversion.
  p = PIL.Image.fromarray(rgb).convert("P")
  assert np.array_equal(np.asarray(mi.load_image(p)), np.asarray(p.convert("RGB")))
  cmyk = PIL.Image.fromarray(rgb).convert("CMYK")
  assert np.array_equal(np.asarray(mi.load_image(cmyk)), np.asarray(cmyk.convert("RGB")))
  # 16-bit grey PNG: scaled to 8 bits (PIL's own conversion would clip at 255).
  g16 = (grey.astype(np.uint16) * 257)
  PIL.Image.fromarray(g16).save(tmp_path / "g16.png")
  img = mi.load_image(tmp_path / "g16.png")
  assert img.mode == "RGB" and np.array_equal(np.asarray(img)[..., 1], grey)
  # Arrays and encoded bytes.
  assert np.array_equal(np.asarray(mi.load_image(rgb.astype(np.float32) / 255)), rgb)
  buf = io.BytesIO()
  PIL.Image.fromarray(rgb).save(buf, format="PNG")
  assert np.array_equal(np.asarray(mi.load_image(buf.getvalue())), rgb)
  with pytest.raises(mi.BadImageError, match="mode L"):
    mi.load_image(PIL.Image.fromarray(grey), convert_rgb=False)


def _bad_files(tmp_path):
  rng = np.random.default_rng(0)
  corrupt = tmp_path / "x.jpg"
  corrupt.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
  buf = io.BytesIO()
  PIL.Image.fromarray(skdata.chelsea()).save(buf, format="JPEG")
  truncated = tmp_path / "truncated.jpg"
  truncated.write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
  good = tmp_path / "good.png"
  PIL.Image.fromarray(skdata.coffee()).save(good)
  return good, corrupt, truncated


def test_missing_and_corrupt_files(tmp_path):
  good, corrupt, truncated = _bad_files(tmp_path)
  missing = tmp_path / "nope" / "missing.jpg"
  with pytest.raises(FileNotFoundError, match="missing.jpg"):
    mi.load_image(missing)
  with pytest.raises(FileNotFoundError, match="missing.jpg"):
    mi.preprocess(str(missing), mi.ImageConfig())
  for bad in (corrupt, truncated):
    with pytest.raises(mi.BadImageError, match=bad.name) as e:
      mi.preprocess(bad, mi.ImageConfig())
    assert isinstance(e.value, ValueError)
  assert mi.preprocess(good, mi.ImageConfig()).shape == (224, 224, 3)


# ---------------------------------------------------------------------------
# Batches and the grain transform
# ---------------------------------------------------------------------------
def test_preprocess_batch_order_kept_and_errors(tmp_path, photos):
  good, corrupt, truncated = _bad_files(tmp_path)
  missing = tmp_path / "missing.jpg"
  items = [good, missing, photos["rocket"], corrupt, skdata.astronaut(), truncated, photos["camera"]]
  cfg = mi.ImageConfig.clip_default(224)
  with pytest.raises(FileNotFoundError):
    mi.preprocess_batch(items, cfg)
  with pytest.raises(mi.BadImageError, match="x.jpg"):
    mi.preprocess_batch(items[2:], cfg)
  batch, kept, errors = mi.preprocess_batch(items, cfg, on_error="skip")
  assert kept.tolist() == [0, 2, 4, 6]
  assert [(e.index, e.path) for e in errors] == [(1, str(missing)), (3, str(corrupt)), (5, str(truncated))]
  assert errors[0].reason.startswith("FileNotFoundError") and errors[1].reason.startswith("BadImageError")
  assert batch.shape == (4, 224, 224, 3)
  for row, i in zip(batch, kept):
    np.testing.assert_array_equal(row, mi.preprocess(items[i], cfg))
  threaded = mi.preprocess_batch(items, cfg, on_error="skip", num_threads=2)
  np.testing.assert_array_equal(threaded[0], batch)
  # Chunked: indices stay global.
  chunks = list(mi.ImageBatcher(cfg, batch_size=3, on_error="skip")(items))
  assert [c[1].tolist() for c in chunks] == [[0, 2], [4], [6]]
  assert [e.index for c in chunks for e in c[2]] == [1, 3, 5]
  np.testing.assert_array_equal(np.concatenate([c[0] for c in chunks]), batch)


def test_preprocess_image_grain_transform(tmp_path):
  good, corrupt, _ = _bad_files(tmp_path)
  cfg = mi.ImageConfig.clip_default(64)
  t = mi.PreprocessImage(cfg, image_root=str(tmp_path), path_key="path")
  t = pickle.loads(pickle.dumps(t))
  records = [{"id": 0, "path": good.name}, {"id": 1, "path": "missing.jpg"},
             {"id": 2, "path": corrupt.name}, {"id": 3, "path": None}, {"id": 4, "path": good.name}]
  out = list(grain.MapDataset.source(records).map(t))
  assert [bool(r["image_ok"]) for r in out] == [True, False, False, False, True]
  assert [r["id"] for r in out] == [0, 1, 2, 3, 4] and out[0]["path"] == good.name
  np.testing.assert_array_equal(out[0]["image"], mi.preprocess(good, cfg))
  assert out[1]["image"].shape == (64, 64, 3) and not out[1]["image"].any()
  # The trainer's side: count the flags, keep the good rows.
  batch = next(iter(grain.MapDataset.source(records).map(t).batch(5)))
  assert int((~batch["image_ok"]).sum()) == 3
  with pytest.raises(FileNotFoundError):
    mi.PreprocessImage(cfg, image_root=str(tmp_path), path_key="path", skip_bad=False).map(records[1])
