"""sentence-transformers dirs: `load` / `embed` use the dir's own pooling, normalisation and max
sequence length, and agree with `SentenceTransformer.encode` without being told any of them."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import mmret_jax
from mmret_jax import embed, st_config
from mmret_jax.convert.__main__ import main as convert_main

import fixtures

sentence_transformers = pytest.importorskip("sentence_transformers")

TEXTS = fixtures.CORPUS + ["short one", "Great kettle " * 40, "GLOVES for Hiking"]
POOLING_KEYS = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens",
                "max": "pooling_mode_max_tokens", "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
                "lasttoken": "pooling_mode_lasttoken"}


def write_st_dir(path, pooling="mean", normalize=True, max_seq_length=24, subfolder="", do_lower_case=False):
  """A tiny sentence-transformers dir in the real layout (modules.json, sentence_bert_config.json,
  1_Pooling/config.json, 2_Normalize/), around a random-weight BERT."""
  model_dir = path / subfolder if subfolder else path
  fixtures.make_hf_dir(model_dir, "bert", max_position_embeddings=80)
  modules = [{"idx": 0, "name": "0", "path": subfolder, "type": "sentence_transformers.models.Transformer"},
             {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
  if normalize:
    modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (path / "2_Normalize").mkdir()
  (path / "modules.json").write_text(json.dumps(modules))
  (model_dir / "sentence_bert_config.json").write_text(json.dumps(
      {"max_seq_length": max_seq_length, "do_lower_case": do_lower_case}))
  (path / "1_Pooling").mkdir()
  pool_cfg = {"word_embedding_dimension": 32, **{k: name == pooling for name, k in POOLING_KEYS.items()}}
  (path / "1_Pooling" / "config.json").write_text(json.dumps(pool_cfg))
  return path


def st_encode(path, texts):
  model = sentence_transformers.SentenceTransformer(str(path), device="cpu")
  return model.encode(texts, batch_size=4, convert_to_numpy=True)


@pytest.fixture(scope="module")
def st_dir(tmp_path_factory):
  d = write_st_dir(tmp_path_factory.mktemp("st") / "minilm_like")
  return d, st_encode(d, TEXTS)


def test_load_uses_the_dirs_settings(st_dir, capsys):
  d, want = st_dir
  enc = mmret_jax.load(d)
  assert "sentence-transformers model; using its settings: mean pooling, L2-normalised, max_length 24" in \
      capsys.readouterr().err
  got = enc.encode_text(TEXTS)  # no pooling / normalize / max_length given
  assert enc.last_settings == {"pooling": "mean", "normalize": True, "max_length": 24}
  assert enc.num_truncated == 1  # the long text, cut at max_seq_length like sentence-transformers
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert np.abs(got - want).max() <= 1e-5
  # The caller still wins: CLS pooling, raw vectors.
  raw = enc.encode_text(TEXTS[:2], pooling="cls", normalize=False)
  assert enc.last_settings["pooling"] == "cls" and abs(float(np.linalg.norm(raw[0])) - 1.0) > 1e-3


@pytest.mark.parametrize("pooling,normalize,subfolder", [("cls", False, ""), ("max", True, "0_Transformer"),
                                                         ("mean_sqrt_len", False, ""), ("lasttoken", True, "")])
def test_other_poolings_and_layouts(tmp_path, pooling, normalize, subfolder):
  d = write_st_dir(tmp_path / "st", pooling=pooling, normalize=normalize, subfolder=subfolder)
  got = mmret_jax.load(d, verbose=False).encode_text(TEXTS)
  np.testing.assert_allclose(got, st_encode(d, TEXTS), atol=1e-5, rtol=0)


def test_lower_case_setting(tmp_path):
  d = write_st_dir(tmp_path / "st", do_lower_case=True)
  texts = ["GLOVES for Hiking", "Kettle BOILS fast"]
  np.testing.assert_allclose(mmret_jax.load(d, verbose=False).encode_text(texts), st_encode(d, texts),
                             atol=1e-5, rtol=0)


def test_converted_dir_and_cli_keep_the_settings(st_dir, tmp_path):
  d, want = st_dir
  conv = tmp_path / "conv"
  assert convert_main(["to-jax", str(d), str(conv)]) == 0
  assert st_config.read_settings(conv) == st_config.read_settings(d)
  np.testing.assert_allclose(mmret_jax.load(conv, verbose=False).encode_text(TEXTS), want, atol=1e-5, rtol=0)
  hf = tmp_path / "hf"  # and back: sentence-transformers reads our to-hf output
  assert convert_main(["to-hf", str(conv), str(hf)]) == 0
  np.testing.assert_allclose(st_encode(hf, TEXTS), want, atol=1e-5, rtol=0)
  inp = tmp_path / "texts.txt"
  inp.write_text("\n".join(TEXTS) + "\n")
  r = subprocess.run([sys.executable, "-m", "mmret_jax.embed", "--model", str(conv), "--input", str(inp),
                      "--output", str(tmp_path / "e.npy")], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  assert "using its settings: mean pooling, L2-normalised, max_length 24" in r.stderr
  assert "(mean pooling, L2-normalised, max_length 24)" in r.stdout
  np.testing.assert_allclose(np.load(tmp_path / "e.npy"), want, atol=1e-5, rtol=0)


def test_unsupported_pipelines_are_clear_errors(st_dir, tmp_path):
  d, _ = st_dir
  dense = tmp_path / "dense"
  shutil.copytree(d, dense)
  modules = json.loads((dense / "modules.json").read_text())
  modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
  (dense / "modules.json").write_text(json.dumps(modules))
  with pytest.raises(st_config.SentenceTransformersError, match=r"modules \['Transformer', 'Pooling', "
                     r"'Normalize', 'Dense'\] are not supported"):
    mmret_jax.load(dense)
  weighted = tmp_path / "weighted"
  shutil.copytree(d, weighted)
  (weighted / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_weightedmean_tokens": True}))
  with pytest.raises(st_config.SentenceTransformersError, match=r"pooling \['weightedmean'\] is not supported"):
    mmret_jax.load(weighted)
  inp = tmp_path / "t.txt"
  inp.write_text("hello\n")
  assert embed.main(["--model", str(weighted), "--input", str(inp), "--output", str(tmp_path / "o.npy")]) == 1
