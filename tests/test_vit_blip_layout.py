"""`VisionTransformer` with BLIP's layout flags reproduces Hugging Face `BlipVisionModel` (CPU, fp32).

BLIP's ViT differs from CLIP's only in layout: no `pre_layrnorm`, a patch conv with bias, and
`post_layernorm` applied to every token (`last_hidden_state`); HF's `pooler_output` then applies
`post_layernorm` once more to token 0 (`post_layernorm(post_layernorm(x)[:, 0])`, modeling_blip.py),
while BLIP's retrieval heads read `last_hidden_state[:, 0]`. Its attention fuses q/k/v in `self_attn.qkv`
(weight [3D, D]) and names the output projection `self_attn.projection`.

The HF -> ours key map lives in this test (there is no BLIP converter yet). The fused qkv is split the
way `BlipAttention.forward` splits it: `qkv(x).reshape(B, L, 3, heads, head_dim)`, i.e. output feature
`s * D + n * head_dim + h` is (q|k|v)[s], head n, dim h. That is a plain split into thirds (q, k, v), each
third head-major, the same head layout as our q_proj/k_proj/v_proj (`split_heads`: "(n h)"); no
interleaving. `test_qkv_split_matches_blip_heads` checks this against HF's own reshape.
"""

from __future__ import annotations

import os

os.environ["TRANSFORMERS_VERBOSITY"] = "error"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mmret_jax.models import layers, vit  # noqa: E402

FP32_ATOL = 1e-5
VISION = dict(hidden_size=48, num_attention_heads=3, intermediate_size=50, num_hidden_layers=2, image_size=32,
              patch_size=8, hidden_act="gelu", layer_norm_eps=1e-5)
BLIP_FLAGS = dict(pre_layernorm=False, patch_bias=True, post_layernorm_all=True)


def _maxdiff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.fixture(scope="module")
def blip():
  return make_blip()


def make_blip(seed: int = 0):
  """A random HF BlipVisionModel and its state dict as numpy.

  Every parameter is overwritten: BlipVisionConfig's default initializer_range is 1e-10, which would
  leave near-zero weights (and zero biases, unit LayerNorms) and make any parity check vacuous.
  """
  import transformers as tf  # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  model = tf.BlipVisionModel(tf.BlipVisionConfig(**VISION))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name or "layernorm" in name:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.05 * torch.randn_like(p))
      elif name in ("embeddings.class_embedding", "embeddings.position_embedding"):
        p.copy_(0.5 * torch.randn_like(p))
      else:  # Linear / conv weights: fan-in scaled
        p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
  model.eval()
  sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
  return model, sd


def blip_to_params(sd: dict[str, np.ndarray], num_layers: int) -> dict:
  """HF BlipVisionModel state dict -> our VisionTransformer param tree (CLIP names)."""
  ln = lambda p: {"scale": sd[f"{p}.weight"], "bias": sd[f"{p}.bias"]}
  dense = lambda w, b: {"kernel": w.T, "bias": b}  # torch Linear [out, in] -> [in, out]
  params = {
      "embeddings": {
          "class_embedding": sd["embeddings.class_embedding"].reshape(-1),  # [1, 1, D] -> [D]
          # conv OIHW [D, C, P, P] -> HWIO [P, P, C, D]
          "patch_embedding": {"kernel": sd["embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
                              "bias": sd["embeddings.patch_embedding.bias"]},
          "position_embedding": {"embedding": sd["embeddings.position_embedding"][0]},  # [1, N+1, D] -> [N+1, D]
      },
      "encoder": {},
      "post_layernorm": ln("post_layernorm"),
  }
  for i in range(num_layers):
    p = f"encoder.layers.{i}"
    qkv_w = np.split(sd[f"{p}.self_attn.qkv.weight"], 3, axis=0)  # [3D, D] -> 3 x [D, D] (q, k, v)
    qkv_b = np.split(sd[f"{p}.self_attn.qkv.bias"], 3, axis=0)
    attn = {name: dense(w, b) for name, w, b in zip(("q_proj", "k_proj", "v_proj"), qkv_w, qkv_b)}
    attn["out_proj"] = dense(sd[f"{p}.self_attn.projection.weight"], sd[f"{p}.self_attn.projection.bias"])
    params["encoder"][f"layers_{i}"] = {
        "layer_norm1": ln(f"{p}.layer_norm1"),
        "self_attn": attn,
        "layer_norm2": ln(f"{p}.layer_norm2"),
        "mlp": {f: dense(sd[f"{p}.mlp.{f}.weight"], sd[f"{p}.mlp.{f}.bias"]) for f in ("fc1", "fc2")},
    }
  return params


def _images(batch: int = 3, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.standard_normal((batch, VISION["image_size"], VISION["image_size"], 3)).astype(np.float32)


def _config(**flags) -> vit.ViTConfig:
  return vit.ViTConfig(**VISION, **flags)


def _pre_layrnorm() -> dict[str, np.ndarray]:
  """A non-trivial `pre_layrnorm` (not the identity) for the variants that switch it on."""
  rng = np.random.default_rng(3)
  return {"scale": (1 + 0.1 * rng.standard_normal(VISION["hidden_size"])).astype(np.float32),
          "bias": (0.05 * rng.standard_normal(VISION["hidden_size"])).astype(np.float32)}


@pytest.fixture(scope="module")
def variants(blip):
  """name -> (config, params): BLIP's layout, each flag switched back to CLIP's default, and CLIP's layout."""
  _, sd = blip
  params = blip_to_params(sd, VISION["num_hidden_layers"])
  with_pre = {**params, "pre_layrnorm": _pre_layrnorm()}
  no_bias = {**params, "embeddings": {**params["embeddings"],
                                      "patch_embedding": {"kernel": params["embeddings"]["patch_embedding"]["kernel"]}}}
  return {
      "blip": (_config(**BLIP_FLAGS), params),
      "pre_layernorm": (_config(**{**BLIP_FLAGS, "pre_layernorm": True}), with_pre),
      "patch_bias": (_config(**{**BLIP_FLAGS, "patch_bias": False}), no_bias),
      "post_layernorm_all": (_config(**{**BLIP_FLAGS, "post_layernorm_all": False}), params),
      "clip_default": (_config(), {**no_bias, "pre_layrnorm": with_pre["pre_layrnorm"]}),
  }


@pytest.fixture(scope="module")
def outputs(variants):
  """Every variant's outputs on the same images, from one jitted program (one compile)."""
  images = _images()

  def run(all_params, x):
    return {name: vit.VisionTransformer(cfg).apply({"params": all_params[name]}, x, output_hidden_states=True)
            for name, (cfg, _) in variants.items()}

  out = jax.jit(run)({name: p for name, (_, p) in variants.items()}, jnp.asarray(images))
  return images, jax.tree.map(np.asarray, out)


def test_qkv_split_matches_blip_heads(blip):
  """Our thirds-split + split_heads gives exactly HF's per-head q/k/v (its reshape(3, heads, head_dim))."""
  model, sd = blip
  attn = model.encoder.layers[0].self_attn
  x = torch.randn(2, 5, VISION["hidden_size"])
  with torch.no_grad():
    ref = attn.qkv(x).reshape(2, 5, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).numpy()  # [3,B,N,L,H]
  xs = x.numpy()
  for s, (w, b) in enumerate(zip(np.split(sd["encoder.layers.0.self_attn.qkv.weight"], 3),
                                 np.split(sd["encoder.layers.0.self_attn.qkv.bias"], 3))):
    ours = np.asarray(layers.split_heads(jnp.asarray(xs @ w.T + b), attn.num_heads)).transpose(0, 2, 1, 3)
    assert _maxdiff(ours, ref[s]) <= 1e-5, s


def test_param_tree_matches_module(variants):
  """The mapped trees are exactly the trees our module creates (names and shapes), for every variant."""
  x = jax.ShapeDtypeStruct((1, VISION["image_size"], VISION["image_size"], 3), jnp.float32)
  for name, (cfg, params) in variants.items():
    shapes = jax.eval_shape(lambda x, cfg=cfg: vit.VisionTransformer(cfg).init(jax.random.PRNGKey(0), x), x)
    shapes = jax.tree.map(lambda a: a.shape, nn.meta.unbox(shapes["params"]))
    assert jax.tree.map(np.shape, params) == shapes, name


def test_vit_blip_layout_parity_fp32(blip, outputs):
  model, _ = blip
  images, out = outputs
  out = out["blip"]
  with torch.no_grad():
    ref = model(pixel_values=torch.as_tensor(images.transpose(0, 3, 1, 2).copy()), output_hidden_states=True)

  n = 1 + (VISION["image_size"] // VISION["patch_size"]) ** 2
  assert out["last_hidden_state"].shape == ref.last_hidden_state.shape == (3, n, VISION["hidden_size"])
  assert out["pooler_output"].shape == ref.pooler_output.shape == (3, VISION["hidden_size"])
  diffs = {"last_hidden_state": _maxdiff(out["last_hidden_state"], ref.last_hidden_state.numpy()),
           "pooler_output": _maxdiff(out["pooler_output"], ref.pooler_output.numpy())}
  # hidden_states: the embeddings, then every layer's output (before post_layernorm), as HF's
  assert len(out["hidden_states"]) == len(ref.hidden_states) == VISION["num_hidden_layers"] + 1
  for i, (a, b) in enumerate(zip(out["hidden_states"], ref.hidden_states)):
    diffs[f"hidden_states[{i}]"] = _maxdiff(a, b.numpy())
  print("BLIP ViT fp32 max|diff|:", {k: f"{v:.2e}" for k, v in diffs.items()})
  assert max(diffs.values()) <= FP32_ATOL, diffs
  # the outputs are not trivially small (the bound means something)
  assert np.abs(ref.last_hidden_state.numpy()).max() > 0.5 and np.abs(ref.pooler_output.numpy()).max() > 0.5


def test_layout_flags_matter(outputs):
  """Each BLIP flag switched back to CLIP's default, and CLIP's whole layout, change the outputs."""
  _, out = outputs
  blip_out = out["blip"]
  for name in ("pre_layernorm", "patch_bias", "post_layernorm_all", "clip_default"):
    assert _maxdiff(out[name]["last_hidden_state"], blip_out["last_hidden_state"]) > 1e-2, name
    assert _maxdiff(out[name]["pooler_output"], blip_out["pooler_output"]) > 1e-2, name
  # post_layernorm_all=False leaves the encoder output un-normalised, and pools post_layernorm(token 0) once
  # (CLIP) where HF BLIP applies post_layernorm twice to token 0
  clip_post = out["post_layernorm_all"]
  np.testing.assert_allclose(clip_post["last_hidden_state"], blip_out["hidden_states"][-1], atol=1e-6)
