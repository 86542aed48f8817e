"""LoRA adapters (`mmret_jax.models.lora`) on tiny random mT5 (`t5.T5ForConditionalGeneration`) and BLOOM
(`bloom.BloomForCausalLM`) models: mBLIP's target sets, PEFT's init, injected == merged outputs, a masked train
step that moves only the adapters, the adapter dropout, and PEFT adapter dirs both ways against `peft` on the
HF models built from our converted state dicts (CPU, fp32).
"""

from __future__ import annotations

import json
import os

os.environ["TRANSFORMERS_VERBOSITY"] = "error"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mmret_jax.convert import bloom as bloom_convert  # noqa: E402
from mmret_jax.convert import t5 as t5_convert  # noqa: E402
from mmret_jax.models import bloom, layers, lora, t5  # noqa: E402

# Measured max|diff| (max|logit| 1.9 mT5 / 0.27 BLOOM): merged vs injected 1.3e-6 / 1.9e-7; ours -> peft
# 1.2e-6 / 2.4e-7; peft -> ours 5.9e-6 / 2.3e-7; the adapters move the logits by 1.9 / 0.50.
MERGE_ATOL = 1e-5
PEFT_ATOL = 1e-4

# mT0-like: gated-gelu, untied head, inner_dim 24 != d_model 32, 2 encoder and 3 decoder blocks.
T5_FIELDS = dict(model_type="mt5", vocab_size=61, d_model=32, num_heads=4, d_kv=6, d_ff=40, num_layers=2,
                 num_decoder_layers=3, relative_attention_num_buckets=8, relative_attention_max_distance=12,
                 feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)
BLOOM_FIELDS = dict(vocab_size=53, hidden_size=24, n_layer=2, n_head=3)
# mBLIP's PEFT `target_modules` for `lora_all` (the mT0 list with ".k" / ".o" written as intended).
MBLIP_TARGET_MODULES = {("mt5", "lora_all"): ["q", "k", "v", "o", "wi_0", "wi_1", "wo"], ("mt5", "lora"): ["q", "v"],
                        ("bloom", "lora_all"): ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
                        ("bloom", "lora"): ["query_key_value"]}
TASK_TYPE = {"mt5": "SEQ_2_SEQ_LM", "bloom": "CAUSAL_LM"}


def _maxdiff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _randomize_b(lora_params: dict, seed: int, std: float) -> dict:
  """The adapters with lora_B redrawn N(0, std^2) (a fresh adapter's B is zero)."""
  out = {}
  for i, (path, ab) in enumerate(sorted(lora_params.items())):
    b = ab["lora_B"]
    new = std * jax.random.normal(jax.random.PRNGKey(seed * 1000 + i), b.value.shape, jnp.float32)
    out[path] = {"lora_A": ab["lora_A"], "lora_B": b.replace_boxed(new)}
  return out


class Family:
  """Our model, its boxed params (init_params), the HF module keys, a batch, and jitted forwards."""

  def __init__(self, name: str):
    self.name = name
    # lora_B's std in the tests: the adapters move the logits by about their own size (mT5's 47 adapted
    # matrices next to T5's small init need less).
    self.b_std = 0.1 if name == "mt5" else 0.5
    rng = np.random.default_rng(1)
    if name == "mt5":
      self.config = t5.T5Config.from_dict(T5_FIELDS)
      self.model = t5.T5ForConditionalGeneration(self.config)
      boxed = t5.init_params(self.model, jax.random.PRNGKey(0))
      head = boxed["lm_head"]["kernel"]  # HF's init N(0, 1) gives logits ~ 20: scaled to ~ 2
      self.boxed = {**boxed, "lm_head": {"kernel": head.replace_boxed(0.1 * head.value)}}
      self.hf_keys = lora.hf_module_keys(t5_convert.seq2seq_rules(self.config))
      mask = np.array([[1] * 7, [1] * 4 + [0] * 3])
      self.args = (jnp.asarray(rng.integers(2, 61, (2, 7))), jnp.asarray(mask))
      self.kwargs = {"decoder_input_ids": jnp.asarray(rng.integers(0, 61, (2, 5)))}
    else:
      self.config = bloom.BloomConfig.from_dict(BLOOM_FIELDS)
      self.model = bloom.BloomForCausalLM(self.config)
      self.boxed = bloom.init_params(self.model, jax.random.PRNGKey(0))
      self.hf_keys = lora.hf_module_keys(bloom_convert.rules(self.config))
      mask = np.array([[1] * 6, [0] * 2 + [1] * 4])  # mBLIP pads BLOOM batches on the left
      self.args = (jnp.asarray(rng.integers(0, 53, (2, 6))), jnp.asarray(mask))
      self.kwargs = {}
    self.params = nn.unbox(self.boxed)
    m, args, kw = self.model, self.args, self.kwargs
    self.base = jax.jit(lambda p: m.apply({"params": p}, *args, **kw)["logits"])
    self._injected = {}

  def injected(self, config: lora.LoraConfig):
    """jitted (params, lora params[, dropout rng]) -> logits, with the adapters injected."""
    if config not in self._injected:
      m, args, kw = self.model, self.args, self.kwargs

      def f(p, lp, rng=None):
        rngs = None if rng is None else {"dropout": rng}
        return lora.apply_with_lora(m, p, lp, config, *args, rngs=rngs, deterministic=rng is None, **kw)["logits"]
      self._injected[config] = jax.jit(f)
    return self._injected[config]

  def hf_model(self):
    """The HF model with our params (convert/*.py to_state_dict), eval mode."""
    import transformers as tf  # pylint: disable=import-outside-toplevel
    if self.name == "mt5":
      meta = {"seq2seq": True, "tied_lm_head": False}
      sd = t5_convert.to_state_dict(self.params, self.config.to_dict(), meta)
      fields = {k: v for k, v in self.config.to_dict().items() if k != "model_type"}
      model = tf.MT5ForConditionalGeneration(tf.MT5Config(**fields))
      model.lm_head.weight = torch.nn.Parameter(torch.zeros_like(model.lm_head.weight))  # transformers 5 ties it
    else:
      sd = bloom_convert.to_state_dict(self.params, self.config.to_dict(), {})
      model = tf.BloomForCausalLM(tf.BloomConfig(**self.config.to_dict()))
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    return model.eval()

  def hf_logits(self, model) -> np.ndarray:
    kw = {k: torch.from_numpy(np.array(v)) for k, v in self.kwargs.items()}
    with torch.no_grad():
      out = model(input_ids=torch.from_numpy(np.array(self.args[0])),
                  attention_mask=torch.from_numpy(np.array(self.args[1])), **kw)
    return out.logits.numpy()


@pytest.fixture(scope="module")
def families():
  built = {}

  def get(name: str) -> Family:
    if name not in built:
      built[name] = Family(name)
    return built[name]
  return get


def _expected_paths(name: str, kind: str) -> list[str]:
  """Our module paths mBLIP's target sets name, spelled out from the tiny configs."""
  out = []
  if name == "mt5":
    attn = ("q", "k", "v", "o") if kind == "lora_all" else ("q", "v")
    ffn = ("wi_0", "wi_1", "wo") if kind == "lora_all" else ()
    for stack, n in (("encoder", 2), ("decoder", 3)):
      for i in range(n):
        block = f"{stack}/block_{i}"
        out += [f"{block}/layer_0/SelfAttention/{p}" for p in attn]
        if stack == "decoder":
          out += [f"{block}/layer_1/EncDecAttention/{p}" for p in attn]
        out += [f"{block}/layer_{1 + (stack == 'decoder')}/DenseReluDense/{p}" for p in ffn]
  else:
    for i in range(2):
      out.append(f"h_{i}/self_attention/query_key_value")
      if kind == "lora_all":
        out += [f"h_{i}/self_attention/dense", f"h_{i}/mlp/dense_h_to_4h", f"h_{i}/mlp/dense_4h_to_h"]
  return sorted(out)


@pytest.mark.parametrize("name,kind", [("mt5", "lora_all"), ("mt5", "lora"), ("bloom", "lora_all"),
                                       ("bloom", "lora")])
def test_targets_and_init(families, name, kind):
  """The presets select exactly mBLIP's modules (no lm_head, no embeddings); A ~ U(+-1/sqrt(in)), B = 0, boxed
  with the kernel's axis names; a fresh adapter leaves the logits as they were."""
  fam = families(name)
  config = lora.LoraConfig.preset(name, kind)
  assert (config.r, config.lora_alpha, config.lora_dropout, config.scale) == (8, 16.0, 0.05, 2.0)
  paths = lora.target_paths(fam.params, config.targets)
  assert paths == _expected_paths(name, kind)
  assert len(paths) == {("mt5", "lora_all"): 47, ("mt5", "lora"): 16, ("bloom", "lora_all"): 8,
                        ("bloom", "lora"): 2}[(name, kind)]
  adapters = lora.init_lora(fam.boxed, config, jax.random.PRNGKey(3))
  assert sorted(adapters) == paths
  kernels = lora.dense_kernels(fam.boxed)
  all_a = []
  for path, ab in adapters.items():
    kernel = kernels[path]
    d_in, d_out = kernel.value.shape
    a, b = ab["lora_A"], ab["lora_B"]
    assert isinstance(a, nn.LogicallyPartitioned) and isinstance(b, nn.LogicallyPartitioned)
    assert a.names == (kernel.names[0], None) and b.names == (None, kernel.names[1])
    assert a.value.shape == (d_in, 8) and b.value.shape == (8, d_out)
    assert a.value.dtype == b.value.dtype == jnp.float32
    np.testing.assert_array_equal(b.value, 0.0)
    assert float(jnp.max(jnp.abs(a.value))) <= d_in ** -0.5
    all_a.append(np.asarray(a.value) * d_in ** 0.5)  # U(-1, 1)
  all_a = np.concatenate([x.ravel() for x in all_a])
  assert abs(all_a.mean()) < 0.1 and abs(all_a.var() - 1 / 3) < 0.05 and np.abs(all_a).max() > 0.95
  assert len({float(ab["lora_A"].value[0, 0]) for ab in adapters.values()}) == len(adapters)  # per-path draws
  again = lora.init_lora(fam.params, config, jax.random.PRNGKey(3))  # unboxed params: same draws, names None
  np.testing.assert_array_equal(again[paths[0]]["lora_A"].value, adapters[paths[0]]["lora_A"].value)
  assert again[paths[0]]["lora_A"].names == (None, None)
  # Not bitwise: XLA fuses the (zero) adapter term into the compiled graph differently.
  assert _maxdiff(fam.injected(config)(fam.params, adapters), fam.base(fam.params)) <= 1e-6


@pytest.mark.parametrize("name", ["mt5", "bloom"])
def test_merged_equals_injected(families, name):
  """With B random: injected logits == model.apply on the merged params (<= 1e-5) and differ from the base
  logits; unmerge gives the params back; merging keeps the boxes."""
  fam = families(name)
  config = lora.LoraConfig.preset(name, "lora_all")
  adapters = _randomize_b(lora.init_lora(fam.boxed, config, jax.random.PRNGKey(1)), seed=2, std=fam.b_std)
  injected = fam.injected(config)(fam.params, adapters)
  merged_params = lora.merge(fam.params, adapters, config)
  merged = fam.base(merged_params)
  base = fam.base(fam.params)
  assert _maxdiff(injected, merged) <= MERGE_ATOL, _maxdiff(injected, merged)
  assert _maxdiff(injected, base) > 0.05 * float(jnp.max(jnp.abs(base)))  # the adapters matter
  back = lora.unmerge(merged_params, adapters, config)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(fam.params)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  boxed_merged = lora.merge(fam.boxed, adapters, config)
  assert jax.tree.structure(boxed_merged, is_leaf=lambda x: isinstance(x, nn.Partitioned)) == jax.tree.structure(
      fam.boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  np.testing.assert_array_equal(nn.unbox(boxed_merged)["lm_head" if name == "mt5" else "ln_f"],
                                fam.params["lm_head" if name == "mt5" else "ln_f"])


@pytest.mark.parametrize("name", ["mt5", "bloom"])
def test_train_step_moves_only_trainable(families, name):
  """One AdamW step through `freeze_all_but`: every adapter leaf and the unfrozen final norm change, every
  other base param stays bitwise; for BLOOM the same gradients with rematerialised blocks."""
  fam = families(name)
  config = lora.LoraConfig.preset(name, "lora" if name == "mt5" else "lora_all")  # mT5: a smaller graph
  adapters = _randomize_b(lora.init_lora(fam.boxed, config, jax.random.PRNGKey(1)), seed=3, std=fam.b_std)
  norm = "decoder/final_layer_norm" if name == "mt5" else "ln_f"
  tx = lora.freeze_all_but(optax.adamw(1e-2, weight_decay=0.1), (r"^lora/", rf"^params/{norm}/"))
  tree = {"params": fam.params, "lora": nn.unbox(adapters)}
  m, args, kw = fam.model, fam.args, fam.kwargs

  def loss_fn(t, rng, model=m):
    logits = lora.apply_with_lora(model, t["params"], t["lora"], config, *args, rngs={"dropout": rng},
                                  deterministic=False, **kw)["logits"]
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

  @jax.jit
  def step(t, opt_state, rng):
    grads = jax.grad(loss_fn)(t, rng)
    updates, opt_state = tx.update(grads, opt_state, t)
    return optax.apply_updates(t, updates), grads

  new, grads = step(tree, tx.init(tree), jax.random.PRNGKey(7))
  flat_old = dict(jax.tree_util.tree_leaves_with_path(tree))
  n_changed = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(new):
    p = "/".join(k.key for k in path)
    if p.startswith("lora/") or p.startswith(f"params/{norm}/"):
      assert not np.array_equal(leaf, flat_old[path]), p
      n_changed += 1
    else:
      np.testing.assert_array_equal(leaf, flat_old[path], err_msg=p)
  assert n_changed == 2 * len(adapters) + 1 + (name == "bloom")  # ln_f has a bias
  with pytest.raises(ValueError, match="match no leaf"):
    lora.freeze_all_but(optax.sgd(1.0), (r"^adapters/",)).init(tree)
  if name == "bloom":
    remat = bloom.BloomForCausalLM(fam.config, remat=True)
    grads_remat = jax.jit(lambda t, rng: jax.grad(lambda t_: loss_fn(t_, rng, remat))(t))(tree, jax.random.PRNGKey(7))
    for a, b in zip(jax.tree.leaves(grads_remat), jax.tree.leaves(grads)):
      np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_dropout_on_the_adapter_input_only(families):
  """Training mode: the same rng gives the same logits, another rng others; with B = 0 (or lora_dropout 0)
  training equals evaluation (the base path never sees the dropout); without a dropout rng it is an error."""
  fam = families("bloom")
  config = lora.LoraConfig.preset("bloom", "lora_all", lora_dropout=0.3)
  fresh = lora.init_lora(fam.boxed, config, jax.random.PRNGKey(1))
  adapters = _randomize_b(fresh, seed=4, std=fam.b_std)
  f = fam.injected(config)
  eval_logits = f(fam.params, adapters)
  k1, k2 = jax.random.PRNGKey(11), jax.random.PRNGKey(12)
  t1, t1_again, t2 = f(fam.params, adapters, k1), f(fam.params, adapters, k1), f(fam.params, adapters, k2)
  np.testing.assert_array_equal(t1, t1_again)
  assert _maxdiff(t1, t2) > 1e-3 and _maxdiff(t1, eval_logits) > 1e-3
  np.testing.assert_array_equal(f(fam.params, fresh, k1), f(fam.params, fresh))
  no_drop = lora.LoraConfig.preset("bloom", "lora_all", lora_dropout=0.0)
  assert _maxdiff(fam.injected(no_drop)(fam.params, adapters, k1), eval_logits) <= 1e-6
  with pytest.raises(ValueError, match="needs rngs"):
    lora.apply_with_lora(fam.model, fam.params, adapters, config, *fam.args, deterministic=False)


def test_dropout_reaches_packed_projections(families):
  """mT5's q (a packed self-attention projection) adapted alone: training with adapter dropout differs per
  rng and from evaluation, so the dropout reaches the packed path (run as separate Dense calls)."""
  fam = families("mt5")
  config = lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, targets=(r".*/SelfAttention/q",))
  fresh = lora.init_lora(fam.boxed, config, jax.random.PRNGKey(1))
  adapters = _randomize_b(fresh, seed=4, std=fam.b_std)
  f = fam.injected(config)
  eval_logits = f(fam.params, adapters)
  t1, t2 = f(fam.params, adapters, jax.random.PRNGKey(11)), f(fam.params, adapters, jax.random.PRNGKey(12))
  assert _maxdiff(t1, t2) > 1e-4 and _maxdiff(t1, eval_logits) > 1e-4
  no_drop = lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, targets=config.targets)
  assert _maxdiff(fam.injected(no_drop)(fam.params, adapters, jax.random.PRNGKey(11)), eval_logits) <= 1e-5


def test_dropout_statistics():
  """A zero Dense with A = B = I and scale 1: the output is dropout(x) itself, so the values are 0 or
  1 / (1 - p), zero at rate p, and the mask is new per rng."""
  class Toy(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic=True):
      del deterministic
      return layers.Dense(8, ("embed", "mlp"), name="proj")(x)

  model = Toy()
  x = jnp.ones((4, 512, 8))
  params = jax.tree.map(jnp.zeros_like, nn.unbox(model.init(jax.random.PRNGKey(0), x)["params"]))
  config = lora.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.25, targets=("proj",))
  adapters = {"proj": {"lora_A": jnp.eye(8), "lora_B": jnp.eye(8)}}
  y = lora.apply_with_lora(model, params, adapters, config, x, rngs={"dropout": jax.random.PRNGKey(5)},
                           deterministic=False)
  vals = np.unique(np.round(np.asarray(y), 5))
  np.testing.assert_allclose(vals, [0.0, 1 / 0.75], rtol=1e-5)
  assert abs(float(jnp.mean(y == 0)) - 0.25) < 0.02
  y2 = lora.apply_with_lora(model, params, adapters, config, x, rngs={"dropout": jax.random.PRNGKey(6)},
                            deterministic=False)
  assert float(jnp.mean((y == 0) != (y2 == 0))) > 0.2
  np.testing.assert_array_equal(lora.apply_with_lora(model, params, adapters, config, x), x)


def _peft_adapted(peft_model) -> set[str]:
  from peft.tuners.lora import LoraLayer  # pylint: disable=import-outside-toplevel
  return {n.removeprefix(lora.PEFT_PREFIX) for n, mod in peft_model.named_modules() if isinstance(mod, LoraLayer)}


@pytest.mark.parametrize("name", ["mt5", "bloom"])
def test_our_adapter_loads_into_peft(families, tmp_path, name):
  """save_peft -> PeftModel.from_pretrained on the HF model of our params: PEFT adapts exactly our modules (the
  ones its own `get_peft_model` picks for mBLIP's target_modules) and its logits are ours (<= 1e-4)."""
  import peft  # pylint: disable=import-outside-toplevel
  fam = families(name)
  config = lora.LoraConfig.preset(name, "lora_all")
  adapters = _randomize_b(lora.init_lora(fam.boxed, config, jax.random.PRNGKey(5)), seed=5, std=fam.b_std)
  lora.save_peft(tmp_path, adapters, config, fam.hf_keys, base_model_name_or_path="tiny", task_type=TASK_TYPE[name])
  written = json.loads((tmp_path / lora.ADAPTER_CONFIG).read_text())
  assert sorted(written["target_modules"]) == sorted(MBLIP_TARGET_MODULES[(name, "lora_all")])
  ours = fam.injected(config)(fam.params, adapters)

  reference = peft.get_peft_model(fam.hf_model(), peft.LoraConfig(
      task_type=TASK_TYPE[name], target_modules=MBLIP_TARGET_MODULES[(name, "lora_all")], r=8, lora_alpha=16,
      lora_dropout=0.05))
  assert _peft_adapted(reference) == {fam.hf_keys[p] for p in adapters}

  loaded = peft.PeftModel.from_pretrained(fam.hf_model(), tmp_path).eval()
  assert _peft_adapted(loaded) == {fam.hf_keys[p] for p in adapters}
  theirs = fam.hf_logits(loaded)
  assert _maxdiff(ours, theirs) <= PEFT_ATOL, _maxdiff(ours, theirs)
  assert _maxdiff(theirs, fam.hf_logits(fam.hf_model())) > 1e-2  # the adapter was loaded, not ignored


@pytest.mark.parametrize("name,kind", [("mt5", "lora"), ("bloom", "lora_all")])
def test_peft_adapter_loads_into_ours(families, tmp_path, name, kind):
  """An adapter trained-looking in peft (A, B redrawn; r 4, alpha 12) -> save_pretrained -> load_peft: the
  config read back, our preset's modules, and the peft model's logits (<= 1e-4)."""
  import peft  # pylint: disable=import-outside-toplevel
  fam = families(name)
  pm = peft.get_peft_model(fam.hf_model(), peft.LoraConfig(
      task_type=TASK_TYPE[name], target_modules=MBLIP_TARGET_MODULES[(name, kind)], r=4, lora_alpha=12,
      lora_dropout=0.1))
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if "lora_" in n:
        p.copy_(0.3 * torch.randn(p.shape, generator=g))
  pm.save_pretrained(tmp_path)
  pm.eval()
  adapters, config = lora.load_peft(tmp_path, fam.boxed, fam.hf_keys)
  assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 12.0, 0.1)
  assert sorted(adapters) == lora.target_paths(fam.params, config.targets) == _expected_paths(name, kind)
  ab = adapters[sorted(adapters)[0]]
  assert ab["lora_A"].names[1] is None and ab["lora_B"].names[0] is None
  ours = lora.apply_with_lora(fam.model, fam.params, adapters, config, *fam.args, **fam.kwargs)["logits"]
  theirs = fam.hf_logits(pm)
  assert _maxdiff(ours, theirs) <= PEFT_ATOL, _maxdiff(ours, theirs)
  # Back out through save_peft: the same tensors under the same names.
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  lora.save_peft(tmp_path / "again", adapters, config, fam.hf_keys, task_type=TASK_TYPE[name])
  a, b = load_file(str(tmp_path / "adapter_model.safetensors")), load_file(str(tmp_path / "again" /
                                                                                "adapter_model.safetensors"))
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_cached_decoding_with_adapters(families):
  """mT5 with adapters: one cached `decode` call over all T positions gives the full forward's logits."""
  fam = families("mt5")
  config = lora.LoraConfig.preset("mt5", "lora_all")
  adapters = _randomize_b(lora.init_lora(fam.boxed, config, jax.random.PRNGKey(1)), seed=6, std=fam.b_std)
  ids, mask = fam.args
  dec = fam.kwargs["decoder_input_ids"]
  full = fam.injected(config)(fam.params, adapters)
  enc = lora.apply_with_lora(fam.model, fam.params, adapters, config, ids, mask,
                             method=t5.T5ForConditionalGeneration.encode)
  cache = t5.init_cache(fam.model, 2, dec.shape[1])
  logits, _ = lora.apply_with_lora(fam.model, fam.params, adapters, config, dec, enc, mask, decode=True,
                                   method=t5.T5ForConditionalGeneration.decode, variables={"cache": cache},
                                   mutable=["cache"])
  assert _maxdiff(logits, full) <= MERGE_ATOL, _maxdiff(logits, full)


def test_errors(families, tmp_path):
  """Clear errors: targets matching nothing, a bad regex or rank, adapters off the model or of the wrong
  shape, and PEFT dirs with mis-shaped, unexpected or missing keys or unsupported options."""
  fam = families("bloom")
  with pytest.raises(ValueError, match=r"match no Dense kernel.*h_0/self_attention"):
    lora.init_lora(fam.params, lora.LoraConfig(targets=(".*/SelfAttention/q",)), jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="not a valid regex"):
    lora.LoraConfig(targets=("h_(",))
  with pytest.raises(ValueError, match="positive integer"):
    lora.LoraConfig(r=0)
  with pytest.raises(ValueError, match="No LoRA preset"):
    lora.LoraConfig.preset("llama")
  config = lora.LoraConfig.preset("bloom", "lora")
  adapters = nn.unbox(lora.init_lora(fam.params, config, jax.random.PRNGKey(0)))
  with pytest.raises(ValueError, match="h_9/self_attention/query_key_value"):
    lora.apply_with_lora(fam.model, fam.params, {"h_9/self_attention/query_key_value": adapters[
        "h_0/self_attention/query_key_value"]}, config, *fam.args)
  wrong = {"h_0/self_attention/query_key_value": {"lora_A": jnp.zeros((5, 8)), "lora_B": jnp.zeros((8, 72))}}
  with pytest.raises(ValueError, match=r"h_0/self_attention/query_key_value: lora_A \(5, 8\)"):
    lora.merge(fam.params, wrong, config)

  from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel
  lora.save_peft(tmp_path, adapters, config, fam.hf_keys, task_type="CAUSAL_LM")
  good = load_file(str(tmp_path / "adapter_model.safetensors"))
  key_a = "base_model.model.transformer.h.1.self_attention.query_key_value.lora_A.weight"
  cases = [({**good, key_a: np.zeros((8, 7), np.float32)}, f"{key_a} (8, 7), expected (8, 24)"),
           ({**good, "base_model.model.transformer.h.0.mlp.dense_h_to_4h.lora_A.weight": good[key_a]},
            "missing keys: base_model.model.transformer.h.0.mlp.dense_h_to_4h.lora_B.weight"),
           ({**good, "base_model.model.lm_head.lora_A.weight": good[key_a]},
            "unexpected keys: base_model.model.lm_head.lora_A.weight"),
           ({k: v for k, v in good.items() if k != key_a}, f"missing keys: {key_a}")]
  for sd, needle in cases:
    save_file(sd, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError) as e:
      lora.load_peft(tmp_path, fam.params, fam.hf_keys)
    assert needle in str(e.value), str(e.value)
  save_file(good, str(tmp_path / "adapter_model.safetensors"))
  cfg = json.loads((tmp_path / lora.ADAPTER_CONFIG).read_text())
  (tmp_path / lora.ADAPTER_CONFIG).write_text(json.dumps({**cfg, "use_dora": True}))
  with pytest.raises(ValueError, match="unsupported LoRA options.*use_dora"):
    lora.load_peft(tmp_path, fam.params, fam.hf_keys)
  with pytest.raises(FileNotFoundError, match="adapter_config.json"):
    lora.load_peft(tmp_path / "nowhere", fam.params, fam.hf_keys)
  with pytest.raises(ValueError, match="No HF module key"):
    lora.save_peft(tmp_path / "x", {"proj": adapters["h_0/self_attention/query_key_value"]}, config, fam.hf_keys)
