"""models/quant.py: qwix weight-only int8 of the frozen LLM's block kernels (tiny mT5 and BLOOM, fp32 activations).

Measured (max|diff| / max|logit|, int8 per-channel): mT5 1.3e-2, BLOOM 9.7e-5 (its tied-embedding logits
dominate); quantized vs the float model on the dequantized weights (q * scale) <= 1e-5; LoRA on top vs LoRA on
the dequantized float weights <= 1e-5 (1 + max|logit|). Kernel bytes int8 + f32 scales / f32: 0.282 / 0.281.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mmret_jax.models import bloom, lora, quant, t5  # noqa: E402

INT8_REL = 2e-2  # max|diff| / max|logit|
DEQ_ATOL = 1e-5
T5_FIELDS = dict(model_type="mt5", vocab_size=61, d_model=32, num_heads=4, d_kv=6, d_ff=40, num_layers=2,
                 num_decoder_layers=3, relative_attention_num_buckets=8, relative_attention_max_distance=12,
                 feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)
BLOOM_FIELDS = dict(vocab_size=53, hidden_size=24, n_layer=2, n_head=3)


class Family:
  def __init__(self, name: str):
    rng = np.random.default_rng(0)
    if name == "mt5":
      self.model = t5.T5ForConditionalGeneration(t5.T5Config.from_dict(T5_FIELDS))
      self.boxed = t5.init_params(self.model, jax.random.PRNGKey(0))
      ids = jnp.ones((1, 8), jnp.int32)
      self.example = ((ids,), {"decoder_input_ids": ids})
      self.args = (jnp.asarray(rng.integers(2, 61, (2, 7))), jnp.asarray([[1] * 7, [1] * 4 + [0] * 3]))
      self.kwargs = {"decoder_input_ids": jnp.asarray(rng.integers(0, 61, (2, 5)))}
    else:
      self.model = bloom.BloomForCausalLM(bloom.BloomConfig.from_dict(BLOOM_FIELDS))
      self.boxed = bloom.init_params(self.model, jax.random.PRNGKey(0))
      self.example = ((jnp.ones((1, 8), jnp.int32),), {})
      self.args = (jnp.asarray(rng.integers(0, 53, (2, 6))), jnp.asarray([[1] * 6, [0] * 2 + [1] * 4]))
      self.kwargs = {}
    self.name = name
    self.params = nn.unbox(self.boxed)
    self.config = quant.QuantConfig(quant.TARGETS[name], bits=8)
    self.qparams = quant.quantize_params(self.model, self.boxed, self.config, *self.example[0], **self.example[1])
    m, a, kw, qc = self.model, self.args, self.kwargs, self.config
    self.float_fn = jax.jit(lambda p: m.apply({"params": p}, *a, **kw)["logits"])
    self.quant_fn = jax.jit(lambda q: quant.apply_quantized(m, q, qc, *a, **kw)["logits"])
    self.lora_config = lora.LoraConfig(r=4, lora_dropout=0.0, targets=lora.TARGETS[(name, "lora_all")])
    self.lora_quant_fn = jax.jit(lambda q, lp: lora.apply_with_lora(
        quant.quantized_model(m, qc), q, lp, self.lora_config, *a, **kw)["logits"])
    self.lora_float_fn = jax.jit(lambda p, lp: lora.apply_with_lora(m, p, lp, self.lora_config, *a, **kw)["logits"])


@pytest.fixture(scope="module", params=["mt5", "bloom"])
def fam(request):
  return Family(request.param)


def _maxdiff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def test_int8_logits_close_to_fp32(fam):
  ref, out = fam.float_fn(fam.params), fam.quant_fn(fam.qparams)
  rel = _maxdiff(ref, out) / float(np.max(np.abs(np.asarray(ref))))
  print(f"{fam.name}: int8 rel max|diff| {rel:.2e}")
  assert rel <= INT8_REL
  assert rel > 0  # the kernels really are quantized
  # exactly the float model on q * scale
  assert _maxdiff(out, fam.float_fn(quant.dequantize_params(fam.qparams))) <= DEQ_ATOL


def test_quantized_leaves_and_memory(fam):
  paths = quant.quantized_paths(fam.qparams)
  kernels = [p + "/kernel" for p in lora.target_paths(fam.params, quant.TARGETS[fam.name])]
  assert paths == sorted(kernels) and paths
  flat = {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(fam.qparams, is_leaf=lambda x: isinstance(
              x, nn.Partitioned))[0]}
  qv = [v for k, v in flat.items() if k.endswith("/qvalue")]
  assert qv and all(isinstance(v, nn.Partitioned) and v.value.dtype == jnp.int8 for v in qv)
  assert all(isinstance(v, nn.Partitioned) for v in flat.values())  # logical names kept on every leaf
  fp, q8 = quant.weight_bytes(fam.params, kernels), quant.weight_bytes(fam.qparams, kernels)
  # int8 values + one f32 scale per output column, exactly
  shapes = [np.shape(nn.unbox(lora.dense_kernels(fam.params)[p[:-len('/kernel')]])) for p in kernels]
  assert fp == sum(4 * i * o for i, o in shapes)
  assert q8 == sum(i * o + 4 * o for i, o in shapes)
  print(f"{fam.name}: kernel bytes {q8} / {fp} = {q8 / fp:.3f}")
  assert 0.25 < q8 / fp < 0.33


def test_lora_on_quantized(fam):
  ad = lora.init_lora(fam.boxed, fam.lora_config, jax.random.PRNGKey(1))
  ad = {p: {"lora_A": ab["lora_A"], "lora_B": ab["lora_B"].replace_boxed(
      0.1 * jax.random.normal(jax.random.PRNGKey(i), ab["lora_B"].value.shape))} for i, (p, ab) in enumerate(
      sorted(ad.items()))}
  out = fam.lora_quant_fn(fam.qparams, ad)
  ref = fam.lora_float_fn(quant.dequantize_params(fam.qparams), ad)
  assert _maxdiff(out, fam.quant_fn(fam.qparams)) > 1e-2  # the adapters act
  assert _maxdiff(out, ref) <= 1e-5 * (1 + float(np.max(np.abs(np.asarray(ref)))))
  # gradients reach the adapters through the int8 base
  g = jax.grad(lambda lp: jnp.sum(fam.lora_quant_fn(fam.qparams, lp) ** 2))(ad)
  assert all(float(jnp.abs(nn.unbox(v)["lora_A"]).max()) > 0 for v in g.values())


def test_bad_input_errors():
  model = bloom.BloomForCausalLM(bloom.BloomConfig.from_dict(BLOOM_FIELDS))
  params = nn.unbox(bloom.init_params(model, jax.random.PRNGKey(0)))
  ids = jnp.ones((1, 8), jnp.int32)
  with pytest.raises(ValueError, match="bits"):
    quant.QuantConfig(quant.TARGETS["bloom"], bits=3)
  with pytest.raises(ValueError, match="match no Dense kernel"):
    quant.quantize_params(model, params, quant.QuantConfig(("nothing/here",)), ids)
  bad = jax.tree.map(lambda x: x, params)
  name = sorted(bad)[0]
  first = next(iter(bad[name]))
  bad[name] = {**bad[name], first: jax.tree.map(lambda x: jnp.zeros((3,) + x.shape[1:]), bad[name][first])}
  with pytest.raises(ValueError, match="mis-shaped"):
    quant.quantize_params(model, bad, quant.QuantConfig(quant.TARGETS["bloom"]), ids)
