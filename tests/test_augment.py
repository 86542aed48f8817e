"""BLIP's training augmentation (`data/augment.py`) against numpy versions of the seed's formulas
(UniIR `backbone/transform/randaugment.py`, torchvision RandomResizedCrop), and its determinism."""

from __future__ import annotations

import math

import numpy as np
import PIL.Image

from mmret_jax.data import augment


def _img(h=24, w=32, seed=0):
  return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def seed_autocontrast(a):
  """The seed's `autocontrast_func` (cutoff 0), per channel."""
  out = np.empty_like(a)
  for c in range(3):
    ch = a[..., c]
    high, low = int(ch.max()), int(ch.min())
    if high <= low:
      table = np.arange(256)
    else:
      scale = 255 / (high - low)
      table = np.clip(np.arange(256) * scale - low * scale, 0, 255)
    out[..., c] = table.clip(0, 255).astype(np.uint8)[ch]
  return out


def seed_equalize(a):
  """The seed's `equalize_func` (PIL's rule), per channel."""
  out = np.empty_like(a)
  for c in range(3):
    ch = a[..., c]
    hist = np.bincount(ch.ravel(), minlength=256).astype(np.float64)
    nz = hist[hist != 0]
    step = np.sum(nz[:-1]) // 255
    if step == 0:
      out[..., c] = ch
      continue
    n = np.empty_like(hist)
    n[0] = step // 2
    n[1:] = hist[:-1]
    out[..., c] = (np.cumsum(n) // step).clip(0, 255).astype(np.uint8)[ch]
  return out


def test_autocontrast_and_equalize_match_the_seed():
  for seed in range(3):
    img = _img(seed=seed)
    a = np.asarray(img) // 2 + 40  # a narrow range, so autocontrast stretches it
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(np.asarray(augment.apply_op(PIL.Image.fromarray(a), "AutoContrast", 5, rng)),
                                  seed_autocontrast(a))
    np.testing.assert_array_equal(np.asarray(augment.apply_op(img, "Equalize", 5, rng)),
                                  seed_equalize(np.asarray(img)))


class _Fixed:
  """An rng whose `random()` returns a fixed value (to pick the sign of a level)."""

  def __init__(self, v):
    self.v = v

  def random(self):
    return self.v


def test_translate_shear_rotate_follow_the_seed_matrices():
  img = _img()
  a = np.asarray(img)
  # TranslateX at M=5: offset 5, sign negative when random() > 0.5; the seed's matrix [[1, 0, -t], [0, 1, 0]]
  # maps src x to x - t, so out[:, x] = in[:, x + t], the gap filled with gray 128
  for r, t in ((0.9, -5), (0.1, 5)):
    out = np.asarray(augment.apply_op(img, "TranslateX", 5, _Fixed(r)))
    want = np.full_like(a, 128)
    if t > 0:
      want[:, :-t] = a[:, t:]
    else:
      want[:, -t:] = a[:, :t]
    np.testing.assert_array_equal(out, want)
  out = np.asarray(augment.apply_op(img, "TranslateY", 5, _Fixed(0.1)))
  np.testing.assert_array_equal(out[:-5], a[5:])
  assert (out[-5:] == 128).all()
  # ShearX level 0.15, the seed's matrix [[1, s, 0], [0, 1, 0]]: out(x, y) = in(x - s*y, y); row 0 unchanged,
  # row 20 shifted by exactly 3 pixels
  out = np.asarray(augment.apply_op(img, "ShearX", 5, _Fixed(0.1)), np.int32)
  np.testing.assert_array_equal(out[0], a[0])
  np.testing.assert_allclose(out[20, 3:], a[20, :-3], atol=1)  # 0.15 * 20 = 3 up to float rounding
  out = np.asarray(augment.apply_op(img, "ShearY", 5, _Fixed(0.9)), np.int32)  # s = -0.15: out(x, y) = in(x, y + s'x)
  np.testing.assert_array_equal(out[:, 0], a[:, 0])
  np.testing.assert_allclose(out[:-3, 20], a[3:, 20], atol=1)
  # Rotate by 90 degrees (level 30) about (w/2, h/2), as cv2: a square image turns exactly (no interpolation)
  sq = _img(16, 16)
  out = np.asarray(augment.apply_op(sq, "Rotate", 30, _Fixed(0.9)))
  want = np.asarray(sq)
  m = augment.rotation_matrix(16, 16, 90)  # forward map: dst = m @ (x, y, 1)
  for y, x in ((5, 7), (2, 13), (10, 3), (12, 12)):
    dx, dy = m @ np.asarray([x, y, 1.0])
    assert 0 <= dx <= 15 and 0 <= dy <= 15
    np.testing.assert_allclose(out[int(round(dy)), int(round(dx))], want[y, x], atol=1)  # float rounding
  # 15 degrees: the centre region keeps its content, the corners become gray
  out = np.asarray(augment.apply_op(_img(33, 33), "Rotate", 5, _Fixed(0.9)))
  assert (out[0, 0] == 128).all() and (out[-1, -1] == 128).all()


def test_enhance_ops_are_identity_at_the_seeds_magnitude():
  img = _img()
  for op in ("Brightness", "Sharpness", "Identity"):
    np.testing.assert_array_equal(np.asarray(augment.apply_op(img, op, 5, np.random.default_rng(0))),
                                  np.asarray(img))
  brighter = np.asarray(augment.apply_op(img, "Brightness", 10, np.random.default_rng(0)), np.int32)
  assert (brighter >= np.asarray(img)).all() and brighter.mean() > np.asarray(img).mean() + 20  # factor 1.9


def test_random_resized_crop_box():
  rng = np.random.default_rng(0)
  for _ in range(200):
    left, top, w, h = augment.random_resized_crop_box(64, 48, rng)
    assert 0 <= left <= 64 - w and 0 <= top <= 48 - h
    assert 0.5 * 64 * 48 * 0.97 <= w * h <= 64 * 48 and 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
  # torchvision's fallback after 10 misses: the centre crop at the nearest allowed ratio
  assert augment.random_resized_crop_box(1000, 10, rng) == ((1000 - round(10 * 4 / 3)) // 2, 0, 13, 10)
  assert augment.random_resized_crop_box(10, 1000, rng) == (0, (1000 - round(10 / (3 / 4))) // 2, 10, 13)


def test_blip_train_is_keyed_and_varied():
  img = _img(40, 60)
  a = augment.blip_train(img, np.random.default_rng((1, 2, 3)), 16)
  b = augment.blip_train(img, np.random.default_rng((1, 2, 3)), 16)
  assert a.size == (16, 16) and a.mode == "RGB"
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  outs = {np.asarray(augment.blip_train(img, np.random.default_rng((1, 2, k)), 16)).tobytes() for k in range(8)}
  assert len(outs) == 8
  # the ops drawn: two per image, with replacement, over BLIP's ten
  names = np.random.default_rng(5).choice(np.asarray(augment.BLIP_OPS), 2)
  assert set(names) <= set(augment.BLIP_OPS) and math.isclose(5 / 10 * 1.8 + 0.1, 1.0)


def test_enhance_ops_at_bagformers_magnitude_match_the_seed():
  """M=7 (BagFormer): the seed's numpy brightness (table truncation) and its interior-only sharpness."""
  img = _img(9, 11, seed=3)
  a = np.asarray(img)
  factor = 7 / 10 * 1.8 + 0.1
  want = np.empty_like(a)
  for v in range(256):  # the seed's table: value * factor, clipped, truncated
    want[a == v] = int(min(255.0, float(np.float32(v) * np.float32(factor))))
  np.testing.assert_array_equal(np.asarray(augment.apply_op(img, "Brightness", 7, np.random.default_rng(0))), want)
  kernel = [[1, 1, 1], [1, 5, 1], [1, 1, 1]]
  want = a.astype(np.float64).copy()
  for y in range(1, a.shape[0] - 1):
    for x in range(1, a.shape[1] - 1):
      for ch in range(3):
        smooth = sum(kernel[i][j] * float(a[y - 1 + i, x - 1 + j, ch]) for i in range(3) for j in range(3)) / 13
        deg = min(255.0, max(0.0, float(np.rint(smooth))))
        want[y, x, ch] = min(255.0, max(0.0, deg + factor * (float(a[y, x, ch]) - deg)))
  got = np.asarray(augment.apply_op(img, "Sharpness", 7, np.random.default_rng(0)))
  assert np.abs(got.astype(np.float64) - np.floor(want)).max() <= 1  # float32 vs float64 truncation
  np.testing.assert_array_equal(got[0], a[0])  # border rows and columns stay
  np.testing.assert_array_equal(got[:, -1], a[:, -1])


def test_bagformer_train_is_keyed():
  img = _img(40, 60)
  a = augment.bagformer_train(img, np.random.default_rng((4, 0, 1)), 16)
  b = augment.bagformer_train(img, np.random.default_rng((4, 0, 1)), 16)
  assert a.size == (16, 16)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert len({np.asarray(augment.bagformer_train(img, np.random.default_rng((4, 0, k)), 16)).tobytes()
              for k in range(8)}) == 8
  assert set(augment.BAGFORMER_OPS) == set(augment.BLIP_OPS)
