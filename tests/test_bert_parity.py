"""Numerical parity of `mmret_jax.models.bert.BertModel` against Hugging Face PyTorch (CPU, fp32).

Every model here has random weights (biases and LayerNorms randomised too) and
reaches our side through `mmret_jax.convert` (`load_any` on a directory written
by `save_pretrained`), so these tests also exercise the key map of the converter.
"""

from __future__ import annotations

import os

os.environ["TRANSFORMERS_VERBOSITY"] = "error"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from fixtures import make_hf_dir  # noqa: E402
from mmret_jax import convert  # noqa: E402

FP32_ATOL = 1e-5
# bf16 compute (params fp32, matmuls bf16, softmax/LN/logits fp32) vs the torch fp32 reference.
# Measured on these tiny random models (outputs up to ~5 in magnitude): max|diff| / max|ref| is
# 6e-3 .. 1.3e-2 over all hidden states and 6e-3 .. 8e-3 for MLM logits (fp32: max|diff| <= 1.5e-6).
# Asserted: max|diff| <= 3e-2 * max|ref| (about 2.4x headroom).
BF16_REL_TOL = 3e-2


def _maxdiff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Same policy as fixtures.make_hf_dir: random biases and LayerNorm affine params."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if "LayerNorm" in name or "layer_norm" in name:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
      elif name.endswith("bias"):
        p.copy_(0.05 * noise)
  return model.eval()


def _inputs(family: str, vocab_size: int, pad_id: int, lengths=(11, 7, 3), seed: int = 0) -> dict:
  """A right-padded batch: ids avoid the special ids, padded slots hold the pad id, mask is 0 there."""
  rng = np.random.default_rng(seed)
  b, n = len(lengths), max(lengths)
  mask = (np.arange(n)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
  ids = rng.integers(5, vocab_size, size=(b, n))
  ids = np.where(mask == 1, ids, pad_id)
  out = {"input_ids": ids, "attention_mask": mask}
  if family == "bert":
    out["token_type_ids"] = rng.integers(0, 2, size=(b, n)) * mask
  assert mask[:, -1].tolist() != [1] * b  # there is padding
  return out


def _torch_run(model, inputs: dict, **kw):
  with torch.no_grad():
    return model(**{k: torch.as_tensor(v) for k, v in inputs.items()}, **kw)


def _ours_run(model, params, inputs: dict, **kw):
  return model.apply({"params": params}, jnp.asarray(inputs["input_ids"]),
                     jnp.asarray(inputs["attention_mask"]),
                     None if "token_type_ids" not in inputs else jnp.asarray(inputs["token_type_ids"]), **kw)


def _load(path, **model_kw):
  meta, hf_config, params, on_the_fly = convert.load_any(path)
  assert on_the_fly  # an HF dir, converted in memory
  return convert.build_model(meta, hf_config, **model_kw), params, meta


# (family, hidden, heads, layers, intermediate, layer_norm_eps)
CASES = {
    "roberta-h32": ("roberta", 32, 4, 2, 37, None),
    "bert-h32": ("bert", 32, 4, 2, 37, None),
    "bert-h60-5heads-eps1e-7": ("bert", 60, 5, 2, 64, 1e-7),
    "roberta-h60-5heads-eps1e-3": ("roberta", 60, 5, 2, 64, 1e-3),
    "bert-h48-3heads-3layers": ("bert", 48, 3, 3, 131, None),
    "roberta-h48-3heads-3layers": ("roberta", 48, 3, 3, 131, None),
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """Lazily built HF dirs, one per (case, head)."""
  built = {}

  def get(case: str, head: str | None = None):
    if (case, head) not in built:
      fam, h, n, l, f, eps = CASES[case]
      path = tmp_path_factory.mktemp(f"{case}-{head}")
      model, tok = make_hf_dir(path, fam, hidden_size=h, num_attention_heads=n, num_hidden_layers=l,
                               intermediate_size=f, layer_norm_eps=eps, head=head, seed=len(built))
      built[case, head] = (path, model, tok)
    return built[case, head]

  return get


@pytest.mark.parametrize("case", list(CASES))
def test_encoder_parity_fp32(hf_dirs, case):
  path, tmodel, _ = hf_dirs(case)
  cfg = tmodel.config
  model, params, meta = _load(path)
  assert meta["pooler"] and not meta["mlm"] and not meta["cl"]
  assert model.config.layer_norm_eps == cfg.layer_norm_eps
  inputs = _inputs(cfg.model_type, cfg.vocab_size, cfg.pad_token_id)
  ref = _torch_run(tmodel, inputs, output_hidden_states=True)
  out = _ours_run(model, params, inputs, output_hidden_states=True)
  # every position, padded ones included (HF computes them the same way)
  assert out["last_hidden_state"].shape == tuple(ref.last_hidden_state.shape)
  assert _maxdiff(out["last_hidden_state"], ref.last_hidden_state) <= FP32_ATOL
  assert _maxdiff(out["pooler_output"], ref.pooler_output) <= FP32_ATOL
  assert len(out["hidden_states"]) == len(ref.hidden_states) == cfg.num_hidden_layers + 1
  for i, (a, b) in enumerate(zip(out["hidden_states"], ref.hidden_states)):
    assert _maxdiff(a, b) <= FP32_ATOL, f"hidden_states[{i}]"
  # the outputs are not trivially small: the tolerance means something
  assert float(np.abs(ref.last_hidden_state.numpy()).max()) > 0.5


def test_padding_does_not_change_unpadded_rows(hf_dirs):
  """A row padded to a longer batch gives the same states on its real tokens (ours, and = HF)."""
  path, tmodel, _ = hf_dirs("roberta-h32")
  cfg = tmodel.config
  model, params, _ = _load(path)
  inputs = _inputs("roberta", cfg.vocab_size, cfg.pad_token_id, lengths=(11, 5, 3), seed=3)
  row = {k: v[1:2, :5] for k, v in inputs.items()}
  full = np.asarray(_ours_run(model, params, inputs)["last_hidden_state"])[1, :5]
  alone = np.asarray(_ours_run(model, params, row)["last_hidden_state"])[0]
  assert _maxdiff(full, alone) <= FP32_ATOL
  assert _maxdiff(alone, _torch_run(tmodel, row).last_hidden_state[0]) <= FP32_ATOL


@pytest.mark.parametrize("case", ["roberta-h32", "bert-h60-5heads-eps1e-7"])
def test_mlm_logits_parity_fp32(hf_dirs, case):
  path, tmodel, _ = hf_dirs(case, head="mlm")
  cfg = tmodel.config
  model, params, meta = _load(path)
  assert meta["mlm"] and not meta["pooler"]
  assert meta["hf_prefix"] == ("roberta." if cfg.model_type == "roberta" else "bert.")
  inputs = _inputs(cfg.model_type, cfg.vocab_size, cfg.pad_token_id, seed=1)
  ref = _torch_run(tmodel, inputs, output_hidden_states=True)
  out = _ours_run(model, params, inputs, return_mlm_logits=True, output_hidden_states=True)
  assert out["mlm_logits"].dtype == jnp.float32
  assert out["mlm_logits"].shape == tuple(ref.logits.shape) == (3, 11, cfg.vocab_size)
  assert _maxdiff(out["mlm_logits"], ref.logits) <= FP32_ATOL
  assert _maxdiff(out["last_hidden_state"], ref.hidden_states[-1]) <= FP32_ATOL
  # without the flag the head is not run
  assert "mlm_logits" not in _ours_run(model, params, inputs)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_decoder_cross_attention_parity_fp32(tmp_path, family):
  import transformers as tf  # pylint: disable=import-outside-toplevel
  cfg_cls, model_cls = (tf.BertConfig, tf.BertModel) if family == "bert" else (tf.RobertaConfig, tf.RobertaModel)
  extra = {} if family == "bert" else dict(pad_token_id=1, type_vocab_size=1)
  cfg = cfg_cls(vocab_size=97, hidden_size=40, num_hidden_layers=2, num_attention_heads=5,
                intermediate_size=53, max_position_embeddings=40, is_decoder=True,
                add_cross_attention=True, **extra)
  torch.manual_seed(7)
  tmodel = _randomize_(model_cls(cfg), seed=7)
  tmodel.save_pretrained(tmp_path)
  model, params, meta = _load(tmp_path)
  assert model.config.is_decoder and model.config.add_cross_attention
  assert "crossattention" in params["encoder"]["layer_0"]

  inputs = _inputs(family, cfg.vocab_size, cfg.pad_token_id, lengths=(9, 6, 2), seed=2)
  rng = np.random.default_rng(5)
  enc = rng.standard_normal((3, 7, 40)).astype(np.float32)
  enc_mask = (np.arange(7)[None, :] < np.array([[7], [4], [1]])).astype(np.int64)
  with torch.no_grad():
    ref = tmodel(**{k: torch.as_tensor(v) for k, v in inputs.items()},
                 encoder_hidden_states=torch.as_tensor(enc), encoder_attention_mask=torch.as_tensor(enc_mask),
                 output_hidden_states=True, use_cache=False)
  out = _ours_run(model, params, inputs, encoder_hidden_states=jnp.asarray(enc),
                  encoder_attention_mask=jnp.asarray(enc_mask), output_hidden_states=True)
  assert _maxdiff(out["last_hidden_state"], ref.last_hidden_state) <= FP32_ATOL
  assert _maxdiff(out["pooler_output"], ref.pooler_output) <= FP32_ATOL
  for i, (a, b) in enumerate(zip(out["hidden_states"], ref.hidden_states)):
    assert _maxdiff(a, b) <= FP32_ATOL, f"hidden_states[{i}]"

  # causal: a token's state does not depend on later tokens
  changed = {k: v.copy() for k, v in inputs.items()}
  changed["input_ids"][0, 5:] = 5 + (changed["input_ids"][0, 5:] - 4) % (cfg.vocab_size - 5)
  out2 = _ours_run(model, params, changed, encoder_hidden_states=jnp.asarray(enc),
                   encoder_attention_mask=jnp.asarray(enc_mask))
  h1, h2 = np.asarray(out["last_hidden_state"]), np.asarray(out2["last_hidden_state"])
  assert _maxdiff(h1[0, :5], h2[0, :5]) <= 1e-6
  assert _maxdiff(h1[0, 5:9], h2[0, 5:9]) > 1e-3
  # cross-attention is live and respects encoder_attention_mask
  enc2 = enc.copy()
  enc2[1, 4:] += 10.0  # masked-out encoder positions of row 1
  enc2[0, 0] += 10.0   # a visible encoder position of row 0
  out3 = _ours_run(model, params, inputs, encoder_hidden_states=jnp.asarray(enc2),
                   encoder_attention_mask=jnp.asarray(enc_mask))
  h3 = np.asarray(out3["last_hidden_state"])
  assert _maxdiff(h1[1], h3[1]) <= 1e-6
  assert _maxdiff(h1[0], h3[0]) > 1e-3


@pytest.mark.parametrize("case", ["roberta-h60-5heads-eps1e-3", "bert-h48-3heads-3layers"])
def test_bf16_compute_close_to_torch_fp32(hf_dirs, case):
  path, tmodel, _ = hf_dirs(case)
  cfg = tmodel.config
  model, params, _ = _load(path, dtype=jnp.bfloat16)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x: x.dtype == np.float32, params))
  inputs = _inputs(cfg.model_type, cfg.vocab_size, cfg.pad_token_id)
  ref = _torch_run(tmodel, inputs, output_hidden_states=True)
  out = _ours_run(model, params, inputs, output_hidden_states=True)
  assert out["last_hidden_state"].dtype == jnp.bfloat16
  rels = []
  for a, b in zip(out["hidden_states"], ref.hidden_states):
    rels.append(_maxdiff(a, b) / float(np.abs(b.numpy()).max()))
  rels.append(_maxdiff(out["pooler_output"], ref.pooler_output) /
              float(np.abs(ref.pooler_output.numpy()).max()))
  assert max(rels) <= BF16_REL_TOL, rels
  # but bf16 is really in use: not bit-identical to fp32
  assert _maxdiff(out["last_hidden_state"], ref.last_hidden_state) > 1e-4


@pytest.mark.parametrize("impl,norm", [("auto", "xla"), ("fused_interpret", "xla"),
                                       ("fused_qkv_interpret", "fused_interpret")])
def test_bf16_fused_attention_close_to_torch_fp32(hf_dirs, impl, norm):
  """Lengths and head size the fused kernel takes (32 tokens, head dim 16): "auto" is the Triton
  kernel on a GPU and XLA on CPU; "fused_interpret" is the kernel in the Pallas interpreter, and
  "fused_qkv_interpret" its packed-q/k/v form, here with the fused residual + LayerNorm kernels."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  path, tmodel, _ = hf_dirs("roberta-h48-3heads-3layers")
  cfg = tmodel.config
  model, params, _ = _load(path, dtype=jnp.bfloat16)
  model = model.clone(config=dataclasses.replace(model.config, attention_impl=impl, norm_impl=norm))
  inputs = _inputs("roberta", cfg.vocab_size, cfg.pad_token_id, lengths=(32, 20, 9))
  ref = _torch_run(tmodel, inputs).last_hidden_state
  out = _ours_run(model, params, inputs)["last_hidden_state"]
  assert _maxdiff(out, ref) / float(np.abs(ref.numpy()).max()) <= BF16_REL_TOL


def test_bf16_mlm_logits_close_to_torch_fp32(hf_dirs):
  path, tmodel, _ = hf_dirs("roberta-h32", head="mlm")
  cfg = tmodel.config
  model, params, _ = _load(path, dtype=jnp.bfloat16)
  inputs = _inputs("roberta", cfg.vocab_size, cfg.pad_token_id, seed=1)
  ref = _torch_run(tmodel, inputs).logits.numpy()
  logits = _ours_run(model, params, inputs, return_mlm_logits=True)["mlm_logits"]
  assert logits.dtype == jnp.float32  # logits are returned in float32 even under bf16 compute
  assert _maxdiff(logits, ref) / float(np.abs(ref).max()) <= BF16_REL_TOL
  # top-1 predictions mostly agree
  assert np.mean(np.argmax(np.asarray(logits), -1) == np.argmax(ref, -1)) >= 0.8


def test_remat_gives_identical_outputs_and_grads(hf_dirs):
  path, tmodel, _ = hf_dirs("bert-h48-3heads-3layers")
  cfg = tmodel.config
  plain, params, _ = _load(path)
  remat, params2, _ = _load(path, remat=True)
  assert remat.remat and not plain.remat
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)
  inputs = _inputs("bert", cfg.vocab_size, cfg.pad_token_id)
  # On CPU the forward pass is bitwise identical (measured max|diff| = 0); allow 1e-6 for other backends.
  a = _ours_run(plain, params, inputs, output_hidden_states=True)
  b = _ours_run(remat, params, inputs, output_hidden_states=True)
  for x, y in zip(a["hidden_states"], b["hidden_states"]):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(a["pooler_output"]), np.asarray(b["pooler_output"]), rtol=0, atol=1e-6)
  assert _maxdiff(b["last_hidden_state"], _torch_run(tmodel, inputs).last_hidden_state) <= FP32_ATOL

  def loss(p, m):
    return jnp.sum(jnp.square(_ours_run(m, p, inputs)["pooler_output"]))

  g1 = jax.jit(jax.grad(loss), static_argnums=1)(params, plain)
  g2 = jax.jit(jax.grad(loss), static_argnums=1)(params, remat)
  flat1, flat2 = jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)
  assert len(flat1) == len(flat2) > 0
  for x, y in zip(flat1, flat2):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case,remat", [("roberta-h48-3heads-3layers", False), ("bert-h60-5heads-eps1e-7", True)])
def test_cls_only_last_layer_matches_hf_cls(hf_dirs, case, remat):
  """cls_only_last_layer: the last block for position 0 alone (keys / values over every position)
  gives HF's CLS state and pooler output; the MLM head cannot be asked for with it."""
  path, tmodel, _ = hf_dirs(case)
  cfg = tmodel.config
  model, params, _ = _load(path, remat=remat)
  inputs = _inputs(cfg.model_type, cfg.vocab_size, cfg.pad_token_id, seed=4)
  ref = _torch_run(tmodel, inputs, output_hidden_states=True)
  out = _ours_run(model, params, inputs, cls_only_last_layer=True, output_hidden_states=True)
  assert out["last_hidden_state"].shape == (3, 1, cfg.hidden_size)
  assert _maxdiff(out["last_hidden_state"], ref.last_hidden_state[:, :1]) <= FP32_ATOL
  assert _maxdiff(out["pooler_output"], ref.pooler_output) <= FP32_ATOL
  assert _maxdiff(out["hidden_states"][-2], ref.hidden_states[-2]) <= FP32_ATOL  # earlier layers in full
  assert float(np.abs(ref.last_hidden_state[:, 0].numpy()).max()) > 0.5

  # Gradients through the CLS state equal those of the full last layer.
  def loss(p, cls_only):
    h = _ours_run(model, p, inputs, cls_only_last_layer=cls_only)["last_hidden_state"][:, 0]
    return jnp.sum(jnp.sin(h))

  g_full = jax.tree_util.tree_leaves(jax.grad(loss)(params, False))
  g_cls = jax.tree_util.tree_leaves(jax.grad(loss)(params, True))
  assert len(g_full) == len(g_cls) > 0
  for x, y in zip(g_full, g_cls):  # fp32 rounding of a different op order, relative to the leaf's scale
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0, atol=1e-6 * max(1.0, float(np.abs(x).max())))
  with pytest.raises(ValueError, match="cls_only_last_layer"):
    _ours_run(model, params, inputs, cls_only_last_layer=True, return_mlm_logits=True)
