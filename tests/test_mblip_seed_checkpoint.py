"""The seed's training checkpoints (convert/mblip.load_seed_checkpoint): a Lightning `.ckpt` whose `state_dict`
holds `model.model.{query_tokens, qformer.*, language_projection.*}` plus optimizer state, and the LLM's PEFT
adapter saved by `save_pretrained` in the sibling `<epoch>-<step>/`, on tiny random HF BLIP-2 models (mT5 and
BLOOM LLMs, the configs of test_mblip_parity.py). The loaded params must equal the "trained" torch weights
bitwise, and our logits with the merged adapter the PeftModel's on the seed's prepend path (<= 1e-4)."""

from __future__ import annotations

import copy

import flax.linen as nn
import numpy as np
import pytest
import torch
import transformers as tf

from mmret_jax.convert import blip2 as blip2_convert, core, mblip as mblip_convert
from mmret_jax.models import blip2, lora, mblip

from test_mblip_parity import LLMS, Q, QFORMER, VISION, inputs, nhwc, torch_prefix

TASK_TYPE = {"mt5": "SEQ_2_SEQ_LM", "bloom": "CAUSAL_LM"}
TARGET_MODULES = {"mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
                  "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]}
# Measured max|diff| merged / injected vs PeftModel: mT5 2.4e-5 / 1.8e-5 (max|logit| 31, the adapter moves the
# logits by 11), BLOOM 4.8e-7 / 4.8e-7 (max|logit| 3.0, moved by 0.14).
SEED = ("query_tokens", "qformer.", "language_projection.")


def _flat(tree):
  return core._flatten(nn.unbox(tree))  # pylint: disable=protected-access


@pytest.fixture(scope="module", params=sorted(LLMS))
def seed(request, tmp_path_factory):
  import peft  # pylint: disable=import-outside-toplevel
  name = request.param
  torch.manual_seed(0)
  cfg = tf.Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=LLMS[name], num_query_tokens=Q)
  base_t = tf.Blip2ForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    for p in base_t.parameters():
      p.add_(0.05 * torch.randn_like(p))
  hf_config = cfg.to_dict()
  base, meta = mblip_convert.to_params({k: v.numpy() for k, v in base_t.state_dict().items()}, hf_config)
  # "training": the seed's modules move, the ViT and the LLM stay; LoRA on the LLM
  trained = copy.deepcopy(base_t)
  with torch.no_grad():
    for k, p in trained.named_parameters():
      if k.startswith(SEED):
        p.add_(0.1 * torch.randn_like(p))
  d = tmp_path_factory.mktemp(f"seed_{name}")
  sd = {"model.model." + k: v.clone() for k, v in trained.state_dict().items() if k.startswith(SEED)}
  torch.save({"epoch": 0, "global_step": 30, "state_dict": sd,
              "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 1e-4}]}],
              "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 0}}}}}, d / "0-30.ckpt")
  pm = peft.get_peft_model(trained.language_model, peft.LoraConfig(
      task_type=TASK_TYPE[name], target_modules=TARGET_MODULES[name], r=4, lora_alpha=12, lora_dropout=0.05))
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if "lora_" in n:
        p.copy_(0.05 * torch.randn(p.shape, generator=g))
  pm.save_pretrained(d / "0-30")
  pm.eval()
  model = mblip.MBlip(blip2.Blip2Config.from_dict(hf_config))
  return dict(name=name, dir=d, ckpt=d / "0-30.ckpt", base=base, meta=meta, hf_config=hf_config, trained=trained,
              pm=pm, model=model, sd={k: v.numpy() for k, v in sd.items()})


def test_loaded_params_are_the_trained_weights_bitwise(seed):
  base_before = {k: np.array(v) for k, v in _flat(seed["base"]).items()}
  params = mblip_convert.load_seed_checkpoint(seed["ckpt"], seed["base"], seed["hf_config"])
  # reference: the trained torch model's own state dict, key by key (transposed linears, [1, Q, D] queries)
  c = blip2.Blip2Config.from_dict(seed["hf_config"])
  for r in blip2_convert.rules(c):
    if not r.key.startswith(SEED):
      continue
    want = seed["trained"].state_dict()[r.key].numpy()
    got = _flat(params)[r.path]
    got = got.T if r.kind == "linear" else got
    np.testing.assert_array_equal(got, want, err_msg=r.key)
  flat, n_changed = _flat(params), 0
  for k, v in base_before.items():  # the ViT and LLM are the base's; the base tree is left alone
    np.testing.assert_array_equal(_flat(seed["base"])[k], v)
    if k[0] in ("vision_model", "language_model"):
      np.testing.assert_array_equal(flat[k], v, err_msg=str(k))
    else:
      n_changed += not np.array_equal(flat[k], v)
  assert set(flat) == set(base_before) and n_changed > 10


def _torch_logits(seed, px, ids, mask, labels):
  with torch.no_grad():
    prefix = torch_prefix(seed["trained"], torch.from_numpy(px))
    pm = seed["pm"]
    embeds = torch.cat([prefix, pm.get_input_embeddings()(torch.from_numpy(ids))], 1)
    full = torch.cat([torch.ones(prefix.shape[:2], dtype=torch.long), torch.from_numpy(mask)], 1)
    if seed["name"] == "mt5":
      return pm(inputs_embeds=embeds, attention_mask=full, labels=torch.from_numpy(labels)).logits.numpy()
    return pm(inputs_embeds=embeds, attention_mask=full).logits[:, -ids.shape[1]:].numpy()


def test_merged_adapter_matches_the_peft_model(seed):
  rng = np.random.default_rng(2)
  px, ids, mask = inputs(rng, left_pad=seed["name"] == "bloom")
  labels = rng.integers(2, 97, (3, 5)).astype(np.int64) if seed["name"] == "mt5" else None
  ref = _torch_logits(seed, px, ids, mask, labels)
  model = seed["model"]
  merged = mblip_convert.load_seed_checkpoint(seed["ckpt"], seed["base"], seed["hf_config"], adapter_dir="auto")
  ours = np.asarray(model.apply({"params": merged}, nhwc(px), ids, mask, labels)["logits"])
  assert ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, atol=1e-4)
  # unmerged: the same adapters injected; without them the logits differ (the adapter matters)
  params, adapters, cfg = mblip_convert.load_seed_checkpoint(seed["ckpt"], seed["base"], seed["hf_config"],
                                                             adapter_dir=seed["dir"] / "0-30", merge=False)
  assert (cfg.r, cfg.lora_alpha) == (4, 12.0) and all(k.startswith("language_model/") for k in adapters)
  injected = lora.apply_with_lora(model, params, adapters, cfg, nhwc(px), ids, mask, labels)["logits"]
  np.testing.assert_allclose(np.asarray(injected), ref, atol=1e-4)
  plain = np.asarray(model.apply({"params": params}, nhwc(px), ids, mask, labels)["logits"])
  assert np.abs(plain - ref).max() > 1e-2


def test_partial_and_bare_checkpoints(seed, tmp_path):
  """A stage that trained only the projection saves only it (the rest stays the base's); a bare state dict
  (no Lightning wrapper) reads the same."""
  proj = {k: torch.from_numpy(v) for k, v in seed["sd"].items() if k.startswith("model.model.language_projection")}
  torch.save(proj, tmp_path / "bare.pt")
  params = mblip_convert.load_seed_checkpoint(tmp_path / "bare.pt", seed["base"], seed["hf_config"])
  np.testing.assert_array_equal(params["language_projection"]["kernel"],
                                seed["sd"]["model.model.language_projection.weight"].T)
  for k, v in _flat(seed["base"]).items():
    if k[0] != "language_projection":
      np.testing.assert_array_equal(_flat(params)[k], v, err_msg=str(k))


def _save(path, sd):
  torch.save({"state_dict": {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}}, path)
  return path


def test_errors_name_the_key(seed, tmp_path):
  base, hf, sd = seed["base"], seed["hf_config"], seed["sd"]
  load = mblip_convert.load_seed_checkpoint
  with pytest.raises(core.ConversionError, match=r"model\.model\.vision_model\.extra"):
    load(_save(tmp_path / "a.ckpt", {**sd, "model.model.vision_model.extra": np.zeros(2, np.float32)}), base, hf)
  key = "qformer.layernorm.weight"
  with pytest.raises(core.ConversionError, match=r"qformer\.layernorm\.weight \(3,\)"):
    load(_save(tmp_path / "b.ckpt", {**sd, "model.model." + key: np.zeros(3, np.float32)}), base, hf)
  missing = {k: v for k, v in sd.items() if not k.endswith("qformer.layernorm.bias")}
  with pytest.raises(core.ConversionError, match=r"missing keys: qformer\.layernorm\.bias"):
    load(_save(tmp_path / "c.ckpt", missing), base, hf)
  with pytest.raises(core.ConversionError, match="no model.model"):
    load(_save(tmp_path / "d.ckpt", {"qformer.layernorm.bias": np.zeros(2, np.float32)}), base, hf)
  with pytest.raises(FileNotFoundError, match="no PEFT adapter folder"):
    load(_save(tmp_path / "e.ckpt", sd), base, hf, adapter_dir="auto")
  with pytest.raises(FileNotFoundError):
    load(tmp_path / "nowhere.ckpt", base, hf)


def test_command_writes_a_converted_dir(seed, tmp_path):
  core.write_converted(tmp_path / "base", family="mblip", hf_config=seed["hf_config"], params=seed["base"],
                       meta=seed["meta"], tokenizer_src=None)
  mblip_convert.main(["seed", str(seed["ckpt"]), str(tmp_path / "base"), str(tmp_path / "out"),
                      "--adapter", "auto"])
  meta, hf_config, params = core.read_converted(tmp_path / "out")
  assert meta["family"] == "mblip" and meta["llm_family"] == seed["meta"]["llm_family"]
  assert hf_config["text_config"]["model_type"] == seed["name"] and hf_config["num_query_tokens"] == Q
  want = mblip_convert.load_seed_checkpoint(seed["ckpt"], seed["base"], seed["hf_config"], adapter_dir="auto")
  for k, v in _flat(want).items():
    np.testing.assert_array_equal(_flat(params)[k], v, err_msg=str(k))
  with pytest.raises(SystemExit, match="error: .*no model.model"):
    mblip_convert.main(["seed", str(_save(tmp_path / "x.ckpt", {"a": np.zeros(1, np.float32)})),
                        str(tmp_path / "base"), str(tmp_path / "o2")])
