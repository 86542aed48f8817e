"""The CLIP converters: HF CLIPModel round trip through the CLI, OpenAI CLIP state dicts, errors.

HF models have random weights (LayerNorms and biases randomised) and are written with
`save_pretrained` next to a real (tiny, trained offline) CLIP BPE tokenizer and a CLIPImageProcessor.
The OpenAI-format checkpoint is built here from an HF model's state dict by the inverse key map
(`hf_to_openai`), so the OpenAI path must give the HF path's params bit for bit.
"""

from __future__ import annotations

import json
import os
import pathlib

os.environ["TRANSFORMERS_VERBOSITY"] = "error"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from fixtures import CORPUS, assert_params_equal  # noqa: E402
from mmret_jax import convert  # noqa: E402
from mmret_jax.convert.__main__ import main  # noqa: E402

SOT, EOT = "<|startoftext|>", "<|endoftext|>"


# ----------------------------------------------------------------------------- builders

def clip_tokenizer(vocab_size: int = 200):
  """A real CLIPTokenizer(Fast): a BPE with CLIP's normaliser / pre-tokeniser / `</w>` suffix trained on
  CORPUS, wrapped with CLIP's specials (`pad` = `<|endoftext|>`, as openai/clip-vit-*)."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  import transformers as tf  # pylint: disable=import-outside-toplevel
  from tokenizers import Regex, models, normalizers, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE(unk_token=EOT, end_of_word_suffix="</w>"))
  tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                         normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"""
                                 r"""[\p{N}]|[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SOT, EOT], end_of_word_suffix="</w>",
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(CORPUS * 4, trainer)
  model = json.loads(tok.to_str())["model"]
  for c in sorted(pre_tokenizers.ByteLevel.alphabet()):  # as CLIP's vocab: every byte also as a whole word
    model["vocab"].setdefault(c + "</w>", len(model["vocab"]))
  merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
  return tf.CLIPTokenizerFast(vocab=model["vocab"], merges=merges, bos_token=SOT, eos_token=EOT, pad_token=EOT,
                              unk_token=EOT, model_max_length=16)


def make_clip(path: pathlib.Path | None, text: dict, vision: dict, projection_dim: int, seed: int = 0,
              logit_scale: float = 4.6052, **config):
  """A random HF CLIPModel (LayerNorms, biases, class embedding and logit scale randomised)."""
  import transformers as tf  # pylint: disable=import-outside-toplevel
  cfg = tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim, **config)
  torch.manual_seed(seed)
  model = tf.CLIPModel(cfg)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name or "layrnorm" in name or "layernorm" in name:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
      elif name.endswith("bias") or name.endswith("class_embedding"):
        p.copy_(0.05 * torch.randn_like(p))
    model.logit_scale.fill_(logit_scale)  # not the config's init value: must come from the weights
  model.eval()
  if path is not None:
    model.save_pretrained(path)
  return model


def hf_to_openai(sd: dict[str, torch.Tensor], *, jit_scalars: bool = True) -> dict[str, torch.Tensor]:
  """HF CLIPModel state dict -> OpenAI CLIP (ViT) layout, the inverse of `convert.clip.openai_to_hf`."""
  sd = {k: v.detach().clone() for k, v in sd.items() if not k.endswith("position_ids")}
  out: dict[str, torch.Tensor] = {}

  def blocks(hf: str, oa: str):
    n = len({k.split(".")[3] for k in sd if k.startswith(f"{hf}.encoder.layers.")})
    for i in range(n):
      h, o = f"{hf}.encoder.layers.{i}.", f"{oa}{i}."
      for w in ("weight", "bias"):  # fused [3W, ...] in q, k, v order
        out[f"{o}attn.in_proj_{w}"] = torch.cat([sd[f"{h}self_attn.{p}.{w}"] for p in ("q_proj", "k_proj", "v_proj")])
      for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                   ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
        for w in ("weight", "bias"):
          out[f"{o}{b}.{w}"] = sd[f"{h}{a}.{w}"]

  v = "vision_model."
  out["visual.conv1.weight"] = sd[v + "embeddings.patch_embedding.weight"]
  out["visual.class_embedding"] = sd[v + "embeddings.class_embedding"]
  out["visual.positional_embedding"] = sd[v + "embeddings.position_embedding.weight"]
  for a, b in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
    out[f"visual.{b}.weight"], out[f"visual.{b}.bias"] = sd[f"{v}{a}.weight"], sd[f"{v}{a}.bias"]
  blocks("vision_model", "visual.transformer.resblocks.")
  out["visual.proj"] = sd["visual_projection.weight"].T.contiguous()  # OpenAI stores [in, out]
  t = "text_model."
  out["token_embedding.weight"] = sd[t + "embeddings.token_embedding.weight"]
  out["positional_embedding"] = sd[t + "embeddings.position_embedding.weight"]
  blocks("text_model", "transformer.resblocks.")
  out["ln_final.weight"], out["ln_final.bias"] = sd[t + "final_layer_norm.weight"], sd[t + "final_layer_norm.bias"]
  out["text_projection"] = sd["text_projection.weight"].T.contiguous()
  out["logit_scale"] = sd["logit_scale"]
  if jit_scalars:  # as in the state dict of OpenAI's JIT download
    conv, pos = out["visual.conv1.weight"], out["visual.positional_embedding"]
    out["input_resolution"] = torch.tensor(conv.shape[-1] * int(round((pos.shape[0] - 1) ** 0.5)))
    out["context_length"] = torch.tensor(out["positional_embedding"].shape[0])
    out["vocab_size"] = torch.tensor(out["token_embedding.weight"].shape[0])
  return out


# OpenAI head counts are width // 64: widths 64 (1 head) and 128 (2 heads); legacy eos id 2 (argmax pooling).
OPENAI_TEXT = dict(vocab_size=99, hidden_size=64, num_attention_heads=1, num_hidden_layers=2, intermediate_size=256,
                   max_position_embeddings=16, eos_token_id=2, bos_token_id=0, pad_token_id=1, projection_dim=24)
OPENAI_VISION = dict(hidden_size=128, num_attention_heads=2, num_hidden_layers=3, intermediate_size=300,
                     image_size=32, patch_size=8, projection_dim=24)


@pytest.fixture(scope="module")
def openai_src(tmp_path_factory):
  """(HF dir, torch model, OpenAI .pth) of one model."""
  path = tmp_path_factory.mktemp("openai-hf")
  tmodel = make_clip(path, OPENAI_TEXT, OPENAI_VISION, 24, seed=5)
  pth = path.parent / "openai-clip.pth"
  torch.save(hf_to_openai(tmodel.state_dict()), pth)
  return path, tmodel, pth




def _features(model, params, ids, mask, images):
  """(text features, image features) of ours in one jitted apply; images NHWC."""
  fn = jax.jit(lambda p, i, m, x: model.apply({"params": p}, i, x, m))
  out = fn(params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(images))
  return np.asarray(out["text_embeds"]), np.asarray(out["image_embeds"])


def _torch_features(tmodel, ids, mask, images):
  def feats(out):
    return (out if isinstance(out, torch.Tensor) else out.pooler_output).numpy()
  with torch.no_grad():
    t = tmodel.get_text_features(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask))
    v = tmodel.get_image_features(pixel_values=torch.as_tensor(images.transpose(0, 3, 1, 2).copy()))
  return feats(t), feats(v)


# ----------------------------------------------------------------------------- (a) HF round trip

def test_hf_round_trip_through_cli_is_bitwise_and_copies_tokenizer_and_processor(tmp_path, capsys):
  import transformers as tf  # pylint: disable=import-outside-toplevel
  src, mid, dst = tmp_path / "src", tmp_path / "ours", tmp_path / "hf"
  tok = clip_tokenizer()
  tmodel = make_clip(src, dict(vocab_size=len(tok), hidden_size=40, num_attention_heads=5, num_hidden_layers=2,
                               intermediate_size=67, max_position_embeddings=16, eos_token_id=tok.eos_token_id,
                               bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id),
                     dict(hidden_size=48, num_attention_heads=3, num_hidden_layers=2, intermediate_size=83,
                          image_size=32, patch_size=8), 24, seed=3)
  tok.save_pretrained(src)
  tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32).save_pretrained(src)
  aux = sorted(p.name for p in src.iterdir() if p.name not in ("config.json", "model.safetensors"))
  assert {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"} <= set(aux)

  assert main(["to-jax", str(src), str(mid)]) == 0
  out = capsys.readouterr().out
  assert "family=clip" in out and "preprocessor_config.json" in out
  meta, cfg, params, on_the_fly = convert.load_any(mid)
  assert meta["family"] == "clip" and not on_the_fly
  assert cfg == json.loads((src / "config.json").read_text())
  assert_params_equal(params, convert.convert_in_memory(src)[2])
  # conv patch kernel stored HWIO; torch linear weights transposed
  assert params["vision_model"]["embeddings"]["patch_embedding"]["kernel"].shape == (8, 8, 3, 48)
  assert params["text_projection"]["kernel"].shape == (40, 24)

  assert main(["to-hf", str(mid), str(dst)]) == 0
  assert "wrote" in capsys.readouterr().out
  reloaded, info = tf.CLIPModel.from_pretrained(dst, output_loading_info=True)
  for k in ("missing_keys", "unexpected_keys", "mismatched_keys"):
    assert not info.get(k), (k, info[k])
  ref_sd = {k: v for k, v in tmodel.state_dict().items() if not k.endswith("position_ids")}
  new_sd = {k: v for k, v in reloaded.state_dict().items() if not k.endswith("position_ids")}
  assert sorted(ref_sd) == sorted(new_sd)
  for k in ref_sd:
    assert new_sd[k].dtype == ref_sd[k].dtype == torch.float32, k
    assert torch.equal(new_sd[k], ref_sd[k]), k
  assert reloaded.config.to_dict()["text_config"]["eos_token_id"] == tok.eos_token_id

  # tokenizer and image-processor files are copied byte for byte, both ways, and load the same
  for d in (mid, dst):
    for name in aux:
      assert (d / name).read_bytes() == (src / name).read_bytes(), (d, name)
  want = tf.AutoTokenizer.from_pretrained(src)(CORPUS[:4], padding=True, truncation=True)
  assert tf.AutoTokenizer.from_pretrained(dst)(CORPUS[:4], padding=True, truncation=True) == want
  assert tf.CLIPImageProcessor.from_pretrained(dst).to_dict() == tf.CLIPImageProcessor.from_pretrained(src).to_dict()

  # real tokenizer output (padded with the EOS id; first-EOS pooling) through the converted dir = torch
  texts = ["Great kettle!", "blue", "trail runner shoe with mesh", CORPUS[1]]
  enc = tf.AutoTokenizer.from_pretrained(mid)(texts, padding="max_length", truncation=True, return_tensors="np")
  assert enc["attention_mask"][:2, -1].tolist() == [0, 0] and enc["input_ids"].shape == (4, 16)
  # the first EOS closes the real tokens (no unknown, which is also <|endoftext|>, comes earlier)
  assert ((enc["input_ids"] == tok.eos_token_id).argmax(1) == enc["attention_mask"].sum(1) - 1).all()
  images = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
  ours = _features(convert.build_model(meta, cfg), params, enc["input_ids"], enc["attention_mask"], images)
  ref = _torch_features(tmodel, enc["input_ids"], enc["attention_mask"], images)
  for a, b in zip(ours, ref):
    assert np.abs(a - b).max() <= 1e-5


# ----------------------------------------------------------------------------- (b) OpenAI format

def test_openai_state_dict_converts_to_the_hf_params(openai_src, tmp_path, capsys):
  import transformers as tf  # pylint: disable=import-outside-toplevel
  hf_dir, tmodel, pth = openai_src
  sd = torch.load(pth, weights_only=True)
  assert "transformer.resblocks.0.attn.in_proj_weight" in sd and "visual.proj" in sd
  assert sd["visual.proj"].shape == (128, 24) and sd["text_projection"].shape == (64, 24)

  dst = tmp_path / "ours"
  assert main(["to-jax", str(pth), str(dst), "--family", "openai-clip"]) == 0  # no --config
  assert "family=clip" in capsys.readouterr().out
  meta, cfg, params, _ = convert.load_any(dst)
  hf_meta, hf_cfg, hf_params = convert.convert_in_memory(hf_dir)
  assert meta["family"] == hf_meta["family"] == "clip"
  assert_params_equal(params, hf_params)  # bit for bit
  # the inferred config is the HF one (heads = width // 64, legacy eos id 2, image = patch * grid)
  model, hf_model = convert.build_model(meta, cfg), convert.build_model(hf_meta, hf_cfg)
  assert model.config == hf_model.config
  assert (model.config.text.num_attention_heads, model.config.vision.num_attention_heads) == (1, 2)
  assert (model.config.vision.image_size, model.config.vision.patch_size) == (32, 8)
  assert (model.config.text.intermediate_size, model.config.vision.intermediate_size) == (256, 300)
  assert model.config.text.eos_token_id == 2 and model.config.projection_dim == 24
  assert float(params["logit_scale"]) == pytest.approx(4.6052)
  # ... the in-memory API agrees
  assert_params_equal(convert.convert_in_memory(pth, family="openai-clip")[2], hf_params)

  # features = torch's (legacy argmax pooling: the EOT is the largest id, as in OpenAI's vocab)
  rng = np.random.default_rng(1)
  lengths = np.array([16, 9, 4])
  mask = (np.arange(16)[None] < lengths[:, None]).astype(np.int64)
  ids = np.where(mask == 1, rng.integers(3, 97, size=(3, 16)), 0)
  ids[:, 0], ids[np.arange(3), lengths - 1] = 97, 98
  images = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
  ours = _features(model, params, ids, mask, images)
  for a, b in zip(ours, _torch_features(tmodel, ids, mask, images)):
    assert np.abs(a - b).max() <= 1e-5

  # and back out as an HF dir that transformers loads to the original weights
  hf_out = tmp_path / "hf"
  assert main(["to-hf", str(dst), str(hf_out)]) == 0
  reloaded = tf.CLIPModel.from_pretrained(hf_out)
  ref_sd = {k: v for k, v in tmodel.state_dict().items() if not k.endswith("position_ids")}
  new_sd = {k: v for k, v in reloaded.state_dict().items() if not k.endswith("position_ids")}
  assert sorted(ref_sd) == sorted(new_sd)
  for k in ref_sd:
    assert torch.equal(new_sd[k], ref_sd[k]), k
  assert reloaded.config.text_config.eos_token_id == 2
  assert reloaded.config.vision_config.num_attention_heads == 2


def test_legacy_config_dict_fields_win(openai_src, tmp_path):
  """Old hub configs carry `text_config_dict` / `vision_config_dict`; HF lets them override `*_config`."""
  import transformers as tf  # pylint: disable=import-outside-toplevel
  hf_dir, _, _ = openai_src
  cfg = json.loads((hf_dir / "config.json").read_text())
  cfg["text_config_dict"], cfg["text_config"] = cfg["text_config"], {"hidden_act": "gelu", "eos_token_id": 5}
  cfg["vision_config_dict"], cfg["vision_config"] = cfg["vision_config"], {"num_attention_heads": 4}
  old = tmp_path / "old"
  old.mkdir()
  (old / "config.json").write_text(json.dumps(cfg))
  (old / "model.safetensors").symlink_to(hf_dir / "model.safetensors")
  hf = tf.CLIPConfig.from_pretrained(old)
  assert (hf.text_config.hidden_act, hf.text_config.eos_token_id, hf.vision_config.num_attention_heads) == (
      "quick_gelu", 2, 2)
  meta, new_cfg, params = convert.convert_in_memory(old)
  ref_meta, ref_cfg, ref_params = convert.convert_in_memory(hf_dir)
  assert_params_equal(params, ref_params)
  assert convert.build_model(meta, new_cfg).config == convert.build_model(ref_meta, ref_cfg).config


def test_openai_without_jit_scalars(openai_src, tmp_path):
  """`clip.load(..., jit=False).state_dict()` has no input_resolution/context_length/vocab_size."""
  hf_dir, tmodel, _ = openai_src
  pth = tmp_path / "nojit.pth"
  torch.save(hf_to_openai(tmodel.state_dict(), jit_scalars=False), pth)
  assert_params_equal(convert.convert_in_memory(pth, family="openai-clip")[2], convert.convert_in_memory(hf_dir)[2])


# ----------------------------------------------------------------------------- (c) errors

def _openai_error(tmp_path, capsys, sd_or_path, needle: str):
  """Converting must fail with a ConversionError containing `needle`, in the API and the CLI."""
  if isinstance(sd_or_path, dict):
    path = tmp_path / "bad.pth"
    torch.save(sd_or_path, path)
  else:
    path = sd_or_path
  with pytest.raises(convert.ConversionError) as exc:
    convert.convert_in_memory(path, family="openai-clip")
  assert needle in str(exc.value)
  out = tmp_path / "out"
  assert main(["to-jax", str(path), str(out), "--family", "openai-clip"]) == 1
  err = capsys.readouterr().err
  assert "error:" in err and needle in err
  assert not out.exists()  # nothing half-written
  return str(exc.value)


def test_openai_resnet_checkpoint_is_refused(openai_src, tmp_path, capsys):
  _, tmodel, _ = openai_src
  sd = {k: v for k, v in hf_to_openai(tmodel.state_dict()).items() if not k.startswith("visual.")}
  # ModifiedResNet (RN50, ...): a 3x3 stem `conv1` too, then layer1..4 and an attention pool
  sd.update({"visual.conv1.weight": torch.zeros(32, 3, 3, 3), "visual.bn1.weight": torch.ones(32),
             "visual.layer1.0.conv1.weight": torch.zeros(64, 32, 1, 1), "visual.layer1.0.bn1.weight": torch.ones(64),
             "visual.attnpool.positional_embedding": torch.zeros(50, 128)})
  msg = _openai_error(tmp_path, capsys, sd, "ResNet")
  assert "ViT" in msg


def test_openai_unexpected_and_missing_keys_are_named(openai_src, tmp_path, capsys):
  _, tmodel, _ = openai_src
  sd = hf_to_openai(tmodel.state_dict())
  extra = dict(sd, **{"visual.transformer.resblocks.0.attn.rel_pos_bias": torch.zeros(4)})
  _openai_error(tmp_path, capsys, extra, "visual.transformer.resblocks.0.attn.rel_pos_bias")
  stray = dict(sd, **{"transformer.resblocks.7.ln_1.weight": torch.zeros(64)})  # a block without attention
  _openai_error(tmp_path, capsys, stray, "transformer.resblocks.7.ln_1.weight")
  missing = dict(sd)
  del missing["ln_final.bias"]
  _openai_error(tmp_path, capsys, missing, "ln_final.bias")


def test_torchscript_archive_is_refused(tmp_path, capsys):
  path = tmp_path / "ViT-B-32.pt"
  torch.jit.save(torch.jit.script(torch.nn.Linear(3, 2)), str(path))
  msg = _openai_error(tmp_path, capsys, path, "TorchScript")
  assert "state_dict()" in msg  # says how to export the weights


def test_mis_shaped_patch_kernel_is_named(openai_src, tmp_path, capsys):
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  hf_dir, tmodel, _ = openai_src
  key = "vision_model.embeddings.patch_embedding.weight"
  cfg = json.loads((hf_dir / "config.json").read_text())
  base = {k: v.numpy().copy() for k, v in tmodel.state_dict().items()}
  # HF dir: a channels-last [O, kh, kw, I] kernel, and a 3-D one
  for i, bad in enumerate((np.ascontiguousarray(base[key].transpose(0, 2, 3, 1)), base[key][:, 0])):
    d = tmp_path / f"hf{i}"
    d.mkdir()
    save_file({**base, key: bad}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(convert.ConversionError) as exc:
      convert.convert_in_memory(d)
    assert key in str(exc.value)
    assert main(["to-jax", str(d), str(tmp_path / f"out{i}")]) == 1
    assert key in capsys.readouterr().err
  # OpenAI: a non-square conv1 (8x7 patches) cannot be a ViT patch embedding
  sd = hf_to_openai(tmodel.state_dict())
  sd["visual.conv1.weight"] = sd["visual.conv1.weight"][..., :7].contiguous()
  _openai_error(tmp_path, capsys, sd, key)


def test_openai_width_not_usable_for_heads(tmp_path, capsys):
  """OpenAI infers heads = width // 64: a width below 64 has no heads, a clear error (not a crash)."""
  tmodel = make_clip(None, dict(OPENAI_TEXT, hidden_size=32, intermediate_size=64),
                     dict(OPENAI_VISION, num_hidden_layers=1), 24)
  msg = _openai_error(tmp_path, capsys, hf_to_openai(tmodel.state_dict()), "width // 64")
  assert "text width 32" in msg


def test_heads_not_dividing_width_is_a_conversion_error(openai_src, tmp_path, capsys):
  hf_dir, _, _ = openai_src
  cfg = json.loads((hf_dir / "config.json").read_text())
  cfg["vision_config"]["num_attention_heads"] = 3  # 128 % 3 != 0
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "config.json").write_text(json.dumps(cfg))
  (bad / "model.safetensors").symlink_to(hf_dir / "model.safetensors")
  with pytest.raises(convert.ConversionError, match="vision_config.hidden_size 128 .* num_attention_heads 3"):
    convert.convert_in_memory(bad)
  assert main(["to-jax", str(bad), str(tmp_path / "out")]) == 1
  assert "num_attention_heads 3" in capsys.readouterr().err
