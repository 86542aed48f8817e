"""The strict HF <-> mmret_jax converter: round trips through the CLI, source formats, BLaIR layout, errors."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

os.environ["TRANSFORMERS_VERBOSITY"] = "error"

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from fixtures import CORPUS, assert_params_equal, make_hf_dir  # noqa: E402
from mmret_jax import convert  # noqa: E402
from mmret_jax.convert.__main__ import main  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# (family, head) -> HF model class name used to reload the round-tripped dir
SOURCES = {
    "roberta": ("roberta", None),
    "bert": ("bert", None),
    "roberta-mlm": ("roberta", "mlm"),
    "bert-mlm": ("bert", "mlm"),
}


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory):
  """Lazily built tiny HF dirs (written by save_pretrained): name -> (path, torch model, tokenizer)."""
  built = {}

  def get(name: str):
    if name not in built:
      family, head = SOURCES[name]
      path = tmp_path_factory.mktemp(f"src-{name}")
      model, tok = make_hf_dir(path, family, head=head, seed=len(built) + 11)
      built[name] = (path, model, tok)
    return built[name]

  return get


# ----------------------------------------------------------------------------- helpers



def _numpy_sd(model: torch.nn.Module) -> dict[str, np.ndarray]:
  """state_dict as independent numpy arrays (tied tensors become equal copies)."""
  return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def _write_hf_dir(path: pathlib.Path, sd: dict[str, np.ndarray], config: dict,
                  tokenizer_from: pathlib.Path | None = None) -> pathlib.Path:
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  path.mkdir(parents=True, exist_ok=True)
  save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path / "model.safetensors"))
  (path / "config.json").write_text(json.dumps(config))
  if tokenizer_from is not None:
    for name in TOKENIZER_FILES + ("special_tokens_map.json", "vocab.json", "merges.txt", "vocab.txt"):
      if (tokenizer_from / name).exists():
        shutil.copy(tokenizer_from / name, path / name)
  return path


def _config(src: pathlib.Path) -> dict:
  return json.loads((src / "config.json").read_text())


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  return dict(load_file(str(path)))


def _ids(tok, texts=CORPUS):
  enc = tok(list(texts), padding=True)
  return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}


# ----------------------------------------------------------------------------- (a) round trips

@pytest.mark.parametrize("name", list(SOURCES))
def test_cli_round_trip_hf_to_ours_to_hf_is_bitwise(hf_src, tmp_path, capsys, name):
  import transformers as tf  # pylint: disable=import-outside-toplevel
  src, tmodel, tok = hf_src(name)
  family, head = SOURCES[name]
  mid, dst = tmp_path / "ours", tmp_path / "hf"

  assert main(["to-jax", str(src), str(mid)]) == 0
  out = capsys.readouterr().out
  assert "converted" in out and "tokenizer.json" in out
  meta = json.loads((mid / "mmret_jax.json").read_text())
  assert meta["family"] == "bert" and meta["format_version"] == 1
  assert meta["mlm"] == (head == "mlm") and meta["pooler"] == (head is None) and meta["cl"] is False
  assert meta["hf_prefix"] == ("" if head is None else f"{family}.")
  for f in TOKENIZER_FILES:
    assert (mid / f).exists(), f

  # the converted dir holds exactly what the HF dir converts to in memory
  meta2, cfg2, params2, on_the_fly = convert.load_any(mid)
  assert not on_the_fly and cfg2 == _config(src)
  _, _, params_mem = convert.convert_in_memory(src)
  assert_params_equal(params2, params_mem)

  assert main(["to-hf", str(mid), str(dst)]) == 0
  assert "wrote" in capsys.readouterr().out
  auto = tf.AutoModelForMaskedLM if head == "mlm" else tf.AutoModel
  reloaded, info = auto.from_pretrained(dst, output_loading_info=True)
  for k in ("missing_keys", "unexpected_keys", "mismatched_keys"):
    assert not info.get(k), (k, info[k])
  assert type(reloaded) is type(tmodel)
  ref_sd, new_sd = tmodel.state_dict(), reloaded.state_dict()
  assert sorted(ref_sd) == sorted(new_sd)
  for k in ref_sd:
    assert new_sd[k].dtype == ref_sd[k].dtype, k
    assert torch.equal(new_sd[k], ref_sd[k]), k
  if head == "mlm":  # the decoder is tied again on reload
    emb = reloaded.get_input_embeddings().weight
    assert reloaded.get_output_embeddings().weight.data_ptr() == emb.data_ptr()

  # tokenizers in both dirs encode exactly as the original
  want = _ids(tok)
  for d in (mid, dst):
    assert _ids(tf.AutoTokenizer.from_pretrained(d)) == want
  assert len(tf.AutoTokenizer.from_pretrained(dst)) == len(tok)


def test_python_m_cli_subprocess(hf_src, tmp_path):
  """One real `python -m mmret_jax.convert` run (the rest call main() in-process)."""
  src, _, _ = hf_src("roberta")
  dst = tmp_path / "ours"
  env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-m", "mmret_jax.convert", "to-jax", str(src), str(dst)],
                        capture_output=True, text=True, env=env, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr
  assert "converted" in proc.stdout and "family=bert" in proc.stdout
  _, _, params, on_the_fly = convert.load_any(dst)
  assert not on_the_fly
  assert_params_equal(params, convert.convert_in_memory(src)[2])


def test_converted_params_run_like_torch(hf_src, tmp_path):
  """A converted dir (not just an in-memory conversion) gives the torch outputs."""
  src, tmodel, tok = hf_src("bert")
  assert main(["to-jax", str(src), str(tmp_path / "ours")]) == 0
  meta, cfg, params, _ = convert.load_any(tmp_path / "ours")
  model = convert.build_model(meta, cfg)
  enc = tok(CORPUS[:3], padding=True, return_tensors="np")
  out = model.apply({"params": params}, jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"]),
                    jnp.asarray(enc["token_type_ids"]))
  with torch.no_grad():
    ref = tmodel(**{k: torch.as_tensor(v) for k, v in enc.items()})
  assert np.abs(np.asarray(out["last_hidden_state"]) - ref.last_hidden_state.numpy()).max() <= 1e-5
  assert np.abs(np.asarray(out["pooler_output"]) - ref.pooler_output.numpy()).max() <= 1e-5


# ----------------------------------------------------------------------------- (b) source formats

@pytest.mark.parametrize("name", ["roberta-mlm", "bert"])
def test_bin_pth_and_bare_safetensors_match_safetensors_dir(hf_src, tmp_path, capsys, name):
  src, tmodel, _ = hf_src(name)
  meta_ref, cfg_ref, params_ref = convert.convert_in_memory(src)
  sd = tmodel.state_dict()  # the full dict, tied decoder weights included (as old .bin files hold them)

  # pytorch_model.bin dir (transformers 5 save_pretrained always writes safetensors: save by hand)
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  shutil.copy(src / "config.json", bin_dir / "config.json")
  torch.save(sd, bin_dir / "pytorch_model.bin")
  assert not (bin_dir / "model.safetensors").exists()
  meta, cfg, params = convert.convert_in_memory(bin_dir)
  assert meta == meta_ref and cfg == cfg_ref
  assert_params_equal(params, params_ref)

  # bare .pth (+ a {"state_dict": ...} wrapper) and bare .safetensors, with --config as a file or a dir
  pth = tmp_path / "weights.pth"
  torch.save(sd, pth)
  wrapped = tmp_path / "wrapped.pth"
  torch.save({"state_dict": sd, "epoch": 3}, wrapped)
  bare_st = tmp_path / "weights.safetensors"
  shutil.copy(src / "model.safetensors", bare_st)
  for f, config in ((pth, src / "config.json"), (wrapped, src), (bare_st, src / "config.json")):
    meta, _, params = convert.convert_in_memory(f, config=config)
    assert meta == meta_ref, f
    assert_params_equal(params, params_ref)

  # the CLI with --config; tokenizer files come from the config's dir
  out = tmp_path / "from_pth"
  assert main(["to-jax", str(pth), str(out), "--config", str(src / "config.json")]) == 0
  capsys.readouterr()
  assert (out / "tokenizer.json").exists()
  assert_params_equal(convert.load_any(out)[2], params_ref)

  # a bare state dict without --config is refused with a hint
  with pytest.raises(convert.ConversionError, match="--config"):
    convert.convert_in_memory(pth)
  assert main(["to-jax", str(pth), str(tmp_path / "nocfg")]) == 1
  err = capsys.readouterr().err
  assert "error:" in err and "--config" in err


# ----------------------------------------------------------------------------- (c) BLaIR layout

def test_blair_style_checkpoint_converts_and_round_trips(hf_src, tmp_path, capsys):
  """RobertaModel(add_pooling_layer=False) under `roberta.` + SimCSE/BLaIR `mlp.dense` + `lm_head`."""
  src, mlm_model, tok = hf_src("roberta-mlm")
  h = mlm_model.config.hidden_size
  g = torch.Generator().manual_seed(3)
  mlp = torch.nn.Linear(h, h)
  with torch.no_grad():
    mlp.weight.copy_(0.2 * torch.randn(h, h, generator=g))
    mlp.bias.copy_(0.1 * torch.randn(h, generator=g))
  sd = _numpy_sd(mlm_model)  # roberta.* + lm_head.* (decoder tied)
  assert not any(k.startswith("roberta.pooler") for k in sd)
  sd["mlp.dense.weight"] = mlp.weight.detach().numpy().copy()
  sd["mlp.dense.bias"] = mlp.bias.detach().numpy().copy()
  max_pos = mlm_model.config.max_position_embeddings
  sd["roberta.embeddings.position_ids"] = np.arange(max_pos, dtype=np.int64)[None]  # old HF buffer
  cfg = {**_config(src), "architectures": ["BLaIR"]}
  blair = _write_hf_dir(tmp_path / "blair", sd, cfg, tokenizer_from=src)

  mid = tmp_path / "ours"
  assert main(["to-jax", str(blair), str(mid)]) == 0
  assert "prefix='roberta.'" in capsys.readouterr().out
  meta, hf_config, params, _ = convert.load_any(mid)
  assert (meta["cl"], meta["mlm"], meta["pooler"], meta["hf_prefix"]) == (True, True, False, "roberta.")
  assert set(params) == {"embeddings", "encoder", "mlp", "lm_head"}

  # the CL head and MLM logits match torch
  model = convert.build_model(meta, hf_config)
  enc = tok(CORPUS[:4], padding=True, return_tensors="np")
  out = model.apply({"params": params}, jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"]),
                    return_mlm_logits=True)
  with torch.no_grad():
    t_in = {k: torch.as_tensor(v) for k, v in enc.items()}
    ref = mlm_model(**t_in, output_hidden_states=True)
    ref_cl = torch.tanh(mlp(ref.hidden_states[-1][:, 0])).numpy()
  assert np.abs(np.asarray(out["cl_output"]) - ref_cl).max() <= 1e-5
  assert np.abs(np.asarray(out["mlm_logits"]) - ref.logits.numpy()).max() <= 1e-5
  assert "pooler_output" not in out

  # back to HF: every consumed key bitwise; tied copies and buffers are not written
  dst = tmp_path / "hf"
  assert main(["to-hf", str(mid), str(dst)]) == 0
  back = _read_safetensors(dst / "model.safetensors")
  dropped = {"lm_head.decoder.weight", "lm_head.decoder.bias", "roberta.embeddings.position_ids"}
  assert sorted(back) == sorted(set(sd) - dropped)
  for k, v in back.items():
    assert v.dtype == np.float32, k
    np.testing.assert_array_equal(v, sd[k], err_msg=k)
  assert _config(dst) == cfg
  # ... and converts again to the same params
  meta3, _, params3 = convert.convert_in_memory(dst)
  assert meta3 == {"family": "bert", **{k: meta[k] for k in ("hf_prefix", "pooler", "mlm", "cl")}}
  assert_params_equal(params3, params)


# ----------------------------------------------------------------------------- (d) errors

def _base(hf_src, name="roberta"):
  src, model, _ = hf_src(name)
  return src, _numpy_sd(model), _config(src)


def _key(sd, suffix):
  (k,) = [k for k in sd if k.endswith(suffix)]
  return k


def _case_missing(sd, cfg):
  k = _key(sd, "encoder.layer.1.output.dense.bias")
  del sd[k]
  return k


def _case_unexpected(sd, cfg):
  k = "encoder.layer.0.attention.self.rotary.weight"
  sd[k] = np.zeros((4,), np.float32)
  return k


def _case_transposed(sd, cfg):
  k = _key(sd, "encoder.layer.0.intermediate.dense.weight")
  sd[k] = np.ascontiguousarray(sd[k].T)
  return k


def _case_vocab(sd, cfg):
  k = _key(sd, "embeddings.word_embeddings.weight")
  sd[k] = np.concatenate([sd[k], sd[k][:1]])
  return k


def _case_one_d(sd, cfg):
  k = _key(sd, "encoder.layer.1.attention.self.query.weight")
  sd[k] = sd[k][0]
  return k


def _case_layers(sd, cfg):
  cfg["num_hidden_layers"] = 3  # the weights only have 2
  return "encoder.layer.2.attention.self.query.weight"


def _case_position_type(sd, cfg):
  cfg["position_embedding_type"] = "relative_key"
  return "position_embedding_type"


def _case_activation(sd, cfg):
  cfg["hidden_act"] = "swishy"
  return "swishy"


ERROR_CASES = {
    "missing-key": _case_missing,
    "unexpected-key": _case_unexpected,
    "transposed-linear": _case_transposed,
    "wrong-vocab-rows": _case_vocab,
    "1d-linear-weight": _case_one_d,
    "config-more-layers": _case_layers,
    "relative-positions": _case_position_type,
    "unknown-activation": _case_activation,
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_checkpoint_raises_conversion_error_naming_the_key(hf_src, tmp_path, capsys, case):
  _, sd, cfg = _base(hf_src)
  needle = ERROR_CASES[case](sd, cfg)
  bad = _write_hf_dir(tmp_path / "bad", sd, cfg)
  with pytest.raises(convert.ConversionError) as exc:
    convert.convert_in_memory(bad)
  assert needle in str(exc.value)
  with pytest.raises(convert.ConversionError):
    convert.load_any(bad)
  dst = tmp_path / "out"
  assert main(["to-jax", str(bad), str(dst)]) == 1
  err = capsys.readouterr().err
  assert "error:" in err and needle in err
  assert not dst.exists()  # nothing half-written


@pytest.mark.parametrize("name,tied,table", [
    ("roberta-mlm", "lm_head.decoder.weight", "roberta.embeddings.word_embeddings.weight"),
    ("bert-mlm", "cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
    ("roberta-mlm", "lm_head.decoder.bias", "lm_head.bias"),
])
def test_untied_mlm_decoder_is_an_error(hf_src, tmp_path, capsys, name, tied, table):
  _, sd, cfg = _base(hf_src, name)
  np.testing.assert_array_equal(sd[tied], sd[table])  # tied in the torch model
  # an explicitly tied copy is fine (old .bin files carry it)
  _, _, params = convert.convert_in_memory(_write_hf_dir(tmp_path / "tied", sd, cfg))
  assert "lm_head" in params or "cls" in params
  sd[tied] = sd[tied] + 0.5
  bad = _write_hf_dir(tmp_path / "untied", sd, cfg)
  with pytest.raises(convert.ConversionError, match="not tied") as exc:
    convert.convert_in_memory(bad)
  assert tied in str(exc.value)
  assert main(["to-jax", str(bad), str(tmp_path / "out")]) == 1
  err = capsys.readouterr().err
  assert "error:" in err and tied in err


def test_position_ids_buffers_are_ignored(hf_src, tmp_path):
  src, sd, cfg = _base(hf_src, "bert")
  _, _, ref = convert.convert_in_memory(src)
  sd["embeddings.position_ids"] = np.arange(cfg["max_position_embeddings"], dtype=np.int64)[None]
  _, _, params = convert.convert_in_memory(_write_hf_dir(tmp_path / "buf", sd, cfg))
  assert_params_equal(params, ref)
  # ... but only position_ids: another stray buffer is still an error
  sd["embeddings.some_buffer"] = np.zeros((1, 3), np.int64)
  with pytest.raises(convert.ConversionError, match="embeddings.some_buffer"):
    convert.convert_in_memory(_write_hf_dir(tmp_path / "buf2", sd, cfg))


def test_unsupported_family_is_a_clear_error(hf_src, tmp_path, capsys):
  src, sd, _ = _base(hf_src)
  other = _write_hf_dir(tmp_path / "gpt2", sd, {"model_type": "gpt2", "architectures": ["GPT2Model"]})
  for fn in (convert.convert_in_memory, convert.load_any):
    with pytest.raises(convert.ConversionError, match="not supported") as exc:
      fn(other)
    assert "'gpt2'" in str(exc.value)
  assert main(["to-jax", str(other), str(tmp_path / "out")]) == 1
  err = capsys.readouterr().err
  assert "error:" in err and "not supported" in err and "gpt2" in err
  # A BERT checkpoint under a CLIP config: the strict driver names the keys it cannot place.
  clip = _write_hf_dir(tmp_path / "clip", sd, {"model_type": "clip", "architectures": ["CLIPModel"],
                                                "text_config": {}, "vision_config": {}})
  with pytest.raises(convert.ConversionError, match=r"missing keys: logit_scale, text_model\.embeddings"):
    convert.convert_in_memory(clip)
  with pytest.raises(convert.ConversionError, match="Unknown --family"):
    convert.convert_in_memory(src, family="nope")


def test_missing_sources_raise_file_not_found(tmp_path, capsys):
  nowhere = tmp_path / "does-not-exist"
  for fn in (convert.convert_in_memory, convert.load_any):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
      fn(nowhere)
  with pytest.raises(FileNotFoundError):
    convert.to_jax(nowhere, tmp_path / "out")
  with pytest.raises(FileNotFoundError):
    convert.to_hf(nowhere, tmp_path / "out")
  for cmd in ("to-jax", "to-hf"):
    assert main([cmd, str(nowhere), str(tmp_path / f"out-{cmd}")]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "does-not-exist" in err
  # an existing dir that is neither format
  (tmp_path / "empty").mkdir()
  with pytest.raises(convert.ConversionError, match="neither"):
    convert.load_any(tmp_path / "empty")


def test_to_hf_needs_a_converted_dir(hf_src, tmp_path, capsys):
  src, _, _ = hf_src("roberta")
  with pytest.raises(convert.ConversionError, match="not a converted"):
    convert.to_hf(src, tmp_path / "out")
  assert main(["to-hf", str(src), str(tmp_path / "out2")]) == 1
  assert "error:" in capsys.readouterr().err


def test_non_empty_dst_is_refused_without_overwrite(hf_src, tmp_path, capsys):
  src, _, _ = hf_src("roberta")
  dst = tmp_path / "dst"
  dst.mkdir()
  (dst / "keep.txt").write_text("precious")
  assert main(["to-jax", str(src), str(dst)]) == 2
  err = capsys.readouterr().err
  assert "error:" in err and "--overwrite" in err
  assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]
  assert (dst / "keep.txt").read_text() == "precious"

  # an empty existing dir is fine; --overwrite replaces
  empty = tmp_path / "empty"
  empty.mkdir()
  assert main(["to-jax", str(src), str(empty)]) == 0
  assert main(["to-jax", str(src), str(dst), "--overwrite"]) == 0
  assert_params_equal(convert.load_any(dst)[2], convert.load_any(empty)[2])

  # to-hf refuses too
  hf_dst = tmp_path / "hf"
  hf_dst.mkdir()
  (hf_dst / "x").write_text("x")
  capsys.readouterr()
  assert main(["to-hf", str(empty), str(hf_dst)]) == 2
  assert "error:" in capsys.readouterr().err
  assert not (hf_dst / "model.safetensors").exists()
  assert main(["to-hf", str(empty), str(hf_dst), "--overwrite"]) == 0
  assert (hf_dst / "model.safetensors").exists()
